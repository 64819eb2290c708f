//! A session taken over from one node by another while messages flow: what its client was
//! in the middle of (QoS 2 both ways) carries on where it was, and messages published
//! during the move arrive once each, in order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};

use ringmq::cluster::etcd::{Endpoints, EtcdStore};
use ringmq::cluster::ownership::owner_of;
use ringmq::cluster::routes::Keys;
use ringmq::codec::{Packet, ProtocolVersion, QoS};

use super::cluster::{node, node_with, persistent};
use super::common::{TestBroker, V4Client, WAIT};
use super::etcd::Etcd;
use super::qos::helpers::{ack, connect_packet, pid, Peer};

#[test]
fn a_session_moved_mid_exchange_keeps_its_packet_identifiers_and_qos2_state() {
    let etcd = Etcd::start();
    let a = node(&etcd, "qos2move", "a", 10);
    let b = node(&etcd, "qos2move", "b", 10);
    let (mut roamer, present) =
        Peer::connect_with(a.addr, connect_packet(ProtocolVersion::V311, "roamer", false));
    assert!(!present);
    roamer.subscribe_granted("out/#", QoS::ExactlyOnce);
    let mut watcher = Peer::v3(b.addr, "watcher");
    watcher.subscribe_granted("in/#", QoS::AtLeastOnce);
    let mut publisher = Peer::v3(b.addr, "publisher");
    publisher.publish("out/1", b"1", QoS::ExactlyOnce, false);
    publisher.publish("out/2", b"2", QoS::ExactlyOnce, false);
    let (first, second) = (roamer.next_publish(), roamer.next_publish());
    assert_eq!((first.topic.as_str(), second.topic.as_str()), ("out/1", "out/2"));
    let (p1, p2) = (first.packet_id.unwrap(), second.packet_id.unwrap());
    // out/1 got its PUBREC (the broker owes PUBREL), out/2 nothing yet.
    roamer.send(&Packet::PubRec(ack(p1)));
    roamer.wait_for(|p| matches!(p, Packet::PubRel(r) if r.packet_id == p1).then_some(()));
    // Inbound QoS 2 left at PUBREC: delivered once, its identifier pending.
    let mut inbound = Peer::publish_packet("in/x", b"x", QoS::ExactlyOnce, false, Some(pid(77)));
    roamer.send(&Packet::Publish(inbound.clone()));
    roamer.wait_for(|p| matches!(p, Packet::PubRec(r) if r.packet_id == pid(77)).then_some(()));
    let seen = watcher.next_publish();
    watcher.ack(&seen);
    assert_eq!(seen.topic.as_str(), "in/x");
    drop(roamer);

    // The client comes back on b: the same identifiers, the same point in each exchange.
    let (mut roamer, present) =
        Peer::connect_with(b.addr, connect_packet(ProtocolVersion::V311, "roamer", false));
    assert!(present, "session present: handed over by a");
    match roamer.expect() {
        Packet::PubRel(rel) => assert_eq!(rel.packet_id, p1, "PUBREL for the message it had PUBREC'd"),
        other => panic!("expected PUBREL {p1:?} first, got {other:?}"),
    }
    let again = roamer.next_publish();
    assert_eq!((again.topic.as_str(), again.packet_id, again.dup), ("out/2", Some(p2), true));
    // Its inbound QoS 2 message sent again (DUP) is acknowledged, not delivered twice.
    inbound.dup = true;
    roamer.send(&Packet::Publish(inbound));
    roamer.wait_for(|p| matches!(p, Packet::PubRec(r) if r.packet_id == pid(77)).then_some(()));
    roamer.send(&Packet::PubRel(ack(pid(77))));
    roamer.wait_for(|p| matches!(p, Packet::PubComp(r) if r.packet_id == pid(77)).then_some(()));
    roamer.publish("in/marker", b"m", QoS::AtLeastOnce, false);
    let next = watcher.next_publish();
    assert_eq!(next.topic.as_str(), "in/marker", "in/x was not delivered a second time");
}

/// An empty directory for a test's nodes' data.
pub(crate) fn fresh_dir(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ringmq-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A node of `cluster` keeping its data in `dir`/`name`, with other settings by `tweak`.
pub(crate) fn durable_node(
    etcd: &Etcd,
    dir: &std::path::Path,
    cluster: &str,
    name: &str,
    tweak: impl FnOnce(&mut ringmq::Config),
) -> TestBroker {
    let data = dir.join(name);
    node_with(etcd, cluster, name, 10, move |c| {
        c.data_dir = Some(data);
        tweak(c);
    })
}

/// Publishes QoS 1 `q/t` with payloads 0, 1, … until `stop`; returns how many.
pub(crate) async fn publish_until(client: rumqttc::AsyncClient, stop: Arc<AtomicBool>) -> u32 {
    let mut n = 0u32;
    while !stop.load(Ordering::Acquire) && n < 200_000 {
        client.publish("q/t", rumqttc::QoS::AtLeastOnce, false, n.to_be_bytes().to_vec()).await.unwrap();
        n += 1;
    }
    n
}

pub(crate) fn index(p: &rumqttc::Publish) -> u32 {
    u32::from_be_bytes(p.payload[..4].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_while_a_session_moves_arrive_once_each_in_order() {
    let etcd = Etcd::start();
    let a = node(&etcd, "flowmove", "a", 10);
    let b = node(&etcd, "flowmove", "b", 10);
    let c = node(&etcd, "flowmove", "c", 10);
    let (mut mover, _) = persistent(a.addr, "mover").await;
    mover.subscribe("q/#", rumqttc::QoS::AtLeastOnce).await;
    let publisher = V4Client::connect(c.addr, "steady").await;
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn(publish_until(publisher.client.clone(), stop.clone()));
    let mut got: Vec<(u32, bool)> = Vec::new();
    while got.len() < 200 {
        let p = mover.next_publish().await;
        got.push((index(&p), p.dup));
    }
    // It leaves a mid-stream (what a still had in flight comes again, with DUP)…
    mover.client.disconnect().await.unwrap();
    while let Some(packet) = mover.incoming.recv().await {
        if let rumqttc::Packet::Publish(p) = packet {
            got.push((index(&p), p.dup));
        }
    }
    // … and comes back on b while c goes on publishing.
    let (mut mover, present) = persistent(b.addr, "mover").await;
    assert!(present);
    let moved = got.len();
    while got.len() < moved + 200 {
        let p = mover.next_publish().await;
        got.push((index(&p), p.dup));
    }
    stop.store(true, Ordering::Release);
    let sent = publishing.await.unwrap();
    receive_all(&mut mover, &mut got, sent).await;
    assert_once_in_order(&got, sent);
}

/// Receives until every one of the `sent` messages came at least once (into `got`:
/// index and DUP).
pub(crate) async fn receive_all(mover: &mut V4Client, got: &mut Vec<(u32, bool)>, sent: u32) {
    let mut first: HashSet<u32> = got.iter().map(|(i, _)| *i).collect();
    while first.len() < sent as usize {
        let p = match tokio::time::timeout(super::common::WAIT, mover.next_publish()).await {
            Ok(p) => p,
            Err(_) => {
                let missing: Vec<u32> = (0..sent).filter(|i| !first.contains(i)).take(20).collect();
                panic!("{sent} sent, {} never arrived: {missing:?}…", sent as usize - first.len());
            }
        };
        got.push((index(&p), p.dup));
        first.insert(index(&p));
    }
}

/// Every message once; a message again only as a resend (DUP); first receptions in the
/// order they were published.
pub(crate) fn assert_once_in_order(got: &[(u32, bool)], sent: u32) {
    let mut seen = HashSet::new();
    let mut last = None;
    for (i, dup) in got {
        if !seen.insert(*i) {
            assert!(*dup, "message {i} delivered twice, the second time not as a resend ({sent} sent)");
            continue;
        }
        assert!(last.is_none_or(|l| l < *i), "message {i} after {last:?}: out of order");
        last = Some(*i);
    }
    assert_eq!(seen.len(), sent as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_owing_more_than_a_hand_over_frame_carries_moves_whole_in_parts() {
    let etcd = Etcd::start();
    let dir = fresh_dir("bigmove");
    // A frame of a hand-over carries 1 MiB + 32 MiB here; the session owes 40 MiB, most of
    // it spilled to its log.
    let durable = |name: &str| {
        durable_node(&etcd, &dir, "bigmove", name, |c| {
            c.segment_size = 8 << 20;
            c.max_queued_bytes = 1 << 20;
            c.max_spilled_bytes = 1 << 30;
        })
    };
    let (a, b) = (durable("a"), durable("b"));
    let (mut hoarder, _) = persistent(a.addr, "hoarder").await;
    hoarder.subscribe("big/#", rumqttc::QoS::AtLeastOnce).await;
    hoarder.client.disconnect().await.unwrap();
    assert!(hoarder.closed().await);
    let mut options = rumqttc::MqttOptions::new("filler", b.addr.ip().to_string(), b.addr.port());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let mut publisher = V4Client::connect_with(options).await;
    const COUNT: u32 = 80;
    for i in 0..COUNT {
        let mut payload = vec![(i % 251) as u8; 512 << 10];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        publisher.client.publish("big/t", rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
        while !matches!(publisher.next().await, rumqttc::Packet::PubAck(_)) {}
    }
    let (mut hoarder, present) = persistent(b.addr, "hoarder").await;
    assert!(present, "session present: handed over by a");
    for i in 0..COUNT {
        let p = hoarder.next_publish().await;
        assert_eq!((index(&p), p.payload.len()), (i, 512 << 10), "message {i}");
        assert!(p.payload[4..].iter().all(|b| *b == (i % 251) as u8));
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_record_goes_once_nothing_serves_its_client() {
    let etcd = Etcd::start();
    let a = node(&etcd, "records", "a", 10);
    let b = node(&etcd, "records", "b", 10);
    let mut store = EtcdStore::new(Endpoints::parse(&etcd.url()).unwrap(), Duration::from_secs(2));
    let keys = Keys::new("records");
    let mut owner = |client: &str| owner_of(&mut store, &keys, client).unwrap().map(|o| o.node);
    let passing = V4Client::connect(a.addr, "passing").await;
    let (staying, _) = persistent(a.addr, "staying").await;
    let (moving, _) = persistent(a.addr, "moving").await;
    assert_eq!(owner("passing").as_deref(), Some("a"));
    for client in [&staying, &moving] {
        client.client.disconnect().await.unwrap();
    }
    let (_moved, present) = persistent(b.addr, "moving").await;
    assert!(present);
    passing.client.disconnect().await.unwrap();
    // A clean session ends with its connection: its record goes (a tick later).
    let deadline = Instant::now() + WAIT;
    while owner("passing").is_some() {
        assert!(Instant::now() < deadline, "the record of a client nothing serves stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An offline persistent session is still served by a; a session that moved is b's.
    assert_eq!(owner("staying").as_deref(), Some("a"));
    assert_eq!(owner("moving").as_deref(), Some("b"));
}

#[test]
fn another_users_session_on_another_node_is_not_taken_over() {
    use ringmq::codec::{Connect, ReasonCode};
    let etcd = Etcd::start();
    let dir = std::env::temp_dir().join(format!("ringmq-sameuser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("passwords"), super::auth::MOSQUITTO_PASSWORDS).unwrap();
    let auth =
        ringmq::config::AuthSettings { password_file: Some(dir.join("passwords")), ..Default::default() };
    let with_auth = |name: &str| {
        let auth = auth.clone();
        node_with(&etcd, "sameuser", name, 10, move |c| c.listeners[0].auth = auth)
    };
    let (a, b) = (with_auth("a"), with_auth("b"));
    let login = |user: &str, password: &str| Connect {
        username: Some(user.into()),
        password: Some(password.as_bytes().to_vec().into()),
        properties: ringmq::codec::Properties(vec![ringmq::codec::Property::SessionExpiryInterval(300)]),
        ..connect_packet(ProtocolVersion::V5, "device", false)
    };
    let (mut alice, present) = Peer::connect_with(a.addr, login("alice", "s3cret"));
    assert!(!present);
    // bob, on b, may not take alice's session (--takeover same-user, the default).
    let (_, ack) = Peer::try_connect(b.addr, login("bob", "hunter2"));
    assert_eq!(ack.reason, ReasonCode::NotAuthorized);
    // Her connection on a is untouched; she may move it to b herself.
    alice.subscribe_granted("sensors/x", QoS::AtMostOnce);
    let (_, present) = Peer::connect_with(b.addr, login("alice", "s3cret"));
    assert!(present);
    assert!(matches!(alice.recv(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::SessionTakenOver));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_live_session_without_expiry_taken_over_on_another_node_is_resumed() {
    // MQTT 5 with no Session Expiry: the session lives as long as its connection; a
    // takeover with Clean Start 0 resumes it (MQTT 5.0 §3.1.4), as on one node.
    let etcd = Etcd::start();
    let a = node(&etcd, "noexpiry", "a", 10);
    let b = node(&etcd, "noexpiry", "b", 10);
    let (mut first, _) = Peer::connect_with(a.addr, connect_packet(ProtocolVersion::V5, "brief", false));
    first.subscribe_granted("t/#", QoS::AtLeastOnce);
    let mut publisher = Peer::v5(b.addr, "brief-pub");
    for i in 0..3u8 {
        publisher.publish("t/x", [i], QoS::AtLeastOnce, false);
    }
    // Received on a, not acknowledged: in flight there.
    let sent: Vec<_> = (0..3).map(|_| first.next_publish().packet_id).collect();
    let (mut second, present) =
        Peer::connect_with(b.addr, connect_packet(ProtocolVersion::V5, "brief", false));
    assert!(present, "the live session is resumed");
    for (i, id) in sent.iter().enumerate() {
        let p = second.next_publish();
        assert_eq!((p.payload.to_vec(), p.packet_id, p.dup), (vec![i as u8], *id, true));
    }
    assert!(
        matches!(first.recv(), Some(Packet::Disconnect(d)) if d.reason == ringmq::codec::ReasonCode::SessionTakenOver)
    );
}
