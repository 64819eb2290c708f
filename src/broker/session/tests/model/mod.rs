//! Random sequences of inputs to one session, checked step by step against a reference
//! model of what MQTT 3.1.1/5.0 asks of a server delivering to a client.
//!
//! Inputs: deliveries (QoS 0/1/2, some through a shared subscription group, some expiring,
//! some larger than the connection takes), PUBACK / PUBREC (success or error) / PUBCOMP
//! mostly for identifiers in flight or sent before and some bogus, connections attached
//! (with a Receive Maximum, an outbox room, a Maximum Packet Size) and detached, the outbox
//! filling and draining (the writer pumps the session when it asked for room), the tick's
//! stall check, shared messages taken back (on disconnection, and from a stalled member),
//! inbound QoS 2 identifiers received and released, and restarts that rebuild the session
//! from its journal. A case may start from a restored session whose identifiers are near
//! the wrap, or one of which has been in flight a whole turn of the sequence.
//!
//! The model holds the messages in flight and queued and predicts every packet the
//! session sends (new identifiers excepted: any one not in flight will do), what each call
//! returns, the drop counter and the queue's bounds. After every step the session's state
//! is compared with it, and its journal with what it still owes; at the end the session is
//! drained by a client that acknowledges everything, and every QoS 1/2 message must have
//! been sent as new exactly once, in delivery order, unless the model saw it dropped or
//! taken back.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::collection::vec;
use proptest::prelude::*;

use crate::topic::TopicFilter;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;

use super::*;
use crate::broker::message::MESSAGE_OVERHEAD;

type Check = Result<(), TestCaseError>;

/// Which packet identifier an acknowledgement names.
#[derive(Debug, Clone, Copy)]
enum Ack {
    /// The `i`-th in flight (modulo) of those expecting this acknowledgement, else of all
    /// in flight; identifier 1 when none is.
    InFlight(usize),
    /// The `i`-th identifier of all PUBLISHes sent so far (modulo): often done already.
    Sent(usize),
    /// Any identifier.
    Id(u16),
}

#[derive(Debug, Clone)]
enum Op {
    Deliver {
        qos: QoS,
        /// The shared subscription group it came through (index into `GROUPS`).
        shared: Option<usize>,
        payload: usize,
        /// Expires that many seconds after delivery.
        expiry: Option<u64>,
        identifier: bool,
        retain: bool,
    },
    PubAck(Ack),
    PubRec(Ack, bool),
    PubComp(Ack),
    Attach {
        receive_maximum: usize,
        room: usize,
        max_payload: Option<usize>,
    },
    /// The connection ends; with `take_shared`, the shard takes its shared messages back.
    Detach {
        take_shared: bool,
    },
    /// `take_shared_pending` again while offline.
    TakeShared,
    /// The writer drained the outbox to room for `room` packets. With `wake` it is below
    /// half its bound: the writer pumps the session if it asked for room. Without, the
    /// session is not told (but sees the room on its next call).
    Room {
        room: usize,
        wake: bool,
    },
    /// The clock moves on this many seconds and the shard's tick checks for a stall.
    Tick(u64),
    /// A stalled member gives up its shared messages of group `group` (and of every group
    /// with `both`), QoS 1 in flight too with `in_flight`.
    TakeStalled {
        in_flight: bool,
        group: usize,
        both: bool,
    },
    ReceiveQos2(u16),
    ReleaseQos2(u16),
    /// The broker restarts: the session is rebuilt from its journal, offline.
    Restart,
}

/// A fault the model found, now fixed (`an_oversized_message_evicts_nothing` in tests.rs): a message larger than
/// `max_queued_bytes` on its own empties the queue (oldest first, under `DropOldest` and
/// `Backpressure`) before it is dropped itself. Setting this makes the model
/// tolerate the old behaviour again.
const MIRROR_OVERSIZED_EVICTS: bool = false;

/// A fault the model found, now fixed (`a_reattached_session_resends_within_the_new_receive_maximum` in tests.rs): on
/// attach every message in flight is sent again, however many the new connection's Receive
/// Maximum allows (MQTT-3.3.4-9). With this false (fixed) the model sends again only while fewer than the window are
/// in flight and not waiting to be sent again (acknowledged or PUBREC'd meanwhile counts as
/// sent), the others as acknowledgements make room.
const MIRROR_RESEND_PAST_WINDOW: bool = false;

/// A fault the model found, now fixed (`a_message_too_large_to_resend_leaves_the_window` in tests.rs): a message in
/// flight that the reattached client's Maximum Packet Size no longer takes is not sent
/// again, and stays in flight for good, holding a place in the window. With this false
/// (fixed) the model discards
/// it, as if its delivery had completed (MQTT-3.1.2-25), and counts it dropped.
const MIRROR_UNSENDABLE_RESEND_STAYS: bool = false;

/// A fault the model found, now fixed (`a_shared_qos2_message_in_flight_stays_with_its_client` in tests.rs):
/// `take_shared_pending` takes back QoS 2 messages sent and not yet PUBREC'd, to give them
/// to another member of the group (MQTT-4.8.2-4 and -5 forbid it). With this false (fixed)
/// the model takes back
/// QoS 1 messages in flight only.
const MIRROR_SHARED_QOS2_TAKEN_BACK: bool = false;

const GROUPS: [&str; 2] = ["g0", "g1"];
/// The shard's `--shared-ack-timeout` in these tests.
const STALL_TIMEOUT: u64 = 3;

/// A session restored at the start of a case: messages owed from before, sent with
/// identifiers counting up from `start` (the first, with `straggler`, a whole turn of the
/// sequence before the others), then `queued` messages not sent.
#[derive(Debug, Clone)]
struct Prelude {
    start: u16,
    sent: Vec<(QoS, bool)>,
    straggler: bool,
    queued: usize,
}

#[derive(Debug, Clone)]
struct Case {
    limits: SessionLimits,
    persistent: bool,
    prelude: Option<Prelude>,
    ops: Vec<Op>,
}

fn arb_qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::AtLeastOnce, QoS::ExactlyOnce, QoS::ExactlyOnce])
}

fn arb_ack() -> impl Strategy<Value = Ack> {
    prop_oneof![
        6 => any::<usize>().prop_map(Ack::InFlight),
        2 => any::<usize>().prop_map(Ack::Sent),
        1 => prop_oneof![1..=8u16, any::<u16>()].prop_map(|id| Ack::Id(id.max(1))),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (
            arb_qos(),
            prop::option::weighted(0.3, 0..GROUPS.len()),
            select(vec![0usize, 0, 1, 8, 30, 60, 100]),
            prop::option::weighted(0.15, 1..=4u64),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(qos, shared, payload, expiry, identifier, retain)| Op::Deliver {
                qos,
                shared,
                payload,
                expiry,
                identifier,
                retain
            }),
        12 => arb_ack().prop_map(Op::PubAck),
        10 => (arb_ack(), prop::bool::weighted(0.15)).prop_map(|(ack, error)| Op::PubRec(ack, error)),
        10 => arb_ack().prop_map(Op::PubComp),
        5 => (
            select(vec![1usize, 2, 3, 5, 65_535]),
            select(vec![0usize, 1, 2, 100, 100, 100]),
            prop::option::weighted(0.15, select(vec![0usize, 8, 30])),
        )
            .prop_map(|(receive_maximum, room, max_payload)| Op::Attach { receive_maximum, room, max_payload }),
        4 => any::<bool>().prop_map(|take_shared| Op::Detach { take_shared }),
        1 => Just(Op::TakeShared),
        6 => (select(vec![0usize, 0, 1, 2, 100, 100, 100]), prop::bool::weighted(0.6))
            .prop_map(|(room, wake)| Op::Room { room, wake }),
        4 => (0..=2u64).prop_map(Op::Tick),
        2 => (any::<bool>(), 0..GROUPS.len(), prop::bool::weighted(0.3))
            .prop_map(|(in_flight, group, both)| Op::TakeStalled { in_flight, group, both }),
        3 => (1..=4u16).prop_map(Op::ReceiveQos2),
        3 => (1..=4u16).prop_map(Op::ReleaseQos2),
        2 => Just(Op::Restart),
    ]
}

fn arb_prelude() -> impl Strategy<Value = Prelude> {
    (
        select(vec![1u16, 3, 40_000, 65_533, 65_535]),
        vec((select(vec![QoS::AtLeastOnce, QoS::ExactlyOnce]), any::<bool>()), 0..=3),
        any::<bool>(),
        0..=1usize,
    )
        .prop_map(|(start, sent, straggler, queued)| Prelude { start, sent, straggler, queued })
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        1..=4usize,
        select(vec![1usize, 2, 3, 5, 20]),
        // A message costs 133 to 237 bytes (`MMsg::cost`): under 200, the largest never fits.
        select(vec![200usize, 400, 1_000, 1 << 20]),
        any::<bool>(),
        (
            select(vec![
                QueueFullPolicy::DropOldest,
                QueueFullPolicy::DropNew,
                QueueFullPolicy::Backpressure,
                QueueFullPolicy::Refuse,
            ]),
            select(vec![Qos0Overflow::Backpressure, Qos0Overflow::Drop]),
        ),
        any::<bool>(),
        prop::option::weighted(0.3, arb_prelude()),
        vec(arb_op(), 1..80),
        prop::option::weighted(
            0.75,
            (select(vec![1usize, 2, 3, 65_535]), select(vec![1usize, 2, 100, 100, 100])),
        ),
    )
        .prop_map(
            |(
                max_inflight,
                max_queued_messages,
                max_queued_bytes,
                queue_qos0,
                (policy, qos0_overflow),
                persistent,
                prelude,
                mut ops,
                attach,
            )| {
                if let Some((receive_maximum, room)) = attach {
                    ops.insert(0, Op::Attach { receive_maximum, room, max_payload: None });
                }
                let limits = SessionLimits {
                    max_inflight,
                    max_queued_messages,
                    max_queued_bytes,
                    max_spilled_bytes: 0,
                    queue_qos0,
                    policy,
                    qos0_overflow,
                };
                Case { limits, persistent, prelude: prelude.filter(|_| persistent), ops }
            },
        )
}

/// A message as the model knows it.
#[derive(Debug, Clone)]
struct MMsg {
    n: u32,
    qos: QoS,
    retain: bool,
    identifiers: Vec<u32>,
    shared: Option<usize>,
    seq: u64,
    payload: usize,
    /// Clock second it expires at.
    expires: Option<u64>,
}

impl MMsg {
    /// What the session's queue counts for it: the message (`Message::size`) and its
    /// subscription identifiers.
    fn cost(&self) -> usize {
        format!("t/{}", self.n).len() + self.payload + MESSAGE_OVERHEAD + 4 * self.identifiers.len()
    }

    fn publish(&self, packet_id: Option<u16>, dup: bool) -> Out {
        Out::Publish {
            packet_id,
            dup,
            qos: self.qos,
            n: self.n,
            retain: self.retain,
            identifiers: self.identifiers.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct MInflight {
    m: MMsg,
    packet_id: u16,
    /// PUBREC received: PUBREL is what it waits on.
    released: bool,
    /// Not yet sent again on the connection attached since.
    resend: bool,
    /// Sent (PUBLISH or PUBREL) on the connection attached.
    sent_here: bool,
}

/// What became of a message delivered (or restored) in a case.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Fate {
    qos1_2: bool,
    dropped: bool,
    /// Taken back while queued (never sent here).
    taken_queued: bool,
    /// Sent before the case began (a prelude message): never new in this case.
    sent_before: bool,
    /// Discarded from the in-flight window, after it was sent.
    discarded: bool,
}

/// The reference model: the MQTT rules for a server's side of QoS 1/2 delivery, with the
/// broker's queue bounds and full-queue policies.
#[derive(Default)]
struct Model {
    attached: bool,
    window: usize,
    room: usize,
    max_payload: Option<usize>,
    inflight: Vec<MInflight>,
    queue: VecDeque<MMsg>,
    dropped: u64,
    qos2_in: BTreeSet<u16>,
    acks: u32,
    /// `acks` as the tick last saw it change, and when.
    watch: (u32, u64),
    last_seq: u64,
}

struct Harness {
    limits: SessionLimits,
    persistent: bool,
    base: Instant,
    clock: u64,
    session: Session,
    link: FakeLink,
    journal: RecordingJournal,
    groups: Vec<Arc<GroupKey>>,
    model: Model,
    /// Packets of `link.sent` the model has accounted for.
    seen: usize,
    next_n: u32,
    fates: BTreeMap<u32, Fate>,
    /// Drops counted by sessions replaced by a restart.
    dropped_before: u64,
    /// Messages in flight when the connection was attached (see
    /// `MIRROR_RESEND_PAST_WINDOW`).
    carried: usize,
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($fmt)+)));
        }
    };
}

impl Harness {
    fn new(limits: SessionLimits, persistent: bool) -> Harness {
        let base = Instant::now();
        let link = FakeLink::new(0);
        link.now.set(base);
        let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, base);
        session.expiry_interval = if persistent { 60 } else { 0 };
        let groups = GROUPS
            .iter()
            .map(|g| {
                let filter = TopicFilter::new(Bytes::from_static(b"t/#")).unwrap();
                Arc::new(GroupKey { group: g.to_string(), filter })
            })
            .collect();
        Harness {
            limits,
            persistent,
            base,
            clock: 0,
            session,
            link,
            journal: RecordingJournal::new(persistent),
            groups,
            model: Model::default(),
            seen: 0,
            next_n: 100,
            fates: BTreeMap::new(),
            dropped_before: 0,
            carried: 0,
        }
    }

    /// Runs `f` with the session and its surroundings as the shard passes them.
    fn with_io<R>(&mut self, f: impl FnOnce(&mut Session, &mut Io<'_, FakeLink>) -> R) -> R {
        let link = self.model.attached.then_some(&self.link);
        let mut io = Io { link, journal: &mut self.journal, limits: &self.limits };
        f(&mut self.session, &mut io)
    }

    fn group_of(&self, key: &Option<Arc<GroupKey>>) -> Option<usize> {
        key.as_ref().map(|key| self.groups.iter().position(|g| g == key).expect("a test group"))
    }

    // --- The model's side of each input. Every packet it expects is checked against the
    // next one the session sent. ---

    fn expect(&mut self, want: Out) -> Check {
        let got = self.link.sent.borrow().get(self.seen).cloned();
        check!(got.as_ref() == Some(&want), "packet #{}: expected {want:?}, sent {got:?}", self.seen);
        self.seen += 1;
        self.model.room = self.model.room.saturating_sub(1);
        Ok(())
    }

    /// A new PUBLISH of `m`: any identifier not in flight.
    fn expect_new(&mut self, m: &MMsg) -> Result<u16, TestCaseError> {
        let got = self.link.sent.borrow().get(self.seen).cloned();
        let packet_id = match &got {
            Some(Out::Publish { packet_id: Some(id), .. }) => *id,
            _ => 0,
        };
        check!(
            got == Some(m.publish(Some(packet_id), false)),
            "packet #{}: expected a new PUBLISH of {m:?}, sent {got:?}",
            self.seen
        );
        check!(
            self.model.inflight.iter().all(|e| e.packet_id != packet_id),
            "packet identifier {packet_id} is already in flight: {:?}",
            self.model.inflight
        );
        check!(self.model.inflight.len() < self.model.window, "a new PUBLISH past the window");
        self.seen += 1;
        self.model.room = self.model.room.saturating_sub(1);
        Ok(packet_id)
    }

    fn expired(&self, m: &MMsg) -> bool {
        m.expires.is_some_and(|at| at <= self.clock)
    }

    fn fits(&self, m: &MMsg) -> bool {
        self.model.max_payload.is_none_or(|max| m.payload <= max)
    }

    fn drop_message(&mut self, m: &MMsg) {
        self.model.dropped += 1;
        self.fates.entry(m.n).or_default().dropped = true;
    }

    fn model_deliver(&mut self, m: MMsg) -> Result<Delivery, TestCaseError> {
        if m.qos == QoS::AtMostOnce {
            if self.model.attached {
                // Under back-pressure a full outbox queues it, and so do QoS 0 messages
                // queued before it (order).
                let behind = self.model.queue.iter().any(|q| q.qos == QoS::AtMostOnce);
                if self.limits.holds_qos0() && (behind || self.model.room == 0) {
                    return Ok(self.model_enqueue(m));
                }
                if self.expired(&m) || !self.fits(&m) || self.model.room == 0 {
                    self.drop_message(&m);
                    return Ok(Delivery::Dropped);
                }
                self.expect(m.publish(None, false))?;
                return Ok(Delivery::Sent);
            }
            if self.limits.queue_qos0 && self.persistent {
                return Ok(self.model_enqueue(m));
            }
            self.drop_message(&m);
            return Ok(Delivery::Dropped);
        }
        let model = &self.model;
        if model.attached
            && model.queue.is_empty()
            && model.inflight.iter().all(|e| !e.resend)
            && model.inflight.len() < model.window
            && model.room > 0
        {
            return self.model_send_new(m);
        }
        Ok(self.model_enqueue(m))
    }

    fn model_send_new(&mut self, m: MMsg) -> Result<Delivery, TestCaseError> {
        // An expired message is not sent (MQTT-3.3.2-5), nor one larger than the client's
        // Maximum Packet Size (MQTT-3.1.2-25).
        if self.expired(&m) || !self.fits(&m) {
            self.drop_message(&m);
            return Ok(Delivery::Dropped);
        }
        let packet_id = self.expect_new(&m)?;
        self.model.inflight.push(MInflight { m, packet_id, released: false, resend: false, sent_here: true });
        Ok(Delivery::Sent)
    }

    /// The queue bounds: a message that can never fit is dropped (it alone passes the byte
    /// bound); else queued QoS 0 messages go first, then the oldest (or, with `DropNew`, the
    /// new one). (Under `Backpressure` the shard keeps publishers from getting here while
    /// the queue is full: `has_room_for`.)
    fn model_enqueue(&mut self, m: MMsg) -> Delivery {
        let limits = self.limits;
        if m.cost() > limits.max_queued_bytes && !MIRROR_OVERSIZED_EVICTS {
            self.drop_message(&m);
            return Delivery::Dropped;
        }
        let bytes = |q: &VecDeque<MMsg>| q.iter().map(MMsg::cost).sum::<usize>();
        while self.model.queue.len() >= limits.max_queued_messages
            || bytes(&self.model.queue) + m.cost() > limits.max_queued_bytes
        {
            let qos0 = self.model.queue.iter().position(|q| q.qos == QoS::AtMostOnce);
            let victim = match qos0 {
                Some(index) => index,
                // A QoS 0 message never takes a QoS 1/2 one's place: it is dropped itself.
                None if m.qos == QoS::AtMostOnce => {
                    self.drop_message(&m);
                    return Delivery::Dropped;
                }
                None if limits.policy != QueueFullPolicy::DropNew && !self.model.queue.is_empty() => 0,
                None => {
                    self.drop_message(&m);
                    return Delivery::Dropped;
                }
            };
            let old = self.model.queue.remove(victim).unwrap();
            self.drop_message(&old);
        }
        self.model.queue.push_back(m);
        Delivery::Queued
    }

    /// Whatever waits for the connection: in flight from before first (MQTT-4.4.0-1), then
    /// queued messages while the window and the outbox have room.
    fn model_pump(&mut self) -> Check {
        if !self.model.attached {
            return Ok(());
        }
        let mut i = 0;
        while i < self.model.inflight.len() {
            if !self.model.inflight[i].resend {
                i += 1;
                continue;
            }
            let waiting = self.model.inflight.iter().filter(|e| !e.resend).count();
            if self.model.room == 0 || (!MIRROR_RESEND_PAST_WINDOW && waiting >= self.model.window) {
                return Ok(());
            }
            self.model.inflight[i].resend = false;
            let e = self.model.inflight[i].clone();
            if e.released {
                self.expect(Out::PubRel { packet_id: e.packet_id, reason: ReasonCode::Success })?;
                self.model.inflight[i].sent_here = true;
            } else if self.fits(&e.m) {
                self.expect(e.m.publish(Some(e.packet_id), true))?;
                self.model.inflight[i].sent_here = true;
            } else if !MIRROR_UNSENDABLE_RESEND_STAYS {
                // Larger than the client's Maximum Packet Size now: discarded, as if
                // its delivery had completed (MQTT-3.1.2-25).
                self.model.inflight.remove(i);
                self.model.dropped += 1;
                self.fates.entry(e.m.n).or_default().discarded = true;
                continue;
            }
            i += 1;
        }
        // QoS 0 at the head needs no window.
        while self.model.room > 0 {
            let Some(front) = self.model.queue.front() else { break };
            if front.qos != QoS::AtMostOnce && self.model.inflight.len() >= self.model.window {
                break;
            }
            let Some(m) = self.model.queue.pop_front() else { break };
            if m.qos == QoS::AtMostOnce {
                if self.expired(&m) || !self.fits(&m) {
                    self.drop_message(&m);
                } else {
                    self.expect(m.publish(None, false))?;
                }
            } else {
                self.model_send_new(m)?;
            }
        }
        Ok(())
    }

    /// Messages in flight sent (or sent again) on the connection attached.
    fn sent_in_flight(&self) -> usize {
        self.model.inflight.iter().filter(|e| e.sent_here).count()
    }

    fn model_remove(&mut self, packet_id: u16, matches: impl Fn(&MInflight) -> bool) -> bool {
        match self.model.inflight.iter().position(|e| e.packet_id == packet_id && matches(e)) {
            Some(index) => {
                self.model.inflight.remove(index);
                self.model.acks = self.model.acks.wrapping_add(1);
                true
            }
            None => false,
        }
    }

    fn model_take_shared(&mut self, take: impl Fn(usize) -> bool, in_flight: bool) -> Vec<(usize, u32)> {
        let mut taken = Vec::new();
        if in_flight {
            let (gone, kept): (Vec<MInflight>, Vec<MInflight>) =
                std::mem::take(&mut self.model.inflight).into_iter().partition(|e| {
                    let qos_ok = e.m.qos == QoS::AtLeastOnce || MIRROR_SHARED_QOS2_TAKEN_BACK;
                    !e.released && qos_ok && e.m.shared.is_some_and(&take)
                });
            self.model.inflight = kept;
            taken.extend(gone.into_iter().map(|e| (e.m.shared.unwrap(), e.m.n)));
        }
        let (gone, kept): (VecDeque<MMsg>, VecDeque<MMsg>) =
            std::mem::take(&mut self.model.queue).into_iter().partition(|m| m.shared.is_some_and(&take));
        self.model.queue = kept;
        for m in gone {
            self.fates.entry(m.n).or_default().taken_queued = true;
            taken.push((m.shared.unwrap(), m.n));
        }
        taken
    }

    /// The identifier `ack` names; `Ack::InFlight` picks among the messages in flight that
    /// `expects` this acknowledgement, if any, else among all in flight.
    fn resolve(&self, ack: Ack, expects: impl Fn(&MInflight) -> bool) -> PacketId {
        let id = match ack {
            Ack::InFlight(i) => {
                let expecting: Vec<u16> =
                    self.model.inflight.iter().filter(|e| expects(e)).map(|e| e.packet_id).collect();
                let all: Vec<u16> = self.model.inflight.iter().map(|e| e.packet_id).collect();
                let pick = if expecting.is_empty() { all } else { expecting };
                pick.get(i % pick.len().max(1)).copied().unwrap_or(1)
            }
            Ack::Sent(i) => {
                let ids = self.link.packet_ids();
                ids.get(i % ids.len().max(1)).copied().unwrap_or(1)
            }
            Ack::Id(id) => id,
        };
        pid(id.max(1))
    }

    fn new_message(&mut self, op: &Op) -> (Message, MMsg) {
        let Op::Deliver { qos, shared, payload, expiry, identifier, retain } = *op else { unreachable!() };
        let n = self.next_n;
        self.next_n += 1;
        let mut message = message_of(n, payload);
        message.qos = qos;
        message.retain = retain;
        message.expires_at = expiry.map(|secs| self.base + Duration::from_secs(self.clock + secs));
        let seq = if qos != QoS::AtMostOnce && self.persistent {
            self.model.last_seq += 1;
            self.model.last_seq
        } else {
            0
        };
        let m = MMsg {
            n,
            qos,
            retain,
            identifiers: if identifier { vec![n] } else { Vec::new() },
            shared,
            seq,
            payload,
            expires: expiry.map(|secs| self.clock + secs),
        };
        self.fates.insert(n, Fate { qos1_2: qos != QoS::AtMostOnce, ..Fate::default() });
        (message, m)
    }
}

fn run(case: &Case) -> Check {
    let mut h = Harness::new(case.limits, case.persistent);
    if let Some(prelude) = &case.prelude {
        h.prelude(prelude);
        h.check_state()?;
        h.check_journal()?;
    }
    for op in &case.ops {
        h.step(op)?;
    }
    h.drain()?;
    check!(h.session.backlog() == (0, 0), "backlog {:?} after draining", h.session.backlog());
    h.check_fates()
}

proptest! {
    // 1,000 cases take about a second in a debug build; PROPTEST_CASES=100000 for a soak.
    // XorShift: ChaCha, unoptimized in a debug build, took most of the run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1_000),
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    })]

    #[test]
    fn session_agrees_with_the_model(case in arb_case()) {
        run(&case)?;
    }
}

// After `check!`: macros are in scope only below their definition.
mod checks;
mod step;
