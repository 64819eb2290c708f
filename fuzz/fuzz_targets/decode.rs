//! The MQTT decoder on arbitrary bytes, in every protocol version and with a few maximum
//! packet sizes. The first input byte chooses where the rest is split in two: fed whole or
//! in two pieces, the buffer decodes to the same packets and ends the same way (an
//! incomplete packet is `Ok(None)` and leaves the buffer untouched). Every packet that
//! decodes must encode again, to `encoded_size` bytes that decode to the same packet.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringmq::codec::{decode, encode, encoded_size, DecodeError, Packet, ProtocolVersion};

const VERSIONS: [ProtocolVersion; 3] = [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5];
/// No limit, the protocol's ceiling, a broker-like limit, and one small enough to refuse
/// most packets from their fixed header.
const MAX_SIZES: [usize; 4] = [usize::MAX, 268_435_460, 1024, 16];

/// What decoding a byte stream gives: the packets, then how it stopped.
#[derive(Debug, PartialEq)]
struct Outcome {
    packets: Vec<Packet>,
    /// The error that ended it, or `None` when the rest was an incomplete packet.
    error: Option<DecodeError>,
    /// Bytes left in the buffer when no error ended it (an incomplete packet).
    left: usize,
}

/// Decodes until the buffer runs dry or an error; `Ok(None)` must leave it untouched.
fn drain(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max: usize,
    packets: &mut Vec<Packet>,
) -> Option<DecodeError> {
    loop {
        let before = buf.clone();
        match decode(buf, version, max) {
            Ok(Some(packet)) => {
                assert!(buf.len() < before.len(), "a decoded packet consumed no bytes");
                packets.push(packet);
            }
            Ok(None) => {
                assert_eq!(*buf, before, "Ok(None) changed the buffer");
                return None;
            }
            Err(err) => return Some(err),
        }
    }
}

fn decode_stream(pieces: &[&[u8]], version: ProtocolVersion, max: usize) -> Outcome {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        if let Some(error) = drain(&mut buf, version, max, &mut packets) {
            return Outcome { packets, error: Some(error), left: 0 };
        }
    }
    Outcome { packets, error: None, left: buf.len() }
}

fn round_trip(packet: &Packet, version: ProtocolVersion) {
    let mut out = BytesMut::new();
    if let Err(err) = encode(packet, version, &mut out) {
        panic!("a decoded packet does not encode ({err}): {packet:?}");
    }
    assert_eq!(out.len(), encoded_size(packet, version), "encoded_size disagrees with encode: {packet:?}");
    match decode(&mut out, version, usize::MAX) {
        Ok(Some(again)) => assert_eq!(&again, packet, "re-encoded packet decodes differently"),
        other => panic!("re-encoded packet does not decode: {other:?} for {packet:?}"),
    }
    assert!(out.is_empty(), "bytes left after the re-encoded packet: {packet:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((split, data)) = data.split_first() else { return };
    let cut = usize::from(*split) % (data.len() + 1);
    for version in VERSIONS {
        for max in MAX_SIZES {
            let whole = decode_stream(&[data], version, max);
            let split = decode_stream(&[&data[..cut], &data[cut..]], version, max);
            assert_eq!(split, whole, "fed whole and split at {cut}, {version:?}, max {max}");
            for packet in &whole.packets {
                round_trip(packet, version);
            }
        }
    }
});
