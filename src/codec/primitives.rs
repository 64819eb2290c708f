//! Wire primitives (MQTT 5.0 §1.5): integers, variable byte integers, length-prefixed
//! UTF-8 strings and binary data.
//!
//! Readers take a `&mut Bytes` cursor over one complete packet, so running out of bytes
//! means the packet is malformed (not incomplete), and binary data is a zero-copy slice.
//! Writers append to a `BytesMut` the caller has already reserved.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{DecodeError, EncodeError};

/// Largest value a variable byte integer can carry (4 bytes, §1.5.5).
pub(crate) const MAX_VARINT: u32 = 268_435_455;

/// Longest string or binary field: its length prefix is a `u16` (§1.5.4, §1.5.6).
pub(crate) const MAX_FIELD_LEN: usize = u16::MAX as usize;

pub(crate) const fn malformed(what: &'static str, rule: &'static str) -> DecodeError {
    DecodeError::Malformed { what, rule }
}

pub(crate) const fn protocol(what: &'static str, rule: &'static str) -> DecodeError {
    DecodeError::Protocol { what, rule }
}

/// A field runs past the end of its packet.
const fn short(what: &'static str) -> DecodeError {
    malformed(what, "MQTT-1.5 field past the end of the packet")
}

pub(crate) fn read_u8(buf: &mut Bytes, what: &'static str) -> Result<u8, DecodeError> {
    if buf.remaining() < 1 {
        return Err(short(what));
    }
    Ok(buf.get_u8())
}

pub(crate) fn read_u16(buf: &mut Bytes, what: &'static str) -> Result<u16, DecodeError> {
    if buf.remaining() < 2 {
        return Err(short(what));
    }
    Ok(buf.get_u16())
}

pub(crate) fn read_u32(buf: &mut Bytes, what: &'static str) -> Result<u32, DecodeError> {
    if buf.remaining() < 4 {
        return Err(short(what));
    }
    Ok(buf.get_u32())
}

/// Parses a variable byte integer from the front of `bytes`, which may be incomplete.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((value, length)))` otherwise. A fifth
/// byte (the fourth still has its continuation bit) and a non-minimal encoding are
/// malformed [MQTT-1.5.5-1].
pub(crate) fn parse_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, &byte) in bytes.iter().enumerate().take(4) {
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err(malformed("variable byte integer not in its shortest form", "MQTT-1.5.5-1"));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        return Err(malformed("variable byte integer longer than 4 bytes", "MQTT-1.5.5-1"));
    }
    Ok(None)
}

pub(crate) fn read_varint(buf: &mut Bytes, what: &'static str) -> Result<u32, DecodeError> {
    match parse_varint(buf.chunk())? {
        Some((value, len)) => {
            buf.advance(len);
            Ok(value)
        }
        None => Err(short(what)),
    }
}

/// Length-prefixed bytes, as a zero-copy slice of the packet.
pub(crate) fn read_binary(buf: &mut Bytes, what: &'static str) -> Result<Bytes, DecodeError> {
    let len = usize::from(read_u16(buf, what)?);
    if buf.remaining() < len {
        return Err(short(what));
    }
    Ok(buf.split_to(len))
}

/// Checks the text rules every UTF-8 string shares [MQTT-1.5.4-1] [MQTT-1.5.4-2].
pub(crate) fn check_utf8(bytes: &[u8]) -> Result<&str, DecodeError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| malformed("string is not valid UTF-8", "MQTT-1.5.4-1"))?;
    if bytes.contains(&0) {
        return Err(malformed("string contains U+0000", "MQTT-1.5.4-2"));
    }
    Ok(text)
}

/// A UTF-8 string, validated, still as a slice of the packet (for topics).
pub(crate) fn read_utf8_bytes(buf: &mut Bytes, what: &'static str) -> Result<Bytes, DecodeError> {
    let bytes = read_binary(buf, what)?;
    check_utf8(&bytes)?;
    Ok(bytes)
}

pub(crate) fn read_string(buf: &mut Bytes, what: &'static str) -> Result<String, DecodeError> {
    let bytes = read_binary(buf, what)?;
    Ok(check_utf8(&bytes)?.to_owned())
}

/// The bytes a variable byte integer takes.
pub(crate) const fn varint_len(value: usize) -> usize {
    if value < 0x80 {
        1
    } else if value < 0x4000 {
        2
    } else if value < 0x20_0000 {
        3
    } else {
        4
    }
}

/// Writes a variable byte integer. The caller keeps `value <= MAX_VARINT`.
pub(crate) fn put_varint(buf: &mut BytesMut, value: usize) {
    let mut value = value;
    loop {
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Writes a `u16` length and the bytes. Longer than 65535 bytes is an error.
pub(crate) fn put_binary(buf: &mut BytesMut, bytes: &[u8], what: &'static str) -> Result<(), EncodeError> {
    if bytes.len() > MAX_FIELD_LEN {
        return Err(EncodeError::TooLong(what));
    }
    buf.put_u16(bytes.len() as u16);
    buf.put_slice(bytes);
    Ok(())
}

/// The bytes a length-prefixed field takes.
pub(crate) const fn field_len(len: usize) -> usize {
    2 + len
}
