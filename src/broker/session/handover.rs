//! A session leaving for another node (a takeover across the cluster): what it owes its
//! client, in the order it would be sent, for the new owner to take on.

use super::{Journal, OwedMessage, Session};

impl Session {
    /// Every QoS 1/2 message the session owes its client: those in flight (with their
    /// packet identifiers and PUBREC state), then the queue, then what spilled to the log
    /// (read back through `journal`), skipping the first `skip` of them.
    pub fn owed(&self, journal: &mut dyn Journal, skip: usize) -> Vec<OwedMessage> {
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
        let mut owed: Vec<OwedMessage> = in_flight.chain(queued).skip(skip).collect();
        let skip_spilled = skip.saturating_sub(self.inflight.len() + self.queue.len());
        let spilled = self.spill.iter().flat_map(|s| s.entries.iter()).skip(skip_spilled);
        for (seq, _) in spilled {
            if let Some(s) = journal.load(*seq) {
                owed.push(OwedMessage {
                    seq: *seq,
                    qos: s.qos,
                    retain: s.retain,
                    identifiers: s.identifiers,
                    message: s.message,
                    packet_id: None,
                    released: false,
                });
            }
        }
        owed
    }

    /// How many messages [`Session::owed`] would list now.
    pub fn owed_count(&self) -> usize {
        self.inflight.len() + self.queue.len() + self.spill.as_ref().map_or(0, |s| s.entries.len())
    }
}
