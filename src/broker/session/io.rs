//! What a [`Session`](super::Session) needs from its surroundings, passed in with each
//! call: the connection it is attached to (as a [`Link`]), its log (as a [`Journal`]),
//! the clock and its bounds. The session keeps no handle to any of them, so it runs the
//! same under a connection, a log, or a test.

use std::time::Instant;

use crate::broker::message::Message;
use crate::codec::{OutgoingPublish, Packet, Properties, QoS};

use super::SessionLimits;

/// The attached connection as its session sees it: an outbox that takes packets while it
/// has room, and says when it has room again.
pub trait Link {
    /// Whether the outbox takes another QoS 1/2 PUBLISH now.
    fn can_send(&self) -> bool;
    /// Asks to be told (the session's `pump` is called) once the outbox drained.
    fn want_room(&self);
    /// Whether the outbox is below half its bound: room for bulk deliveries.
    fn has_room(&self) -> bool;
    /// Sends a PUBLISH made for this connection; false when it is not sent (larger than
    /// the client's Maximum Packet Size, or, if `bounded`, the outbox is full).
    fn send_publish(&self, publish: OutgoingPublish<'_>, bounded: bool) -> bool;
    /// Sends a control packet (PUBREL).
    fn send(&self, packet: &Packet);
    /// Properties of a failed acknowledgement: a Reason String if the client takes one.
    fn problem(&self, why: &str) -> Properties;
    /// The time now: only read when a message with an expiry is about to be sent.
    fn now(&self) -> Instant;
}

/// The log records of a persistent session: everything it owes its client, as it changes.
pub trait Journal {
    /// A QoS 1/2 message accepted for the session; returns its sequence number (0 when not
    /// journaled).
    fn message(&mut self, qos: QoS, retain: bool, identifiers: &[u32], message: &Message) -> u64;
    /// Message `seq` was sent with `packet_id`.
    fn sent(&mut self, seq: u64, packet_id: u16);
    /// Message `seq` got its PUBREC: PUBREL is what is owed now.
    fn released(&mut self, seq: u64, packet_id: u16);
    /// Message `seq` needs nothing more.
    fn done(&mut self, seq: u64);
    /// Inbound QoS 2 `packet_id` received (until PUBREL).
    fn qos2_in(&mut self, packet_id: u16);
    /// Inbound QoS 2 `packet_id` released.
    fn qos2_in_done(&mut self, packet_id: u16);
    /// Whether messages may be kept only here (spilled): the log can give them back.
    fn spills(&self) -> bool {
        false
    }
    /// The log is at its share of `--max-disk-bytes`: nothing more may spill.
    fn disk_full(&self) -> bool {
        false
    }
    /// Message `seq` as it was accepted, read back from the log.
    fn load(&mut self, _seq: u64) -> Option<Spilled> {
        None
    }
}

/// A spilled message read back: what `Journal::message` was given.
pub struct Spilled {
    pub qos: QoS,
    pub retain: bool,
    pub identifiers: Vec<u32>,
    pub message: Message,
}

/// The journal of a session that keeps no log.
pub struct NoJournal;

impl Journal for NoJournal {
    fn message(&mut self, _: QoS, _: bool, _: &[u32], _: &Message) -> u64 {
        0
    }
    fn sent(&mut self, _: u64, _: u16) {}
    fn released(&mut self, _: u64, _: u16) {}
    fn done(&mut self, _: u64) {}
    fn qos2_in(&mut self, _: u16) {}
    fn qos2_in_done(&mut self, _: u16) {}
}

/// One call's surroundings: the attached connection (`None` while offline), the journal
/// and the bounds.
pub struct Io<'a, L: Link> {
    pub link: Option<&'a L>,
    pub journal: &'a mut dyn Journal,
    pub limits: &'a SessionLimits,
}

impl<L: Link> Io<'_, L> {
    /// Records that message `seq` needs nothing more (0: not journaled).
    pub(super) fn done(&mut self, seq: u64) {
        if seq != 0 {
            self.journal.done(seq);
        }
    }
}
