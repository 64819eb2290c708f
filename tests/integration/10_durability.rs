//! Durability: retained messages and persistent sessions in the per-core logs survive a
//! restart, a SIGKILL of the real binary mid-stream (also when `--cores` changes between
//! the runs) and damaged segments; compaction keeps the logs bounded.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ringmq::codec::{self, Packet, ProtocolVersion, QoS};

use crate::common::{client_id_on, BinaryBroker, TestBroker, WAIT};
use crate::qos::helpers::{self, connect_packet, pid, Peer};

/// A fresh directory for one test's logs.
fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringmq-durability-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn durable_broker(dir: &Path, tweak: impl FnOnce(&mut ringmq::Config)) -> TestBroker {
    TestBroker::start_with(|c| {
        c.data_dir = Some(dir.to_path_buf());
        // Segments are preallocated: small ones keep the tests' disk use small.
        c.segment_size = 1 << 20;
        c.max_queued_messages = 100_000;
        tweak(c);
    })
}

/// Publishes QoS 1 messages "0", "1", … on `topic` back to back from a raw 3.1.1
/// connection, and reports each one the broker acknowledged, until the connection ends.
fn stream_qos1(addr: SocketAddr, client_id: &str, topic: &str, count: u16) -> mpsc::Receiver<u16> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut out = BytesMut::new();
    codec::encode(
        &Packet::Connect(connect_packet(ProtocolVersion::V311, client_id, true)),
        ProtocolVersion::V311,
        &mut out,
    )
    .unwrap();
    stream.write_all(&out).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = BytesMut::new();
        let mut scratch = [0u8; 65536];
        loop {
            while let Ok(Some(packet)) = codec::decode(&mut buf, ProtocolVersion::V311, usize::MAX) {
                if let Packet::PubAck(ack) = packet {
                    // Payload i went with packet identifier i + 1.
                    if tx.send(ack.packet_id.get() - 1).is_err() {
                        return;
                    }
                }
            }
            match reader.read(&mut scratch) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&scratch[..n]),
            }
        }
    });
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let mut out = BytesMut::new();
        for i in 0..count {
            let publish = Peer::publish_packet(
                &topic,
                i.to_string().as_bytes(),
                QoS::AtLeastOnce,
                false,
                Some(pid(i + 1)),
            );
            out.clear();
            codec::encode(&Packet::Publish(publish), ProtocolVersion::V311, &mut out).unwrap();
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    });
    rx
}

/// A persistent 3.1.1 subscriber on `filter` that leaves (its session stays).
fn leave_persistent_subscriber(addr: SocketAddr, client_id: &str, filter: &str) {
    let (mut sub, _) = Peer::connect_with(addr, connect_packet(ProtocolVersion::V311, client_id, false));
    sub.subscribe_granted(filter, QoS::AtLeastOnce);
    sub.disconnect();
}

/// Reconnects the persistent subscriber: its session must be present, and every payload
/// in `expected` must arrive (each acknowledged).
fn drain_persistent_subscriber(addr: SocketAddr, client_id: &str, expected: &BTreeSet<u16>) -> usize {
    let (mut sub, present) =
        Peer::connect_with(addr, connect_packet(ProtocolVersion::V311, client_id, false));
    assert!(present, "the persistent session did not survive");
    let mut seen = BTreeSet::new();
    let mut total = 0;
    while !expected.is_subset(&seen) {
        let p = sub.next_publish();
        sub.ack(&p);
        total += 1;
        let n: u16 = String::from_utf8_lossy(&p.payload).parse().expect("numeric payload");
        seen.insert(n);
    }
    total
}

fn retained_topics(addr: SocketAddr, client_id: &str, filter: &str, marker: &str) -> BTreeSet<String> {
    let mut sub = Peer::v3(addr, client_id);
    sub.subscribe_granted(filter, QoS::AtLeastOnce);
    let mut publisher = Peer::v3(addr, &format!("{client_id}-marker"));
    sub.subscribe_granted(marker, QoS::AtLeastOnce);
    publisher.publish(marker, "m", QoS::AtLeastOnce, false);
    sub.until(marker).iter().filter(|p| p.retain).map(|p| p.topic.as_str().to_string()).collect()
}

/// Kills the binary once `kill_after` messages were acknowledged, restarts it with
/// `cores_after` shards, and checks every acknowledged message and retained topic.
fn sigkill_mid_stream(name: &str, cores_after: usize) {
    let dir = data_dir(name);
    let broker = BinaryBroker::start(&dir, 2);
    let mut retainer = Peer::v3(broker.addr, &client_id_on(0, "retainer"));
    for i in 0..100 {
        let reason = retainer.publish(&format!("keep/{i}"), format!("v{i}"), QoS::AtLeastOnce, true);
        assert!(!reason.is_error());
    }
    let subscriber = client_id_on(0, "durable-sub");
    leave_persistent_subscriber(broker.addr, &subscriber, "stream/+");
    let acks = stream_qos1(broker.addr, &client_id_on(1, "streamer"), "stream/a", 60_000);
    let mut acked = BTreeSet::new();
    while acked.len() < 3_000 {
        let n = acks.recv_timeout(WAIT).expect("the broker acknowledges the stream");
        acked.insert(n);
    }
    broker.kill9();
    // Acknowledgements that were on the wire when the broker died count too.
    acked.extend(acks.iter());

    let broker = BinaryBroker::start(&dir, cores_after);
    let delivered = drain_persistent_subscriber(broker.addr, &subscriber, &acked);
    assert!(delivered >= acked.len());
    let kept = retained_topics(broker.addr, "after-restart", "keep/#", "marker/restart");
    assert_eq!(kept.len(), 100, "retained topics after restart: {kept:?}");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn acknowledged_messages_and_retained_survive_sigkill() {
    sigkill_mid_stream("sigkill", 2);
}

#[test]
fn acknowledged_messages_and_retained_survive_sigkill_and_a_core_count_change() {
    sigkill_mid_stream("sigkill-cores", 1);
}

#[test]
fn sessions_with_in_flight_and_queued_messages_survive_a_restart() {
    let dir = data_dir("restart");
    let subscriber = client_id_on(0, "resumer");
    // A v5 session persists with a Session Expiry Interval.
    let persistent = || {
        let mut connect = connect_packet(ProtocolVersion::V5, &subscriber, false);
        connect.properties.push(codec::Property::SessionExpiryInterval(3600));
        connect
    };
    let (expected, resent_first) = {
        let broker = durable_broker(&dir, |c| c.max_inflight = 5);
        let (mut sub, _) = Peer::connect_with(broker.addr, persistent());
        sub.subscribe_granted("jobs/#", QoS::ExactlyOnce);
        let mut publisher = Peer::v5(broker.addr, &client_id_on(1, "producer"));
        for i in 0..20 {
            let qos = if i % 2 == 0 { QoS::AtLeastOnce } else { QoS::ExactlyOnce };
            assert!(!publisher.publish("jobs/x", i.to_string(), qos, false).is_error());
        }
        // The window of 5 is in flight, unacknowledged; 15 wait in the queue.
        let first = sub.next_publish();
        drop(sub);
        ((0..20).map(|i: u16| i.to_string()).collect::<Vec<_>>(), first)
    };
    let broker = durable_broker(&dir, |c| c.max_inflight = 5);
    let (mut sub, present) = Peer::connect_with(broker.addr, persistent());
    assert!(present);
    let first = sub.next_publish();
    assert!(first.dup, "an in-flight message is resent with DUP");
    assert_eq!(first.packet_id, resent_first.packet_id, "with its packet identifier");
    sub.ack(&first);
    let mut payloads = vec![String::from_utf8_lossy(&first.payload).into_owned()];
    while payloads.len() < expected.len() {
        let p = sub.next_publish();
        sub.ack(&p);
        payloads.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(payloads, expected);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_segment_keeps_its_valid_records_and_the_broker_starts() {
    let dir = data_dir("damaged");
    {
        let broker = durable_broker(&dir, |_| {});
        let mut publisher = Peer::v3(broker.addr, "damager");
        for i in 0..200 {
            assert!(!publisher.publish(&format!("d/{i}"), "x", QoS::AtLeastOnce, true).is_error());
        }
    }
    // Flip bytes in the middle of shard 0's retained segment, truncate shard 1's.
    let segment = |shard: usize| {
        let seg_dir = dir.join("shards-2").join(shard.to_string()).join("retained");
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&seg_dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files.pop().expect("a segment")
    };
    let zero = segment(0);
    let mut bytes = std::fs::read(&zero).unwrap();
    let used = bytes.iter().rposition(|b| *b != 0).unwrap();
    bytes[used / 2] ^= 0x5a;
    std::fs::write(&zero, &bytes).unwrap();
    let one = segment(1);
    let used = std::fs::read(&one).unwrap().iter().rposition(|b| *b != 0).unwrap();
    std::fs::OpenOptions::new().write(true).open(&one).unwrap().set_len(used as u64 / 2).unwrap();

    let broker = durable_broker(&dir, |_| {});
    let kept = retained_topics(broker.addr, "survivor", "d/#", "marker/damaged");
    assert!(kept.len() > 20 && kept.len() < 200, "kept {} of 200", kept.len());
    // The broker takes new retained messages after the cut.
    let mut publisher = Peer::v3(broker.addr, "after-damage");
    assert!(!publisher.publish("d/new", "y", QoS::AtLeastOnce, true).is_error());
    let kept = retained_topics(broker.addr, "survivor2", "d/new", "marker/damaged2");
    assert_eq!(kept.len(), 1);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

fn segment_files(dir: &Path) -> usize {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "seg") {
                count += 1;
            }
        }
    }
    count
}

#[test]
fn compaction_keeps_the_logs_bounded_over_many_retained_updates() {
    let dir = data_dir("compaction");
    let broker = durable_broker(&dir, |c| c.segment_size = 16 * 1024);
    let mut publisher = Peer::v3(broker.addr, "updater");
    let payload = "p".repeat(100);
    let mut peak = 0;
    for round in 0..50 {
        for topic in 0..20 {
            let reason =
                publisher.publish(&format!("c/{topic}"), format!("{round}{payload}"), QoS::AtLeastOnce, true);
            assert!(!reason.is_error());
        }
        peak = peak.max(segment_files(&dir));
    }
    // About 130 KiB written over 16 KiB segments; 20 live topics fit in one per shard.
    assert!(peak >= 6, "the run should have rolled segments ({peak})");
    let deadline = Instant::now() + WAIT;
    while segment_files(&dir) > 6 {
        assert!(Instant::now() < deadline, "still {} segment files", segment_files(&dir));
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(broker);
    // What compaction kept is the latest value of every topic.
    let broker = durable_broker(&dir, |c| c.segment_size = 16 * 1024);
    let mut sub = Peer::v3(broker.addr, "checker");
    sub.subscribe_granted("c/+", QoS::AtLeastOnce);
    for _ in 0..20 {
        let p = sub.next_publish();
        sub.ack(&p);
        assert!(p.payload.starts_with(b"49"), "{:?} holds an old value", p.topic);
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_sends_server_shutting_down_flushes_and_exits_zero() {
    let dir = data_dir("sigterm");
    let broker = BinaryBroker::start(&dir, 2);
    let mut v5 = Peer::v5(broker.addr, "watcher");
    let mut retainer = Peer::v3(broker.addr, "keeper");
    assert!(!retainer.publish("kept/after-term", "v", QoS::AtLeastOnce, true).is_error());
    let status = broker.terminate();
    assert!(status.success(), "exit status {status:?}");
    match v5.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, codec::ReasonCode::ServerShuttingDown),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    let broker = BinaryBroker::start(&dir, 2);
    let kept = retained_topics(broker.addr, "term-check", "kept/#", "marker/term");
    assert_eq!(kept.len(), 1);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A v5 CONNECT resuming a session that lasts `expiry` seconds.
fn persistent_v5(client_id: &str, expiry: u32) -> ringmq::codec::Connect {
    let mut connect = connect_packet(ProtocolVersion::V5, client_id, false);
    connect.properties.push(codec::Property::SessionExpiryInterval(expiry));
    connect
}

#[test]
fn a_will_delay_and_a_session_expiry_that_fell_due_while_down_apply_at_start() {
    let dir = data_dir("due");
    let broker = BinaryBroker::start(&dir, 2);
    let watcher = client_id_on(0, "will-watcher");
    let mortal = client_id_on(1, "mortal");
    let (mut s, _) = Peer::connect_with(broker.addr, persistent_v5(&watcher, 3600));
    s.subscribe_granted("wills/#", QoS::AtLeastOnce);
    s.subscribe_granted(&format!("$SYS/broker/clients/{mortal}/disconnected"), QoS::AtMostOnce);
    let mut connect = persistent_v5(&mortal, 2);
    let mut will = helpers::will("wills/mortal", "gone", QoS::AtLeastOnce, false);
    will.properties.push(codec::Property::WillDelayInterval(1));
    connect.will = Some(will);
    let (c, _) = Peer::connect_with(broker.addr, connect);
    let gone = Instant::now();
    drop(c);
    // The event goes out after the session log recorded the disconnection.
    let event = s.next_publish();
    assert!(event.topic.as_str().ends_with("/disconnected"), "{event:?}");
    broker.kill9();
    assert!(gone.elapsed() < Duration::from_secs(1), "the broker had to stop before the will was due");
    // The will delay (1 s) and the session expiry (2 s) pass while the broker is down.
    while gone.elapsed() < Duration::from_millis(2500) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let broker = BinaryBroker::start(&dir, 2);
    let (mut s, present) = Peer::connect_with(broker.addr, persistent_v5(&watcher, 3600));
    assert!(present);
    let will = s.next_publish();
    assert_eq!((will.topic.as_str(), &will.payload[..]), ("wills/mortal", &b"gone"[..]));
    s.ack(&will);
    let (_, present) = Peer::connect_with(broker.addr, persistent_v5(&mortal, 2));
    assert!(!present, "the session expired while the broker was down");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_broker_on_the_same_data_directory_is_refused() {
    let dir = data_dir("locked");
    let first = durable_broker(&dir, |_| {});
    let mut config = ringmq::Config::new("127.0.0.1:0".parse().unwrap());
    config.cores = 1;
    config.io_memory = 512 * 1024;
    config.data_dir = Some(dir.clone());
    match ringmq::start(config, ringmq::Shutdown::new()) {
        Err(err) => assert!(err.to_string().contains("in use by another running broker"), "{err}"),
        Ok(_) => panic!("two brokers appending to one data directory"),
    }
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether acknowledgements wait for the flush cannot be seen from here (a clean stop
/// flushes everything): `server::tests` holds flush jobs and checks that. This checks that
/// every QoS 1/2 flow completes under `--fsync always` and what was acknowledged is back.
#[test]
fn with_fsync_always_every_flow_completes_and_everything_is_back() {
    let dir = data_dir("fsync-always");
    let always = |c: &mut ringmq::Config| c.fsync = ringmq::config::FsyncMode::Always;
    let subscriber = client_id_on(0, "flushed-sub");
    {
        let broker = durable_broker(&dir, always);
        leave_persistent_subscriber(broker.addr, &subscriber, "flushed/+");
        let mut publisher = Peer::v5(broker.addr, &client_id_on(1, "flusher"));
        for i in 0..100u16 {
            // QoS 2 ends with PUBCOMP, which waits for the released identifier's flush too.
            let qos = if i % 2 == 0 { QoS::AtLeastOnce } else { QoS::ExactlyOnce };
            assert_eq!(publisher.publish("flushed/x", i.to_string(), qos, false), codec::ReasonCode::Success);
        }
    }
    let broker = durable_broker(&dir, always);
    let expected: BTreeSet<u16> = (0..100).collect();
    assert_eq!(drain_persistent_subscriber(broker.addr, &subscriber, &expected), 100);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The log directory of one shard of a 2-shard broker: `retained` or `sessions`.
fn shard_log(dir: &Path, shard: usize, kind: &str) -> PathBuf {
    dir.join("shards-2").join(shard.to_string()).join(kind)
}

/// Makes the next segment of a log impossible to create: a directory takes its name, so
/// opening it for writing fails (EISDIR, also for root). Returns the blocker.
fn block_next_segment(log_dir: &Path) -> PathBuf {
    let last = std::fs::read_dir(log_dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".seg")?.parse::<u64>().ok())
        .max()
        .expect("a segment");
    let blocker = log_dir.join(format!("{:020}.seg", last + 1));
    std::fs::create_dir(&blocker).unwrap();
    blocker
}

/// Segments of this size fill after a few of `publish_until_closed`'s messages.
const SMALL_SEGMENT: usize = 64 * 1024;

/// Publishes messages of 4000 bytes one at a time (payload: the index, zero-padded) until
/// the broker closes the connection. Returns the indices acknowledged (QoS 2: completed)
/// and the reason of the DISCONNECT that came first, if any.
fn publish_until_closed(
    peer: &mut Peer,
    topic: impl Fn(u16) -> String,
    qos: QoS,
    retain: bool,
) -> (Vec<u16>, Option<codec::ReasonCode>) {
    let mut acked = Vec::new();
    for i in 0..200u16 {
        let id = peer.next_packet_id();
        let payload = format!("{i:04000}");
        peer.send(&Packet::Publish(Peer::publish_packet(
            &topic(i),
            payload.as_bytes(),
            qos,
            retain,
            Some(id),
        )));
        match peer.recv() {
            Some(Packet::PubAck(ack)) if ack.packet_id == id && qos == QoS::AtLeastOnce => {
                assert!(!ack.reason.is_error(), "{ack:?}");
            }
            Some(Packet::PubRec(rec)) if rec.packet_id == id && qos == QoS::ExactlyOnce => {
                assert!(!rec.reason.is_error(), "{rec:?}");
                peer.send(&Packet::PubRel(helpers::ack(id)));
                match peer.recv() {
                    Some(Packet::PubComp(comp)) if comp.packet_id == id => {}
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
            }
            Some(Packet::Disconnect(d)) => {
                assert!(peer.recv().is_none(), "the connection ends after DISCONNECT");
                return (acked, Some(d.reason));
            }
            None => return (acked, None),
            other => panic!("unexpected {other:?}"),
        }
        acked.push(i);
    }
    panic!("200 publishes of 4000 bytes acknowledged although the log could not grow past {SMALL_SEGMENT}");
}

/// A persistent subscriber on shard 0 whose session log cannot grow: a publisher on
/// `publisher_shard` is disconnected without the acknowledgement of the message the log
/// could not take; every message acknowledged before is back after a restart.
fn a_full_session_log_withholds_the_acknowledgement(
    name: &str,
    publisher_shard: usize,
    version: ProtocolVersion,
) {
    let dir = data_dir(name);
    let small = |c: &mut ringmq::Config| c.segment_size = SMALL_SEGMENT;
    let subscriber = client_id_on(0, "full-sub");
    let broker = durable_broker(&dir, small);
    leave_persistent_subscriber(broker.addr, &subscriber, "full/+");
    let blocker = block_next_segment(&shard_log(&dir, 0, "sessions"));
    let connect = connect_packet(version, &client_id_on(publisher_shard, "full-pub"), true);
    let (mut publisher, _) = Peer::connect_with(broker.addr, connect);
    let (acked, reason) = publish_until_closed(&mut publisher, |_| "full/x".into(), QoS::AtLeastOnce, false);
    assert!(!acked.is_empty(), "the segment had room for some");
    let expected_reason = version.is_v5().then_some(codec::ReasonCode::UnspecifiedError);
    assert_eq!(reason, expected_reason);
    std::fs::remove_dir(&blocker).unwrap();
    drop(broker);
    let broker = durable_broker(&dir, small);
    drain_persistent_subscriber(broker.addr, &subscriber, &acked.into_iter().collect());
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_session_log_append_on_a_peer_shard_withholds_the_puback() {
    a_full_session_log_withholds_the_acknowledgement("full-sessions-peer", 1, ProtocolVersion::V311);
}

#[test]
fn a_failed_session_log_append_on_the_publishers_shard_withholds_the_puback() {
    a_full_session_log_withholds_the_acknowledgement("full-sessions-local", 0, ProtocolVersion::V5);
}

/// 200 retained topics `full/…` that shard 0 of two owns.
fn topics_on_shard_0() -> Vec<String> {
    (0..)
        .map(|i| format!("full/{i}"))
        .filter(|t| ringmq::broker::placement::owner(t, 2) == 0)
        .take(200)
        .collect()
}

/// Shard 0's retained log cannot grow: a retained publish from `publisher_shard` is not
/// acknowledged; every retained message acknowledged before is back after a restart.
fn a_full_retained_log_withholds_the_acknowledgement(
    name: &str,
    publisher_shard: usize,
    version: ProtocolVersion,
    qos: QoS,
) {
    let dir = data_dir(name);
    let small = |c: &mut ringmq::Config| c.segment_size = SMALL_SEGMENT;
    let topics = topics_on_shard_0();
    let broker = durable_broker(&dir, small);
    let blocker = block_next_segment(&shard_log(&dir, 0, "retained"));
    let connect = connect_packet(version, &client_id_on(publisher_shard, "full-retainer"), true);
    let (mut publisher, _) = Peer::connect_with(broker.addr, connect);
    let (acked, reason) = publish_until_closed(&mut publisher, |i| topics[i as usize].clone(), qos, true);
    assert!(!acked.is_empty(), "the segment had room for some");
    let expected_reason = version.is_v5().then_some(codec::ReasonCode::UnspecifiedError);
    assert_eq!(reason, expected_reason);
    std::fs::remove_dir(&blocker).unwrap();
    drop(broker);
    let broker = durable_broker(&dir, small);
    let kept = retained_topics(broker.addr, "full-check", "full/#", "marker/full");
    for i in acked {
        assert!(kept.contains(&topics[i as usize]), "acknowledged retained {} lost", topics[i as usize]);
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_retained_log_append_on_a_peer_shard_withholds_the_puback() {
    a_full_retained_log_withholds_the_acknowledgement(
        "full-retained-peer",
        1,
        ProtocolVersion::V311,
        QoS::AtLeastOnce,
    );
}

#[test]
fn a_failed_retained_log_append_on_the_publishers_shard_withholds_the_pubrec() {
    a_full_retained_log_withholds_the_acknowledgement(
        "full-retained-local",
        0,
        ProtocolVersion::V5,
        QoS::ExactlyOnce,
    );
}

/// A QoS 2 publish a peer shard could not log is not treated as received: resent (after a
/// reconnection that resumes the session), it is routed again, and refused again while the
/// log still cannot grow, instead of getting a PUBREC for a message that is in no log.
#[test]
fn a_refused_qos2_publish_is_routed_again_when_resent() {
    let dir = data_dir("full-qos2-resent");
    let small = |c: &mut ringmq::Config| c.segment_size = SMALL_SEGMENT;
    let topics = topics_on_shard_0();
    let broker = durable_broker(&dir, small);
    block_next_segment(&shard_log(&dir, 0, "retained"));
    let publisher = client_id_on(1, "full-resender");
    let connect = || connect_packet(ProtocolVersion::V311, &publisher, false);
    let (mut peer, _) = Peer::connect_with(broker.addr, connect());
    let (acked, _) = publish_until_closed(&mut peer, |i| topics[i as usize].clone(), QoS::ExactlyOnce, true);
    // Publishes went one at a time with identifiers 1, 2, …: the refused one is next.
    let refused = acked.len() as u16;
    let (mut peer, present) = Peer::connect_with(broker.addr, connect());
    assert!(present);
    let mut resend = Peer::publish_packet(
        &topics[refused as usize],
        format!("{refused:04000}").as_bytes(),
        QoS::ExactlyOnce,
        true,
        Some(pid(refused + 1)),
    );
    resend.dup = true;
    peer.send(&Packet::Publish(resend));
    match peer.recv() {
        None => {}
        other => panic!("the resent publish was not routed again: {other:?}"),
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Start-up (issue 10, item 8): a shard that finished replaying must not accept a client
/// before another shard, still replaying a large log, has told it of its subscriptions: a
/// publisher connecting the moment the port opens would be acknowledged, and its messages
/// lost for the persistent subscriber on the slow shard.
#[test]
fn a_publisher_connecting_as_the_port_opens_loses_nothing_while_another_shard_replays() {
    let dir = data_dir("startup-race");
    let subscriber = client_id_on(1, "race-sub");
    {
        let broker = BinaryBroker::start(&dir, 2);
        leave_persistent_subscriber(broker.addr, &subscriber, "race/t");
        assert!(broker.terminate().success());
    }
    // Shard 1's retained log grows large enough that its replay takes a while; shard 0's
    // stays small.
    {
        let budget = std::sync::Arc::new(ringmq::broker::retained::RetainedBudget::default());
        let (mut log, _) =
            ringmq::storage::RetainedLog::open(&shard_log(&dir, 1, "retained"), 1 << 20, 0.5, budget)
                .expect("log opens");
        use ringmq::broker::retained::RetainedStore;
        for i in 0..200_000 {
            let message = ringmq::broker::message::Message::new(
                ringmq::topic::TopicName::new(format!("slow/{i}")).unwrap(),
                bytes::Bytes::from_static(b"retained payload"),
                QoS::AtMostOnce,
                true,
                &Default::default(),
            );
            log.set(message).expect("stored");
        }
        if let Some(job) = log.take_flush() {
            job.run().expect("flushed");
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = BinaryBroker::spawn(&dir, 2, addr);
    // Connect the moment the port opens (retrying every millisecond), publish at once.
    let deadline = Instant::now() + WAIT * 3;
    let stream = loop {
        if let Ok(stream) = TcpStream::connect(addr) {
            break stream;
        }
        assert!(Instant::now() < deadline, "the broker never listened");
        std::thread::sleep(Duration::from_millis(1));
    };
    drop(stream);
    let acks = stream_qos1(addr, &client_id_on(0, "race-pub"), "race/t", 50);
    let acked: BTreeSet<u16> = (0..50).map(|_| acks.recv_timeout(WAIT).expect("acknowledged")).collect();
    assert_eq!(acked.len(), 50);
    drain_persistent_subscriber(addr, &subscriber, &acked);
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An offline persistent session owed far more than its in-memory queue holds (100 here):
/// the rest stays in its log only, is still there after a restart, and streams back in
/// order under the client's window. (Before, the queue's bound dropped all but the last
/// 100, although every one had been acknowledged to the publisher.)
#[test]
fn an_offline_queue_past_its_memory_bound_lives_in_the_log_and_streams_back_in_order() {
    const N: usize = 3_000;
    let dir = data_dir("spill");
    let subscriber = client_id_on(0, "far-behind");
    let small_queue = |c: &mut ringmq::Config| {
        c.max_queued_messages = 100;
        c.max_inflight = 8;
    };
    {
        let broker = durable_broker(&dir, small_queue);
        leave_persistent_subscriber(broker.addr, &subscriber, "spill/+");
        let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "spill-pub"));
        publisher.publish_burst("spill/a", N);
        let accounting = broker.fresh_accounting();
        assert!(
            accounting.queued_bytes < 100 * 1024,
            "{} bytes queued in memory for {N} messages owed",
            accounting.queued_bytes
        );
    }
    let broker = durable_broker(&dir, small_queue);
    let (mut sub, present) =
        Peer::connect_with(broker.addr, connect_packet(ProtocolVersion::V311, &subscriber, false));
    assert!(present);
    assert_in_order(&mut sub, N);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A session owed spilled messages, resumed with a Session Expiry Interval of 0: it keeps
/// its log until it ends, and every message arrives.
#[test]
fn a_spilled_session_resumed_without_expiry_still_gets_every_message() {
    const N: usize = 500;
    let dir = data_dir("spill-resume");
    let subscriber = client_id_on(0, "short-lived");
    let broker = durable_broker(&dir, |c| c.max_queued_messages = 50);
    let (mut sub, _) = Peer::connect_with(broker.addr, persistent_v5(&subscriber, 3600));
    sub.subscribe_granted("resume/+", QoS::AtLeastOnce);
    sub.disconnect();
    Peer::v3(broker.addr, &client_id_on(1, "resume-pub")).publish_burst("resume/a", N);
    let (mut sub, present) = Peer::connect_with(broker.addr, persistent_v5(&subscriber, 0));
    assert!(present);
    assert_in_order(&mut sub, N);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Receives and acknowledges `n` PUBLISHes: their payloads must be "0", "1", … in order.
fn assert_in_order(sub: &mut Peer, n: usize) {
    let mut payloads = Vec::with_capacity(n);
    while payloads.len() < n {
        let p = sub.next_publish();
        sub.ack(&p);
        payloads.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(payloads, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
}

/// Bytes of the files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => bytes_under(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

/// `--max-disk-bytes`: an offline persistent session owed more than the directory may hold
/// stops growing the log at the bound (the slow consumer pays: its newer messages are
/// dropped, counted); what it was given arrives, in order. (Without the bound, all 3 MB
/// went to the log.)
#[test]
fn at_the_disk_bound_an_offline_session_stops_growing_the_log() {
    const N: usize = 3_000;
    const SEGMENT: usize = 64 * 1024;
    const BOUND: u64 = 2 * 512 * 1024;
    let dir = data_dir("disk-bound");
    let subscriber = client_id_on(0, "bounded");
    let broker = durable_broker(&dir, |c| {
        c.segment_size = SEGMENT;
        c.max_disk_bytes = BOUND;
        c.max_queued_messages = 20;
    });
    let baseline = bytes_under(&dir);
    leave_persistent_subscriber(broker.addr, &subscriber, "bound/t");
    let payload = |i: usize| format!("{i} {}", "x".repeat(1000));
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "bound-pub"));
    for i in 0..N {
        assert_eq!(
            publisher.publish("bound/t", payload(i), QoS::AtLeastOnce, false),
            codec::ReasonCode::Success
        );
    }
    let used = bytes_under(&dir);
    assert!(
        used <= BOUND + baseline + 2 * SEGMENT as u64,
        "{used} bytes on disk for a bound of {BOUND} (and {baseline} at start)"
    );
    let (mut sub, present) =
        Peer::connect_with(broker.addr, connect_packet(ProtocolVersion::V311, &subscriber, false));
    assert!(present);
    // The oldest ones, in order, up to what the bound held.
    let mut got = 0;
    loop {
        let before = got;
        for packet in sub.ping() {
            let Packet::Publish(p) = packet else { continue };
            assert_eq!(String::from_utf8_lossy(&p.payload), payload(got));
            sub.ack(&p);
            got += 1;
        }
        if got == before {
            break;
        }
    }
    assert!(got > 20 && got < N, "{got} of {N} delivered");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
