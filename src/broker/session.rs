//! A client's session: its subscriptions, the QoS 1/2 messages in flight to it, the
//! messages queued for it, its will. A plain state machine owned by its shard: inputs are
//! deliveries, acknowledgements and (re)attachment of a connection; output is packets
//! queued on the attached connection.
//!
//! Invariants:
//! - `inflight.len() <= window` while a connection is attached; packet identifiers in
//!   `inflight` are distinct.
//! - `queue.len() <= limits.max_queued_messages` and `queued_bytes` is the sum of the
//!   queued messages' sizes, `<= limits.max_queued_bytes`.
//! - While attached, `queue` is empty unless the in-flight window is full: messages are
//!   queued only when they cannot be sent.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::{AHashMap, AHashSet};

use super::connection::ConnHandle;
use super::message::Message;
use super::retained::PendingRetained;
use super::shared::GroupKey;
use crate::codec::{
    Packet, PacketId, Properties, ProtocolVersion, PubAck, QoS, ReasonCode, SubscriptionOptions, Will,
};
use crate::storage::SessionLog;
use crate::topic::TopicFilter;

pub type SessionId = u64;

/// A persistent session's place in its shard's session log: every change to what it owes
/// its client is appended there as it happens.
#[derive(Clone)]
pub struct Journal {
    pub log: Rc<RefCell<SessionLog>>,
    /// The session's number in that log.
    pub id: u64,
}

/// What a full queue gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueFullPolicy {
    /// Drop the oldest queued message to make room (MQTT brokers' usual choice).
    DropOldest,
    /// Drop the message that does not fit.
    DropNew,
    /// Pause the publishers feeding a connected, acknowledging client once its queue is
    /// half full, until it drained to a quarter; a queue that fills anyway (the client is
    /// offline or stopped acknowledging) drops the oldest.
    Backpressure,
}

#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub max_inflight: usize,
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
    pub queue_qos0: bool,
    pub policy: QueueFullPolicy,
}

/// A subscription as the session keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
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

pub struct Session {
    pub id: SessionId,
    pub client_id: String,
    pub conn: Option<Rc<ConnHandle>>,
    pub version: ProtocolVersion,
    pub subscriptions: AHashMap<TopicFilter, Subscription>,
    /// Seconds the session outlives its connection (at most `--max-session-expiry`).
    pub expiry_interval: u32,
    /// When the session ends, while no connection is attached.
    pub expires_at: Option<Instant>,
    pub will: Option<Will>,
    /// When a delayed will is due.
    pub will_at: Option<Instant>,
    /// Inbound QoS 2 packet identifiers between PUBREC and PUBREL.
    pub qos2_inbound: AHashSet<u16>,
    /// Retained messages still to fetch for recent subscriptions, a page at a time.
    pub retained: PendingRetained,
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// QoS 0 messages in `queue`: a full queue scans for one only when there is one.
    queued_qos0: usize,
    next_packet_id: u16,
    window: usize,
    limits: SessionLimits,
    pub dropped: u64,
    /// Packet identifiers stepped through so far: `Inflight::position` of the next one.
    issued: u64,
    /// Entries of `inflight` marked `resend`.
    resends: usize,
    /// Acknowledgements received (wrapping): the shard's tick compares it with `watch`.
    acks: u32,
    /// `acks` as the tick last saw it change, and when: the ack-timeout clock, kept off
    /// the acknowledgement path.
    watch: (u32, Instant),
    /// Connected but silent past `--shared-ack-timeout`: shared groups pass it over.
    pub stalled: bool,
    /// Set while the session is persistent and the broker keeps a data directory.
    pub journal: Option<Journal>,
}

/// What a delivery did, for the shard's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    Queued,
    Dropped,
}

impl Session {
    pub fn new(id: SessionId, client_id: String, version: ProtocolVersion, limits: SessionLimits) -> Session {
        Session {
            id,
            client_id,
            conn: None,
            version,
            subscriptions: AHashMap::new(),
            expiry_interval: 0,
            expires_at: None,
            will: None,
            will_at: None,
            qos2_inbound: AHashSet::new(),
            retained: PendingRetained::default(),
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            queued_qos0: 0,
            next_packet_id: 0,
            window: limits.max_inflight,
            limits,
            dropped: 0,
            issued: 0,
            resends: 0,
            acks: 0,
            watch: (0, Instant::now()),
            stalled: false,
            journal: None,
        }
    }

    /// Connected and acknowledging: a shared group's member that gets new messages.
    pub fn takes_work(&self) -> bool {
        self.conn.is_some() && !self.stalled
    }

    /// Appends to the session log, when the session has one.
    fn journal(&self, write: impl FnOnce(&mut SessionLog, u64)) {
        if let Some(journal) = &self.journal {
            write(&mut journal.log.borrow_mut(), journal.id);
        }
    }

    /// The message with log sequence number `seq` needs nothing more from this session.
    fn journal_done(&self, seq: u64) {
        if seq != 0 {
            self.journal(|log, id| log.done(id, seq));
        }
    }

    /// Inbound QoS 2 PUBLISH `packet_id` received: whether it is new (delivered once, until
    /// PUBREL, across restarts for a persistent session).
    pub fn receive_qos2(&mut self, packet_id: u16) -> bool {
        let first = self.qos2_inbound.insert(packet_id);
        if first {
            self.journal(|log, id| log.qos2_in(id, packet_id));
        }
        first
    }

    /// PUBREL for inbound `packet_id`: whether it was pending.
    pub fn release_qos2(&mut self, packet_id: u16) -> bool {
        let known = self.qos2_inbound.remove(&packet_id);
        if known {
            self.journal(|log, id| log.qos2_in_done(id, packet_id));
        }
        known
    }

    /// A connected client that still acknowledges but whose queue of QoS 1/2 messages
    /// passed half its bound: publishers feeding it pause (back-pressure) rather than let
    /// the queue overflow and drop messages already acknowledged to them.
    pub fn congested(&self) -> bool {
        self.limits.policy == QueueFullPolicy::Backpressure
            && self.takes_work()
            && (self.queue.len() - self.queued_qos0 >= self.limits.max_queued_messages / 2
                || self.queued_bytes >= self.limits.max_queued_bytes / 2)
    }

    /// Drained to a quarter of the bound, or no longer fed by its client's acks: the
    /// publishers it paused may go on.
    pub fn relieved(&self) -> bool {
        !self.takes_work()
            || (self.queue.len() <= self.limits.max_queued_messages / 4
                && self.queued_bytes <= self.limits.max_queued_bytes / 4)
    }

    /// Bytes its queue holds (what `--max-queued-bytes` counts).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Offline past its expiry deadline.
    pub fn expired_at(&self, now: Instant) -> bool {
        self.conn.is_none() && self.expires_at.is_some_and(|at| at <= now)
    }

    /// A session that outlives its connection.
    pub fn is_persistent(&self) -> bool {
        self.expiry_interval > 0
    }

    /// Room for more retained messages without pressing on the queue bound.
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.limits.max_queued_messages / 2
            && self.conn.as_ref().is_none_or(|c| c.has_room())
    }

    /// Attaches a connection: messages in flight are sent again (PUBLISH with DUP, or
    /// PUBREL), then queued messages fill the window (MQTT-4.4.0-1), as fast as the
    /// connection's outbox takes them.
    pub fn attach(&mut self, conn: Rc<ConnHandle>, receive_maximum: usize) {
        self.window = receive_maximum.min(self.limits.max_inflight).max(1);
        self.version = conn.version;
        self.expires_at = None;
        self.will_at = None;
        for entry in &mut self.inflight {
            entry.resend = true;
        }
        self.resends = self.inflight.len();
        self.conn = Some(conn);
        self.pump();
    }

    /// Puts back a message a recovered session owed its client: in flight when it had
    /// been sent (resent with DUP, or PUBREL, on reconnection), else queued.
    pub fn restore(&mut self, m: crate::storage::RecoveredMessage) {
        match m.packet_id.and_then(NonZeroU16::new) {
            Some(packet_id) => {
                self.issued += u64::from(packet_id.get().wrapping_sub(self.next_packet_id));
                self.next_packet_id = packet_id.get();
                self.inflight.push_back(Inflight {
                    packet_id,
                    message: m.message,
                    qos: m.qos,
                    retain: m.retain,
                    identifiers: m.identifiers.into(),
                    shared: None,
                    released: m.released,
                    seq: m.seq,
                    position: self.issued,
                    resend: false,
                });
            }
            None => {
                self.queued_bytes += cost(&m.message, &m.identifiers);
                self.queue.push_back(Queued {
                    message: m.message,
                    qos: m.qos,
                    retain: m.retain,
                    identifiers: m.identifiers.into(),
                    shared: None,
                    seq: m.seq,
                });
            }
        }
    }

    pub fn detach(&mut self) {
        self.conn = None;
        self.stalled = false;
        for entry in &mut self.inflight {
            entry.resend = false;
        }
        self.resends = 0;
    }

    /// Delivers `message` at `qos` (already the lower of publish and subscription QoS),
    /// carrying the identifiers of the subscriptions it matched.
    pub fn deliver(&mut self, message: &Message, qos: QoS, retain: bool, identifiers: &[u32]) -> Delivery {
        self.deliver_from(message, qos, retain, identifiers, None)
    }

    /// [`Session::deliver`] for a message given to this session as a member of a shared
    /// subscription group.
    pub fn deliver_from(
        &mut self,
        message: &Message,
        qos: QoS,
        retain: bool,
        identifiers: &[u32],
        shared: Option<Arc<GroupKey>>,
    ) -> Delivery {
        if qos == QoS::AtMostOnce {
            if message.is_expired_now() {
                self.dropped += 1;
                return Delivery::Dropped;
            }
            return match &self.conn {
                Some(conn) => {
                    let publish = message.outgoing(QoS::AtMostOnce, retain, false, None, identifiers);
                    if conn.send_publish(publish, true) {
                        Delivery::Sent
                    } else {
                        self.dropped += 1;
                        Delivery::Dropped
                    }
                }
                None if self.limits.queue_qos0 && self.is_persistent() => {
                    self.enqueue(message, qos, retain, identifiers, shared, 0)
                }
                None => {
                    self.dropped += 1;
                    Delivery::Dropped
                }
            };
        }
        let mut seq = 0;
        self.journal(|log, id| seq = log.message(id, qos, retain, identifiers, message));
        if self.queue.is_empty() && self.resends == 0 && self.inflight.len() < self.window && self.can_send()
        {
            return self.send_new(message.held_in_flight(), qos, retain, identifiers.into(), shared, seq);
        }
        self.enqueue(message, qos, retain, identifiers, shared, seq)
    }

    /// Sends an encoded QoS 0 PUBLISH shared with other subscribers (fan-out encodes once).
    pub fn deliver_encoded_qos0(&mut self, bytes: bytes::Bytes) -> Delivery {
        match &self.conn {
            Some(conn) if conn.enqueue(bytes) => Delivery::Sent,
            _ => {
                self.dropped += 1;
                Delivery::Dropped
            }
        }
    }

    fn enqueue(
        &mut self,
        message: &Message,
        qos: QoS,
        retain: bool,
        identifiers: &[u32],
        shared: Option<Arc<GroupKey>>,
        seq: u64,
    ) -> Delivery {
        // A queued message may stay long: it is copied out of a read buffer more than twice
        // its size. Except while the queue overflows (each new message pushes an old one
        // out): then it shares an ordinary buffer, which `cost` counts whole, since copying
        // every message of an overloaded queue's churn made it 4× dearer.
        let fits = self.queue.len() < self.limits.max_queued_messages
            && self.queued_bytes + cost(message, identifiers) - message.pinned as usize
                <= self.limits.max_queued_bytes;
        let message = if fits { message.held() } else { message.held_in_flight() };
        let size = cost(&message, identifiers);
        while self.queue.len() >= self.limits.max_queued_messages
            || self.queued_bytes + size > self.limits.max_queued_bytes
        {
            // QoS 0 goes first, whatever the policy.
            let qos0 = if self.queued_qos0 > 0 {
                self.queue.iter().position(|q| q.qos == QoS::AtMostOnce)
            } else {
                None
            };
            let victim = match qos0 {
                Some(index) => index,
                None if self.limits.policy != QueueFullPolicy::DropNew && !self.queue.is_empty() => 0,
                None => {
                    self.dropped += 1;
                    self.journal_done(seq);
                    return Delivery::Dropped;
                }
            };
            if let Some(old) = self.queue.remove(victim) {
                self.forget_queued(&old);
                self.journal_done(old.seq);
            }
            self.dropped += 1;
        }
        self.queued_bytes += size;
        let identifiers = identifiers.into();
        if qos == QoS::AtMostOnce {
            self.queued_qos0 += 1;
        }
        self.queue.push_back(Queued { message, qos, retain, identifiers, shared, seq });
        Delivery::Queued
    }

    /// Sends a QoS 1/2 message now. A message larger than the client's Maximum Packet Size
    /// is skipped for it (MQTT-3.1.2-25), an expired one dropped (MQTT-3.3.2-5).
    fn send_new(
        &mut self,
        message: Message,
        qos: QoS,
        retain: bool,
        identifiers: Box<[u32]>,
        shared: Option<Arc<GroupKey>>,
        seq: u64,
    ) -> Delivery {
        if self.conn.is_none() || message.is_expired_now() {
            self.dropped += 1;
            self.journal_done(seq);
            return Delivery::Dropped;
        }
        let packet_id = self.allocate_packet_id();
        let Some(conn) = &self.conn else { return Delivery::Dropped };
        let publish = message.outgoing(qos, retain, false, Some(packet_id), &identifiers);
        if !conn.send_publish(publish, false) {
            self.dropped += 1;
            self.journal_done(seq);
            return Delivery::Dropped;
        }
        if seq != 0 {
            self.journal(|log, id| log.sent(id, seq, packet_id.get()));
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

    /// Whether the attached connection's outbox takes another QoS 1/2 PUBLISH; when not,
    /// the connection is asked to say when it does (its writer then calls `pump`).
    fn can_send(&self) -> bool {
        match &self.conn {
            Some(conn) if conn.can_send() => true,
            Some(conn) => {
                conn.want_room();
                false
            }
            None => false,
        }
    }

    /// Sends again what is in flight from an earlier connection, then queued messages while
    /// the window has room, as long as the connection's outbox takes them; expired queued
    /// messages are dropped.
    pub fn pump(&mut self) {
        if self.resends > 0 {
            self.resend();
        }
        while self.resends == 0 && self.inflight.len() < self.window && self.can_send() {
            let Some(next) = self.queue.pop_front() else { break };
            self.forget_queued(&next);
            if next.qos == QoS::AtMostOnce {
                if let Some(conn) = &self.conn {
                    let publish =
                        next.message.outgoing(QoS::AtMostOnce, next.retain, false, None, &next.identifiers);
                    if next.message.is_expired_now() || !conn.send_publish(publish, true) {
                        self.dropped += 1;
                    }
                }
            } else {
                self.send_new(next.message, next.qos, next.retain, next.identifiers, next.shared, next.seq);
            }
        }
    }

    /// Sends the entries marked `resend`, oldest first, while the outbox takes them.
    fn resend(&mut self) {
        let Some(conn) = self.conn.clone() else { return };
        for entry in self.inflight.iter_mut().filter(|e| e.resend) {
            if !conn.can_send() {
                conn.want_room();
                return;
            }
            entry.resend = false;
            self.resends -= 1;
            if entry.released {
                conn.send(&Packet::PubRel(ack(entry.packet_id)));
            } else {
                let publish = entry.message.outgoing(
                    entry.qos,
                    entry.retain,
                    true,
                    Some(entry.packet_id),
                    &entry.identifiers,
                );
                conn.send_publish(publish, false);
            }
        }
    }

    /// Takes back the messages of shared subscriptions not yet acknowledged: in flight
    /// without PUBREC (a PUBREC'd QoS 2 message has been received), and queued. They go to
    /// another member of their group.
    pub fn take_shared_pending(&mut self) -> Vec<(Arc<GroupKey>, Message)> {
        let mut taken = Vec::new();
        let mut done = Vec::new();
        let mut marked = 0;
        self.inflight.retain(|entry| match (&entry.shared, entry.released) {
            (Some(key), false) => {
                taken.push((key.clone(), entry.message.clone()));
                done.push(entry.seq);
                marked += usize::from(entry.resend);
                false
            }
            _ => true,
        });
        self.resends -= marked;
        for seq in done {
            self.journal_done(seq);
        }
        self.take_shared_queued(&mut taken, |_| true);
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
    ) -> Vec<(Arc<GroupKey>, Message)> {
        let mut taken = Vec::new();
        if in_flight {
            for entry in self.inflight.iter_mut().filter(|e| e.qos == QoS::AtLeastOnce) {
                if let Some(key) = entry.shared.take_if(|key| to_others(key)) {
                    taken.push((key, entry.message.clone()));
                }
            }
        }
        self.take_shared_queued(&mut taken, to_others);
        taken
    }

    fn take_shared_queued(
        &mut self,
        taken: &mut Vec<(Arc<GroupKey>, Message)>,
        take: impl Fn(&GroupKey) -> bool,
    ) {
        if self.queue.iter().all(|q| q.shared.is_none()) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for queued in std::mem::take(&mut self.queue) {
            match &queued.shared {
                Some(key) if take(key) => {
                    self.forget_queued(&queued);
                    self.journal_done(queued.seq);
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
        if self.conn.is_none() || self.inflight.is_empty() || self.acks != self.watch.0 {
            self.watch = (self.acks, now);
            return false;
        }
        now.duration_since(self.watch.1) >= timeout
    }

    /// Keeps the queue's byte and QoS 0 counts true as an entry leaves it.
    fn forget_queued(&mut self, entry: &Queued) {
        self.queued_bytes -= cost(&entry.message, &entry.identifiers);
        if entry.qos == QoS::AtMostOnce {
            self.queued_qos0 -= 1;
        }
    }

    /// PUBACK for a QoS 1 delivery. Returns whether it matched one in flight.
    pub fn on_puback(&mut self, packet_id: PacketId) -> bool {
        let found = self.remove_inflight(packet_id, |e| e.qos == QoS::AtLeastOnce);
        self.pump();
        found
    }

    /// PUBREC for a QoS 2 delivery: answer PUBREL and wait for PUBCOMP.
    pub fn on_pubrec(&mut self, packet_id: PacketId, reason: ReasonCode) {
        let Some(index) =
            self.inflight.iter().position(|e| e.packet_id == packet_id && e.qos == QoS::ExactlyOnce)
        else {
            if let Some(conn) = &self.conn {
                let mut rel = ack(packet_id);
                rel.reason = ReasonCode::PacketIdentifierNotFound;
                rel.properties = conn.problem("no QoS 2 delivery in flight with this identifier");
                conn.send(&Packet::PubRel(rel));
            }
            return;
        };
        if reason.is_error() {
            // The receiver refused it (v5): the exchange ends here (MQTT-4.3.3).
            if let Some(entry) = self.inflight.remove(index) {
                self.resends -= usize::from(entry.resend);
                self.journal_done(entry.seq);
            }
            self.acks = self.acks.wrapping_add(1);
            self.pump();
            return;
        }
        let mut seq = 0;
        if let Some(entry) = self.inflight.get_mut(index) {
            entry.released = true;
            self.resends -= usize::from(std::mem::take(&mut entry.resend));
            seq = entry.seq;
        }
        if seq != 0 {
            self.journal(|log, id| log.released(id, seq, packet_id.get()));
        }
        self.acks = self.acks.wrapping_add(1);
        if let Some(conn) = &self.conn {
            conn.send(&Packet::PubRel(ack(packet_id)));
        }
    }

    pub fn on_pubcomp(&mut self, packet_id: PacketId) -> bool {
        let found = self.remove_inflight(packet_id, |e| e.released);
        self.pump();
        found
    }

    fn remove_inflight(&mut self, packet_id: PacketId, state: impl Fn(&Inflight) -> bool) -> bool {
        // Acknowledgements usually come in order: the front is checked first.
        match self.inflight.iter().position(|e| e.packet_id == packet_id && state(e)) {
            Some(index) => {
                if let Some(entry) = self.inflight.remove(index) {
                    self.resends -= usize::from(entry.resend);
                    self.journal_done(entry.seq);
                }
                self.acks = self.acks.wrapping_add(1);
                true
            }
            None => false,
        }
    }
}

/// What a queued entry costs: the message as held, the read buffer it shares (counted
/// whole: an upper bound, as other messages may share it too), and its identifiers.
fn cost(message: &Message, identifiers: &[u32]) -> usize {
    message.size() + message.pinned as usize + std::mem::size_of_val(identifiers)
}

fn ack(packet_id: PacketId) -> PubAck {
    PubAck { packet_id, reason: ReasonCode::Success, properties: Properties::default() }
}
