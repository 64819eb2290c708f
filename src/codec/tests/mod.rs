//! Golden packets (written out byte by byte from the MQTT 3.1.1 and 5.0 layouts), split
//! reads, error cases, round-trip and never-panic property tests.
//!
//! One file per subject; the helpers every file uses are here, the golden frames in
//! [`goldens`].

use bytes::{Bytes, BytesMut};

use super::*;
use crate::topic::{TopicFilter, TopicName};

mod connect;
mod control;
mod errors;
mod goldens;
mod prop;
mod properties;
mod publish;
mod subscribe;

const MAX: usize = 1 << 20;
const V31: ProtocolVersion = ProtocolVersion::V31;
const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn pid(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

fn props(list: Vec<Property>) -> Properties {
    Properties(list)
}

fn topic(s: &'static str) -> TopicName {
    TopicName::new(Bytes::from_static(s.as_bytes())).unwrap()
}

fn filter(s: &'static str) -> TopicFilter {
    TopicFilter::from_static(s).unwrap()
}

fn decode_all(bytes: &[u8], version: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decode(&mut buf, version, MAX)
}

fn decode_err(bytes: &[u8], version: ProtocolVersion) -> DecodeError {
    match decode_all(bytes, version) {
        Err(e) => e,
        other => panic!("expected an error for {bytes:02x?}, got {other:?}"),
    }
}

/// decode(golden) == packet, split at every offset, twice back to back.
fn check_decode(bytes: &[u8], packet: &Packet, version: ProtocolVersion) {
    let mut buf = BytesMut::from(bytes);
    assert_eq!(decode(&mut buf, version, MAX), Ok(Some(packet.clone())));
    assert!(buf.is_empty(), "bytes left after decode");

    for split in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..split]);
        assert_eq!(decode(&mut buf, version, MAX), Ok(None), "split at {split}");
        assert_eq!(&buf[..], &bytes[..split], "buffer touched at split {split}");
        buf.extend_from_slice(&bytes[split..]);
        assert_eq!(decode(&mut buf, version, MAX), Ok(Some(packet.clone())), "split at {split}");
        assert!(buf.is_empty());
    }

    let mut two = BytesMut::from(bytes);
    two.extend_from_slice(bytes);
    two.extend_from_slice(&bytes[..1]);
    assert_eq!(decode(&mut two, version, MAX), Ok(Some(packet.clone())));
    assert_eq!(decode(&mut two, version, MAX), Ok(Some(packet.clone())));
    assert_eq!(decode(&mut two, version, MAX), Ok(None));
    assert_eq!(&two[..], &bytes[..1]);
}

/// Both directions: decode(golden) == packet and encode(packet) == golden.
fn golden(bytes: &[u8], packet: Packet, version: ProtocolVersion) {
    check_decode(bytes, &packet, version);
    let mut out = BytesMut::new();
    encode(&packet, version, &mut out).unwrap();
    assert_eq!(&out[..], bytes, "encoding of {packet:?}");
    assert_eq!(encoded_size(&packet, version), bytes.len());
}

fn ack(id: u16, reason: ReasonCode, properties: Properties) -> PubAck {
    PubAck { packet_id: pid(id), reason, properties }
}

fn is_malformed(e: &DecodeError) -> bool {
    matches!(e, DecodeError::Malformed { .. })
}

fn is_protocol(e: &DecodeError) -> bool {
    matches!(e, DecodeError::Protocol { .. })
}
