//! Golden packets (written out byte by byte from the MQTT 3.1.1 and 5.0 layouts), split
//! reads, error cases, round-trip and never-panic property tests.

use bytes::{Bytes, BytesMut};

use super::*;
use crate::topic::{TopicFilter, TopicName};

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

// ---------------------------------------------------------------- golden bytes

#[rustfmt::skip]
const CONNECT_V311_MIN: &[u8] = &[
    0x10, 0x10,
    0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
    0x02,                   // clean session
    0x00, 0x3C,             // keep alive 60
    0x00, 0x04, b't', b'e', b's', b't',
];

#[rustfmt::skip]
const CONNECT_V311_FULL: &[u8] = &[
    0x10, 0x1F,
    0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
    0xEE,                   // user, password, will retain, will QoS 1, will, clean
    0x00, 0x0A,
    0x00, 0x02, b'c', b'1',
    0x00, 0x03, b'w', b'/', b't',
    0x00, 0x03, b'b', b'y', b'e',
    0x00, 0x01, b'u',
    0x00, 0x02, b'p', b'w',
];

#[rustfmt::skip]
const CONNECT_V31: &[u8] = &[
    0x10, 0x17,
    0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03,
    0xC2,                   // user, password, clean
    0x00, 0x1E,
    0x00, 0x03, b'a', b'b', b'c',
    0x00, 0x01, b'u',
    0x00, 0x01, b'p',
];

#[rustfmt::skip]
const CONNECT_V5: &[u8] = &[
    0x10, 0x41,
    0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05,
    0xD6,                   // user, password, will QoS 2, will, clean
    0x00, 0x3C,
    0x0F,                   // properties
    0x11, 0x00, 0x00, 0x00, 0x78,           // session expiry 120
    0x21, 0x00, 0x14,                       // receive maximum 20
    0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v',
    0x00, 0x02, b'i', b'd',
    0x0E,                   // will properties
    0x18, 0x00, 0x00, 0x00, 0x05,           // will delay 5
    0x01, 0x01,                             // payload format: UTF-8
    0x03, 0x00, 0x04, b't', b'e', b'x', b't',
    0x00, 0x03, b'a', b'/', b'b',
    0x00, 0x02, 0x01, 0x02,
    0x00, 0x04, b'u', b's', b'e', b'r',
    0x00, 0x03, 0xAA, 0xBB, 0xCC,
];

const CONNACK_V3: &[u8] = &[0x20, 0x02, 0x00, 0x00];
const CONNACK_V3_REFUSED: &[u8] = &[0x20, 0x02, 0x00, 0x05];

#[rustfmt::skip]
const CONNACK_V5: &[u8] = &[
    0x20, 0x11,
    0x01, 0x00,             // session present, success
    0x0E,
    0x21, 0x00, 0x0A,
    0x24, 0x01,
    0x12, 0x00, 0x03, b'x', b'y', b'z',
    0x22, 0x00, 0x05,
];
const CONNACK_V5_REFUSED: &[u8] = &[0x20, 0x03, 0x00, 0x87, 0x00];

const PUBLISH_V3_QOS0: &[u8] = &[0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'];
const PUBLISH_V3_QOS1: &[u8] = &[0x33, 0x08, 0x00, 0x01, b't', 0x00, 0x0A, 1, 2, 3];
const PUBLISH_V3_QOS2: &[u8] = &[0x3C, 0x05, 0x00, 0x01, b't', 0x12, 0x34];
const PUBLISH_V5_QOS0: &[u8] = &[0x30, 0x05, 0x00, 0x01, b'a', 0x00, b'x'];

#[rustfmt::skip]
const PUBLISH_V5_QOS1: &[u8] = &[
    0x32, 0x33,
    0x00, 0x03, b'a', b'/', b'b',
    0x00, 0x01,
    0x26,
    0x01, 0x01,
    0x02, 0x00, 0x00, 0x00, 0x3C,
    0x23, 0x00, 0x07,
    0x0B, 0x05,
    0x0B, 0x80, 0x01,
    0x26, 0x00, 0x01, b'a', 0x00, 0x01, b'b',
    0x26, 0x00, 0x01, b'a', 0x00, 0x01, b'c',
    0x08, 0x00, 0x01, b'r',
    0x09, 0x00, 0x02, 0xDE, 0xAD,
    b'h', b'e', b'l', b'l', b'o',
];

#[rustfmt::skip]
const PUBLISH_V5_QOS2_ALIAS: &[u8] = &[
    0x34, 0x09,
    0x00, 0x00,             // empty topic: named by its alias
    0x00, 0x02,
    0x03, 0x23, 0x00, 0x01,
    b'z',
];

const PUBACK_V3: &[u8] = &[0x40, 0x02, 0x00, 0x01];
const PUBREC_V3: &[u8] = &[0x50, 0x02, 0x00, 0x02];
const PUBREL_V3: &[u8] = &[0x62, 0x02, 0x00, 0x03];
const PUBCOMP_V3: &[u8] = &[0x70, 0x02, 0x00, 0x04];
const PUBACK_V5_REASON: &[u8] = &[0x40, 0x03, 0x00, 0x01, 0x10];
/// What the encoder writes for the same packet: the reason with a zero property length.
const PUBACK_V5_REASON_ENCODED: &[u8] = &[0x40, 0x04, 0x00, 0x01, 0x10, 0x00];
const PUBREC_V5_LONG: &[u8] = &[0x50, 0x0A, 0x00, 0x05, 0x80, 0x06, 0x1F, 0x00, 0x03, b'b', b'a', b'd'];
const PUBREL_V5_REASON: &[u8] = &[0x62, 0x03, 0x00, 0x07, 0x92];
const PUBREL_V5_REASON_ENCODED: &[u8] = &[0x62, 0x04, 0x00, 0x07, 0x92, 0x00];
const PUBCOMP_V5_LONG: &[u8] =
    &[0x70, 0x0B, 0x00, 0x08, 0x00, 0x07, 0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'];

#[rustfmt::skip]
const SUBSCRIBE_V3: &[u8] = &[
    0x82, 0x0C,
    0x00, 0x0A,
    0x00, 0x03, b'a', b'/', b'+', 0x01,
    0x00, 0x01, b'#', 0x02,
];
const SUBACK_V3: &[u8] = &[0x90, 0x04, 0x00, 0x0A, 0x01, 0x80];

#[rustfmt::skip]
const SUBSCRIBE_V5: &[u8] = &[
    0x82, 0x1F,
    0x00, 0x0B,
    0x09,
    0x0B, 0x0A,
    0x26, 0x00, 0x01, b'a', 0x00, 0x01, b'b',
    0x00, 0x03, b'a', b'/', b'b', 0x2D,   // QoS 1, no local, RAP, retain handling 2
    0x00, 0x0A, b'$', b's', b'h', b'a', b'r', b'e', b'/', b'g', b'/', b'x', 0x12,
];
const SUBACK_V5: &[u8] = &[0x90, 0x0A, 0x00, 0x0B, 0x05, 0x1F, 0x00, 0x02, b'o', b'k', 0x01, 0x9E];

const UNSUBSCRIBE_V3: &[u8] =
    &[0xA2, 0x0C, 0x00, 0x0C, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x03, b'c', b'/', b'#'];
const UNSUBACK_V3: &[u8] = &[0xB0, 0x02, 0x00, 0x0C];
const UNSUBSCRIBE_V5: &[u8] = &[0xA2, 0x06, 0x00, 0x0D, 0x00, 0x00, 0x01, b'a'];
const UNSUBACK_V5: &[u8] = &[0xB0, 0x05, 0x00, 0x0D, 0x00, 0x00, 0x11];

const PINGREQ: &[u8] = &[0xC0, 0x00];
const PINGRESP: &[u8] = &[0xD0, 0x00];
const DISCONNECT_SHORT: &[u8] = &[0xE0, 0x00];
const DISCONNECT_V5_REASON: &[u8] = &[0xE0, 0x01, 0x04];
const DISCONNECT_V5_REASON_ENCODED: &[u8] = &[0xE0, 0x02, 0x04, 0x00];
#[rustfmt::skip]
const DISCONNECT_V5_LONG: &[u8] = &[
    0xE0, 0x0B, 0x8B, 0x09,
    0x11, 0x00, 0x00, 0x00, 0x00,
    0x1C, 0x00, 0x01, b's',
];
const AUTH_SHORT: &[u8] = &[0xF0, 0x00];
#[rustfmt::skip]
const AUTH_LONG: &[u8] = &[
    0xF0, 0x0E, 0x18, 0x0C,
    0x15, 0x00, 0x04, b'S', b'C', b'R', b'A',
    0x16, 0x00, 0x02, 0x01, 0x02,
];

/// Every golden frame, for the mutation test.
const GOLDENS: &[&[u8]] = &[
    CONNECT_V311_MIN,
    CONNECT_V311_FULL,
    CONNECT_V31,
    CONNECT_V5,
    CONNACK_V3,
    CONNACK_V3_REFUSED,
    CONNACK_V5,
    CONNACK_V5_REFUSED,
    PUBLISH_V3_QOS0,
    PUBLISH_V3_QOS1,
    PUBLISH_V3_QOS2,
    PUBLISH_V5_QOS0,
    PUBLISH_V5_QOS1,
    PUBLISH_V5_QOS2_ALIAS,
    PUBACK_V3,
    PUBREC_V3,
    PUBREL_V3,
    PUBCOMP_V3,
    PUBACK_V5_REASON,
    PUBREC_V5_LONG,
    PUBREL_V5_REASON,
    PUBCOMP_V5_LONG,
    SUBSCRIBE_V3,
    SUBACK_V3,
    SUBSCRIBE_V5,
    SUBACK_V5,
    UNSUBSCRIBE_V3,
    UNSUBACK_V3,
    UNSUBSCRIBE_V5,
    UNSUBACK_V5,
    PINGREQ,
    PINGRESP,
    DISCONNECT_SHORT,
    DISCONNECT_V5_REASON,
    DISCONNECT_V5_LONG,
    AUTH_SHORT,
    AUTH_LONG,
];

// ---------------------------------------------------------------- golden tests

#[test]
fn connect_v311_minimal() {
    let packet = Packet::Connect(Connect {
        protocol: V311,
        clean_start: true,
        keep_alive: 60,
        client_id: "test".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::new(),
    });
    // A CONNECT is read by the version it names, whatever the connection's version.
    check_decode(CONNECT_V311_MIN, &packet, V5);
    golden(CONNECT_V311_MIN, packet, V311);
}

#[test]
fn connect_v311_will_username_password() {
    golden(
        CONNECT_V311_FULL,
        Packet::Connect(Connect {
            protocol: V311,
            clean_start: true,
            keep_alive: 10,
            client_id: "c1".into(),
            will: Some(Will {
                topic: topic("w/t"),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::new(),
            }),
            username: Some("u".into()),
            password: Some(Bytes::from_static(b"pw")),
            properties: Properties::new(),
        }),
        V311,
    );
}

#[test]
fn connect_v31() {
    golden(
        CONNECT_V31,
        Packet::Connect(Connect {
            protocol: V31,
            clean_start: true,
            keep_alive: 30,
            client_id: "abc".into(),
            will: None,
            username: Some("u".into()),
            password: Some(Bytes::from_static(b"p")),
            properties: Properties::new(),
        }),
        V31,
    );
}

fn connect_v5_packet() -> Packet {
    Packet::Connect(Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 60,
        client_id: "id".into(),
        will: Some(Will {
            topic: topic("a/b"),
            payload: Bytes::from_static(&[1, 2]),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: props(vec![
                Property::WillDelayInterval(5),
                Property::PayloadFormatIndicator(1),
                Property::ContentType("text".into()),
            ]),
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(&[0xAA, 0xBB, 0xCC])),
        properties: props(vec![
            Property::SessionExpiryInterval(120),
            Property::ReceiveMaximum(20),
            Property::UserProperty("k".into(), "v".into()),
        ]),
    })
}

#[test]
fn connect_v5_will_username_password_properties() {
    let packet = connect_v5_packet();
    golden(CONNECT_V5, packet.clone(), V5);
    let Packet::Connect(c) = packet else { unreachable!() };
    assert_eq!(c.properties.session_expiry_interval(), Some(120));
    assert_eq!(c.properties.receive_maximum(), Some(20));
    assert_eq!(c.properties.user_properties().collect::<Vec<_>>(), [("k", "v")]);
    let will = c.will.unwrap();
    assert_eq!(will.properties.will_delay_interval(), Some(5));
    assert_eq!(will.properties.content_type(), Some("text"));
}

#[test]
fn connack_v3() {
    golden(
        CONNACK_V3,
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::Success,
            properties: Properties::new(),
        }),
        V311,
    );
    golden(
        CONNACK_V3_REFUSED,
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::NotAuthorized,
            properties: Properties::new(),
        }),
        V311,
    );
    // v5 reasons without a 3.1.1 code map onto one [to_v3_connack].
    let mut out = BytesMut::new();
    let busy = Packet::ConnAck(ConnAck {
        session_present: false,
        reason: ReasonCode::ServerBusy,
        properties: props(vec![Property::ReasonString("dropped in v3".into())]),
    });
    encode(&busy, V311, &mut out).unwrap();
    assert_eq!(&out[..], &[0x20, 0x02, 0x00, 0x03]);
}

#[test]
fn connack_v5() {
    let packet = Packet::ConnAck(ConnAck {
        session_present: true,
        reason: ReasonCode::Success,
        properties: props(vec![
            Property::ReceiveMaximum(10),
            Property::MaximumQoS(1),
            Property::AssignedClientIdentifier("xyz".into()),
            Property::TopicAliasMaximum(5),
        ]),
    });
    golden(CONNACK_V5, packet.clone(), V5);
    let Packet::ConnAck(c) = packet else { unreachable!() };
    assert_eq!(c.properties.maximum_qos(), Some(1));
    assert_eq!(c.properties.assigned_client_identifier(), Some("xyz"));
    assert_eq!(c.properties.topic_alias_maximum(), Some(5));
    golden(
        CONNACK_V5_REFUSED,
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::NotAuthorized,
            properties: Properties::new(),
        }),
        V5,
    );
}

#[test]
fn publish_v3() {
    for version in [V31, V311] {
        golden(
            PUBLISH_V3_QOS0,
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: topic("a/b"),
                packet_id: None,
                properties: Properties::new(),
                payload: Bytes::from_static(b"hi"),
            }),
            version,
        );
        golden(
            PUBLISH_V3_QOS1,
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: topic("t"),
                packet_id: Some(pid(10)),
                properties: Properties::new(),
                payload: Bytes::from_static(&[1, 2, 3]),
            }),
            version,
        );
        golden(
            PUBLISH_V3_QOS2,
            Packet::Publish(Publish {
                dup: true,
                qos: QoS::ExactlyOnce,
                retain: false,
                topic: topic("t"),
                packet_id: Some(pid(0x1234)),
                properties: Properties::new(),
                payload: Bytes::new(),
            }),
            version,
        );
    }
}

#[test]
fn publish_v5() {
    golden(
        PUBLISH_V5_QOS0,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic("a"),
            packet_id: None,
            properties: Properties::new(),
            payload: Bytes::from_static(b"x"),
        }),
        V5,
    );
    let packet = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic("a/b"),
        packet_id: Some(pid(1)),
        properties: props(vec![
            Property::PayloadFormatIndicator(1),
            Property::MessageExpiryInterval(60),
            Property::TopicAlias(7),
            Property::SubscriptionIdentifier(5),
            Property::SubscriptionIdentifier(128),
            Property::UserProperty("a".into(), "b".into()),
            Property::UserProperty("a".into(), "c".into()),
            Property::ResponseTopic("r".into()),
            Property::CorrelationData(Bytes::from_static(&[0xDE, 0xAD])),
        ]),
        payload: Bytes::from_static(b"hello"),
    });
    golden(PUBLISH_V5_QOS1, packet.clone(), V5);
    let Packet::Publish(p) = packet else { unreachable!() };
    assert_eq!(p.properties.subscription_identifiers().collect::<Vec<_>>(), [5, 128]);
    assert_eq!(p.properties.user_properties().collect::<Vec<_>>(), [("a", "b"), ("a", "c")]);
    assert_eq!(p.properties.topic_alias(), Some(7));
    assert_eq!(p.properties.message_expiry_interval(), Some(60));
    assert_eq!(p.properties.response_topic(), Some("r"));
    assert_eq!(p.properties.correlation_data().map(|b| &b[..]), Some(&[0xDE, 0xAD][..]));

    golden(
        PUBLISH_V5_QOS2_ALIAS,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: TopicName::new_allow_empty(Bytes::new()).unwrap(),
            packet_id: Some(pid(2)),
            properties: props(vec![Property::TopicAlias(1)]),
            payload: Bytes::from_static(b"z"),
        }),
        V5,
    );
}

#[test]
fn publish_payload_is_a_slice_of_the_read_buffer() {
    let mut buf = BytesMut::from(PUBLISH_V5_QOS1);
    let start = buf.as_ptr() as usize;
    let Some(Packet::Publish(p)) = decode(&mut buf, V5, MAX).unwrap() else { panic!("not a PUBLISH") };
    assert_eq!(p.payload.as_ptr() as usize, start + PUBLISH_V5_QOS1.len() - 5);
}

fn ack(id: u16, reason: ReasonCode, properties: Properties) -> PubAck {
    PubAck { packet_id: pid(id), reason, properties }
}

#[test]
fn acks_v3() {
    let ok = |id| ack(id, ReasonCode::Success, Properties::new());
    for version in [V31, V311] {
        golden(PUBACK_V3, Packet::PubAck(ok(1)), version);
        golden(PUBREC_V3, Packet::PubRec(ok(2)), version);
        golden(PUBREL_V3, Packet::PubRel(ok(3)), version);
        golden(PUBCOMP_V3, Packet::PubComp(ok(4)), version);
    }
}

#[test]
fn acks_v5_short_and_long_forms() {
    let ok = |id| ack(id, ReasonCode::Success, Properties::new());
    // Remaining length 2: Success, no properties.
    golden(PUBACK_V3, Packet::PubAck(ok(1)), V5);
    golden(PUBREC_V3, Packet::PubRec(ok(2)), V5);
    golden(PUBREL_V3, Packet::PubRel(ok(3)), V5);
    golden(PUBCOMP_V3, Packet::PubComp(ok(4)), V5);
    // Remaining length 3: a reason, no properties. Decoded; the encoder always adds
    // the property length after a reason.
    let no_match = Packet::PubAck(ack(1, ReasonCode::NoMatchingSubscribers, Properties::new()));
    check_decode(PUBACK_V5_REASON, &no_match, V5);
    golden(PUBACK_V5_REASON_ENCODED, no_match, V5);
    let not_found = Packet::PubRel(ack(7, ReasonCode::PacketIdentifierNotFound, Properties::new()));
    check_decode(PUBREL_V5_REASON, &not_found, V5);
    golden(PUBREL_V5_REASON_ENCODED, not_found, V5);
    // Full form.
    golden(
        PUBREC_V5_LONG,
        Packet::PubRec(ack(
            5,
            ReasonCode::UnspecifiedError,
            props(vec![Property::ReasonString("bad".into())]),
        )),
        V5,
    );
    golden(
        PUBCOMP_V5_LONG,
        Packet::PubComp(ack(
            8,
            ReasonCode::Success,
            props(vec![Property::UserProperty("k".into(), "v".into())]),
        )),
        V5,
    );
    // A long form carrying what the short form says decodes to the same value.
    check_decode(&[0x40, 0x04, 0x00, 0x01, 0x00, 0x00], &Packet::PubAck(ok(1)), V5);
}

#[test]
fn subscribe_suback_v3() {
    let qos1 = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    };
    let qos2 = SubscriptionOptions { qos: QoS::ExactlyOnce, ..qos1 };
    golden(
        SUBSCRIBE_V3,
        Packet::Subscribe(Subscribe {
            packet_id: pid(10),
            properties: Properties::new(),
            filters: vec![(filter("a/+"), qos1), (filter("#"), qos2)],
        }),
        V311,
    );
    golden(
        SUBACK_V3,
        Packet::SubAck(SubAck {
            packet_id: pid(10),
            properties: Properties::new(),
            reasons: vec![ReasonCode::GrantedQoS1, ReasonCode::UnspecifiedError],
        }),
        V311,
    );
    // Any v5 failure is 0x80 in 3.1.1.
    let mut out = BytesMut::new();
    let suback = Packet::SubAck(SubAck {
        packet_id: pid(10),
        properties: Properties::new(),
        reasons: vec![ReasonCode::GrantedQoS1, ReasonCode::NotAuthorized],
    });
    encode(&suback, V311, &mut out).unwrap();
    assert_eq!(&out[..], SUBACK_V3);
}

#[test]
fn subscribe_suback_v5() {
    let packet = Packet::Subscribe(Subscribe {
        packet_id: pid(11),
        properties: props(vec![
            Property::SubscriptionIdentifier(10),
            Property::UserProperty("a".into(), "b".into()),
        ]),
        filters: vec![
            (
                filter("a/b"),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
            ),
            (
                filter("$share/g/x"),
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 1,
                },
            ),
        ],
    });
    golden(SUBSCRIBE_V5, packet, V5);
    golden(
        SUBACK_V5,
        Packet::SubAck(SubAck {
            packet_id: pid(11),
            properties: props(vec![Property::ReasonString("ok".into())]),
            reasons: vec![ReasonCode::GrantedQoS1, ReasonCode::SharedSubscriptionsNotSupported],
        }),
        V5,
    );
}

#[test]
fn unsubscribe_unsuback() {
    golden(
        UNSUBSCRIBE_V3,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(12),
            properties: Properties::new(),
            filters: vec![filter("a/b"), filter("c/#")],
        }),
        V311,
    );
    golden(
        UNSUBACK_V3,
        Packet::UnsubAck(UnsubAck { packet_id: pid(12), properties: Properties::new(), reasons: Vec::new() }),
        V311,
    );
    golden(
        UNSUBSCRIBE_V5,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(13),
            properties: Properties::new(),
            filters: vec![filter("a")],
        }),
        V5,
    );
    golden(
        UNSUBACK_V5,
        Packet::UnsubAck(UnsubAck {
            packet_id: pid(13),
            properties: Properties::new(),
            reasons: vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted],
        }),
        V5,
    );
}

#[test]
fn ping_and_disconnect() {
    for version in [V31, V311, V5] {
        golden(PINGREQ, Packet::PingReq, version);
        golden(PINGRESP, Packet::PingResp, version);
        golden(
            DISCONNECT_SHORT,
            Packet::Disconnect(Disconnect {
                reason: ReasonCode::NORMAL_DISCONNECTION,
                properties: Properties::new(),
            }),
            version,
        );
    }
    let with_will = Packet::Disconnect(Disconnect {
        reason: ReasonCode::DisconnectWithWillMessage,
        properties: Properties::new(),
    });
    check_decode(DISCONNECT_V5_REASON, &with_will, V5);
    golden(DISCONNECT_V5_REASON_ENCODED, with_will, V5);
    golden(
        DISCONNECT_V5_LONG,
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::ServerShuttingDown,
            properties: props(vec![
                Property::SessionExpiryInterval(0),
                Property::ServerReference("s".into()),
            ]),
        }),
        V5,
    );
    // v3 has no reason code: a v5 reason is dropped, the packet stays 2 bytes.
    let mut out = BytesMut::new();
    let d = Packet::Disconnect(Disconnect {
        reason: ReasonCode::ServerShuttingDown,
        properties: Properties::new(),
    });
    encode(&d, V311, &mut out).unwrap();
    assert_eq!(&out[..], DISCONNECT_SHORT);
}

#[test]
fn auth() {
    golden(AUTH_SHORT, Packet::Auth(Auth { reason: ReasonCode::Success, properties: Properties::new() }), V5);
    let packet = Packet::Auth(Auth {
        reason: ReasonCode::ContinueAuthentication,
        properties: props(vec![
            Property::AuthenticationMethod("SCRA".into()),
            Property::AuthenticationData(Bytes::from_static(&[1, 2])),
        ]),
    });
    golden(AUTH_LONG, packet.clone(), V5);
    let mut out = BytesMut::new();
    assert_eq!(encode(&packet, V311, &mut out), Err(EncodeError::NotInVersion("AUTH")));
    assert!(out.is_empty());
    assert!(matches!(decode_err(AUTH_SHORT, V311), DecodeError::Malformed { .. }));
}

// ---------------------------------------------------------------- error cases

fn is_malformed(e: &DecodeError) -> bool {
    matches!(e, DecodeError::Malformed { .. })
}

fn is_protocol(e: &DecodeError) -> bool {
    matches!(e, DecodeError::Protocol { .. })
}

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
fn publish_qos3_and_qos0_dup_are_malformed() {
    let e = decode_err(&[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01], V311);
    assert!(is_malformed(&e));
    let e = decode_err(&[0x38, 0x03, 0x00, 0x01, b't'], V311);
    assert_eq!(e, DecodeError::Malformed { what: "PUBLISH with QoS 0 and DUP set", rule: "MQTT-3.3.1-2" });
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
fn wildcard_in_topic_name() {
    let e = decode_err(&[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'+'], V311);
    assert!(matches!(e, DecodeError::TopicNameInvalid { .. }), "{e}");
    assert_eq!(e.reason_code(), ReasonCode::TopicNameInvalid);
    let e = decode_err(&[0x30, 0x04, 0x00, 0x01, b'#', 0x00], V5);
    assert!(matches!(e, DecodeError::TopicNameInvalid { .. }), "{e}");
}

#[test]
fn empty_topic_name() {
    // v3: never.
    let e = decode_err(&[0x30, 0x02, 0x00, 0x00], V311);
    assert!(matches!(e, DecodeError::TopicNameInvalid { .. }), "{e}");
    // v5: only with a topic alias.
    assert!(is_protocol(&decode_err(&[0x30, 0x03, 0x00, 0x00, 0x00], V5)));
}

#[test]
fn invalid_topic_filter() {
    let e = decode_err(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', b'#', 0x00], V311);
    assert!(matches!(e, DecodeError::TopicFilterInvalid { .. }), "{e}");
    let e = decode_err(&[0xA2, 0x06, 0x00, 0x01, 0x00, 0x02, b'+', b'a'], V311);
    assert!(matches!(e, DecodeError::TopicFilterInvalid { .. }), "{e}");
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
fn duplicated_property_is_a_protocol_error() {
    // Two reason strings in a PUBACK.
    let bytes = [0x40, 0x0C, 0x00, 0x01, 0x00, 0x08, 0x1F, 0x00, 0x01, b'a', 0x1F, 0x00, 0x01, b'b'];
    assert!(is_protocol(&decode_err(&bytes, V5)));
    // Two subscription identifiers: fine in PUBLISH (golden above), not in SUBSCRIBE.
    let bytes = [0x82, 0x0A, 0x00, 0x01, 0x04, 0x0B, 0x01, 0x0B, 0x02, 0x00, 0x01, b'a', 0x00];
    let bytes = {
        let mut b = bytes.to_vec();
        b[1] = (b.len() - 2) as u8;
        b
    };
    assert!(is_protocol(&decode_err(&bytes, V5)));
}

#[test]
fn property_not_allowed_in_packet() {
    // Topic Alias in a PUBACK.
    let bytes = [0x40, 0x07, 0x00, 0x01, 0x00, 0x03, 0x23, 0x00, 0x01];
    assert!(is_protocol(&decode_err(&bytes, V5)));
    // Will Delay Interval among CONNECT's own properties.
    let mut connect = vec![0x10, 0x00, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00];
    connect.extend_from_slice(&[0x05, 0x18, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]);
    connect[1] = (connect.len() - 2) as u8;
    assert!(is_protocol(&decode_err(&connect, V5)));
    // Unknown property identifier.
    let bytes = [0x40, 0x06, 0x00, 0x01, 0x00, 0x02, 0x7F, 0x00];
    assert!(is_malformed(&decode_err(&bytes, V5)));
}

#[test]
fn property_values_out_of_range() {
    // PUBLISH v5 with one property [id, value...].
    let publish_with = |prop: &[u8]| {
        let mut b = vec![0x30, 0x00, 0x00, 0x01, b't', prop.len() as u8];
        b.extend_from_slice(prop);
        b[1] = (b.len() - 2) as u8;
        b
    };
    // Topic Alias 0 is its own error: DISCONNECT 0x94 (MQTT-3.3.2-8).
    assert_eq!(decode_err(&publish_with(&[0x23, 0x00, 0x00]), V5), DecodeError::TopicAliasInvalid);
    assert!(is_protocol(&decode_err(&publish_with(&[0x01, 0x02]), V5)));
    assert!(is_protocol(&decode_err(&publish_with(&[0x0B, 0x00]), V5)));
    // Property value cut short inside the property list.
    assert!(is_malformed(&decode_err(&publish_with(&[0x02, 0x00, 0x00]), V5)));
    let connack_with = |prop: &[u8]| {
        let mut b = vec![0x20, 0x00, 0x00, 0x00, prop.len() as u8];
        b.extend_from_slice(prop);
        b[1] = (b.len() - 2) as u8;
        b
    };
    assert!(is_protocol(&decode_err(&connack_with(&[0x21, 0x00, 0x00]), V5)));
    assert!(is_protocol(&decode_err(&connack_with(&[0x27, 0, 0, 0, 0]), V5)));
    assert!(is_protocol(&decode_err(&connack_with(&[0x24, 0x02]), V5)));
    assert!(is_protocol(&decode_err(&connack_with(&[0x2A, 0x05]), V5)));
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
fn subscribe_errors() {
    // No filter.
    assert_eq!(
        decode_err(&[0x82, 0x02, 0x00, 0x01], V311),
        DecodeError::Protocol { what: "SUBSCRIBE without a topic filter", rule: "MQTT-3.8.3-3" }
    );
    assert!(is_protocol(&decode_err(&[0x82, 0x03, 0x00, 0x01, 0x00], V5)));
    assert!(is_protocol(&decode_err(&[0xA2, 0x02, 0x00, 0x01], V311)));
    // Retain handling 3.
    let bytes = [0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30];
    assert!(is_protocol(&decode_err(&bytes, V5)));
    // Reserved option bits: v5 bits 6-7, v3 bits 2-7.
    let bytes = [0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40];
    assert!(is_malformed(&decode_err(&bytes, V5)));
    let bytes = [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04];
    assert!(is_malformed(&decode_err(&bytes, V311)));
    // QoS 3.
    let bytes = [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03];
    assert!(is_malformed(&decode_err(&bytes, V311)));
    // A filter without its options byte.
    let bytes = [0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'];
    assert!(is_malformed(&decode_err(&bytes, V311)));
    // No Local on a shared subscription [MQTT-3.8.3-4].
    let mut bytes = vec![0x82, 0x00, 0x00, 0x01, 0x00, 0x00, 0x0A];
    bytes.extend_from_slice(b"$share/g/x");
    bytes.push(0x04);
    bytes[1] = (bytes.len() - 2) as u8;
    assert!(is_protocol(&decode_err(&bytes, V5)));
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

fn connect_with(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
    let mut b = vec![0x10, 0x00, 0x00, name.len() as u8];
    b.extend_from_slice(name);
    b.extend_from_slice(&[level, flags, 0x00, 0x00]);
    if level == 5 {
        b.push(0x00);
    }
    b.extend_from_slice(&[0x00, 0x01, b'c']);
    b[1] = (b.len() - 2) as u8;
    b
}

#[test]
fn connect_errors() {
    assert_eq!(
        decode_err(&connect_with(b"MQTT", 6, 0x02), V311),
        DecodeError::UnsupportedProtocolVersion { level: 6 }
    );
    assert_eq!(
        decode_err(&connect_with(b"MQIsdp", 4, 0x02), V311),
        DecodeError::UnsupportedProtocolVersion { level: 4 }
    );
    assert!(is_protocol(&decode_err(&connect_with(b"MQTX", 4, 0x02), V311)));
    // Reserved flag.
    assert_eq!(
        decode_err(&connect_with(b"MQTT", 4, 0x03), V311),
        DecodeError::Malformed { what: "reserved connect flag set", rule: "MQTT-3.1.2-3" }
    );
    // Will QoS 3, will QoS / retain without a will.
    assert!(is_malformed(&decode_err(&connect_with(b"MQTT", 4, 0x1E), V311)));
    assert!(is_malformed(&decode_err(&connect_with(b"MQTT", 4, 0x0A), V311)));
    assert!(is_malformed(&decode_err(&connect_with(b"MQTT", 4, 0x22), V311)));
    // Password without user name: malformed in 3.1.1 ...
    assert_eq!(
        decode_err(&connect_with(b"MQTT", 4, 0x42), V311),
        DecodeError::Malformed { what: "password without a user name", rule: "MQTT-3.1.2-22" }
    );
    // ... allowed in 5.0 (here the password field itself is missing: malformed later).
    let mut v5 = connect_with(b"MQTT", 5, 0x42);
    v5.extend_from_slice(&[0x00, 0x01, b'p']);
    v5[1] = (v5.len() - 2) as u8;
    let Ok(Some(Packet::Connect(c))) = decode_all(&v5, V311) else {
        panic!("v5 CONNECT with a password only")
    };
    assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
    assert_eq!(c.username, None);
    // Will topic with a wildcard.
    let mut will = connect_with(b"MQTT", 4, 0x06);
    will.extend_from_slice(&[0x00, 0x01, b'#', 0x00, 0x00]);
    will[1] = (will.len() - 2) as u8;
    assert!(matches!(decode_err(&will, V311), DecodeError::TopicNameInvalid { .. }));
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

// ---------------------------------------------------------------- property tests

mod prop {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::super::reason_sets;
    use super::*;

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-z0-9 é/]{0,6}"
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..8).prop_map(Bytes::from)
    }

    fn arb_topic() -> impl Strategy<Value = TopicName> {
        "[a-z$][a-z]{0,3}(/[a-z]{0,3}){0,3}".prop_map(|s| TopicName::new(s).unwrap())
    }

    fn arb_filter() -> impl Strategy<Value = TopicFilter> {
        (vec(select(vec!["a", "bc", "+", ""]), 1..4), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#");
            }
            let mut text = levels.join("/");
            if text.is_empty() {
                text.push('e');
            }
            TopicFilter::new(text).unwrap()
        })
    }

    fn arb_qos() -> impl Strategy<Value = QoS> {
        select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
    }

    fn arb_property(id: PropertyId) -> BoxedStrategy<Property> {
        use Property as P;
        use PropertyId as I;
        let flag = || 0u8..=1;
        match id {
            I::PayloadFormatIndicator => flag().prop_map(P::PayloadFormatIndicator).boxed(),
            I::MessageExpiryInterval => any::<u32>().prop_map(P::MessageExpiryInterval).boxed(),
            I::ContentType => arb_string().prop_map(P::ContentType).boxed(),
            I::ResponseTopic => arb_string().prop_map(P::ResponseTopic).boxed(),
            I::CorrelationData => arb_bytes().prop_map(P::CorrelationData).boxed(),
            I::SubscriptionIdentifier => (1u32..=268_435_455).prop_map(P::SubscriptionIdentifier).boxed(),
            I::SessionExpiryInterval => any::<u32>().prop_map(P::SessionExpiryInterval).boxed(),
            I::AssignedClientIdentifier => arb_string().prop_map(P::AssignedClientIdentifier).boxed(),
            I::ServerKeepAlive => any::<u16>().prop_map(P::ServerKeepAlive).boxed(),
            I::AuthenticationMethod => arb_string().prop_map(P::AuthenticationMethod).boxed(),
            I::AuthenticationData => arb_bytes().prop_map(P::AuthenticationData).boxed(),
            I::RequestProblemInformation => flag().prop_map(P::RequestProblemInformation).boxed(),
            I::WillDelayInterval => any::<u32>().prop_map(P::WillDelayInterval).boxed(),
            I::RequestResponseInformation => flag().prop_map(P::RequestResponseInformation).boxed(),
            I::ResponseInformation => arb_string().prop_map(P::ResponseInformation).boxed(),
            I::ServerReference => arb_string().prop_map(P::ServerReference).boxed(),
            I::ReasonString => arb_string().prop_map(P::ReasonString).boxed(),
            I::ReceiveMaximum => (1u16..).prop_map(P::ReceiveMaximum).boxed(),
            I::TopicAliasMaximum => any::<u16>().prop_map(P::TopicAliasMaximum).boxed(),
            I::TopicAlias => (1u16..).prop_map(P::TopicAlias).boxed(),
            I::MaximumQoS => flag().prop_map(P::MaximumQoS).boxed(),
            I::RetainAvailable => flag().prop_map(P::RetainAvailable).boxed(),
            I::UserProperty => (arb_string(), arb_string()).prop_map(|(k, v)| P::UserProperty(k, v)).boxed(),
            I::MaximumPacketSize => (1u32..).prop_map(P::MaximumPacketSize).boxed(),
            I::WildcardSubscriptionAvailable => flag().prop_map(P::WildcardSubscriptionAvailable).boxed(),
            I::SubscriptionIdentifierAvailable => flag().prop_map(P::SubscriptionIdentifierAvailable).boxed(),
            I::SharedSubscriptionAvailable => flag().prop_map(P::SharedSubscriptionAvailable).boxed(),
        }
    }

    /// Properties valid in `ctx` (allowed there, repeated only where they may be);
    /// always empty before v5.
    fn arb_props(ctx: PropertyContext, v5: bool) -> BoxedStrategy<Properties> {
        if !v5 {
            return Just(Properties::new()).boxed();
        }
        let ids: Vec<PropertyId> = PropertyId::ALL.into_iter().filter(|id| id.allowed_in(ctx)).collect();
        vec(select(ids).prop_flat_map(arb_property), 0..5)
            .prop_map(move |list| {
                let mut seen = Vec::new();
                let list = list
                    .into_iter()
                    .filter(|p| {
                        let id = p.id();
                        let keep = id.may_repeat(ctx) || !seen.contains(&id);
                        seen.push(id);
                        keep
                    })
                    .collect();
                Properties(list)
            })
            .boxed()
    }

    fn arb_reason(set: &'static [ReasonCode]) -> impl Strategy<Value = ReasonCode> {
        select(set.to_vec())
    }

    fn arb_pid() -> impl Strategy<Value = PacketId> {
        (1u16..).prop_map(pid)
    }

    fn arb_connect(protocol: ProtocolVersion) -> BoxedStrategy<Packet> {
        let v5 = protocol.is_v5();
        let will = (arb_topic(), arb_bytes(), arb_qos(), any::<bool>(), arb_props(PropertyContext::Will, v5))
            .prop_map(|(topic, payload, qos, retain, properties)| Will {
                topic,
                payload,
                qos,
                retain,
                properties,
            });
        (
            any::<bool>(),
            any::<u16>(),
            arb_string(),
            proptest::option::of(will),
            proptest::option::of(arb_string()),
            proptest::option::of(arb_bytes()),
            arb_props(PropertyContext::Connect, v5),
        )
            .prop_map(move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                // 3.1/3.1.1 send a password only with a user name [MQTT-3.1.2-22].
                let password = if v5 || username.is_some() { password } else { None };
                // Authentication Data needs an Authentication Method (§3.1.2.11.10).
                let mut properties = properties;
                if properties.authentication_method().is_none() {
                    properties.0.retain(|p| p.id() != PropertyId::AuthenticationData);
                }
                Packet::Connect(Connect {
                    protocol,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                })
            })
            .boxed()
    }

    fn arb_publish(v5: bool) -> BoxedStrategy<Packet> {
        (
            arb_qos(),
            any::<bool>(),
            any::<bool>(),
            arb_topic(),
            arb_pid(),
            arb_props(PropertyContext::Publish, v5),
            vec(any::<u8>(), 0..64),
        )
            .prop_map(|(qos, dup, retain, topic, id, properties, payload)| {
                let qos0 = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic,
                    packet_id: (!qos0).then_some(id),
                    properties,
                    payload: Bytes::from(payload),
                })
            })
            .boxed()
    }

    fn arb_ack(v5: bool, ctx: PropertyContext) -> BoxedStrategy<PubAck> {
        let set = match ctx {
            PropertyContext::PubAck | PropertyContext::PubRec => reason_sets::PUBACK,
            _ => reason_sets::PUBREL,
        };
        let reason = if v5 { arb_reason(set).boxed() } else { Just(ReasonCode::Success).boxed() };
        (arb_pid(), reason, arb_props(ctx, v5))
            .prop_map(|(packet_id, reason, properties)| PubAck { packet_id, reason, properties })
            .boxed()
    }

    fn arb_options(v5: bool) -> impl Strategy<Value = SubscriptionOptions> {
        (arb_qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(qos, nl, rap, rh)| {
            SubscriptionOptions {
                qos,
                no_local: nl && v5,
                retain_as_published: rap && v5,
                retain_handling: if v5 { rh } else { 0 },
            }
        })
    }

    fn arb_packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
        use PropertyContext as C;
        let v5 = version.is_v5();
        let connack_reason = if v5 {
            arb_reason(reason_sets::CONNACK).boxed()
        } else {
            select(vec![
                ReasonCode::Success,
                ReasonCode::UnsupportedProtocolVersion,
                ReasonCode::ClientIdentifierNotValid,
                ReasonCode::ServerUnavailable,
                ReasonCode::BadUserNameOrPassword,
                ReasonCode::NotAuthorized,
            ])
            .boxed()
        };
        let suback_set = if v5 { reason_sets::SUBACK } else { reason_sets::SUBACK_V3 };
        let mut choices = vec![
            arb_publish(v5),
            (any::<bool>(), connack_reason, arb_props(C::ConnAck, v5))
                .prop_map(|(session_present, reason, properties)| {
                    Packet::ConnAck(ConnAck { session_present, reason, properties })
                })
                .boxed(),
            arb_ack(v5, C::PubAck).prop_map(Packet::PubAck).boxed(),
            arb_ack(v5, C::PubRec).prop_map(Packet::PubRec).boxed(),
            arb_ack(v5, C::PubRel).prop_map(Packet::PubRel).boxed(),
            arb_ack(v5, C::PubComp).prop_map(Packet::PubComp).boxed(),
            (arb_pid(), arb_props(C::Subscribe, v5), vec((arb_filter(), arb_options(v5)), 1..4))
                .prop_map(|(packet_id, properties, filters)| {
                    Packet::Subscribe(Subscribe { packet_id, properties, filters })
                })
                .boxed(),
            (arb_pid(), arb_props(C::SubAck, v5), vec(arb_reason(suback_set), 1..4))
                .prop_map(|(packet_id, properties, reasons)| {
                    Packet::SubAck(SubAck { packet_id, properties, reasons })
                })
                .boxed(),
            (arb_pid(), arb_props(C::Unsubscribe, v5), vec(arb_filter(), 1..4))
                .prop_map(|(packet_id, properties, filters)| {
                    Packet::Unsubscribe(Unsubscribe { packet_id, properties, filters })
                })
                .boxed(),
            (
                arb_pid(),
                arb_props(C::UnsubAck, v5),
                vec(arb_reason(reason_sets::UNSUBACK), if v5 { 1..4 } else { 0..1 }),
            )
                .prop_map(|(packet_id, properties, reasons)| {
                    Packet::UnsubAck(UnsubAck { packet_id, properties, reasons })
                })
                .boxed(),
            Just(Packet::PingReq).boxed(),
            Just(Packet::PingResp).boxed(),
        ];
        if v5 {
            choices.push(arb_connect(ProtocolVersion::V5));
            choices.push(
                (arb_reason(reason_sets::DISCONNECT), arb_props(C::Disconnect, true))
                    .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
                    .boxed(),
            );
            choices.push(
                (arb_reason(reason_sets::AUTH), arb_props(C::Auth, true))
                    .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
                    .boxed(),
            );
        } else {
            choices.push(arb_connect(ProtocolVersion::V31));
            choices.push(arb_connect(ProtocolVersion::V311));
            choices.push(
                Just(Packet::Disconnect(Disconnect {
                    reason: ReasonCode::Success,
                    properties: Properties::new(),
                }))
                .boxed(),
            );
        }
        proptest::strategy::Union::new(choices).boxed()
    }

    fn round_trip(packet: &Packet, version: ProtocolVersion) -> Result<(), TestCaseError> {
        let mut buf = BytesMut::new();
        encode(packet, version, &mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(buf.len(), encoded_size(packet, version));
        let decoded = decode(&mut buf, version, MAX);
        prop_assert_eq!(decoded, Ok(Some(packet.clone())));
        prop_assert!(buf.is_empty());
        Ok(())
    }

    /// Decodes until the buffer runs dry or an error: must not panic.
    fn decode_everything(bytes: &[u8]) {
        for version in [V31, V311, V5] {
            for max in [MAX, 16] {
                let mut buf = BytesMut::from(bytes);
                while let Ok(Some(_)) = decode(&mut buf, version, max) {}
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn round_trip_v3(packet in arb_packet(V311)) {
            round_trip(&packet, V311)?;
            // 3.1 shares 3.1.1's layout for everything but CONNECT's name and level.
            if !matches!(packet, Packet::Connect(_)) {
                round_trip(&packet, V31)?;
            }
        }

        #[test]
        fn round_trip_v5(packet in arb_packet(V5)) {
            round_trip(&packet, V5)?;
        }

        #[test]
        fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
            decode_everything(&bytes);
        }

        #[test]
        fn mutated_goldens_never_panic(
            frame in select(GOLDENS.to_vec()),
            edits in vec((any::<proptest::sample::Index>(), 0u8..3, any::<u8>()), 1..4),
        ) {
            let mut bytes = frame.to_vec();
            for (at, op, byte) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] ^= byte | 1,
                    1 => bytes.insert(i, byte),
                    _ if i < bytes.len() => { bytes.remove(i); }
                    _ => bytes.push(byte),
                }
            }
            decode_everything(&bytes);
        }

        #[test]
        fn varint_round_trip(value in 0usize..=268_435_455) {
            let mut buf = BytesMut::new();
            super::super::primitives::put_varint(&mut buf, value);
            prop_assert_eq!(buf.len(), super::super::primitives::varint_len(value));
            let parsed = super::super::primitives::parse_varint(&buf);
            prop_assert_eq!(parsed, Ok(Some((value as u32, buf.len()))));
        }
    }
}

#[test]
fn property_accessors() {
    let p = props(vec![
        Property::RequestProblemInformation(0),
        Property::RequestResponseInformation(1),
        Property::AuthenticationMethod("SCRAM".into()),
        Property::MaximumPacketSize(4096),
        Property::TopicAliasMaximum(10),
        Property::WillDelayInterval(3),
        Property::ReasonString("why".into()),
    ]);
    assert_eq!(p.request_problem_information(), Some(false));
    assert_eq!(p.request_response_information(), Some(true));
    assert_eq!(p.authentication_method(), Some("SCRAM"));
    assert_eq!(p.maximum_packet_size(), Some(4096));
    assert_eq!(p.topic_alias_maximum(), Some(10));
    assert_eq!(p.will_delay_interval(), Some(3));
    assert_eq!(p.reason_string(), Some("why"));
    assert_eq!(p.session_expiry_interval(), None);
    assert_eq!(p.subscription_identifiers().count(), 0);
    for property in &p {
        assert_eq!(PropertyId::from_u8(property.id().as_u8()), Some(property.id()));
    }
    assert_eq!(p.len(), 7);
    assert_eq!(p.encoded_len(), 1 + p.iter().map(Property::encoded_len).sum::<usize>());
}
