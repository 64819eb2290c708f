//! The bridge as a state machine: cross-core messages and frames in, what it queues out.

use bytes::Bytes;

use super::*;
use crate::broker::cross::HandedSession;
use crate::topic::TopicName;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn filter(text: &str) -> TopicFilter {
    TopicFilter::new(text.to_string()).unwrap()
}

fn message(topic: &'static str, qos: QoS) -> Message {
    Message::new(TopicName::from_static(topic), Bytes::from_static(b"x"), qos, false, &Default::default())
}

fn confirm(shard: usize, seq: u64) -> Confirm {
    Confirm { shard, conn: 1, seq, session: 1, qos2_packet_id: None }
}

/// A bridge of node "a" with 2 shards that knows nodes b and c, linked, each with a route
/// on `t/#`.
fn bridge() -> Bridge {
    let mut b = Bridge::new(2, "a");
    b.on_control(ControlEvent::Snapshot {
        nodes: vec![("b".into(), addr(1)), ("c".into(), addr(2))],
        routes: vec![("b".into(), filter("t/#")), ("c".into(), filter("t/+"))],
    });
    // As a node that has its retained set already (see the test of the sync).
    b.synced = true;
    for node in 0..2 {
        b.link_state(node, true);
    }
    b
}

/// [`bridge`] with the shards' outboxes emptied of its announcements.
fn quiet_bridge() -> Bridge {
    let mut b = bridge();
    for shard in 0..2 {
        b.outbox[shard].clear();
        b.outbox_bytes[shard] = 0;
    }
    b
}

fn drain(b: &mut Bridge, shard: usize) -> Vec<CrossMsg> {
    b.outbox[shard].take_all()
}

/// A session handed over with nothing in it.
fn empty_session() -> HandedSession {
    HandedSession {
        version: crate::codec::ProtocolVersion::V311,
        expiry: 60,
        subscriptions: Vec::new(),
        messages: Vec::new(),
        qos2_inbound: Vec::new(),
        more: false,
    }
}

/// What the bridge writes on `node`'s link now, as that node reads it.
fn writes(b: &mut Bridge, node: NodeId) -> Vec<Frame> {
    writes_within(b, node, FrameLimits::CAP).0
}

/// [`writes`] for a node that reads frames up to `accepts`; and whether some were refused.
fn writes_within(b: &mut Bridge, node: NodeId, accepts: FrameLimits) -> (Vec<Frame>, bool) {
    let (mut buf, now) = (bytes::BytesMut::new(), std::time::Instant::now());
    let (_, refused) = b.write_frames(node, 100, &mut buf, now, &accepts);
    let frames = std::iter::from_fn(|| Frame::decode(&mut buf, FrameLimits::CAP, now).unwrap()).collect();
    (frames, refused)
}

#[test]
fn the_shards_learn_other_nodes_routes_once_per_filter() {
    let mut b = bridge();
    let told: Vec<String> = drain(&mut b, 0)
        .into_iter()
        .filter_map(|m| match m {
            CrossMsg::Interest { filter, add: true, .. } => Some(filter.as_str().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(told, ["t/#", "t/+"]);
    b.on_control(ControlEvent::Route { node: "c".into(), filter: filter("t/#"), add: true });
    assert!(drain(&mut b, 0).is_empty(), "t/# was announced already");
}

#[test]
fn an_acknowledgement_waits_for_every_node_and_a_refusal_withholds_it() {
    let mut b = quiet_bridge();
    b.on_shard(
        0,
        CrossMsg::DurablePublish { message: message("t/1", QoS::AtLeastOnce), confirm: confirm(0, 7) },
    );
    let (to_b, to_c) = (writes(&mut b, 0), writes(&mut b, 1));
    assert_eq!((to_b.len(), to_c.len()), (1, 1), "once per node");
    b.on_link_reply(0, Frame::Confirmed { seq: to_b[0].seq().unwrap() });
    assert!(drain(&mut b, 0).is_empty(), "c has not confirmed");
    b.on_link_reply(1, Frame::Confirmed { seq: to_c[0].seq().unwrap() });
    assert!(matches!(drain(&mut b, 0).as_slice(), [CrossMsg::Confirmed(c)] if c.seq == 7));

    b.on_shard(
        1,
        CrossMsg::DurablePublish { message: message("t/2", QoS::AtLeastOnce), confirm: confirm(1, 8) },
    );
    let to_b = writes(&mut b, 0);
    b.on_link_reply(0, Frame::Refused { seq: to_b[0].seq().unwrap() });
    assert!(matches!(drain(&mut b, 1).as_slice(), [CrossMsg::Refused(c)] if c.seq == 8));
}

#[test]
fn a_frame_larger_than_the_node_reads_is_refused_here_not_written_again() {
    let mut b = quiet_bridge();
    b.on_shard(
        0,
        CrossMsg::DurablePublish { message: message("t/1", QoS::AtLeastOnce), confirm: confirm(0, 7) },
    );
    b.on_shard(0, CrossMsg::Publish(message("t/2", QoS::AtMostOnce)));
    // b reads frames of 16 bytes at most: neither is written.
    let (to_b, refused) = writes_within(&mut b, 0, FrameLimits { frame: 16, handover: 16 });
    assert!(to_b.is_empty() && refused);
    // Refused at once, whatever c answers, as when b refuses it.
    assert!(
        matches!(drain(&mut b, 0).as_slice(), [CrossMsg::Refused(c)] if c.seq == 7),
        "the publisher is not acknowledged"
    );
    assert_eq!(b.nodes[0].out.bytes, 0, "nothing left in b's window");
    b.link_state(0, false);
    b.link_state(0, true);
    assert!(writes(&mut b, 0).is_empty(), "not written again after a reconnection");
}

#[test]
fn unconfirmed_frames_are_written_again_after_a_reconnection_and_qos0_ones_are_not() {
    let mut b = bridge();
    b.on_shard(0, CrossMsg::Publish(message("t/1", QoS::AtMostOnce)));
    b.on_shard(
        0,
        CrossMsg::DurablePublish { message: message("t/1", QoS::AtLeastOnce), confirm: confirm(0, 1) },
    );
    assert_eq!(writes(&mut b, 0).len(), 2);
    assert!(writes(&mut b, 0).is_empty(), "each once per connection");
    b.link_state(0, false);
    b.link_state(0, true);
    let again = writes(&mut b, 0);
    assert!(matches!(again.as_slice(), [Frame::Publish { message, .. }] if message.qos == QoS::AtLeastOnce));
    // A QoS 0 message for a link that is down is not kept.
    b.link_state(0, false);
    b.on_shard(0, CrossMsg::Publish(message("t/1", QoS::AtMostOnce)));
    b.link_state(0, true);
    assert_eq!(writes(&mut b, 0).len(), 1, "only the unconfirmed QoS 1 one");
}

#[test]
fn a_frame_resent_by_a_dialling_node_is_delivered_once_and_confirmed_again() {
    let mut b = Bridge::new(2, "a");
    b.on_shard(1, CrossMsg::Interest { from: 1, filter: filter("t/#"), add: true, token: 0 });
    let link = ("b".to_string(), 9);
    let frame = Frame::Publish { seq: 1, message: message("t/1", QoS::AtLeastOnce) };
    b.on_link_frame(&link, frame.clone());
    let delivered = drain(&mut b, 1);
    let CrossMsg::DurablePublish { confirm, .. } = &delivered[0] else { panic!("{}", delivered.len()) };
    b.on_link_frame(&link, frame.clone());
    assert!(drain(&mut b, 1).is_empty(), "not delivered twice");
    assert!(b.in_links[&link].replies.is_empty(), "its first delivery is not confirmed yet");
    b.on_shard(1, CrossMsg::Confirmed(*confirm));
    assert_eq!(b.in_links[&link].replies.iter().collect::<Vec<_>>(), [&Frame::Confirmed { seq: 1 }]);
    b.on_link_frame(&link, frame);
    assert_eq!(b.in_links[&link].replies.len(), 2, "confirmed again at once");
}

#[test]
fn a_suback_waits_for_the_route_in_etcd_and_every_linked_node() {
    let mut b = quiet_bridge();
    b.on_shard(0, CrossMsg::Interest { from: 0, filter: filter("s/#"), add: true, token: 5 });
    assert_eq!(b.control.drain(..).collect::<Vec<_>>(), [ControlRequest::AddRoute(filter("s/#"))]);
    b.on_shard(1, CrossMsg::Interest { from: 1, filter: filter("s/#"), add: true, token: 6 });
    assert!(b.control.is_empty(), "one route per node");
    assert!(drain(&mut b, 0).is_empty());
    b.on_control(ControlEvent::Committed(filter("s/#")));
    let (to_b, to_c) = (writes(&mut b, 0), writes(&mut b, 1));
    assert!(matches!(to_b.as_slice(), [Frame::Route { filter, .. }] if filter == "s/#"));
    b.on_link_reply(0, Frame::Confirmed { seq: to_b[0].seq().unwrap() });
    assert!(drain(&mut b, 0).is_empty(), "c does not route it yet");
    b.on_link_reply(1, Frame::Confirmed { seq: to_c[0].seq().unwrap() });
    assert!(matches!(drain(&mut b, 0).as_slice(), [CrossMsg::InterestAck { token: 5 }]));
    assert!(matches!(drain(&mut b, 1).as_slice(), [CrossMsg::InterestAck { token: 6 }]));
    b.on_shard(0, CrossMsg::Interest { from: 0, filter: filter("s/#"), add: false, token: 0 });
    assert!(b.control.is_empty(), "shard 1 still has it");
    b.on_shard(1, CrossMsg::Interest { from: 1, filter: filter("s/#"), add: false, token: 0 });
    assert_eq!(b.control.drain(..).collect::<Vec<_>>(), [ControlRequest::RemoveRoute(filter("s/#"))]);
}

#[test]
fn a_node_gone_releases_what_waited_for_it_and_its_routes() {
    let mut b = quiet_bridge();
    b.on_shard(
        0,
        CrossMsg::DurablePublish { message: message("t/1", QoS::AtLeastOnce), confirm: confirm(0, 3) },
    );
    let to_c = writes(&mut b, 1);
    b.on_link_reply(1, Frame::Confirmed { seq: to_c[0].seq().unwrap() });
    b.on_control(ControlEvent::NodeDown { node: "b".into() });
    let out = drain(&mut b, 0);
    assert!(out.iter().any(|m| matches!(m, CrossMsg::Confirmed(c) if c.seq == 3)));
    assert!(out
        .iter()
        .any(|m| matches!(m, CrossMsg::Interest { add: false, filter, .. } if filter.as_str() == "t/#")));
}

#[test]
fn a_newer_claim_elsewhere_closes_the_client_here_and_an_older_one_does_not() {
    let mut b = quiet_bridge();
    b.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 4, client_id: "x".into(), want_session: true, user: None },
    );
    let Some(ControlRequest::Claim { id, .. }) = b.control.pop() else { panic!("a claim asked") };
    b.on_control(ControlEvent::Claimed { id, outcome: Ok((None, 50)) });
    assert!(matches!(
        drain(&mut b, 0).as_slice(),
        [CrossMsg::Claimed { token: 4, ok: true, session: None, .. }]
    ));
    let owner = placement::owner("x", 2);
    b.on_control(ControlEvent::Owner { client_id: "x".into(), node: "b".into(), revision: 40 });
    assert!(drain(&mut b, owner).is_empty(), "b's record is older than this node's claim");
    b.on_control(ControlEvent::Owner { client_id: "x".into(), node: "b".into(), revision: 60 });
    assert!(matches!(drain(&mut b, owner).as_slice(), [CrossMsg::TakeOver { token: 0, .. }]));
}

#[test]
fn a_joining_node_asks_its_first_peer_for_the_retained_set_which_pages_it_over() {
    let mut joining = Bridge::new(2, "new");
    joining.on_control(ControlEvent::Snapshot { nodes: vec![("a".into(), addr(1))], routes: vec![] });
    joining.link_state(0, true);
    let asked = writes(&mut joining, 0);
    assert!(matches!(asked.as_slice(), [Frame::SyncRetained { .. }]));
    joining.link_state(0, false);
    joining.link_state(0, true);
    assert_eq!(writes(&mut joining, 0).len(), 1, "asked again only as a resend of the same frame");

    let mut peer = quiet_bridge();
    peer.on_control(ControlEvent::NodeUp { node: "new".into(), addr: addr(3) });
    let link = ("new".to_string(), 1);
    peer.on_link_frame(&link, asked[0].clone());
    let CrossMsg::RetainQuery { cursor, .. } = drain(&mut peer, 1).remove(0) else { panic!("a page asked") };
    let next = Some(TopicName::from_static("r/5"));
    peer.on_shard(
        1,
        CrossMsg::RetainReply { session: 0, cursor, messages: vec![message("r/1", QoS::AtLeastOnce)], next },
    );
    let node = peer.by_name["new"];
    let entry = writes(&mut peer, node);
    assert!(matches!(entry.as_slice(), [Frame::SyncEntry { .. }]), "not a live retained set");
    assert!(
        matches!(drain(&mut peer, 1).as_slice(), [CrossMsg::RetainQuery { cursor, .. }] if cursor.after.as_ref().map(TopicName::as_str) == Some("r/5")),
        "the next page"
    );
    // Both shards' last pages: the joining node is told it has everything.
    for shard in 0..2 {
        let cursor = crate::broker::session::RetainedCursor {
            shard,
            filter: filter("#"),
            generation: u64::from(node),
            after: None,
        };
        peer.on_shard(shard, CrossMsg::RetainReply { session: 0, cursor, messages: vec![], next: None });
    }
    let done = writes(&mut peer, node);
    assert!(matches!(done.as_slice(), [Frame::SyncDone { .. }]));
    // The joining node: an entry of the set goes to its owner shard as one (a topic written
    // there meanwhile keeps its value), and every shard learns when the set has come.
    let from_a = ("a".to_string(), 1);
    joining.on_link_frame(&from_a, entry[0].clone());
    let owner = placement::owner("r/1", 2);
    assert!(
        matches!(drain(&mut joining, owner).as_slice(), [CrossMsg::RetainSynced(m, Some(_))] if m.topic.as_str() == "r/1")
    );
    joining.on_link_frame(&from_a, done[0].clone());
    assert!(joining.sync_done);
    for shard in 0..2 {
        assert!(matches!(drain(&mut joining, shard).as_slice(), [CrossMsg::RetainSyncDone]));
    }
}

#[test]
fn sys_topics_stay_on_their_node_and_the_cluster_ones_say_who_is_there() {
    let mut b = quiet_bridge();
    b.on_control(ControlEvent::Route { node: "b".into(), filter: filter("$SYS/#"), add: true });
    b.on_shard(
        0,
        CrossMsg::DurablePublish {
            message: message("$SYS/broker/uptime", QoS::AtLeastOnce),
            confirm: confirm(0, 2),
        },
    );
    assert!(writes(&mut b, 0).is_empty(), "not forwarded");
    assert!(drain(&mut b, 0).iter().any(|m| matches!(m, CrossMsg::Confirmed(c) if c.seq == 2)));
    drain(&mut b, 1);
    b.publish_cluster_sys();
    let stored: Vec<(String, String)> = (0..2)
        .flat_map(|s| drain(&mut b, s))
        .filter_map(|m| match m {
            CrossMsg::RetainSet(m, None) => {
                Some((m.topic.as_str().to_string(), String::from_utf8_lossy(&m.payload).into_owned()))
            }
            _ => None,
        })
        .collect();
    assert!(stored.contains(&("$SYS/cluster/nodes".into(), "3".into())), "{stored:?}");
    assert!(stored.contains(&("$SYS/cluster/nodes/b".into(), "up".into())));
    b.on_control(ControlEvent::NodeDown { node: "c".into() });
    assert!(b.sys_dirty);
}

#[test]
fn a_suback_does_not_wait_for_a_node_whose_link_went_down() {
    let mut b = quiet_bridge();
    b.on_shard(0, CrossMsg::Interest { from: 0, filter: filter("s/#"), add: true, token: 5 });
    b.on_control(ControlEvent::Committed(filter("s/#")));
    let to_c = writes(&mut b, 1);
    b.on_link_reply(1, Frame::Confirmed { seq: to_c[0].seq().unwrap() });
    assert!(drain(&mut b, 0).is_empty(), "b has not confirmed");
    b.link_state(0, false);
    assert!(matches!(drain(&mut b, 0).as_slice(), [CrossMsg::InterestAck { token: 5 }]));
    b.link_state(0, true);
    assert!(matches!(writes(&mut b, 0).as_slice(), [Frame::Route { .. }]), "still told when it is back");
}

#[test]
fn a_filter_dropped_and_taken_again_before_its_route_committed_is_written_again() {
    let mut b = quiet_bridge();
    b.synced = true;
    let f = filter("r/#");
    b.on_shard(0, CrossMsg::Interest { from: 0, filter: f.clone(), add: true, token: 1 });
    b.on_shard(0, CrossMsg::Interest { from: 0, filter: f.clone(), add: false, token: 0 });
    b.on_shard(0, CrossMsg::Interest { from: 0, filter: f.clone(), add: true, token: 2 });
    let asked: Vec<ControlRequest> = b.control.drain(..).collect();
    assert_eq!(
        asked,
        [
            ControlRequest::AddRoute(f.clone()),
            ControlRequest::RemoveRoute(f.clone()),
            ControlRequest::AddRoute(f.clone())
        ],
        "the last write puts it back"
    );
    // Each commit releases the SUBACKs of its own write (no node linked: at once).
    for node in 0..2 {
        b.link_state(node, false);
    }
    b.on_control(ControlEvent::Committed(f.clone()));
    assert!(matches!(drain(&mut b, 0).as_slice(), [CrossMsg::InterestAck { token: 1 }]));
    b.on_control(ControlEvent::Committed(f));
    assert!(matches!(drain(&mut b, 0).as_slice(), [CrossMsg::InterestAck { token: 2 }]));
}

#[test]
fn a_shared_message_for_members_that_left_is_refused_not_confirmed() {
    let mut b = quiet_bridge();
    let link = ("b".to_string(), 1);
    let frame =
        Frame::Shared { seq: 1, group: "$share/g/s/#".into(), message: message("s/1", QoS::AtLeastOnce) };
    b.on_link_frame(&link, frame);
    assert_eq!(b.in_links[&link].replies.iter().collect::<Vec<_>>(), [&Frame::Refused { seq: 1 }]);
}

#[test]
fn a_second_connect_for_a_client_claims_only_after_the_first_claim_is_answered() {
    let mut b = quiet_bridge();
    b.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 1, client_id: "x".into(), want_session: true, user: None },
    );
    b.on_shard(
        1,
        CrossMsg::Claim { shard: 1, token: 2, client_id: "x".into(), want_session: true, user: None },
    );
    b.on_shard(
        1,
        CrossMsg::Claim { shard: 1, token: 3, client_id: "y".into(), want_session: true, user: None },
    );
    let asked: Vec<ControlRequest> = b.control.drain(..).collect();
    assert_eq!(asked.len(), 2, "x once, y once: {asked:?}");
    let ControlRequest::Claim { id, .. } = &asked[0] else { panic!() };
    // x was b's: b is asked for the session; the second claim still waits.
    b.on_control(ControlEvent::Claimed { id: *id, outcome: Ok((Some("b".into()), 9)) });
    assert!(b.control.is_empty());
    let take = writes(&mut b, 0);
    let [Frame::TakeOver { id: tid, .. }] = take.as_slice() else { panic!("{take:?}") };
    b.on_link_frame(&("b".to_string(), 1), Frame::Handover { seq: 1, id: *tid, last: false, session: None });
    assert!(matches!(drain(&mut b, 0).as_slice(), [CrossMsg::Claimed { token: 1, ok: true, .. }]));
    assert!(
        matches!(b.control.drain(..).collect::<Vec<_>>().as_slice(), [ControlRequest::Claim { client_id, .. }] if client_id == "x")
    );
}

#[test]
fn a_claim_given_up_is_withdrawn_while_it_waits() {
    let mut b = quiet_bridge();
    b.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 1, client_id: "x".into(), want_session: true, user: None },
    );
    b.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 2, client_id: "x".into(), want_session: true, user: None },
    );
    let Some(ControlRequest::Claim { id: first, .. }) = b.control.pop() else {
        panic!("the first claim asked")
    };
    // The second, waiting behind the first, is dropped; the first is withdrawn from etcd's queue.
    b.on_shard(0, CrossMsg::CancelClaim { token: 2 });
    b.on_shard(0, CrossMsg::CancelClaim { token: 1 });
    assert_eq!(b.control.drain(..).collect::<Vec<_>>(), [ControlRequest::Cancel { id: first }]);
    // etcd had made it already: it stands, and the shard hears of it (its record goes
    // unless something there serves the client); then the client is free for a new claim.
    b.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 3, client_id: "x".into(), want_session: true, user: None },
    );
    assert!(b.control.is_empty(), "the withdrawn claim is not answered yet");
    b.on_control(ControlEvent::Claimed { id: first, outcome: Ok((None, 3)) });
    assert!(matches!(
        drain(&mut b, 0).as_slice(),
        [CrossMsg::Claimed { token: 1, ok: true, session: None, .. }]
    ));
    let Some(ControlRequest::Claim { id: next, .. }) = b.control.pop() else { panic!("the next claim") };
    // This one is withdrawn before etcd made it: answered all the same, as not made.
    b.on_shard(0, CrossMsg::CancelClaim { token: 3 });
    assert_eq!(b.control.drain(..).collect::<Vec<_>>(), [ControlRequest::Cancel { id: next }]);
    b.on_control(ControlEvent::Claimed { id: next, outcome: Err("withdrawn".into()) });
    assert!(matches!(drain(&mut b, 0).as_slice(), [CrossMsg::Claimed { token: 3, ok: false, .. }]));
    // Nothing serves x here (the shard says so): the made claim's record goes.
    b.on_shard(0, CrossMsg::Unclaim { client_id: "x".into() });
    assert!(matches!(
        b.control.drain(..).collect::<Vec<_>>().as_slice(),
        [ControlRequest::Unclaim { client_id, revision: 3 }] if client_id == "x"
    ));
}

#[test]
fn a_retained_sync_asks_for_its_next_page_only_when_the_link_has_room() {
    let mut peer = quiet_bridge();
    peer.on_control(ControlEvent::NodeUp { node: "new".into(), addr: addr(3) });
    let node = peer.by_name["new"];
    peer.link_state(node, true);
    peer.on_link_frame(&("new".to_string(), 1), Frame::SyncRetained { seq: 1 });
    drain(&mut peer, 0);
    let CrossMsg::RetainQuery { cursor, .. } = drain(&mut peer, 1).remove(0) else { panic!("a page asked") };
    let big = Message::new(
        TopicName::from_static("r/big"),
        Bytes::from(vec![0u8; 9 << 20]),
        QoS::AtLeastOnce,
        true,
        &Default::default(),
    );
    let next = Some(TopicName::from_static("r/c"));
    peer.on_shard(1, CrossMsg::RetainReply { session: 0, cursor, messages: vec![big], next });
    assert!(drain(&mut peer, 1).is_empty(), "9 MiB wait in the window: no next page yet");
    let sent = writes(&mut peer, node);
    peer.on_link_reply(node, Frame::Confirmed { seq: sent[0].seq().unwrap() });
    assert!(
        matches!(drain(&mut peer, 1).as_slice(), [CrossMsg::RetainQuery { .. }]),
        "confirmed: the next page"
    );
}

#[test]
fn a_connect_waiting_for_the_old_nodes_last_messages_goes_on_when_that_node_is_gone() {
    let mut b = quiet_bridge();
    for (token, client) in [(1, "x"), (2, "y")] {
        b.on_shard(
            0,
            CrossMsg::Claim { shard: 0, token, client_id: client.into(), want_session: true, user: None },
        );
        let Some(ControlRequest::Claim { id, .. }) = b.control.pop() else { panic!("a claim asked") };
        b.on_control(ControlEvent::Claimed { id, outcome: Ok((Some("b".into()), 9)) });
        let take = writes(&mut b, 0);
        let [Frame::TakeOver { id: tid, .. }] = take.as_slice() else { panic!("{take:?}") };
        let session = Some(Box::new(empty_session()));
        b.on_link_frame(
            &("b".to_string(), 1),
            Frame::Handover { seq: 10 * token, id: *tid, last: false, session },
        );
        let got = drain(&mut b, 0);
        assert!(
            matches!(got.as_slice(), [CrossMsg::Claimed { ok: true, session: Some(_), .. }]),
            "{token}: {}",
            got.len()
        );
        b.on_shard(0, CrossMsg::Adopted { token });
        assert!(matches!(writes(&mut b, 0).as_slice(), [Frame::Adopted { .. }]));
        if token == 1 {
            // b's last part for x: to the CONNECT that waits for it, by its token.
            let last = Some(Box::new(empty_session()));
            b.on_link_frame(
                &("b".to_string(), 1),
                Frame::Handover { seq: 11, id: *tid, last: true, session: last },
            );
            assert!(matches!(drain(&mut b, 0).as_slice(), [CrossMsg::Leftovers { token: 1, .. }]));
        }
    }
    // b dies before y's last part: y's CONNECT goes on with nothing more to wait for.
    b.on_control(ControlEvent::NodeDown { node: "b".into() });
    let out = drain(&mut b, 0);
    assert!(
        out.iter()
            .any(|m| matches!(m, CrossMsg::Leftovers { token: 2, messages, .. } if messages.is_empty())),
        "{}",
        out.len()
    );
}

#[test]
fn a_client_nothing_serves_has_its_record_deleted_only_while_it_is_this_nodes_claim() {
    let mut b = quiet_bridge();
    for (token, client) in [(1, "x"), (2, "y")] {
        b.on_shard(
            0,
            CrossMsg::Claim { shard: 0, token, client_id: client.into(), want_session: false, user: None },
        );
        let Some(ControlRequest::Claim { id, .. }) = b.control.pop() else { panic!("a claim asked") };
        b.on_control(ControlEvent::Claimed { id, outcome: Ok((None, 10 * token)) });
    }
    // y was claimed by b since: its record is b's.
    b.on_control(ControlEvent::Owner { client_id: "y".into(), node: "b".into(), revision: 30 });
    b.on_shard(0, CrossMsg::Unclaim { client_id: "x".into() });
    b.on_shard(0, CrossMsg::Unclaim { client_id: "y".into() });
    assert_eq!(
        b.control.drain(..).collect::<Vec<_>>(),
        [ControlRequest::Unclaim { client_id: "x".into(), revision: 10 }]
    );
    // Once only.
    b.on_shard(0, CrossMsg::Unclaim { client_id: "x".into() });
    assert!(b.control.is_empty());
}

fn big(topic: &'static str) -> Message {
    let payload = Bytes::from(vec![b'p'; 1000]);
    Message::new(TopicName::from_static(topic), payload, QoS::AtMostOnce, false, &Default::default())
}

#[test]
fn the_links_are_not_read_while_a_shard_has_its_share_waiting_unapplied() {
    let mut b = quiet_bridge();
    b.bounds = Bounds { window: usize::MAX, per_shard: 4096 };
    b.on_shard(1, CrossMsg::Interest { from: 1, filter: filter("t/#"), add: true, token: 0 });
    let link = ("b".to_string(), 1);
    let mut seq = 0;
    while b.may_read_links() {
        seq += 1;
        b.on_link_frame(&link, Frame::Publish { seq, message: big("t/1") });
    }
    assert_eq!(seq, 4, "4 messages of 1 KiB and more reach 4 KiB");
    assert_eq!(b.to_shard_bytes(1), b.outbox_bytes[1]);
    // The sender task moves them into the shard's channel: counted until the shard applied
    // them (before, only the outbox's message count held the links back).
    let (batch, bytes) = b.outbox[1].take_batch().unwrap();
    b.outbox_bytes[1] -= bytes;
    b.handed(1, batch.len(), bytes);
    assert_eq!(b.to_shard_bytes(1), bytes);
    assert!(!b.may_read_links(), "in the channel, not applied");
    b.applied(1, 3);
    assert!(!b.may_read_links(), "a batch counts until all of it is applied");
    b.applied(1, 4);
    assert_eq!(b.to_shard_bytes(1), 0);
    assert!(b.may_read_links());
}

#[test]
fn publishers_pause_at_the_windows_half_and_go_on_once_qos0_frames_are_written() {
    let mut b = quiet_bridge();
    b.bounds = Bounds { window: 4096, per_shard: usize::MAX };
    let mut sent = 0;
    while !b.backlogged() {
        sent += 1;
        // t/1 goes to b (t/#) and c (t/+): counted in both windows.
        b.on_shard(0, CrossMsg::Publish(big("t/1")));
    }
    assert_eq!(sent, 2, "2 × 2 copies of 1 KiB and more reach 4 KiB");
    let held = b.link_bytes();
    assert_eq!(writes(&mut b, 0).len(), 2);
    assert_eq!(b.link_bytes(), held / 2, "c's window still holds its two");
    assert!(!b.backlogged(), "QoS 0 frames leave the window as they are written");
    assert_eq!(writes(&mut b, 1).len(), 2);
    assert_eq!(b.link_bytes(), 0);
}

#[test]
fn a_claim_whose_previous_node_dies_after_taking_the_request_goes_on_without_its_session() {
    let mut b = quiet_bridge();
    b.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 1, client_id: "x".into(), want_session: true, user: None },
    );
    let Some(ControlRequest::Claim { id, .. }) = b.control.pop() else { panic!("a claim asked") };
    b.on_control(ControlEvent::Claimed { id, outcome: Ok((Some("b".into()), 9)) });
    let take = writes(&mut b, 0);
    let [Frame::TakeOver { seq, .. }] = take.as_slice() else { panic!("{take:?}") };
    // b confirmed the request (the frame left the window), then died before answering.
    b.on_link_reply(0, Frame::Confirmed { seq: *seq });
    assert!(drain(&mut b, 0).is_empty());
    b.on_control(ControlEvent::NodeDown { node: "b".into() });
    let out = drain(&mut b, 0);
    // (With the NodeDown's other news: its routes and $SYS.)
    assert!(
        out.iter().any(|m| matches!(m, CrossMsg::Claimed { token: 1, ok: true, session: None, .. })),
        "{}",
        out.len()
    );
    // And the client is free for its next claim.
    b.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 2, client_id: "x".into(), want_session: true, user: None },
    );
    assert_eq!(b.control.len(), 1);
}

#[test]
fn a_session_leaves_only_after_every_other_node_and_core_passed_a_barrier() {
    let mut b = quiet_bridge();
    let owner = placement::owner("x", 2);
    let other = 1 - owner;
    // b takes x over: the owner shard hands the session over.
    b.on_link_frame(
        &("b".to_string(), 1),
        Frame::TakeOver { seq: 1, id: 7, client_id: "x".into(), want_session: true },
    );
    let out = drain(&mut b, owner);
    let [CrossMsg::TakeOver { token, .. }] = out.as_slice() else { panic!("{}", out.len()) };
    let token = *token;
    b.on_shard(owner, CrossMsg::HandedOver { token, session: Some(Box::new(empty_session())), last: false });
    writes(&mut b, 0);
    // b has it in place: c is asked for a barrier, the other core for a marker; no release yet.
    b.on_link_frame(&("b".to_string(), 1), Frame::Adopted { seq: 2, id: 7 });
    assert!(
        matches!(drain(&mut b, other).as_slice(), [CrossMsg::SendMarker { to, token: t }] if *to == owner && *t == token)
    );
    assert!(drain(&mut b, owner).is_empty(), "no release before c answered");
    let to_c = writes(&mut b, 1);
    let [Frame::Flush { id, .. }] = to_c.as_slice() else { panic!("{to_c:?}") };
    assert!(writes(&mut b, 0).is_empty(), "b, which took it over, is not asked");
    // c's answer comes on its own link, after what it sent before.
    b.on_link_frame(&("c".to_string(), 1), Frame::Flushed { seq: 1, id: *id });
    assert!(matches!(drain(&mut b, owner).as_slice(), [CrossMsg::Release { token: t, .. }] if *t == token));
    // And a node asked for a barrier answers on its own link.
    b.on_link_frame(&("c".to_string(), 1), Frame::Flush { seq: 2, id: 99 });
    assert!(matches!(writes(&mut b, 1).as_slice(), [Frame::Flushed { id: 99, .. }]));
}

#[test]
fn a_remainder_goes_in_parts_each_asked_for_and_the_takeover_ends_with_its_last() {
    let part = |more: bool| Some(Box::new(HandedSession { more, ..empty_session() }));
    // The old node's side: after Release, the shard's remainder in parts.
    let mut old = quiet_bridge();
    let owner = placement::owner("x", 2);
    old.on_link_frame(
        &("b".to_string(), 1),
        Frame::TakeOver { seq: 1, id: 7, client_id: "x".into(), want_session: true },
    );
    let out = drain(&mut old, owner);
    let [CrossMsg::TakeOver { token, .. }] = out.as_slice() else { panic!("{}", out.len()) };
    let token = *token;
    old.on_shard(owner, CrossMsg::HandedOver { token, session: part(false), last: false });
    old.on_shard(owner, CrossMsg::HandedOver { token, session: part(true), last: true });
    let sent = writes(&mut old, 0);
    assert!(matches!(sent.as_slice(), [_, Frame::Handover { last: true, session: Some(s), .. }] if s.more));
    // b asks for the next part: still the shard's takeover, by its token.
    old.on_link_frame(&("b".to_string(), 1), Frame::NextPart { seq: 2, id: 7 });
    assert!(
        matches!(drain(&mut old, owner).as_slice(), [CrossMsg::NextPart { token: t, .. }] if *t == token)
    );
    old.on_shard(owner, CrossMsg::HandedOver { token, session: part(false), last: true });
    writes(&mut old, 0);
    old.on_link_frame(&("b".to_string(), 1), Frame::NextPart { seq: 3, id: 7 });
    assert!(drain(&mut old, owner).is_empty(), "after the last part the takeover is over");

    // The new node's side: each part of the remainder to the shard, the next asked for.
    let mut new = quiet_bridge();
    new.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 1, client_id: "y".into(), want_session: true, user: None },
    );
    let Some(ControlRequest::Claim { id, .. }) = new.control.pop() else { panic!("a claim asked") };
    new.on_control(ControlEvent::Claimed { id, outcome: Ok((Some("b".into()), 9)) });
    let take = writes(&mut new, 0);
    let [Frame::TakeOver { id: tid, .. }] = take.as_slice() else { panic!("{take:?}") };
    let tid = *tid;
    let from_b = ("b".to_string(), 1);
    new.on_link_frame(&from_b, Frame::Handover { seq: 1, id: tid, last: false, session: part(false) });
    drain(&mut new, 0);
    new.on_shard(0, CrossMsg::Adopted { token: 1 });
    writes(&mut new, 0);
    new.on_link_frame(&from_b, Frame::Handover { seq: 2, id: tid, last: true, session: part(true) });
    assert!(matches!(drain(&mut new, 0).as_slice(), [CrossMsg::Leftovers { token: 1, more: true, .. }]));
    new.on_shard(0, CrossMsg::AskPart { token: 1 });
    assert!(matches!(writes(&mut new, 0).as_slice(), [Frame::NextPart { id, .. }] if *id == tid));
    // The client's next claim waits for the last part.
    new.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 2, client_id: "y".into(), want_session: true, user: None },
    );
    assert!(new.control.is_empty(), "the first takeover of y is not over");
    new.on_link_frame(&from_b, Frame::Handover { seq: 3, id: tid, last: true, session: part(false) });
    assert!(matches!(drain(&mut new, 0).as_slice(), [CrossMsg::Leftovers { token: 1, more: false, .. }]));
    assert!(matches!(new.control.pop(), Some(ControlRequest::Claim { .. })), "now the next claim");
}

#[test]
fn at_start_up_records_naming_this_node_go_to_their_shards_but_those_of_this_runs_claims() {
    let mut b = quiet_bridge();
    for shard in 0..2 {
        b.on_shard(shard, CrossMsg::Ready);
    }
    assert_eq!(b.control.drain(..).collect::<Vec<_>>(), [ControlRequest::Sweep { from: String::new() }]);
    // A claim of this run, in etcd at revision 7.
    b.on_shard(
        0,
        CrossMsg::Claim { shard: 0, token: 1, client_id: "mine".into(), want_session: false, user: None },
    );
    let Some(ControlRequest::Claim { id, .. }) = b.control.pop() else { panic!("the claim asked") };
    b.on_control(ControlEvent::Claimed { id, outcome: Ok((None, 7)) });
    b.outbox.iter_mut().for_each(crate::broker::outbox::Outbox::clear);
    let records = vec![("mine".to_string(), 7), ("old-1".to_string(), 3), ("old-2".to_string(), 4)];
    b.on_control(ControlEvent::Records { records, next: Some("k".into()) });
    let mut told: Vec<String> = (0..2)
        .flat_map(|shard| drain(&mut b, shard).into_iter().map(move |m| (shard, m)))
        .map(|(shard, m)| match m {
            CrossMsg::Unserved { client_id } => {
                assert_eq!(placement::owner(&client_id, 2), shard, "{client_id}: its owner shard");
                client_id.to_string()
            }
            _ => panic!("only Unserved messages"),
        })
        .collect();
    told.sort();
    assert_eq!(told, ["old-1", "old-2"], "this run's claim is not an earlier run's record");
    assert_eq!(b.control.drain(..).collect::<Vec<_>>(), [ControlRequest::Sweep { from: "k".into() }]);
    // A shard that serves nothing for "old-1" lets its record go, compared on its revision.
    b.on_shard(placement::owner("old-1", 2), CrossMsg::Unclaim { client_id: "old-1".into() });
    let unclaim = ControlRequest::Unclaim { client_id: "old-1".into(), revision: 3 };
    assert_eq!(b.control.drain(..).collect::<Vec<_>>(), [unclaim]);
}
