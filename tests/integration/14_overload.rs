//! Overload: subscribers keep being served while publishers send faster than the broker
//! can deliver.

use std::io::{ErrorKind, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ringmq::codec::{self, Packet, ProtocolVersion, QoS};

use crate::common::{client_id_on, TestBroker};
use crate::qos::helpers::Peer;

const PUBLISHERS: usize = 4;
const BATCH: usize = 1000;
const BATCHES: usize = 50;

/// Four publishers flood QoS 0 without pause (each write as soon as the broker read the
/// last); one subscriber reads all it can. Before a reader let the subscriber's writer in
/// when it overflowed the subscriber's outbox, the publishers' readers kept the core for
/// whole time slices and the subscriber got about one message in twenty.
/// (With `--qos0-overflow drop`, where what overflows the outbox is dropped: by default it
/// is not, see the next test.)
#[test]
fn a_qos0_subscriber_is_served_while_publishers_flood() {
    // An outbox a reader's time slice overflows many times over, in a debug build too.
    let broker = TestBroker::start_with(|c| {
        c.write_buffer = 16 * 1024;
        c.qos0_overflow = ringmq::config::Qos0Overflow::Drop;
    });
    // Everyone on one shard: the contest between readers and the writer is on one core.
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "flood-sub"));
    sub.subscribe_granted("flood/#", QoS::AtMostOnce);
    let flooded = Arc::new(AtomicBool::new(false));
    let reader = {
        let flooded = flooded.clone();
        std::thread::spawn(move || count_until_quiet(sub, &flooded))
    };
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|i| {
            let (addr, id) = (broker.addr, client_id_on(0, &format!("flood-pub-{i}")));
            std::thread::spawn(move || {
                let mut publisher = Peer::v3(addr, &id);
                let mut batch = BytesMut::new();
                let publish =
                    Peer::publish_packet(&format!("flood/{i}"), &[7u8; 48], QoS::AtMostOnce, false, None);
                for _ in 0..BATCH {
                    codec::encode(&Packet::Publish(publish.clone()), ProtocolVersion::V311, &mut batch)
                        .unwrap();
                }
                for _ in 0..BATCHES {
                    publisher.raw.send_bytes(&batch);
                }
                // Answered after everything before it was read and routed.
                publisher.send(&Packet::PingReq);
                assert!(matches!(publisher.expect(), Packet::PingResp));
            })
        })
        .collect();
    for publisher in publishers {
        publisher.join().unwrap();
    }
    flooded.store(true, Ordering::Relaxed);
    let received = reader.join().unwrap();
    let sent = PUBLISHERS * BATCH * BATCHES;
    assert!(received * 2 >= sent, "the subscriber got {received} of {sent} QoS 0 messages");
}

/// At the default flags a QoS 0 subscriber slower than its publishers loses nothing: what
/// its outbox cannot take waits in its queue, and the queue's bound holds the publishers
/// (on its core and, through the mesh, on the other) until it drained. Dropped at the full
/// outbox, they left gaps here.
#[test]
fn qos0_publishers_wait_for_a_slow_subscriber_by_default() {
    const N: usize = 20_000;
    let broker = TestBroker::start_with(|c| {
        c.write_buffer = 16 * 1024;
        // A debug-build reader among parallel tests may take longer than the default
        // `--qos0-max-wait-ms` to drain a quarter of its queue; the bound has its own test.
        c.qos0_max_wait = Duration::from_secs(10);
    });
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "qos0-slow-sub"));
    sub.subscribe_granted("qos0-slow/#", QoS::AtMostOnce);
    let subscriber = std::thread::spawn(move || {
        let mut next = [0usize; PUBLISHERS];
        for _ in 0..N * PUBLISHERS {
            // Reads 4 KiB at a time and decodes one by one: slower than the publishers.
            let p = sub.next_publish();
            let i: usize = p.topic.as_str()["qos0-slow/".len()..].parse().unwrap();
            let n: usize = String::from_utf8_lossy(&p.payload).parse().unwrap();
            assert_eq!(n, next[i], "publisher {i}: message {n} after {}", next[i]);
            next[i] += 1;
        }
        next
    });
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|i| {
            // Half of them on the other core.
            let (addr, id) = (broker.addr, client_id_on(i % 2, &format!("qos0-slow-pub-{i}")));
            std::thread::spawn(move || {
                let mut publisher = Peer::v3(addr, &id);
                let mut batch = BytesMut::new();
                for n in 0..N {
                    let publish = Peer::publish_packet(
                        &format!("qos0-slow/{i}"),
                        n.to_string().as_bytes(),
                        QoS::AtMostOnce,
                        false,
                        None,
                    );
                    codec::encode(&Packet::Publish(publish), ProtocolVersion::V311, &mut batch).unwrap();
                    if batch.len() > 32 * 1024 {
                        publisher.raw.send_bytes(&batch.split());
                    }
                }
                publisher.raw.send_bytes(&batch);
            })
        })
        .collect();
    for publisher in publishers {
        publisher.join().unwrap();
    }
    assert_eq!(subscriber.join().expect("every message arrives, in order"), [N; PUBLISHERS]);
}

/// Counts PUBLISHes until, once `flooded`, a PINGREQ's answer shows nothing more is queued.
fn count_until_quiet(mut sub: Peer, flooded: &AtomicBool) -> usize {
    sub.raw.stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = BytesMut::new();
    let mut scratch = vec![0u8; 64 * 1024];
    let (mut received, mut pinged) = (0, false);
    loop {
        while let Some(packet) = codec::decode(&mut buf, ProtocolVersion::V311, usize::MAX).unwrap() {
            match packet {
                Packet::Publish(_) => received += 1,
                Packet::PingResp => return received,
                other => panic!("unexpected {other:?}"),
            }
        }
        match sub.raw.stream.read(&mut scratch) {
            Ok(0) => panic!("the broker closed the subscriber"),
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // The read timeout only lets the flag be checked; the PINGRESP ends it.
                if flooded.load(Ordering::Relaxed) && !pinged {
                    pinged = true;
                    sub.send(&Packet::PingReq);
                }
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// Publishers on each core feed a subscriber on the other, faster than it drains, with a
/// short queue between the cores (`--mesh-backlog`). When every reader of a core paused
/// while that core's queue to its peer was backlogged, a subscriber's acknowledgements
/// went unread with the rest: its queue stayed full, so its core's receiver waited for
/// it, so the peer's queue backlogged too, and both directions stalled until the
/// slow-consumer timeout. Now only readers that forwarded something pause.
#[test]
fn crossed_back_pressure_between_cores_does_not_stall_subscribers() {
    // More than a channel between two cores holds (128 batches of up to 256 messages), so
    // the queue in front of it backlogs.
    const N: usize = 50_000;
    let broker = TestBroker::start_with(|c| {
        c.max_inflight = 2;
        c.max_queued_messages = 10;
        c.mesh_backlog = 16;
        // Longer than the test's waits: only not stalling passes.
        c.slow_consumer_timeout = Duration::from_secs(600);
    });
    let subscribers: Vec<_> = [0, 1]
        .into_iter()
        .map(|shard| {
            let mut sub = Peer::v3(broker.addr, &client_id_on(shard, &format!("crossed-sub-{shard}")));
            sub.subscribe_granted(&format!("crossed/{shard}"), QoS::AtLeastOnce);
            std::thread::spawn(move || {
                (0..N)
                    .map(|_| {
                        let p = sub.next_publish();
                        sub.ack(&p);
                        String::from_utf8_lossy(&p.payload).into_owned()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let publishers: Vec<_> = [0, 1]
        .into_iter()
        .map(|shard| {
            // On the other core than the subscriber it feeds.
            let (addr, id) = (broker.addr, client_id_on(1 - shard, &format!("crossed-pub-{shard}")));
            std::thread::spawn(move || Peer::v3(addr, &id).publish_burst(&format!("crossed/{shard}"), N))
        })
        .collect();
    for publisher in publishers {
        publisher.join().expect("every PUBACK arrives");
    }
    let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    for (shard, subscriber) in subscribers.into_iter().enumerate() {
        assert_eq!(subscriber.join().expect("subscriber"), want, "subscriber on core {shard}");
    }
}

/// A QoS 0 subscriber that never reads holds QoS 0 publishers for at most
/// `--qos0-max-wait-ms` per message, then pays (what it cannot take is dropped for it): a
/// publisher to a topic it also matches goes on, and a subscriber that reads gets every
/// message, in order. (Held until the slow-consumer timeout, the publisher stalled here.)
#[test]
fn a_qos0_subscriber_that_never_reads_holds_qos0_publishers_only_briefly() {
    // 20 MB: more than the never-reading client's socket buffers take.
    const N: usize = 20_000;
    let payload = |n: usize| format!("{n} {}", "x".repeat(1000));
    let broker = TestBroker::start_with(|c| {
        c.write_buffer = 16 * 1024;
        c.max_queued_messages = 100;
        // Far beyond the test's waits: only the QoS 0 wait's bound lets the publisher go on.
        c.slow_consumer_timeout = Duration::from_secs(600);
    });
    let mut mute = Peer::v3(broker.addr, &client_id_on(0, "never-reads"));
    mute.subscribe_granted("brief/#", QoS::AtMostOnce);
    mute.raw.stream.set_read_timeout(None).unwrap();
    let mut reader = Peer::v3(broker.addr, &client_id_on(1, "reads"));
    reader.subscribe_granted("brief/t", QoS::AtMostOnce);
    let subscriber = std::thread::spawn(move || {
        for n in 0..N {
            let p = reader.next_publish();
            assert_eq!(String::from_utf8_lossy(&p.payload), payload(n));
        }
    });
    let mut publisher = Peer::v3(broker.addr, &client_id_on(0, "brief-pub"));
    let mut batch = BytesMut::new();
    for n in 0..N {
        let publish = Peer::publish_packet("brief/t", payload(n).as_bytes(), QoS::AtMostOnce, false, None);
        codec::encode(&Packet::Publish(publish), ProtocolVersion::V311, &mut batch).unwrap();
    }
    publisher.raw.send_bytes(&batch);
    // Answered once every PUBLISH before it was read and routed.
    publisher.send(&Packet::PingReq);
    assert!(matches!(publisher.expect(), Packet::PingResp));
    subscriber.join().expect("the reading subscriber gets every message, in order");
    drop(mute);
}
