//! CONNECT/CONNACK in 3.1, 3.1.1 and 5.0, identifiers, keep-alive and takeover.

use std::time::{Duration, Instant};

use ringmq::codec::{
    ConnAck, Connect, Disconnect, Packet, Properties, Property, ProtocolVersion, ReasonCode,
};

use crate::common::{client_id_on, RawClient, TestBroker, V4Client, V5Client, WAIT};

fn connect(version: ProtocolVersion, client_id: &str, clean: bool, keep_alive: u16) -> Packet {
    Packet::Connect(Connect {
        protocol: version,
        clean_start: clean,
        keep_alive,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    })
}

fn expect_connack(client: &mut RawClient) -> ConnAck {
    match client.recv() {
        Some(Packet::ConnAck(ack)) => ack,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[test]
fn mqtt_3_1_3_1_1_and_5_are_accepted() {
    let broker = TestBroker::start();
    for version in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut client = RawClient::connect(broker.addr, version);
        client.send(&connect(version, &format!("c-{version:?}"), true, 60));
        let ack = expect_connack(&mut client);
        assert_eq!(ack.reason, ReasonCode::Success, "{version:?}");
        assert!(!ack.session_present);
        client.send(&Packet::PingReq);
        assert_eq!(client.recv(), Some(Packet::PingResp));
    }
}

#[test]
fn mqtt_3_1_connect_golden_bytes() {
    let broker = TestBroker::start();
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V311);
    // CONNECT, protocol "MQIsdp" level 3, clean session, keep-alive 60, client id "abc".
    client.send_bytes(&[
        0x10, 0x11, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c, 0x00, 0x03, b'a',
        b'b', b'c',
    ]);
    let mut reply = [0u8; 4];
    std::io::Read::read_exact(&mut client.stream, &mut reply).unwrap();
    assert_eq!(reply, [0x20, 0x02, 0x00, 0x00]);
}

#[test]
fn unsupported_protocol_level_is_refused_with_return_code_1() {
    let broker = TestBroker::start();
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V311);
    // Level 6 does not exist.
    client.send_bytes(&[
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3c, 0x00, 0x01, b'x',
    ]);
    let packets = client.recv_until_closed();
    assert_eq!(packets.len(), 1);
    match &packets[0] {
        Packet::ConnAck(ack) => assert_eq!(ack.reason.to_v3_connack(), 1),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[test]
fn empty_client_id_rules() {
    let broker = TestBroker::start();
    // 3.1.1 with a clean session: accepted.
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V311);
    client.send(&connect(ProtocolVersion::V311, "", true, 0));
    assert_eq!(expect_connack(&mut client).reason, ReasonCode::Success);
    // 3.1.1 persistent: identifier rejected (return code 2) and closed.
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V311);
    client.send(&connect(ProtocolVersion::V311, "", false, 0));
    assert_eq!(expect_connack(&mut client).reason.to_v3_connack(), 2);
    assert_eq!(client.recv(), None);
    // 5.0: an identifier is assigned and returned.
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V5);
    client.send(&connect(ProtocolVersion::V5, "", true, 0));
    let ack = expect_connack(&mut client);
    assert_eq!(ack.reason, ReasonCode::Success);
    let assigned = ack.properties.0.iter().find_map(|p| match p {
        Property::AssignedClientIdentifier(id) => Some(id.clone()),
        _ => None,
    });
    assert!(assigned.is_some_and(|id| !id.is_empty()), "{:?}", ack.properties);
}

#[test]
fn v5_authentication_method_without_configuration_is_refused() {
    let broker = TestBroker::start();
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V5);
    let Packet::Connect(mut c) = connect(ProtocolVersion::V5, "auth", true, 0) else { unreachable!() };
    c.properties.push(Property::AuthenticationMethod("SCRAM-SHA-1".into()));
    client.send(&Packet::Connect(c));
    assert_eq!(expect_connack(&mut client).reason, ReasonCode::BadAuthenticationMethod);
    assert_eq!(client.recv(), None);
}

#[test]
fn keep_alive_silence_closes_the_connection() {
    let broker = TestBroker::start();
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut client = RawClient::connect(broker.addr, version);
        client.send(&connect(version, "sleepy", true, 1));
        expect_connack(&mut client);
        let started = Instant::now();
        let packets = client.recv_until_closed();
        let waited = started.elapsed();
        // Closed after 1.5 × keep-alive, checked once a second: between 1.5 s and the wait bound.
        assert!(waited >= Duration::from_millis(1400), "closed too early: {waited:?}");
        assert!(waited < WAIT);
        if version == ProtocolVersion::V5 {
            assert_eq!(
                packets,
                vec![Packet::Disconnect(Disconnect {
                    reason: ReasonCode::KeepAliveTimeout,
                    properties: Properties::default()
                })]
            );
        }
    }
}

#[test]
fn pings_keep_a_connection_alive() {
    let broker = TestBroker::start();
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V311);
    client.send(&connect(ProtocolVersion::V311, "pinger", true, 1));
    expect_connack(&mut client);
    // Three seconds of pings every half second: twice the 1.5 s limit.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        client.send(&Packet::PingReq);
        assert_eq!(client.recv(), Some(Packet::PingResp));
    }
}

#[test]
fn socket_without_connect_is_closed_after_the_connect_timeout() {
    let broker = TestBroker::start_with(|c| c.connect_timeout = Duration::from_secs(1));
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V311);
    assert!(client.recv_until_closed().is_empty());
}

#[test]
fn first_packet_other_than_connect_closes() {
    let broker = TestBroker::start();
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V311);
    client.send(&Packet::PingReq);
    assert!(client.recv_until_closed().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_with_the_same_id_takes_over() {
    let broker = TestBroker::start();
    // The first connection is accepted on whichever shard; its id is owned by shard 1.
    let id = client_id_on(1, "dup");
    let (mut first, _) = V5Client::connect(broker.addr, &id).await;
    first.subscribe("takeover/test", rumqttc::v5::mqttbytes::QoS::AtMostOnce).await;
    let _second = V4Client::connect(broker.addr, &id).await;
    // The first is told why and disconnected.
    loop {
        match first.next().await {
            rumqttc::v5::mqttbytes::v5::Packet::Disconnect(d) => {
                assert_eq!(d.reason_code, rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::SessionTakenOver);
                break;
            }
            _ => continue,
        }
    }
}

/// Open descriptors of a process.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn each_connection_costs_the_broker_one_file_descriptor() {
    let dir = std::env::temp_dir().join(format!("ringmq-fds-{}", std::process::id()));
    let broker = crate::common::BinaryBroker::start(&dir, 2);
    let pid = broker.child.id();
    let mut clients: Vec<RawClient> = Vec::new();
    let before = descriptors(pid);
    const N: usize = 200;
    for i in 0..N {
        let mut client = RawClient::connect(broker.addr, ProtocolVersion::V311);
        client.send(&Packet::Connect(crate::qos::helpers::connect_packet(
            ProtocolVersion::V311,
            &format!("fd-{i}"),
            true,
        )));
        assert!(matches!(client.recv(), Some(Packet::ConnAck(_))));
        clients.push(client);
    }
    let per_connection = (descriptors(pid) - before) as f64 / N as f64;
    assert!(per_connection < 1.2, "{per_connection:.2} descriptors per connection");
    drop(clients);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
