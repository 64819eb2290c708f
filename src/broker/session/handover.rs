//! Moving a session's debts: what it owes its client, taken out in the order it would be
//! sent (a takeover across the cluster hands it to another node) and put back (from that
//! node's hand-over, or from the log at recovery).

use std::num::NonZeroU16;
use std::time::Duration;

use ahash::AHashSet;

use super::{queue, Inflight, Journal, OwedMessage, Session, SessionLimits};
use crate::broker::core_counters::DropReason;
use crate::broker::message::Message;

/// How long a session that moved here from another node skips the messages that node
/// handed over last (a copy of one may still be on its way here directly): the shard
/// calls [`Session::forget_arrival`] after it.
pub const ARRIVAL_MEMORY: Duration = Duration::from_secs(30);

/// The ids of messages a session got at the node it moved from.
pub type Arrived = AHashSet<u64>;

impl Session {
    /// Messages the session owes its client, in the order they would be sent, but those
    /// `skip` picks (those sent in an earlier part): those in flight (with their packet
    /// identifiers and PUBREC state), queued, then spilled to the log after sequence number
    /// `spill_after` (read back through `journal`), while they fit in `budget` bytes (one
    /// at least). Also returns the last spilled one's sequence number listed (`spill_after`
    /// when none) and whether more remain. The budget holds for what is in memory too: a
    /// window of large messages in flight is more than one frame carries.
    pub fn owed(
        &self,
        journal: &mut dyn Journal,
        spill_after: u64,
        budget: usize,
        skip: impl Fn(&OwedMessage) -> bool,
    ) -> (Vec<OwedMessage>, u64, bool) {
        let in_flight = self.inflight.iter().map(|i| OwedMessage {
            seq: i.seq,
            qos: i.qos,
            retain: i.retain,
            identifiers: i.identifiers.to_vec(),
            message: i.message.clone(),
            packet_id: Some(i.packet_id.get()),
            released: i.released,
        });
        let queued = self.queue.iter().map(|q| OwedMessage {
            seq: q.seq,
            qos: q.qos,
            retain: q.retain,
            identifiers: q.identifiers.to_vec(),
            message: q.message.clone(),
            packet_id: None,
            released: false,
        });
        let mut owed = Vec::new();
        let mut bytes = 0usize;
        let fits = |bytes: usize, size: usize| bytes == 0 || bytes + size <= budget;
        for m in in_flight.chain(queued).filter(|m| !skip(m)) {
            let size = queue::spill_cost(&m.message, &m.identifiers);
            if !fits(bytes, size) {
                return (owed, spill_after, true);
            }
            bytes += size;
            owed.push(m);
        }
        let mut last = spill_after;
        let spilled = self.spill.iter().flat_map(|s| s.entries.iter()).filter(|(seq, _)| *seq > spill_after);
        for &(seq, size) in spilled {
            if !fits(bytes, size as usize) {
                return (owed, last, true);
            }
            bytes += size as usize;
            last = seq;
            if let Some(m) = journal.load(seq).map(|s| spilled_message(seq, s)).filter(|m| !skip(m)) {
                owed.push(m);
            }
        }
        (owed, last, false)
    }

    /// Messages spilled to the log.
    pub fn spilled_count(&self) -> usize {
        self.spill.as_ref().map_or(0, |s| s.entries.len())
    }

    /// Inbound QoS 2 packet identifiers between PUBREC and PUBREL.
    pub fn qos2_inbound(&self) -> Vec<u16> {
        self.qos2_inbound.iter().flat_map(|ids| ids.iter().copied()).collect()
    }

    /// Takes out of the session what waits in its queue but is not `kept`, and what
    /// spilled to the log past its first `spilled` messages, in order. Their log records
    /// stay: the caller says they are done once it put them back, so a crash in between
    /// loses none.
    pub fn take_queued(
        &mut self,
        journal: &mut dyn Journal,
        kept: impl Fn(&Message) -> bool,
        spilled: usize,
    ) -> Vec<OwedMessage> {
        let mut taken = Vec::new();
        let mut queue = std::mem::take(&mut self.queue);
        for q in queue.drain(..) {
            if kept(&q.message) {
                self.queue.push_back(q);
                continue;
            }
            self.forget_queued(&q);
            taken.push(OwedMessage {
                seq: q.seq,
                qos: q.qos,
                retain: q.retain,
                identifiers: q.identifiers.into_vec(),
                message: q.message,
                packet_id: None,
                released: false,
            });
        }
        let Some(spill) = self.spill.as_mut() else { return taken };
        let past: Vec<(u64, u32)> = spill.entries.drain(spilled.min(spill.entries.len())..).collect();
        spill.bytes -= past.iter().map(|(_, size)| u64::from(*size)).sum::<u64>();
        if spill.entries.is_empty() {
            self.spill = None;
        }
        for (seq, _) in past {
            match journal.load(seq) {
                Some(s) => taken.push(spilled_message(seq, s)),
                None => {
                    // Not in the log (it cannot be read back): counted, and closed there.
                    self.drop_one(DropReason::LogError);
                    journal.done(seq);
                }
            }
        }
        taken
    }

    /// Puts a message another node's copy of the session had in flight back in flight
    /// here, with its packet identifier and PUBREC state (journaled as sent), so the client
    /// gets the same PUBLISH (DUP) or PUBREL it would have got there. False: it was not in
    /// flight there (deliver it).
    pub fn take_in_flight(&mut self, m: &OwedMessage, journal: &mut dyn Journal) -> bool {
        let Some(packet_id) = m.packet_id.filter(|p| *p != 0) else { return false };
        let seq = journal.message(m.qos, m.retain, &m.identifiers, &m.message);
        journal.sent(seq, packet_id);
        if m.released {
            journal.released(seq, packet_id);
        }
        self.restore(OwedMessage { seq, ..m.clone() }, None);
        true
    }

    /// The session moved here with `ids` from its old node: a copy of one of them that
    /// arrives directly (until [`Session::forget_arrival`]) is not delivered again.
    pub fn arrived_with(&mut self, ids: AHashSet<u64>) {
        self.arrived = (!ids.is_empty()).then(|| Box::new(ids));
    }

    pub fn forget_arrival(&mut self) {
        self.arrived = None;
    }

    /// Whether `message` is one the session got at its old node (each is skipped once).
    pub(super) fn had_before_arriving(&mut self, message: &Message) -> bool {
        let Some(arrived) = self.arrived.as_mut() else { return false };
        let had = message.id.is_known() && arrived.remove(&message.id.0);
        if arrived.is_empty() {
            self.arrived = None;
        }
        had
    }

    /// Puts back a message a recovered session owed its client: in flight when it had
    /// been sent (resent with DUP, or PUBREL, on reconnection), else queued — or, given
    /// `spill_past` (its log can give messages back), left in the log once the in-memory
    /// queue is full.
    pub fn restore(&mut self, m: OwedMessage, spill_past: Option<&SessionLimits>) {
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
            None if m.seq != 0
                && spill_past.is_some_and(|limits| {
                    self.spill.is_some() || !self.queue_takes(&m.message, &m.identifiers, limits)
                }) =>
            {
                // Past the in-memory queue: it stays in the log only.
                self.spill_seq(m.seq, queue::spill_cost(&m.message, &m.identifiers));
            }
            None => self.queue_owed(m.message, m.qos, m.retain, m.identifiers, m.seq),
        }
    }

    /// Puts back what a recovered session's log still holds past its in-memory queue
    /// (sequence numbers and sizes, in order, after everything `restore` put back).
    pub fn restore_spilled(&mut self, spilled: Vec<(u64, u32)>) {
        for (seq, size) in spilled {
            self.spill_seq(seq, size as usize);
        }
    }
}

fn spilled_message(seq: u64, s: super::Spilled) -> OwedMessage {
    OwedMessage {
        seq,
        qos: s.qos,
        retain: s.retain,
        identifiers: s.identifiers,
        message: s.message,
        packet_id: None,
        released: false,
    }
}
