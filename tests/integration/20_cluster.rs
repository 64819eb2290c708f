//! Clusters on a real etcd: several brokers in this process, each a node, linked over
//! loopback; MQTT clients on different nodes.

use std::time::{Duration, Instant};

use ringmq::cluster::etcd::{Endpoints, EtcdStore, EtcdWatch};
use ringmq::cluster::ownership::{claim, owner_of, Claim};
use ringmq::cluster::routes::Keys;
use ringmq::cluster::store::{ClusterStore, Event, StoreError};
use ringmq::config::ClusterSettings;
use rumqttc::QoS;

use super::common::{TestBroker, V4Client, WAIT};
use super::etcd::Etcd;

pub(crate) fn node(etcd: &Etcd, cluster: &str, name: &str, ttl_s: u64) -> TestBroker {
    node_with(etcd, cluster, name, ttl_s, |_| {})
}

/// [`node`] with other settings changed by `tweak`.
pub(crate) fn node_with(
    etcd: &Etcd,
    cluster: &str,
    name: &str,
    ttl_s: u64,
    tweak: impl FnOnce(&mut ringmq::Config),
) -> TestBroker {
    let settings = ClusterSettings {
        etcd: Endpoints::parse(&etcd.url()).unwrap(),
        name: cluster.to_string(),
        node: name.to_string(),
        bind: "127.0.0.1:0".parse().unwrap(),
        advertise: "127.0.0.1:0".parse().unwrap(),
        lease_ttl: Duration::from_secs(ttl_s),
        link_buffer: 64 << 20,
        handover_part: 8 << 20,
    };
    TestBroker::start_with(|c| {
        c.cluster = Some(settings);
        tweak(c);
    })
}

#[test]
fn the_etcd_store_keeps_the_contract_the_cluster_relies_on() {
    let etcd = Etcd::start();
    let endpoints = Endpoints::parse(&etcd.url()).unwrap();
    let mut store = EtcdStore::new(endpoints.clone(), Duration::from_secs(2));
    let keys = Keys::new("contract");
    let (_, start) = store.range(keys.root()).unwrap();
    let mut watch = EtcdWatch::open(&endpoints, keys.root(), start, Duration::from_secs(2)).unwrap();

    // Ownership: two claims from the same read, one wins; the loser cannot write back.
    assert_eq!(owner_of(&mut store, &keys, "c1").unwrap(), None);
    let Claim::Won { owner: a, previous: None } = claim(&mut store, &keys, "c1", "a", None).unwrap() else {
        panic!("the first claim wins")
    };
    assert_eq!(claim(&mut store, &keys, "c1", "b", None).unwrap(), Claim::Lost);
    let seen = owner_of(&mut store, &keys, "c1").unwrap().unwrap();
    assert_eq!((seen.node.as_str(), seen.epoch), ("a", 1));
    let Claim::Won { owner: b, previous } = claim(&mut store, &keys, "c1", "b", Some(&seen)).unwrap() else {
        panic!("a claim on the current revision wins")
    };
    assert_eq!(previous, Some(a.clone()));
    assert_eq!(b.epoch, 2);
    assert_eq!(
        claim(&mut store, &keys, "c1", "a", Some(&a)).unwrap(),
        Claim::Lost,
        "a stale owner is fenced"
    );

    // Leases: keys go with a revoked lease; a gone lease is named as such.
    let lease = store.grant_lease(5000).unwrap();
    store.put(&keys.node("n1"), b"127.0.0.1:1", Some(lease)).unwrap();
    store.keep_alive(lease).unwrap();
    store.revoke(lease).unwrap();
    assert_eq!(store.get(&keys.node("n1")).unwrap(), None);
    assert_eq!(store.keep_alive(lease), Err(StoreError::LeaseNotFound(lease)));
    assert_eq!(store.put(&keys.node("n2"), b"x", Some(lease)), Err(StoreError::LeaseNotFound(lease)));

    // The watch saw every change, in order, deletions included.
    let mut seen: Vec<(bool, String)> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 4 {
        assert!(Instant::now() < deadline, "watch events: {seen:?}");
        for event in watch.next_changes().unwrap() {
            seen.push((matches!(event, Event::Put(_)), event.key().to_string()));
        }
    }
    let session = keys.session("c1");
    let node = keys.node("n1");
    assert_eq!(seen, [(true, session.clone()), (true, session), (true, node.clone()), (false, node)]);

    // Pages of a prefix: in key order, from a key on, saying whether more follow.
    for i in 0..5 {
        store.put(&format!("{}pages/{i}", keys.root()), b"x", None).unwrap();
    }
    let prefix = format!("{}pages/", keys.root());
    let (first, more) = store.range_page(&prefix, "", 2).unwrap();
    let names = |kvs: &[ringmq::cluster::store::KeyValue]| {
        kvs.iter().map(|kv| kv.key.strip_prefix(&prefix).unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!((names(&first), more), (vec!["0".to_string(), "1".to_string()], true));
    let (rest, more) = store.range_page(&prefix, &format!("{prefix}2"), 10).unwrap();
    assert_eq!((names(&rest), more), (vec!["2".to_string(), "3".to_string(), "4".to_string()], false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_one_node_reaches_subscribers_on_others_once_at_each_qos() {
    let etcd = Etcd::start();
    let a = node(&etcd, "pubsub", "a", 10);
    let b = node(&etcd, "pubsub", "b", 10);
    let c = node(&etcd, "pubsub", "c", 10);
    let mut sub_b = V4Client::connect(b.addr, "sub-b").await;
    let mut sub_c = V4Client::connect(c.addr, "sub-c").await;
    // c joined last: it knows of all three ($SYS/cluster is each node's own view).
    sub_c.subscribe("$SYS/cluster/nodes", QoS::AtMostOnce).await;
    assert_eq!(&sub_c.next_publish().await.payload[..], b"3");
    sub_c.client.unsubscribe("$SYS/cluster/nodes").await.unwrap();
    // Each SUBACK waits until every linked node routes matching publishes: no wait here.
    sub_b.subscribe("x/#", QoS::ExactlyOnce).await;
    sub_c.subscribe("x/+", QoS::ExactlyOnce).await;
    let publisher = V4Client::connect(a.addr, "pub-a").await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        publisher.client.publish(format!("x/{i}"), qos, false, vec![i as u8]).await.unwrap();
    }
    publisher.client.publish("x/end", QoS::AtLeastOnce, false, b"end".to_vec()).await.unwrap();
    for sub in [&mut sub_b, &mut sub_c] {
        let mut got = Vec::new();
        loop {
            let p = sub.next_publish().await;
            if p.topic == "x/end" {
                break;
            }
            if p.topic.starts_with("$SYS") {
                // A link's state changing before the UNSUBACK.
                continue;
            }
            got.push((p.topic.clone(), p.qos, p.payload.to_vec()));
        }
        assert_eq!(
            got,
            [
                ("x/0".to_string(), QoS::AtMostOnce, vec![0]),
                ("x/1".to_string(), QoS::AtLeastOnce, vec![1]),
                ("x/2".to_string(), QoS::ExactlyOnce, vec![2]),
            ],
            "each once, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_set_on_one_node_is_read_on_another() {
    let etcd = Etcd::start();
    let a = node(&etcd, "retained", "a", 10);
    let b = node(&etcd, "retained", "b", 10);
    let publisher = V4Client::connect(a.addr, "pub").await;
    publisher.client.publish("r/1", QoS::AtLeastOnce, true, b"kept".to_vec()).await.unwrap();
    // Acknowledged once every node stored it.
    let mut publisher = publisher;
    loop {
        if let rumqttc::Packet::PubAck(_) = publisher.next().await {
            break;
        }
    }
    let mut reader = V4Client::connect(b.addr, "reader").await;
    reader.subscribe("r/#", QoS::AtLeastOnce).await;
    let p = reader.next_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.retain), ("r/1", &b"kept"[..], true));
    // A node that joins later has the set before it serves: streamed from a peer.
    let c = node(&etcd, "retained", "c", 10);
    let mut late = V4Client::connect(c.addr, "late").await;
    late.subscribe("r/#", QoS::AtLeastOnce).await;
    let p = late.next_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.retain), ("r/1", &b"kept"[..], true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_renew_its_lease_closes_its_clients_and_refuses_new_ones() {
    let mut etcd = Etcd::start();
    let a = node(&etcd, "fence", "a", 2);
    let mut client = V4Client::connect(a.addr, "victim").await;
    etcd.kill();
    let cut = Instant::now();
    assert!(client.closed().await, "the fenced node closed its client");
    // Within the lease's TTL (2 s), before any other node could have taken the client.
    assert!(cut.elapsed() < Duration::from_secs(2), "closed after {:?}", cut.elapsed());
    let options = rumqttc::MqttOptions::new("late", a.addr.ip().to_string(), a.addr.port());
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    match tokio::time::timeout(WAIT, eventloop.poll()).await.expect("an answer") {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::ServiceUnavailable)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // etcd back: the node registers again and serves.
    etcd.restart();
    let deadline = Instant::now() + WAIT;
    loop {
        let options = rumqttc::MqttOptions::new("back", a.addr.ip().to_string(), a.addr.port());
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) =
            tokio::time::timeout(WAIT, eventloop.poll()).await
        {
            break;
        }
        assert!(Instant::now() < deadline, "the node serves again once etcd is back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_with_members_on_three_nodes_gets_each_message_once() {
    let etcd = Etcd::start();
    let nodes =
        [node(&etcd, "shared", "a", 10), node(&etcd, "shared", "b", 10), node(&etcd, "shared", "c", 10)];
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, n) in nodes.iter().enumerate() {
        let mut member = V4Client::connect(n.addr, &format!("member-{i}")).await;
        member.subscribe("$share/g/s/#", QoS::AtLeastOnce).await;
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let p = member.next_publish().await;
                if tx.send((i, p.payload.to_vec())).is_err() {
                    return;
                }
            }
        });
    }
    const N: usize = 60;
    let publisher = V4Client::connect(nodes[0].addr, "publisher").await;
    for i in 0..N {
        publisher.client.publish("s/x", QoS::AtLeastOnce, false, i.to_string().into_bytes()).await.unwrap();
    }
    let mut seen = std::collections::BTreeMap::new();
    let mut per_member = [0usize; 3];
    let mut received = 0;
    while seen.len() < N {
        let (member, payload) = tokio::time::timeout(WAIT, rx.recv()).await.expect("all delivered").unwrap();
        received += 1;
        per_member[member] += 1;
        *seen.entry(payload).or_insert(0) += 1;
    }
    assert_eq!(received, N, "no message went to two members: {per_member:?}");
    assert!(per_member.iter().all(|n| *n > 0), "every node's member took some: {per_member:?}");
}

/// A persistent MQTT 3.1.1 client `id` on `addr`.
pub(crate) async fn persistent(addr: std::net::SocketAddr, id: &str) -> (V4Client, bool) {
    let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_clean_session(false);
    options.set_keep_alive(Duration::from_secs(30));
    // Large enough for the broker's largest packet (rumqttc's default is 10 KiB).
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (present_tx, present_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut present_tx = Some(present_tx);
        while let Ok(event) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(packet) = event {
                if let (rumqttc::Packet::ConnAck(ack), Some(tx)) = (&packet, present_tx.take()) {
                    let _ = tx.send(ack.session_present);
                }
                if tx.send(packet).is_err() {
                    break;
                }
            }
        }
    });
    let present = tokio::time::timeout(WAIT, present_rx).await.expect("CONNACK").expect("connected");
    (V4Client::from_parts(client, rx), present)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_moves_with_its_queued_messages_to_the_node_its_client_connects_to() {
    let etcd = Etcd::start();
    let a = node(&etcd, "takeover", "a", 10);
    let b = node(&etcd, "takeover", "b", 10);
    let c = node(&etcd, "takeover", "c", 10);
    let (mut first, present) = persistent(a.addr, "roamer").await;
    assert!(!present);
    first.subscribe("q/#", QoS::AtLeastOnce).await;
    first.client.disconnect().await.unwrap();
    assert!(first.closed().await);
    // Queued on a while its client is away, published on b.
    let mut publisher = V4Client::connect(b.addr, "pub").await;
    for i in 0..5u8 {
        publisher.client.publish("q/x", QoS::AtLeastOnce, false, vec![i]).await.unwrap();
        loop {
            if let rumqttc::Packet::PubAck(_) = publisher.next().await {
                break;
            }
        }
    }
    // The client comes back on c: its session, queue included, came from a.
    let (mut second, present) = persistent(c.addr, "roamer").await;
    assert!(present, "session present: handed over by a");
    for i in 0..5u8 {
        let p = second.next_publish().await;
        assert_eq!((p.topic.as_str(), p.payload.to_vec()), ("q/x", vec![i]));
    }
    // Its subscription lives on c now: a publish on a reaches it there.
    let later = V4Client::connect(a.addr, "pub2").await;
    later.client.publish("q/y", QoS::AtLeastOnce, false, b"later".to_vec()).await.unwrap();
    let p = second.next_publish().await;
    assert_eq!(p.topic, "q/y");
    // And a live takeover from c to a closes c's connection.
    let (_third, present) = persistent(a.addr, "roamer").await;
    assert!(present);
    assert!(second.closed().await, "c closed the connection a took over");
}

#[test]
fn a_node_link_that_cannot_prove_the_clusters_secret_is_closed_before_its_frames_are_read() {
    use ringmq::node::frame::Frame;
    use std::io::{Read, Write};
    let etcd = Etcd::start();
    let _a = node(&etcd, "secret", "a", 10);
    let mut store = EtcdStore::new(Endpoints::parse(&etcd.url()).unwrap(), Duration::from_secs(2));
    let keys = Keys::new("secret");
    let link = String::from_utf8(store.get(&keys.node("a")).unwrap().unwrap().value).unwrap();
    assert!(!store.get(&keys.secret()).unwrap().unwrap().value.is_empty(), "the first node made one");
    let mut raw = std::net::TcpStream::connect(&link).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = bytes::BytesMut::new();
    let Frame::Challenge { nonce, .. } = read_link_frame(&mut raw, &mut buf) else {
        panic!("a challenge first")
    };
    let (hello, _) = hello_frame(b"guessed", &nonce, "secret", ringmq::node::handshake::LINK_VERSION);
    let mut out = bytes::BytesMut::new();
    hello.encode(&mut out, Instant::now());
    // A QoS 1 publish a linked node would confirm (nobody subscribes: at once).
    let message = ringmq::broker::message::Message::new(
        ringmq::topic::TopicName::from_static("t"),
        bytes::Bytes::from_static(b"x"),
        ringmq::codec::QoS::AtLeastOnce,
        false,
        &Default::default(),
    );
    Frame::Publish { seq: 1, message }.encode(&mut out, Instant::now());
    let _ = raw.write_all(&out);
    let mut rest = Vec::new();
    // Closed by the node (end of stream, or a reset), not answered, and not left open.
    match raw.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
    }
    assert!(rest.is_empty(), "nothing answered to a forged hello");
}

/// The next frame a raw node link reads.
fn read_link_frame(raw: &mut std::net::TcpStream, buf: &mut bytes::BytesMut) -> ringmq::node::frame::Frame {
    use std::io::Read;
    let limits = ringmq::node::frame::FrameLimits { frame: 1 << 20, handover: 1 << 20 };
    loop {
        if let Some(frame) = ringmq::node::frame::Frame::decode(buf, limits, Instant::now()).unwrap() {
            return frame;
        }
        let mut chunk = [0u8; 256];
        let n = raw.read(&mut chunk).unwrap();
        assert!(n > 0, "the node closed the link");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A hello from node "intruder" of `cluster`, proven with `secret` for challenge `nonce`,
/// speaking link protocol `version`; and its MAC.
fn hello_frame(
    secret: &[u8],
    nonce: &[u8; 16],
    cluster: &str,
    version: u32,
) -> (ringmq::node::frame::Frame, [u8; 32]) {
    let limits = ringmq::node::frame::FrameLimits { frame: 1 << 20, handover: 1 << 20 };
    let challenge = [7u8; 16];
    let who = ringmq::node::handshake::Identity {
        cluster,
        node: "intruder",
        incarnation: 1,
        limits,
        version,
        challenge,
    };
    let mac = ringmq::node::handshake::proof(secret, nonce, who);
    let frame = ringmq::node::frame::Frame::Hello {
        cluster: cluster.into(),
        node: "intruder".into(),
        incarnation: 1,
        limits,
        mac,
        version,
        challenge,
    };
    (frame, mac)
}

#[test]
fn a_node_link_of_another_protocol_version_is_closed_and_a_welcome_proves_the_secret() {
    use ringmq::node::frame::Frame;
    use ringmq::node::handshake::{verify_welcome, LINK_VERSION};
    use std::io::{Read, Write};
    let etcd = Etcd::start();
    let _a = node(&etcd, "versions", "a", 10);
    let mut store = EtcdStore::new(Endpoints::parse(&etcd.url()).unwrap(), Duration::from_secs(2));
    let keys = Keys::new("versions");
    let link = String::from_utf8(store.get(&keys.node("a")).unwrap().unwrap().value).unwrap();
    let secret = store.get(&keys.secret()).unwrap().unwrap().value;
    let dial = |version: u32| {
        let mut raw = std::net::TcpStream::connect(&link).unwrap();
        raw.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = bytes::BytesMut::new();
        let Frame::Challenge { nonce, version: theirs } = read_link_frame(&mut raw, &mut buf) else {
            panic!("a challenge first")
        };
        assert_eq!(theirs, LINK_VERSION, "the challenge says the node's version");
        let (hello, mac) = hello_frame(&secret, &nonce, "versions", version);
        let mut out = bytes::BytesMut::new();
        hello.encode(&mut out, Instant::now());
        raw.write_all(&out).unwrap();
        (raw, buf, mac)
    };
    // A hello proving the secret, but of another version: closed, nothing answered.
    let (mut raw, _, _) = dial(LINK_VERSION + 1);
    let mut rest = Vec::new();
    match raw.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
    }
    assert!(rest.is_empty(), "nothing answered to a hello of another version");
    // Of this version: welcomed, with a proof of the secret for this hello and node.
    let (mut raw, mut buf, mac) = dial(LINK_VERSION);
    let Frame::Welcome { limits, mac: proof } = read_link_frame(&mut raw, &mut buf) else {
        panic!("a welcome")
    };
    assert!(verify_welcome(&secret, &mac, "a", limits, &proof), "the welcome proves the secret");
    assert!(!verify_welcome(&secret, &mac, "b", limits, &proof), "as node a, not another");
}

#[test]
fn a_node_still_waiting_for_etcd_stops_on_sigterm() {
    use std::process::{Command, Stdio};
    // An etcd address nothing listens on: the node waits for it at start-up.
    let unused = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (etcd, mqtt, link) = (unused(), unused(), unused());
    let dir = std::env::temp_dir().join(format!("ringmq-etcd-wait-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args(["--bind", &mqtt.to_string(), "--http-bind", "none", "--io-memory", "524288"])
        .args(["--cluster", &format!("etcd://{etcd}"), "--node-name", "waiting"])
        .args(["--node-bind", &link.to_string(), "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stderr says when it is waiting for etcd (its start-up is under way).
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("etcd not reachable yet") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0, "stderr ended");
    }
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the node did not stop within {WAIT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
