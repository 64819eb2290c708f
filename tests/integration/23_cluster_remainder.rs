//! A takeover that lasts: what the session's old copy received meanwhile (more than a
//! part of a hand-over carries) follows it in parts, every acknowledged message once, in
//! order.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::cluster::persistent;
use super::cluster_takeover::{
    assert_once_in_order, durable_node, fresh_dir, index, publish_until, receive_all,
};
use super::common::V4Client;
use super::etcd::Etcd;

/// A node in a process of its own, killed when dropped (a failed test leaves none behind).
struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node of `cluster` in a process of its own (so it can be stopped), with a 2 s lease.
fn node_process(etcd: &Etcd, cluster: &str, name: &str, data: &std::path::Path) -> NodeProcess {
    let unused = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (mqtt, link) = (unused(), unused());
    let child = Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args(["--bind", &mqtt.to_string(), "--http-bind", "none", "--io-memory", "524288", "--cores", "1"])
        .args(["--cluster", &etcd.url(), "--cluster-name", cluster, "--node-name", name])
        .args(["--node-bind", &link.to_string(), "--cluster-lease-ttl", "2", "--data-dir"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    NodeProcess(child)
}

/// Waits until `watcher` (subscribed to `$SYS/cluster/nodes/+`) reads `state` for `node`.
async fn wait_for_state(watcher: &mut V4Client, node: &str, state: &str) {
    let topic = format!("$SYS/cluster/nodes/{node}");
    loop {
        let p = watcher.next_publish().await;
        if p.topic == topic && &p.payload[..] == state.as_bytes() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_old_copy_received_during_a_long_takeover_follows_in_parts() {
    let etcd = Etcd::start();
    let dir = fresh_dir("remainder");
    // Small queues and small parts: what the session receives spills to its log, and a
    // part of a hand-over carries about a hundred messages.
    let durable = |name: &str| {
        durable_node(&etcd, &dir, "remainder", name, |c| {
            c.max_queued_bytes = 16 << 10;
            if let Some(cluster) = c.cluster.as_mut() {
                cluster.handover_part = 16 << 10;
            }
        })
    };
    let (a, b) = (durable("a"), durable("b"));
    let stalled = node_process(&etcd, "remainder", "c", &dir.join("c"));
    let mut watcher = V4Client::connect(a.addr, "watcher").await;
    watcher.subscribe("$SYS/cluster/nodes/+", rumqttc::QoS::AtMostOnce).await;
    wait_for_state(&mut watcher, "c", "up").await;

    let (mut mover, _) = persistent(a.addr, "mover").await;
    mover.subscribe("q/#", rumqttc::QoS::AtLeastOnce).await;
    mover.client.disconnect().await.unwrap();
    assert!(mover.closed().await);
    let publisher = V4Client::connect(a.addr, "steady").await;
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn(publish_until(publisher.client.clone(), stop.clone()));
    // Node c stops answering: a's barrier before the old copy ends waits for c (until its
    // lease is gone), and the old copy goes on receiving meanwhile.
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(stalled.0.id() as i32, libc::SIGSTOP) };
    let (mut mover, present) = persistent(b.addr, "mover").await;
    assert!(present, "session present: handed over by a");
    wait_for_state(&mut watcher, "c", "down").await;
    let mut got: Vec<(u32, bool)> = Vec::new();
    while got.len() < 200 {
        let p = mover.next_publish().await;
        got.push((index(&p), p.dup));
    }
    stop.store(true, Ordering::Release);
    let sent = publishing.await.unwrap();
    receive_all(&mut mover, &mut got, sent).await;
    assert_once_in_order(&got, sent);
    drop((stalled, a, b));
    let _ = std::fs::remove_dir_all(&dir);
}
