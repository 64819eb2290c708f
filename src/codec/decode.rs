//! Reading one packet from the front of a buffer.
//!
//! Check, then parse: the fixed header is read from the borrowed buffer, the size limit
//! is enforced from it, and only a complete packet is split off (frozen, so payloads and
//! binary fields are zero-copy slices of it) and parsed from a `Bytes` cursor.
//!
//! Topic text errors: a topic that is not valid UTF-8 or contains U+0000 is `Malformed`
//! (like every other string, [MQTT-1.5.4-1/2]); a well-formed string that breaks topic
//! rules (wildcards in a name, misplaced wildcards, empty) is `TopicNameInvalid` /
//! `TopicFilterInvalid`.

use std::num::NonZeroU16;

use bytes::{Buf, Bytes, BytesMut};

use super::primitives::{
    malformed, parse_varint, protocol, read_binary, read_string, read_u16, read_u8, read_utf8_bytes,
};
use super::properties::PropertyContext;
use super::reason_sets::{self, ReasonSet};
use super::*;
use crate::topic::{TopicError, TopicFilter, TopicName};

/// Reads at most one packet from the front of `buf`.
///
/// - `Ok(None)`: the packet is not complete yet; `buf` is untouched.
/// - `Ok(Some(packet))`: the packet's bytes have been removed from `buf`.
/// - `Err`: the connection should be closed (with `err.reason_code()` on v5). A packet
///   over `max_packet_size` (its total size, fixed header included) is refused as soon
///   as its fixed header is buffered.
///
/// `version` is the connection's negotiated version; a CONNECT is read by the version it
/// names itself.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((remaining, len_len)) = parse_varint(buf.get(1..).unwrap_or_default())? else {
        return Ok(None);
    };
    let header = FixedHeader::parse(first, version)?;
    let total = 1 + len_len + remaining as usize;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge { size: total, max: max_packet_size });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let mut body = buf.split_to(total).freeze();
    body.advance(1 + len_len);
    let packet = decode_body(header, &mut body, version)?;
    if body.has_remaining() {
        return Err(malformed(
            "bytes left after the last field of the packet",
            "MQTT-2.1.4 remaining length",
        ));
    }
    Ok(Some(packet))
}

/// The whole size of the packet at the front of `buf` (fixed header included), once its
/// fixed header is there; `None` before, or when the header is malformed (which `decode`
/// reports). Lets a reader make room for a large packet in one allocation.
pub fn packet_size(buf: &[u8]) -> Option<usize> {
    let (remaining, len_len) = parse_varint(buf.get(1..)?).ok()??;
    Some(1 + len_len + remaining as usize)
}

/// The first byte of a packet, validated [MQTT-2.1.3-1].
#[derive(Clone, Copy)]
struct FixedHeader {
    kind: u8,
    flags: u8,
}

impl FixedHeader {
    fn parse(byte: u8, version: ProtocolVersion) -> Result<FixedHeader, DecodeError> {
        let kind = byte >> 4;
        let flags = byte & 0x0F;
        let expected = match kind {
            3 => {
                // PUBLISH: DUP, QoS (2 bits), RETAIN.
                let qos = (flags >> 1) & 0b11;
                if qos == 3 {
                    return Err(malformed("PUBLISH with QoS 3", "MQTT-3.3.1-4"));
                }
                if qos == 0 && flags & 0b1000 != 0 {
                    return Err(malformed("PUBLISH with QoS 0 and DUP set", "MQTT-3.3.1-2"));
                }
                return Ok(FixedHeader { kind, flags });
            }
            6 | 8 | 10 => 0b0010,
            1 | 2 | 4 | 5 | 7 | 9 | 11 | 12 | 13 | 14 => 0,
            15 if version.is_v5() => 0,
            _ => return Err(malformed("reserved packet type (0, or AUTH before MQTT 5)", "MQTT-2.1.2")),
        };
        if flags != expected {
            return Err(malformed("reserved flag bits in the fixed header", "MQTT-2.1.3-1"));
        }
        Ok(FixedHeader { kind, flags })
    }
}

fn decode_body(
    header: FixedHeader,
    buf: &mut Bytes,
    version: ProtocolVersion,
) -> Result<Packet, DecodeError> {
    let v5 = version.is_v5();
    Ok(match header.kind {
        1 => Packet::Connect(decode_connect(buf)?),
        2 => Packet::ConnAck(decode_connack(buf, v5)?),
        3 => Packet::Publish(decode_publish(header.flags, buf, v5)?),
        4 => Packet::PubAck(decode_puback(buf, v5, PropertyContext::PubAck)?),
        5 => Packet::PubRec(decode_puback(buf, v5, PropertyContext::PubRec)?),
        6 => Packet::PubRel(decode_puback(buf, v5, PropertyContext::PubRel)?),
        7 => Packet::PubComp(decode_puback(buf, v5, PropertyContext::PubComp)?),
        8 => Packet::Subscribe(decode_subscribe(buf, v5)?),
        9 => Packet::SubAck(decode_suback(buf, v5)?),
        10 => Packet::Unsubscribe(decode_unsubscribe(buf, v5)?),
        11 => Packet::UnsubAck(decode_unsuback(buf, v5)?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect(decode_disconnect(buf, v5)?),
        // FixedHeader::parse admits 15 only on v5.
        _ => Packet::Auth(decode_auth(buf)?),
    })
}

fn packet_id(buf: &mut Bytes) -> Result<PacketId, DecodeError> {
    NonZeroU16::new(read_u16(buf, "packet identifier")?)
        .ok_or(protocol("packet identifier 0", "MQTT-2.3.1-1"))
}

fn read_properties(buf: &mut Bytes, v5: bool, ctx: PropertyContext) -> Result<Properties, DecodeError> {
    if v5 {
        Properties::decode(buf, ctx)
    } else {
        Ok(Properties::new())
    }
}

fn reason(buf: &mut Bytes, allowed: ReasonSet) -> Result<ReasonCode, DecodeError> {
    let byte = read_u8(buf, "reason code")?;
    ReasonCode::from_u8(byte)
        .filter(|code| reason_sets::contains(allowed, *code))
        .ok_or(malformed("reason code not defined for this packet", "MQTT 5.0 §2.4"))
}

fn qos(bits: u8) -> Option<QoS> {
    match bits {
        0 => Some(QoS::AtMostOnce),
        1 => Some(QoS::AtLeastOnce),
        2 => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

fn topic_text_error(err: TopicError) -> Option<DecodeError> {
    match err {
        TopicError::InvalidUtf8 => Some(malformed("topic is not valid UTF-8", "MQTT-1.5.4-1")),
        TopicError::NullCharacter => Some(malformed("topic contains U+0000", "MQTT-1.5.4-2")),
        _ => None,
    }
}

fn name_error(err: TopicError) -> DecodeError {
    topic_text_error(err).unwrap_or(DecodeError::TopicNameInvalid {
        what: match err {
            TopicError::Empty => "empty topic name",
            TopicError::TooLong => "topic name too long",
            _ => "wildcard in a topic name",
        },
        rule: match err {
            TopicError::Empty => "MQTT-4.7.3-1",
            TopicError::TooLong => "MQTT-4.7.3-3",
            _ => "MQTT-3.3.2-2",
        },
    })
}

fn filter_error(err: TopicError) -> DecodeError {
    topic_text_error(err).unwrap_or(DecodeError::TopicFilterInvalid {
        what: match err {
            TopicError::Empty => "empty topic filter",
            TopicError::TooLong => "topic filter too long",
            TopicError::MisplacedMultiLevelWildcard => "'#' not alone as the last level",
            _ => "'+' not alone in its level",
        },
        rule: match err {
            TopicError::Empty => "MQTT-4.7.3-1",
            TopicError::TooLong => "MQTT-4.7.3-3",
            TopicError::MisplacedMultiLevelWildcard => "MQTT-4.7.1-2",
            _ => "MQTT-4.7.1-3",
        },
    })
}

fn decode_connect(buf: &mut Bytes) -> Result<Connect, DecodeError> {
    let name = read_binary(buf, "protocol name")?;
    let level = read_u8(buf, "protocol level")?;
    let protocol_version = match (&name[..], level) {
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", _) | (b"MQTT", _) => return Err(DecodeError::UnsupportedProtocolVersion { level }),
        _ => return Err(protocol("unknown protocol name", "MQTT-3.1.2-1")),
    };
    let v5 = protocol_version.is_v5();
    let flags = read_u8(buf, "connect flags")?;
    if flags & 0x01 != 0 {
        return Err(malformed("reserved connect flag set", "MQTT-3.1.2-3"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos_bits = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && will_qos_bits != 0 {
        return Err(malformed("will QoS without a will", "MQTT-3.1.2-11"));
    }
    if !will_flag && will_retain {
        return Err(malformed("will retain without a will", "MQTT-3.1.2-13"));
    }
    let will_qos = qos(will_qos_bits).ok_or(malformed("will QoS 3", "MQTT-3.1.2-12"))?;
    if !v5 && password_flag && !username_flag {
        return Err(malformed("password without a user name", "MQTT-3.1.2-22"));
    }
    let keep_alive = read_u16(buf, "keep alive")?;
    let properties = read_properties(buf, v5, PropertyContext::Connect)?;
    if properties.authentication_data().is_some() && properties.authentication_method().is_none() {
        return Err(protocol(
            "authentication data without an authentication method",
            "MQTT 5.0 §3.1.2.11.10",
        ));
    }
    let client_id = read_string(buf, "client identifier")?;
    let will = if will_flag {
        let properties = read_properties(buf, v5, PropertyContext::Will)?;
        let topic = read_binary(buf, "will topic")?;
        let topic = TopicName::new(topic).map_err(name_error)?;
        let payload = read_binary(buf, "will payload")?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if username_flag { Some(read_string(buf, "user name")?) } else { None };
    let password = if password_flag { Some(read_binary(buf, "password")?) } else { None };
    Ok(Connect {
        protocol: protocol_version,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(buf: &mut Bytes, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = read_u8(buf, "connect acknowledge flags")?;
    if flags & 0xFE != 0 {
        return Err(malformed("reserved connect acknowledge flag set", "MQTT-3.2.2-1"));
    }
    let reason = if v5 {
        reason(buf, reason_sets::CONNACK)?
    } else {
        let code = read_u8(buf, "connect return code")?;
        ReasonCode::from_v3_connack(code)
            .ok_or(malformed("reserved connect return code", "MQTT 3.1.1 §3.2.2.3"))?
    };
    let properties = read_properties(buf, v5, PropertyContext::ConnAck)?;
    Ok(ConnAck { session_present: flags & 0x01 != 0, reason, properties })
}

fn decode_publish(flags: u8, buf: &mut Bytes, v5: bool) -> Result<Publish, DecodeError> {
    // FixedHeader::parse has refused QoS 3.
    let qos = qos((flags >> 1) & 0b11).unwrap_or(QoS::AtMostOnce);
    let topic = read_utf8_bytes(buf, "topic name")?;
    let topic =
        if v5 { TopicName::new_allow_empty(topic) } else { TopicName::new(topic) }.map_err(name_error)?;
    let packet_id = if qos == QoS::AtMostOnce { None } else { Some(packet_id(buf)?) };
    let properties = read_properties(buf, v5, PropertyContext::Publish)?;
    if topic.is_empty() && properties.topic_alias().is_none() {
        return Err(protocol("empty topic name without a topic alias", "MQTT 5.0 §3.3.2.3.4"));
    }
    let payload = buf.split_to(buf.remaining());
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        properties,
        payload,
    })
}

fn decode_puback(buf: &mut Bytes, v5: bool, ctx: PropertyContext) -> Result<PubAck, DecodeError> {
    let packet_id = packet_id(buf)?;
    // v5 short forms: no reason code means Success; no property length means none (§3.4.2.1).
    let reason = if v5 && buf.has_remaining() {
        let allowed = match ctx {
            PropertyContext::PubAck | PropertyContext::PubRec => reason_sets::PUBACK,
            _ => reason_sets::PUBREL,
        };
        reason(buf, allowed)?
    } else {
        ReasonCode::Success
    };
    let properties =
        if v5 && buf.has_remaining() { Properties::decode(buf, ctx)? } else { Properties::new() };
    Ok(PubAck { packet_id, reason, properties })
}

fn decode_subscribe(buf: &mut Bytes, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(buf)?;
    let properties = read_properties(buf, v5, PropertyContext::Subscribe)?;
    let mut filters = Vec::new();
    while buf.has_remaining() {
        let filter = read_binary(buf, "topic filter")?;
        let filter = TopicFilter::new(filter).map_err(filter_error)?;
        let options = read_u8(buf, "subscription options")?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if options & reserved != 0 {
            return Err(malformed(
                "reserved subscription option bits set",
                if v5 { "MQTT-3.8.3-5" } else { "MQTT-3-8.3-4" },
            ));
        }
        let qos = qos(options & 0b11).ok_or(malformed("subscription with QoS 3", "MQTT-3.8.3-4"))?;
        let retain_handling = (options >> 4) & 0b11;
        if retain_handling == 3 {
            return Err(protocol("retain handling 3", "MQTT 5.0 §3.8.3.1"));
        }
        let no_local = options & 0b0100 != 0;
        if no_local && filter.as_str().starts_with("$share/") {
            return Err(protocol("no local on a shared subscription", "MQTT-3.8.3-4"));
        }
        filters.push((
            filter,
            SubscriptionOptions {
                qos,
                no_local,
                retain_as_published: options & 0b1000 != 0,
                retain_handling,
            },
        ));
    }
    if filters.is_empty() {
        return Err(protocol("SUBSCRIBE without a topic filter", "MQTT-3.8.3-3"));
    }
    Ok(Subscribe { packet_id, properties, filters })
}

fn decode_suback(buf: &mut Bytes, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(buf)?;
    let properties = read_properties(buf, v5, PropertyContext::SubAck)?;
    let allowed = if v5 { reason_sets::SUBACK } else { reason_sets::SUBACK_V3 };
    let mut reasons = Vec::with_capacity(buf.remaining());
    while buf.has_remaining() {
        reasons.push(reason(buf, allowed)?);
    }
    if reasons.is_empty() {
        return Err(protocol("SUBACK without a return code", "MQTT-3.9.3-1"));
    }
    Ok(SubAck { packet_id, properties, reasons })
}

fn decode_unsubscribe(buf: &mut Bytes, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(buf)?;
    let properties = read_properties(buf, v5, PropertyContext::Unsubscribe)?;
    let mut filters = Vec::new();
    while buf.has_remaining() {
        let filter = read_binary(buf, "topic filter")?;
        filters.push(TopicFilter::new(filter).map_err(filter_error)?);
    }
    if filters.is_empty() {
        return Err(protocol("UNSUBSCRIBE without a topic filter", "MQTT-3.10.3-2"));
    }
    Ok(Unsubscribe { packet_id, properties, filters })
}

fn decode_unsuback(buf: &mut Bytes, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(buf)?;
    if !v5 {
        return Ok(UnsubAck { packet_id, properties: Properties::new(), reasons: Vec::new() });
    }
    let properties = Properties::decode(buf, PropertyContext::UnsubAck)?;
    let mut reasons = Vec::with_capacity(buf.remaining());
    while buf.has_remaining() {
        reasons.push(reason(buf, reason_sets::UNSUBACK)?);
    }
    if reasons.is_empty() {
        return Err(protocol("UNSUBACK without a reason code", "MQTT 5.0 §3.11.3"));
    }
    Ok(UnsubAck { packet_id, properties, reasons })
}

fn decode_disconnect(buf: &mut Bytes, v5: bool) -> Result<Disconnect, DecodeError> {
    // v5: remaining length 0 is Normal disconnection, 1 is a reason without properties
    // (§3.14.2.1). v3 has no variable header, so anything left is trailing bytes.
    let reason = if v5 && buf.has_remaining() {
        reason(buf, reason_sets::DISCONNECT)?
    } else {
        ReasonCode::NORMAL_DISCONNECTION
    };
    let properties = if v5 && buf.has_remaining() {
        Properties::decode(buf, PropertyContext::Disconnect)?
    } else {
        Properties::new()
    };
    Ok(Disconnect { reason, properties })
}

fn decode_auth(buf: &mut Bytes) -> Result<Auth, DecodeError> {
    // Remaining length 0 is Success without properties (§3.15.2.1).
    let reason = if buf.has_remaining() { reason(buf, reason_sets::AUTH)? } else { ReasonCode::Success };
    let properties =
        if buf.has_remaining() { Properties::decode(buf, PropertyContext::Auth)? } else { Properties::new() };
    Ok(Auth { reason, properties })
}
