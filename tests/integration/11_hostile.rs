//! Hostile clients: what a client can make the broker hold or do is bounded, and a
//! connection that must end ends cleanly. Control-packet answers to a client that never
//! reads, `--write-timeout`, lingering close, a first packet that is not CONNECT, topic
//! levels, subscription counts, a filter repeated in one SUBSCRIBE, the session expiry
//! cap, protocol checks on PUBLISH, and queue bounds counted in real bytes.
//!
//! Publishers that must be ordered with a subscriber's queue sit on its shard; bounds
//! are read from `TestBroker::fresh_accounting`, measured by a tick after the fact.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ringmq::codec::{
    self, Packet, Properties, Property, ProtocolVersion, Publish, QoS, ReasonCode, SubscriptionOptions,
    Unsubscribe,
};
use ringmq::topic::TopicFilter;

use crate::common::{client_id_on, TestBroker, WAIT};
use crate::qos::helpers::{self, connect_packet, opts, pid, properties, topic, topic_on, Peer};

const SUBS: usize = 0;
const PUBS: usize = 1;

/// A PUBLISH with properties.
fn publish_with(topic_name: &str, payload: &[u8], qos: QoS, id: u16, props: Vec<Property>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic(topic_name),
        packet_id: (qos != QoS::AtMostOnce).then(|| pid(id)),
        properties: properties(props),
        payload: Bytes::copy_from_slice(payload),
    }
}

fn encode_into(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) {
    codec::encode(packet, version, out).expect("the test's packet encodes");
}

/// The first `n` topics `{prefix}/{i}` that shard `shard` stores.
fn topics_on(shard: usize, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}/{i}"))
        .filter(|t| ringmq::broker::placement::owner(t, 2) == shard)
        .take(n)
        .collect()
}

/// Everything the server sends until it closes the connection, and how it closed:
/// `Ok` for an orderly close (EOF), the error for a reset.
fn read_until_closed(stream: &mut TcpStream, version: ProtocolVersion) -> (Vec<Packet>, std::io::Result<()>) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = BytesMut::new();
    let mut scratch = vec![0u8; 64 * 1024];
    let end = loop {
        match stream.read(&mut scratch) {
            Ok(0) => break Ok(()),
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the connection is still open after {WAIT:?}")
            }
            Err(e) => break Err(e),
        }
    };
    let mut packets = Vec::new();
    while let Some(packet) = codec::decode(&mut buf, version, usize::MAX).expect("the server's bytes decode")
    {
        packets.push(packet);
    }
    (packets, end)
}

/// Writes `packet` over and over without reading anything, until the broker takes no byte
/// for `stall` or `cap` bytes are written. Returns the bytes written and whether writing
/// stalled.
fn write_without_reading(
    stream: &mut TcpStream,
    packet: &[u8],
    cap: usize,
    stall: Duration,
) -> (usize, bool) {
    let chunk: Vec<u8> =
        packet.iter().copied().cycle().take(64 * 1024 / packet.len() * packet.len()).collect();
    stream.set_write_timeout(Some(stall)).unwrap();
    let mut written = 0;
    while written < cap {
        // Partial writes end anywhere in a packet: continue the same byte stream.
        match stream.write(&chunk[written % packet.len()..]) {
            Ok(0) => panic!("the socket took no bytes"),
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (written, true)
            }
            Err(e) => panic!("write failed after {written} bytes: {e}"),
        }
    }
    (written, false)
}

/// Writes `packets` (whole packets) over and over until `stop` is set or `until` passes;
/// returns the bytes written.
fn write_until(mut stream: &TcpStream, packets: &[u8], stop: &AtomicBool, until: Instant) -> usize {
    stream.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut written = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        match stream.write(&packets[written % packets.len()..]) {
            Ok(0) => panic!("the socket took no bytes"),
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("write failed after {written} bytes: {e}"),
        }
    }
    written
}

// ---------------------------------------------------------------------------------------
// 1. Control-packet answers are bounded by --write-buffer.

/// Far more than the kernel buffers in between can take (loopback: at most a 32 MiB
/// receive buffer and a 4 MiB send buffer on each side).
const FLOOD_CAP: usize = 64 << 20;
const SMALL_WRITE_BUFFER: usize = 64 * 1024;

/// A v5 client sends `packet` in a loop and never reads the answers: the broker must stop
/// reading it once its outbox holds `--write-buffer` bytes, not buffer answers without end.
fn answers_to_a_client_that_never_reads_are_bounded(packet: &[u8], what: &str) {
    let broker = TestBroker::start_with(|c| c.write_buffer = SMALL_WRITE_BUFFER);
    let mut flooder = Peer::v5(broker.addr, &client_id_on(SUBS, "flooder"));
    let (written, stalled) =
        write_without_reading(&mut flooder.raw.stream, packet, FLOOD_CAP, Duration::from_secs(2));
    assert!(stalled, "{what}: the broker kept reading a client that reads nothing ({written} bytes)");
    eprintln!("{what}: the broker stopped reading after {written} bytes");

    let accounting = broker.fresh_accounting();
    // Reading stops once the outbox is full; the answer to the packet being handled then
    // may pass the bound, by one small packet.
    assert!(
        (SMALL_WRITE_BUFFER..=SMALL_WRITE_BUFFER + 256).contains(&accounting.largest_outbox_bytes),
        "{what}: largest outbox {} bytes with --write-buffer {SMALL_WRITE_BUFFER}: {accounting:?}",
        accounting.largest_outbox_bytes
    );
    // The shard still serves others.
    let mut other = Peer::v5(broker.addr, &client_id_on(SUBS, "other"));
    assert!(other.ping().is_empty());
}

#[test]
fn pubcomps_for_unknown_pubrels_to_a_client_that_never_reads_are_bounded() {
    // PUBREL for an identifier nothing waits on: 4 bytes in, a PUBCOMP 0x92 with a Reason
    // String out.
    answers_to_a_client_that_never_reads_are_bounded(&[0x62, 0x02, 0x00, 0x01], "PUBREL");
}

#[test]
fn pingresps_to_a_client_that_never_reads_are_bounded() {
    answers_to_a_client_that_never_reads_are_bounded(&[0xc0, 0x00], "PINGREQ");
}

// ---------------------------------------------------------------------------------------
// 2. --write-timeout.

#[test]
fn a_subscriber_that_stops_reading_is_disconnected_after_the_write_timeout() {
    const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with(|c| c.write_timeout = WRITE_TIMEOUT);
    // The stuck subscriber's will shows when its connection ended.
    let mut watcher = Peer::v3(broker.addr, &client_id_on(PUBS, "watcher"));
    watcher.subscribe_granted("gone/#", QoS::AtMostOnce);
    // An idle client on the stuck one's shard, with nothing to read: it must stay.
    let mut bystander = Peer::v3(broker.addr, &client_id_on(SUBS, "bystander"));
    let mut connect = connect_packet(ProtocolVersion::V311, &client_id_on(SUBS, "stuck"), true);
    connect.will = Some(helpers::will("gone/stuck", "bye", QoS::AtMostOnce, false));
    let (mut stuck, _) = Peer::connect_with(broker.addr, connect);
    stuck.subscribe_granted("flood/#", QoS::AtMostOnce);

    // QoS 0 until the will arrives: the subscriber's socket buffers fill, then its outbox.
    // Large ones, so that each turn of the writer fills the kernel's buffers quickly.
    let publisher = Peer::v3(broker.addr, &client_id_on(PUBS, "publisher"));
    let mut packet = BytesMut::new();
    let flood = Peer::publish_packet("flood/x", &[b'x'; 128 * 1024], QoS::AtMostOnce, false, None);
    encode_into(&Packet::Publish(flood), ProtocolVersion::V311, &mut packet);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let will = std::thread::scope(|scope| {
        let flooder = scope.spawn(|| write_until(&publisher.raw.stream, &packet, &stop, started + WAIT * 2));
        let will = watcher.recv();
        stop.store(true, Ordering::Relaxed);
        eprintln!("flooder wrote {} bytes", flooder.join().unwrap());
        will
    });
    let took = started.elapsed();
    assert!(
        matches!(&will, Some(Packet::Publish(p)) if p.topic.as_str() == "gone/stuck"),
        "expected the will, got {will:?}"
    );
    eprintln!("will after {took:?}");
    // Filling the buffers takes a moment; the shard's tick checks about once a second.
    assert!(
        took <= WRITE_TIMEOUT + Duration::from_secs(4),
        "disconnected {took:?} after the flood began, --write-timeout {WRITE_TIMEOUT:?}"
    );
    assert!(
        took >= WRITE_TIMEOUT - Duration::from_secs(1),
        "disconnected after {took:?}: before --write-timeout {WRITE_TIMEOUT:?} passed"
    );

    // The idle client on the same shard is still connected and served.
    bystander.subscribe_granted("still/here", QoS::AtLeastOnce);
    assert_eq!(bystander.publish("still/here", "yes", QoS::AtLeastOnce, false), ReasonCode::Success);
    assert_eq!(helpers::text(&bystander.next_publish()), "yes");
    // Open, and unread, until here.
    drop(stuck);
}

// ---------------------------------------------------------------------------------------
// 3. Lingering close: the last packet to a client is read, not destroyed by a reset.

/// Bytes a client sends after what makes the server close: more than the kernel buffers
/// hold once the server stops reading (the client's send buffer is made small), less than
/// a lingering close reads and discards (1 MiB).
const MORE_AFTER: usize = 512 * 1024;

/// Keeps the client's send buffer small (no autotuning), so that what it sends beyond the
/// kernel's buffers is written only as the server reads it.
fn small_send_buffer(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 16 * 1024;
    // SAFETY: a plain setsockopt on a socket we own, with a c_int value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_SNDBUF: {}", std::io::Error::last_os_error());
}

#[test]
fn receive_maximum_exceeded_in_a_burst_is_read_before_an_orderly_close() {
    // Eclipse Paho's test_flow_control2: more unacknowledged QoS 2 PUBLISHes than the
    // server's Receive Maximum, sent in one go with more behind them. Closing at once
    // would reset the connection while the client still sends: its send fails, or what
    // the server sent last is lost.
    const RECEIVE_MAXIMUM: u16 = 10;
    let broker = TestBroker::start_with(|c| c.receive_maximum = RECEIVE_MAXIMUM);
    let mut peer = Peer::v5(broker.addr, &client_id_on(SUBS, "burst"));
    small_send_buffer(&peer.raw.stream);
    let mut burst = BytesMut::new();
    let mut id = 0;
    while burst.len() < MORE_AFTER {
        id += 1;
        let payload = if id <= RECEIVE_MAXIMUM + 1 { vec![b'q'; 16] } else { vec![b'm'; 1024] };
        let publish = publish_with("flow/x", &payload, QoS::ExactlyOnce, id, vec![]);
        encode_into(&Packet::Publish(publish), ProtocolVersion::V5, &mut burst);
    }
    peer.raw
        .stream
        .write_all(&burst)
        .expect("the broker takes the whole burst (it reset the connection while the client was sending)");
    let (packets, end) = read_until_closed(&mut peer.raw.stream, ProtocolVersion::V5);
    assert!(end.is_ok(), "the connection was reset, not closed; received before: {packets:?}, end: {end:?}");
    let (disconnect, pubrecs) = packets.split_last().expect("packets before the close");
    assert!(
        matches!(disconnect, Packet::Disconnect(d) if d.reason == ReasonCode::ReceiveMaximumExceeded),
        "last packet: {disconnect:?}"
    );
    assert_eq!(pubrecs.len(), usize::from(RECEIVE_MAXIMUM), "{pubrecs:?}");
    assert!(pubrecs.iter().all(|p| matches!(p, Packet::PubRec(_))), "{pubrecs:?}");
}

#[test]
fn a_refused_connack_is_read_before_an_orderly_close() {
    let broker = TestBroker::start();
    let mut connect = connect_packet(ProtocolVersion::V5, "with-auth", true);
    connect.properties = properties(vec![Property::AuthenticationMethod("SCRAM-SHA-1".into())]);
    let mut bytes = BytesMut::new();
    encode_into(&Packet::Connect(connect), ProtocolVersion::V5, &mut bytes);
    // What a pipelining client sends before it sees the CONNACK.
    let mut id = 0;
    while bytes.len() < MORE_AFTER {
        id += 1;
        let publish = publish_with("early/x", &[b'e'; 1024], QoS::AtLeastOnce, id, vec![]);
        encode_into(&Packet::Publish(publish), ProtocolVersion::V5, &mut bytes);
    }
    let mut stream = TcpStream::connect(broker.addr).unwrap();
    small_send_buffer(&stream);
    stream.write_all(&bytes).expect("the broker takes what the client sent (it reset the connection)");
    let (packets, end) = read_until_closed(&mut stream, ProtocolVersion::V5);
    assert!(end.is_ok(), "the connection was reset, not closed; received before: {packets:?}, end: {end:?}");
    assert!(
        matches!(packets.as_slice(), [Packet::ConnAck(ack)] if ack.reason == ReasonCode::BadAuthenticationMethod),
        "{packets:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. The first packet must be CONNECT (MQTT-3.1.0-1): anything else is closed at once.

#[test]
fn a_first_byte_that_is_not_connect_is_closed_at_once() {
    let broker = TestBroker::start_with(|c| c.connect_timeout = Duration::from_secs(10));
    let cases: [(&str, &[u8]); 3] = [
        ("PROXY protocol v1 header", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
        ("HTTP request", b"GET / HTTP/1.1\r\n\r\n"),
        ("TLS ClientHello record header", &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
    ];
    for (what, bytes) in cases {
        let mut stream = TcpStream::connect(broker.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let start = Instant::now();
        stream.write_all(bytes).unwrap();
        let mut scratch = [0u8; 256];
        let read = stream.read(&mut scratch);
        let took = start.elapsed();
        match read {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("{what}: the broker answered {:?}", &scratch[..n]),
            Err(e) => panic!("{what}: still open after {took:?} ({e})"),
        }
        assert!(took < Duration::from_secs(1), "{what}: closed after {took:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 5. --max-topic-levels.

#[test]
fn filters_and_topics_deeper_than_max_topic_levels_are_refused() {
    let broker = TestBroker::start_with(|c| c.max_topic_levels = 4);
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let id = client_id_on(SUBS, &format!("levels-{version:?}"));
        let (mut peer, _) = Peer::connect_with(broker.addr, connect_packet(version, &id, true));
        // Five levels, then four, in one SUBSCRIBE.
        let reasons = peer.subscribe_with(
            &[("a/b/c/d/#", opts(QoS::AtLeastOnce)), ("a/b/c/#", opts(QoS::AtLeastOnce))],
            Properties::default(),
        );
        let refused =
            if version.is_v5() { ReasonCode::TopicFilterInvalid } else { ReasonCode::UnspecifiedError };
        assert_eq!(reasons, vec![refused, ReasonCode::GrantedQoS1], "{version:?}");
        // A topic at the bound is routed, to the granted filter.
        assert_eq!(peer.publish("a/b/c/d", "four", QoS::AtLeastOnce, false), ReasonCode::Success);
        let p = peer.next_publish();
        assert_eq!((p.topic.as_str(), helpers::text(&p).as_str()), ("a/b/c/d", "four"));
        peer.ack(&p);
        // One level more ends the connection.
        peer.send(&Packet::Publish(Peer::publish_packet("a/b/c/d/e", b"five", QoS::AtMostOnce, false, None)));
        let packets = peer.until_closed();
        if version.is_v5() {
            assert!(
                matches!(packets.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::TopicNameInvalid),
                "{packets:?}"
            );
        } else {
            assert!(packets.is_empty(), "{packets:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 6. --max-subscriptions-per-client and --max-subscriptions, and their bounds in bytes.

fn quota_refused(version: ProtocolVersion) -> ReasonCode {
    if version.is_v5() {
        ReasonCode::QuotaExceeded
    } else {
        ReasonCode::UnspecifiedError
    }
}

fn subscribe_all(peer: &mut Peer, filters: &[String], qos: QoS) -> Vec<ReasonCode> {
    let list: Vec<(&str, SubscriptionOptions)> = filters.iter().map(|f| (f.as_str(), opts(qos))).collect();
    peer.subscribe_with(&list, Properties::default())
}

fn unsubscribe(peer: &mut Peer, filter: &str) {
    let id = peer.next_packet_id();
    peer.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: id,
        properties: Properties::default(),
        filters: vec![TopicFilter::new(filter.to_string()).unwrap()],
    }));
    match peer.expect() {
        Packet::UnsubAck(ack) if ack.packet_id == id => {}
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
}

#[test]
fn subscriptions_beyond_max_subscriptions_per_client_are_refused() {
    let broker = TestBroker::start_with(|c| c.max_subscriptions_per_client = 10);
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let id = client_id_on(SUBS, &format!("subs-{version:?}"));
        let (mut peer, _) = Peer::connect_with(broker.addr, connect_packet(version, &id, true));
        let ten: Vec<String> = (0..10).map(|i| format!("f/{i}")).collect();
        assert_eq!(subscribe_all(&mut peer, &ten, QoS::AtLeastOnce), vec![ReasonCode::GrantedQoS1; 10]);
        let refused = quota_refused(version);
        assert_eq!(peer.subscribe("f/10", QoS::AtLeastOnce), vec![refused], "{version:?}: the 11th");
        // A subscription it holds is still replaced, in the same SUBSCRIBE as a refused one.
        let reasons = peer.subscribe_with(
            &[("f/11", opts(QoS::AtMostOnce)), ("f/3", opts(QoS::ExactlyOnce))],
            Properties::default(),
        );
        assert_eq!(reasons, vec![refused, ReasonCode::GrantedQoS2], "{version:?}");
        // Unsubscribing makes room.
        unsubscribe(&mut peer, "f/0");
        assert_eq!(peer.subscribe("f/10", QoS::AtLeastOnce), vec![ReasonCode::GrantedQoS1], "{version:?}");
        peer.disconnect();
    }
}

#[test]
fn subscriptions_beyond_max_subscriptions_are_refused_across_clients() {
    let broker = TestBroker::start_with(|c| c.max_subscriptions = 10);
    let mut a = Peer::v5(broker.addr, &client_id_on(SUBS, "a"));
    let mut b = Peer::v3(broker.addr, &client_id_on(PUBS, "b"));
    let a_filters: Vec<String> = (0..7).map(|i| format!("g/a/{i}")).collect();
    let b_filters: Vec<String> = (0..6).map(|i| format!("g/b/{i}")).collect();
    assert_eq!(subscribe_all(&mut a, &a_filters[..6], QoS::AtMostOnce), vec![ReasonCode::Success; 6]);
    assert_eq!(subscribe_all(&mut b, &b_filters[..4], QoS::AtMostOnce), vec![ReasonCode::Success; 4]);
    // Ten held: one more is refused to either client, on either shard.
    assert_eq!(subscribe_all(&mut b, &b_filters[4..5], QoS::AtMostOnce), vec![ReasonCode::UnspecifiedError]);
    assert_eq!(subscribe_all(&mut a, &a_filters[6..7], QoS::AtMostOnce), vec![ReasonCode::QuotaExceeded]);
    // Replacing one is not a new one.
    assert_eq!(a.subscribe(&a_filters[0], QoS::AtLeastOnce), vec![ReasonCode::GrantedQoS1]);
    // An unsubscription, and a clean session's end, give room back.
    unsubscribe(&mut a, &a_filters[0]);
    assert_eq!(subscribe_all(&mut b, &b_filters[4..5], QoS::AtMostOnce), vec![ReasonCode::Success]);
    a.disconnect();
    assert_eq!(subscribe_all(&mut b, &b_filters[5..6], QoS::AtMostOnce), vec![ReasonCode::Success]);
}

/// Filters of about 60 KB each (3 levels): counted about 303 KB each as held.
fn long_filters(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}/{i}/{}", "x".repeat(60_000))).collect()
}

#[test]
fn long_filters_beyond_max_subscription_bytes_per_client_are_refused() {
    // Before this bound, a client could hold 100,000 filters of 64 KiB (6.5 GB counted
    // once) under --max-subscriptions-per-client.
    let bound = 1 << 20;
    let broker = TestBroker::start_with(|c| c.max_subscription_bytes_per_client = bound);
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let id = client_id_on(SUBS, &format!("long-{version:?}"));
        let (mut peer, _) = Peer::connect_with(broker.addr, connect_packet(version, &id, true));
        let filters = long_filters("l", 4);
        let granted = subscribe_all(&mut peer, &filters[..3], QoS::AtLeastOnce);
        assert_eq!(granted, vec![ReasonCode::GrantedQoS1; 3], "{version:?}");
        let refused = quota_refused(version);
        assert_eq!(subscribe_all(&mut peer, &filters[3..], QoS::AtLeastOnce), vec![refused], "{version:?}");
        let held = broker.accounting().subscription_bytes;
        assert!(held <= bound, "{version:?}: {held} bytes held > {bound}");
        // A short filter still fits; unsubscribing a long one makes room for another.
        assert_eq!(peer.subscribe("short", QoS::AtLeastOnce), vec![ReasonCode::GrantedQoS1], "{version:?}");
        unsubscribe(&mut peer, &filters[0]);
        let again = subscribe_all(&mut peer, &filters[3..], QoS::AtLeastOnce);
        assert_eq!(again, vec![ReasonCode::GrantedQoS1], "{version:?}");
        peer.disconnect();
    }
}

#[test]
fn long_filters_beyond_max_subscription_bytes_are_refused_across_clients() {
    let bound = 1 << 20;
    let broker = TestBroker::start_with(|c| c.max_subscription_bytes = bound);
    let mut a = Peer::v5(broker.addr, &client_id_on(SUBS, "la"));
    let mut b = Peer::v3(broker.addr, &client_id_on(PUBS, "lb"));
    let (a_filters, b_filters) = (long_filters("a", 2), long_filters("b", 2));
    assert_eq!(subscribe_all(&mut a, &a_filters, QoS::AtMostOnce), vec![ReasonCode::Success; 2]);
    assert_eq!(subscribe_all(&mut b, &b_filters[..1], QoS::AtMostOnce), vec![ReasonCode::Success]);
    // Three held (about 909 KB counted): a fourth is refused to either client.
    assert_eq!(subscribe_all(&mut b, &b_filters[1..], QoS::AtMostOnce), vec![ReasonCode::UnspecifiedError]);
    assert_eq!(
        subscribe_all(&mut a, &long_filters("c", 1), QoS::AtMostOnce),
        vec![ReasonCode::QuotaExceeded]
    );
    let held = broker.accounting().subscription_bytes;
    assert!(held <= bound, "{held} bytes held > {bound}");
    // A clean session's end gives its share back.
    a.disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.accounting().subscription_bytes > held / 3 + 1 {
        assert!(Instant::now() < deadline, "the ended session's subscriptions are still counted");
        std::thread::yield_now();
    }
    assert_eq!(subscribe_all(&mut b, &b_filters[1..], QoS::AtMostOnce), vec![ReasonCode::Success]);
}

// ---------------------------------------------------------------------------------------
// 7. A filter repeated in one SUBSCRIBE.

#[test]
fn a_thousand_copies_of_a_filter_get_a_thousand_grants_and_each_retained_message_once() {
    let broker = TestBroker::start();
    // Retained messages stored by the publisher's own shard (stored before its PUBACK).
    let topics = topics_on(PUBS, "x", 3);
    let marker = topic_on(PUBS, "m");
    let mut publisher = Peer::v5(broker.addr, &client_id_on(PUBS, "pub"));
    for t in &topics {
        publisher.publish(t, t, QoS::AtLeastOnce, true);
    }
    publisher.publish(&marker, "marker", QoS::AtLeastOnce, true);

    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "sub"));
    let copies = vec![("x/#", opts(QoS::AtLeastOnce)); 1000];
    assert_eq!(sub.subscribe_with(&copies, Properties::default()), vec![ReasonCode::GrantedQoS1; 1000]);
    // The marker's retained message is fetched after everything the first SUBSCRIBE asked.
    sub.subscribe_granted("m/#", QoS::AtLeastOnce);
    let seen = sub.until(&marker);
    let mut got: Vec<String> = seen[..seen.len() - 1].iter().map(|p| p.topic.as_str().to_string()).collect();
    got.sort();
    let mut want = topics.clone();
    want.sort();
    assert_eq!(got, want, "each retained message once");
}

// ---------------------------------------------------------------------------------------
// 8. --max-session-expiry.

#[test]
fn a_v5_session_expiry_above_the_cap_is_answered_with_the_cap() {
    let broker = TestBroker::start_with(|c| c.max_session_expiry = 2);
    let mut connect = connect_packet(ProtocolVersion::V5, &client_id_on(SUBS, "forever"), true);
    connect.properties = properties(vec![Property::SessionExpiryInterval(u32::MAX)]);
    let (peer, ack) = Peer::try_connect(broker.addr, connect);
    assert_eq!(ack.reason, ReasonCode::Success);
    assert_eq!(ack.properties.session_expiry_interval(), Some(2), "CONNACK {ack:?}");
    peer.disconnect();
}

#[test]
fn a_v311_persistent_session_ends_after_the_cap() {
    const CAP: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with(|c| c.max_session_expiry = CAP.as_secs() as u32);
    let id = client_id_on(SUBS, "v311");
    let persistent = || connect_packet(ProtocolVersion::V311, &id, false);
    let (mut peer, present) = Peer::connect_with(broker.addr, persistent());
    assert!(!present);
    peer.subscribe_granted("keep/#", QoS::AtLeastOnce);
    peer.disconnect();
    // Within the cap the session is there.
    let (peer, present) = Peer::connect_with(broker.addr, persistent());
    assert!(present, "session kept within the cap");
    peer.disconnect();
    let gone = Instant::now();
    let deadline = gone + WAIT;
    while broker.accounting().sessions > 0 {
        assert!(Instant::now() < deadline, "the session outlived the cap: {:?}", broker.accounting());
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = gone.elapsed();
    assert!(
        took >= CAP - Duration::from_millis(500) && took <= CAP + Duration::from_secs(3),
        "the session ended {took:?} after its client left, cap {CAP:?}"
    );
    let (_peer, present) = Peer::connect_with(broker.addr, persistent());
    assert!(!present, "session expired after the cap");
}

// ---------------------------------------------------------------------------------------
// 9. Protocol checks on PUBLISH.

/// What the server sent before closing, which must end with exactly one DISCONNECT.
fn disconnect_reason(packets: &[Packet]) -> ReasonCode {
    match packets {
        [Packet::Disconnect(d)] => d.reason,
        other => panic!("expected only the server's DISCONNECT before it closed, got {other:?}"),
    }
}

#[test]
fn a_response_topic_with_a_wildcard_is_a_protocol_error() {
    let broker = TestBroker::start();
    for response_topic in ["replies/+", "replies/#"] {
        let mut peer = Peer::v5(broker.addr, &client_id_on(PUBS, "responder"));
        let publish = publish_with(
            "request/x",
            b"q",
            QoS::AtLeastOnce,
            1,
            vec![Property::ResponseTopic(response_topic.into())],
        );
        let mut bytes = BytesMut::new();
        encode_into(&Packet::Publish(publish), ProtocolVersion::V5, &mut bytes);
        peer.raw.send_bytes(&bytes);
        let packets = peer.until_closed();
        assert_eq!(disconnect_reason(&packets), ReasonCode::ProtocolError, "{response_topic}: {packets:?}");
    }
}

#[test]
fn a_publish_from_a_client_with_a_subscription_identifier_is_a_protocol_error() {
    let broker = TestBroker::start();
    let mut peer = Peer::v5(broker.addr, &client_id_on(PUBS, "with-id"));
    let publish = publish_with("ids/x", b"q", QoS::AtLeastOnce, 1, vec![Property::SubscriptionIdentifier(5)]);
    peer.send(&Packet::Publish(publish));
    let packets = peer.until_closed();
    assert_eq!(disconnect_reason(&packets), ReasonCode::ProtocolError, "{packets:?}");
}

#[test]
fn a_client_publish_to_sys_is_not_delivered() {
    let broker = TestBroker::start_with(|c| c.sys_interval = Duration::ZERO);
    let mut sub = Peer::v5(broker.addr, &client_id_on(SUBS, "sys-sub"));
    sub.subscribe_granted("$SYS/#", QoS::AtLeastOnce);
    sub.subscribe_granted("marker", QoS::AtLeastOnce);
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let id = client_id_on(PUBS, &format!("sys-pub-{version:?}"));
        let (mut publisher, _) = Peer::connect_with(broker.addr, connect_packet(version, &id, true));
        let reason = publisher.publish("$SYS/x", "forged", QoS::AtLeastOnce, false);
        // v5 is told; 3.1.1 cannot be, and completes the flow as usual.
        let want = if version.is_v5() { ReasonCode::NotAuthorized } else { ReasonCode::Success };
        assert_eq!(reason, want, "{version:?}");
        publisher.publish("marker", "after", QoS::AtLeastOnce, false);
        sub.expect_marker_first("marker", &format!("{version:?} PUBLISH to $SYS/x"));
    }
}

#[test]
fn a_resent_qos2_duplicate_at_the_receive_maximum_is_accepted() {
    const RECEIVE_MAXIMUM: u16 = 2;
    let broker = TestBroker::start_with(|c| c.receive_maximum = RECEIVE_MAXIMUM);
    let mut peer = Peer::v5(broker.addr, &client_id_on(PUBS, "qos2"));
    let expect_pubrec = |peer: &mut Peer, id: u16| match peer.expect() {
        Packet::PubRec(rec) if rec.packet_id == pid(id) && !rec.reason.is_error() => {}
        other => panic!("expected PUBREC {id}, got {other:?}"),
    };
    // Two QoS 2 publishes await PUBREL: the Receive Maximum is reached.
    for id in 1..=RECEIVE_MAXIMUM {
        peer.send(&Packet::Publish(publish_with("q2/x", b"m", QoS::ExactlyOnce, id, vec![])));
        expect_pubrec(&mut peer, id);
    }
    // The client did not see the PUBREC for 2 and resends it: the same slot, not a new one.
    let mut resent = publish_with("q2/x", b"m", QoS::ExactlyOnce, RECEIVE_MAXIMUM, vec![]);
    resent.dup = true;
    peer.send(&Packet::Publish(resent));
    expect_pubrec(&mut peer, RECEIVE_MAXIMUM);
    // A new one is one too many.
    peer.send(&Packet::Publish(publish_with("q2/x", b"m", QoS::ExactlyOnce, RECEIVE_MAXIMUM + 1, vec![])));
    let packets = peer.until_closed();
    assert_eq!(disconnect_reason(&packets), ReasonCode::ReceiveMaximumExceeded, "{packets:?}");
}

// ---------------------------------------------------------------------------------------
// 10. Queue bytes count what a message really holds.

#[test]
fn an_offline_queue_counts_the_properties_of_its_messages() {
    const BOUND: usize = 4 << 20;
    const SENT: usize = 60;
    let broker = TestBroker::start_with(|c| {
        c.max_queued_bytes = BOUND;
        c.max_queued_messages = 100_000;
    });
    let id = client_id_on(SUBS, "acct");
    let session = || {
        let mut connect = connect_packet(ProtocolVersion::V5, &id, false);
        connect.properties = properties(vec![Property::SessionExpiryInterval(3600)]);
        connect
    };
    let (mut sub, _) = Peer::connect_with(broker.addr, session());
    sub.subscribe_granted("acct/#", QoS::AtLeastOnce);
    sub.disconnect();

    // On the subscriber's shard: each message is queued before its PUBACK.
    let mut publisher = Peer::v5(broker.addr, &client_id_on(SUBS, "acct-pub"));
    // 20,000 user properties of 7 bytes on the wire each: 140 kB a message, a 2-byte payload.
    let props: Vec<Property> = (0..20_000).map(|_| Property::UserProperty("k".into(), "v".into())).collect();
    for i in 0..SENT {
        let id = publisher.next_packet_id();
        let publish =
            publish_with("acct/big", format!("{i:02}").as_bytes(), QoS::AtLeastOnce, id.get(), props.clone());
        publisher.send(&Packet::Publish(publish));
        match publisher.expect() {
            Packet::PubAck(ack) if ack.packet_id == id && !ack.reason.is_error() => {}
            other => panic!("expected PUBACK {id}, got {other:?}"),
        }
    }
    publisher.publish("acct/marker", "end", QoS::AtLeastOnce, false);

    let accounting = broker.fresh_accounting();
    assert!(
        accounting.largest_queue_bytes <= BOUND && accounting.largest_queue_bytes > BOUND / 2,
        "largest queue {} bytes, --max-queued-bytes {BOUND}: {accounting:?}",
        accounting.largest_queue_bytes
    );

    let (mut sub, present) = Peer::connect_with(broker.addr, session());
    assert!(present);
    let seen = sub.until("acct/marker");
    let big = &seen[..seen.len() - 1];
    let wire: usize =
        big.iter().map(|p| codec::encoded_size(&Packet::Publish(p.clone()), ProtocolVersion::V5)).sum();
    assert!(
        wire <= BOUND,
        "{} of {SENT} messages kept: {wire} bytes on the wire, --max-queued-bytes {BOUND}",
        big.len()
    );
    assert!(!big.is_empty(), "nothing kept");
    for p in big {
        assert_eq!(p.properties.user_properties().count(), 20_000, "properties forwarded whole");
    }
    // The oldest went first.
    let payloads: Vec<String> = big.iter().map(helpers::text).collect();
    let want: Vec<String> = (SENT - big.len()..SENT).map(|i| format!("{i:02}")).collect();
    assert_eq!(payloads, want);
}
