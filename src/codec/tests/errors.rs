//! Refusals no one packet type owns: framing, strings, packet identifiers, trailing bytes,
//! reason codes, and what the encoder refuses.

use super::goldens::*;
use super::*;

#[test]
fn remaining_length_of_five_bytes_is_malformed() {
    let e = decode_err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], V311);
    assert!(is_malformed(&e), "{e}");
    // Known as soon as the fourth byte still continues.
    let e = decode_err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], V311);
    assert!(is_malformed(&e), "{e}");
    // The largest 4-byte length is fine (and too large here).
    assert_eq!(
        decode_err(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], V311),
        DecodeError::PacketTooLarge { size: 1 + 4 + 268_435_455, max: MAX }
    );
    // Non-minimal encoding [MQTT-1.5.5-1].
    assert!(is_malformed(&decode_err(&[0xC0, 0x80, 0x00], V311)));
}

#[test]
fn reserved_fixed_header_flags_are_malformed() {
    for bytes in [
        &[0x41, 0x02, 0x00, 0x01][..],                     // PUBACK flags 1
        &[0x60, 0x02, 0x00, 0x01],                         // PUBREL flags 0
        &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00], // SUBSCRIBE flags 0
        &[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],       // UNSUBSCRIBE flags 0
        &[0xC1, 0x00],
        &[0xE2, 0x00],
        &[0x00, 0x00], // type 0
        &[0xF0, 0x00], // AUTH before v5: see below
    ] {
        let version = V311;
        assert!(is_malformed(&decode_err(bytes, version)), "{bytes:02x?}");
    }
    assert!(is_malformed(&decode_err(&[0xF1, 0x00], V5)));
}

#[test]
fn invalid_utf8_and_null_are_malformed() {
    let e = decode_err(&[0x30, 0x04, 0x00, 0x02, 0xC3, 0x28], V311);
    assert!(is_malformed(&e), "{e}");
    let e = decode_err(&[0x30, 0x04, 0x00, 0x02, b'a', 0x00], V311);
    assert!(is_malformed(&e), "{e}");
    // Client identifier with invalid UTF-8.
    let mut connect = CONNECT_V311_MIN.to_vec();
    connect[14] = 0xFF;
    assert!(is_malformed(&decode_err(&connect, V311)));
    // U+0000 in a user property.
    let bytes = [0x40, 0x0B, 0x00, 0x01, 0x00, 0x07, 0x26, 0x00, 0x01, 0x00, 0x00, 0x01, b'v'];
    assert_eq!(
        decode_err(&bytes, V5),
        DecodeError::Malformed { what: "string contains U+0000", rule: "MQTT-1.5.4-2" }
    );
}

#[test]
fn packet_id_zero_is_a_protocol_error() {
    for (bytes, version) in [
        (&[0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x00][..], V311),
        (&[0x40, 0x02, 0x00, 0x00], V311),
        (&[0x50, 0x02, 0x00, 0x00], V5),
        (&[0x62, 0x02, 0x00, 0x00], V5),
        (&[0x70, 0x02, 0x00, 0x00], V311),
        (&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00], V311),
        (&[0x90, 0x03, 0x00, 0x00, 0x00], V311),
        (&[0xA2, 0x05, 0x00, 0x00, 0x00, 0x01, b'a'], V311),
        (&[0xB0, 0x02, 0x00, 0x00], V311),
    ] {
        assert_eq!(
            decode_err(bytes, version),
            DecodeError::Protocol { what: "packet identifier 0", rule: "MQTT-2.3.1-1" },
            "{bytes:02x?}"
        );
    }
}

#[test]
fn packet_too_large_is_decided_from_the_fixed_header() {
    // Only the fixed header is buffered: a PUBLISH of 200 + 3 bytes.
    let mut buf = BytesMut::from(&[0x30, 0xC8, 0x01][..]);
    assert_eq!(decode(&mut buf, V311, 100), Err(DecodeError::PacketTooLarge { size: 203, max: 100 }));
    // Exactly at the limit is fine.
    let mut buf = BytesMut::from(PUBLISH_V3_QOS0);
    assert!(decode(&mut buf, V311, PUBLISH_V3_QOS0.len()).unwrap().is_some());
    let mut buf = BytesMut::from(PUBLISH_V3_QOS0);
    assert!(decode(&mut buf, V311, PUBLISH_V3_QOS0.len() - 1).is_err());
}

#[test]
fn trailing_bytes_are_malformed() {
    for (bytes, version) in [
        (&[0xC0, 0x01, 0x00][..], V311),
        (&[0xD0, 0x01, 0x00], V5),
        (&[0x40, 0x03, 0x00, 0x01, 0x00], V311),
        (&[0xB0, 0x03, 0x00, 0x01, 0x00], V311),
        (&[0xE0, 0x01, 0x00], V311),
        (&[0x20, 0x03, 0x00, 0x00, 0x00], V311),
        // v5 DISCONNECT with reason, empty properties and one byte more.
        (&[0xE0, 0x03, 0x00, 0x00, 0x00], V5),
    ] {
        assert!(is_malformed(&decode_err(bytes, version)), "{bytes:02x?}");
    }
    let mut connect = CONNECT_V311_MIN.to_vec();
    connect.push(0x00);
    connect[1] += 1;
    assert!(is_malformed(&decode_err(&connect, V311)));
}

#[test]
fn unknown_reason_codes() {
    // 0x03 is no reason code; 0x87 is one but not a PUBREL reason.
    assert!(is_malformed(&decode_err(&[0x40, 0x03, 0x00, 0x01, 0x03], V5)));
    assert!(is_malformed(&decode_err(&[0x62, 0x03, 0x00, 0x01, 0x87], V5)));
    assert!(is_malformed(&decode_err(&[0x90, 0x04, 0x00, 0x01, 0x00, 0x03], V5)));
    assert!(is_malformed(&decode_err(&[0x90, 0x03, 0x00, 0x01, 0x87], V311)));
    assert!(is_malformed(&decode_err(&[0x20, 0x02, 0x00, 0x06], V311)));
}

#[test]
fn encode_errors() {
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic("t"),
        packet_id: None,
        properties: Properties::new(),
        payload: Bytes::from_static(&[0; 100]),
    };
    let mut out = BytesMut::new();
    assert!(matches!(
        encode(&Packet::Publish(publish.clone()), V311, &mut out),
        Err(EncodeError::Invalid { .. })
    ));
    let publish = Packet::Publish(Publish { packet_id: Some(pid(1)), ..publish });
    assert_eq!(encoded_size(&publish, V311), 107);
    assert_eq!(
        encode_with_limit(&publish, V311, 106, &mut out),
        Err(EncodeError::PacketTooLarge { size: 107, max: 106 })
    );
    assert!(out.is_empty());
    encode_with_limit(&publish, V311, 107, &mut out).unwrap();
    assert_eq!(out.len(), 107);
    // A property the packet may not carry.
    let puback = Packet::PubAck(ack(1, ReasonCode::Success, props(vec![Property::TopicAlias(1)])));
    assert!(matches!(encode(&puback, V5, &mut out), Err(EncodeError::Invalid { .. })));
    // A string too long for its prefix leaves nothing behind.
    let long = Packet::Disconnect(Disconnect {
        reason: ReasonCode::Success,
        properties: props(vec![Property::ReasonString("x".repeat(70_000))]),
    });
    let before = out.len();
    assert!(matches!(encode(&long, V5, &mut out), Err(EncodeError::TooLong(_))));
    assert_eq!(out.len(), before);
}
