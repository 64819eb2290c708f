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
    /// Every message the session owes its client but those `skip` picks: in flight (with
    /// their packet identifiers and PUBREC state), then the queue, then what spilled to
    /// the log (read back through `journal`).
    pub fn owed(&self, journal: &mut dyn Journal, skip: impl Fn(&OwedMessage) -> bool) -> Vec<OwedMessage> {
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
        let mut owed: Vec<OwedMessage> = in_flight.chain(queued).filter(|m| !skip(m)).collect();
        for (seq, _) in self.spill.iter().flat_map(|s| s.entries.iter()) {
            if let Some(m) = journal.load(*seq).map(|s| spilled(*seq, s)).filter(|m| !skip(m)) {
                owed.push(m);
            }
        }
        owed
    }

    /// Inbound QoS 2 packet identifiers between PUBREC and PUBREL.
    pub fn qos2_inbound(&self) -> Vec<u16> {
        self.qos2_inbound.iter().flat_map(|ids| ids.iter().copied()).collect()
    }

    /// How many messages [`Session::owed`] would list now.
    pub fn owed_count(&self) -> usize {
        self.inflight.len() + self.queue.len() + self.spill.as_ref().map_or(0, |s| s.entries.len())
    }

    /// Takes what waits in the queue and in the log past it out of the session (not what
    /// is in flight), in order. Their log records stay: the caller says they are done once
    /// it put them back, so a crash in between loses none.
    pub fn take_queued(&mut self, journal: &mut dyn Journal) -> Vec<OwedMessage> {
        let mut taken = Vec::with_capacity(self.queue.len());
        while let Some(q) = self.queue.pop_front() {
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
        for (seq, _) in self.spill.take().map(|s| s.entries).unwrap_or_default() {
            match journal.load(seq) {
                Some(s) => taken.push(spilled(seq, s)),
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

fn spilled(seq: u64, s: super::Spilled) -> OwedMessage {
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
