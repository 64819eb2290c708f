//! CONNECT and CONNACK: goldens in every version, and the CONNECTs that are refused.

use super::goldens::*;
use super::*;

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
