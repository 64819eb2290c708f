//! Malformed and hostile input closes only the offending connection.

use ringmq::codec::{Connect, Packet, Properties, ProtocolVersion, ReasonCode};
use rumqttc::QoS;

use crate::common::{client_id_on, RawClient, TestBroker, V4Client};

fn connected(broker: &TestBroker, version: ProtocolVersion, id: &str) -> RawClient {
    let mut client = RawClient::connect(broker.addr, version);
    client.send(&Packet::Connect(Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 0,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }));
    assert!(matches!(client.recv(), Some(Packet::ConnAck(_))));
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_close_only_their_connection() {
    let broker = TestBroker::start();
    let mut sub = V4Client::connect(broker.addr, &client_id_on(0, "sub")).await;
    let publisher = V4Client::connect(broker.addr, &client_id_on(1, "pub")).await;
    sub.subscribe("still/alive", QoS::AtMostOnce).await;

    let cases: &[(&str, &[u8])] = &[
        ("remaining length over four bytes", &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ("QoS 3", &[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]),
        ("reserved SUBSCRIBE flags", &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00]),
        ("wildcard in a topic name", &[0x30, 0x04, 0x00, 0x02, b'a', b'#']),
        ("packet id 0", &[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00]),
        ("invalid UTF-8", &[0x30, 0x05, 0x00, 0x02, 0xc3, 0x28, b'x']),
        ("U+0000 in a topic", &[0x30, 0x05, 0x00, 0x02, b'a', 0x00, b'x']),
        ("type 0", &[0x00, 0x00]),
        (
            "second CONNECT",
            &[0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x00, 0x00, 0x00],
        ),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut client = connected(&broker, version, &format!("bad-{i}-{version:?}"));
            client.send_bytes(bytes);
            let packets = client.recv_until_closed();
            if version == ProtocolVersion::V5 {
                // The reason, and a Reason String saying what was wrong.
                assert!(
                    matches!(packets.as_slice(), [Packet::Disconnect(d)]
                        if d.reason.is_error() && d.properties.reason_string().is_some_and(|s| !s.is_empty())),
                    "{what}: {packets:?}"
                );
            } else {
                assert!(packets.is_empty(), "{what}: {packets:?}");
            }
        }
        publisher.client.publish("still/alive", QoS::AtMostOnce, false, format!("{i}")).await.unwrap();
        assert_eq!(sub.next_publish().await.payload, format!("{i}").as_bytes(), "after {what}");
    }
}

#[test]
fn oversized_packet_is_refused_from_its_fixed_header() {
    let broker = TestBroker::start_with(|c| c.max_packet_size = 1024);
    let mut client = connected(&broker, ProtocolVersion::V5, "big");
    // A PUBLISH announcing 1 MiB; only its fixed header is sent.
    client.send_bytes(&[0x30, 0x80, 0x80, 0x40]);
    let packets = client.recv_until_closed();
    assert!(
        matches!(packets.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::PacketTooLarge),
        "{packets:?}"
    );
}
