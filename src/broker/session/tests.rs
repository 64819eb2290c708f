//! The session as a state machine, without a connection or a log: a fake connection
//! ([`FakeLink`]) that records every packet the session sends, a journal
//! ([`RecordingJournal`]) that records every log record and replays them as the session log
//! does after a restart, a few examples, and (in `model.rs`) random sequences of inputs
//! checked against a reference model of the MQTT delivery rules.
//!
//! The tests at the end are faults the model found in `mod.rs`, kept as regressions (a
//! `MIRROR_` constant in `model.rs` makes the model tolerate each old behaviour again, to
//! check that it still catches it).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::codec::{OutgoingPublish, Packet, Properties};
use crate::topic::{TopicFilter, TopicName};

mod model;

/// A packet the session sent, as the client would see it: messages are told apart by the
/// number in their topic (`t/{n}`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Publish { packet_id: Option<u16>, dup: bool, qos: QoS, n: u32, retain: bool, identifiers: Vec<u32> },
    PubRel { packet_id: u16, reason: ReasonCode },
}

/// A connection as a test sees it: an outbox that takes `room` more packets (the real one
/// counts bytes; "full" is the same decision), a Maximum Packet Size as a bound on the
/// payload, and the test's clock.
struct FakeLink {
    room: Cell<usize>,
    /// The session asked to be pumped once there is room again (`Link::want_room`).
    wants_room: Cell<bool>,
    /// The client's Maximum Packet Size, as the largest payload it takes.
    max_payload: Cell<Option<usize>>,
    now: Cell<Instant>,
    /// Every packet sent, across every connection this link stood for.
    sent: RefCell<Vec<Out>>,
}

impl FakeLink {
    fn new(room: usize) -> FakeLink {
        FakeLink {
            room: Cell::new(room),
            wants_room: Cell::new(false),
            max_payload: Cell::new(None),
            now: Cell::new(Instant::now()),
            sent: RefCell::new(Vec::new()),
        }
    }

    fn take_room(&self) {
        self.room.set(self.room.get().saturating_sub(1));
    }

    /// The packet identifiers of the PUBLISHes sent, in order.
    fn packet_ids(&self) -> Vec<u16> {
        self.sent
            .borrow()
            .iter()
            .filter_map(|out| match out {
                Out::Publish { packet_id, .. } => *packet_id,
                Out::PubRel { .. } => None,
            })
            .collect()
    }

    /// The message numbers of the PUBLISHes sent, in order.
    fn published(&self) -> Vec<u32> {
        self.sent
            .borrow()
            .iter()
            .filter_map(|out| match out {
                Out::Publish { n, .. } => Some(*n),
                Out::PubRel { .. } => None,
            })
            .collect()
    }
}

impl Link for FakeLink {
    fn can_send(&self) -> bool {
        self.room.get() > 0
    }
    fn want_room(&self) {
        self.wants_room.set(true);
    }
    fn has_room(&self) -> bool {
        self.room.get() > 0
    }
    fn send_publish(&self, publish: OutgoingPublish<'_>, bounded: bool) -> bool {
        if bounded && self.room.get() == 0 {
            return false;
        }
        if self.max_payload.get().is_some_and(|max| publish.payload.len() > max) {
            return false;
        }
        self.take_room();
        self.sent.borrow_mut().push(Out::Publish {
            packet_id: publish.packet_id.map(|p| p.get()),
            dup: publish.dup,
            qos: publish.qos,
            n: number(publish.topic),
            retain: publish.retain,
            identifiers: publish.subscription_identifiers.to_vec(),
        });
        true
    }
    fn send(&self, packet: &Packet) {
        let Packet::PubRel(rel) = packet else { panic!("a session sends no {packet:?}") };
        self.take_room();
        self.sent.borrow_mut().push(Out::PubRel { packet_id: rel.packet_id.get(), reason: rel.reason });
    }
    fn problem(&self, _why: &str) -> Properties {
        Properties::default()
    }
    fn now(&self) -> Instant {
        self.now.get()
    }
}

/// A log record of a persistent session, as `Journal` is told it.
#[derive(Debug, Clone)]
enum Record {
    Message { seq: u64, qos: QoS, retain: bool, identifiers: Vec<u32>, message: Message },
    Sent { seq: u64, packet_id: u16 },
    Released { seq: u64, packet_id: u16 },
    Done { seq: u64 },
    Qos2In(u16),
    Qos2InDone(u16),
}

/// A journal that keeps every record. With `on` false it stands for a session that keeps
/// no log: messages get sequence number 0, and nothing else may name one.
struct RecordingJournal {
    on: bool,
    /// Messages past the in-memory queue may stay here only (as with a data directory).
    spills: bool,
    /// At its share of `--max-disk-bytes`.
    disk_full: bool,
    last_seq: u64,
    records: Vec<Record>,
}

impl RecordingJournal {
    fn new(on: bool) -> RecordingJournal {
        RecordingJournal { on, spills: false, disk_full: false, last_seq: 0, records: Vec::new() }
    }

    /// What the session log recovers after a restart (the rules of
    /// `storage::session_log`): every message without a `done` record, in sequence order,
    /// with the packet identifier it was last sent with and whether it was released; and
    /// the inbound QoS 2 identifiers not released.
    fn replay(&self) -> (Vec<OwedMessage>, Vec<u16>) {
        let mut messages: BTreeMap<u64, OwedMessage> = BTreeMap::new();
        let mut qos2_in = std::collections::BTreeSet::new();
        for record in &self.records {
            match record {
                Record::Message { seq, qos, retain, identifiers, message } => {
                    messages.insert(
                        *seq,
                        OwedMessage {
                            seq: *seq,
                            qos: *qos,
                            retain: *retain,
                            identifiers: identifiers.clone(),
                            message: message.clone(),
                            packet_id: None,
                            released: false,
                        },
                    );
                }
                Record::Sent { seq, packet_id } => {
                    if let Some(m) = messages.get_mut(seq).filter(|m| !m.released) {
                        m.packet_id = Some(*packet_id);
                    }
                }
                Record::Released { seq, packet_id } => {
                    if let Some(m) = messages.get_mut(seq) {
                        m.packet_id = Some(*packet_id);
                        m.released = true;
                    }
                }
                Record::Done { seq } => {
                    messages.remove(seq);
                }
                Record::Qos2In(packet_id) => {
                    qos2_in.insert(*packet_id);
                }
                Record::Qos2InDone(packet_id) => {
                    qos2_in.remove(packet_id);
                }
            }
        }
        (messages.into_values().collect(), qos2_in.into_iter().collect())
    }
}

impl Journal for RecordingJournal {
    fn message(&mut self, qos: QoS, retain: bool, identifiers: &[u32], message: &Message) -> u64 {
        if !self.on {
            return 0;
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        let (identifiers, message) = (identifiers.to_vec(), message.clone());
        self.records.push(Record::Message { seq, qos, retain, identifiers, message });
        seq
    }
    fn sent(&mut self, seq: u64, packet_id: u16) {
        self.records.push(Record::Sent { seq, packet_id });
    }
    fn released(&mut self, seq: u64, packet_id: u16) {
        self.records.push(Record::Released { seq, packet_id });
    }
    fn done(&mut self, seq: u64) {
        self.records.push(Record::Done { seq });
    }
    fn qos2_in(&mut self, packet_id: u16) {
        self.records.push(Record::Qos2In(packet_id));
    }
    fn qos2_in_done(&mut self, packet_id: u16) {
        self.records.push(Record::Qos2InDone(packet_id));
    }
    fn spills(&self) -> bool {
        self.spills
    }
    fn disk_full(&self) -> bool {
        self.disk_full
    }
    fn load(&mut self, want: u64) -> Option<Spilled> {
        self.records.iter().find_map(|r| match r {
            Record::Message { seq, qos, retain, identifiers, message } if *seq == want => Some(Spilled {
                qos: *qos,
                retain: *retain,
                identifiers: identifiers.clone(),
                message: message.clone(),
            }),
            _ => None,
        })
    }
}

/// The number `n` of a topic `t/{n}`.
fn number(topic: &[u8]) -> u32 {
    std::str::from_utf8(topic)
        .ok()
        .and_then(|t| t.strip_prefix("t/"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a test topic: {topic:?}"))
}

fn limits() -> SessionLimits {
    SessionLimits {
        max_inflight: 2,
        max_queued_messages: 10,
        max_queued_bytes: 1 << 20,
        max_spilled_bytes: 0,
        queue_qos0: false,
        policy: QueueFullPolicy::DropOldest,
        qos0_overflow: Qos0Overflow::Backpressure,
    }
}

/// Message `n`, on topic `t/{n}`, with a payload of `payload` bytes.
fn message_of(n: u32, payload: usize) -> Message {
    let topic = TopicName::new(Bytes::from(format!("t/{n}"))).unwrap();
    Message::new(topic, Bytes::from(vec![b'x'; payload]), QoS::ExactlyOnce, false, &Properties::default())
}

fn message(n: u32) -> Message {
    message_of(n, 1)
}

fn pid(id: u16) -> PacketId {
    PacketId::new(id).unwrap()
}

#[test]
fn a_full_window_queues_and_acks_release_in_order() {
    let link = FakeLink::new(100);
    let limits = limits();
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    let deliveries: Vec<_> =
        (0..4).map(|n| session.deliver(&message(n), QoS::AtLeastOnce, false, &[], None, &mut io)).collect();
    assert_eq!(deliveries, [Delivery::Sent, Delivery::Sent, Delivery::Queued, Delivery::Queued]);
    assert_eq!(session.backlog(), (2, 2));
    assert!(session.on_puback(pid(1), &mut io));
    assert!(!session.on_puback(pid(1), &mut io), "a second PUBACK for one identifier matches nothing");
    assert_eq!(session.backlog(), (1, 2));
    assert_eq!(link.packet_ids(), [1, 2, 3]);
}

#[test]
fn a_reattached_session_resends_with_dup_and_pubrel_before_anything_new() {
    let link = FakeLink::new(100);
    let limits = limits();
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    session.deliver(&message(1), QoS::ExactlyOnce, false, &[], None, &mut io);
    session.deliver(&message(2), QoS::AtLeastOnce, false, &[7], None, &mut io);
    session.on_pubrec(pid(1), ReasonCode::Success, &mut io);
    session.detach();
    let mut io: Io<'_, FakeLink> = Io { link: None, journal: &mut NoJournal, limits: &limits };
    assert_eq!(session.deliver(&message(3), QoS::AtLeastOnce, false, &[], None, &mut io), Delivery::Queued);
    link.sent.borrow_mut().clear();
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    let publish = |packet_id, dup, qos, n, identifiers: &[u32]| Out::Publish {
        packet_id: Some(packet_id),
        dup,
        qos,
        n,
        retain: false,
        identifiers: identifiers.to_vec(),
    };
    assert_eq!(
        *link.sent.borrow(),
        [
            Out::PubRel { packet_id: 1, reason: ReasonCode::Success },
            publish(2, true, QoS::AtLeastOnce, 2, &[7]),
        ],
        "the window (2) is full with the two resent"
    );
    assert!(session.on_pubcomp(pid(1), &mut io));
    assert_eq!(link.sent.borrow().last(), Some(&publish(3, false, QoS::AtLeastOnce, 3, &[])));
}

#[test]
fn a_restored_session_skips_an_identifier_left_in_flight_a_whole_turn() {
    // Message 1 went out with identifier 2 and stayed unacknowledged while the sequence
    // went a whole turn: message 2 took identifier 1. Next comes 2 again, which is taken.
    let limits = SessionLimits { max_inflight: 10, ..limits() };
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    for (seq, packet_id) in [(1, 2), (2, 1)] {
        session.restore(
            OwedMessage {
                seq,
                qos: QoS::AtLeastOnce,
                retain: false,
                identifiers: Vec::new(),
                message: message(seq as u32),
                packet_id: Some(packet_id),
                released: false,
            },
            None,
        );
    }
    let link = FakeLink::new(100);
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    session.deliver(&message(3), QoS::AtLeastOnce, false, &[], None, &mut io);
    assert_eq!(link.packet_ids(), [2, 1, 3]);
}

#[test]
fn identifiers_wrap_past_65535_without_zero() {
    let limits = SessionLimits { max_inflight: 3, ..limits() };
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    let link = FakeLink::new(usize::MAX);
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    // One message stays in flight while 65,540 others are sent and acknowledged.
    session.deliver(&message(0), QoS::AtLeastOnce, false, &[], None, &mut io);
    for n in 1..=65_540 {
        session.deliver(&message(n), QoS::AtLeastOnce, false, &[], None, &mut io);
        let sent = link.sent.borrow_mut().pop();
        let Some(Out::Publish { packet_id: Some(id), .. }) = sent else { panic!("{sent:?}") };
        assert_ne!(id, 1, "identifier 1 is still in flight");
        assert!(session.on_puback(pid(id), &mut io));
    }
    assert_eq!(session.backlog(), (0, 1));
}

#[test]
fn a_delivery_waits_behind_resends_even_when_the_outbox_has_room_again() {
    // Two messages in flight; the new connection's outbox takes one, so one resend waits
    // for room. The outbox drains a little (no wake-up yet) and a message arrives: it must
    // queue behind the resend (MQTT-4.4.0-1), not overtake it.
    let link = FakeLink::new(100);
    let limits = SessionLimits { max_inflight: 10, ..limits() };
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    for n in 1..=2 {
        session.deliver(&message(n), QoS::AtLeastOnce, false, &[], None, &mut io);
    }
    session.detach();
    link.sent.borrow_mut().clear();
    link.room.set(1);
    session.attach(ProtocolVersion::V5, 100, &mut io);
    assert!(link.wants_room.get());
    link.room.set(5);
    assert_eq!(session.deliver(&message(3), QoS::AtLeastOnce, false, &[], None, &mut io), Delivery::Queued);
    session.pump(&mut io);
    let ids: Vec<_> = link
        .sent
        .borrow()
        .iter()
        .map(|out| match out {
            Out::Publish { packet_id, dup, n, .. } => (packet_id.unwrap(), *dup, *n),
            Out::PubRel { .. } => unreachable!(),
        })
        .collect();
    assert_eq!(ids, [(1, true, 1), (2, true, 2), (3, false, 3)]);
}

// --- Bugs found by the model (see `model.rs`). Each fails until session/mod.rs is fixed. ---

/// Was a fault (fixed): a message that alone exceeds `max_queued_bytes` can never be queued, yet under
/// `DropOldest` (and `Backpressure`) `enqueue` first drops every queued message, oldest
/// first, to make room it will never have, and then drops the new one too: one oversized
/// message costs an offline client its whole queue. It should be dropped on its own
/// (`Delivery::Dropped`, `dropped` 1) and leave the queue as it was.
#[test]
fn an_oversized_message_evicts_nothing() {
    let limits = SessionLimits { max_queued_bytes: 300, ..limits() };
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    let mut io: Io<'_, FakeLink> = Io { link: None, journal: &mut NoJournal, limits: &limits };
    for n in 1..=2 {
        assert_eq!(
            session.deliver(&message(n), QoS::AtLeastOnce, false, &[], None, &mut io),
            Delivery::Queued
        );
    }
    // 3 + 200 + 128 bytes: more than the whole bound.
    let oversized = message_of(3, 200);
    assert_eq!(session.deliver(&oversized, QoS::AtLeastOnce, false, &[], None, &mut io), Delivery::Dropped);
    assert_eq!(session.dropped, 1, "only the oversized message is dropped");
    assert_eq!(session.backlog(), (2, 0), "the queue keeps messages 1 and 2");
}

/// Was a fault (fixed): `attach` marks every message in flight to be sent again and `resend` sends them
/// all, whatever the new connection's Receive Maximum: a client that reconnects with a
/// smaller one than it had gets more unacknowledged QoS 1/2 PUBLISHes than it allows
/// (MQTT-3.3.4-9; a v5 client may disconnect with 0x93 Receive Maximum exceeded). The
/// others should be sent again, with their identifiers, as acknowledgements make room.
#[test]
fn a_reattached_session_resends_within_the_new_receive_maximum() {
    let link = FakeLink::new(100);
    let limits = limits();
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 2, &mut io);
    for n in 1..=2 {
        assert_eq!(session.deliver(&message(n), QoS::AtLeastOnce, false, &[], None, &mut io), Delivery::Sent);
    }
    session.detach();
    link.sent.borrow_mut().clear();
    session.attach(ProtocolVersion::V5, 1, &mut io);
    assert_eq!(link.packet_ids(), [1], "Receive Maximum 1: one PUBLISH unacknowledged at a time");
    assert!(session.on_puback(pid(1), &mut io));
    assert_eq!(link.packet_ids(), [1, 2]);
}

/// Was a fault (fixed): `resend` ignores `send_publish` failing. A client that reconnects with a smaller
/// Maximum Packet Size than a message in flight to it is never sent it again, and the
/// message stays in flight for good: it holds a place in the window (with a window of 1
/// nothing is delivered to that client again) and in the journal. MQTT-3.1.2-25: a packet
/// too large to send is discarded, and the server behaves as if its delivery completed;
/// so it should leave the window (counted in `dropped`, its journal record done).
#[test]
fn a_message_too_large_to_resend_leaves_the_window() {
    let link = FakeLink::new(100);
    let limits = SessionLimits { max_inflight: 1, ..limits() };
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    assert_eq!(
        session.deliver(&message_of(1, 100), QoS::AtLeastOnce, false, &[], None, &mut io),
        Delivery::Sent
    );
    assert_eq!(session.deliver(&message(2), QoS::AtLeastOnce, false, &[], None, &mut io), Delivery::Queued);
    session.detach();
    link.sent.borrow_mut().clear();
    link.max_payload.set(Some(10));
    session.attach(ProtocolVersion::V5, 100, &mut io);
    assert_eq!(session.dropped, 1, "message 1 is discarded");
    assert_eq!(link.packet_ids(), [2], "message 2 takes its place in the window");
    assert_eq!(session.backlog(), (0, 1));
}

/// Was a fault (fixed): on disconnection `take_shared_pending` takes back a shared QoS 2 message that was
/// sent and not yet PUBREC'd, and the shard gives it to another member of the group. The
/// client may hold it already: MQTT-4.8.2-4 says the delivery is completed with this client
/// when it reconnects, and MQTT-4.8.2-5 that, if its session ends first, it goes to no other
/// client. (`take_shared_stalled` keeps QoS 2 in flight for that reason; QoS 1 may move,
/// and queued messages, never sent, may too.)
#[test]
fn a_shared_qos2_message_in_flight_stays_with_its_client() {
    let link = FakeLink::new(100);
    let limits = limits();
    let key = Arc::new(GroupKey {
        group: "g".into(),
        filter: TopicFilter::new(Bytes::from_static(b"t/#")).unwrap(),
    });
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    session.expiry_interval = 60;
    let mut io = Io { link: Some(&link), journal: &mut NoJournal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    for n in 1..=2 {
        let delivery = session.deliver(&message(n), QoS::ExactlyOnce, false, &[], Some(key.clone()), &mut io);
        assert_eq!(delivery, Delivery::Sent);
    }
    session.on_pubrec(pid(1), ReasonCode::Success, &mut io);
    session.detach();
    let taken = session.take_shared_pending(&mut NoJournal);
    assert_eq!(taken.len(), 0, "message 2 was sent at QoS 2: it is not given to another member");
    assert_eq!(session.backlog(), (0, 2));
}

#[test]
fn a_journaled_queue_past_its_bound_stays_in_the_log_and_streams_back_in_order() {
    let link = FakeLink::new(1 << 20);
    let limits = SessionLimits { max_queued_messages: 10, max_spilled_bytes: 1 << 30, ..limits() };
    let mut journal = RecordingJournal::new(true);
    journal.spills = true;
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    session.expiry_interval = 600;
    // Offline: 1,000 messages for a queue of 10.
    let mut io: Io<'_, FakeLink> = Io { link: None, journal: &mut journal, limits: &limits };
    for n in 0..1000 {
        assert_eq!(
            session.deliver(&message(n), QoS::AtLeastOnce, false, &[], None, &mut io),
            Delivery::Queued
        );
    }
    assert_eq!(session.backlog(), (1000, 0));
    assert_eq!(session.queue.len(), 10, "only the in-memory queue holds messages");
    assert_eq!(session.dropped, 0);
    // Connected: every one arrives, in order, as the client acknowledges.
    let mut io = Io { link: Some(&link), journal: &mut journal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    let mut acked = 0;
    while acked < 1000 {
        let sent = link.packet_ids();
        assert!(sent.len() > acked, "stalled after {acked}");
        session.on_puback(pid(sent[acked]), &mut io);
        acked += 1;
        assert!(session.queue.len() <= 10);
    }
    let got = link.published();
    assert_eq!(got, (0..1000).collect::<Vec<_>>());
    assert_eq!(session.backlog(), (0, 0));
    assert!(session.spill.is_none());
}

#[test]
fn a_spilled_queue_is_bounded_in_bytes() {
    let limits = SessionLimits { max_queued_messages: 2, max_spilled_bytes: 2_000, ..limits() };
    let mut journal = RecordingJournal::new(true);
    journal.spills = true;
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    session.expiry_interval = 600;
    let mut io: Io<'_, FakeLink> = Io { link: None, journal: &mut journal, limits: &limits };
    let outcomes: Vec<Delivery> = (0..100)
        .map(|n| session.deliver(&message_of(n, 100), QoS::AtLeastOnce, false, &[], None, &mut io))
        .collect();
    let queued = outcomes.iter().filter(|d| **d == Delivery::Queued).count();
    assert!(queued > 2 && queued < 100, "{queued} queued");
    assert_eq!(session.dropped as usize, 100 - queued);
    assert!(session.spill.as_ref().unwrap().bytes <= 2_000);
}

#[test]
fn a_shared_message_spills_behind_spilled_ones_instead_of_overtaking_or_evicting() {
    let link = FakeLink::new(1 << 20);
    let limits = SessionLimits { max_queued_messages: 2, max_spilled_bytes: 1 << 30, ..limits() };
    let mut journal = RecordingJournal::new(true);
    journal.spills = true;
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    session.expiry_interval = 600;
    let key = Arc::new(GroupKey { group: "g".into(), filter: TopicFilter::new("t/#".to_string()).unwrap() });
    let mut io: Io<'_, FakeLink> = Io { link: None, journal: &mut journal, limits: &limits };
    for n in 0..5 {
        session.deliver(&message(n), QoS::AtLeastOnce, false, &[], None, &mut io);
    }
    assert_eq!(
        session.deliver(&message(5), QoS::AtLeastOnce, false, &[], Some(key), &mut io),
        Delivery::Queued
    );
    assert_eq!((session.queue.len(), session.backlog().0, session.dropped), (2, 6, 0));
    let mut io = Io { link: Some(&link), journal: &mut journal, limits: &limits };
    session.attach(ProtocolVersion::V5, 100, &mut io);
    let mut acked = 0;
    while acked < 6 {
        let sent = link.packet_ids();
        assert!(sent.len() > acked, "stalled after {acked}");
        session.on_puback(pid(sent[acked]), &mut io);
        acked += 1;
    }
    let got = link.published();
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);
}

#[test]
fn at_the_disk_bound_an_offline_queue_drops_new_messages_and_a_connected_one_has_no_room() {
    let limits = SessionLimits { max_queued_messages: 2, max_spilled_bytes: 1 << 30, ..limits() };
    let mut journal = RecordingJournal::new(true);
    journal.spills = true;
    let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, Instant::now());
    session.expiry_interval = 600;
    let mut io: Io<'_, FakeLink> = Io { link: None, journal: &mut journal, limits: &limits };
    for n in 0..4 {
        session.deliver(&message(n), QoS::AtLeastOnce, false, &[], None, &mut io);
    }
    assert_eq!((session.backlog().0, session.dropped), (4, 0), "two in memory, two spilled");
    journal.disk_full = true;
    let mut io: Io<'_, FakeLink> = Io { link: None, journal: &mut journal, limits: &limits };
    assert_eq!(session.deliver(&message(4), QoS::AtLeastOnce, false, &[], None, &mut io), Delivery::Dropped);
    assert_eq!((session.backlog().0, session.dropped), (4, 1), "the new one dropped, none evicted");
    // Connected: the shard asks before routing; at the disk bound (it may not spill) a
    // session that spilled has no room, even once its memory queue drained.
    let link = FakeLink::new(1 << 20);
    let mut io = Io { link: Some(&link), journal: &mut journal, limits: &limits };
    session.attach(ProtocolVersion::V5, 1, &mut io);
    session.on_puback(pid(link.packet_ids()[0]), &mut io);
    assert!(session.queue.len() < 2 && session.has_spill());
    assert!(!session.has_room_for(&message(5), &limits, false));
    assert!(session.has_room_for(&message(5), &limits, true), "below the disk bound it spills");
    // A connected session that holds publishers takes the one routed before the shard knew.
    assert_eq!(session.deliver(&message(5), QoS::AtLeastOnce, false, &[], None, &mut io), Delivery::Queued);
    assert_eq!(session.dropped, 1);
}
