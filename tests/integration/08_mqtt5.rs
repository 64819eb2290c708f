//! MQTT 5 features: what CONNACK advertises, inbound Topic Aliases, Message Expiry
//! Interval, Subscription Identifiers, No Local, properties forwarded unchanged, Server
//! Keep Alive, Receive Maximum, the client's Maximum Packet Size, and the `$SYS` topics
//! (MQTT 5.0 §3.1.2.11, §3.2.2.3, §3.3.2.3, §3.8.3.1, §4.7.2).
//!
//! Publishers sit on shard `PUBS`, subscribers on shard `SUBS`. Absence is shown with a
//! marker the same publisher sends afterwards, which must be the next thing to arrive.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ringmq::codec::{
    Packet, Properties, Property, ProtocolVersion, Publish, QoS, ReasonCode, SubscriptionOptions,
};
use ringmq::topic::TopicName;
use ringmq::Config;

use crate::common::{client_id_on, TestBroker, V5Client, WAIT};
use crate::qos::helpers::{self, connect_packet, opts, properties, topic_on, Peer};

const PUBS: usize = 1;
const SUBS: usize = 0;

/// A clean v5 connection that sends `props` in its CONNECT.
fn v5_with(addr: std::net::SocketAddr, client_id: &str, props: Vec<Property>) -> Peer {
    let mut connect = connect_packet(ProtocolVersion::V5, client_id, true);
    connect.properties = properties(props);
    Peer::connect_with(addr, connect).0
}

/// A PUBLISH with properties; `topic` may be empty (for a Topic Alias).
fn publish_packet(topic: &str, payload: &[u8], qos: QoS, id: u16, props: Vec<Property>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: TopicName::new_allow_empty(topic.to_string()).expect("valid topic name"),
        packet_id: (qos != QoS::AtMostOnce).then(|| helpers::pid(id)),
        properties: properties(props),
        payload: Bytes::copy_from_slice(payload),
    }
}

/// Publishes with properties from a peer that subscribes to nothing, so the next packet
/// it receives for a QoS 1 publish is its PUBACK (Success, or 0x10 when nobody listens).
fn publish_props(peer: &mut Peer, topic: &str, payload: &str, qos: QoS, props: Vec<Property>) {
    let id = peer.next_packet_id();
    peer.send(&Packet::Publish(publish_packet(topic, payload.as_bytes(), qos, id.get(), props)));
    if qos == QoS::AtLeastOnce {
        match peer.expect() {
            Packet::PubAck(ack) if ack.packet_id == id => {
                assert!(!ack.reason.is_error(), "PUBACK for {topic}: {:?}", ack.reason)
            }
            other => panic!("expected PUBACK for {topic}, got {other:?}"),
        }
    }
}

/// The next PUBLISH, acknowledged.
fn next_acked(peer: &mut Peer) -> Publish {
    let p = peer.next_publish();
    peer.ack(&p);
    p
}

fn sub_ids(p: &Publish) -> Vec<u32> {
    let mut ids: Vec<u32> = p.properties.subscription_identifiers().collect();
    ids.sort_unstable();
    ids
}

/// What the server sent before closing, which must end with exactly one DISCONNECT.
fn disconnect_reason(packets: &[Packet]) -> ReasonCode {
    match packets {
        [.., Packet::Disconnect(d)] => d.reason,
        other => panic!("expected the server's DISCONNECT before it closed, got {other:?}"),
    }
}

#[test]
fn connack_advertises_the_v5_limits() {
    let broker = TestBroker::start_with(|c| {
        c.receive_maximum = 33;
        c.max_topic_alias = 7;
        c.max_packet_size = 4096;
    });
    let (mut peer, ack) =
        Peer::try_connect(broker.addr, connect_packet(ProtocolVersion::V5, &client_id_on(SUBS, "ack"), true));
    assert_eq!(ack.reason, ReasonCode::Success);
    let p = &ack.properties;
    assert_eq!(p.receive_maximum(), Some(33), "Receive Maximum: {p:?}");
    assert_eq!(p.topic_alias_maximum(), Some(7), "Topic Alias Maximum: {p:?}");
    assert_eq!(p.maximum_packet_size(), Some(4096), "Maximum Packet Size: {p:?}");
    // Shared subscriptions are being added: whatever CONNACK says must agree with SUBACK
    // (0 when they are refused with 0x9E, absent or 1 when granted) [MQTT 5.0 §3.2.2.3.13].
    let shared_granted = match peer.subscribe("$share/g/t", QoS::AtMostOnce)[..] {
        [ReasonCode::Success] => true,
        [ReasonCode::SharedSubscriptionsNotSupported] => false,
        ref other => panic!("SUBACK for $share/g/t: {other:?}"),
    };
    assert_eq!(
        p.shared_subscription_available() != Some(false),
        shared_granted,
        "Shared Subscription Available agrees with SUBACK: {p:?}"
    );
    assert_ne!(
        p.subscription_identifier_available(),
        Some(false),
        "subscription identifiers are supported: {p:?}"
    );
    assert_ne!(p.wildcard_subscription_available(), Some(false), "wildcards are supported: {p:?}");
}

#[test]
fn inbound_topic_alias_is_resolved_and_not_forwarded() {
    let broker = TestBroker::start();
    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "sub"));
    sub.subscribe_granted("a/#", QoS::AtMostOnce);
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    // Set alias 1, use it, set it again to another topic [MQTT 5.0 §3.3.2.3.4], use it.
    for (topic, payload) in [("a/b", "1"), ("", "2"), ("a/c", "3"), ("", "4")] {
        publish_props(&mut publisher, topic, payload, QoS::AtLeastOnce, vec![Property::TopicAlias(1)]);
    }
    for (topic, payload) in [("a/b", "1"), ("a/b", "2"), ("a/c", "3"), ("a/c", "4")] {
        let p = next_acked(&mut sub);
        assert_eq!((p.topic.as_str(), helpers::text(&p).as_str()), (topic, payload));
        // The subscriber set no Topic Alias Maximum, so none may be sent to it [MQTT-3.3.2-9].
        assert_eq!(p.properties.topic_alias(), None, "alias forwarded: {p:?}");
    }
}

#[test]
fn invalid_topic_aliases_end_the_connection_with_0x94() {
    let broker = TestBroker::start_with(|c| c.max_topic_alias = 4);
    let cases: [(&str, &str, u16); 3] = [
        ("above the maximum", "a/b", 5),
        ("unknown alias with an empty topic", "", 2),
        ("alias 0", "a/b", 0),
    ];
    for (i, (what, topic, alias)) in cases.into_iter().enumerate() {
        let mut peer = Peer::v5(broker.addr, &client_id_on(PUBS, &format!("alias{i}")));
        peer.send(&Packet::Publish(publish_packet(
            topic,
            b"x",
            QoS::AtMostOnce,
            0,
            vec![Property::TopicAlias(alias)],
        )));
        let sent = peer.until_closed();
        assert_eq!(disconnect_reason(&sent), ReasonCode::TopicAliasInvalid, "{what}: {sent:?}");
        assert_eq!(sent.len(), 1, "{what}: only the DISCONNECT: {sent:?}");
    }
}

#[test]
fn message_expiry_is_forwarded_and_counts_down() {
    let broker = TestBroker::start();
    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "sub"));
    sub.subscribe_granted("x/t", QoS::AtLeastOnce);
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    publish_props(
        &mut publisher,
        "x/t",
        "expiring",
        QoS::AtLeastOnce,
        vec![Property::MessageExpiryInterval(60)],
    );
    publish_props(&mut publisher, "x/t", "forever", QoS::AtLeastOnce, vec![]);
    let p = next_acked(&mut sub);
    assert_eq!(helpers::text(&p), "expiring");
    let left = p.properties.message_expiry_interval();
    assert!(matches!(left, Some(1..=60)), "[MQTT-3.3.2-6] expiry of at most 60 s, got {left:?}");
    let p = next_acked(&mut sub);
    assert_eq!(helpers::text(&p), "forever");
    assert_eq!(p.properties.message_expiry_interval(), None, "no expiry was set: {p:?}");
}

#[test]
fn expired_messages_are_not_delivered_to_a_returning_session() {
    let broker = TestBroker::start();
    let id = client_id_on(SUBS, "away");
    let persistent = |clean| {
        let mut c = connect_packet(ProtocolVersion::V5, &id, clean);
        c.properties.push(Property::SessionExpiryInterval(60));
        c
    };
    let (mut sub, _) = Peer::connect_with(broker.addr, persistent(true));
    sub.subscribe_granted("x/q", QoS::AtLeastOnce);
    sub.disconnect();

    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    let mut watch = helpers::observer(broker.addr, SUBS, "x/q");
    let published = Instant::now();
    publish_props(&mut publisher, "x/q", "short", QoS::AtLeastOnce, vec![Property::MessageExpiryInterval(1)]);
    publish_props(&mut publisher, "x/q", "long", QoS::AtLeastOnce, vec![Property::MessageExpiryInterval(60)]);
    // Both are queued on the session's shard.
    watch.saw("long");

    // The interval is the point: wait it out, with a grace for a once-a-second timer.
    while published.elapsed() < Duration::from_millis(2500) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut sub, present) = Peer::connect_with(broker.addr, persistent(false));
    assert!(present, "the session was kept");
    // "short" was queued first: had it survived, it would come first.
    let p = next_acked(&mut sub);
    assert_eq!(helpers::text(&p), "long", "[MQTT-3.3.2-5] the expired message is not delivered");
    let left = p.properties.message_expiry_interval();
    assert!(
        matches!(left, Some(1..=59)),
        "[MQTT-3.3.2-6] the interval minus the 2.5 s it waited, got {left:?}"
    );
    assert_eq!(sub.ping(), vec![], "nothing else queued");
}

#[test]
fn subscription_identifiers_of_every_matching_subscription_are_sent_once() {
    let broker = TestBroker::start();
    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "sub"));
    for (filter, sid) in [("s/+", 7), ("s/#", 9)] {
        let granted = sub.subscribe_with(
            &[(filter, opts(QoS::AtMostOnce))],
            properties(vec![Property::SubscriptionIdentifier(sid)]),
        );
        assert_eq!(granted, vec![ReasonCode::GRANTED_QOS0], "SUBACK for {filter}");
    }
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    publish_props(&mut publisher, "s/x", "both", QoS::AtLeastOnce, vec![]);
    publish_props(&mut publisher, "s/x/y", "deep", QoS::AtLeastOnce, vec![]);

    let p = next_acked(&mut sub);
    assert_eq!(p.topic.as_str(), "s/x");
    assert_eq!(sub_ids(&p), vec![7, 9], "[MQTT-3.3.4-3] one copy with both identifiers: {p:?}");
    // The next message is the other topic: "s/x" was not sent twice.
    let p = next_acked(&mut sub);
    assert_eq!(p.topic.as_str(), "s/x/y", "s/x delivered once");
    assert_eq!(sub_ids(&p), vec![9], "only s/# matches: {p:?}");
}

#[test]
fn retained_message_on_subscribe_carries_that_subscriptions_identifier() {
    let broker = TestBroker::start();
    // The publisher's shard stores the topic, so it is stored before the PUBACK.
    let t = topic_on(PUBS, "sr");
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    publisher.publish(&t, "kept", QoS::AtLeastOnce, true);

    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "sub"));
    for (filter, sid) in [("sr/+", 5), (t.as_str(), 42)] {
        let granted = sub.subscribe_with(
            &[(filter, opts(QoS::AtMostOnce))],
            properties(vec![Property::SubscriptionIdentifier(sid)]),
        );
        assert_eq!(granted, vec![ReasonCode::GRANTED_QOS0], "SUBACK for {filter}");
        let p = next_acked(&mut sub);
        assert_eq!((p.topic.as_str(), helpers::text(&p).as_str(), p.retain), (t.as_str(), "kept", true));
        assert_eq!(sub_ids(&p), vec![sid], "retained message sent for the subscription {filter}: {p:?}");
    }
}

#[test]
fn no_local_keeps_a_clients_own_messages_from_it() {
    let broker = TestBroker::start();
    let mut own = Peer::v5(broker.addr, &client_id_on(SUBS, "own"));
    let no_local = SubscriptionOptions { no_local: true, ..opts(QoS::AtMostOnce) };
    assert_eq!(
        own.subscribe_with(&[("nl/t", no_local)], Properties::default()),
        vec![ReasonCode::GRANTED_QOS0]
    );
    own.subscribe_granted("nl/marker", QoS::AtMostOnce);
    let mut other = Peer::v5(broker.addr, &client_id_on(PUBS, "other"));
    other.subscribe_granted("nl/t", QoS::AtMostOnce);

    own.publish("nl/t", "mine", QoS::AtLeastOnce, false);
    own.publish("nl/marker", "end", QoS::AtLeastOnce, false);
    own.expect_marker_first("nl/marker", "[MQTT-3.8.3-3] No Local: own message not sent back");
    let p = next_acked(&mut other);
    assert_eq!(
        (p.topic.as_str(), helpers::text(&p).as_str()),
        ("nl/t", "mine"),
        "another subscriber gets it"
    );
}

/// The properties a forwarded PUBLISH keeps [MQTT-3.3.2-15..20, MQTT-3.3.2-17].
fn passthrough() -> Vec<Property> {
    vec![
        Property::PayloadFormatIndicator(1),
        Property::ContentType("text/plain".into()),
        Property::ResponseTopic("reply/here".into()),
        Property::CorrelationData(Bytes::from_static(b"\x00\x01corr")),
        Property::UserProperty("k1".into(), "v1".into()),
        Property::UserProperty("k2".into(), "v2".into()),
        Property::UserProperty("k1".into(), "again".into()),
    ]
}

#[test]
fn publish_properties_are_forwarded_unchanged() {
    let broker = TestBroker::start();
    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "sub"));
    sub.subscribe_granted("p/t", QoS::AtLeastOnce);
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        publish_props(&mut publisher, "p/t", "hello", qos, passthrough());
        let p = next_acked(&mut sub);
        let props = &p.properties;
        assert_eq!(props.payload_format_indicator(), Some(1), "{qos:?}: {props:?}");
        assert_eq!(props.content_type(), Some("text/plain"), "{qos:?}: {props:?}");
        assert_eq!(props.response_topic(), Some("reply/here"), "{qos:?}: {props:?}");
        assert_eq!(
            props.correlation_data().map(|b| &b[..]),
            Some(&b"\x00\x01corr"[..]),
            "{qos:?}: {props:?}"
        );
        let users: Vec<_> = props.user_properties().collect();
        assert_eq!(users, vec![("k1", "v1"), ("k2", "v2"), ("k1", "again")], "[MQTT-3.3.2-18] order kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_properties_are_forwarded_to_rumqttc() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;

    let broker = TestBroker::start();
    let (mut sub, _) = V5Client::connect(broker.addr, &client_id_on(SUBS, "sub")).await;
    sub.subscribe("rp/t", QoS::AtLeastOnce).await;
    let (publisher, _) = V5Client::connect(broker.addr, &client_id_on(PUBS, "pub")).await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"id-7")),
        user_properties: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
        subscription_identifiers: vec![],
        content_type: Some("application/json".into()),
    };
    publisher
        .client
        .publish_with_properties("rp/t", QoS::AtLeastOnce, false, "{}", sent.clone())
        .await
        .unwrap();
    let p = sub.next_publish().await;
    assert_eq!(&p.topic[..], b"rp/t");
    assert_eq!(p.properties, Some(sent), "properties as published");
}

#[test]
fn server_keep_alive_caps_what_the_client_asks_for() {
    let broker = TestBroker::start_with(|c| c.max_keep_alive = 5);
    for (asked, told) in [(60, Some(5)), (3, None)] {
        let mut connect =
            connect_packet(ProtocolVersion::V5, &client_id_on(SUBS, &format!("ka{asked}")), true);
        connect.keep_alive = asked;
        let (peer, ack) = Peer::try_connect(broker.addr, connect);
        assert_eq!(ack.reason, ReasonCode::Success);
        assert_eq!(ack.properties.server_keep_alive(), told, "keep-alive {asked}: {:?}", ack.properties);
        peer.disconnect();
    }
}

#[test]
fn more_qos2_publishes_than_receive_maximum_end_the_connection_with_0x93() {
    let broker = TestBroker::start_with(|c| c.receive_maximum = 2);
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    // No PUBREL: each stays unacknowledged until PUBCOMP.
    for id in 1..=3 {
        publisher.send(&Packet::Publish(publish_packet("rm/t", b"x", QoS::ExactlyOnce, id, vec![])));
    }
    let sent = publisher.until_closed();
    assert_eq!(disconnect_reason(&sent), ReasonCode::ReceiveMaximumExceeded, "{sent:?}");
    let recs: Vec<u16> = sent
        .iter()
        .filter_map(|p| match p {
            Packet::PubRec(r) => Some(r.packet_id.get()),
            _ => None,
        })
        .collect();
    assert_eq!(recs, vec![1, 2], "the first two are within the Receive Maximum: {sent:?}");
}

#[test]
fn messages_larger_than_the_clients_maximum_packet_size_are_skipped() {
    let broker = TestBroker::start();
    let mut small =
        v5_with(broker.addr, &client_id_on(SUBS, "small"), vec![Property::MaximumPacketSize(100)]);
    let mut large = Peer::v5(broker.addr, &client_id_on(SUBS, "large"));
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    let big = "x".repeat(500);
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let t = format!("mps/{}", qos as u8);
        small.subscribe_granted(&t, qos);
        large.subscribe_granted(&t, qos);
        publisher.publish(&t, &big, qos, false);
        publisher.publish(&t, "small", qos, false);
        let got = helpers::text(&next_acked(&mut small));
        assert!(
            got == "small",
            "[MQTT-3.1.2-24] {qos:?}: a 100-byte limit, yet got {} bytes before the small message",
            got.len()
        );
        // The large one was published: a client without the limit gets both.
        assert_eq!(helpers::text(&next_acked(&mut large)), big, "{qos:?}");
        assert_eq!(helpers::text(&next_acked(&mut large)), "small", "{qos:?}");
    }
    // And the skipped QoS 1 message is not retried later [MQTT-3.1.2-25].
    assert_eq!(small.ping(), vec![], "nothing left to send");
}

// ---- $SYS ----

fn sys_every_second(c: &mut Config) {
    c.sys_interval = Duration::from_secs(1);
}

/// The value of a `$SYS` counter: its leading number.
fn number(p: &Publish) -> u64 {
    let text = helpers::text(p);
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{} is not a number: {text:?}", p.topic))
}

/// Receives until `topic` has a value that satisfies `done`, bounded by `WAIT`.
fn sys_value_until(sub: &mut Peer, topic: &str, done: impl Fn(u64) -> bool) -> u64 {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < WAIT {
        let p = next_acked(sub);
        if p.topic.as_str() == topic {
            let v = number(&p);
            if done(v) {
                return v;
            }
            seen.push(v);
        }
    }
    panic!("{topic} never reached the expected value; values seen: {seen:?}");
}

#[test]
fn sys_topics_report_version_uptime_and_counters() {
    let broker = TestBroker::start_with(sys_every_second);
    let mut sys = Peer::v5(broker.addr, &client_id_on(SUBS, "sys"));
    sys.subscribe_granted("$SYS/broker/#", QoS::AtMostOnce);

    let mut missing = vec!["$SYS/broker/version", "$SYS/broker/uptime"];
    let start = Instant::now();
    while !missing.is_empty() {
        assert!(start.elapsed() < WAIT, "never received {missing:?}");
        let p = next_acked(&mut sys);
        if missing.contains(&p.topic.as_str()) {
            assert!(!p.payload.is_empty(), "{} is empty", p.topic);
            missing.retain(|t| *t != p.topic.as_str());
        }
    }

    // This broker has only `sys`: three more are four, on both shards.
    let more: Vec<Peer> = [0, 1, 0]
        .iter()
        .enumerate()
        .map(|(i, s)| Peer::v5(broker.addr, &client_id_on(*s, &format!("c{i}"))))
        .collect();
    sys_value_until(&mut sys, "$SYS/broker/clients/connected", |n| n >= 4);

    let before = sys_value_until(&mut sys, "$SYS/broker/messages/received", |_| true);
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    for i in 0..10 {
        publisher.publish("count/t", i.to_string(), QoS::AtLeastOnce, false);
    }
    let after = sys_value_until(&mut sys, "$SYS/broker/messages/received", |n| n >= before + 10);
    assert!(after >= before + 10, "{before} -> {after}");
    drop(more);
}

#[test]
fn sys_counts_each_listeners_connections() {
    let broker = TestBroker::start_with(|c| {
        sys_every_second(c);
        c.listeners.push(ringmq::config::Listener::tcp("127.0.0.1:0".parse().unwrap()));
    });
    let [first, second] = [broker.addrs[0], broker.addrs[1]];
    let mut sys = Peer::v5(first, &client_id_on(SUBS, "sys-l"));
    sys.subscribe_granted("$SYS/broker/listeners/#", QoS::AtMostOnce);
    let two: Vec<Peer> = [0, 1].iter().map(|s| Peer::v5(second, &client_id_on(*s, "l2-"))).collect();
    sys_value_until(&mut sys, &format!("$SYS/broker/listeners/tcp:{second}/clients/connected"), |n| n == 2);
    sys_value_until(&mut sys, &format!("$SYS/broker/listeners/tcp:{first}/clients/connected"), |n| n == 1);
    drop(two);
}

#[test]
fn sys_topics_are_not_matched_by_a_leading_wildcard() {
    let broker = TestBroker::start_with(sys_every_second);
    // Both on shard 0, which publishes the totals: the watcher seeing a live one means
    // it has been routed to `all` too.
    let mut all = Peer::v5(broker.addr, &client_id_on(0, "all"));
    all.subscribe_granted("#", QoS::AtMostOnce);
    let mut watcher = Peer::v5(broker.addr, &client_id_on(0, "watch"));
    watcher.subscribe_granted("$SYS/broker/uptime", QoS::AtMostOnce);
    // A live one, not the retained copy sent on subscribe.
    loop {
        let p = next_acked(&mut watcher);
        if !p.retain {
            break;
        }
    }
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    publisher.publish("m/marker", "end", QoS::AtLeastOnce, false);
    all.expect_marker_first("m/marker", "[MQTT-4.7.2-1] # does not match $SYS topics");
}

#[test]
fn sys_client_connected_event_is_published_not_retained() {
    let broker = TestBroker::start_with(sys_every_second);
    let mut events = Peer::v5(broker.addr, &client_id_on(SUBS, "events"));
    // Retain As Published: a retained event would arrive with RETAIN set.
    let rap = SubscriptionOptions { retain_as_published: true, ..opts(QoS::AtMostOnce) };
    let granted = events.subscribe_with(&[("$SYS/broker/clients/+/connected", rap)], Properties::default());
    assert_eq!(granted, vec![ReasonCode::GRANTED_QOS0]);
    let id = client_id_on(PUBS, "newcomer");
    let _newcomer = Peer::v5(broker.addr, &id);
    let topic = format!("$SYS/broker/clients/{id}/connected");
    let start = Instant::now();
    let p = loop {
        assert!(start.elapsed() < WAIT, "no event on {topic}");
        let p = next_acked(&mut events);
        if p.topic.as_str() == topic {
            break p;
        }
    };
    assert!(!p.retain, "the event is not retained: {p:?}");
}

#[test]
fn acknowledgements_say_when_no_subscription_matched() {
    let broker = TestBroker::start();
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "lonely"));
    let t = topic_on(SUBS, "nobody");
    assert_eq!(publisher.publish(&t, "x", QoS::AtLeastOnce, false), ReasonCode::NoMatchingSubscribers);
    assert_eq!(publisher.publish(&t, "x", QoS::ExactlyOnce, false), ReasonCode::NoMatchingSubscribers);
    // A subscriber on the other shard: now it matches.
    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "listener"));
    sub.subscribe_granted(&t, QoS::AtLeastOnce);
    assert_eq!(publisher.publish(&t, "y", QoS::AtLeastOnce, false), ReasonCode::Success);
    assert_eq!(&next_acked(&mut sub).payload[..], b"y");
    // 3.1.1 has no reason code in PUBACK.
    let mut v3 = Peer::v3(broker.addr, &client_id_on(PUBS, "old"));
    assert_eq!(v3.publish(&topic_on(SUBS, "nobody-v3"), "x", QoS::AtLeastOnce, false), ReasonCode::Success);
}

#[test]
fn response_information_is_given_when_requested() {
    let broker = TestBroker::start();
    let mut connect = connect_packet(ProtocolVersion::V5, "asker", true);
    connect.properties = properties(vec![Property::RequestResponseInformation(1)]);
    let (_peer, connack) = Peer::try_connect(broker.addr, connect);
    assert_eq!(connack.properties.response_information(), Some("response/asker"));
    let (_peer, connack) = Peer::try_connect(broker.addr, connect_packet(ProtocolVersion::V5, "quiet", true));
    assert_eq!(connack.properties.response_information(), None);
}

#[test]
fn failed_acknowledgements_carry_a_reason_string_unless_problem_information_is_off() {
    let broker = TestBroker::start();
    for (id, request, expect_string) in [("talkative", None, true), ("terse", Some(0), false)] {
        let props = request.map(|r| vec![Property::RequestProblemInformation(r)]).unwrap_or_default();
        let mut peer = v5_with(broker.addr, &client_id_on(PUBS, id), props);
        peer.send(&Packet::PubRel(helpers::ack(helpers::pid(77))));
        match peer.expect() {
            Packet::PubComp(comp) => {
                assert_eq!(comp.reason, ReasonCode::PacketIdentifierNotFound);
                assert_eq!(comp.properties.reason_string().is_some(), expect_string, "{id}");
            }
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
        let reasons = peer.subscribe("$share/+/t", QoS::AtLeastOnce);
        assert_eq!(reasons, vec![ReasonCode::TopicFilterInvalid]);
    }
}
