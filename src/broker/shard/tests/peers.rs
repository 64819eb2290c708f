//! The mesh side: peers' interest, acknowledgements, outbox byte accounting.

use super::*;
use crate::broker::shard::handle_cross;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::broker::cross::HELD;

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

#[test]
fn publishers_pause_once_a_peer_leaves_a_message_unapplied_past_the_mesh_max_wait() {
    let hour = Duration::from_secs(3600);
    let mut patient = shard_with(0, 2, |c| c.mesh_max_wait = hour);
    patient.send_to(1, CrossMsg::Publish(message("x", QoS::AtLeastOnce, "p")));
    patient.peers.applied[1].store(HELD, Ordering::Release);
    assert!(!patient.mesh_backlogged(), "one message is far below the count bound, and young");

    let mut shard = shard_with(0, 2, |c| c.mesh_max_wait = Duration::from_nanos(1));
    let sent_at = Instant::now();
    shard.send_to(1, CrossMsg::Publish(message("x", QoS::AtLeastOnce, "p")));
    // Wait for the clock to pass the bound (a nanosecond), not for a guess at it.
    while sent_at.elapsed() < Duration::from_micros(1) {
        std::hint::spin_loop();
    }
    assert!(shard.mesh_in_flight());
    assert!(!shard.mesh_backlogged(), "a peer that is only busy does not pause publishers");
    shard.peers.applied[1].store(HELD, Ordering::Release);
    assert!(shard.mesh_backlogged(), "the peer is held and has not applied it: publishers pause");

    // The peer applying it (its receiver's count) is what releases them, not the sender
    // task moving it into the channel.
    take_outbox(&mut shard, 1);
    assert!(shard.mesh_backlogged(), "moved to the channel is not applied");
    shard.peers.applied[1].store(1 | HELD, Ordering::Release);
    assert!(!shard.mesh_in_flight());
    assert!(!shard.mesh_backlogged());

    // Zero turns the time bound off.
    let mut untimed = shard_with(0, 2, |c| c.mesh_max_wait = Duration::ZERO);
    untimed.send_to(1, CrossMsg::Publish(message("x", QoS::AtLeastOnce, "p")));
    untimed.peers.applied[1].store(HELD, Ordering::Release);
    assert!(!untimed.mesh_backlogged());
}

#[test]
fn a_held_peer_pauses_publishers_once_one_queue_worth_of_messages_waits_for_it() {
    let mut shard = shard_with(0, 2, |c| {
        c.max_queued_messages = 1000;
        c.mesh_max_wait = Duration::ZERO;
    });
    for _ in 0..999 {
        shard.send_to(1, CrossMsg::Publish(message("x", QoS::AtLeastOnce, "p")));
    }
    shard.peers.applied[1].store(HELD, Ordering::Release);
    assert!(!shard.mesh_backlogged(), "999 unapplied: below one queue's worth");
    shard.send_to(1, CrossMsg::Publish(message("x", QoS::AtLeastOnce, "p")));
    assert!(shard.mesh_backlogged(), "1,000 unapplied behind a held receiver: publishers pause");
    // The same backlog at a peer that is busy, not held, is its throughput.
    shard.peers.applied[1].store(0, Ordering::Release);
    assert!(!shard.mesh_backlogged());
    // The held receiver applied some: below the bound again.
    shard.peers.applied[1].store(1 | HELD, Ordering::Release);
    assert!(!shard.mesh_backlogged());
}

#[test]
fn in_a_cluster_what_the_bridge_has_not_taken_pauses_publishers_past_the_shards_share() {
    // Two shards and the node bridge (peer 2); a 1 MiB --node-link-buffer: the shards'
    // half is 256 KiB each.
    let mut shard = shard_with(0, 2, |c| c.cluster = Some(cluster_settings(1 << 20)));
    assert_eq!(shard.bridge(), Some(2));
    assert_eq!(shard.peers.bridge_share, 256 << 10);
    let payload = "p".repeat(10_000);
    let mut handed = 0;
    while handed < 256 << 10 {
        let msg = CrossMsg::Publish(message("x", QoS::AtMostOnce, &payload));
        handed += msg.size();
        assert!(!shard.mesh_backlogged(), "below the share");
        shard.send_to(2, msg);
    }
    assert!(shard.mesh_backlogged(), "the share waits in the outbox to the bridge");
    // The sender task moves it into the channel: still not taken by the bridge (before,
    // the channel's 128 batches of up to 1 MiB were counted nowhere).
    let moved = shard.peers.bytes[2];
    take_outbox(&mut shard, 2);
    shard.peers.moved[2] += moved as u64;
    assert_eq!(shard.handed_to_bridge(), handed);
    assert!(shard.mesh_backlogged(), "in the channel, not taken");
    assert!(shard.mesh_held(), "released on the bridge's core: polled");
    // The bridge took some of it (it counts it in the links' windows from then on).
    shard.peers.bridge_taken.store(20_000, Ordering::Release);
    assert!(!shard.mesh_backlogged());
    // The links' windows over their half pause them too.
    shard.global.cluster_backlogged.store(true, Ordering::Release);
    assert!(shard.mesh_backlogged());
}

/// A cluster node's settings (nothing is dialled in these tests).
fn cluster_settings(link_buffer: usize) -> crate::config::ClusterSettings {
    crate::config::ClusterSettings {
        etcd: crate::cluster::etcd::Endpoints::parse("etcd://127.0.0.1:2379").unwrap(),
        name: "t".into(),
        node: "a".into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        advertise: "127.0.0.1:0".parse().unwrap(),
        lease_ttl: Duration::from_secs(10),
        link_buffer,
        handover_part: 8 << 20,
    }
}

#[test]
fn a_claim_made_after_its_connect_gave_up_has_its_record_go_unless_the_client_is_served_here() {
    let shard = shard_ref(shard_with(0, 2, |c| c.cluster = Some(cluster_settings(64 << 20))));
    let bridge = shard.borrow().bridge().unwrap();
    // "kept" has a session here; "gone" has none. Both claims' CONNECTs gave up.
    connect(&mut shard.borrow_mut(), "kept", false, 600);
    for (token, client) in [(101, "kept"), (102, "gone")] {
        let msg =
            CrossMsg::Claimed { token, client_id: client.into(), ok: true, denied: false, session: None };
        handle_cross(&shard, msg);
    }
    take_outbox(&mut shard.borrow_mut(), bridge);
    shard.borrow_mut().unclaim_ended();
    let out = take_outbox(&mut shard.borrow_mut(), bridge);
    let unclaimed: Vec<&str> = out
        .iter()
        .filter_map(|m| match m {
            CrossMsg::Unclaim { client_id } => Some(&**client_id),
            _ => None,
        })
        .collect();
    assert_eq!(unclaimed, ["gone"]);
}

#[test]
fn a_session_handed_over_goes_in_parts_of_the_handover_budget_in_flight_and_queued_ones_too() {
    // A window of messages in flight and a queue, together many parts' worth: before, they
    // all went in the first part, whatever its size, and the bridge cut what the other
    // node's bound did not take.
    let part_bytes = 2048;
    let shard = shard_ref(shard_with(0, 1, |c| {
        c.max_inflight = 4;
        c.cluster =
            Some(crate::config::ClusterSettings { handover_part: part_bytes, ..cluster_settings(64 << 20) });
    }));
    let bridge = shard.borrow().bridge().unwrap();
    let client = connect(&mut shard.borrow_mut(), "c", false, 600);
    shard.borrow_mut().subscribe(client.sid, filter("t"), sub(QoS::AtLeastOnce));
    let sent: Vec<String> = (0..20).map(|i| format!("{i:03}{}", "x".repeat(500))).collect();
    for payload in &sent {
        shard.borrow_mut().publish(None, message("t", QoS::AtLeastOnce, payload), None);
    }
    assert_eq!(publishes(&client.conn).len(), 4, "a window in flight, the rest queued");
    take_outbox(&mut shard.borrow_mut(), bridge);

    let token = 7;
    let msg = CrossMsg::TakeOver { client_id: "c".into(), token, want_session: true };
    handle_cross(&shard, msg);
    let (mut handed, mut in_flight, mut parts) = (Vec::new(), 0, 0);
    loop {
        let out = take_outbox(&mut shard.borrow_mut(), bridge);
        let part = out
            .into_iter()
            .find_map(|m| match m {
                CrossMsg::HandedOver { token: t, session: Some(part), last: false } if t == token => {
                    Some(part)
                }
                _ => None,
            })
            .expect("a part of the session");
        parts += 1;
        let bytes: usize = part.messages.iter().map(|m| m.message.size()).sum();
        assert!(
            part.messages.len() == 1 || bytes <= part_bytes,
            "part {parts}: {bytes} bytes in {} messages",
            part.messages.len()
        );
        assert!(!part.messages.is_empty(), "part {parts} carries something");
        in_flight += part.messages.iter().filter(|m| m.packet_id.is_some()).count();
        handed.extend(part.messages.iter().map(|m| String::from_utf8_lossy(&m.message.payload).into_owned()));
        if !part.more {
            break;
        }
        assert!(parts < 100, "parts end");
        handle_cross(&shard, CrossMsg::NextPart { client_id: "c".into(), token });
    }
    assert!(parts > 2, "{parts} parts");
    assert_eq!(in_flight, 4, "those in flight keep their packet identifiers");
    assert_eq!(handed, sent, "every message once, in order");
}

#[test]
fn a_takeover_given_up_leaves_no_barrier_markers_behind() {
    let shard = shard_ref(shard_with(0, 2, |c| c.cluster = Some(cluster_settings(64 << 20))));
    connect(&mut shard.borrow_mut(), "c", false, 600);
    let token = 7;
    handle_cross(&shard, CrossMsg::TakeOver { client_id: "c".into(), token, want_session: true });
    // The other core passed the barrier; then the node taking it over went away.
    handle_cross(&shard, CrossMsg::Marker { token });
    assert_eq!(shard.borrow().barriers.markers.get(&token), Some(&1));
    handle_cross(&shard, CrossMsg::Stay { client_id: "c".into() });
    assert!(shard.borrow().barriers.markers.is_empty(), "the given-up takeover's count went");
    // A marker still on its way when it was given up, or of a takeover never seen here.
    handle_cross(&shard, CrossMsg::Marker { token });
    handle_cross(&shard, CrossMsg::Marker { token: 9 });
    assert!(shard.borrow().barriers.markers.is_empty(), "late markers are not kept");
    assert!(shard.borrow().sessions.of_client("c").is_some(), "the session stayed");
}

#[test]
fn a_released_sessions_shared_messages_go_with_its_remainder_not_to_another_member_too() {
    let shard = shard_ref(shard_with(0, 1, |c| c.cluster = Some(cluster_settings(64 << 20))));
    let bridge = shard.borrow().bridge().unwrap();
    let mover = connect(&mut shard.borrow_mut(), "m", false, 600);
    join(&mut shard.borrow_mut(), mover.sid, "$share/g/t", QoS::AtLeastOnce);
    let token = 7;
    handle_cross(&shard, CrossMsg::TakeOver { client_id: "m".into(), token, want_session: true });
    // Published while it moves (its only member): queued in its old copy here.
    for payload in ["s1", "s2"] {
        shard.borrow_mut().publish(None, message("t", QoS::AtLeastOnce, payload), None);
    }
    // Another member joins; then the new node has the session in place.
    let other = connect(&mut shard.borrow_mut(), "o", true, 0);
    join(&mut shard.borrow_mut(), other.sid, "$share/g/t", QoS::AtLeastOnce);
    take_outbox(&mut shard.borrow_mut(), bridge);
    handle_cross(&shard, CrossMsg::Release { client_id: "m".into(), token });
    let rest: Vec<String> = take_outbox(&mut shard.borrow_mut(), bridge)
        .into_iter()
        .filter_map(|m| match m {
            CrossMsg::HandedOver { session: Some(part), last: true, .. } => Some(part),
            _ => None,
        })
        .flat_map(|part| {
            part.messages.into_iter().map(|m| String::from_utf8_lossy(&m.message.payload).into_owned())
        })
        .collect();
    assert_eq!(rest, ["s1", "s2"], "the remainder carries them");
    assert!(shard.borrow().sessions.of_client("m").is_none(), "the old copy ended");
    assert_eq!(payloads(&other.conn), Vec::<String>::new(), "the other member does not get them too");
}

#[test]
fn a_message_handed_over_without_an_id_gets_one() {
    // Read back from a log written before messages had ids, on the node it comes from.
    let mut shard = shard_with(0, 1, |c| c.cluster = Some(cluster_settings(64 << 20)));
    let owed = |payload: &str| crate::broker::session::OwedMessage {
        seq: 0,
        qos: QoS::AtLeastOnce,
        retain: false,
        identifiers: Vec::new(),
        message: crate::broker::message::Message {
            id: crate::broker::message::MessageId(0),
            ..message("t", QoS::AtLeastOnce, payload)
        },
        packet_id: None,
        released: false,
    };
    let handed = crate::broker::cross::HandedSession {
        version: ProtocolVersion::V5,
        expiry: 600,
        subscriptions: Vec::new(),
        messages: vec![owed("a"), owed("b")],
        qos2_inbound: Vec::new(),
        more: false,
    };
    let mut ids = ahash::AHashSet::new();
    shard.adopt_session("c", handed, &mut ids);
    assert_eq!(ids.len(), 2, "each has an id of its own now: {ids:?}");
}

#[test]
fn a_retained_set_streamed_in_at_join_does_not_replace_what_was_written_here_meanwhile() {
    // One shard and the node bridge (peer 1): this shard owns every topic.
    let shard = shard_ref(shard_with(0, 1, |c| c.cluster = Some(cluster_settings(64 << 20))));
    let retained = |topic: &str, payload: &str| {
        let mut m = message(topic, QoS::AtMostOnce, payload);
        m.retain = true;
        m
    };
    let value = |topic: &str| {
        let mut out = Vec::new();
        shard.borrow().retained.store.matching(&filter(topic), None, 10, &mut out);
        out.first().map(|m| String::from_utf8_lossy(&m.payload).into_owned())
    };
    // Written here (from another node's live replication, and one cleared) while the set
    // streams in; the set, read on the other node before, carries older values.
    handle_cross(&shard, CrossMsg::RetainSet(retained("t/new", "newer"), None));
    handle_cross(&shard, CrossMsg::RetainSet(retained("t/cleared", ""), None));
    handle_cross(&shard, CrossMsg::RetainSynced(retained("t/new", "older"), None));
    handle_cross(&shard, CrossMsg::RetainSynced(retained("t/cleared", "older"), None));
    handle_cross(&shard, CrossMsg::RetainSynced(retained("t/other", "from the set"), None));
    assert_eq!(value("t/new").as_deref(), Some("newer"));
    assert_eq!(value("t/cleared"), None, "a topic cleared meanwhile stays cleared");
    assert_eq!(value("t/other").as_deref(), Some("from the set"));
    // The record holds a copy of a topic, not a slice of the buffer its message came in.
    let arrived = retained("t/sliced", "v");
    handle_cross(&shard, CrossMsg::RetainSet(arrived.clone(), None));
    let s = shard.borrow();
    let recorded = s.retained.written.as_ref().unwrap().topic(&arrived.topic).unwrap();
    assert_ne!(recorded.as_bytes().as_ptr(), arrived.topic.as_bytes().as_ptr());
    drop(s);
    // Once the set has come, nothing more is recorded.
    handle_cross(&shard, CrossMsg::RetainSyncDone);
    assert!(shard.borrow().retained.written.is_none());
}
