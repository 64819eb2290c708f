//! PUBLISH and its acknowledgements: goldens, the zero-copy payload, refused topics and flags.

use super::goldens::*;
use super::*;

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
fn publish_qos3_and_qos0_dup_are_malformed() {
    let e = decode_err(&[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01], V311);
    assert!(is_malformed(&e));
    let e = decode_err(&[0x38, 0x03, 0x00, 0x01, b't'], V311);
    assert_eq!(e, DecodeError::Malformed { what: "PUBLISH with QoS 0 and DUP set", rule: "MQTT-3.3.1-2" });
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
