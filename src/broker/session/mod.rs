//! A client's session: its subscriptions, the QoS 1/2 messages in flight to it, the
//! messages queued for it, its will. A state machine without I/O, in the shape of
//! quinn-proto's `Connection`: inputs are method calls (deliveries, acknowledgements,
//! attaching and detaching a connection, the tick's clock), outputs go to the surroundings
//! each call is given ([`Io`]: the attached connection's outbox and the session's log).
//! It holds no connection, no log and reads no clock, so it is tested as it is (see
//! `tests.rs`: a reference model of QoS 1/2 ordering and exactly-once).
//!
//! Invariants:
//! - `inflight.len() <= window` while a connection is attached; packet identifiers in
//!   `inflight` are distinct.
//! - `queue.len() <= limits.max_queued_messages` and `queued_bytes` is the sum of the
//!   queued messages' sizes, `<= limits.max_queued_bytes`.
//! - While attached, `queue` is empty unless the in-flight window is full: messages are
//!   queued only when they cannot be sent.

use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashSet;

mod handover;
mod io;
mod queue;
mod retained_fetch;
mod subscriptions;
#[cfg(test)]
mod tests;

pub use handover::ARRIVAL_MEMORY;
pub use io::{Io, Journal, Link, NoJournal, Spilled};
pub use retained_fetch::{PendingRetained, RetainedCursor};
pub use subscriptions::{cost as subscription_cost, Subscriptions};

use super::core_counters::DropReason;
use super::message::Message;
use crate::codec::{
    Packet, PacketId, Properties, ProtocolVersion, PubAck, QoS, ReasonCode, SubscriptionOptions, Will,
};
use crate::topic::GroupKey;

pub type SessionId = u64;

/// What a full queue gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueFullPolicy {
    /// Drop the oldest queued message to make room (MQTT brokers' usual choice).
    DropOldest,
    /// Drop the message that does not fit.
    DropNew,
    /// The default: pause the publishers feeding a connected client once its queue is half
    /// full, until it drained to a quarter, and hold a message that would not fit its queue
    /// until it does. A client that makes no progress for `--slow-consumer-timeout` pays: a
    /// clean session is disconnected, a persistent one stops holding publishers back. A
    /// queue that fills while no connection holds it (offline, or a slow consumer) drops
    /// the oldest.
    Backpressure,
    /// As `backpressure`, but an MQTT 5 publisher is not held: a QoS 1/2 message that would
    /// not fit a congested subscriber's queue on its core is answered PUBACK/PUBREC 0x97
    /// Quota exceeded and not delivered, and a QoS 0 one is dropped. An MQTT 3.1.1 client
    /// has no way to be told, so it is held; so is a message for a subscriber on another
    /// core (the mesh waits: it was acknowledged).
    Refuse,
}

impl QueueFullPolicy {
    /// Whether it drops nothing acknowledged from a connected client's queue: publishers
    /// are held (or refused) instead.
    pub fn is_lossless(self) -> bool {
        matches!(self, QueueFullPolicy::Backpressure | QueueFullPolicy::Refuse)
    }
}

/// What a QoS 0 message does when a connected subscriber's outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Qos0Overflow {
    /// The default: it waits in the session's queue like QoS 1/2, and the queue's
    /// back-pressure holds its publishers (with `--queue-full-policy backpressure`; under a
    /// lossy policy it is dropped).
    Backpressure,
    /// It is dropped (lossy telemetry: publishers are never slowed by QoS 0 subscribers).
    Drop,
}

#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub max_inflight: usize,
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
    /// Bytes of a persistent session's queue kept only in its log, past its in-memory
    /// queue (with a data directory).
    pub max_spilled_bytes: u64,
    pub queue_qos0: bool,
    pub policy: QueueFullPolicy,
    pub qos0_overflow: Qos0Overflow,
}

impl SessionLimits {
    /// QoS 0 messages a connected client's outbox cannot take now wait in its queue (and
    /// count towards its congestion) instead of being dropped.
    pub fn holds_qos0(&self) -> bool {
        self.policy.is_lossless() && self.qos0_overflow == Qos0Overflow::Backpressure
    }
}

/// A subscription as the session keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
    /// Its standing with the ACL: whether a delivery through it must be checked.
    pub acl: crate::auth::AclMark,
}

struct Inflight {
    packet_id: PacketId,
    message: Message,
    qos: QoS,
    retain: bool,
    /// Identifiers of the subscriptions it matched (v5); empty without allocating.
    identifiers: Box<[u32]>,
    /// The shared subscription group it was given to this session through, if any: the
    /// group gets it back when this session's connection ends unacknowledged.
    shared: Option<Arc<GroupKey>>,
    /// PUBREC received and PUBREL sent: waiting for PUBCOMP.
    released: bool,
    /// Its sequence number in the session log; 0 when not journaled.
    seq: u64,
    /// Where its packet identifier lies in the sequence the session hands them out in
    /// (counting every step, 0 included): see `allocate_packet_id`.
    position: u64,
    /// To be sent again (with DUP, or its PUBREL) on the connection now attached.
    resend: bool,
}

struct Queued {
    message: Message,
    qos: QoS,
    retain: bool,
    identifiers: Box<[u32]>,
    shared: Option<Arc<GroupKey>>,
    seq: u64,
}

/// A QoS 1/2 message a recovered session still owes its client.
#[derive(Debug, Clone, PartialEq)]
pub struct OwedMessage {
    pub seq: u64,
    pub qos: QoS,
    pub retain: bool,
    pub identifiers: Vec<u32>,
    pub message: Message,
    /// Sent with this identifier (resent with DUP on reconnection); `None`: still queued.
    pub packet_id: Option<u16>,
    /// PUBREC received: PUBREL is what gets resent.
    pub released: bool,
}

/// One client's session. Every method that may send takes the call's surroundings
/// ([`Io`]): the session reads no clock and holds no connection or log.
pub struct Session {
    pub id: SessionId,
    /// Shared with the connection and the shard's index of client identifiers.
    pub client_id: Rc<str>,
    pub version: ProtocolVersion,
    /// A connection is attached (the shard holds it and passes it in as `Io::link`).
    attached: bool,
    /// Connected but silent past `--shared-ack-timeout`: shared groups pass it over.
    pub stalled: bool,
    /// Made no progress for `--slow-consumer-timeout` while it held publishers back: it
    /// holds them no longer (cleared by the shard once it acknowledges again).
    pub slow: bool,
    /// A QoS 0 publisher gave up waiting for it (`--qos0-max-wait-ms`): QoS 0 its outbox
    /// cannot take is dropped for it, not queued, until it takes a queued message again.
    pub qos0_lossy: bool,
    /// Seconds the session outlives its connection (at most `--max-session-expiry`).
    pub expiry_interval: u32,
    pub subscriptions: Subscriptions,
    /// When the session ends, while no connection is attached.
    pub expires_at: Option<Instant>,
    /// Boxed: most sessions have none, and every session is kept in memory.
    pub will: Option<Box<Will>>,
    /// When a delayed will is due.
    pub will_at: Option<Instant>,
    /// Inbound QoS 2 packet identifiers between PUBREC and PUBREL; allocated on first use.
    qos2_inbound: Option<Box<AHashSet<u16>>>,
    /// Retained messages still to fetch for recent subscriptions, a page at a time.
    pub retained: PendingRetained,
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Queued>,
    /// Messages after `queue` kept only in the log; allocated on first use.
    spill: Option<Box<queue::Spill>>,
    queued_bytes: usize,
    /// QoS 0 messages in `queue`: a full queue scans for one only when there is one.
    queued_qos0: u32,
    next_packet_id: u16,
    /// The in-flight window of the attached connection.
    window: u32,
    /// Entries of `inflight` marked `resend`.
    resends: u32,
    /// Acknowledgements received (wrapping): `check_stalled` compares it with `watch`.
    acks: u32,
    /// Messages taken from the queue to be sent (wrapping).
    dequeued: u32,
    /// Packet identifiers stepped through so far: `Inflight::position` of the next one.
    issued: u64,
    pub dropped: u64,
    /// `acks` as the tick last saw it change, and when: the ack-timeout clock, kept off
    /// the acknowledgement path.
    watch: (u32, Instant),
    /// Just moved here from another node: messages it got there too (see `handover.rs`).
    arrived: Option<Box<handover::Arrived>>,
}

/// What a delivery did, for the shard's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    Queued,
    Dropped,
    /// It had it already, through the node it just moved from.
    Duplicate,
}

impl Session {
    pub fn new(id: SessionId, client_id: Rc<str>, version: ProtocolVersion, now: Instant) -> Session {
        Session {
            id,
            client_id,
            version,
            attached: false,
            stalled: false,
            slow: false,
            qos0_lossy: false,
            expiry_interval: 0,
            subscriptions: Subscriptions::default(),
            expires_at: None,
            will: None,
            will_at: None,
            qos2_inbound: None,
            retained: PendingRetained::default(),
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            spill: None,
            queued_bytes: 0,
            queued_qos0: 0,
            next_packet_id: 0,
            window: 0,
            resends: 0,
            acks: 0,
            dequeued: 0,
            issued: 0,
            dropped: 0,
            watch: (0, now),
            arrived: None,
        }
    }

    /// A connection is attached.
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Connected and acknowledging: a shared group's member that gets new messages.
    pub fn takes_work(&self) -> bool {
        self.attached && !self.stalled
    }

    /// Connected and not a slow consumer: under `Backpressure` its publishers wait for
    /// room in its queue.
    pub fn holds_publishers(&self) -> bool {
        self.attached && !self.slow
    }

    /// Acknowledgements received and queued messages sent (wrapping): the shard's measure
    /// of a congested client's progress (QoS 0 leaves the queue without an
    /// acknowledgement).
    pub fn progress(&self) -> u32 {
        self.acks.wrapping_add(self.dequeued)
    }

    /// Inbound QoS 2 PUBLISH `packet_id` received: whether it is new (delivered once, until
    /// PUBREL, across restarts for a persistent session).
    pub fn receive_qos2(&mut self, packet_id: u16, journal: &mut dyn Journal) -> bool {
        let first = self.qos2_inbound.get_or_insert_with(Box::default).insert(packet_id);
        if first {
            journal.qos2_in(packet_id);
        }
        first
    }

    /// PUBREL for inbound `packet_id`: whether it was pending.
    pub fn release_qos2(&mut self, packet_id: u16, journal: &mut dyn Journal) -> bool {
        let Some(pending) = &mut self.qos2_inbound else { return false };
        let known = pending.remove(&packet_id);
        if pending.is_empty() {
            self.qos2_inbound = None;
        }
        if known {
            journal.qos2_in_done(packet_id);
        }
        known
    }

    /// Inbound QoS 2 identifiers awaiting PUBREL, and whether `packet_id` is one of them.
    pub fn qos2_pending(&self, packet_id: u16) -> (usize, bool) {
        self.qos2_inbound.as_ref().map_or((0, false), |p| (p.len(), p.contains(&packet_id)))
    }

    /// Puts back inbound QoS 2 identifiers (recovered from the log, or a release that could
    /// not be logged), without journaling them again.
    pub fn restore_qos2(&mut self, packet_ids: impl IntoIterator<Item = u16>) {
        let pending = self.qos2_inbound.get_or_insert_with(Box::default);
        pending.extend(packet_ids);
        if pending.is_empty() {
            self.qos2_inbound = None;
        }
    }

    /// Messages queued (in memory and spilled) and in flight.
    pub fn backlog(&self) -> (usize, usize) {
        (self.queue.len() + self.spill.as_ref().map_or(0, |s| s.entries.len()), self.inflight.len())
    }

    /// Offline past its expiry deadline.
    pub fn expired_at(&self, now: Instant) -> bool {
        !self.attached && self.expires_at.is_some_and(|at| at <= now)
    }

    /// A session that outlives its connection.
    pub fn is_persistent(&self) -> bool {
        self.expiry_interval > 0
    }

    /// Room for more retained messages without pressing on the queue bound.
    pub fn has_room<L: Link>(&self, io: &Io<'_, L>) -> bool {
        self.queue.len() < io.limits.max_queued_messages / 2 && io.link.is_none_or(|l| l.has_room())
    }

    /// Attaches a connection (`io.link`) that takes `receive_maximum` messages in flight:
    /// messages in flight are sent again (PUBLISH with DUP, or PUBREL), then queued
    /// messages fill the window (MQTT-4.4.0-1), as fast as the connection's outbox takes
    /// them.
    pub fn attach<L: Link>(&mut self, version: ProtocolVersion, receive_maximum: usize, io: &mut Io<'_, L>) {
        let window = receive_maximum.min(io.limits.max_inflight).max(1);
        self.window = u32::try_from(window).unwrap_or(u32::MAX);
        self.version = version;
        self.expires_at = None;
        self.will_at = None;
        for entry in &mut self.inflight {
            entry.resend = true;
        }
        self.resends = self.inflight.len() as u32;
        self.attached = true;
        self.pump(io);
    }

    pub fn detach(&mut self) {
        self.attached = false;
        self.stalled = false;
        self.slow = false;
        for entry in &mut self.inflight {
            entry.resend = false;
        }
        self.resends = 0;
    }

    /// Delivers `message` at `qos` (already the lower of publish and subscription QoS),
    /// carrying the identifiers of the subscriptions it matched; `shared` names the
    /// shared subscription group it was given to this session through.
    pub fn deliver<L: Link>(
        &mut self,
        message: &Message,
        qos: QoS,
        retain: bool,
        identifiers: &[u32],
        shared: Option<Arc<GroupKey>>,
        io: &mut Io<'_, L>,
    ) -> Delivery {
        if self.arrived.is_some() && self.had_before_arriving(message) {
            return Delivery::Duplicate;
        }
        if qos == QoS::AtMostOnce {
            return match io.link {
                // Behind QoS 0 messages already waiting (order), or the outbox is full.
                Some(link) if self.queues_qos0(io.limits, link.can_send()) => {
                    link.want_room();
                    self.enqueue(message, qos, retain, identifiers, shared, 0, io)
                }
                Some(link) => {
                    if message.expires_at.is_some() && message.is_expired(link.now()) {
                        self.drop_one(DropReason::Expired);
                        return Delivery::Dropped;
                    }
                    let publish = message.outgoing(QoS::AtMostOnce, retain, false, None, identifiers);
                    if link.send_publish(publish, true) {
                        Delivery::Sent
                    } else {
                        self.drop_one(queue::refused_qos0(link.can_send()));
                        Delivery::Dropped
                    }
                }
                None if io.limits.queue_qos0 && self.is_persistent() => {
                    self.enqueue(message, qos, retain, identifiers, shared, 0, io)
                }
                None => {
                    self.drop_one(DropReason::Offline);
                    Delivery::Dropped
                }
            };
        }
        if !self.holds_publishers() && io.journal.disk_full() {
            // The log is at its share of `--max-disk-bytes`: an offline session (or a slow
            // consumer) pays, its new message is not written.
            self.drop_one(DropReason::DiskFull);
            return Delivery::Dropped;
        }
        let seq = io.journal.message(qos, retain, identifiers, message);
        if self.queue.is_empty()
            && self.spill.is_none()
            && self.resends == 0
            && self.window_open()
            && can_send(io)
        {
            return self.send_new(message.held_in_flight(), qos, retain, identifiers.into(), shared, seq, io);
        }
        self.enqueue(message, qos, retain, identifiers, shared, seq, io)
    }

    fn window_open(&self) -> bool {
        self.inflight.len() < self.window as usize
    }

    /// Sends a QoS 1/2 message now. A message larger than the client's Maximum Packet Size
    /// is skipped for it (MQTT-3.1.2-25), an expired one dropped (MQTT-3.3.2-5).
    #[allow(clippy::too_many_arguments)]
    fn send_new<L: Link>(
        &mut self,
        message: Message,
        qos: QoS,
        retain: bool,
        identifiers: Box<[u32]>,
        shared: Option<Arc<GroupKey>>,
        seq: u64,
        io: &mut Io<'_, L>,
    ) -> Delivery {
        let Some(link) = io.link else {
            self.drop_one(DropReason::Offline);
            io.done(seq);
            return Delivery::Dropped;
        };
        if message.expires_at.is_some() && message.is_expired(link.now()) {
            self.drop_one(DropReason::Expired);
            io.done(seq);
            return Delivery::Dropped;
        }
        let packet_id = self.allocate_packet_id();
        let publish = message.outgoing(qos, retain, false, Some(packet_id), &identifiers);
        if !link.send_publish(publish, false) {
            self.drop_one(DropReason::TooLarge);
            io.done(seq);
            return Delivery::Dropped;
        }
        if seq != 0 {
            io.journal.sent(seq, packet_id.get());
        }
        self.inflight.push_back(Inflight {
            packet_id,
            message,
            qos,
            retain,
            identifiers,
            shared,
            released: false,
            seq,
            position: self.issued,
            resend: false,
        });
        Delivery::Sent
    }

    /// The next identifier not in flight. Identifiers are handed out in sequence and
    /// `inflight` keeps that order, so until the sequence has gone a whole turn (65,536
    /// steps) past the oldest one in flight, the next cannot be in use: that is one
    /// comparison. Past a turn (an identifier left unacknowledged while 65,535 others were
    /// used) every one in flight is checked.
    fn allocate_packet_id(&mut self) -> PacketId {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            self.issued += 1;
            let Some(id) = NonZeroU16::new(self.next_packet_id) else { continue };
            let wrapped = self.inflight.front().is_some_and(|e| self.issued - e.position >= 1 << 16);
            if !wrapped || self.inflight.iter().all(|e| e.packet_id != id) {
                return id;
            }
        }
    }

    /// Sends again what is in flight from an earlier connection, then queued messages while
    /// the window has room, as long as the connection's outbox takes them; expired queued
    /// messages are dropped.
    pub fn pump<L: Link>(&mut self, io: &mut Io<'_, L>) {
        if self.resends > 0 {
            self.resend(io);
        }
        // QoS 0 at the head of the queue needs no window: it goes as soon as the outbox takes
        // it. (An empty queue is refilled from the log only with the window open.)
        while self.resends == 0
            && (self.window_open() || self.queue.front().is_some_and(|q| q.qos == QoS::AtMostOnce))
            && can_send(io)
        {
            if self.queue.is_empty() {
                self.unspill(io);
            }
            let Some(next) = self.queue.pop_front() else { break };
            self.forget_queued(&next);
            self.dequeued = self.dequeued.wrapping_add(1);
            self.qos0_lossy = false;
            if next.qos == QoS::AtMostOnce {
                if let Some(link) = io.link {
                    let expired = next.message.expires_at.is_some() && next.message.is_expired(link.now());
                    let publish =
                        next.message.outgoing(QoS::AtMostOnce, next.retain, false, None, &next.identifiers);
                    if expired || !link.send_publish(publish, true) {
                        let room = link.can_send();
                        self.drop_one(if expired { DropReason::Expired } else { queue::refused_qos0(room) });
                    }
                }
            } else {
                self.send_new(
                    next.message,
                    next.qos,
                    next.retain,
                    next.identifiers,
                    next.shared,
                    next.seq,
                    io,
                );
            }
        }
    }

    /// Sends the entries marked `resend`, oldest first, while the outbox takes them and
    /// within this connection's window: a client that reconnects with a smaller Receive
    /// Maximum gets the rest as it acknowledges (MQTT-3.3.4-9). One too large for its
    /// Maximum Packet Size now is discarded as if completed (MQTT-3.1.2-25).
    fn resend<L: Link>(&mut self, io: &mut Io<'_, L>) {
        let Some(link) = io.link else { return };
        let mut index = 0;
        while self.resends > 0 && index < self.inflight.len() {
            if !self.inflight[index].resend {
                index += 1;
                continue;
            }
            if self.inflight.len() - self.resends as usize >= self.window as usize {
                return;
            }
            if !link.can_send() {
                link.want_room();
                return;
            }
            let entry = &mut self.inflight[index];
            entry.resend = false;
            self.resends -= 1;
            if entry.released {
                link.send(&Packet::PubRel(ack(entry.packet_id)));
                index += 1;
                continue;
            }
            let publish = entry.message.outgoing(
                entry.qos,
                entry.retain,
                true,
                Some(entry.packet_id),
                &entry.identifiers,
            );
            if link.send_publish(publish, false) {
                index += 1;
            } else if let Some(entry) = self.inflight.remove(index) {
                self.drop_one(DropReason::TooLarge);
                io.done(entry.seq);
            }
        }
    }

    /// Takes back the messages of shared subscriptions not yet acknowledged: QoS 1 in
    /// flight, and queued. They go to another member of their group. QoS 2 in flight stays:
    /// its delivery completes with this client when it reconnects, and goes to no other
    /// (MQTT-4.8.2-4/5).
    pub fn take_shared_pending(&mut self, journal: &mut dyn Journal) -> Vec<(Arc<GroupKey>, Message)> {
        let mut taken = Vec::new();
        let mut done = Vec::new();
        let mut marked = 0;
        self.inflight.retain(|entry| match (&entry.shared, entry.qos) {
            (Some(key), QoS::AtLeastOnce) => {
                taken.push((key.clone(), entry.message.clone()));
                done.push(entry.seq);
                marked += u32::from(entry.resend);
                false
            }
            _ => true,
        });
        self.resends -= marked;
        for seq in done.into_iter().filter(|seq| *seq != 0) {
            journal.done(seq);
        }
        self.take_shared_queued(&mut taken, |_| true, journal);
        taken
    }

    /// What a connected member that stopped acknowledging gives up to the groups in
    /// `to_others` (those with another member to take it): its queued shared messages and,
    /// with `in_flight`, copies of its QoS 1 shared messages in flight (they stay in flight
    /// here, no longer tied to the group, so they are handed over once; a late PUBACK still
    /// completes them). QoS 2 in flight stays: it must complete with this client
    /// (MQTT-4.8.2-4).
    pub fn take_shared_stalled(
        &mut self,
        in_flight: bool,
        to_others: impl Fn(&GroupKey) -> bool,
        journal: &mut dyn Journal,
    ) -> Vec<(Arc<GroupKey>, Message)> {
        let mut taken = Vec::new();
        if in_flight {
            for entry in self.inflight.iter_mut().filter(|e| e.qos == QoS::AtLeastOnce) {
                if let Some(key) = entry.shared.take_if(|key| to_others(key)) {
                    taken.push((key, entry.message.clone()));
                }
            }
        }
        self.take_shared_queued(&mut taken, to_others, journal);
        taken
    }

    fn take_shared_queued(
        &mut self,
        taken: &mut Vec<(Arc<GroupKey>, Message)>,
        take: impl Fn(&GroupKey) -> bool,
        journal: &mut dyn Journal,
    ) {
        if self.queue.iter().all(|q| q.shared.is_none()) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for queued in std::mem::take(&mut self.queue) {
            match &queued.shared {
                Some(key) if take(key) => {
                    self.forget_queued(&queued);
                    if queued.seq != 0 {
                        journal.done(queued.seq);
                    }
                    taken.push((key.clone(), queued.message));
                }
                _ => kept.push_back(queued),
            }
        }
        self.queue = kept;
    }

    /// Called by the shard's tick: whether the attached connection has left messages in
    /// flight without acknowledging anything for `timeout`.
    pub fn check_stalled(&mut self, now: Instant, timeout: Duration) -> bool {
        if !self.attached || self.inflight.is_empty() || self.acks != self.watch.0 {
            self.watch = (self.acks, now);
            return false;
        }
        now.duration_since(self.watch.1) >= timeout
    }

    /// PUBACK for a QoS 1 delivery. Returns whether it matched one in flight.
    pub fn on_puback<L: Link>(&mut self, packet_id: PacketId, io: &mut Io<'_, L>) -> bool {
        let found = self.remove_inflight(packet_id, |e| e.qos == QoS::AtLeastOnce, io);
        self.pump(io);
        found
    }

    /// PUBREC for a QoS 2 delivery: answer PUBREL and wait for PUBCOMP.
    pub fn on_pubrec<L: Link>(&mut self, packet_id: PacketId, reason: ReasonCode, io: &mut Io<'_, L>) {
        let Some(index) =
            self.inflight.iter().position(|e| e.packet_id == packet_id && e.qos == QoS::ExactlyOnce)
        else {
            if let Some(link) = io.link {
                let mut rel = ack(packet_id);
                rel.reason = ReasonCode::PacketIdentifierNotFound;
                rel.properties = link.problem("no QoS 2 delivery in flight with this identifier");
                link.send(&Packet::PubRel(rel));
            }
            return;
        };
        if reason.is_error() {
            // The receiver refused it (v5): the exchange ends here (MQTT-4.3.3).
            if let Some(entry) = self.inflight.remove(index) {
                self.resends -= u32::from(entry.resend);
                io.done(entry.seq);
            }
            self.acks = self.acks.wrapping_add(1);
            self.pump(io);
            return;
        }
        let mut seq = 0;
        if let Some(entry) = self.inflight.get_mut(index) {
            entry.released = true;
            self.resends -= u32::from(std::mem::take(&mut entry.resend));
            seq = entry.seq;
        }
        if seq != 0 {
            io.journal.released(seq, packet_id.get());
        }
        self.acks = self.acks.wrapping_add(1);
        if let Some(link) = io.link {
            link.send(&Packet::PubRel(ack(packet_id)));
        }
    }

    /// PUBCOMP for a QoS 2 delivery. Returns whether it matched one released.
    pub fn on_pubcomp<L: Link>(&mut self, packet_id: PacketId, io: &mut Io<'_, L>) -> bool {
        let found = self.remove_inflight(packet_id, |e| e.released, io);
        self.pump(io);
        found
    }

    fn remove_inflight<L: Link>(
        &mut self,
        packet_id: PacketId,
        state: impl Fn(&Inflight) -> bool,
        io: &mut Io<'_, L>,
    ) -> bool {
        // Acknowledgements usually come in order: the front is checked first.
        match self.inflight.iter().position(|e| e.packet_id == packet_id && state(e)) {
            Some(index) => {
                if let Some(entry) = self.inflight.remove(index) {
                    self.resends -= u32::from(entry.resend);
                    io.done(entry.seq);
                }
                self.acks = self.acks.wrapping_add(1);
                true
            }
            None => false,
        }
    }
}

/// Whether the attached connection's outbox takes another QoS 1/2 PUBLISH; when not, the
/// connection is asked to say when it does (the session's `pump` is then called).
fn can_send<L: Link>(io: &Io<'_, L>) -> bool {
    match io.link {
        Some(link) if link.can_send() => true,
        Some(link) => {
            link.want_room();
            false
        }
        None => false,
    }
}

fn ack(packet_id: PacketId) -> PubAck {
    PubAck { packet_id, reason: ReasonCode::Success, properties: Properties::default() }
}
