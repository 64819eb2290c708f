//! The session as a state machine, without a connection or a log.

use std::cell::{Cell, RefCell};
use std::time::Instant;

use bytes::Bytes;

use super::*;
use crate::codec::{OutgoingPublish, Packet, Properties};
use crate::topic::TopicName;

/// A connection as a test sees it: an outbox that takes `room` more packets.
struct FakeLink {
    room: Cell<usize>,
    sent: RefCell<Vec<(Option<u16>, bool)>>,
}

impl Link for FakeLink {
    fn can_send(&self) -> bool {
        self.room.get() > 0
    }
    fn want_room(&self) {}
    fn has_room(&self) -> bool {
        self.room.get() > 0
    }
    fn send_publish(&self, publish: OutgoingPublish<'_>, _bounded: bool) -> bool {
        self.room.set(self.room.get().saturating_sub(1));
        self.sent.borrow_mut().push((publish.packet_id.map(|p| p.get()), publish.dup));
        true
    }
    fn send(&self, _packet: &Packet) {}
    fn problem(&self, _why: &str) -> Properties {
        Properties::default()
    }
    fn now(&self) -> Instant {
        Instant::now()
    }
}

fn limits() -> SessionLimits {
    SessionLimits {
        max_inflight: 2,
        max_queued_messages: 10,
        max_queued_bytes: 1 << 20,
        queue_qos0: false,
        policy: QueueFullPolicy::DropOldest,
    }
}

fn message(n: u32) -> Message {
    let topic = TopicName::new(Bytes::from(format!("t/{n}"))).unwrap();
    Message::new(topic, Bytes::from_static(b"x"), QoS::AtLeastOnce, false, &Properties::default())
}

#[test]
fn a_full_window_queues_and_acks_release_in_order() {
    let link = FakeLink { room: Cell::new(100), sent: RefCell::new(Vec::new()) };
    let limits = limits();
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    let deliveries: Vec<_> =
        (0..4).map(|n| session.deliver(&message(n), QoS::AtLeastOnce, false, &[], None, &mut io)).collect();
    assert_eq!(deliveries, [Delivery::Sent, Delivery::Sent, Delivery::Queued, Delivery::Queued]);
    assert_eq!(session.backlog(), (2, 2));
    let first = PacketId::new(1).unwrap();
    assert!(session.on_puback(first, &mut io));
    assert!(!session.on_puback(first, &mut io), "a second PUBACK for one identifier matches nothing");
    assert_eq!(session.backlog(), (1, 2));
    let ids: Vec<_> = link.sent.borrow().iter().map(|(id, _)| id.unwrap()).collect();
    assert_eq!(ids, [1, 2, 3]);
}
