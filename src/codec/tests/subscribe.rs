//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK: goldens and refused filters and options.

use super::goldens::*;
use super::*;

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
fn invalid_topic_filter() {
    let e = decode_err(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', b'#', 0x00], V311);
    assert!(matches!(e, DecodeError::TopicFilterInvalid { .. }), "{e}");
    let e = decode_err(&[0xA2, 0x06, 0x00, 0x01, 0x00, 0x02, b'+', b'a'], V311);
    assert!(matches!(e, DecodeError::TopicFilterInvalid { .. }), "{e}");
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
