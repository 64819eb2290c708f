//! Shared subscriptions on one shard: one member per message, redelivery when a member
//! leaves with messages unacknowledged.

use super::*;
use crate::broker::shard::WillAction;

/// Two connected members of `$share/g/t`, a and b, at QoS 1; a's session outlives its
/// connection by `expiry_a` seconds.
fn setup(expiry_a: u32) -> (Shard, Client, Client) {
    let mut shard = shard();
    let a = connect(&mut shard, "a", true, expiry_a);
    let b = connect(&mut shard, "b", true, 0);
    join(&mut shard, a.sid, "$share/g/t", QoS::AtLeastOnce);
    join(&mut shard, b.sid, "$share/g/t", QoS::AtLeastOnce);
    assert_eq!(relaxed(&shard.global.subscriptions), 2);
    (shard, a, b)
}

#[test]
fn each_message_goes_to_exactly_one_member() {
    let (mut shard, a, b) = setup(0);
    for n in 0..6 {
        let published = shard.publish(None, message("t", QoS::AtLeastOnce, &format!("m{n}")), None);
        assert!(published.matched);
    }
    let (got_a, got_b) = (payloads(&a.conn), payloads(&b.conn));
    assert!(!got_a.is_empty() && !got_b.is_empty(), "both members get work: {got_a:?} {got_b:?}");
    let mut all: Vec<String> = got_a.iter().chain(&got_b).cloned().collect();
    all.sort();
    assert_eq!(all, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    // Not a match for the plain topic filter machinery: nobody else subscribes.
    assert_eq!(shard.router.subscriptions.subscriber_count(&filter("t")), 0);
}

#[test]
fn a_shared_and_a_plain_subscription_each_get_a_copy() {
    let (mut shard, a, b) = setup(0);
    let c = connect(&mut shard, "c", true, 0);
    shard.subscribe(c.sid, filter("t"), sub(QoS::AtLeastOnce));
    shard.publish(None, message("t", QoS::AtLeastOnce, "x"), None);
    assert_eq!(payloads(&a.conn).len() + payloads(&b.conn).len(), 1);
    assert_eq!(payloads(&c.conn), ["x"]);
}

#[test]
fn an_unacknowledged_message_goes_to_the_other_member_when_a_connection_ends() {
    for expiry_a in [0, 60] {
        let (mut shard, a, b) = setup(expiry_a);
        // Publish until a has one (round robin may start with either member).
        let mut n = 0;
        while payloads(&a.conn).is_empty() {
            assert!(n < 4, "a never got a message");
            shard.publish(None, message("t", QoS::AtLeastOnce, &format!("m{n}")), None);
            n += 1;
        }
        let given = payloads(&a.conn)[0].clone();
        assert!(!payloads(&b.conn).contains(&given));
        shard.disconnected(&a.conn, WillAction::Publish);
        assert!(payloads(&b.conn).contains(&given), "expiry {expiry_a}: {given} redelivered to b");
        if let Some(session) = shard.sessions.get(&a.sid) {
            assert_eq!(session.backlog(), (0, 0), "a keeps no copy");
        }
        // From now on everything goes to b.
        let before = payloads(&b.conn).len();
        shard.publish(None, message("t", QoS::AtLeastOnce, "after"), None);
        assert_eq!(payloads(&b.conn).len(), before + 1);
    }
}

#[test]
fn an_acknowledged_message_is_not_redelivered() {
    let (mut shard, a, b) = setup(0);
    shard.publish(None, message("t", QoS::AtLeastOnce, "m0"), None);
    shard.publish(None, message("t", QoS::AtLeastOnce, "m1"), None);
    let sent = publishes(&a.conn);
    assert_eq!(sent.len(), 1);
    shard.on_puback(a.sid, sent[0].packet_id.unwrap());
    let before = payloads(&b.conn);
    shard.disconnected(&a.conn, WillAction::Discard);
    assert_eq!(payloads(&b.conn), before);
}

#[test]
fn the_last_member_leaving_forgets_the_group() {
    let (mut shard, a, b) = setup(0);
    assert!(shard.unsubscribe(a.sid, &filter("$share/g/t")));
    assert!(shard.unsubscribe(b.sid, &filter("$share/g/t")));
    assert_eq!(relaxed(&shard.global.subscriptions), 0);
    assert!(shard.shared.tree.is_empty());
    assert!(!shard.publish(None, message("t", QoS::AtLeastOnce, "x"), None).matched);
}

#[test]
fn a_message_left_by_an_ending_member_goes_to_an_offline_persistent_one() {
    let mut shard = shard();
    let b = connect(&mut shard, "b", true, 60);
    join(&mut shard, b.sid, "$share/g/t", QoS::AtLeastOnce);
    shard.disconnected(&b.conn, WillAction::Discard);
    let a = connect(&mut shard, "a", true, 0);
    join(&mut shard, a.sid, "$share/g/t", QoS::AtLeastOnce);
    shard.publish(None, message("t", QoS::AtLeastOnce, "m"), None);
    assert_eq!(payloads(&a.conn), ["m"], "the connected member gets it first");
    // a ends without acknowledging: its session ends with it (expiry 0).
    shard.disconnected(&a.conn, WillAction::Discard);
    assert_eq!(shard.sessions.get(&b.sid).map(|s| s.backlog()), Some((1, 0)), "b keeps it offline");
    let b = connect(&mut shard, "b", false, 60);
    assert_eq!(payloads(&b.conn), ["m"]);
}

#[test]
fn an_expiring_member_hands_its_queued_shared_messages_on() {
    let mut shard = shard();
    let a = connect(&mut shard, "a", true, 1);
    join(&mut shard, a.sid, "$share/g/t", QoS::AtLeastOnce);
    shard.disconnected(&a.conn, WillAction::Discard);
    shard.publish(None, message("t", QoS::AtLeastOnce, "m"), None);
    assert_eq!(shard.sessions.get(&a.sid).map(|s| s.backlog()), Some((1, 0)), "queued with the only member");
    let b = connect(&mut shard, "b", true, 0);
    join(&mut shard, b.sid, "$share/g/t", QoS::AtLeastOnce);
    shard.end_session(a.sid);
    assert_eq!(payloads(&b.conn), ["m"], "not lost with the expired session");
}

#[test]
fn a_congested_member_is_passed_over_while_another_has_room() {
    let (mut shard, a, b) = small_queues();
    // b acknowledges everything at once, a nothing: a's queue congests (four queued).
    let mut acked_b = 0;
    let mut publish = |shard: &mut Shard, payload: String| {
        shard.publish(None, message("t", QoS::AtLeastOnce, &payload), None);
        let sent = publishes(&b.conn);
        for p in &sent[acked_b..] {
            shard.on_puback(b.sid, p.packet_id.unwrap());
        }
        acked_b = sent.len();
    };
    let mut n = 0;
    while !shard.pressure.congested.contains(&a.sid) {
        publish(&mut shard, n.to_string());
        n += 1;
        assert!(n < 100, "a never congested");
    }
    let owed_a = |shard: &Shard| payloads(&a.conn).len() + shard.sessions.get(&a.sid).unwrap().backlog().0;
    let before = owed_a(&shard);
    for m in 0..20 {
        publish(&mut shard, format!("later{m}"));
    }
    assert_eq!(owed_a(&shard), before, "nothing more for the congested member");
    assert_eq!(payloads(&b.conn).iter().filter(|p| p.starts_with("later")).count(), 20);
}

#[test]
fn a_group_whose_every_member_is_full_holds_the_publisher() {
    let (mut shard, a, b) = small_queues();
    let next = message("t", QoS::AtLeastOnce, "next");
    let mut n = 0;
    while !shard.would_overflow(None, &next) {
        shard.publish(None, message("t", QoS::AtLeastOnce, &n.to_string()), None);
        n += 1;
        assert!(n < 100, "never held");
    }
    // Held once both windows and both queues are full, nothing dropped.
    assert_eq!(n, 18);
    for client in [&a, &b] {
        let session = shard.sessions.get(&client.sid).unwrap();
        assert_eq!((session.backlog(), session.dropped), ((8, 1), 0));
    }
    // A publisher that is itself a member is never held for the group.
    assert!(!shard.would_overflow(Some(a.sid), &next));
    // Room in one member's queue: the next message goes there.
    let packet_id = publishes(&a.conn)[0].packet_id.unwrap();
    shard.on_puback(a.sid, packet_id);
    assert!(!shard.would_overflow(None, &next));
}

/// Two connected members of `$share/g/t` at QoS 1, each with a window of one and a queue
/// of eight (congested at four).
fn small_queues() -> (Shard, Client, Client) {
    let mut shard = shard_with(0, 1, |c| {
        c.max_inflight = 1;
        c.max_queued_messages = 8;
    });
    let a = connect(&mut shard, "a", true, 0);
    let b = connect(&mut shard, "b", true, 0);
    join(&mut shard, a.sid, "$share/g/t", QoS::AtLeastOnce);
    join(&mut shard, b.sid, "$share/g/t", QoS::AtLeastOnce);
    (shard, a, b)
}
