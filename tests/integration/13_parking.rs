//! Parked connections (`--park-after`): a connection that read and wrote nothing for a
//! while gives up its tasks; its client's next packet, a delivery, a takeover, its
//! keep-alive, its closing socket and the broker's shutdown each bring it back, and it
//! behaves as if it had never left.

use std::time::{Duration, Instant};

use ringmq::codec::{Packet, Property, ProtocolVersion, QoS, ReasonCode};

use crate::common::{client_id_on, TestBroker, WAIT};
use crate::qos::helpers::{connect_packet, will, Peer};

fn parking_broker() -> TestBroker {
    TestBroker::start_with(|c| c.park_after = Duration::from_secs(1))
}

/// Waits until at least `n` connections are parked.
fn wait_parked(broker: &TestBroker, n: usize) {
    let deadline = Instant::now() + WAIT;
    while broker.fresh_accounting().parked_connections < n {
        assert!(Instant::now() < deadline, "fewer than {n} connections parked");
    }
}

fn disconnect_reason(peer: &mut Peer) -> ReasonCode {
    match peer.recv() {
        Some(Packet::Disconnect(d)) => d.reason,
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

#[test]
fn parked_clients_are_served_when_they_send_or_receive() {
    let broker = parking_broker();
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "psub"));
    sub.subscribe_granted("park/#", QoS::AtLeastOnce);
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "ppub"));
    wait_parked(&broker, 2);
    // The publisher is revived by its input, the subscriber by the delivery.
    assert_eq!(publisher.publish("park/a", "1", QoS::AtLeastOnce, false), ReasonCode::Success);
    let first = sub.next_publish();
    assert_eq!(&first.payload[..], b"1");
    sub.ack(&first);
    wait_parked(&broker, 2);
    sub.send(&Packet::PingReq);
    assert!(matches!(sub.expect(), Packet::PingResp));
    assert_eq!(publisher.publish("park/b", "2", QoS::ExactlyOnce, false), ReasonCode::Success);
    let second = sub.next_publish();
    assert_eq!((&second.payload[..], second.qos), (&b"2"[..], QoS::AtLeastOnce));
}

#[test]
fn a_parked_client_whose_socket_closes_has_its_will_published() {
    let broker = parking_broker();
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "wsub"));
    sub.subscribe_granted("pwill/#", QoS::AtLeastOnce);
    let mut connect = connect_packet(ProtocolVersion::V311, &client_id_on(1, "pdies"), true);
    connect.will = Some(will("pwill/gone", "gone", QoS::AtLeastOnce, false));
    let (client, _) = Peer::connect_with(broker.addr, connect);
    wait_parked(&broker, 2);
    drop(client);
    let publish = sub.next_publish();
    assert_eq!((publish.topic.as_str(), &publish.payload[..]), ("pwill/gone", &b"gone"[..]));
}

#[test]
fn a_parked_connection_is_taken_over() {
    let broker = parking_broker();
    let id = client_id_on(0, "ptake");
    let mut first = Peer::v5(broker.addr, &id);
    wait_parked(&broker, 1);
    let (_second, present) = Peer::connect_with(broker.addr, connect_packet(ProtocolVersion::V5, &id, false));
    assert!(present, "the session goes on from the connection taken over");
    assert_eq!(disconnect_reason(&mut first), ReasonCode::SessionTakenOver);
    assert!(first.recv().is_none(), "closed after its DISCONNECT");
}

#[test]
fn keep_alive_closes_a_parked_connection() {
    let broker = parking_broker();
    let mut connect = connect_packet(ProtocolVersion::V5, &client_id_on(0, "pka"), true);
    connect.keep_alive = 3;
    let (mut client, _) = Peer::connect_with(broker.addr, connect);
    wait_parked(&broker, 1);
    assert_eq!(disconnect_reason(&mut client), ReasonCode::KeepAliveTimeout);
    assert!(client.recv().is_none());
}

#[test]
fn shutdown_reaches_parked_connections() {
    let broker = parking_broker();
    let (mut client, _) = Peer::connect_with(broker.addr, {
        let mut c = connect_packet(ProtocolVersion::V5, &client_id_on(1, "pstop"), true);
        c.properties.push(Property::SessionExpiryInterval(0));
        c
    });
    wait_parked(&broker, 1);
    drop(broker);
    assert_eq!(disconnect_reason(&mut client), ReasonCode::ServerShuttingDown);
}

#[test]
fn a_client_that_only_pings_is_kept_alive_across_its_parks() {
    let broker = parking_broker();
    let mut connect = connect_packet(ProtocolVersion::V5, &client_id_on(0, "pping"), true);
    // Closed 3 s (1.5 × keep-alive) after its last packet.
    connect.keep_alive = 2;
    let (mut client, _) = Peer::connect_with(broker.addr, connect);
    let started = Instant::now();
    // A client's own cadence (its keep-alive timer, not a wait for the broker), within
    // the 3 s allowed: parked after 1 s of quiet, the connection is revived by each ping;
    // each must count, or the second finds it closed (3 s after CONNECT).
    for ping in 1..=2 {
        std::thread::sleep(Duration::from_millis(2500));
        client.send(&Packet::PingReq);
        let answer = client.expect();
        assert!(matches!(answer, Packet::PingResp), "ping {ping} at {:?}: {answer:?}", started.elapsed());
    }
}
