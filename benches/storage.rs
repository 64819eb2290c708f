//! The durability logs: append throughput, and how long a restart takes to read them back.
//!
//! - `append`: records of 100 B and 1 KiB appended to one `Log` (segments growing to
//!   64 MiB), i.e. the copy into the page cache plus CRC32C; no flush.
//! - `retained set`: `RetainedLog::set` of 64 B retained messages on distinct topics
//!   (encode, append, index, in-memory map).
//! - `recover retained`: 1,000,000 retained messages written in the broker's layout for 2
//!   shards, then both shards' logs opened in parallel (as the broker starts): median of 3.
//! - `recover sessions`: 10,000 persistent sessions with 100 queued QoS 1 messages each in
//!   one shard's session log, opened (replay and index).
//!
//! `STORAGE_SCALE` (default 1.0) multiplies every count. `STORAGE_KEEP=1` keeps the
//! 2-shard data directory and prints its path, to time the real binary on it:
//! `target/release/ringmq --cores 2 --data-dir <path>` logs per shard what it recovered
//! and in how many milliseconds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringmq::broker::message::Message;
use ringmq::broker::placement;
use ringmq::broker::retained::RetainedStore;
use ringmq::broker::session::Subscription;
use ringmq::codec::{ProtocolVersion, QoS, SubscriptionOptions};
use ringmq::storage::layout::Layout;
use ringmq::storage::log::Log;
use ringmq::storage::{RetainedLog, SessionLog};
use ringmq::topic::{TopicFilter, TopicName};

const SEGMENT: usize = 64 * 1024 * 1024;

fn scale(n: usize) -> usize {
    let factor: f64 = std::env::var("STORAGE_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * factor) as usize).max(1)
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringmq-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn retained(topic: String, payload: &'static [u8]) -> Message {
    Message {
        topic: TopicName::new_allow_empty(topic).expect("valid topic"),
        payload: Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Default::default(),
        expires_at: None,
        pinned: 0,
        born: Default::default(),
        id: Default::default(),
    }
}

fn report(what: &str, count: usize, elapsed: Duration, bytes: Option<usize>) {
    let rate = count as f64 / elapsed.as_secs_f64();
    let mb = bytes.map_or(String::new(), |b| format!(", {:.0} MB/s", b as f64 / elapsed.as_secs_f64() / 1e6));
    println!("{what:<40} {count:>10} in {:>8.1} ms = {rate:>12.0}/s{mb}", elapsed.as_secs_f64() * 1e3);
}

fn append(size: usize, count: usize) {
    let dir = fresh_dir(&format!("append-{size}"));
    let (mut log, _) = Log::open(&dir, SEGMENT, |_, _| {}).expect("log opens");
    let payload = vec![0xa5u8; size];
    let started = Instant::now();
    for _ in 0..count {
        log.append(&payload).expect("append");
    }
    report(&format!("append {size} B"), count, started.elapsed(), Some(count * size));
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

fn retained_set(count: usize) {
    let dir = fresh_dir("retained-set");
    let (mut store, _) = RetainedLog::open(&dir, SEGMENT, 0.5, Default::default()).expect("opens");
    let started = Instant::now();
    for i in 0..count {
        store
            .set(retained(
                format!("r/{}/{i}", i % 1000),
                b"retained-payload-of-sixty-four-bytes-0123456789abcdefghijklmnopq",
            ))
            .expect("set");
    }
    report("retained set (64 B payload)", count, started.elapsed(), None);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `count` retained messages into a 2-shard data directory, each with its owner.
fn populate_retained(root: &Path, count: usize) {
    let layout = Layout::new(root, 2);
    let mut shards: Vec<RetainedLog> = (0..2)
        .map(|s| {
            RetainedLog::open(&layout.retained_dir(s), SEGMENT, 0.5, Default::default()).expect("opens").0
        })
        .collect();
    for i in 0..count {
        let topic = format!("sensors/{}/{}/value", i % 1000, i);
        let owner = placement::owner(&topic, 2);
        shards[owner]
            .set(retained(topic, b"{\"t\":21.5,\"unit\":\"C\",\"ok\":true,\"seq\":1234567890}"))
            .expect("set");
    }
    for mut shard in shards {
        if let Some(job) = shard.take_flush() {
            job.run().expect("flush");
        }
    }
}

fn recover_retained(count: usize) {
    let root = fresh_dir("recover-retained");
    let started = Instant::now();
    populate_retained(&root, count);
    report("populate retained (2 shards)", count, started.elapsed(), None);
    let layout = Layout::new(&root, 2);
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let total: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|s| {
                    let dir = layout.retained_dir(s);
                    scope.spawn(move || {
                        RetainedLog::open(&dir, SEGMENT, 0.5, Default::default()).expect("opens").0.len()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("joins")).sum()
        });
        assert_eq!(total, count);
        times.push(started.elapsed());
    }
    times.sort();
    report("recover retained (2 shards in parallel)", count, times[1], None);
    if std::env::var("STORAGE_KEEP").is_ok_and(|v| v == "1") {
        println!("kept the data directory: {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
}

fn recover_sessions(sessions: usize, per_session: usize) {
    let dir = fresh_dir("recover-sessions");
    let (mut log, _, _) = SessionLog::open(&dir, SEGMENT, 0.5).expect("opens");
    let filter = TopicFilter::new(Bytes::from_static(b"devices/+/cmd")).expect("filter");
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    };
    let message = retained("devices/7/cmd".into(), b"command-payload-0123456789abcdef");
    let started = Instant::now();
    for s in 0..sessions {
        let id = log.session_opened(&format!("device-{s}"), ProtocolVersion::V311, u32::MAX, None, None);
        log.subscribe(
            id,
            &filter,
            &Subscription { options, identifier: None, acl: ringmq::auth::AclMark::OPEN },
        );
        for _ in 0..per_session {
            log.message(id, QoS::AtLeastOnce, false, &[], &message);
        }
        log.offline(id, u32::MAX, false);
    }
    report("session log writes (messages)", sessions * per_session, started.elapsed(), None);
    drop(log);
    let started = Instant::now();
    let (_, recovered, _) = SessionLog::open(&dir, SEGMENT, 0.5).expect("opens");
    let messages: usize = recovered.iter().map(|s| s.messages.len()).sum();
    assert_eq!(recovered.len(), sessions);
    report("recover sessions (messages)", messages, started.elapsed(), None);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    println!("# ringmq storage benchmarks (STORAGE_SCALE multiplies counts)");
    append(100, scale(2_000_000));
    append(1024, scale(500_000));
    retained_set(scale(1_000_000));
    recover_retained(scale(1_000_000));
    recover_sessions(scale(10_000), 100);
}
