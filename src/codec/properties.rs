//! MQTT 5 properties (§2.2.2.2) as one table: every packet carries a [`Properties`] list,
//! and which identifiers a packet may carry is checked in one place ([`PropertyId::allowed_in`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::primitives::{
    field_len, malformed, protocol, put_binary, put_varint, read_binary, read_string, read_u16, read_u32,
    read_u8, read_varint, varint_len, MAX_VARINT,
};
use super::{DecodeError, EncodeError};

/// Property identifiers, with their wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PropertyId {
    PayloadFormatIndicator = 0x01,
    MessageExpiryInterval = 0x02,
    ContentType = 0x03,
    ResponseTopic = 0x08,
    CorrelationData = 0x09,
    SubscriptionIdentifier = 0x0B,
    SessionExpiryInterval = 0x11,
    AssignedClientIdentifier = 0x12,
    ServerKeepAlive = 0x13,
    AuthenticationMethod = 0x15,
    AuthenticationData = 0x16,
    RequestProblemInformation = 0x17,
    WillDelayInterval = 0x18,
    RequestResponseInformation = 0x19,
    ResponseInformation = 0x1A,
    ServerReference = 0x1C,
    ReasonString = 0x1F,
    ReceiveMaximum = 0x21,
    TopicAliasMaximum = 0x22,
    TopicAlias = 0x23,
    MaximumQoS = 0x24,
    RetainAvailable = 0x25,
    UserProperty = 0x26,
    MaximumPacketSize = 0x27,
    WildcardSubscriptionAvailable = 0x28,
    SubscriptionIdentifierAvailable = 0x29,
    SharedSubscriptionAvailable = 0x2A,
}

/// One property with its value. Strings are validated UTF-8 (MQTT-1.5.4-1/2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Property {
    PayloadFormatIndicator(u8),
    MessageExpiryInterval(u32),
    ContentType(String),
    ResponseTopic(String),
    CorrelationData(Bytes),
    /// 1..=268,435,455, a variable byte integer.
    SubscriptionIdentifier(u32),
    SessionExpiryInterval(u32),
    AssignedClientIdentifier(String),
    ServerKeepAlive(u16),
    AuthenticationMethod(String),
    AuthenticationData(Bytes),
    RequestProblemInformation(u8),
    WillDelayInterval(u32),
    RequestResponseInformation(u8),
    ResponseInformation(String),
    ServerReference(String),
    ReasonString(String),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    MaximumQoS(u8),
    RetainAvailable(u8),
    UserProperty(String, String),
    MaximumPacketSize(u32),
    WildcardSubscriptionAvailable(u8),
    SubscriptionIdentifierAvailable(u8),
    SharedSubscriptionAvailable(u8),
}

/// The properties of one packet, in wire order. Empty (and allocation-free) for v3
/// packets and for the common v5 packet that carries none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties(pub Vec<Property>);

/// Where a property list sits: the packet that carries it, or a CONNECT's will
/// (MQTT 5.0 Table 2-4 lists will properties apart from CONNECT's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertyContext {
    Connect,
    ConnAck,
    Publish,
    Will,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl PropertyId {
    /// Every identifier, in wire order.
    pub const ALL: [PropertyId; 27] = {
        use PropertyId::*;
        [
            PayloadFormatIndicator,
            MessageExpiryInterval,
            ContentType,
            ResponseTopic,
            CorrelationData,
            SubscriptionIdentifier,
            SessionExpiryInterval,
            AssignedClientIdentifier,
            ServerKeepAlive,
            AuthenticationMethod,
            AuthenticationData,
            RequestProblemInformation,
            WillDelayInterval,
            RequestResponseInformation,
            ResponseInformation,
            ServerReference,
            ReasonString,
            ReceiveMaximum,
            TopicAliasMaximum,
            TopicAlias,
            MaximumQoS,
            RetainAvailable,
            UserProperty,
            MaximumPacketSize,
            WildcardSubscriptionAvailable,
            SubscriptionIdentifierAvailable,
            SharedSubscriptionAvailable,
        ]
    };

    pub fn from_u8(byte: u8) -> Option<PropertyId> {
        use PropertyId::*;
        Some(match byte {
            0x01 => PayloadFormatIndicator,
            0x02 => MessageExpiryInterval,
            0x03 => ContentType,
            0x08 => ResponseTopic,
            0x09 => CorrelationData,
            0x0B => SubscriptionIdentifier,
            0x11 => SessionExpiryInterval,
            0x12 => AssignedClientIdentifier,
            0x13 => ServerKeepAlive,
            0x15 => AuthenticationMethod,
            0x16 => AuthenticationData,
            0x17 => RequestProblemInformation,
            0x18 => WillDelayInterval,
            0x19 => RequestResponseInformation,
            0x1A => ResponseInformation,
            0x1C => ServerReference,
            0x1F => ReasonString,
            0x21 => ReceiveMaximum,
            0x22 => TopicAliasMaximum,
            0x23 => TopicAlias,
            0x24 => MaximumQoS,
            0x25 => RetainAvailable,
            0x26 => UserProperty,
            0x27 => MaximumPacketSize,
            0x28 => WildcardSubscriptionAvailable,
            0x29 => SubscriptionIdentifierAvailable,
            0x2A => SharedSubscriptionAvailable,
            _ => return None,
        })
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Whether a packet (or a will) may carry this property: MQTT 5.0 Table 2-4.
    pub fn allowed_in(self, context: PropertyContext) -> bool {
        use PropertyContext as C;
        use PropertyId::*;
        match self {
            PayloadFormatIndicator
            | MessageExpiryInterval
            | ContentType
            | ResponseTopic
            | CorrelationData => matches!(context, C::Publish | C::Will),
            SubscriptionIdentifier => matches!(context, C::Publish | C::Subscribe),
            SessionExpiryInterval => matches!(context, C::Connect | C::ConnAck | C::Disconnect),
            AssignedClientIdentifier
            | ServerKeepAlive
            | ResponseInformation
            | MaximumQoS
            | RetainAvailable
            | WildcardSubscriptionAvailable
            | SubscriptionIdentifierAvailable
            | SharedSubscriptionAvailable => context == C::ConnAck,
            AuthenticationMethod | AuthenticationData => {
                matches!(context, C::Connect | C::ConnAck | C::Auth)
            }
            RequestProblemInformation | RequestResponseInformation => context == C::Connect,
            WillDelayInterval => context == C::Will,
            ServerReference => matches!(context, C::ConnAck | C::Disconnect),
            ReasonString => {
                !matches!(context, C::Connect | C::Publish | C::Will | C::Subscribe | C::Unsubscribe)
            }
            ReceiveMaximum | TopicAliasMaximum | MaximumPacketSize => {
                matches!(context, C::Connect | C::ConnAck)
            }
            TopicAlias => context == C::Publish,
            UserProperty => true,
        }
    }

    /// Whether the property may appear more than once in `context` [MQTT-2.2.2-2]:
    /// User Property anywhere, Subscription Identifier only in PUBLISH (one per
    /// matching subscription, §3.3.2.3.8).
    pub fn may_repeat(self, context: PropertyContext) -> bool {
        match self {
            PropertyId::UserProperty => true,
            PropertyId::SubscriptionIdentifier => context == PropertyContext::Publish,
            _ => false,
        }
    }
}

impl Property {
    pub fn id(&self) -> PropertyId {
        use Property as P;
        use PropertyId as I;
        match self {
            P::PayloadFormatIndicator(_) => I::PayloadFormatIndicator,
            P::MessageExpiryInterval(_) => I::MessageExpiryInterval,
            P::ContentType(_) => I::ContentType,
            P::ResponseTopic(_) => I::ResponseTopic,
            P::CorrelationData(_) => I::CorrelationData,
            P::SubscriptionIdentifier(_) => I::SubscriptionIdentifier,
            P::SessionExpiryInterval(_) => I::SessionExpiryInterval,
            P::AssignedClientIdentifier(_) => I::AssignedClientIdentifier,
            P::ServerKeepAlive(_) => I::ServerKeepAlive,
            P::AuthenticationMethod(_) => I::AuthenticationMethod,
            P::AuthenticationData(_) => I::AuthenticationData,
            P::RequestProblemInformation(_) => I::RequestProblemInformation,
            P::WillDelayInterval(_) => I::WillDelayInterval,
            P::RequestResponseInformation(_) => I::RequestResponseInformation,
            P::ResponseInformation(_) => I::ResponseInformation,
            P::ServerReference(_) => I::ServerReference,
            P::ReasonString(_) => I::ReasonString,
            P::ReceiveMaximum(_) => I::ReceiveMaximum,
            P::TopicAliasMaximum(_) => I::TopicAliasMaximum,
            P::TopicAlias(_) => I::TopicAlias,
            P::MaximumQoS(_) => I::MaximumQoS,
            P::RetainAvailable(_) => I::RetainAvailable,
            P::UserProperty(..) => I::UserProperty,
            P::MaximumPacketSize(_) => I::MaximumPacketSize,
            P::WildcardSubscriptionAvailable(_) => I::WildcardSubscriptionAvailable,
            P::SubscriptionIdentifierAvailable(_) => I::SubscriptionIdentifierAvailable,
            P::SharedSubscriptionAvailable(_) => I::SharedSubscriptionAvailable,
        }
    }

    /// Bytes on the wire: the identifier (always one byte, all are < 128) and the value.
    pub fn encoded_len(&self) -> usize {
        use Property as P;
        1 + match self {
            P::PayloadFormatIndicator(_)
            | P::RequestProblemInformation(_)
            | P::RequestResponseInformation(_)
            | P::MaximumQoS(_)
            | P::RetainAvailable(_)
            | P::WildcardSubscriptionAvailable(_)
            | P::SubscriptionIdentifierAvailable(_)
            | P::SharedSubscriptionAvailable(_) => 1,
            P::ServerKeepAlive(_) | P::ReceiveMaximum(_) | P::TopicAliasMaximum(_) | P::TopicAlias(_) => 2,
            P::MessageExpiryInterval(_)
            | P::SessionExpiryInterval(_)
            | P::WillDelayInterval(_)
            | P::MaximumPacketSize(_) => 4,
            P::SubscriptionIdentifier(v) => varint_len(*v as usize),
            P::ContentType(s)
            | P::ResponseTopic(s)
            | P::AssignedClientIdentifier(s)
            | P::AuthenticationMethod(s)
            | P::ResponseInformation(s)
            | P::ServerReference(s)
            | P::ReasonString(s) => field_len(s.len()),
            P::CorrelationData(b) | P::AuthenticationData(b) => field_len(b.len()),
            P::UserProperty(k, v) => field_len(k.len()) + field_len(v.len()),
        }
    }

    fn encode(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        use Property as P;
        buf.put_u8(self.id().as_u8());
        match self {
            P::PayloadFormatIndicator(v)
            | P::RequestProblemInformation(v)
            | P::RequestResponseInformation(v)
            | P::MaximumQoS(v)
            | P::RetainAvailable(v)
            | P::WildcardSubscriptionAvailable(v)
            | P::SubscriptionIdentifierAvailable(v)
            | P::SharedSubscriptionAvailable(v) => buf.put_u8(*v),
            P::ServerKeepAlive(v) | P::ReceiveMaximum(v) | P::TopicAliasMaximum(v) | P::TopicAlias(v) => {
                buf.put_u16(*v)
            }
            P::MessageExpiryInterval(v)
            | P::SessionExpiryInterval(v)
            | P::WillDelayInterval(v)
            | P::MaximumPacketSize(v) => buf.put_u32(*v),
            P::SubscriptionIdentifier(v) => {
                if *v > MAX_VARINT {
                    return Err(EncodeError::TooLong("subscription identifier"));
                }
                put_varint(buf, *v as usize)
            }
            P::ContentType(s)
            | P::ResponseTopic(s)
            | P::AssignedClientIdentifier(s)
            | P::AuthenticationMethod(s)
            | P::ResponseInformation(s)
            | P::ServerReference(s)
            | P::ReasonString(s) => put_binary(buf, s.as_bytes(), "string property")?,
            P::CorrelationData(b) | P::AuthenticationData(b) => put_binary(buf, b, "binary property")?,
            P::UserProperty(k, v) => {
                put_binary(buf, k.as_bytes(), "user property name")?;
                put_binary(buf, v.as_bytes(), "user property value")?;
            }
        }
        Ok(())
    }

    /// Reads the value of property `id` and checks its range (§3.x value rules).
    fn decode_value(id: PropertyId, buf: &mut Bytes) -> Result<Property, DecodeError> {
        use Property as P;
        use PropertyId as I;
        const WHAT: &str = "property value";
        // A byte property that is a boolean: anything but 0 or 1 is a protocol error.
        fn flag(buf: &mut Bytes, rule: &'static str) -> Result<u8, DecodeError> {
            let v = read_u8(buf, WHAT)?;
            if v > 1 {
                return Err(protocol("property value other than 0 or 1", rule));
            }
            Ok(v)
        }
        fn nonzero_u16(buf: &mut Bytes, rule: &'static str) -> Result<u16, DecodeError> {
            let v = read_u16(buf, WHAT)?;
            if v == 0 {
                return Err(protocol("property value of 0", rule));
            }
            Ok(v)
        }
        Ok(match id {
            I::PayloadFormatIndicator => P::PayloadFormatIndicator(flag(buf, "MQTT 5.0 §3.3.2.3.2")?),
            I::MessageExpiryInterval => P::MessageExpiryInterval(read_u32(buf, WHAT)?),
            I::ContentType => P::ContentType(read_string(buf, WHAT)?),
            I::ResponseTopic => {
                let topic = read_string(buf, WHAT)?;
                // It names the topic a response is published to (MQTT-3.3.2-14).
                if topic.contains(['+', '#']) {
                    return Err(protocol("wildcard in a Response Topic", "MQTT-3.3.2-14"));
                }
                P::ResponseTopic(topic)
            }
            I::CorrelationData => P::CorrelationData(read_binary(buf, WHAT)?),
            I::SubscriptionIdentifier => {
                let v = read_varint(buf, WHAT)?;
                if v == 0 {
                    return Err(protocol("subscription identifier of 0", "MQTT 5.0 §3.8.2.1.2"));
                }
                P::SubscriptionIdentifier(v)
            }
            I::SessionExpiryInterval => P::SessionExpiryInterval(read_u32(buf, WHAT)?),
            I::AssignedClientIdentifier => P::AssignedClientIdentifier(read_string(buf, WHAT)?),
            I::ServerKeepAlive => P::ServerKeepAlive(read_u16(buf, WHAT)?),
            I::AuthenticationMethod => P::AuthenticationMethod(read_string(buf, WHAT)?),
            I::AuthenticationData => P::AuthenticationData(read_binary(buf, WHAT)?),
            I::RequestProblemInformation => P::RequestProblemInformation(flag(buf, "MQTT 5.0 §3.1.2.11.7")?),
            I::WillDelayInterval => P::WillDelayInterval(read_u32(buf, WHAT)?),
            I::RequestResponseInformation => {
                P::RequestResponseInformation(flag(buf, "MQTT 5.0 §3.1.2.11.6")?)
            }
            I::ResponseInformation => P::ResponseInformation(read_string(buf, WHAT)?),
            I::ServerReference => P::ServerReference(read_string(buf, WHAT)?),
            I::ReasonString => P::ReasonString(read_string(buf, WHAT)?),
            I::ReceiveMaximum => P::ReceiveMaximum(nonzero_u16(buf, "MQTT 5.0 §3.1.2.11.3")?),
            I::TopicAliasMaximum => P::TopicAliasMaximum(read_u16(buf, WHAT)?),
            I::TopicAlias => match read_u16(buf, WHAT)? {
                0 => return Err(DecodeError::TopicAliasInvalid),
                v => P::TopicAlias(v),
            },
            I::MaximumQoS => P::MaximumQoS(flag(buf, "MQTT 5.0 §3.2.2.3.4")?),
            I::RetainAvailable => P::RetainAvailable(flag(buf, "MQTT 5.0 §3.2.2.3.5")?),
            I::UserProperty => P::UserProperty(read_string(buf, WHAT)?, read_string(buf, WHAT)?),
            I::MaximumPacketSize => {
                let v = read_u32(buf, WHAT)?;
                if v == 0 {
                    return Err(protocol("maximum packet size of 0", "MQTT 5.0 §3.1.2.11.4"));
                }
                P::MaximumPacketSize(v)
            }
            I::WildcardSubscriptionAvailable => {
                P::WildcardSubscriptionAvailable(flag(buf, "MQTT 5.0 §3.2.2.3.11")?)
            }
            I::SubscriptionIdentifierAvailable => {
                P::SubscriptionIdentifierAvailable(flag(buf, "MQTT 5.0 §3.2.2.3.12")?)
            }
            I::SharedSubscriptionAvailable => {
                P::SharedSubscriptionAvailable(flag(buf, "MQTT 5.0 §3.2.2.3.13")?)
            }
        })
    }
}

/// Typed accessor returning the first property of one kind, by value.
macro_rules! copy_accessor {
    ($(#[$doc:meta])* $name:ident, $variant:ident, $ty:ty) => {
        $(#[$doc])*
        pub fn $name(&self) -> Option<$ty> {
            self.0.iter().find_map(|p| match p {
                Property::$variant(v) => Some(*v),
                _ => None,
            })
        }
    };
}

/// Typed accessor for a 0/1 property, as a `bool`.
macro_rules! flag_accessor {
    ($name:ident, $variant:ident) => {
        pub fn $name(&self) -> Option<bool> {
            self.0.iter().find_map(|p| match p {
                Property::$variant(v) => Some(*v != 0),
                _ => None,
            })
        }
    };
}

macro_rules! str_accessor {
    ($name:ident, $variant:ident) => {
        pub fn $name(&self) -> Option<&str> {
            self.0.iter().find_map(|p| match p {
                Property::$variant(v) => Some(v.as_str()),
                _ => None,
            })
        }
    };
}

macro_rules! bytes_accessor {
    ($name:ident, $variant:ident) => {
        pub fn $name(&self) -> Option<&Bytes> {
            self.0.iter().find_map(|p| match p {
                Property::$variant(v) => Some(v),
                _ => None,
            })
        }
    };
}

impl Properties {
    pub const fn new() -> Properties {
        Properties(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn push(&mut self, property: Property) {
        self.0.push(property);
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Property> {
        self.0.iter()
    }

    /// Bytes of the properties alone, without the Property Length prefix.
    fn body_len(&self) -> usize {
        self.0.iter().map(Property::encoded_len).sum()
    }

    /// Bytes on the wire, Property Length prefix included (§2.2.2.1). One byte when empty.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint_len(body) + body
    }

    /// Writes the Property Length and the properties, in order.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let body = self.body_len();
        if body > MAX_VARINT as usize {
            return Err(EncodeError::TooLong("property list"));
        }
        put_varint(buf, body);
        for property in &self.0 {
            property.encode(buf)?;
        }
        Ok(())
    }

    /// Writes the properties `keep` selects, in order, without the Property Length: the
    /// form the broker keeps a forwarded message's properties in (see `OutgoingPublish`).
    pub fn encode_body_filtered(
        &self,
        keep: impl Fn(&Property) -> bool,
        buf: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        for property in self.0.iter().filter(|p| keep(p)) {
            property.encode(buf)?;
        }
        Ok(())
    }

    /// Reads a Property Length and the properties it covers, checking each against
    /// Table 2-4 for `context`, duplicates [MQTT-2.2.2-2] and value ranges.
    pub fn decode(buf: &mut Bytes, context: PropertyContext) -> Result<Properties, DecodeError> {
        let len = read_varint(buf, "property length")? as usize;
        if len > buf.remaining() {
            return Err(malformed("property length past the end of the packet", "MQTT-2.2.2-1"));
        }
        if len == 0 {
            return Ok(Properties::new());
        }
        Properties::decode_body(buf.split_to(len), context)
    }

    /// Reads properties without a Property Length in front: the form
    /// [`Properties::encode_body_filtered`] writes.
    pub fn decode_body(mut props: Bytes, context: PropertyContext) -> Result<Properties, DecodeError> {
        let mut list = Vec::new();
        // Identifiers are all below 64: one bit each records what has been seen.
        let mut seen: u64 = 0;
        while props.has_remaining() {
            let byte = props.get_u8();
            let id =
                PropertyId::from_u8(byte).ok_or(malformed("unknown property identifier", "MQTT-2.2.2-2"))?;
            if !id.allowed_in(context) {
                return Err(protocol("property not allowed in this packet", "MQTT-2.2.2-2"));
            }
            let bit = 1u64 << byte;
            if seen & bit != 0 && !id.may_repeat(context) {
                return Err(protocol("property included more than once", "MQTT-2.2.2-2"));
            }
            seen |= bit;
            list.push(Property::decode_value(id, &mut props)?);
        }
        Ok(Properties(list))
    }

    copy_accessor!(payload_format_indicator, PayloadFormatIndicator, u8);
    copy_accessor!(message_expiry_interval, MessageExpiryInterval, u32);
    str_accessor!(content_type, ContentType);
    str_accessor!(response_topic, ResponseTopic);
    bytes_accessor!(correlation_data, CorrelationData);
    copy_accessor!(session_expiry_interval, SessionExpiryInterval, u32);
    str_accessor!(assigned_client_identifier, AssignedClientIdentifier);
    copy_accessor!(server_keep_alive, ServerKeepAlive, u16);
    str_accessor!(authentication_method, AuthenticationMethod);
    bytes_accessor!(authentication_data, AuthenticationData);
    flag_accessor!(request_problem_information, RequestProblemInformation);
    copy_accessor!(will_delay_interval, WillDelayInterval, u32);
    flag_accessor!(request_response_information, RequestResponseInformation);
    str_accessor!(response_information, ResponseInformation);
    str_accessor!(server_reference, ServerReference);
    str_accessor!(reason_string, ReasonString);
    copy_accessor!(receive_maximum, ReceiveMaximum, u16);
    copy_accessor!(topic_alias_maximum, TopicAliasMaximum, u16);
    copy_accessor!(topic_alias, TopicAlias, u16);
    copy_accessor!(maximum_qos, MaximumQoS, u8);
    flag_accessor!(retain_available, RetainAvailable);
    copy_accessor!(maximum_packet_size, MaximumPacketSize, u32);
    flag_accessor!(wildcard_subscription_available, WildcardSubscriptionAvailable);
    flag_accessor!(subscription_identifier_available, SubscriptionIdentifierAvailable);
    flag_accessor!(shared_subscription_available, SharedSubscriptionAvailable);

    /// Every Subscription Identifier, in wire order (a PUBLISH may carry several).
    pub fn subscription_identifiers(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().filter_map(|p| match p {
            Property::SubscriptionIdentifier(v) => Some(*v),
            _ => None,
        })
    }

    /// Every User Property as (name, value), in wire order.
    pub fn user_properties(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.0.iter().filter_map(|p| match p {
            Property::UserProperty(k, v) => Some((k.as_str(), v.as_str())),
            _ => None,
        })
    }
}

impl<'a> IntoIterator for &'a Properties {
    type Item = &'a Property;
    type IntoIter = std::slice::Iter<'a, Property>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl From<Vec<Property>> for Properties {
    fn from(list: Vec<Property>) -> Properties {
        Properties(list)
    }
}
