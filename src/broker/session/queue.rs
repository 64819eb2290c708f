//! The session's queue: what waits for the client's window, and what a full one gives up.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Delivery, Io, Link, QueueFullPolicy, Queued, Session, SessionLimits};
use crate::broker::core_counters::DropReason;
use crate::broker::message::Message;
use crate::codec::QoS;
use crate::topic::GroupKey;

/// A persistent session's messages past its in-memory queue, kept only in its log (with a
/// data directory): sequence numbers and sizes, in order, after everything in `queue`.
/// About 16 bytes here per message (and the log's index entry), so an offline session can
/// owe its client a million messages without holding them.
#[derive(Default)]
pub(super) struct Spill {
    pub(super) entries: VecDeque<(u64, u32)>,
    /// What the entries count against `--max-spilled-bytes` (`spill_cost`).
    pub(super) bytes: u64,
}

impl Session {
    /// Whether a QoS 0 message for it waits in its queue rather than going out now: under
    /// back-pressure, when its outbox cannot take it (`can_send` false) or QoS 0 messages
    /// wait before it (order), unless a QoS 0 publisher gave up waiting for it.
    pub fn queues_qos0(&self, limits: &SessionLimits, can_send: bool) -> bool {
        limits.holds_qos0() && !self.qos0_lossy && (self.queued_qos0 > 0 || !can_send)
    }

    /// Drops the QoS 0 messages waiting in its queue (a QoS 0 publisher gave up on it): it
    /// pays for its QoS 0 backlog, which then holds no QoS 1/2 publisher. Returns how many.
    pub fn drop_queued_qos0(&mut self) -> usize {
        if self.queued_qos0 == 0 {
            return 0;
        }
        let before = self.queue.len();
        let mut kept = VecDeque::with_capacity(before);
        for queued in std::mem::take(&mut self.queue) {
            if queued.qos == QoS::AtMostOnce {
                self.forget_queued(&queued);
            } else {
                kept.push_back(queued);
            }
        }
        self.queue = kept;
        let dropped = before - self.queue.len();
        self.dropped += dropped as u64;
        crate::broker::core_counters::dropped_n(DropReason::SlowConsumer, dropped as u64);
        dropped
    }

    /// Counts a message given up.
    pub(super) fn drop_one(&mut self, reason: DropReason) {
        self.dropped += 1;
        crate::broker::core_counters::dropped(reason);
    }

    /// Sends an encoded QoS 0 PUBLISH shared with other subscribers (fan-out encodes once).
    pub fn deliver_encoded_qos0(&mut self, sent: bool) -> Delivery {
        if sent {
            crate::broker::core_counters::sent(QoS::AtMostOnce);
            Delivery::Sent
        } else {
            self.drop_one(DropReason::SlowConsumer);
            Delivery::Dropped
        }
    }
    /// Whether the in-memory queue takes a message of this cost without giving one up.
    pub(super) fn queue_takes(&self, message: &Message, identifiers: &[u32], limits: &SessionLimits) -> bool {
        self.queue.len() < limits.max_queued_messages
            && self.queued_bytes + cost(message, identifiers) <= limits.max_queued_bytes
    }

    /// Queues a message the session already owes (read back from the log): no bound
    /// applies, what made room for it did.
    pub(super) fn queue_owed(
        &mut self,
        message: Message,
        qos: QoS,
        retain: bool,
        identifiers: Vec<u32>,
        seq: u64,
    ) {
        self.queued_bytes += cost(&message, &identifiers);
        self.queue.push_back(Queued {
            message,
            qos,
            retain,
            identifiers: identifiers.into(),
            shared: None,
            seq,
        });
    }

    /// What its spilled messages count against `--max-spilled-bytes`.
    pub(super) fn spilled_bytes(&self) -> u64 {
        self.spill.as_ref().map_or(0, |s| s.bytes)
    }

    /// Messages it owes are kept in its log only.
    pub fn has_spill(&self) -> bool {
        self.spill.is_some()
    }

    pub(super) fn spill_seq(&mut self, seq: u64, size: usize) {
        let spill = self.spill.get_or_insert_with(Box::default);
        spill.entries.push_back((seq, size as u32));
        spill.bytes += size as u64;
    }

    /// Reads spilled messages back from the log into the in-memory queue while it has room
    /// (half of it at most per call, so a refill is a batch, not one read per send).
    pub(super) fn unspill<L: Link>(&mut self, io: &mut Io<'_, L>) {
        let limits = io.limits;
        let room = limits.max_queued_messages.saturating_sub(self.queue.len()).max(1);
        for _ in 0..room.div_ceil(2).max(1) {
            let Some(spill) = self.spill.as_mut() else { return };
            let Some(&(seq, size)) = spill.entries.front() else {
                self.spill = None;
                return;
            };
            if !self.queue.is_empty() && self.queued_bytes + size as usize > limits.max_queued_bytes {
                // The in-memory byte bound holds for what is read back too.
                return;
            }
            spill.entries.pop_front();
            spill.bytes -= u64::from(size);
            if spill.entries.is_empty() {
                self.spill = None;
            }
            match io.journal.load(seq) {
                Some(m) => self.queue_owed(m.message, m.qos, m.retain, m.identifiers, seq),
                None => {
                    // Not in the log (it cannot be read back): counted, and closed there.
                    self.drop_one(DropReason::LogError);
                    io.done(seq);
                }
            }
        }
    }

    /// A connected client whose queue passed half its bound: publishers feeding it pause
    /// (back-pressure) rather than let the queue overflow and drop messages already
    /// acknowledged to them. QoS 0 messages count unless `--qos0-overflow drop`.
    pub fn congested(&self, limits: &SessionLimits) -> bool {
        let qos0 = if limits.holds_qos0() { 0 } else { self.queued_qos0 as usize };
        limits.policy.is_lossless()
            && self.holds_publishers()
            && (self.queue.len() - qos0 >= limits.max_queued_messages / 2
                || self.queued_bytes >= limits.max_queued_bytes / 2
                || self.spilled_bytes() >= limits.max_spilled_bytes / 2)
    }

    /// Drained to a quarter of the bound, or gone, or a slow consumer: the publishers it
    /// paused may go on.
    pub fn relieved(&self, limits: &SessionLimits) -> bool {
        !self.holds_publishers()
            || (self.queue.len() <= limits.max_queued_messages / 4
                && self.queued_bytes <= limits.max_queued_bytes / 4
                && self.spilled_bytes() <= limits.max_spilled_bytes / 4)
    }

    /// Bytes its queue holds (what `--max-queued-bytes` counts).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Whether its queue takes `message` without giving anything up: under `Backpressure`
    /// a publisher whose message would not fit a congested session's queue waits for room
    /// before it is routed (see `Shard::would_overflow`). A message larger than the whole
    /// byte bound fits an empty queue, or it would wait forever.
    /// `spills`: the session is journaled, so what does not fit in memory goes to the log.
    /// `spills`: the session is journaled and its log below its disk bound, so what does not
    /// fit in memory goes to the log. A session that spilled has no room while it may not.
    pub fn has_room_for(&self, message: &Message, limits: &SessionLimits, spills: bool) -> bool {
        if spills {
            let spilled = self.spilled_bytes();
            return spilled + spill_cost(message, &[]) as u64 <= limits.max_spilled_bytes;
        }
        if self.spill.is_some() {
            return false;
        }
        self.queue.len() < limits.max_queued_messages
            && (self.queue.is_empty() || self.queued_bytes + cost(message, &[]) <= limits.max_queued_bytes)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn enqueue<L: Link>(
        &mut self,
        message: &Message,
        qos: QoS,
        retain: bool,
        identifiers: &[u32],
        shared: Option<Arc<GroupKey>>,
        seq: u64,
        io: &mut Io<'_, L>,
    ) -> Delivery {
        let limits = io.limits;
        // A queued message may stay long: it is copied out of a read buffer more than twice
        // its size. Except while the queue overflows (each new message pushes an old one
        // out): then it shares an ordinary buffer, which `cost` counts whole, since copying
        // every message of an overloaded queue's churn made it 4× dearer.
        let fits = self.queue.len() < limits.max_queued_messages
            && self.queued_bytes + cost(message, identifiers) - message.pinned as usize
                <= limits.max_queued_bytes;
        // A shared message spills too once others have (it then stays with this member):
        // in memory it would overtake them, or evict one.
        if seq != 0
            && (shared.is_none() || self.spill.is_some())
            && io.journal.spills()
            && (self.spill.is_some() || !self.queue_takes(message, identifiers, limits))
        {
            // Past the in-memory queue, a journaled message stays in the log only, up to
            // `--max-spilled-bytes` and the log's share of `--max-disk-bytes`; past that the
            // new one is dropped (counted). Except, at the disk bound, for a connected
            // client that holds publishers: it takes this one (the bound is passed by one
            // message per such session) and the shard holds its publishers from now on
            // (`Shard::note_congestion`), so nothing acknowledged to them is cut.
            let size = spill_cost(message, identifiers);
            if self.spilled_bytes() + size as u64 > limits.max_spilled_bytes
                || (io.journal.disk_full() && !self.holds_publishers())
            {
                self.drop_one(if io.journal.disk_full() {
                    DropReason::DiskFull
                } else {
                    DropReason::QueueFull
                });
                io.done(seq);
                return Delivery::Dropped;
            }
            self.spill_seq(seq, size);
            return Delivery::Queued;
        }
        let message = if fits { message.held() } else { message.held_in_flight() };
        let size = cost(&message, identifiers);
        if size > limits.max_queued_bytes {
            // Larger than the whole queue may hold: evicting others would not make room.
            self.drop_one(DropReason::QueueFull);
            io.done(seq);
            return Delivery::Dropped;
        }
        while self.queue.len() >= limits.max_queued_messages
            || self.queued_bytes + size > limits.max_queued_bytes
        {
            // QoS 0 goes first, whatever the policy.
            let qos0 = if self.queued_qos0 > 0 {
                self.queue.iter().position(|q| q.qos == QoS::AtMostOnce)
            } else {
                None
            };
            let victim = match qos0 {
                Some(index) => index,
                // A QoS 0 message never takes the place of a QoS 1/2 one (acknowledged to
                // its publisher): it is the one dropped.
                None if qos == QoS::AtMostOnce => {
                    self.drop_one(DropReason::QueueFull);
                    return Delivery::Dropped;
                }
                None if limits.policy != QueueFullPolicy::DropNew && !self.queue.is_empty() => 0,
                None => {
                    self.drop_one(DropReason::QueueFull);
                    io.done(seq);
                    return Delivery::Dropped;
                }
            };
            if let Some(old) = self.queue.remove(victim) {
                self.forget_queued(&old);
                io.done(old.seq);
            }
            self.drop_one(DropReason::QueueFull);
        }
        self.queued_bytes += size;
        if qos == QoS::AtMostOnce {
            self.queued_qos0 += 1;
        }
        self.queue.push_back(Queued { message, qos, retain, identifiers: identifiers.into(), shared, seq });
        Delivery::Queued
    }

    /// Keeps the queue's byte and QoS 0 counts true as an entry leaves it.
    pub(super) fn forget_queued(&mut self, entry: &Queued) {
        self.queued_bytes -= cost(&entry.message, &entry.identifiers);
        if entry.qos == QoS::AtMostOnce {
            self.queued_qos0 -= 1;
        }
    }
}

/// What a queued entry costs: the message as held, the read buffer it shares (counted
/// whole: an upper bound, as other messages may share it too), and its identifiers.
pub(super) fn cost(message: &Message, identifiers: &[u32]) -> usize {
    message.size() + message.pinned as usize + std::mem::size_of_val(identifiers)
}

/// What a spilled message counts against `--max-spilled-bytes`: the message itself (no
/// read buffer: the log holds its own copy).
pub(super) fn spill_cost(message: &Message, identifiers: &[u32]) -> usize {
    message.size() + std::mem::size_of_val(identifiers)
}

/// Why a QoS 0 PUBLISH the connection refused is dropped: with room in its outbox, it was
/// over the client's Maximum Packet Size; else the subscriber did not keep up.
pub(super) fn refused_qos0(room: bool) -> DropReason {
    if room {
        DropReason::TooLarge
    } else {
        DropReason::SlowConsumer
    }
}
