//! The measured payload and the pre-encoded PUBLISH it travels in.
//!
//! A payload starts with a 16-byte stamp, little-endian: send time (u64, CLOCK_MONOTONIC
//! nanoseconds, so a `pub` and a `sub` process on one host share the clock), publisher id
//! (u32) and sequence number (u32, from 0). The rest is zeros.
//!
//! Publishing does not build a `Publish` per message: the project's codec encodes one
//! PUBLISH per publisher at start ([`Template`]), and each message copies those bytes
//! into the connection's write buffer and patches the packet identifier and the stamp in
//! place. No allocation per message, and the bytes on the wire are the codec's own.

use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use ringmq::codec::{self, Packet, Properties, ProtocolVersion, Publish, QoS};
use ringmq::topic::TopicName;

/// Bytes of the stamp at the front of every payload.
pub const STAMP_LEN: usize = 16;

/// Nanoseconds on CLOCK_MONOTONIC (the clock `std::time::Instant` reads on Linux).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sent_ns: u64,
    pub publisher: u32,
    pub seq: u32,
}

impl Stamp {
    /// `None` for a payload too short to carry a stamp (not from this tool).
    #[inline]
    pub fn parse(payload: &[u8]) -> Option<Stamp> {
        let head = payload.get(..STAMP_LEN)?;
        Some(Stamp {
            sent_ns: u64::from_le_bytes(head[0..8].try_into().ok()?),
            publisher: u32::from_le_bytes(head[8..12].try_into().ok()?),
            seq: u32::from_le_bytes(head[12..16].try_into().ok()?),
        })
    }

    #[inline]
    fn write(self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.sent_ns.to_le_bytes());
        out[8..12].copy_from_slice(&self.publisher.to_le_bytes());
        out[12..16].copy_from_slice(&self.seq.to_le_bytes());
    }
}

/// One publisher's PUBLISH, encoded once, with the offsets of the fields that change.
pub struct Template {
    bytes: Vec<u8>,
    /// Offset of the 2-byte packet identifier; `None` at QoS 0.
    packet_id_at: Option<usize>,
    stamp_at: usize,
}

impl Template {
    pub fn new(
        topic: TopicName,
        qos: QoS,
        size: usize,
        version: ProtocolVersion,
    ) -> Result<Template, codec::EncodeError> {
        assert!(size >= STAMP_LEN, "payload smaller than its stamp");
        let topic_len = topic.len();
        let packet = Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic,
            packet_id: (qos != QoS::AtMostOnce).then_some(NonZeroU16::MAX),
            properties: Properties::new(),
            payload: Bytes::from(vec![0u8; size]),
        });
        let mut buf = BytesMut::new();
        codec::encode(&packet, version, &mut buf)?;
        // Fixed header: one type byte and a 1–4 byte Remaining Length.
        let header = 1 + buf[1..].iter().position(|b| b & 0x80 == 0).map_or(4, |i| i + 1);
        let packet_id_at = (qos != QoS::AtMostOnce).then_some(header + 2 + topic_len);
        Ok(Template { stamp_at: buf.len() - size, bytes: buf.to_vec(), packet_id_at })
    }

    /// Bytes of one message on the wire.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one PUBLISH to `out`: the template, with `packet_id` (ignored at QoS 0)
    /// and `stamp` written in.
    #[inline]
    pub fn write(&self, out: &mut BytesMut, packet_id: u16, stamp: Stamp) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let msg = &mut out[start..];
        if let Some(at) = self.packet_id_at {
            msg[at..at + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        stamp.write(&mut msg[self.stamp_at..self.stamp_at + STAMP_LEN]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patched bytes decode, with the project's codec, to what was patched in.
    #[test]
    fn template_patches_decode() {
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                for size in [16, 100, 200, 20_000, 3_000_000] {
                    let t = Template::new(TopicName::new("lt/p2p/17").unwrap(), qos, size, version).unwrap();
                    let mut out = BytesMut::new();
                    let stamp = Stamp { sent_ns: 0x0102_0304_0506_0708, publisher: 7, seq: 99 };
                    t.write(&mut out, 0xBEEF, stamp);
                    t.write(&mut out, 2, Stamp { seq: 100, ..stamp });
                    for (pid, seq) in [(0xBEEF, 99), (2, 100)] {
                        let Some(Packet::Publish(p)) = codec::decode(&mut out, version, usize::MAX).unwrap()
                        else {
                            panic!("not a publish")
                        };
                        assert_eq!(p.qos, qos);
                        assert_eq!(p.packet_id.map(|p| p.get()), (qos != QoS::AtMostOnce).then_some(pid));
                        assert_eq!(p.payload.len(), size);
                        assert_eq!(Stamp::parse(&p.payload), Some(Stamp { seq, ..stamp }));
                    }
                    assert!(out.is_empty());
                }
            }
        }
    }

    #[test]
    fn short_payload_has_no_stamp() {
        assert_eq!(Stamp::parse(&[0u8; 15]), None);
    }
}
