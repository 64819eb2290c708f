//! Acknowledge after append, without a data directory: nothing to wait for.

use super::*;
use crate::broker::cross::Confirm;
use crate::broker::placement;
use crate::broker::shard::handle_cross;
use crate::storage::LogMark;

#[test]
fn without_a_data_directory_publish_never_waits_or_fails() {
    let shard = shard_ref(shard_with(0, 2, |_| {}));
    // Peer 1 has durable subscriptions and a subscriber to everything under d/.
    handle_cross(&shard, CrossMsg::Durable { from: 1, present: true, token: 3 });
    handle_cross(&shard, CrossMsg::Interest { from: 1, filter: filter("d/#"), add: true, token: 0 });
    let mut s = shard.borrow_mut();
    assert!(matches!(&take_outbox(&mut s, 1)[..], [CrossMsg::InterestAck { token: 3 }]));
    assert!(s.durability.peers[1]);
    let publisher = connect(&mut s, "p", false, 60);
    let local = connect(&mut s, "l", false, 60);
    s.subscribe(local.sid, filter("d/#"), sub(QoS::ExactlyOnce));
    take_outbox(&mut s, 1);

    // A retained topic peer 1 owns.
    let owned_by_1 = (0..).map(|n| format!("d/{n}")).find(|t| placement::owner(t, 2) == 1).unwrap();
    for (name, qos, retain) in [
        ("d/x", QoS::AtLeastOnce, false),
        ("d/y", QoS::ExactlyOnce, false),
        (owned_by_1.as_str(), QoS::AtLeastOnce, true),
    ] {
        let mut m = message(name, qos, "v");
        m.retain = retain;
        let confirm = Confirm {
            shard: 0,
            conn: publisher.conn.id,
            seq: publisher.conn.next_ack_seq(),
            session: publisher.sid,
            qos2_packet_id: (qos == QoS::ExactlyOnce).then_some(1),
        };
        let published = s.publish(Some(publisher.sid), m, Some(confirm));
        assert!(published.matched, "{name}");
        assert_eq!(published.waits, 0, "{name}: no log, no confirmation to wait for");
        assert!(!published.failed, "{name}");
        for msg in take_outbox(&mut s, 1) {
            match msg {
                CrossMsg::Publish(_) => {}
                CrossMsg::RetainSet(_, confirm) => assert!(confirm.is_none(), "{name}"),
                _ => panic!("{name}: only plain publishes and retained sets cross"),
            }
        }
    }
    assert_eq!(payloads(&local.conn).len(), 3);
    assert!(!publisher.conn.closing.get());
    assert_eq!(s.log_position(), LogMark::default());
    assert!(s.take_flush().is_empty());
    assert!(s.durability.awaiting_flush.is_empty());
    assert!(s.durable_announcement().is_none(), "persistent sessions without a log announce nothing");
}
