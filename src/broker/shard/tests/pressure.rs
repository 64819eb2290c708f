//! Back-pressure: a congested subscriber holds publishers back until it drains.

use super::*;
use crate::broker::shard::WillAction;
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
    assert!(!shard.take_pressure_hit());
    assert!(!shard.under_pressure(None));

    publish(&mut shard, 4);
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (4, 1));
    assert!(shard.take_pressure_hit());
    assert!(!shard.take_pressure_hit(), "taken once");
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
    assert!(!shard.take_pressure_hit());
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
        c.max_inflight = 1;
        c.max_queued_messages = 8;
    });
    let a = connect(&mut shard, "a", true, 0);
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtLeastOnce));
    for n in 0..12 {
        publish(&mut shard, n);
    }
    assert!(!shard.take_pressure_hit());
    assert!(!shard.under_pressure(None));
    // Drop oldest: the queue holds the last eight.
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (8, 1));
}
