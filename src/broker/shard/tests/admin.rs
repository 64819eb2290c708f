//! The shard's answers to the HTTP endpoint: metrics by reason, listings, kicks.

use super::*;
use crate::broker::admin::{AdminReply, AdminRequest, ClientQuery, DropReason};
use crate::broker::conn_handle::CloseCause;
use crate::codec::ReasonCode;

/// Runs `f` on a thread of its own: the per-core counters start at zero there.
fn on_fresh_core(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(f).join().unwrap();
}

#[test]
fn drops_are_counted_by_reason_and_refused_filters_are_not_drops() {
    on_fresh_core(|| {
        let mut shard = shard();
        let small = connect(&mut shard, "small", true, 0);
        // A client whose Maximum Packet Size a 1 KiB payload exceeds.
        let conn = Rc::new(ConnHandle {
            max_packet_size: 64,
            ..ConnHandle::new(99, "tiny", ProtocolVersion::V5, 1 << 20, -1)
        });
        let (tiny, _) =
            shard.connect(conn, &connect_packet("tiny", ProtocolVersion::V5, true, 0, None), None);
        shard.subscribe(small.sid, filter("t/#"), sub(QoS::AtMostOnce));
        shard.subscribe(tiny, filter("t/#"), sub(QoS::AtMostOnce));
        let publish = |shard: &mut Shard, name: &str, size: usize, retain: bool| {
            let message = Message::new(
                topic(name),
                vec![b'x'; size].into(),
                QoS::AtMostOnce,
                retain,
                &Default::default(),
            );
            shard.publish(None, message, None);
        };
        publish(&mut shard, "t/a", 1024, false);
        publish(&mut shard, "nobody/here", 1, false);
        publish(&mut shard, "kept/here", 1, true);
        shard.stats.acl_denied += 3;
        shard.stats.subscriptions_denied += 2;
        let m = shard.metrics();
        assert_eq!(m.sent, [1, 0, 0], "the small client got it");
        assert_eq!(m.dropped[DropReason::TooLarge as usize], 1, "{:?}", m.dropped);
        assert_eq!(m.dropped[DropReason::NoSubscribers as usize], 1, "a retained one is kept, not dropped");
        assert_eq!(m.dropped[DropReason::NotAuthorized as usize], 1, "two refused filters are not messages");
        assert_eq!(m.received, [3, 0, 0]);
    });
}

#[test]
fn a_kick_closes_a_connection_and_leaves_a_kept_offline_session_alone() {
    let mut shard = shard();
    let online = connect(&mut shard, "online", true, 300);
    assert!(shard.kick("online", false));
    assert_eq!(online.conn.cause(), CloseCause::Server(ReasonCode::AdministrativeAction));
    assert!(shard.sessions.of_client("online").is_some(), "its session is kept");
    assert!(!shard.kick("online", false), "nothing left to close");
    assert!(shard.kick("online", true), "discarded");
    assert!(shard.sessions.of_client("online").is_none());
    assert!(!shard.kick("nobody", true));
}

#[test]
fn clients_are_listed_first_by_identifier_with_the_total_count() {
    let mut shard = shard();
    let _held: Vec<Client> =
        ["d", "a", "c", "b", "x-1"].iter().map(|id| connect(&mut shard, id, true, 0)).collect();
    let query = ClientQuery { prefix: None, username: None, want: 3 };
    let AdminReply::Clients { count, first } = shard.answer(AdminRequest::Clients(query)) else { panic!() };
    assert_eq!(count, 5);
    let ids: Vec<&str> = first.iter().map(|c| c.client_id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let query = ClientQuery { prefix: Some("x-".into()), username: None, want: 10 };
    let AdminReply::Clients { count, .. } = shard.answer(AdminRequest::Clients(query)) else { panic!() };
    assert_eq!(count, 1);
}
