//! An application message as the broker holds and forwards it.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{PacketId, Properties, Property, Publish, QoS};
use crate::topic::TopicName;

/// A message after it left its publisher: topic resolved, properties reduced to what is
/// forwarded (no Topic Alias, no Subscription Identifiers, which are per connection).
/// Every field is reference-counted or small, so cloning one shares its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    /// The QoS it was published with: the ceiling for every delivery.
    pub qos: QoS,
    /// The RETAIN flag it was published with.
    pub retain: bool,
    pub properties: Properties,
    /// From the Message Expiry Interval: when it stops being delivered (MQTT-3.3.2-5).
    pub expires_at: Option<Instant>,
}

impl Message {
    pub fn from_publish(publish: Publish) -> Message {
        let properties = if publish.properties.is_empty() {
            publish.properties
        } else {
            Properties(
                publish
                    .properties
                    .0
                    .into_iter()
                    .filter(|p| !matches!(p, Property::TopicAlias(_) | Property::SubscriptionIdentifier(_)))
                    .collect(),
            )
        };
        let expires_at = expiry_deadline(&properties);
        Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties,
            expires_at,
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// [`Message::is_expired`] now; reads the clock only for a message that can expire (a
    /// clock read per delivery shows in QoS 1 throughput).
    pub fn is_expired_now(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= Instant::now())
    }

    /// Bytes this message holds: what queue bounds count.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + 16
    }

    /// The PUBLISH that delivers it: the expiry interval is what remains of it
    /// (MQTT-3.3.2-6), and the matching subscriptions' identifiers are added (MQTT-3.3.4-3).
    pub fn to_publish(
        &self,
        qos: QoS,
        retain: bool,
        dup: bool,
        packet_id: Option<PacketId>,
        identifiers: &[u32],
    ) -> Publish {
        let properties = if self.expires_at.is_none() && identifiers.is_empty() {
            self.properties.clone()
        } else {
            let mut list: Vec<Property> = self
                .properties
                .0
                .iter()
                .map(|p| match (p, self.expires_at) {
                    (Property::MessageExpiryInterval(_), Some(at)) => {
                        let left = at.saturating_duration_since(Instant::now());
                        Property::MessageExpiryInterval(left.as_secs_f64().ceil() as u32)
                    }
                    _ => p.clone(),
                })
                .collect();
            list.extend(identifiers.iter().map(|id| Property::SubscriptionIdentifier(*id)));
            Properties(list)
        };
        Publish {
            dup,
            qos,
            retain,
            topic: self.topic.clone(),
            packet_id,
            properties,
            payload: self.payload.clone(),
        }
    }
}

/// The deadline a Message Expiry Interval property sets, counted from now.
pub fn expiry_deadline(properties: &Properties) -> Option<Instant> {
    properties.message_expiry_interval().map(|secs| Instant::now() + Duration::from_secs(u64::from(secs)))
}
