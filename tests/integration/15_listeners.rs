//! Several listeners, each bound by every shard: PROXY protocol headers and per-listener
//! connection bounds.

use ringmq::codec::{Packet, ProtocolVersion, ReasonCode};
use ringmq::config::Listener;

use crate::common::{client_id_on, connect_v311, RawClient, TestBroker};

fn accepted(client: &mut RawClient) -> bool {
    matches!(client.recv(), Some(Packet::ConnAck(ack)) if ack.reason == ReasonCode::Success)
}

/// A broker with its default listener and a second one that requires PROXY headers.
fn with_proxy_listener() -> TestBroker {
    TestBroker::start_with(|c| {
        c.listeners.push(Listener { proxy_protocol: true, ..Listener::tcp("127.0.0.1:0".parse().unwrap()) })
    })
}

fn proxy_v2(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut header =
        vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0, 12];
    header.extend_from_slice(&source);
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&port.to_be_bytes());
    header.extend_from_slice(&1883u16.to_be_bytes());
    header
}

#[test]
fn a_proxy_listener_takes_v1_and_v2_headers_before_connect_on_either_shard() {
    let broker = with_proxy_listener();
    assert_eq!(broker.addrs.len(), 2);
    let proxied = broker.addrs[1];
    for shard in 0..2 {
        // The identifier decides the shard: one of them is handed over to its owner.
        let mut v1 = RawClient::connect(proxied, ProtocolVersion::V311);
        v1.send_bytes(b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 1883\r\n");
        v1.send(&connect_v311(&client_id_on(shard, "v1-")));
        assert!(accepted(&mut v1), "v1 header, shard {shard}");

        let mut v2 = RawClient::connect(proxied, ProtocolVersion::V311);
        // Header and CONNECT in one write: what follows the header is the packet.
        let mut bytes = proxy_v2([198, 51, 100, 9], 40000);
        let mut packet = bytes::BytesMut::new();
        ringmq::codec::encode(&connect_v311(&client_id_on(shard, "v2-")), ProtocolVersion::V311, &mut packet)
            .unwrap();
        bytes.extend_from_slice(&packet);
        v2.send_bytes(&bytes);
        assert!(accepted(&mut v2), "v2 header, shard {shard}");
        v2.send(&Packet::PingReq);
        assert_eq!(v2.recv(), Some(Packet::PingResp));
    }
}

#[test]
fn a_proxy_listener_closes_a_connection_without_a_header_and_the_plain_one_refuses_headers() {
    let broker = with_proxy_listener();
    let mut bare = RawClient::connect(broker.addrs[1], ProtocolVersion::V311);
    bare.send(&connect_v311("no-header"));
    assert_eq!(bare.recv_until_closed(), Vec::<Packet>::new(), "no CONNACK without the header");

    let mut garbled = RawClient::connect(broker.addrs[1], ProtocolVersion::V311);
    garbled.send_bytes(b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n");
    assert_eq!(garbled.recv_until_closed(), Vec::<Packet>::new());

    // On the plain listener a header is not CONNECT: closed at its first byte.
    let mut plain = RawClient::connect(broker.addrs[0], ProtocolVersion::V311);
    plain.send_bytes(b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 1883\r\n");
    assert_eq!(plain.recv_until_closed(), Vec::<Packet>::new());
    let mut fine = RawClient::connect(broker.addrs[0], ProtocolVersion::V311);
    fine.send(&connect_v311("plain"));
    assert!(accepted(&mut fine));
}

#[test]
fn a_listeners_own_connection_bound_refuses_only_on_that_listener() {
    let broker = TestBroker::start_with(|c| {
        c.listeners.push(Listener { max_connections: 1, ..Listener::tcp("127.0.0.1:0".parse().unwrap()) })
    });
    let mut first = RawClient::connect(broker.addrs[1], ProtocolVersion::V311);
    first.send(&connect_v311("first"));
    assert!(accepted(&mut first));
    let mut second = RawClient::connect(broker.addrs[1], ProtocolVersion::V311);
    second.send(&connect_v311("second"));
    assert_eq!(second.recv_until_closed(), Vec::<Packet>::new(), "the listener holds one");
    let mut elsewhere = RawClient::connect(broker.addrs[0], ProtocolVersion::V311);
    elsewhere.send(&connect_v311("elsewhere"));
    assert!(accepted(&mut elsewhere), "the other listener is not full");
    // The slot comes back when the first goes.
    drop(first);
    let deadline = std::time::Instant::now() + crate::common::WAIT;
    loop {
        let mut again = RawClient::connect(broker.addrs[1], ProtocolVersion::V311);
        again.send(&connect_v311("again"));
        if accepted(&mut again) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the listener's slot was never released");
    }
}
