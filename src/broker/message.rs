//! An application message as the broker holds and forwards it.
//!
//! Byte accounting: [`Message::size`] is what a held copy costs in memory — topic,
//! payload, the properties in their wire form (shared by every copy, never re-built per
//! subscriber) and the struct itself. A message decoded from a client's packet shares the
//! read buffer it arrived in (`pinned` says how large that allocation is). Queues and the
//! retained store keep [`Message::held`], copied out when sharing would keep more than
//! twice its bytes alive; the in-flight window, and a queue while it overflows, keep
//! [`Message::held_in_flight`], which shares a buffer of an ordinary size (the queue then
//! counts that buffer whole against `--max-queued-bytes`) and copies out of a larger one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::codec::{OutgoingPublish, PacketId, Properties, Property, PropertyContext, Publish, QoS};
use crate::topic::TopicName;

/// The read buffer a message in flight may share (see `Message::held_in_flight`): four
/// times the default `--read-buffer`.
pub const IN_FLIGHT_PIN: usize = 64 * 1024;

/// What a held message costs beyond its bytes: the struct, its allocation's header and the
/// entry that holds it in a queue.
pub const MESSAGE_OVERHEAD: usize = 128;

/// A message's forwarded properties in wire form (each identifier and value, no Property
/// Length): shared by every copy, and no bigger than a pointer when there are none (the
/// common case), so the many copies a fan-out keeps in flight stay small.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireProperties(Option<Arc<[u8]>>);

impl WireProperties {
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl From<&[u8]> for WireProperties {
    fn from(bytes: &[u8]) -> WireProperties {
        WireProperties((!bytes.is_empty()).then(|| Arc::from(bytes)))
    }
}

/// A message after it left its publisher: topic resolved, properties reduced to what is
/// forwarded. Every field is reference-counted or small, so cloning one shares its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    /// The QoS it was published with: the ceiling for every delivery.
    pub qos: QoS,
    /// The RETAIN flag it was published with.
    pub retain: bool,
    /// The PUBLISH properties it is forwarded with, in wire form (each identifier and
    /// value, no Property Length), user properties in their order (MQTT-3.3.2-18). Topic
    /// Alias and Subscription Identifier are per connection and Message Expiry Interval is
    /// re-computed per delivery, so none of them is kept here.
    pub properties: WireProperties,
    /// From the Message Expiry Interval: when it stops being delivered (MQTT-3.3.2-5).
    pub expires_at: Option<Instant>,
    /// Size of the buffer `topic` and `payload` are slices of, when that is a client's read
    /// buffer; 0 when they own their bytes (`u32`: no packet is larger).
    pub pinned: u32,
    /// When it arrived, for one message in a sample (see `core_counters::stamp`).
    pub born: Stamp,
    /// Which message this is across the cluster (see [`MessageId`]).
    pub id: MessageId,
}

/// Which message this is, across a cluster: a number no other message carries (each
/// thread counts from a random start of its own), so a session moving between nodes can
/// tell one message that reached both nodes from two messages. 0: not known (read back
/// from a log written before messages had one). Not part of what a message is for its
/// equality, like [`Stamp`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageId(pub u64);

impl PartialEq for MessageId {
    fn eq(&self, _: &MessageId) -> bool {
        true
    }
}

impl Eq for MessageId {}

impl MessageId {
    /// A new message's: the calling thread's next number.
    pub fn next() -> MessageId {
        thread_local! {
            static NEXT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        }
        NEXT.with(|next| {
            let mut id = next.get();
            if id == 0 {
                id = random_start();
            }
            next.set(id.wrapping_add(1).max(1));
            MessageId(id)
        })
    }

    pub fn is_known(self) -> bool {
        self.0 != 0
    }
}

/// Where a thread's message numbers start: random, so two threads (or nodes) count in
/// ranges that do not meet in any realistic lifetime.
fn random_start() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No random source: the clock and the thread still tell threads apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (nanos ^ (std::process::id() as u64) << 32).to_le_bytes();
    }
    u64::from_le_bytes(bytes).max(1)
}

/// The arrival time of a sampled message, for the publish→deliver latency: not part of
/// what the message is, so any two stamps compare equal.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamp(pub u32);

impl PartialEq for Stamp {
    fn eq(&self, _: &Stamp) -> bool {
        true
    }
}

impl Eq for Stamp {}

impl Message {
    /// A message with `properties` as a publisher or a will gave them; `expires_at` comes
    /// from their Message Expiry Interval, counted from now.
    pub fn new(topic: TopicName, payload: Bytes, qos: QoS, retain: bool, properties: &Properties) -> Message {
        Message {
            expires_at: expiry_deadline(properties),
            properties: forwarded(properties),
            topic,
            payload,
            qos,
            retain,
            pinned: 0,
            born: Stamp::default(),
            id: MessageId::next(),
        }
    }

    /// A client's PUBLISH, whose topic and payload share a read buffer of `pinned` bytes.
    pub fn from_publish(publish: Publish, pinned: usize) -> Message {
        let mut message =
            Message::new(publish.topic, publish.payload, publish.qos, publish.retain, &publish.properties);
        message.pinned = u32::try_from(pinned).unwrap_or(u32::MAX);
        message.born = Stamp(super::core_counters::stamp());
        message
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// [`Message::is_expired`] now; reads the clock only for a message that can expire (a
    /// clock read per delivery shows in QoS 1 throughput).
    pub fn is_expired_now(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= Instant::now())
    }

    fn bytes(&self) -> usize {
        self.topic.len() + self.payload.len() + self.properties.len()
    }

    /// Bytes a held copy of this message costs: what queue and retained bounds count.
    pub fn size(&self) -> usize {
        self.bytes() + MESSAGE_OVERHEAD
    }

    /// Whether holding this message would keep a read buffer more than twice its bytes
    /// alive.
    pub fn pins(&self) -> bool {
        self.pinned as usize > 2 * self.bytes().max(1)
    }

    /// A copy to keep (a queue, the retained store): shares this one's bytes, unless they
    /// are slices of a read buffer more than twice their size, which a long-lived slice
    /// would keep alive whole; then the bytes are copied into one allocation of their own.
    pub fn held(&self) -> Message {
        if !self.pins() {
            return self.clone();
        }
        self.copied()
    }

    /// A copy for the in-flight window, or a queue while it overflows: it may share a read
    /// buffer of an ordinary size (`IN_FLIGHT_PIN`), which the hot path (and an overloaded
    /// queue's churn) would otherwise copy every message out of; a larger buffer is left
    /// as for `held`. A queue counts the shared buffer whole against its byte bound.
    pub fn held_in_flight(&self) -> Message {
        if self.pinned as usize <= IN_FLIGHT_PIN.max(2 * self.bytes()) {
            return self.clone();
        }
        self.copied()
    }

    /// The same message with its topic and payload in one allocation of their own (the
    /// properties are never a slice of a read buffer).
    fn copied(&self) -> Message {
        let mut own = BytesMut::with_capacity(self.topic.len() + self.payload.len());
        own.extend_from_slice(self.topic.as_bytes());
        own.extend_from_slice(&self.payload);
        let mut own = own.freeze();
        let topic = self.topic.with_bytes(own.split_to(self.topic.len()));
        Message {
            topic,
            payload: own,
            qos: self.qos,
            retain: self.retain,
            properties: self.properties.clone(),
            expires_at: self.expires_at,
            pinned: 0,
            born: self.born,
            id: self.id,
        }
    }

    /// The PUBLISH that delivers it: the expiry interval is what remains of it
    /// (MQTT-3.3.2-6), and the matching subscriptions' identifiers are added (MQTT-3.3.4-3).
    pub fn outgoing<'a>(
        &'a self,
        qos: QoS,
        retain: bool,
        dup: bool,
        packet_id: Option<PacketId>,
        identifiers: &'a [u32],
    ) -> OutgoingPublish<'a> {
        // A resend is not a delivery to time again.
        if !dup {
            super::core_counters::delivered(self.born.0);
        }
        let message_expiry = self.expires_at.map(|at| {
            let left = at.saturating_duration_since(Instant::now());
            left.as_secs_f64().ceil() as u32
        });
        OutgoingPublish {
            dup,
            qos,
            retain,
            topic: self.topic.as_bytes(),
            packet_id,
            message_expiry,
            properties: self.properties.as_bytes(),
            subscription_identifiers: identifiers,
            topic_alias: None,
            payload: &self.payload,
        }
    }

    /// The forwarded properties as a list (for storage and tests; delivery never needs it).
    pub fn property_list(&self) -> Properties {
        let body = Bytes::copy_from_slice(self.properties.as_bytes());
        Properties::decode_body(body, PropertyContext::Publish).unwrap_or_default()
    }
}

/// The properties that travel with a message, in wire form.
fn forwarded(properties: &Properties) -> WireProperties {
    if properties.is_empty() {
        return WireProperties::default();
    }
    let mut buf = BytesMut::new();
    let keep = |p: &Property| {
        !matches!(
            p,
            Property::TopicAlias(_)
                | Property::SubscriptionIdentifier(_)
                | Property::MessageExpiryInterval(_)
                | Property::WillDelayInterval(_)
        )
    };
    // Properties that were decoded encode again; a failure leaves none rather than half.
    if properties.encode_body_filtered(keep, &mut buf).is_err() {
        return WireProperties::default();
    }
    WireProperties::from(&buf[..])
}

/// The deadline a Message Expiry Interval property sets, counted from now.
pub fn expiry_deadline(properties: &Properties) -> Option<Instant> {
    properties.message_expiry_interval().map(|secs| Instant::now() + Duration::from_secs(u64::from(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_copies_out_of_a_large_buffer_only() {
        let frame = Bytes::from(vec![b'x'; 100_000]);
        let topic = TopicName::new(frame.slice(0..3)).unwrap();
        let message = Message {
            topic,
            payload: frame.slice(3..4),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: WireProperties::default(),
            expires_at: None,
            pinned: frame.len() as u32,
            born: Stamp::default(),
            id: MessageId::default(),
        };
        let held = message.held();
        assert_eq!((held.topic.as_str(), &held.payload[..]), ("xxx", &b"x"[..]));
        assert_eq!(held.pinned, 0);
        assert!(!frame.as_ptr_range().contains(&held.payload.as_ptr()), "copied out");
        let small = Message { pinned: 8, ..message.clone() };
        assert!(frame.as_ptr_range().contains(&small.held().payload.as_ptr()), "shared");
    }

    #[test]
    fn properties_are_kept_in_wire_form_without_per_connection_ones() {
        let properties = Properties(vec![
            Property::TopicAlias(3),
            Property::UserProperty("a".into(), "1".into()),
            Property::MessageExpiryInterval(60),
            Property::SubscriptionIdentifier(9),
            Property::UserProperty("a".into(), "2".into()),
        ]);
        let message =
            Message::new(TopicName::from_static("t"), Bytes::new(), QoS::AtMostOnce, false, &properties);
        assert!(message.expires_at.is_some());
        assert_eq!(
            message.property_list(),
            Properties(vec![
                Property::UserProperty("a".into(), "1".into()),
                Property::UserProperty("a".into(), "2".into()),
            ])
        );
        // Two user properties of one-byte name and value: 7 bytes each on the wire.
        assert_eq!(message.properties.len(), 14);
        assert_eq!(message.size(), 1 + 14 + MESSAGE_OVERHEAD);
    }
}
