//! The session table and its lifecycle: connect, takeover, resume, wills, expiry, bounds.

use super::*;
use crate::broker::shard::WillAction;
use crate::codec::ReasonCode;

#[test]
fn connect_creates_an_attached_session() {
    let mut shard = shard();
    let a = connect(&mut shard, "a", true, 0);
    assert!(!a.present);
    assert_eq!(shard.sessions.len(), 1);
    assert_eq!(shard.sessions.of_client("a"), Some(a.sid));
    assert_eq!(a.conn.session.get(), a.sid);
    assert!(shard.conns.contains_key(&a.conn.id));
    assert_eq!(shard.connection_count(), 1);
    assert!(shard.sessions.get(&a.sid).unwrap().is_attached());
    let entry = shard.sessions.entry(&a.sid).unwrap();
    assert!(entry.conn.as_ref().is_some_and(|c| Rc::ptr_eq(c, &a.conn)));
    assert_eq!(relaxed(&shard.global.sessions), 1);
}

#[test]
fn a_second_connect_takes_the_session_over() {
    let mut shard = shard();
    let old = connect(&mut shard, "a", false, 60);
    shard.subscribe(old.sid, filter("t"), sub(QoS::AtLeastOnce));
    let new = connect(&mut shard, "a", false, 60);
    assert!(new.present);
    assert_eq!(new.sid, old.sid);
    assert!(old.conn.closing.get());
    let disconnect = packets(&old.conn).into_iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason),
        _ => None,
    });
    assert_eq!(disconnect, Some(ReasonCode::SessionTakenOver));
    assert!(!new.conn.closing.get());
    assert!(!shard.conns.contains_key(&old.conn.id));
    assert!(shard.conns.contains_key(&new.conn.id));
    assert_eq!(shard.sessions.len(), 1);
    assert_eq!(relaxed(&shard.global.sessions), 1);
    assert!(shard.sessions.get(&new.sid).unwrap().subscriptions.contains_key(&filter("t")));

    // The old connection's end, reported later, no longer concerns the session.
    shard.disconnected(&old.conn, WillAction::Publish);
    let session = shard.sessions.get(&new.sid).unwrap();
    assert!(session.is_attached());
    assert!(shard.sessions.entry(&new.sid).unwrap().conn.as_ref().is_some_and(|c| Rc::ptr_eq(c, &new.conn)));
}

#[test]
fn a_taken_over_v311_connection_closes_without_a_disconnect_packet() {
    let mut shard = shard();
    let first = connect_packet("a", ProtocolVersion::V311, true, 0, None);
    let old = connect_with(&mut shard, first.clone());
    let new = connect_with(&mut shard, first);
    assert!(old.conn.closing.get());
    assert!(packets(&old.conn).is_empty(), "3.1.1 has no server DISCONNECT");
    // Clean start: the old session ended and a new one replaced it.
    assert!(!new.present);
    assert_ne!(new.sid, old.sid);
    assert!(shard.sessions.get(&old.sid).is_none());
    assert_eq!(relaxed(&shard.global.sessions), 1);
}

#[test]
fn resume_keeps_the_session_and_clean_start_replaces_it() {
    let mut shard = shard();
    let first = connect(&mut shard, "a", false, 60);
    shard.subscribe(first.sid, filter("t/#"), sub(QoS::AtLeastOnce));
    shard.disconnected(&first.conn, WillAction::Discard);
    let session = shard.sessions.get(&first.sid).expect("a session with an expiry outlives its connection");
    assert!(!session.is_attached());
    assert!(session.expires_at.is_some());

    let resume = connect_packet("a", ProtocolVersion::V5, false, 60, None);
    assert!(shard.session_present(&resume));
    let resumed = connect_with(&mut shard, resume);
    assert!(resumed.present);
    assert_eq!(resumed.sid, first.sid);
    let session = shard.sessions.get(&resumed.sid).unwrap();
    assert!(session.subscriptions.contains_key(&filter("t/#")));
    assert!(session.expires_at.is_none(), "attached sessions do not expire");

    shard.disconnected(&resumed.conn, WillAction::Discard);
    let clean = connect_packet("a", ProtocolVersion::V5, true, 60, None);
    assert!(!shard.session_present(&clean));
    let fresh = connect_with(&mut shard, clean);
    assert!(!fresh.present);
    assert_ne!(fresh.sid, first.sid);
    assert!(shard.sessions.get(&first.sid).is_none());
    assert!(shard.sessions.get(&fresh.sid).unwrap().subscriptions.is_empty());
    assert_eq!(shard.router.subscriptions.subscriber_count(&filter("t/#")), 0);
    assert_eq!(relaxed(&shard.global.sessions), 1);
    assert_eq!(relaxed(&shard.global.subscriptions), 0);
}

/// A subscriber to `will/a` and a client `w` whose will goes there, its session expiring
/// `expiry` seconds after its connection.
fn will_setup(expiry: u32) -> (Shard, Client, Client) {
    let mut shard = shard();
    let watcher = connect(&mut shard, "watcher", true, 0);
    shard.subscribe(watcher.sid, filter("will/+"), sub(QoS::AtMostOnce));
    let w = connect_with(
        &mut shard,
        connect_packet("w", ProtocolVersion::V5, true, expiry, Some(will("will/a", "gone"))),
    );
    assert!(shard.sessions.get(&w.sid).unwrap().will.is_some());
    assert!(publishes(&watcher.conn).is_empty());
    (shard, watcher, w)
}

#[test]
fn a_will_is_published_when_the_connection_ends_abnormally() {
    for expiry in [0, 60] {
        let (mut shard, watcher, w) = will_setup(expiry);
        shard.disconnected(&w.conn, WillAction::Publish);
        let got = publishes(&watcher.conn);
        assert_eq!(got.len(), 1, "expiry {expiry}");
        assert_eq!(got[0].topic.as_str(), "will/a");
        assert_eq!(&got[0].payload[..], b"gone");
        // Published once: nothing is left to publish at expiry.
        if let Some(session) = shard.sessions.get(&w.sid) {
            assert!(session.will.is_none() && session.will_at.is_none());
        }
    }
}

#[test]
fn a_will_is_discarded_on_normal_disconnect() {
    for expiry in [0, 60] {
        let (mut shard, watcher, w) = will_setup(expiry);
        shard.disconnected(&w.conn, WillAction::Discard);
        assert!(publishes(&watcher.conn).is_empty(), "expiry {expiry}");
        if let Some(session) = shard.sessions.get(&w.sid) {
            assert!(session.will.is_none());
        }
        // Nor does it come back when the session ends.
        shard.end_session(w.sid);
        assert!(publishes(&watcher.conn).is_empty(), "expiry {expiry}");
    }
}

#[test]
fn zero_expiry_ends_the_session_at_disconnect() {
    let mut shard = shard();
    let a = connect(&mut shard, "a", false, 0);
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtLeastOnce));
    assert_eq!(relaxed(&shard.global.subscriptions), 1);
    shard.disconnected(&a.conn, WillAction::Discard);
    assert!(shard.sessions.get(&a.sid).is_none());
    assert_eq!(shard.sessions.of_client("a"), None);
    assert!(shard.conns.is_empty());
    assert_eq!(relaxed(&shard.global.sessions), 0);
    assert_eq!(relaxed(&shard.global.subscriptions), 0);
    assert_eq!(shard.router.subscriptions.subscriber_count(&filter("t")), 0);
    // A publish finds nobody.
    assert!(!shard.publish(None, message("t", QoS::AtLeastOnce, "x"), None).matched);
}

#[test]
fn max_sessions_bounds_new_sessions_only() {
    let mut shard = shard_with(0, 1, |c| c.max_sessions = 1);
    let a = connect(&mut shard, "a", true, 0);
    let b = connect_packet("b", ProtocolVersion::V5, true, 0, None);
    assert!(!shard.has_room_for_session(&b));
    // A client that has a session reuses or replaces it.
    assert!(shard.has_room_for_session(&connect_packet("a", ProtocolVersion::V5, true, 0, None)));
    shard.disconnected(&a.conn, WillAction::Discard);
    assert!(shard.has_room_for_session(&b));
}

#[test]
fn a_takeover_publishes_the_old_connections_will() {
    let (mut shard, watcher, w) = will_setup(60);
    let new = connect(&mut shard, "w", false, 60);
    assert!(new.present);
    assert_eq!(payloads(&watcher.conn), ["gone"]);
    assert!(shard.sessions.get(&w.sid).unwrap().will.is_none(), "the new CONNECT had no will");
    shard.disconnected(&new.conn, WillAction::Publish);
    assert_eq!(payloads(&watcher.conn), ["gone"], "published once");
}

#[test]
fn a_delayed_will_waits_for_its_delay_or_the_end_of_the_session() {
    let mut shard = shard();
    let watcher = connect(&mut shard, "watcher", true, 0);
    shard.subscribe(watcher.sid, filter("will/+"), sub(QoS::AtMostOnce));
    let mut delayed = will("will/a", "gone");
    delayed.properties.push(Property::WillDelayInterval(30));
    let packet = connect_packet("w", ProtocolVersion::V5, false, 60, Some(delayed));
    let w = connect_with(&mut shard, packet.clone());
    shard.disconnected(&w.conn, WillAction::Publish);
    assert!(publishes(&watcher.conn).is_empty(), "not due yet");
    assert!(shard.sessions.get(&w.sid).unwrap().will_at.is_some());
    // Back within the delay: the will is not published (MQTT-3.1.3-9).
    let back = connect_with(&mut shard, packet);
    assert!(back.present);
    assert!(shard.sessions.get(&w.sid).unwrap().will_at.is_none());
    assert!(publishes(&watcher.conn).is_empty());
    // Gone again, and the session ends before the delay: published then, once.
    shard.disconnected(&back.conn, WillAction::Publish);
    assert!(publishes(&watcher.conn).is_empty());
    shard.end_session(w.sid);
    assert_eq!(payloads(&watcher.conn), ["gone"]);
    assert!(shard.sessions.get(&w.sid).is_none());
}

#[test]
fn a_resumed_session_resends_what_was_in_flight_with_dup() {
    let mut shard = shard();
    let first = connect(&mut shard, "a", false, 60);
    shard.subscribe(first.sid, filter("t"), sub(QoS::AtLeastOnce));
    shard.publish(None, message("t", QoS::AtLeastOnce, "m"), None);
    let sent = publishes(&first.conn);
    assert_eq!(sent.len(), 1);
    assert!(!sent[0].dup);
    let back = connect(&mut shard, "a", false, 60);
    let resent = publishes(&back.conn);
    assert_eq!(resent.len(), 1);
    assert!(resent[0].dup);
    assert_eq!(resent[0].packet_id, sent[0].packet_id);
    assert_eq!(&resent[0].payload[..], b"m");
    shard.on_puback(back.sid, resent[0].packet_id.unwrap());
    assert_eq!(shard.sessions.get(&back.sid).unwrap().backlog(), (0, 0));
}
