//! Takeovers that last or fail: what the session's old copy received meanwhile (more than
//! a part of a hand-over carries) follows it in parts, every acknowledged message once, in
//! order; an old node that dies mid-hand-over leaves the CONNECT waiting for it to go on
//! with what came.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};

use super::cluster::persistent;
use super::cluster_takeover::{
    assert_once_in_order, durable_node, fresh_dir, index, publish_until, receive_all,
};
use super::common::{V4Client, WAIT};
use super::etcd::Etcd;
use super::http::client;

/// A node in a process of its own (so it can be stopped or killed), killed when dropped
/// (a failed test leaves none behind).
struct NodeProcess {
    child: Child,
    mqtt: std::net::SocketAddr,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node of `cluster` in a process of its own, with a 2 s lease and `extra` flags.
fn node_process(
    etcd: &Etcd,
    cluster: &str,
    name: &str,
    data: &std::path::Path,
    extra: &[&str],
) -> NodeProcess {
    let unused = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (mqtt, link) = (unused(), unused());
    let child = Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args(["--bind", &mqtt.to_string(), "--http-bind", "none", "--io-memory", "524288", "--cores", "1"])
        .args(["--cluster", &etcd.url(), "--cluster-name", cluster, "--node-name", name])
        .args(["--node-bind", &link.to_string(), "--cluster-lease-ttl", "2", "--data-dir"])
        .arg(data)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let node = NodeProcess { child, mqtt };
    // Its node links may be up before its MQTT listener is.
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(mqtt).is_err() {
        assert!(Instant::now() < deadline, "node {name} never listened on {mqtt}");
        std::thread::sleep(Duration::from_millis(20));
    }
    node
}

/// A client of `addr` that reads `$SYS/cluster/nodes/+` (each node's state as that node
/// sees it).
async fn node_watcher(addr: std::net::SocketAddr) -> V4Client {
    let mut watcher = V4Client::connect(addr, "watcher").await;
    watcher.subscribe("$SYS/cluster/nodes/+", rumqttc::QoS::AtMostOnce).await;
    watcher
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
    let stalled = node_process(&etcd, "remainder", "c", &dir.join("c"), &[]);
    let mut watcher = node_watcher(a.addr).await;
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
    unsafe { libc::kill(stalled.child.id() as i32, libc::SIGSTOP) };
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_whose_old_node_dies_mid_hand_over_goes_on_with_what_came() {
    let etcd = Etcd::start();
    let dir = fresh_dir("olddies");
    // Node a hands sessions over 64 KiB at a time: 8 MiB owed take 128 round trips.
    let small = ["--max-queued-bytes", "65536", "--node-handover-part", "65536"];
    let mut old = node_process(&etcd, "olddies", "a", &dir.join("a"), &small);
    let b = durable_node(&etcd, &dir, "olddies", "b", |c| c.http = Some(client::settings(None)));
    let http = b.broker().http_addr().expect("b's HTTP endpoint");
    let mut watcher = node_watcher(b.addr).await;
    wait_for_state(&mut watcher, "a", "up").await;
    let (mut hoarder, _) = persistent(old.mqtt, "hoarder").await;
    hoarder.subscribe("big/#", rumqttc::QoS::AtLeastOnce).await;
    hoarder.client.disconnect().await.unwrap();
    assert!(hoarder.closed().await);
    let mut publisher = V4Client::connect(old.mqtt, "filler").await;
    const COUNT: u32 = 2000;
    for i in 0..COUNT {
        let mut payload = vec![0u8; 4 << 10];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        publisher.client.publish("big/t", rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
        while !matches!(publisher.next().await, rumqttc::Packet::PubAck(_)) {}
    }
    // The hoarder comes back on b; once b put the first part of its session in place (an
    // offline session there), a is killed while it hands over the rest.
    let connecting = tokio::spawn(persistent(b.addr, "hoarder"));
    let offline = "ringmq_sessions{state=\"offline\"} 1";
    let deadline = Instant::now() + WAIT;
    while !tokio::task::block_in_place(|| client::get(http, "/metrics").text()).contains(offline) {
        assert!(Instant::now() < deadline, "no part of the session came to b");
        tokio::task::yield_now().await;
    }
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(old.child.id() as i32, libc::SIGKILL) };
    let _ = old.child.wait();
    // The CONNECT goes on once a is gone (its lease, 2 s), with what came of the session.
    let (mut hoarder, _) = tokio::time::timeout(WAIT, connecting).await.expect("CONNACK").unwrap();
    let mut got = Vec::new();
    while let Ok(p) = tokio::time::timeout(Duration::from_secs(2), hoarder.next_publish()).await {
        got.push(index(&p));
    }
    // What came is the session's oldest messages, each once, in order: at least the
    // first part (it was in place before a died).
    assert!(!got.is_empty(), "the first part came");
    let prefix = got.iter().enumerate().all(|(i, n)| *n == i as u32);
    assert!(
        prefix && got.len() <= COUNT as usize,
        "{} messages, from {:?}…",
        got.len(),
        &got[..got.len().min(20)]
    );
    drop((old, b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_lets_go_the_owner_records_of_clients_it_no_longer_serves() {
    use ringmq::cluster::etcd::{Endpoints, EtcdStore};
    use ringmq::cluster::ownership::owner_of;
    use ringmq::cluster::routes::Keys;
    let etcd = Etcd::start();
    let dir = fresh_dir("sweep");
    let a = node_process(&etcd, "sweep", "a", &dir.join("a"), &[]);
    // A persistent session (in a's log) and a clean one, both claimed by a.
    let (kept, _) = persistent(a.mqtt, "kept").await;
    let gone = V4Client::connect(a.mqtt, "gone").await;
    let mut store = EtcdStore::new(Endpoints::parse(&etcd.url()).unwrap(), Duration::from_secs(2));
    let keys = Keys::new("sweep");
    let mut owner = |client: &str| owner_of(&mut store, &keys, client).unwrap().map(|o| o.node);
    assert_eq!((owner("kept"), owner("gone")), (Some("a".into()), Some("a".into())));
    // Killed: nothing ended the clean session's record.
    drop(a);
    drop((kept, gone));
    assert_eq!(owner("gone"), Some("a".into()), "a killed node leaves its records");
    let _a = node_process(&etcd, "sweep", "a", &dir.join("a"), &[]);
    let deadline = Instant::now() + WAIT;
    while owner("gone").is_some() {
        assert!(
            Instant::now() < deadline,
            "the restarted node kept the record of a client it does not serve"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(owner("kept"), Some("a".into()), "the recovered session's record stays");
}
