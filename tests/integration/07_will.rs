//! Will messages: published when a connection ends without DISCONNECT (socket closed,
//! keep-alive timeout, takeover), not after DISCONNECT, on MQTT 5 DISCONNECT 0x04, and
//! the MQTT 5 Will Delay Interval (MQTT 3.1.1 §3.1.2.5, MQTT 5.0 §3.1.2.5, §3.1.3.2.2).
//!
//! The will's client and the marker publisher share shard `WILL`; subscribers are on the
//! other shard. The will topics are stored (when retained) by the will's shard.

use std::time::{Duration, Instant};

use ringmq::codec::{Connect, Packet, Property, ProtocolVersion, QoS, ReasonCode};

use crate::common::{client_id_on, TestBroker, WAIT};
use crate::qos::helpers::{self, connect_packet, properties, topic_on, will, Peer};

const WILL: usize = 1;
const SUBS: usize = 0;

fn with_will(mut connect: Connect, will: ringmq::codec::Will) -> Connect {
    connect.will = Some(will);
    connect
}

/// A v5 CONNECT with a will on `topic`, a Will Delay Interval and a Session Expiry Interval.
fn v5_will(id: &str, topic: &str, delay: u32, expiry: u32) -> Connect {
    let mut w = will(topic, "gone", QoS::AtLeastOnce, false);
    if delay > 0 {
        w.properties.push(Property::WillDelayInterval(delay));
    }
    let mut c = with_will(connect_packet(ProtocolVersion::V5, id, true), w);
    if expiry > 0 {
        c.properties.push(Property::SessionExpiryInterval(expiry));
    }
    c
}

/// A subscriber on the other shard. QoS 0 unless the will's QoS is under test, so these
/// tests do not depend on QoS 1/2 delivery.
fn subscriber(broker: &TestBroker, filter: &str, qos: QoS) -> Peer {
    let mut sub = Peer::v3(broker.addr, &client_id_on(SUBS, "wsub"));
    sub.subscribe_granted(filter, qos);
    sub
}

/// Sleeps until `since + interval`: for the tests whose subject is a time interval.
fn wait_until(since: Instant, interval: Duration) {
    while since.elapsed() < interval {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn will_is_published_with_its_qos_and_retain_when_the_socket_closes() {
    let broker = TestBroker::start();
    let t = topic_on(WILL, "will");
    let mut sub = subscriber(&broker, "will/#", QoS::AtLeastOnce);
    let connect = with_will(
        connect_packet(ProtocolVersion::V311, &client_id_on(WILL, "dies"), true),
        will(&t, "gone", QoS::AtLeastOnce, true),
    );
    let (client, _) = Peer::connect_with(broker.addr, connect);
    drop(client);
    let p = sub.next_publish();
    // A live forward to an existing subscription: RETAIN 0 [MQTT-3.3.1-9 in 3.1.1].
    assert_eq!(
        (p.topic.as_str(), helpers::text(&p).as_str(), p.qos, p.retain),
        (t.as_str(), "gone", QoS::AtLeastOnce, false)
    );
    sub.ack(&p);
    // The will was retained [MQTT-3.1.2-17]: a later subscriber gets it with RETAIN 1.
    let mut later = Peer::v3(broker.addr, &client_id_on(SUBS, "later"));
    later.subscribe_granted(&t, QoS::AtLeastOnce);
    let p = later.next_publish();
    assert_eq!((p.topic.as_str(), p.qos, p.retain), (t.as_str(), QoS::AtLeastOnce, true));
}

#[test]
fn will_is_not_published_after_disconnect() {
    let broker = TestBroker::start();
    let mut sub = subscriber(&broker, "w2/#", QoS::AtMostOnce);
    let connect = with_will(
        connect_packet(ProtocolVersion::V311, &client_id_on(WILL, "polite"), true),
        will("w2/will", "gone", QoS::AtLeastOnce, false),
    );
    let (client, _) = Peer::connect_with(broker.addr, connect);
    client.disconnect();
    let mut marker = Peer::v3(broker.addr, &client_id_on(WILL, "marker"));
    marker.publish("w2/marker", "end", QoS::AtLeastOnce, false);
    // [MQTT-3.1.2-10]: DISCONNECT deletes the will.
    sub.expect_marker_first("w2/marker", "will after DISCONNECT");
}

#[test]
fn v5_disconnect_with_will_message_publishes_it() {
    let broker = TestBroker::start();
    let mut sub = subscriber(&broker, "w3/#", QoS::AtMostOnce);
    let (client, _) = Peer::connect_with(broker.addr, v5_will(&client_id_on(WILL, "w3"), "w3/will", 0, 0));
    let rest = client.disconnect_with(ReasonCode::DisconnectWithWillMessage, properties(vec![]));
    assert_eq!(rest, vec![]);
    let p = sub.next_publish();
    assert_eq!((p.topic.as_str(), helpers::text(&p).as_str()), ("w3/will", "gone"));
}

#[test]
fn will_is_published_on_keep_alive_timeout() {
    let broker = TestBroker::start();
    let mut sub = subscriber(&broker, "w4/#", QoS::AtMostOnce);
    let mut connect = with_will(
        connect_packet(ProtocolVersion::V311, &client_id_on(WILL, "silent"), true),
        will("w4/will", "gone", QoS::AtMostOnce, false),
    );
    connect.keep_alive = 1;
    let started = Instant::now();
    let (_client, _) = Peer::connect_with(broker.addr, connect);
    let p = sub.next_publish();
    assert_eq!(p.topic.as_str(), "w4/will");
    // The connection is closed after 1.5 × keep-alive [MQTT-3.1.2-24].
    assert!(started.elapsed() >= Duration::from_millis(1400), "too early: {:?}", started.elapsed());
}

#[test]
fn v5_will_is_published_on_takeover_with_will_delay_0() {
    let broker = TestBroker::start();
    let mut sub = subscriber(&broker, "w5/#", QoS::AtMostOnce);
    let id = client_id_on(WILL, "taken");
    let (first, _) = Peer::connect_with(broker.addr, v5_will(&id, "w5/will", 0, 60));
    let mut again = connect_packet(ProtocolVersion::V5, &id, false);
    again.properties.push(Property::SessionExpiryInterval(60));
    let (_second, present) = Peer::connect_with(broker.addr, again);
    assert!(present, "the second connection continues the session");
    let closed = first.until_closed();
    assert!(
        matches!(closed.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::SessionTakenOver),
        "{closed:?}"
    );
    // The old connection ended without DISCONNECT and its will delay (0) has passed.
    let p = sub.next_publish();
    assert_eq!((p.topic.as_str(), helpers::text(&p).as_str()), ("w5/will", "gone"));
}

#[test]
fn v5_will_delay_is_cancelled_by_reconnecting() {
    let broker = TestBroker::start();
    let mut sub = subscriber(&broker, "w6/#", QoS::AtMostOnce);
    let id = client_id_on(WILL, "back");
    let (client, _) = Peer::connect_with(broker.addr, v5_will(&id, "w6/will", 2, 10));
    drop(client);
    let dropped = Instant::now();
    let mut again = connect_packet(ProtocolVersion::V5, &id, false);
    again.properties.push(Property::SessionExpiryInterval(10));
    let (_back, present) = Peer::connect_with(broker.addr, again);
    assert!(present);
    assert!(dropped.elapsed() < Duration::from_secs(1), "reconnected well within the delay");
    // [MQTT-3.1.3-9]: a new connection to the session before the delay passed: no will.
    wait_until(dropped, Duration::from_millis(2500));
    let mut marker = Peer::v3(broker.addr, &client_id_on(WILL, "marker"));
    marker.publish("w6/marker", "end", QoS::AtLeastOnce, false);
    sub.expect_marker_first("w6/marker", "will of a session resumed within its delay");
}

#[test]
fn v5_will_is_published_after_its_delay() {
    let broker = TestBroker::start();
    let mut sub = subscriber(&broker, "w7/#", QoS::AtMostOnce);
    let (client, _) = Peer::connect_with(broker.addr, v5_will(&client_id_on(WILL, "late"), "w7/will", 2, 10));
    drop(client);
    let dropped = Instant::now();
    let p = sub.next_publish();
    let waited = dropped.elapsed();
    assert_eq!(p.topic.as_str(), "w7/will");
    assert!(waited >= Duration::from_millis(1500), "before the 2 s delay: {waited:?}");
    assert!(waited < WAIT);
}

#[test]
fn v5_will_is_published_when_the_session_ends_before_its_delay() {
    let broker = TestBroker::start();
    let mut sub = subscriber(&broker, "w8/#", QoS::AtMostOnce);
    let (client, _) =
        Peer::connect_with(broker.addr, v5_will(&client_id_on(WILL, "short"), "w8/will", 10, 1));
    drop(client);
    let dropped = Instant::now();
    let p = sub.next_publish();
    let waited = dropped.elapsed();
    assert_eq!(p.topic.as_str(), "w8/will");
    // The session ends after 1 s, before the 10 s delay: the will goes then [MQTT-3.1.2-8].
    assert!(waited >= Duration::from_millis(900), "before the session ended: {waited:?}");
    assert!(waited < Duration::from_secs(5), "waited for the will delay instead: {waited:?}");
}
