//! Persistent sessions: Session Present, messages kept while offline, MQTT 5 Session
//! Expiry Interval (CONNECT and DISCONNECT), and takeover (MQTT 3.1.1 §3.1.2.4, §3.2.2.2;
//! MQTT 5.0 §3.1.2.11.2, §3.14.2.2.2, §4.1).

use std::time::{Duration, Instant};

use ringmq::codec::{Packet, Property, ProtocolVersion, QoS, ReasonCode};

use crate::common::{client_id_on, TestBroker};
use crate::qos::helpers::{self, connect_packet, observer, properties, Peer};

/// A v5 CONNECT with a Session Expiry Interval (seconds; `None`: property absent, i.e. 0).
fn connect_v5(client_id: &str, clean: bool, expiry: Option<u32>) -> ringmq::codec::Connect {
    let mut c = connect_packet(ProtocolVersion::V5, client_id, clean);
    if let Some(secs) = expiry {
        c.properties.push(Property::SessionExpiryInterval(secs));
    }
    c
}

#[test]
fn v311_session_present_and_offline_messages() {
    let broker = TestBroker::start();
    let id = client_id_on(0, "sess");
    let persistent = || connect_packet(ProtocolVersion::V311, &id, false);
    let (mut sub, present) = Peer::connect_with(broker.addr, persistent());
    assert!(!present, "no session existed");
    sub.subscribe_granted("s/t", QoS::AtLeastOnce);
    sub.disconnect();

    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "pub"));
    let mut watch = observer(broker.addr, 0, "s/t");
    publisher.publish("s/t", "offline-qos0", QoS::AtMostOnce, false);
    publisher.publish("s/t", "offline-qos1", QoS::AtLeastOnce, false);
    // Both have reached the session's shard while it had no connection.
    watch.saw("offline-qos1");

    let (mut sub, present) = Peer::connect_with(broker.addr, persistent());
    assert!(present, "[MQTT-3.2.2-2] session present");
    // QoS 0 published while offline is not kept by default; the QoS 1 one is, and comes first.
    let p = sub.next_publish();
    assert_eq!((helpers::text(&p), p.qos), ("offline-qos1".into(), QoS::AtLeastOnce));
    sub.ack(&p);
    // The subscription still works live.
    publisher.publish("s/t", "live", QoS::AtLeastOnce, false);
    let p = sub.next_publish();
    assert_eq!(helpers::text(&p), "live");
    sub.ack(&p);
    sub.disconnect();

    // A clean session discards the old one: no Session Present, no subscription.
    let (mut sub, present) =
        Peer::connect_with(broker.addr, connect_packet(ProtocolVersion::V311, &id, true));
    assert!(!present, "[MQTT-3.2.2-1] clean session: session present 0");
    sub.subscribe_granted("s/marker", QoS::AtMostOnce);
    publisher.publish("s/t", "old subscription", QoS::AtLeastOnce, false);
    publisher.publish("s/marker", "end", QoS::AtLeastOnce, false);
    sub.expect_marker_first("s/marker", "the old subscription is gone");
}

#[test]
fn v5_session_expiry_interval_keeps_then_ends_the_session() {
    let broker = TestBroker::start();
    let id = client_id_on(1, "exp");
    let (mut sub, present) = Peer::connect_with(broker.addr, connect_v5(&id, true, Some(2)));
    assert!(!present);
    sub.subscribe_granted("e/t", QoS::AtLeastOnce);
    sub.disconnect();

    let mut publisher = Peer::v3(broker.addr, &client_id_on(0, "pub"));
    let mut watch = observer(broker.addr, 1, "e/t");
    publisher.publish("e/t", "while away", QoS::AtLeastOnce, false);
    watch.saw("while away");

    // Back within the interval: the session and its message are there.
    let (mut sub, present) = Peer::connect_with(broker.addr, connect_v5(&id, false, Some(2)));
    assert!(present, "reconnected within the Session Expiry Interval");
    let p = sub.next_publish();
    assert_eq!(helpers::text(&p), "while away");
    sub.ack(&p);
    sub.disconnect();
    let left = Instant::now();

    // The interval is the point of the test, so this waits on time: 2 s, plus a second of
    // grace for an expiry timer that ticks once a second. A reconnect cannot be used to
    // poll, since one that finds the session resumes it and restarts the interval.
    while left.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut sub, present) = Peer::connect_with(broker.addr, connect_v5(&id, false, Some(2)));
    assert!(!present, "the session expired 2 s after the disconnect");
    sub.subscribe_granted("e/marker", QoS::AtMostOnce);
    publisher.publish("e/t", "after expiry", QoS::AtLeastOnce, false);
    publisher.publish("e/marker", "end", QoS::AtLeastOnce, false);
    sub.expect_marker_first("e/marker", "the expired session's subscription is gone");
}

#[test]
fn v5_session_expiry_zero_ends_the_session_at_disconnect() {
    let broker = TestBroker::start();
    let id = client_id_on(1, "zero");
    // Clean Start 0 but no Session Expiry Interval: the session ends with the connection.
    let (mut sub, present) = Peer::connect_with(broker.addr, connect_v5(&id, false, None));
    assert!(!present);
    sub.subscribe_granted("z/t", QoS::AtLeastOnce);
    sub.disconnect();
    let (mut sub, present) = Peer::connect_with(broker.addr, connect_v5(&id, false, None));
    assert!(!present, "expiry 0: nothing outlived the disconnect");
    let mut publisher = Peer::v3(broker.addr, &client_id_on(0, "pub"));
    sub.subscribe_granted("z/marker", QoS::AtMostOnce);
    publisher.publish("z/t", "old subscription", QoS::AtLeastOnce, false);
    publisher.publish("z/marker", "end", QoS::AtLeastOnce, false);
    sub.expect_marker_first("z/marker", "no subscription survived");
}

#[test]
fn v5_disconnect_can_set_the_session_expiry_to_zero() {
    let broker = TestBroker::start();
    let id = client_id_on(0, "dexp");
    let (mut sub, _) = Peer::connect_with(broker.addr, connect_v5(&id, true, Some(60)));
    sub.subscribe_granted("d/t", QoS::AtLeastOnce);
    let rest = sub.disconnect_with(ReasonCode::Success, properties(vec![Property::SessionExpiryInterval(0)]));
    assert_eq!(rest, vec![], "a valid DISCONNECT gets no reply");
    let (_sub, present) = Peer::connect_with(broker.addr, connect_v5(&id, false, Some(60)));
    assert!(!present, "[MQTT-3.14.2.2.2] expiry 0 in DISCONNECT ended the session");

    // The other way round (0 at CONNECT, non-zero at DISCONNECT) is a Protocol Error and
    // keeps nothing.
    let id = client_id_on(0, "dexp-bad");
    let (sub, _) = Peer::connect_with(broker.addr, connect_v5(&id, false, None));
    let rest =
        sub.disconnect_with(ReasonCode::Success, properties(vec![Property::SessionExpiryInterval(60)]));
    assert!(
        rest.iter().all(|p| matches!(p, Packet::Disconnect(d) if d.reason == ReasonCode::ProtocolError)),
        "{rest:?}"
    );
    let (_sub, present) = Peer::connect_with(broker.addr, connect_v5(&id, false, None));
    assert!(!present, "expiry cannot be raised from 0 at DISCONNECT");
}

#[test]
fn takeover_with_clean_session_0_keeps_the_session() {
    let broker = TestBroker::start();
    let id = client_id_on(0, "take");
    let persistent = || connect_packet(ProtocolVersion::V311, &id, false);
    let (mut first, _) = Peer::connect_with(broker.addr, persistent());
    first.subscribe_granted("tk/t", QoS::AtLeastOnce);
    let (mut second, present) = Peer::connect_with(broker.addr, persistent());
    assert!(present, "the second connection continues the first one's session");
    // [MQTT-3.1.4-2]: the existing connection is closed (3.1.1 has no DISCONNECT to send).
    assert_eq!(first.until_closed(), vec![]);
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "pub"));
    publisher.publish("tk/t", "to the new connection", QoS::AtLeastOnce, false);
    let p = second.next_publish();
    assert_eq!((helpers::text(&p), p.qos), ("to the new connection".into(), QoS::AtLeastOnce));
    second.ack(&p);
}

#[test]
fn sessions_beyond_max_sessions_are_refused_until_one_ends() {
    let broker = TestBroker::start_with(|c| c.max_sessions = 2);
    // Both persistent sessions on shard 0: the bound is the broker's, not a share per shard
    // (a share would lock out every identifier shard 0 owns while shard 1 had room).
    let keepers = [client_id_on(0, "keeper-a"), client_id_on(0, "keeper-b")];
    for keeper in &keepers {
        let (first, _) =
            Peer::connect_with(broker.addr, connect_packet(ProtocolVersion::V311, keeper, false));
        first.disconnect();
    }
    for (version, shard) in [(ProtocolVersion::V5, 1), (ProtocolVersion::V311, 0)] {
        let (_, ack) =
            Peer::try_connect(broker.addr, connect_packet(version, &client_id_on(shard, "extra"), true));
        assert_eq!(
            ack.reason,
            if version == ProtocolVersion::V5 {
                ReasonCode::QuotaExceeded
            } else {
                ReasonCode::ServerUnavailable
            }
        );
    }
    // Its own client still gets in (the session is reused), and ending it makes room.
    let (again, present) =
        Peer::connect_with(broker.addr, connect_packet(ProtocolVersion::V311, &keepers[0], true));
    assert!(!present);
    again.disconnect();
    let (_extra, ack) =
        Peer::try_connect(broker.addr, connect_packet(ProtocolVersion::V5, &client_id_on(1, "extra"), true));
    assert_eq!(ack.reason, ReasonCode::Success);
}
