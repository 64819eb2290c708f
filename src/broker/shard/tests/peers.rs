//! The mesh side: peers' interest, acknowledgements, outbox byte accounting.

use super::*;
use crate::broker::shard::handle_cross;

fn interest(from: usize, text: &str, add: bool, token: u64) -> CrossMsg {
    CrossMsg::Interest { from, filter: filter(text), add, token }
}

/// The topics of the `Publish` messages waiting for `peer`; panics on anything else.
fn forwarded(shard: &mut Shard, peer: usize) -> Vec<String> {
    take_outbox(shard, peer)
        .into_iter()
        .map(|m| match m {
            CrossMsg::Publish(message) => message.topic.as_str().to_string(),
            _ => panic!("not a Publish"),
        })
        .collect()
}

#[test]
fn a_peers_interest_forwards_matching_publishes_once() {
    let shard = shard_ref(shard_with(0, 2, |_| {}));
    assert!(handle_cross(&shard, interest(1, "a/#", true, 7)).is_none());
    let mut s = shard.borrow_mut();
    match &take_outbox(&mut s, 1)[..] {
        [CrossMsg::InterestAck { token: 7 }] => {}
        _ => panic!("an Interest with a token is acknowledged"),
    }
    drop(s);
    // A second, overlapping filter of the same peer; no token, no acknowledgement.
    handle_cross(&shard, interest(1, "a/+", true, 0));
    let mut s = shard.borrow_mut();
    assert!(s.peers.outbox[1].is_empty());

    let published = s.publish(None, message("a/b", QoS::AtMostOnce, "x"), None);
    assert!(published.matched, "a peer's subscriber is a match");
    assert_eq!(forwarded(&mut s, 1), ["a/b"], "once per peer, however many of its filters match");
    assert_eq!(s.stats.forwarded, 1);
    assert!(!s.publish(None, message("b/c", QoS::AtMostOnce, "x"), None).matched);
    assert!(s.peers.outbox[1].is_empty());
    drop(s);

    handle_cross(&shard, interest(1, "a/#", false, 0));
    let mut s = shard.borrow_mut();
    s.publish(None, message("a/b", QoS::AtMostOnce, "x"), None);
    assert_eq!(forwarded(&mut s, 1), ["a/b"], "a/+ still matches");
    drop(s);
    handle_cross(&shard, interest(1, "a/+", false, 0));
    let mut s = shard.borrow_mut();
    assert!(!s.publish(None, message("a/b", QoS::AtMostOnce, "x"), None).matched);
    assert!(s.peers.outbox[1].is_empty());
}

#[test]
fn a_forwarded_publish_is_delivered_to_local_subscribers() {
    let shard = shard_ref(shard_with(1, 2, |_| {}));
    let a = {
        let mut s = shard.borrow_mut();
        let a = connect(&mut s, "a", true, 0);
        s.subscribe(a.sid, filter("p/+"), sub(QoS::AtLeastOnce));
        take_outbox(&mut s, 0);
        a
    };
    handle_cross(&shard, CrossMsg::Publish(message("p/1", QoS::AtLeastOnce, "from 0")));
    assert_eq!(payloads(&a.conn), ["from 0"]);
    let s = shard.borrow();
    assert!(s.peers.outbox[0].is_empty(), "a forwarded publish is not forwarded again");
}

#[test]
fn interest_acks_complete_the_pending_announcement() {
    let shard = shard_ref(shard_with(0, 3, |_| {}));
    let (a, b, pending, token) = {
        let mut s = shard.borrow_mut();
        let a = connect(&mut s, "a", true, 0);
        let b = connect(&mut s, "b", true, 0);
        let pending = s.subscribe(a.sid, filter("t"), sub(QoS::AtLeastOnce)).0.unwrap();
        let token = match &take_outbox(&mut s, 1)[..] {
            [CrossMsg::Interest { token, add: true, .. }] => *token,
            _ => panic!("one Interest for peer 1"),
        };
        assert!(matches!(&take_outbox(&mut s, 2)[..], [CrossMsg::Interest { token: t, .. }] if *t == token));
        (a, b, pending, token)
    };
    assert_eq!(pending.remaining.get(), 2);
    handle_cross(&shard, CrossMsg::InterestAck { token: token + 1000 });
    assert_eq!(pending.remaining.get(), 2, "an unknown token changes nothing");
    handle_cross(&shard, CrossMsg::InterestAck { token });
    assert_eq!(pending.remaining.get(), 1);
    assert!(shard.borrow().peers.pending_acks.contains_key(&token));
    handle_cross(&shard, CrossMsg::InterestAck { token });
    assert_eq!(pending.remaining.get(), 0);
    assert!(!shard.borrow().peers.pending_acks.contains_key(&token));
    // A late duplicate is harmless.
    handle_cross(&shard, CrossMsg::InterestAck { token });
    assert_eq!(pending.remaining.get(), 0);
    // Now that every peer knows, a second subscriber waits for nothing.
    let mut s = shard.borrow_mut();
    assert!(s.subscribe(b.sid, filter("t"), sub(QoS::AtLeastOnce)).0.is_none());
    assert!(s.unsubscribe(a.sid, &filter("t")));
}

#[test]
fn peer_outbox_bytes_follow_message_sizes() {
    let mut shard = shard_with(0, 2, |_| {});
    assert_eq!(shard.peers.bytes, [0, 0]);
    let msg = CrossMsg::Publish(message("x", QoS::AtMostOnce, "payload"));
    let size = msg.size();
    assert!(size > "payload".len());
    shard.send_to(1, msg);
    assert_eq!(shard.peers.bytes, [0, size]);
    let small = CrossMsg::InterestAck { token: 1 };
    let small_size = small.size();
    shard.send_to(1, small);
    assert_eq!(shard.peers.bytes[1], size + small_size);

    // What routing queues is counted the same way.
    let shared = shard_ref(shard);
    handle_cross(&shared, interest(1, "big/#", true, 0));
    let mut shard = shared.borrow_mut();
    let payload = "p".repeat(10_000);
    shard.publish(None, message("big/1", QoS::AtLeastOnce, &payload), None);
    let sum: usize = shard.peers.outbox[1].iter().map(CrossMsg::size).sum();
    assert_eq!(shard.peers.bytes[1], sum);
    assert!(shard.peers.bytes[1] > 10_000);
    assert_eq!(shard.peers.bytes[0], 0);
    assert!(!shard.mesh_backlogged());
}
