//! Retained messages: delivery on subscribe, replacement and deletion, a thousand topics
//! over both shards, the RETAIN flag on forwards, MQTT 5 Retain As Published and Retain
//! Handling, and the store's bound (MQTT 3.1.1 §3.3.1.3, MQTT 5.0 §3.3.1.3, §3.8.3.1).
//!
//! Retained topics are chosen with `topic_on` so that the publisher's own shard stores
//! them (the store is updated before its PUBACK), and subscribers sit on the other shard.
//! Absence is shown with a retained marker on the same storing shard, asked for by a later
//! SUBSCRIBE: it cannot overtake what an earlier SUBSCRIBE fetched from that shard.

use std::collections::BTreeSet;

use ringmq::codec::{QoS, ReasonCode, SubscriptionOptions};

use crate::common::{client_id_on, TestBroker, V4Client};
use crate::qos::helpers::{self, opts, topic_on, Peer};

/// The shard that stores the retained topics and runs their publisher.
const STORE: usize = 1;
/// The subscribers' shard.
const SUBS: usize = 0;

#[test]
fn retained_message_is_sent_on_subscribe_latest_wins_empty_deletes() {
    let broker = TestBroker::start();
    let mut publisher = Peer::v3(broker.addr, &client_id_on(STORE, "pub"));
    let t = topic_on(STORE, "ret");
    let marker = topic_on(STORE, "ret-marker");
    publisher.publish(&marker, "marker", QoS::AtLeastOnce, true);
    publisher.publish(&t, "v1", QoS::AtLeastOnce, true);
    publisher.publish(&t, "v2", QoS::AtLeastOnce, true);

    let mut sub = Peer::v3(broker.addr, &client_id_on(SUBS, "sub1"));
    sub.subscribe_granted(&t, QoS::AtMostOnce);
    let p = sub.next_publish();
    assert_eq!(
        (p.topic.as_str(), helpers::text(&p).as_str(), p.retain),
        (t.as_str(), "v2", true),
        "latest wins"
    );
    sub.ack(&p);
    sub.subscribe_granted(&marker, QoS::AtMostOnce);
    sub.expect_marker_first(&marker, "one retained message per topic");

    // A retained PUBLISH with an empty payload deletes it [MQTT-3.3.1-10/11].
    publisher.publish(&t, "", QoS::AtLeastOnce, true);
    let mut later = Peer::v3(broker.addr, &client_id_on(SUBS, "sub2"));
    later.subscribe_granted(&t, QoS::AtMostOnce);
    later.subscribe_granted(&marker, QoS::AtMostOnce);
    later.expect_marker_first(&marker, "deleted retained message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_retained_topics_from_both_shards_reach_one_wildcard() {
    const TOPICS: usize = 1000;
    let broker = TestBroker::start();
    let addr = broker.addr;
    // One publisher per shard, each publishing the topics its shard stores.
    let publishers: Vec<_> = (0..2)
        .map(|shard| {
            std::thread::spawn(move || {
                let mut publisher = Peer::v3(addr, &client_id_on(shard, "rpub"));
                let mut count = 0;
                for i in 0..TOPICS {
                    let t = format!("r/{i}");
                    if ringmq::broker::placement::owner(&t, 2) == shard {
                        assert_eq!(
                            publisher.publish(&t, i.to_string(), QoS::AtLeastOnce, true),
                            ReasonCode::Success
                        );
                        count += 1;
                    }
                }
                count
            })
        })
        .collect();
    let counts: Vec<usize> = publishers.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(counts.iter().all(|c| *c > 0), "both shards publish: {counts:?}");

    let mut sub = V4Client::connect(addr, &client_id_on(0, "rsub")).await;
    sub.subscribe("r/#", rumqttc::QoS::AtMostOnce).await;
    let mut seen = BTreeSet::new();
    let mut duplicates = 0;
    while seen.len() < TOPICS {
        let p = sub.next_publish().await;
        assert!(p.retain, "sent because retained: RETAIN=1 [MQTT-3.3.1-8]: {p:?}");
        let i: usize = p.topic.strip_prefix("r/").unwrap().parse().unwrap();
        assert_eq!(&p.payload[..], i.to_string().as_bytes());
        if !seen.insert(i) {
            duplicates += 1;
        }
    }
    assert_eq!(duplicates, 0);
}

#[test]
fn forwarded_retained_publish_has_retain_0_unless_retain_as_published() {
    let broker = TestBroker::start();
    let mut v3 = Peer::v3(broker.addr, &client_id_on(SUBS, "v3"));
    let mut v5 = Peer::v5(broker.addr, &client_id_on(SUBS, "v5"));
    let mut v5_rap = Peer::v5(broker.addr, &client_id_on(SUBS, "v5rap"));
    v3.subscribe_granted("fw/#", QoS::AtMostOnce);
    v5.subscribe_granted("fw/#", QoS::AtMostOnce);
    let rap = SubscriptionOptions { retain_as_published: true, ..opts(QoS::AtMostOnce) };
    assert_eq!(v5_rap.subscribe_with(&[("fw/#", rap)], Default::default()), vec![ReasonCode::GRANTED_QOS0]);

    let mut publisher = Peer::v3(broker.addr, &client_id_on(STORE, "pub"));
    publisher.publish("fw/a", "kept", QoS::AtLeastOnce, true);
    publisher.publish("fw/b", "plain", QoS::AtLeastOnce, false);
    for (name, peer, want) in
        [("v3.1.1", &mut v3, false), ("v5", &mut v5, false), ("v5 RAP", &mut v5_rap, true)]
    {
        let seen = peer.until("fw/b");
        let flags: Vec<(&str, bool)> = seen.iter().map(|p| (p.topic.as_str(), p.retain)).collect();
        // [MQTT-3.3.1-9] a live forward has RETAIN 0; [MQTT-3.3.1-13] RAP keeps the flag.
        assert_eq!(flags, vec![("fw/a", want), ("fw/b", false)], "{name}");
    }
}

#[test]
fn v5_retain_handling() {
    let broker = TestBroker::start();
    let mut publisher = Peer::v3(broker.addr, &client_id_on(STORE, "pub"));
    let t = topic_on(STORE, "rh");
    let marker = topic_on(STORE, "rh-marker");
    publisher.publish(&t, "kept", QoS::AtLeastOnce, true);
    publisher.publish(&marker, "marker", QoS::AtLeastOnce, true);
    let with = |rh: u8| SubscriptionOptions { retain_handling: rh, ..opts(QoS::AtMostOnce) };
    let subscribe = |peer: &mut Peer, filter: &str, rh: u8| {
        assert_eq!(
            peer.subscribe_with(&[(filter, with(rh))], Default::default()),
            vec![ReasonCode::GRANTED_QOS0]
        );
    };
    let expect_retained = |peer: &mut Peer, what: &str| {
        let p = peer.next_publish();
        assert_eq!((p.topic.as_str(), p.retain), (t.as_str(), true), "{what}");
    };

    // 0: sent at every subscribe [MQTT-3.3.1-9].
    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "rh0"));
    subscribe(&mut sub, &t, 0);
    expect_retained(&mut sub, "RH 0, first subscribe");
    subscribe(&mut sub, &t, 0);
    expect_retained(&mut sub, "RH 0, repeated subscribe");

    // 1: sent only if the subscription did not exist [MQTT-3.3.1-10].
    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "rh1"));
    subscribe(&mut sub, &t, 1);
    expect_retained(&mut sub, "RH 1, new subscription");
    subscribe(&mut sub, &t, 1);
    subscribe(&mut sub, &marker, 0);
    sub.expect_marker_first(&marker, "RH 1, existing subscription");

    // 2: never sent [MQTT-3.3.1-11].
    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "rh2"));
    subscribe(&mut sub, &t, 2);
    subscribe(&mut sub, &marker, 0);
    sub.expect_marker_first(&marker, "RH 2");
}

// ---- Tests that change broker limits (see `helpers::config`) ----

#[test]
fn retained_store_is_bounded_and_the_broker_keeps_serving() {
    const MAX: usize = 10;
    let broker = TestBroker::start_with(helpers::config::retained_max(MAX));
    // One marker per storing shard, stored first; then far more topics than the bound.
    let mut publishers: Vec<Peer> = (0..2).map(|s| Peer::v5(broker.addr, &client_id_on(s, "cpub"))).collect();
    let markers: Vec<String> = (0..2).map(|s| topic_on(s, "cap/m")).collect();
    for (shard, marker) in markers.iter().enumerate() {
        let reason = publishers[shard].publish(marker, "marker", QoS::AtLeastOnce, true);
        assert!(!reason.is_error(), "retained marker refused: {reason:?}");
    }
    let mut refused = 0;
    for i in 0..4 * MAX {
        let t = format!("cap/x/{i}");
        let shard = ringmq::broker::placement::owner(&t, 2);
        match publishers[shard].publish(&t, "x", QoS::AtLeastOnce, true) {
            // Stored; nobody subscribes yet (0x10 says so to a v5 client).
            ReasonCode::Success | ReasonCode::NoMatchingSubscribers => {}
            // Refusing the new topic is one acceptable answer (MQTT 5.0 §3.4.2.1).
            ReasonCode::QuotaExceeded | ReasonCode::ImplementationSpecificError => refused += 1,
            other => panic!("PUBACK {other:?}"),
        }
    }

    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "csub"));
    sub.subscribe_granted("cap/x/#", QoS::AtMostOnce);
    sub.subscribe_granted("cap/m/#", QoS::AtMostOnce);
    let mut stored = Vec::new();
    let mut markers_seen = 0;
    while markers_seen < 2 {
        let p = sub.next_publish();
        assert!(p.retain);
        if p.topic.as_str().starts_with("cap/m/") {
            markers_seen += 1;
        } else {
            stored.push(p.topic.as_str().to_string());
        }
    }
    assert!(!stored.is_empty(), "some topics were stored");
    assert!(
        stored.len() + markers.len() <= MAX,
        "{} stored with a bound of {MAX} ({refused} refused)",
        stored.len() + 2
    );

    // Still serving: an update to a stored topic is kept, and live messages flow.
    let kept = &stored[0];
    let shard = ringmq::broker::placement::owner(kept, 2);
    assert_eq!(publishers[shard].publish(kept, "updated", QoS::AtLeastOnce, true), ReasonCode::Success);
    let mut later = Peer::v5(broker.addr, &client_id_on(SUBS, "csub2"));
    later.subscribe_granted(kept, QoS::AtMostOnce);
    assert_eq!(helpers::text(&later.next_publish()), "updated");
    later.subscribe_granted("cap/live", QoS::AtMostOnce);
    publishers[1].publish("cap/live", "live", QoS::AtLeastOnce, false);
    let p = later.next_publish();
    assert_eq!((p.topic.as_str(), p.retain), ("cap/live", false));
}

/// A changed `--cores` keeps every retained message (issue 10): the bound is the broker's,
/// not a share per shard that a different partition could overflow at replay.
#[test]
fn a_core_count_change_keeps_every_retained_message_within_the_bound() {
    use ringmq::broker::placement::owner;
    let dir = std::env::temp_dir().join(format!("ringmq-retained-cores-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Ten topics, five per shard of two, and at least five on shard 0 of three: with a share
    // per shard (ten over three is four each) one would be dropped after the change.
    let mut topics: Vec<String> = Vec::new();
    let (mut on2, mut zero3) = ([0; 2], 0);
    for i in 0.. {
        let t = format!("keep/{i}");
        let (two, three) = (owner(&t, 2), owner(&t, 3));
        let wanted = if zero3 < 5 { three == 0 } else { three != 0 };
        if wanted && on2[two] < 5 {
            on2[two] += 1;
            zero3 += usize::from(three == 0);
            topics.push(t);
        }
        if topics.len() == 10 {
            break;
        }
    }
    let config = |cores: usize| {
        let dir = dir.clone();
        move |c: &mut ringmq::Config| {
            c.cores = cores;
            c.data_dir = Some(dir);
            c.segment_size = 1 << 20;
            c.max_retained_messages = 10;
        }
    };
    {
        let broker = TestBroker::start_with(config(2));
        let mut p = Peer::v3(broker.addr, "retainer");
        for t in &topics {
            assert!(!p.publish(t, "v", QoS::AtLeastOnce, true).is_error());
        }
    }
    let broker = TestBroker::start_with(config(3));
    let mut sub = Peer::v3(broker.addr, "reader");
    sub.subscribe_granted("keep/#", QoS::AtMostOnce);
    let mut got: Vec<String> = (0..10).map(|_| sub.next_publish().topic.as_str().to_string()).collect();
    got.sort();
    topics.sort();
    assert_eq!(got, topics);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
