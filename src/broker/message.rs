//! An application message as the broker holds and forwards it.

use bytes::Bytes;

use crate::codec::{Properties, Property, Publish, QoS};
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
        Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties,
        }
    }

    /// Bytes this message holds: what queue bounds count.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + 16
    }

    /// The PUBLISH that delivers it.
    pub fn to_publish(
        &self,
        qos: QoS,
        retain: bool,
        dup: bool,
        packet_id: Option<crate::codec::PacketId>,
    ) -> Publish {
        Publish {
            dup,
            qos,
            retain,
            topic: self.topic.clone(),
            packet_id,
            properties: self.properties.clone(),
            payload: self.payload.clone(),
        }
    }
}
