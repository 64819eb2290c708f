//! The session's queue: what waits for the client's window, and what a full one gives up.

use std::sync::Arc;

use super::{Delivery, Io, Link, QueueFullPolicy, Queued, Session, SessionLimits};
use crate::broker::message::Message;
use crate::codec::QoS;
use crate::topic::GroupKey;

impl Session {
    /// A connected client whose queue of QoS 1/2 messages passed half its bound:
    /// publishers feeding it pause (back-pressure) rather than let the queue overflow and
    /// drop messages already acknowledged to them.
    pub fn congested(&self, limits: &SessionLimits) -> bool {
        limits.policy == QueueFullPolicy::Backpressure
            && self.holds_publishers()
            && (self.queue.len() - self.queued_qos0 as usize >= limits.max_queued_messages / 2
                || self.queued_bytes >= limits.max_queued_bytes / 2)
    }

    /// Drained to a quarter of the bound, or gone, or a slow consumer: the publishers it
    /// paused may go on.
    pub fn relieved(&self, limits: &SessionLimits) -> bool {
        !self.holds_publishers()
            || (self.queue.len() <= limits.max_queued_messages / 4
                && self.queued_bytes <= limits.max_queued_bytes / 4)
    }

    /// Bytes its queue holds (what `--max-queued-bytes` counts).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Whether its queue takes `message` without giving anything up: under `Backpressure`
    /// a publisher whose message would not fit a congested session's queue waits for room
    /// before it is routed (see `Shard::would_overflow`). A message larger than the whole
    /// byte bound fits an empty queue, or it would wait forever.
    pub fn has_room_for(&self, message: &Message, limits: &SessionLimits) -> bool {
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
        let message = if fits { message.held() } else { message.held_in_flight() };
        let size = cost(&message, identifiers);
        if size > limits.max_queued_bytes {
            // Larger than the whole queue may hold: evicting others would not make room.
            self.dropped += 1;
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
                None if limits.policy != QueueFullPolicy::DropNew && !self.queue.is_empty() => 0,
                None => {
                    self.dropped += 1;
                    io.done(seq);
                    return Delivery::Dropped;
                }
            };
            if let Some(old) = self.queue.remove(victim) {
                self.forget_queued(&old);
                io.done(old.seq);
            }
            self.dropped += 1;
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
