//! A PUBLISH the server writes from parts rather than from a [`Publish`]: the application
//! message's shared pieces (topic, payload, its properties already in wire form) plus what
//! each delivery adds (packet identifier, the expiry that remains, the matching
//! subscriptions' identifiers, a topic alias). Fan-out then shares one copy of a message's
//! properties instead of cloning a property list per subscriber.
//!
//! [`Publish`]: super::Publish

use bytes::{BufMut, BytesMut};

use super::primitives::{field_len, put_varint, varint_len, MAX_VARINT};
use super::{EncodeError, PacketId, PropertyId, ProtocolVersion, QoS, MAX_ENCODED_SIZE};

/// The parts of one outgoing PUBLISH.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingPublish<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when `topic_alias` stands for it (v5).
    pub topic: &'a [u8],
    /// `Some` exactly when `qos > 0`.
    pub packet_id: Option<PacketId>,
    /// Message Expiry Interval: what remains of it (MQTT-3.3.2-6).
    pub message_expiry: Option<u32>,
    /// Other properties, encoded (identifier and value each, no Property Length), as a
    /// decoded packet gave them: trusted to be valid PUBLISH properties.
    pub properties: &'a [u8],
    pub subscription_identifiers: &'a [u32],
    pub topic_alias: Option<u16>,
    pub payload: &'a [u8],
}

impl OutgoingPublish<'_> {
    fn properties_len(&self) -> usize {
        self.message_expiry.map_or(0, |_| 5)
            + self.properties.len()
            + self.subscription_identifiers.iter().map(|id| 1 + varint_len(*id as usize)).sum::<usize>()
            + self.topic_alias.map_or(0, |_| 3)
    }

    fn remaining(&self, version: ProtocolVersion) -> usize {
        let properties = if version.is_v5() {
            let len = self.properties_len();
            varint_len(len) + len
        } else {
            0
        };
        field_len(self.topic.len())
            + if self.packet_id.is_some() { 2 } else { 0 }
            + properties
            + self.payload.len()
    }

    /// Bytes on the wire in `version`, fixed header included.
    pub fn encoded_size(&self, version: ProtocolVersion) -> usize {
        let remaining = self.remaining(version);
        1 + varint_len(remaining) + remaining
    }

    /// Appends the packet, refusing one larger than `max_size` (the client's Maximum
    /// Packet Size). On error nothing is appended. v3 drops every property.
    pub fn encode(
        &self,
        version: ProtocolVersion,
        max_size: usize,
        buf: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        if self.topic.len() > u16::MAX as usize {
            return Err(EncodeError::TooLong("topic name"));
        }
        if self.subscription_identifiers.iter().any(|id| *id == 0 || *id > MAX_VARINT) {
            return Err(EncodeError::TooLong("subscription identifier"));
        }
        let remaining = self.remaining(version);
        if remaining > MAX_VARINT as usize {
            return Err(EncodeError::TooLong("packet"));
        }
        let size = 1 + varint_len(remaining) + remaining;
        if size > max_size.min(MAX_ENCODED_SIZE) {
            return Err(EncodeError::PacketTooLarge { size, max: max_size });
        }
        buf.reserve(size);
        let first = 0x30 | u8::from(self.dup) << 3 | (self.qos as u8) << 1 | u8::from(self.retain);
        buf.put_u8(first);
        put_varint(buf, remaining);
        buf.put_u16(self.topic.len() as u16);
        buf.put_slice(self.topic);
        if let Some(id) = self.packet_id {
            buf.put_u16(id.get());
        }
        if version.is_v5() {
            put_varint(buf, self.properties_len());
            if let Some(secs) = self.message_expiry {
                buf.put_u8(PropertyId::MessageExpiryInterval.as_u8());
                buf.put_u32(secs);
            }
            buf.put_slice(self.properties);
            for id in self.subscription_identifiers {
                buf.put_u8(PropertyId::SubscriptionIdentifier.as_u8());
                put_varint(buf, *id as usize);
            }
            if let Some(alias) = self.topic_alias {
                buf.put_u8(PropertyId::TopicAlias.as_u8());
                buf.put_u16(alias);
            }
        }
        buf.put_slice(self.payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use bytes::Bytes;

    use super::*;
    use crate::codec::{decode, Packet, Properties, Property, Publish};
    use crate::topic::TopicName;

    fn body(properties: &[Property]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        Properties(properties.to_vec()).encode_body_filtered(|_| true, &mut buf).unwrap();
        buf.to_vec()
    }

    #[test]
    fn decodes_to_the_publish_it_describes() {
        let user = vec![
            Property::UserProperty("k".into(), "v".into()),
            Property::ContentType("text/plain".into()),
            Property::UserProperty("k".into(), "w".into()),
        ];
        let properties = body(&user);
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            for (alias, topic) in [(None, &b"a/b"[..]), (Some(7), &b""[..]), (Some(3), &b"a/b"[..])] {
                let out = OutgoingPublish {
                    dup: true,
                    qos: QoS::ExactlyOnce,
                    retain: true,
                    topic,
                    packet_id: NonZeroU16::new(513),
                    message_expiry: Some(30),
                    properties: &properties,
                    subscription_identifiers: &[1, 300_000],
                    topic_alias: alias,
                    payload: b"payload",
                };
                if !version.is_v5() && topic.is_empty() {
                    continue;
                }
                let mut buf = BytesMut::new();
                out.encode(version, usize::MAX, &mut buf).unwrap();
                assert_eq!(buf.len(), out.encoded_size(version));
                let Some(Packet::Publish(p)) = decode(&mut buf, version, usize::MAX).unwrap() else {
                    panic!("not a publish")
                };
                let mut expected = Vec::new();
                if version.is_v5() {
                    expected.push(Property::MessageExpiryInterval(30));
                    expected.extend(user.iter().cloned());
                    expected.push(Property::SubscriptionIdentifier(1));
                    expected.push(Property::SubscriptionIdentifier(300_000));
                    expected.extend(alias.map(Property::TopicAlias));
                }
                let want = Publish {
                    dup: true,
                    qos: QoS::ExactlyOnce,
                    retain: true,
                    topic: TopicName::new_allow_empty(Bytes::copy_from_slice(topic)).unwrap(),
                    packet_id: NonZeroU16::new(513),
                    properties: Properties(expected),
                    payload: Bytes::from_static(b"payload"),
                };
                assert_eq!(p, want);
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn refuses_what_exceeds_the_limit_and_leaves_nothing() {
        let out = OutgoingPublish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: b"t",
            packet_id: None,
            message_expiry: None,
            properties: &[],
            subscription_identifiers: &[],
            topic_alias: None,
            payload: &[0; 100],
        };
        let size = out.encoded_size(ProtocolVersion::V5);
        let mut buf = BytesMut::new();
        assert!(matches!(
            out.encode(ProtocolVersion::V5, size - 1, &mut buf),
            Err(EncodeError::PacketTooLarge { .. })
        ));
        assert!(buf.is_empty());
        out.encode(ProtocolVersion::V5, size, &mut buf).unwrap();
        assert_eq!(buf.len(), size);
    }
}
