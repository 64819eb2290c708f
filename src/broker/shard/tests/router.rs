//! Routing: subscriptions, interest announced to peers, local delivery.

use super::*;
use crate::broker::session::RetainedCursor;
use crate::broker::shard::{handle_cross, WillAction};

#[test]
fn subscribe_and_unsubscribe_keep_the_counts() {
    let mut shard = shard();
    let a = connect(&mut shard, "a", true, 0);
    let b = connect(&mut shard, "b", true, 0);
    let (pending, existed) = shard.subscribe(a.sid, filter("x/+"), sub(QoS::AtLeastOnce));
    assert!(pending.is_none(), "one shard: nobody to wait for");
    assert!(!existed);
    assert_eq!(relaxed(&shard.global.subscriptions), 1);
    // Replacing a subscription counts it once.
    let (_, existed) = shard.subscribe(a.sid, filter("x/+"), sub(QoS::AtMostOnce));
    assert!(existed);
    assert_eq!(relaxed(&shard.global.subscriptions), 1);
    let held: Vec<_> =
        shard.sessions.get(&a.sid).unwrap().subscriptions.iter().map(|(f, s)| (f.clone(), *s)).collect();
    assert_eq!(held, vec![(filter("x/+"), sub(QoS::AtMostOnce))]);
    shard.subscribe(a.sid, filter("y"), sub(QoS::AtLeastOnce));
    shard.subscribe(b.sid, filter("x/+"), sub(QoS::AtLeastOnce));
    assert_eq!(relaxed(&shard.global.subscriptions), 3);
    assert_eq!(shard.router.subscriptions.subscriber_count(&filter("x/+")), 2);
    // A session that does not exist subscribes to nothing.
    let (pending, existed) = shard.subscribe(9999, filter("z"), sub(QoS::AtLeastOnce));
    assert!(pending.is_none() && !existed);
    assert_eq!(relaxed(&shard.global.subscriptions), 3);

    assert!(shard.unsubscribe(a.sid, &filter("x/+")));
    assert!(!shard.unsubscribe(a.sid, &filter("x/+")));
    assert!(!shard.unsubscribe(9999, &filter("y")));
    assert_eq!(relaxed(&shard.global.subscriptions), 2);
    let session = shard.sessions.get(&a.sid).unwrap();
    assert!(!session.subscriptions.contains_key(&filter("x/+")));
    assert!(session.subscriptions.contains_key(&filter("y")));
    assert_eq!(shard.router.subscriptions.subscriber_count(&filter("x/+")), 1);
    // Only b is left on x/+.
    shard.publish(None, message("x/1", QoS::AtMostOnce, "m"), None);
    assert!(publishes(&a.conn).is_empty());
    assert_eq!(payloads(&b.conn), ["m"]);
}

#[test]
fn subscription_room_respects_the_bounds() {
    let mut shard = shard_with(0, 1, |c| {
        c.max_subscriptions_per_client = 2;
        c.max_subscriptions = 3;
    });
    let a = connect(&mut shard, "a", true, 0);
    let b = connect(&mut shard, "b", true, 0);
    shard.subscribe(a.sid, filter("1"), sub(QoS::AtMostOnce));
    shard.subscribe(a.sid, filter("2"), sub(QoS::AtMostOnce));
    assert!(shard.subscription_room(a.sid, &filter("3")).is_err());
    assert!(shard.subscription_room(a.sid, &filter("2")).is_ok(), "a replacement always fits");
    shard.subscribe(b.sid, filter("1"), sub(QoS::AtMostOnce));
    assert!(shard.subscription_room(b.sid, &filter("2")).is_err(), "--max-subscriptions reached");
    shard.unsubscribe(a.sid, &filter("1"));
    assert!(shard.subscription_room(b.sid, &filter("2")).is_ok());
}

/// The `Interest` messages waiting for `peer`, as (filter, add, token).
fn interests(shard: &mut Shard, peer: usize) -> Vec<(String, bool, u64)> {
    take_outbox(shard, peer)
        .into_iter()
        .map(|m| match m {
            CrossMsg::Interest { from, filter, add, token } => {
                assert_eq!(from, shard.id);
                (filter.as_str().to_string(), add, token)
            }
            _ => panic!("not an Interest"),
        })
        .collect()
}

#[test]
fn peers_learn_of_the_first_subscriber_and_the_last_unsubscribe() {
    let mut shard = shard_with(0, 2, |_| {});
    let a = connect(&mut shard, "a", true, 0);
    let b = connect(&mut shard, "b", true, 0);
    assert!(shard.peers.outbox[1].is_empty());

    let (first, _) = shard.subscribe(a.sid, filter("t/#"), sub(QoS::AtLeastOnce));
    let first = first.expect("the first subscriber waits for the peer");
    assert_eq!(first.remaining.get(), 1);
    let sent = interests(&mut shard, 1);
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].0.as_str(), sent[0].1), ("t/#", true));
    assert_ne!(sent[0].2, 0, "the announcement asks for an acknowledgement");

    // Replacing the subscription is not a first one either.
    assert!(shard.subscribe(a.sid, filter("t/#"), sub(QoS::AtMostOnce)).1);
    assert!(shard.peers.outbox[1].is_empty());
    let (second, _) = shard.subscribe(b.sid, filter("t/#"), sub(QoS::AtLeastOnce));
    assert!(shard.peers.outbox[1].is_empty(), "a second subscriber is not announced");
    // Its SUBACK waits for the first one's announcement all the same.
    assert!(second.is_some_and(|p| Rc::ptr_eq(&p, &first)));

    assert!(shard.unsubscribe(a.sid, &filter("t/#")));
    assert!(shard.peers.outbox[1].is_empty());
    assert!(shard.unsubscribe(b.sid, &filter("t/#")));
    assert_eq!(interests(&mut shard, 1), [("t/#".to_string(), false, 0)]);
}

#[test]
fn a_session_ending_withdraws_its_interest() {
    let mut shard = shard_with(1, 2, |_| {});
    let a = connect(&mut shard, "a", true, 0);
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtLeastOnce));
    assert_eq!(interests(&mut shard, 0).len(), 1);
    shard.disconnected(&a.conn, WillAction::Discard);
    assert_eq!(interests(&mut shard, 0), [("t".to_string(), false, 0)]);
}

#[test]
fn a_qos1_publish_reaches_an_attached_subscriber() {
    let mut shard = shard();
    let a = connect(&mut shard, "a", true, 0);
    shard.subscribe(a.sid, filter("t/+"), sub(QoS::AtLeastOnce));
    let published = shard.publish(None, message("t/1", QoS::AtLeastOnce, "hello"), None);
    assert!(published.matched);
    assert_eq!(published.waits, 0);
    assert!(!published.failed);
    let got = publishes(&a.conn);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].topic.as_str(), "t/1");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert!(got[0].packet_id.is_some());
    assert_eq!(&got[0].payload[..], b"hello");
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (0, 1));
    assert_eq!(shard.stats.messages_sent, 1);
    // Nobody on another topic.
    assert!(!shard.publish(None, message("u/1", QoS::AtLeastOnce, "x"), None).matched);
    assert_eq!(publishes(&a.conn).len(), 1);
}

#[test]
fn an_offline_persistent_session_queues_until_it_resumes() {
    let mut shard = shard();
    let a = connect(&mut shard, "a", false, 60);
    shard.subscribe(a.sid, filter("t"), sub(QoS::AtLeastOnce));
    shard.disconnected(&a.conn, WillAction::Discard);
    assert!(shard.publish(None, message("t", QoS::AtLeastOnce, "one"), None).matched);
    // QoS 0 is not queued for offline sessions (no --queue-qos0).
    shard.publish(None, message("t", QoS::AtMostOnce, "zero"), None);
    assert!(shard.publish(None, message("t", QoS::AtLeastOnce, "two"), None).matched);
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (2, 0));
    assert_eq!(shard.stats.messages_queued, 2);
    assert!(publishes(&a.conn).is_empty());

    let back = connect(&mut shard, "a", false, 60);
    assert!(back.present);
    assert_eq!(payloads(&back.conn), ["one", "two"]);
    assert_eq!(shard.sessions.get(&a.sid).unwrap().backlog(), (0, 2));
}

#[test]
fn no_local_skips_the_publishers_own_subscription() {
    let mut shard = shard();
    let a = connect(&mut shard, "a", true, 0);
    let b = connect(&mut shard, "b", true, 0);
    let mut own = sub(QoS::AtMostOnce);
    own.options.no_local = true;
    shard.subscribe(a.sid, filter("t"), own);
    shard.subscribe(b.sid, filter("t"), sub(QoS::AtMostOnce));
    shard.publish(Some(a.sid), message("t", QoS::AtMostOnce, "from a"), None);
    shard.publish(Some(b.sid), message("t", QoS::AtMostOnce, "from b"), None);
    assert_eq!(payloads(&a.conn), ["from b"]);
    assert_eq!(payloads(&b.conn), ["from a", "from b"]);
}

#[test]
fn no_local_on_one_of_two_matching_subscriptions_keeps_the_other() {
    let mut shard = shard();
    let a = connect(&mut shard, "a", true, 0);
    let mut own = sub(QoS::AtLeastOnce);
    own.options.no_local = true;
    shard.subscribe(a.sid, filter("t/x"), own);
    shard.subscribe(a.sid, filter("t/+"), sub(QoS::AtMostOnce));
    shard.publish(Some(a.sid), message("t/x", QoS::AtLeastOnce, "mine"), None);
    let got = publishes(&a.conn);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::AtMostOnce, "only the subscription without No Local applies");
}

#[test]
fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let mut shard = shard();
    let a = connect(&mut shard, "a", true, 0);
    let with_id = |qos, id| Subscription { identifier: Some(id), ..sub(qos) };
    shard.subscribe(a.sid, filter("t/#"), with_id(QoS::AtMostOnce, 1));
    shard.subscribe(a.sid, filter("t/+"), with_id(QoS::AtLeastOnce, 2));
    shard.subscribe(a.sid, filter("t/x"), with_id(QoS::AtMostOnce, 3));
    shard.publish(None, message("t/x", QoS::ExactlyOnce, "m"), None);
    let got = publishes(&a.conn);
    assert_eq!(got.len(), 1, "one copy per session (MQTT-3.3.4-2)");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    let mut ids: Vec<u32> = got[0].properties.subscription_identifiers().collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 3], "every matching subscription's identifier (MQTT-3.3.4-3)");
    // The publish's own QoS caps the delivery.
    shard.publish(None, message("t/x", QoS::AtMostOnce, "m0"), None);
    assert_eq!(publishes(&a.conn)[1].qos, QoS::AtMostOnce);
}

#[test]
fn qos0_fan_out_reaches_v311_and_v5_subscribers_alike() {
    let mut shard = shard();
    let v5 = connect(&mut shard, "v5", true, 0);
    let v311 = connect_with(&mut shard, connect_packet("v311", ProtocolVersion::V311, true, 0, None));
    let v5b = connect(&mut shard, "v5b", true, 0);
    for c in [&v5, &v311, &v5b] {
        shard.subscribe(c.sid, filter("f"), sub(QoS::AtMostOnce));
    }
    shard.publish(None, message("f", QoS::AtMostOnce, "all"), None);
    for c in [&v5, &v311, &v5b] {
        let got = publishes(&c.conn);
        assert_eq!(got.len(), 1, "{}", c.conn.client_id);
        assert_eq!((got[0].topic.as_str(), &got[0].payload[..]), ("f", &b"all"[..]));
    }
    assert_eq!(shard.stats.messages_sent, 3);
}

#[test]
fn a_retained_message_reaches_a_later_subscriber() {
    let mut shard = shard();
    let mut retained = message("r/1", QoS::AtLeastOnce, "kept");
    retained.retain = true;
    assert!(!shard.publish(None, retained, None).matched);
    let a = connect(&mut shard, "a", true, 0);
    shard.subscribe(a.sid, filter("r/#"), sub(QoS::AtLeastOnce));
    shard.request_retained(a.sid, filter("r/#"), QoS::AtLeastOnce, None);
    let got = publishes(&a.conn);
    assert_eq!(got.len(), 1);
    assert!(got[0].retain);
    assert_eq!(&got[0].payload[..], b"kept");
    assert!(shard.sessions.get(&a.sid).unwrap().retained.is_empty(), "the fetch finished");
}

/// Subscribes `sid` to `text` and starts its retained fetch; returns the query asked of
/// shard 1 (the other shard's partition), if one was.
fn subscribe_fetching(shard: &ShardRef, sid: SessionId, text: &str) -> Option<RetainedCursor> {
    let mut s = shard.borrow_mut();
    s.subscribe(sid, filter(text), sub(QoS::AtMostOnce));
    s.request_retained(sid, filter(text), QoS::AtMostOnce, None);
    retain_query(take_outbox(&mut s, 1))
}

/// The retained query among what a shard sent a peer.
fn retain_query(sent: Vec<CrossMsg>) -> Option<RetainedCursor> {
    sent.into_iter().find_map(|m| match m {
        CrossMsg::RetainQuery { cursor, .. } => Some(cursor),
        _ => None,
    })
}

/// A QoS 0 message published with RETAIN.
fn retained(name: &str, payload: &str) -> Message {
    let mut m = message(name, QoS::AtMostOnce, payload);
    m.retain = true;
    m
}

/// Shard 1's page of retained messages for `cursor`, its last.
fn page(sid: SessionId, cursor: RetainedCursor, messages: Vec<Message>) -> CrossMsg {
    CrossMsg::RetainReply { session: sid, cursor, messages, next: None }
}

#[test]
fn a_retained_message_published_while_a_new_subscription_fetches_goes_once() {
    // Shard 0 of two: the retained messages of shard 1's partition are fetched from it.
    let shard = shard_ref(shard_with(0, 2, |_| {}));
    let client = connect(&mut shard.borrow_mut(), "c", true, 0);
    let cursor =
        subscribe_fetching(&shard, client.sid, "fw/#").expect("shard 1 asked for its retained messages");
    // Published and stored after the SUBSCRIBE: it comes live, and in shard 1's page.
    let kept = retained("fw/a", "kept");
    handle_cross(&shard, CrossMsg::Publish(kept.clone()));
    handle_cross(&shard, page(client.sid, cursor, vec![kept]));
    assert_eq!(payloads(&client.conn), ["kept"], "delivered once");
    // A later retained publish, the fetch over, goes live as any other.
    handle_cross(&shard, CrossMsg::Publish(retained("fw/a", "later")));
    assert_eq!(payloads(&client.conn), ["kept", "later"]);
}

#[test]
fn a_live_retained_message_spares_only_the_fetches_it_matched_after_they_started() {
    let shard = shard_ref(shard_with(0, 2, |_| {}));
    let client = connect(&mut shard.borrow_mut(), "c", true, 0);
    let a = subscribe_fetching(&shard, client.sid, "fw/#").expect("fw/# asked of shard 1");
    let kept = retained("fw/a", "kept");
    handle_cross(&shard, CrossMsg::Publish(kept.clone()));
    // Subscribed after it went live: this subscription's copy is sent.
    // (Asked of shard 1 once fw/#'s page is in: one page outstanding per session.)
    let _ = subscribe_fetching(&shard, client.sid, "fw/+");
    handle_cross(&shard, page(client.sid, a, vec![kept.clone()]));
    let b = retain_query(take_outbox(&mut shard.borrow_mut(), 1)).expect("fw/+ asked of shard 1");
    handle_cross(&shard, page(client.sid, b, vec![kept]));
    assert_eq!(payloads(&client.conn), ["kept", "kept"], "live, then fw/+'s retained copy");
}
