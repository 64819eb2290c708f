//! Writing packets: compute the size, check it against the limit, reserve once, write.
//!
//! The version decides what reaches the wire: v3 drops properties and reason codes (a
//! PUBACK's reason, for one, has no 3.1.1 form), maps CONNACK and SUBACK codes to their
//! 3.1.1 values, and has no AUTH. A CONNECT is written in the version it names itself
//! (`Connect::protocol`), as it is read.

use bytes::{BufMut, BytesMut};

use super::primitives::{field_len, put_binary, put_varint, varint_len, MAX_VARINT};
use super::properties::PropertyContext;
use super::reason_sets::{self, ReasonSet};
use super::*;

/// The largest packet the fixed header can describe (§2.1.4).
pub const MAX_ENCODED_SIZE: usize = 1 + 4 + MAX_VARINT as usize;

/// Bytes `packet` takes on the wire in `version`, fixed header included.
pub fn encoded_size(packet: &Packet, version: ProtocolVersion) -> usize {
    let remaining = remaining_length(packet, version);
    1 + varint_len(remaining) + remaining
}

/// Appends `packet` to `buf`. On error nothing is appended.
pub fn encode(packet: &Packet, version: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError> {
    encode_with_limit(packet, version, MAX_ENCODED_SIZE, buf)
}

/// As [`encode`], refusing a packet larger than `max_size` bytes (the peer's Maximum
/// Packet Size, §3.1.2.11.4 / §3.2.2.3.6) with [`EncodeError::PacketTooLarge`].
pub fn encode_with_limit(
    packet: &Packet,
    version: ProtocolVersion,
    max_size: usize,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    check(packet, version)?;
    let remaining = remaining_length(packet, version);
    if remaining > MAX_VARINT as usize {
        return Err(EncodeError::TooLong("packet"));
    }
    let size = 1 + varint_len(remaining) + remaining;
    if size > max_size {
        return Err(EncodeError::PacketTooLarge { size, max: max_size });
    }
    buf.reserve(size);
    let start = buf.len();
    let written = write(packet, version, remaining, buf);
    if written.is_err() {
        // A string over 65535 bytes is found while writing: leave no half packet behind.
        buf.truncate(start);
    }
    debug_assert!(written.is_err() || buf.len() - start == size);
    written
}

const fn invalid(what: &'static str, rule: &'static str) -> EncodeError {
    EncodeError::Invalid { what, rule }
}

fn props_len(props: &Properties, v5: bool) -> usize {
    if v5 {
        props.encoded_len()
    } else {
        0
    }
}

/// Remaining Length of a v5 ack tail. Only the shortest form (no reason, no properties)
/// is used when the reason is Success; a reason is always followed by its property length,
/// even when zero: the specification lets it be omitted, but clients in use (rumqttc among
/// them) fail to parse a reason without it.
fn ack_tail_len(reason: ReasonCode, props: &Properties, omit_reason: bool) -> usize {
    if props.is_empty() && omit_reason && reason == ReasonCode::Success {
        0
    } else {
        1 + props.encoded_len()
    }
}

fn remaining_length(packet: &Packet, version: ProtocolVersion) -> usize {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => connect_length(c),
        Packet::ConnAck(c) => 2 + props_len(&c.properties, v5),
        Packet::Publish(p) => {
            field_len(p.topic.len())
                + if p.packet_id.is_some() { 2 } else { 0 }
                + props_len(&p.properties, v5)
                + p.payload.len()
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            2 + if v5 { ack_tail_len(a.reason, &a.properties, true) } else { 0 }
        }
        Packet::Subscribe(s) => {
            2 + props_len(&s.properties, v5)
                + s.filters.iter().map(|(f, _)| field_len(f.as_bytes().len()) + 1).sum::<usize>()
        }
        Packet::SubAck(s) => 2 + props_len(&s.properties, v5) + s.reasons.len(),
        Packet::Unsubscribe(u) => {
            2 + props_len(&u.properties, v5)
                + u.filters.iter().map(|f| field_len(f.as_bytes().len())).sum::<usize>()
        }
        Packet::UnsubAck(u) => 2 + if v5 { u.properties.encoded_len() + u.reasons.len() } else { 0 },
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => {
            if v5 {
                ack_tail_len(d.reason, &d.properties, true)
            } else {
                0
            }
        }
        Packet::Auth(a) => {
            if a.reason == ReasonCode::Success && a.properties.is_empty() {
                0
            } else {
                1 + a.properties.encoded_len()
            }
        }
    }
}

fn protocol_name(version: ProtocolVersion) -> (&'static [u8], u8) {
    match version {
        ProtocolVersion::V31 => (b"MQIsdp", 3),
        ProtocolVersion::V311 => (b"MQTT", 4),
        ProtocolVersion::V5 => (b"MQTT", 5),
    }
}

fn connect_length(c: &Connect) -> usize {
    let v5 = c.protocol.is_v5();
    let (name, _) = protocol_name(c.protocol);
    let mut len = field_len(name.len()) + 1 + 1 + 2;
    len += props_len(&c.properties, v5);
    len += field_len(c.client_id.len());
    if let Some(will) = &c.will {
        len += props_len(&will.properties, v5) + field_len(will.topic.len()) + field_len(will.payload.len());
    }
    if let Some(username) = &c.username {
        len += field_len(username.len());
    }
    if let Some(password) = &c.password {
        len += field_len(password.len());
    }
    len
}

fn check_reason(reason: ReasonCode, set: ReasonSet) -> Result<(), EncodeError> {
    if reason_sets::contains(set, reason) {
        Ok(())
    } else {
        Err(invalid("reason code not defined for this packet", "MQTT 5.0 §2.4"))
    }
}

/// Properties the decoder would refuse: not allowed here, or repeated [MQTT-2.2.2-2].
fn check_props(props: &Properties, ctx: PropertyContext, v5: bool) -> Result<(), EncodeError> {
    if !v5 || props.is_empty() {
        return Ok(());
    }
    let mut seen: u64 = 0;
    for property in props {
        let id = property.id();
        if !id.allowed_in(ctx) {
            return Err(invalid("property not allowed in this packet", "MQTT-2.2.2-2"));
        }
        let bit = 1u64 << id.as_u8();
        if seen & bit != 0 && !id.may_repeat(ctx) {
            return Err(invalid("property included more than once", "MQTT-2.2.2-2"));
        }
        seen |= bit;
    }
    Ok(())
}

/// Refuses what the peer's decoder would refuse, so every encoded packet decodes.
fn check(packet: &Packet, version: ProtocolVersion) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => {
            let v5 = c.protocol.is_v5();
            if !v5 && c.password.is_some() && c.username.is_none() {
                return Err(invalid("password without a user name", "MQTT-3.1.2-22"));
            }
            check_props(&c.properties, PropertyContext::Connect, v5)?;
            if let Some(will) = &c.will {
                check_props(&will.properties, PropertyContext::Will, v5)?;
            }
        }
        Packet::ConnAck(c) => {
            if v5 {
                check_reason(c.reason, reason_sets::CONNACK)?;
            }
            check_props(&c.properties, PropertyContext::ConnAck, v5)?;
        }
        Packet::Publish(p) => {
            if p.packet_id.is_some() != (p.qos != QoS::AtMostOnce) {
                return Err(invalid("packet identifier present exactly when QoS > 0", "MQTT-2.2.1-2"));
            }
            if p.dup && p.qos == QoS::AtMostOnce {
                return Err(invalid("DUP set on a QoS 0 PUBLISH", "MQTT-3.3.1-2"));
            }
            if p.topic.is_empty() && !(v5 && p.properties.topic_alias().is_some()) {
                return Err(invalid("empty topic name without a topic alias", "MQTT-4.7.3-1"));
            }
            check_props(&p.properties, PropertyContext::Publish, v5)?;
        }
        Packet::PubAck(a) | Packet::PubRec(a) => {
            if v5 {
                check_reason(a.reason, reason_sets::PUBACK)?;
            }
            let ctx = if matches!(packet, Packet::PubAck(_)) {
                PropertyContext::PubAck
            } else {
                PropertyContext::PubRec
            };
            check_props(&a.properties, ctx, v5)?;
        }
        Packet::PubRel(a) | Packet::PubComp(a) => {
            if v5 {
                check_reason(a.reason, reason_sets::PUBREL)?;
            }
            let ctx = if matches!(packet, Packet::PubRel(_)) {
                PropertyContext::PubRel
            } else {
                PropertyContext::PubComp
            };
            check_props(&a.properties, ctx, v5)?;
        }
        Packet::Subscribe(s) => {
            if s.filters.is_empty() {
                return Err(invalid("SUBSCRIBE without a topic filter", "MQTT-3.8.3-3"));
            }
            if s.filters.iter().any(|(_, o)| o.retain_handling > 2) {
                return Err(invalid("retain handling above 2", "MQTT 5.0 §3.8.3.1"));
            }
            check_props(&s.properties, PropertyContext::Subscribe, v5)?;
        }
        Packet::SubAck(s) => {
            if s.reasons.is_empty() {
                return Err(invalid("SUBACK without a return code", "MQTT-3.9.3-1"));
            }
            if v5 {
                for reason in &s.reasons {
                    check_reason(*reason, reason_sets::SUBACK)?;
                }
            }
            check_props(&s.properties, PropertyContext::SubAck, v5)?;
        }
        Packet::Unsubscribe(u) => {
            if u.filters.is_empty() {
                return Err(invalid("UNSUBSCRIBE without a topic filter", "MQTT-3.10.3-2"));
            }
            check_props(&u.properties, PropertyContext::Unsubscribe, v5)?;
        }
        Packet::UnsubAck(u) => {
            if v5 {
                if u.reasons.is_empty() {
                    return Err(invalid("UNSUBACK without a reason code", "MQTT 5.0 §3.11.3"));
                }
                for reason in &u.reasons {
                    check_reason(*reason, reason_sets::UNSUBACK)?;
                }
            }
            check_props(&u.properties, PropertyContext::UnsubAck, v5)?;
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                check_reason(d.reason, reason_sets::DISCONNECT)?;
            }
            check_props(&d.properties, PropertyContext::Disconnect, v5)?;
        }
        Packet::Auth(a) => {
            if !v5 {
                return Err(EncodeError::NotInVersion("AUTH"));
            }
            check_reason(a.reason, reason_sets::AUTH)?;
            check_props(&a.properties, PropertyContext::Auth, v5)?;
        }
    }
    Ok(())
}

fn put_props(buf: &mut BytesMut, props: &Properties, v5: bool) -> Result<(), EncodeError> {
    if v5 {
        props.encode(buf)
    } else {
        Ok(())
    }
}

fn put_header(buf: &mut BytesMut, first: u8, remaining: usize) {
    buf.put_u8(first);
    put_varint(buf, remaining);
}

/// The tail of a v5 ack, short forms as [`ack_tail_len`] decides.
fn put_ack_tail(
    buf: &mut BytesMut,
    reason: ReasonCode,
    props: &Properties,
    omit_reason: bool,
) -> Result<(), EncodeError> {
    if props.is_empty() && omit_reason && reason == ReasonCode::Success {
        Ok(())
    } else {
        buf.put_u8(reason.as_u8());
        props.encode(buf)
    }
}

fn write(
    packet: &Packet,
    version: ProtocolVersion,
    remaining: usize,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    match packet {
        Packet::Publish(p) => write_publish(p, v5, remaining, buf)?,
        Packet::Connect(c) => write_connect(c, remaining, buf)?,
        Packet::ConnAck(c) => {
            put_header(buf, 0x20, remaining);
            buf.put_u8(u8::from(c.session_present));
            if v5 {
                buf.put_u8(c.reason.as_u8());
                c.properties.encode(buf)?;
            } else {
                buf.put_u8(c.reason.to_v3_connack());
            }
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            let first = match packet {
                Packet::PubAck(_) => 0x40,
                Packet::PubRec(_) => 0x50,
                Packet::PubRel(_) => 0x62,
                _ => 0x70,
            };
            put_header(buf, first, remaining);
            buf.put_u16(a.packet_id.get());
            if v5 {
                put_ack_tail(buf, a.reason, &a.properties, true)?;
            }
        }
        Packet::Subscribe(s) => {
            put_header(buf, 0x82, remaining);
            buf.put_u16(s.packet_id.get());
            put_props(buf, &s.properties, v5)?;
            for (filter, options) in &s.filters {
                put_binary(buf, filter.as_bytes(), "topic filter")?;
                let mut byte = options.qos as u8;
                if v5 {
                    byte |= u8::from(options.no_local) << 2
                        | u8::from(options.retain_as_published) << 3
                        | options.retain_handling << 4;
                }
                buf.put_u8(byte);
            }
        }
        Packet::SubAck(s) => {
            put_header(buf, 0x90, remaining);
            buf.put_u16(s.packet_id.get());
            put_props(buf, &s.properties, v5)?;
            for reason in &s.reasons {
                let code = match reason {
                    _ if v5 => reason.as_u8(),
                    ReasonCode::Success | ReasonCode::GrantedQoS1 | ReasonCode::GrantedQoS2 => reason.as_u8(),
                    // 3.1.1 knows one failure code [MQTT-3.9.3-2].
                    _ => 0x80,
                };
                buf.put_u8(code);
            }
        }
        Packet::Unsubscribe(u) => {
            put_header(buf, 0xA2, remaining);
            buf.put_u16(u.packet_id.get());
            put_props(buf, &u.properties, v5)?;
            for filter in &u.filters {
                put_binary(buf, filter.as_bytes(), "topic filter")?;
            }
        }
        Packet::UnsubAck(u) => {
            put_header(buf, 0xB0, remaining);
            buf.put_u16(u.packet_id.get());
            if v5 {
                u.properties.encode(buf)?;
                for reason in &u.reasons {
                    buf.put_u8(reason.as_u8());
                }
            }
        }
        Packet::PingReq => put_header(buf, 0xC0, 0),
        Packet::PingResp => put_header(buf, 0xD0, 0),
        Packet::Disconnect(d) => {
            put_header(buf, 0xE0, remaining);
            if v5 {
                put_ack_tail(buf, d.reason, &d.properties, true)?;
            }
        }
        Packet::Auth(a) => {
            put_header(buf, 0xF0, remaining);
            if remaining > 0 {
                buf.put_u8(a.reason.as_u8());
                a.properties.encode(buf)?;
            }
        }
    }
    Ok(())
}

/// The broker's hot path: header, topic, packet id, properties and payload go straight
/// into the reserved buffer, with no intermediate allocation.
#[inline]
fn write_publish(p: &Publish, v5: bool, remaining: usize, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let first = 0x30 | u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain);
    put_header(buf, first, remaining);
    // TopicName holds at most 65535 bytes (its invariant), so the u16 cannot overflow.
    buf.put_u16(p.topic.len() as u16);
    buf.put_slice(p.topic.as_bytes());
    if let Some(id) = p.packet_id {
        buf.put_u16(id.get());
    }
    put_props(buf, &p.properties, v5)?;
    buf.put_slice(&p.payload);
    Ok(())
}

fn write_connect(c: &Connect, remaining: usize, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = c.protocol.is_v5();
    let (name, level) = protocol_name(c.protocol);
    put_header(buf, 0x10, remaining);
    put_binary(buf, name, "protocol name")?;
    buf.put_u8(level);
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(will) = &c.will {
        flags |= 0x04 | (will.qos as u8) << 3 | u8::from(will.retain) << 5;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    put_props(buf, &c.properties, v5)?;
    put_binary(buf, c.client_id.as_bytes(), "client identifier")?;
    if let Some(will) = &c.will {
        put_props(buf, &will.properties, v5)?;
        put_binary(buf, will.topic.as_bytes(), "will topic")?;
        put_binary(buf, &will.payload, "will payload")?;
    }
    if let Some(username) = &c.username {
        put_binary(buf, username.as_bytes(), "user name")?;
    }
    if let Some(password) = &c.password {
        put_binary(buf, password, "password")?;
    }
    Ok(())
}
