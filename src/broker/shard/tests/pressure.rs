//! Back-pressure: a congested subscriber holds publishers back until it drains.

use std::time::{Duration, Instant};

use super::*;
use crate::broker::shard::WillAction;
use crate::codec::ReasonCode;
use crate::config::QueueFullPolicy;

/// A shard under `--queue-full-policy backpressure` with one message in flight and eight
/// queued per session (congested at four queued, relieved at two), and a QoS 1 subscriber
/// to `t`.
fn setup() -> (Shard, Client) {
    let mut shard = shard_with(0, 1, |c| {
        c.queue_full_policy = QueueFullPolicy::Backpressure;
        c.max_inflight = 1;
        c.max_queued_messages = 8;
    });
    let a = connect(&mut shard, "a", true, 0);
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtLeastOnce));
    (shard, a)
}

fn publish(shard: &mut Shard, n: usize) {
    shard.publish(None, message("t", QoS::AtLeastOnce, &n.to_string()), None);
}

/// Acknowledges the oldest PUBLISH the client has not acknowledged yet.
fn ack_next(shard: &mut Shard, client: &Client, acked: &mut usize) {
    let sent = publishes(&client.conn);
    let packet_id = sent[*acked].packet_id.unwrap();
    *acked += 1;
    shard.on_puback(client.sid, packet_id);
}

#[test]
fn a_queue_past_half_its_bound_holds_publishers_until_it_drains() {
    let (mut shard, a) = setup();
    let other = connect(&mut shard, "other", true, 0);
    // One in flight, three queued: not yet half of eight.
    for n in 0..4 {
        publish(&mut shard, n);
    }
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (3, 1));
    assert!(shard.take_pressure_hit().is_empty());
    assert!(!shard.under_pressure(None));

    publish(&mut shard, 4);
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (4, 1));
    assert_eq!(shard.take_pressure_hit(), [a.sid], "whom the publisher waits for");
    assert!(shard.take_pressure_hit().is_empty(), "taken once");
    assert!(shard.under_pressure(None));
    assert!(!shard.under_pressure(Some(a.sid)), "the congested client itself is not held back");
    assert!(shard.under_pressure(Some(other.sid)));

    // Draining to three queued is not enough; to two (a quarter) is.
    let mut acked = 0;
    ack_next(&mut shard, &a, &mut acked);
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (3, 1));
    assert!(shard.under_pressure(None));
    ack_next(&mut shard, &a, &mut acked);
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (2, 1));
    assert!(!shard.under_pressure(None));
    assert!(shard.take_pressure_hit().is_empty());
    assert_eq!(payloads(&a.conn), ["0", "1", "2"]);
}

#[test]
fn a_congested_subscriber_that_goes_away_stops_holding_publishers() {
    let (mut shard, a) = setup();
    for n in 0..5 {
        publish(&mut shard, n);
    }
    assert!(shard.under_pressure(None));
    shard.disconnected(&a.conn, WillAction::Publish);
    assert!(!shard.under_pressure(None));
}

#[test]
fn without_backpressure_a_full_queue_holds_nobody() {
    let mut shard = shard_with(0, 1, |c| {
        c.queue_full_policy = QueueFullPolicy::DropOldest;
        c.max_inflight = 1;
        c.max_queued_messages = 8;
    });
    let a = connect(&mut shard, "a", true, 0);
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtLeastOnce));
    for n in 0..12 {
        publish(&mut shard, n);
    }
    assert!(shard.take_pressure_hit().is_empty());
    assert!(!shard.under_pressure(None));
    // Drop oldest: the queue holds the last eight.
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (8, 1));
}

#[test]
fn backpressure_is_the_default_and_holds_what_would_not_fit() {
    // Default flags: a queue of 1,000, a window of 32.
    let mut shard = shard();
    let a = connect(&mut shard, "a", true, 0);
    let other = connect(&mut shard, "other", true, 0);
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtLeastOnce));
    let (window, bound) = (shard.config.max_inflight, shard.config.max_queued_messages);
    let next = message("t", QoS::AtLeastOnce, "next");
    // A publisher (as its reader does) routes only what fits.
    let mut n = 0;
    while !shard.would_overflow(Some(other.sid), &next) {
        publish(&mut shard, n);
        n += 1;
        assert!(n <= window + bound, "the queue never reported full");
    }
    assert_eq!(n, window + bound, "held once the window and the whole queue are used");
    let session = shard.sessions.get(&a.sid).unwrap();
    assert_eq!(session.backlog(), (bound, window));
    assert_eq!(session.dropped, 0);
    assert!(shard.under_pressure(Some(other.sid)));
    assert!(!shard.would_overflow(Some(a.sid), &next), "its own client is never held for it");
    assert!(!shard.would_overflow(None, &message("elsewhere", QoS::AtLeastOnce, "x")), "only its topics");
    // Everything arrives, in order, as the client acknowledges; the hold ends.
    let mut acked = 0;
    while acked < n {
        ack_next(&mut shard, &a, &mut acked);
    }
    let want: Vec<String> = (0..n).map(|n| n.to_string()).collect();
    assert_eq!(payloads(&a.conn), want);
    assert!(!shard.under_pressure(None));
    assert!(!shard.would_overflow(None, &next));
}

/// The setup's shard with `--slow-consumer-timeout 30`, its subscriber congested.
fn congested(persistent: bool) -> (Shard, Client, Instant) {
    let mut shard = shard_with(0, 1, |c| {
        c.max_inflight = 1;
        c.max_queued_messages = 8;
        c.slow_consumer_timeout = Duration::from_secs(30);
    });
    let a = connect(&mut shard, "a", true, if persistent { 600 } else { 0 });
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtLeastOnce));
    for n in 0..5 {
        publish(&mut shard, n);
    }
    assert!(shard.under_pressure(None));
    let start = Instant::now();
    shard.tick(start);
    (shard, a, start)
}

fn disconnect_reason(conn: &ConnHandle) -> Option<ReasonCode> {
    packets(conn).into_iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason),
        _ => None,
    })
}

#[test]
fn a_clean_slow_consumer_is_disconnected_with_quota_exceeded() {
    let (mut shard, a, start) = congested(false);
    shard.tick(start + Duration::from_secs(29));
    assert!(shard.under_pressure(None), "not yet");
    assert!(!a.conn.closing.get());
    shard.tick(start + Duration::from_secs(30));
    assert!(a.conn.closing.get());
    assert_eq!(disconnect_reason(&a.conn), Some(ReasonCode::QuotaExceeded));
    assert!(!shard.under_pressure(None), "its publishers go on");
    assert_eq!(shard.stats.slow_consumers, 1);
}

#[test]
fn a_slow_consumer_that_acknowledges_in_time_is_left_alone() {
    let (mut shard, a, start) = congested(false);
    let mut acked = 0;
    ack_next(&mut shard, &a, &mut acked);
    shard.tick(start + Duration::from_secs(20));
    shard.tick(start + Duration::from_secs(49));
    assert!(!a.conn.closing.get(), "an acknowledgement seen 20 s in restarts the clock");
    shard.tick(start + Duration::from_secs(50));
    assert!(a.conn.closing.get());
}

#[test]
fn a_persistent_slow_consumer_stops_holding_publishers_until_it_acknowledges() {
    let (mut shard, a, start) = congested(true);
    shard.tick(start + Duration::from_secs(30));
    assert!(!a.conn.closing.get(), "a persistent session stays connected");
    assert!(!shard.under_pressure(None));
    assert!(shard.sessions.get(&a.sid).unwrap().slow);
    // It acknowledges again: it holds publishers once more.
    let mut acked = 0;
    ack_next(&mut shard, &a, &mut acked);
    shard.tick(start + Duration::from_secs(31));
    assert!(!shard.sessions.get(&a.sid).unwrap().slow);
    publish(&mut shard, 5);
    assert!(shard.under_pressure(None));
}

/// A QoS 0 subscriber behind an outbox of 64 bytes and a queue of eight, and another
/// client (a publisher).
fn qos0_behind_full_outbox() -> (Shard, Client, Client) {
    let mut shard = shard_with(0, 1, |c| {
        c.write_buffer = 64;
        c.max_queued_messages = 8;
        c.slow_consumer_timeout = Duration::from_secs(30);
    });
    let a = connect(&mut shard, "a", true, 0);
    let other = connect(&mut shard, "other", true, 0);
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtMostOnce));
    (shard, a, other)
}

/// Publishes QoS 0 to `t` as a publisher's reader does, while it fits: how many.
fn publish_qos0_while_it_fits(shard: &mut Shard, from: SessionId) -> usize {
    let next = message("t", QoS::AtMostOnce, "next");
    let mut n = 0;
    while !shard.would_overflow(Some(from), &next) {
        shard.publish(Some(from), message("t", QoS::AtMostOnce, &n.to_string()), None);
        n += 1;
        assert!(n < 1_000, "QoS 0 never held the publisher");
    }
    n
}

/// Takes what the connection's writer would write, then lets the shard refill its outbox.
fn drain(shard: &mut Shard, client: &Client, got: &mut Vec<String>) {
    got.extend(payloads(&client.conn));
    client.conn.outbox.borrow_mut().clear();
    shard.on_writable(client.sid);
}

#[test]
fn qos0_waits_for_a_full_outbox_and_holds_publishers_by_default() {
    let (mut shard, a, other) = qos0_behind_full_outbox();
    let n = publish_qos0_while_it_fits(&mut shard, other.sid);
    let session = shard.sessions.get(&a.sid).unwrap();
    assert_eq!(session.backlog().0, 8, "the outbox full, the queue full");
    assert_eq!(session.dropped, 0);
    assert!(shard.under_pressure(Some(other.sid)));
    // Everything arrives, in order, as the outbox drains; the hold ends.
    let mut got = Vec::new();
    while got.len() < n {
        drain(&mut shard, &a, &mut got);
        assert!(got.len() <= n);
    }
    let want: Vec<String> = (0..n).map(|n| n.to_string()).collect();
    assert_eq!(got, want);
    assert!(!shard.under_pressure(None));
}

#[test]
fn with_qos0_overflow_drop_a_full_outbox_drops_and_holds_nobody() {
    let mut shard = shard_with(0, 1, |c| {
        c.write_buffer = 64;
        c.max_queued_messages = 8;
        c.qos0_overflow = crate::config::Qos0Overflow::Drop;
    });
    let a = connect(&mut shard, "a", true, 0);
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtMostOnce));
    for n in 0..50 {
        shard.publish(None, message("t", QoS::AtMostOnce, &n.to_string()), None);
    }
    assert!(!shard.under_pressure(None));
    let session = shard.sessions.get(&a.sid).unwrap();
    assert_eq!(session.backlog().0, 0);
    assert_eq!(session.dropped as usize, 50 - payloads(&a.conn).len());
}

#[test]
fn a_qos0_subscriber_taking_queued_messages_is_not_a_slow_consumer() {
    let (mut shard, a, other) = qos0_behind_full_outbox();
    publish_qos0_while_it_fits(&mut shard, other.sid);
    let start = Instant::now();
    shard.tick(start);
    // It takes some 20 s in: no acknowledgement (QoS 0 has none), but progress.
    let mut got = Vec::new();
    drain(&mut shard, &a, &mut got);
    publish_qos0_while_it_fits(&mut shard, other.sid);
    shard.tick(start + Duration::from_secs(20));
    shard.tick(start + Duration::from_secs(49));
    assert!(!a.conn.closing.get(), "taking queued messages 20 s in restarts the clock");
    shard.tick(start + Duration::from_secs(50));
    assert!(a.conn.closing.get(), "then nothing for 30 s: it pays");
    assert_eq!(disconnect_reason(&a.conn), Some(ReasonCode::QuotaExceeded));
    assert!(!shard.under_pressure(None));
}
