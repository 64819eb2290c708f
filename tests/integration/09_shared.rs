//! Shared subscriptions across shards (MQTT 5.0 §4.8.2): one member per message, the load
//! spread, nothing lost when a member goes away, offline persistent members queue, and no
//! retained messages on a shared subscription.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use ringmq::codec::{Packet, ProtocolVersion, QoS};

use crate::common::{client_id_on, TestBroker, V4Client, WAIT};
use crate::qos::helpers::{connect_packet, Peer};

/// Runs each member's receiving loop in its own task; returns (member index, payload).
fn collect(members: Vec<V4Client>) -> tokio::sync::mpsc::UnboundedReceiver<(usize, String)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for (index, mut member) in members.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let publish = member.next_publish().await;
                let payload = String::from_utf8_lossy(&publish.payload).into_owned();
                if tx.send((index, payload)).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_reaches_one_member_and_the_load_is_spread() {
    // Deep queues: 3,000 messages in a burst must not meet the queue bound.
    let broker = TestBroker::start_with(crate::qos::helpers::config::deep_queue);
    let mut members = Vec::new();
    for (i, shard) in [0, 1, 0].into_iter().enumerate() {
        let mut member = V4Client::connect(broker.addr, &client_id_on(shard, &format!("member{i}"))).await;
        member.subscribe("$share/workers/jobs/+", rumqttc::QoS::AtLeastOnce).await;
        members.push(member);
    }
    let mut plain = V4Client::connect(broker.addr, &client_id_on(1, "plain")).await;
    plain.subscribe("jobs/+", rumqttc::QoS::AtLeastOnce).await;
    let publisher = V4Client::connect(broker.addr, &client_id_on(1, "pub")).await;
    let mut received = collect(members);
    const N: usize = 3000;
    let sender = publisher.client.clone();
    tokio::spawn(async move {
        for i in 0..N {
            sender.publish("jobs/a", rumqttc::QoS::AtLeastOnce, false, i.to_string()).await.unwrap();
        }
    });
    let mut per_member: BTreeMap<usize, usize> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + WAIT * 3;
    while seen.len() < N {
        let left = deadline.saturating_duration_since(Instant::now());
        let (member, payload) = tokio::time::timeout(left, received.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {N} messages reached the group", seen.len()))
            .expect("members alive");
        assert!(seen.insert(payload.clone()), "message {payload} delivered twice across the group");
        *per_member.entry(member).or_default() += 1;
    }
    assert!(per_member.len() >= 2, "load not spread: {per_member:?}");
    assert!(per_member.values().all(|n| *n >= N / 10), "load badly spread: {per_member:?}");
    // The plain subscriber gets every message.
    let mut all = BTreeSet::new();
    while all.len() < N {
        all.insert(String::from_utf8_lossy(&plain.next_publish().await.payload).into_owned());
    }
}

const N: usize = 100;

/// Member A (shard 0, never acknowledges) and member B (shard 1) of `$share/g/work`, after
/// a publisher on shard 0 sent `n` QoS 1 messages and had them all acknowledged.
async fn silent_and_worker_after_burst(addr: std::net::SocketAddr, n: usize) -> (Peer, V4Client, Peer) {
    let a = tokio::task::spawn_blocking(move || {
        let mut a = Peer::v3(addr, &client_id_on(0, "silent"));
        a.subscribe_granted("$share/g/work", QoS::AtLeastOnce);
        a
    })
    .await
    .unwrap();
    let mut b = V4Client::connect(addr, &client_id_on(1, "worker")).await;
    b.subscribe("$share/g/work", rumqttc::QoS::AtLeastOnce).await;
    let publisher = tokio::task::spawn_blocking(move || {
        let mut publisher = Peer::v3(addr, &client_id_on(0, "producer"));
        publisher.publish_burst("work", n);
        publisher
    })
    .await
    .unwrap();
    (a, b, publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_of_a_member_that_goes_away_reach_another() {
    let broker = TestBroker::start();
    // Member A never acknowledges; B does.
    let (mut a, mut b, publisher) = silent_and_worker_after_burst(broker.addr, N).await;
    // A got its share and acknowledged none of it.
    let a_got = tokio::task::spawn_blocking(move || {
        let first = a.next_publish();
        drop(a);
        first
    })
    .await
    .unwrap();
    assert_eq!(a_got.qos, QoS::AtLeastOnce);
    let mut seen = BTreeSet::new();
    while seen.len() < N {
        let publish = tokio::time::timeout(WAIT, b.next_publish())
            .await
            .unwrap_or_else(|_| panic!("B has {} of {N}; A got {:?} first", seen.len(), a_got.payload));
        seen.insert(String::from_utf8_lossy(&publish.payload).into_owned());
    }
    assert!(seen.contains(&String::from_utf8_lossy(&a_got.payload).into_owned()));
    drop(publisher);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_member_that_stops_acknowledging_loses_its_share_to_another() {
    let broker = TestBroker::start_with(|c| {
        c.shared_ack_timeout = std::time::Duration::from_millis(500);
        c.max_inflight = 10;
    });
    // A stays connected and never acknowledges: after the ack timeout, what it holds
    // unacknowledged and what waits in its queue must reach B.
    let (mut a, mut b, publisher) = silent_and_worker_after_burst(broker.addr, N).await;
    let (a, a_got) = tokio::task::spawn_blocking(move || {
        let first = a.next_publish();
        (a, first)
    })
    .await
    .unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < N {
        let publish = tokio::time::timeout(WAIT, b.next_publish())
            .await
            .unwrap_or_else(|_| panic!("B has {} of {N} while A sits on its share", seen.len()));
        seen.insert(String::from_utf8_lossy(&publish.payload).into_owned());
    }
    assert!(seen.contains(&String::from_utf8_lossy(&a_got.payload).into_owned()));
    // New messages skip the member that stopped acknowledging.
    let publisher = tokio::task::spawn_blocking(move || {
        let mut publisher = publisher;
        publisher.publish("work", "after", QoS::AtLeastOnce, false);
        publisher
    })
    .await
    .unwrap();
    let publish = tokio::time::timeout(WAIT, b.next_publish()).await.expect("B gets the next message");
    assert_eq!(&publish.payload[..], b"after");
    drop((a, publisher));
}

#[test]
fn offline_persistent_members_queue_for_the_group() {
    let broker = TestBroker::start();
    let id = client_id_on(1, "sleeper");
    let (mut member, _) = Peer::connect_with(broker.addr, connect_packet(ProtocolVersion::V311, &id, false));
    member.subscribe_granted("$share/night/batch/+", QoS::AtLeastOnce);
    member.send(&Packet::Disconnect(ringmq::codec::Disconnect {
        reason: ringmq::codec::ReasonCode::Success,
        properties: Default::default(),
    }));
    assert!(member.recv().is_none());
    let mut publisher = Peer::v3(broker.addr, &client_id_on(0, "day"));
    for i in 0..5 {
        publisher.publish("batch/x", i.to_string(), QoS::AtLeastOnce, false);
    }
    let (mut member, present) =
        Peer::connect_with(broker.addr, connect_packet(ProtocolVersion::V311, &id, false));
    assert!(present);
    let payloads: Vec<String> = (0..5)
        .map(|_| {
            let p = member.next_publish();
            member.ack(&p);
            String::from_utf8_lossy(&p.payload).into_owned()
        })
        .collect();
    assert_eq!(payloads, ["0", "1", "2", "3", "4"]);
}

#[test]
fn retained_messages_are_not_sent_on_a_shared_subscription() {
    let broker = TestBroker::start();
    let mut publisher = Peer::v3(broker.addr, &client_id_on(0, "retainer"));
    publisher.publish("kept/t", "old", QoS::AtLeastOnce, true);
    let mut member = Peer::v3(broker.addr, &client_id_on(1, "member"));
    member.subscribe_granted("$share/g/kept/t", QoS::AtLeastOnce);
    member.subscribe_granted("marker", QoS::AtLeastOnce);
    publisher.publish("marker", "m", QoS::AtLeastOnce, false);
    member.expect_marker_first("marker", "retained message on a shared subscription");
}
