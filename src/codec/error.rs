//! Codec errors. Each names the rule it enforces and maps to one MQTT 5 reason code.

use super::ReasonCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not form a packet (reason 0x81).
    #[error("malformed packet: {what} [{rule}]")]
    Malformed { what: &'static str, rule: &'static str },
    /// Well-formed bytes that break a protocol rule (reason 0x82).
    #[error("protocol error: {what} [{rule}]")]
    Protocol { what: &'static str, rule: &'static str },
    /// Decided from the fixed header, before the body is buffered (reason 0x95).
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// CONNECT with a protocol name/level this server does not speak (reason 0x84,
    /// 3.1.1 return code 0x01). `level` lets the server answer in the client's version.
    #[error("unsupported protocol name or level {level} [MQTT-3.1.2-2]")]
    UnsupportedProtocolVersion { level: u8 },
    /// A topic name that is not valid (reason 0x90).
    #[error("invalid topic name: {what} [{rule}]")]
    TopicNameInvalid { what: &'static str, rule: &'static str },
    /// A Topic Alias of 0 (reason 0x94, MQTT-3.3.2-8).
    #[error("topic alias 0 [MQTT-3.3.2-8]")]
    TopicAliasInvalid,
    /// A topic filter that is not valid (reason 0x8F).
    #[error("invalid topic filter: {what} [{rule}]")]
    TopicFilterInvalid { what: &'static str, rule: &'static str },
}

impl DecodeError {
    /// The one place a decode failure becomes a reason code.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::Malformed { .. } => ReasonCode::MalformedPacket,
            DecodeError::Protocol { .. } => ReasonCode::ProtocolError,
            DecodeError::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::UnsupportedProtocolVersion { .. } => ReasonCode::UnsupportedProtocolVersion,
            DecodeError::TopicNameInvalid { .. } => ReasonCode::TopicNameInvalid,
            DecodeError::TopicFilterInvalid { .. } => ReasonCode::TopicFilterInvalid,
            DecodeError::TopicAliasInvalid => ReasonCode::TopicAliasInvalid,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("packet of {size} bytes exceeds the peer's maximum packet size {max}")]
    PacketTooLarge { size: usize, max: usize },
    #[error("{0} does not exist in this protocol version")]
    NotInVersion(&'static str),
    #[error("{0} is too long for its length prefix")]
    TooLong(&'static str),
    /// A packet the peer would have to refuse (e.g. a QoS 1 PUBLISH without a packet
    /// identifier, an empty SUBSCRIBE): refused here so every encoded packet decodes.
    #[error("cannot encode: {what} [{rule}]")]
    Invalid { what: &'static str, rule: &'static str },
}
