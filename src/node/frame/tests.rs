//! The frame codec's tests: round trips, frames in pieces, bounds, hostile input.
use super::*;

fn message(qos: QoS, retain: bool) -> Message {
    let mut m = Message::new(
        TopicName::from_static("a/b"),
        Bytes::from_static(b"payload"),
        qos,
        retain,
        &Default::default(),
    );
    m.properties = WireProperties::from(&[0x03, 0x00, 0x01, b'x'][..]);
    m
}

fn session() -> HandedSession {
    let options = SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        no_local: true,
        retain_as_published: false,
        retain_handling: 2,
    };
    let sub = Subscription { options, identifier: Some(7), acl: crate::auth::AclMark::OPEN };
    let owed = |qos, ids: Vec<u32>, packet_id, released| OwedMessage {
        seq: 0,
        qos,
        retain: false,
        identifiers: ids,
        message: message(qos, false),
        packet_id,
        released,
    };
    HandedSession {
        version: ProtocolVersion::V5,
        expiry: 3600,
        subscriptions: vec![(crate::topic::TopicFilter::new("a/#").unwrap(), sub)],
        qos2_inbound: vec![5, 6],
        more: true,
        messages: vec![
            owed(QoS::ExactlyOnce, vec![], Some(41), true),
            owed(QoS::AtLeastOnce, vec![], Some(42), false),
            owed(QoS::ExactlyOnce, vec![7, 9], None, false),
        ],
    }
}

#[test]
fn every_frame_round_trips_and_arrives_in_pieces() {
    let now = Instant::now();
    let mut expiring = message(QoS::ExactlyOnce, true);
    expiring.expires_at = Some(now + Duration::from_secs(30));
    let frames = vec![
        Frame::Challenge { nonce: [3; NONCE], version: 1 },
        Frame::Hello {
            cluster: "c".into(),
            node: "n1".into(),
            incarnation: 7,
            limits: LIMITS,
            mac: [9; 32],
            version: 1,
            challenge: [4; NONCE],
        },
        Frame::Welcome { limits: FrameLimits { frame: 3 << 20, handover: 5 << 30 }, mac: [8; 32] },
        Frame::Publish { seq: 0, message: message(QoS::AtMostOnce, false) },
        Frame::Publish { seq: 9, message: message(QoS::AtLeastOnce, false) },
        Frame::Retain { seq: 10, message: expiring },
        Frame::Route { seq: 11, filter: "a/+/#".into() },
        Frame::Shared { seq: 12, group: "$share/g/a/b".into(), message: message(QoS::AtLeastOnce, false) },
        Frame::TakeOver { seq: 13, id: 4, client_id: "c1".into(), want_session: true },
        Frame::Handover { seq: 14, id: 4, last: true, session: None },
        Frame::Handover { seq: 15, id: 4, last: false, session: Some(Box::new(session())) },
        Frame::Adopted { seq: 16, id: 4 },
        Frame::NextPart { seq: 19, id: 4 },
        Frame::Flush { seq: 20, id: 5 },
        Frame::Flushed { seq: 21, id: 5 },
        Frame::SyncRetained { seq: 17 },
        Frame::SyncDone { seq: 18 },
        Frame::SyncEntry { seq: 22, message: message(QoS::AtMostOnce, true) },
        Frame::Confirmed { seq: 9 },
        Frame::Refused { seq: 10 },
    ];
    let mut wire = BytesMut::new();
    for f in &frames {
        f.encode(&mut wire, now);
    }
    let wire = wire.freeze();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for byte in wire.iter() {
        buf.put_u8(*byte);
        while let Some(frame) = Frame::decode(&mut buf, LIMITS, now).unwrap() {
            got.push(frame);
        }
    }
    assert_eq!(got.len(), frames.len());
    for (a, b) in got.iter().zip(&frames) {
        match (a, b) {
            (Frame::Retain { message: x, .. }, Frame::Retain { message: y, .. }) => {
                let left = x.expires_at.unwrap().duration_since(now);
                assert!(left > Duration::from_secs(29) && left <= Duration::from_secs(30));
                assert_eq!((&x.topic, &x.payload, &x.properties), (&y.topic, &y.payload, &y.properties));
            }
            (Frame::Handover { session: Some(x), .. }, Frame::Handover { session: Some(y), .. }) => {
                assert_eq!(
                    (x.version, x.expiry, &x.subscriptions, &x.qos2_inbound, x.more),
                    (y.version, y.expiry, &y.subscriptions, &y.qos2_inbound, y.more)
                );
                assert_eq!(x.messages.len(), y.messages.len());
                for (m, n) in x.messages.iter().zip(&y.messages) {
                    assert_eq!((m.qos, m.retain, &m.identifiers), (n.qos, n.retain, &n.identifiers));
                    assert_eq!(
                        (m.packet_id, m.released, m.message.id.0),
                        (n.packet_id, n.released, n.message.id.0)
                    );
                    assert_eq!(
                        (&m.message.topic, &m.message.payload),
                        (&n.message.topic, &n.message.payload)
                    );
                }
            }
            (Frame::Publish { seq: x, message: m }, Frame::Publish { seq: y, message: n })
            | (Frame::Shared { seq: x, message: m, .. }, Frame::Shared { seq: y, message: n, .. })
            | (Frame::SyncEntry { seq: x, message: m }, Frame::SyncEntry { seq: y, message: n }) => {
                assert_eq!(
                    (x, &m.topic, &m.payload, &m.properties, m.qos, m.id.0),
                    (y, &n.topic, &n.payload, &n.properties, n.qos, n.id.0)
                );
                assert!(m.pinned > 0, "a slice of the read buffer, not a copy");
            }
            _ => assert_eq!(a, b),
        }
    }
}

const LIMITS: FrameLimits = FrameLimits { frame: 1 << 20, handover: 4 << 20 };

#[test]
fn hostile_frames_are_refused_not_buffered() {
    let now = Instant::now();
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 2][..]);
    assert_eq!(Frame::decode(&mut buf, LIMITS, now), Err(FrameError::TooLarge(u32::MAX as usize)));
    let mut buf = BytesMut::from(&[0, 0, 0, 1, 99][..]);
    assert_eq!(Frame::decode(&mut buf, LIMITS, now), Err(FrameError::UnknownType(99)));
    // A publish whose topic length runs past the frame.
    let mut publish = vec![0, 0, 0, 20, PUBLISH, 0, 0, 0, 0, 0, 0, 0, 1, 1];
    publish.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 5, 0xff, 0xff]);
    let mut buf = BytesMut::from(&publish[..]);
    assert!(matches!(Frame::decode(&mut buf, LIMITS, now), Err(FrameError::Malformed(_))));
    let mut buf = BytesMut::from(&[0, 0, 0, 0, 1][..]);
    assert!(Frame::decode(&mut buf, LIMITS, now).is_err());
    // 2 MiB: too large for a publish, not for a hand-over.
    let mut buf = BytesMut::from(&[0, 0x20, 0, 0, PUBLISH][..]);
    assert_eq!(Frame::decode(&mut buf, LIMITS, now), Err(FrameError::TooLarge(2 << 20)));
    let mut buf = BytesMut::from(&[0, 0x20, 0, 0, HANDOVER][..]);
    assert_eq!(Frame::decode(&mut buf, LIMITS, now), Ok(None));
}

/// A hello of cluster "c" with no challenge of its own.
fn hello_of(node: &str, incarnation: u64, limits: FrameLimits, mac: [u8; 32], version: u32) -> Frame {
    let (cluster, node) = ("c".into(), node.into());
    Frame::Hello { cluster, node, incarnation, limits, mac, version, challenge: [0; NONCE] }
}

/// A build from before link protocol versions: its challenge and hello read as version
/// 0 (the hello with no challenge of its own), its welcome with no proof.
#[test]
fn handshake_frames_from_before_versions_read_as_version_0() {
    let now = Instant::now();
    let framed = |body: &[u8]| {
        let mut wire = BytesMut::new();
        wire.put_u32(body.len() as u32);
        wire.put_slice(body);
        wire
    };
    let mut body = vec![CHALLENGE];
    body.extend_from_slice(&[3; NONCE]);
    let decoded = Frame::decode(&mut framed(&body), LIMITS, now);
    assert_eq!(decoded, Ok(Some(Frame::Challenge { nonce: [3; NONCE], version: 0 })));
    let mut hello = BytesMut::new();
    hello.put_u8(HELLO);
    put_str(&mut hello, "c");
    put_str(&mut hello, "n1");
    hello.put_u64(7);
    put_limits(&mut hello, &LIMITS);
    hello.put_slice(&[9; 32]);
    let decoded = Frame::decode(&mut framed(&hello), LIMITS, now);
    assert_eq!(decoded, Ok(Some(hello_of("n1", 7, LIMITS, [9; 32], 0))));
    let mut welcome = BytesMut::new();
    welcome.put_u8(WELCOME);
    put_limits(&mut welcome, &LIMITS);
    let decoded = Frame::decode(&mut framed(&welcome), LIMITS, now);
    assert_eq!(decoded, Ok(Some(Frame::Welcome { limits: LIMITS, mac: [0; 32] })));
}

/// An old hello (no limits), one cut in its limits, and limits past any bound: refused
/// or capped, never a panic.
#[test]
fn hello_limits_are_checked_and_capped() {
    let now = Instant::now();
    let mut old = BytesMut::new();
    old.put_u32(0);
    old.put_u8(HELLO);
    put_str(&mut old, "c");
    put_str(&mut old, "n1");
    old.put_u64(7);
    old.put_slice(&[9; 32]);
    let len = (old.len() - 4) as u32;
    old[..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(Frame::decode(&mut old, LIMITS, now), Err(FrameError::Malformed("cut")));
    let mut welcome = BytesMut::from(&[0, 0, 0, 9, WELCOME, 0, 0, 0, 0, 0, 0, 1, 0][..]);
    assert_eq!(Frame::decode(&mut welcome, LIMITS, now), Err(FrameError::Malformed("cut")));

    let hostile = FrameLimits { frame: usize::MAX, handover: usize::MAX };
    let mut wire = BytesMut::new();
    let hello = hello_of("n", 1, hostile, [0; 32], 1);
    hello.encode(&mut wire, now);
    assert_eq!(Frame::decode(&mut wire, LIMITS, now), Ok(Some(hello)));
    let mut wire = BytesMut::new();
    Frame::Welcome { limits: hostile, mac: [0; 32] }.encode(&mut wire, now);
    wire[5..13].copy_from_slice(&u64::MAX.to_be_bytes());
    let decoded = Frame::decode(&mut wire, LIMITS, now);
    assert_eq!(decoded, Ok(Some(Frame::Welcome { limits: hostile, mac: [0; 32] })));

    // Read with the larger bounds, the peer's capped; a node's own are kept.
    assert_eq!(LIMITS.reading(hostile), (FrameLimits::CAP, true));
    let zero = FrameLimits { frame: 0, handover: 0 };
    assert_eq!(LIMITS.reading(zero), (LIMITS, false));
    let larger = FrameLimits { frame: 8 << 20, handover: 1 };
    assert_eq!(LIMITS.reading(larger), (FrameLimits { frame: 8 << 20, handover: LIMITS.handover }, false));
    let huge = FrameLimits { frame: 1 << 20, handover: 3 << 30 };
    assert_eq!(
        LIMITS.reading(huge),
        (FrameLimits { frame: 1 << 20, handover: FrameLimits::CAP.handover }, true)
    );
    let big_own = FrameLimits { frame: 300 << 20, handover: 3 << 30 };
    assert_eq!(big_own.reading(hostile), (big_own, true), "never below a node's own bounds");
    assert_eq!(big_own.reading(big_own), (big_own, false), "its own bounds are not cut");
    // Each frame is held to its bound.
    let handover = Frame::Handover { seq: 1, id: 1, last: true, session: None };
    assert_eq!(
        (LIMITS.bound_of(&handover), LIMITS.bound_of(&Frame::Confirmed { seq: 1 })),
        (4 << 20, 1 << 20)
    );
}

/// One message of any size a node reads (it may come from a node with a larger
/// `--max-packet-size`) fits a part of a hand-over to any node, with a part's worth more.
#[test]
fn a_hand_over_part_fits_the_largest_message_whatever_the_nodes_packet_sizes() {
    for packet in [1 << 10, 1 << 20, crate::config::PROTOCOL_MAX_PACKET_SIZE] {
        let own = FrameLimits::for_node(packet);
        assert!(own.handover >= FrameLimits::CAP.frame + crate::config::MAX_HANDOVER_PART, "{packet}");
        assert!(own.handover <= FrameLimits::CAP.handover, "{packet}: under the cap");
    }
}
