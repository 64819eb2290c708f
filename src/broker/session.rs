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

use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::time::Instant;

use ahash::{AHashMap, AHashSet};

use super::connection::ConnHandle;
use super::message::Message;
use super::retained::RetainedCursor;
use crate::codec::{
    Packet, PacketId, Properties, ProtocolVersion, PubAck, QoS, ReasonCode, SubscriptionOptions, Will,
};
use crate::topic::TopicFilter;

pub type SessionId = u64;

/// What a full queue gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueFullPolicy {
    /// Drop the oldest queued message to make room (MQTT brokers' usual choice).
    DropOldest,
    /// Drop the message that does not fit.
    DropNew,
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
    /// PUBREC received and PUBREL sent: waiting for PUBCOMP.
    released: bool,
}

struct Queued {
    message: Message,
    qos: QoS,
    retain: bool,
}

pub struct Session {
    pub id: SessionId,
    pub client_id: String,
    pub conn: Option<Rc<ConnHandle>>,
    pub version: ProtocolVersion,
    pub subscriptions: AHashMap<TopicFilter, Subscription>,
    /// Seconds the session outlives its connection; `u32::MAX` never expires.
    pub expiry_interval: u32,
    /// When the session ends, while no connection is attached.
    pub expires_at: Option<Instant>,
    pub will: Option<Will>,
    /// When a delayed will is due.
    pub will_at: Option<Instant>,
    /// Inbound QoS 2 packet identifiers between PUBREC and PUBREL.
    pub qos2_inbound: AHashSet<u16>,
    /// Retained pages still to fetch for recent subscriptions.
    pub retained_cursors: Vec<RetainedCursor>,
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    next_packet_id: u16,
    window: usize,
    limits: SessionLimits,
    pub dropped: u64,
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
            retained_cursors: Vec::new(),
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            next_packet_id: 0,
            window: limits.max_inflight,
            limits,
            dropped: 0,
        }
    }

    /// A session that outlives its connection.
    pub fn is_persistent(&self) -> bool {
        self.expiry_interval > 0
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Room for more retained messages without pressing on the queue bound.
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.limits.max_queued_messages / 2
            && self.conn.as_ref().is_none_or(|c| c.has_room())
    }

    /// Attaches a connection: messages in flight are sent again (PUBLISH with DUP, or
    /// PUBREL), then queued messages fill the window (MQTT-4.4.0-1).
    pub fn attach(&mut self, conn: Rc<ConnHandle>, receive_maximum: usize) {
        self.window = receive_maximum.min(self.limits.max_inflight).max(1);
        self.version = conn.version;
        self.expires_at = None;
        self.will_at = None;
        for entry in &self.inflight {
            if entry.released {
                conn.send(&Packet::PubRel(ack(entry.packet_id)));
            } else {
                let publish = entry.message.to_publish(entry.qos, entry.retain, true, Some(entry.packet_id));
                conn.send(&Packet::Publish(publish));
            }
        }
        self.conn = Some(conn);
        self.pump();
    }

    pub fn detach(&mut self) {
        self.conn = None;
    }

    /// Delivers `message` at `qos` (already the lower of publish and subscription QoS).
    pub fn deliver(&mut self, message: &Message, qos: QoS, retain: bool) -> Delivery {
        if qos == QoS::AtMostOnce {
            return match &self.conn {
                Some(conn) => {
                    let publish = message.to_publish(QoS::AtMostOnce, retain, false, None);
                    if conn.send_bounded(&Packet::Publish(publish)) {
                        Delivery::Sent
                    } else {
                        self.dropped += 1;
                        Delivery::Dropped
                    }
                }
                None if self.limits.queue_qos0 && self.is_persistent() => self.enqueue(message, qos, retain),
                None => {
                    self.dropped += 1;
                    Delivery::Dropped
                }
            };
        }
        if self.conn.is_some() && self.queue.is_empty() && self.inflight.len() < self.window {
            self.send_new(message.clone(), qos, retain);
            return Delivery::Sent;
        }
        self.enqueue(message, qos, retain)
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

    fn enqueue(&mut self, message: &Message, qos: QoS, retain: bool) -> Delivery {
        let size = message.size();
        while self.queue.len() >= self.limits.max_queued_messages
            || self.queued_bytes + size > self.limits.max_queued_bytes
        {
            // QoS 0 goes first, whatever the policy.
            let victim = match self.queue.iter().position(|q| q.qos == QoS::AtMostOnce) {
                Some(index) => index,
                None if self.limits.policy == QueueFullPolicy::DropOldest && !self.queue.is_empty() => 0,
                None => {
                    self.dropped += 1;
                    return Delivery::Dropped;
                }
            };
            if let Some(old) = self.queue.remove(victim) {
                self.queued_bytes -= old.message.size();
            }
            self.dropped += 1;
        }
        self.queued_bytes += size;
        self.queue.push_back(Queued { message: message.clone(), qos, retain });
        Delivery::Queued
    }

    fn send_new(&mut self, message: Message, qos: QoS, retain: bool) {
        if self.conn.is_none() {
            return;
        }
        let packet_id = self.allocate_packet_id();
        let Some(conn) = &self.conn else { return };
        conn.send(&Packet::Publish(message.to_publish(qos, retain, false, Some(packet_id))));
        self.inflight.push_back(Inflight { packet_id, message, qos, retain, released: false });
    }

    /// The next identifier not in flight. The window is far below 65,535, so one is free.
    fn allocate_packet_id(&mut self) -> PacketId {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            if let Some(id) = NonZeroU16::new(self.next_packet_id) {
                if !self.inflight.iter().any(|e| e.packet_id == id) {
                    return id;
                }
            }
        }
    }

    /// Sends queued messages while the window has room.
    pub fn pump(&mut self) {
        while self.conn.is_some() && self.inflight.len() < self.window {
            let Some(next) = self.queue.pop_front() else { break };
            self.queued_bytes -= next.message.size();
            if next.qos == QoS::AtMostOnce {
                if let Some(conn) = &self.conn {
                    conn.send_bounded(&Packet::Publish(next.message.to_publish(
                        QoS::AtMostOnce,
                        next.retain,
                        false,
                        None,
                    )));
                }
            } else {
                self.send_new(next.message, next.qos, next.retain);
            }
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
                conn.send(&Packet::PubRel(rel));
            }
            return;
        };
        if reason.is_error() {
            // The receiver refused it (v5): the exchange ends here (MQTT-4.3.3).
            self.inflight.remove(index);
            self.pump();
            return;
        }
        if let Some(entry) = self.inflight.get_mut(index) {
            entry.released = true;
        }
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
                self.inflight.remove(index);
                true
            }
            None => false,
        }
    }
}

fn ack(packet_id: PacketId) -> PubAck {
    PubAck { packet_id, reason: ReasonCode::Success, properties: Properties::default() }
}
