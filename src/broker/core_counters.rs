//! Counters of the messages this core sent and dropped, and a sampled publish→deliver
//! latency: kept per thread (a shard is one thread), so counting is a plain add in the
//! core's own memory, with no lock, no atomic and no pointer to carry into the session
//! state machines. The shard reads them when asked for its metrics.

use std::cell::{Cell, RefCell};
use std::sync::OnceLock;
use std::time::Instant;

use crate::codec::QoS;

/// One message in this many is stamped when it arrives, and its delivery timed.
const SAMPLE_EVERY: u32 = 128;

struct CoreCounters {
    sent: [Cell<u64>; 3],
    dropped: [Cell<u64>; DropReason::ALL.len()],
    /// Messages arrived since the last stamped one.
    unsampled: Cell<u32>,
    latency: RefCell<Option<Box<LatencyHistogram>>>,
}

thread_local! {
    static CORE: CoreCounters = const {
        CoreCounters {
            sent: [Cell::new(0), Cell::new(0), Cell::new(0)],
            dropped: [
                Cell::new(0), Cell::new(0), Cell::new(0), Cell::new(0),
                Cell::new(0), Cell::new(0), Cell::new(0), Cell::new(0), Cell::new(0),
            ],
            unsampled: Cell::new(0),
            latency: RefCell::new(None),
        }
    };
}

/// A PUBLISH went into a connection's outbox.
pub fn sent(qos: QoS) {
    CORE.with(|c| {
        let cell = &c.sent[qos as usize];
        cell.set(cell.get() + 1);
    });
}

/// A message was given up, for `reason`.
pub fn dropped(reason: DropReason) {
    dropped_n(reason, 1);
}

pub fn dropped_n(reason: DropReason, n: u64) {
    CORE.with(|c| {
        let cell = &c.dropped[reason as usize];
        cell.set(cell.get() + n);
    });
}

/// The process's time origin for stamps: the same on every core.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A stamp for a message arriving now: microseconds since the epoch (never 0) for one
/// message in [`SAMPLE_EVERY`], 0 (not timed) for the others.
pub fn stamp() -> u32 {
    CORE.with(|c| {
        let n = c.unsampled.get() + 1;
        if n < SAMPLE_EVERY {
            c.unsampled.set(n);
            return 0;
        }
        c.unsampled.set(0);
        (epoch().elapsed().as_micros() as u32).max(1)
    })
}

/// A message stamped `born` (see [`stamp`]) was delivered: its time since then is
/// recorded. Stamps wrap every 71 minutes; a delivery that late is recorded short.
pub fn delivered(born: u32) {
    if born == 0 {
        return;
    }
    let now = (epoch().elapsed().as_micros() as u32).max(1);
    let micros = u64::from(now.wrapping_sub(born));
    CORE.with(|c| c.latency.borrow_mut().get_or_insert_with(Box::default).record(micros));
}

/// This core's counts so far: sent per QoS, dropped per [`DropReason::ALL`], the latency
/// histogram.
pub fn read() -> ([u64; 3], [u64; DropReason::ALL.len()], LatencyHistogram) {
    CORE.with(|c| {
        let sent = [c.sent[0].get(), c.sent[1].get(), c.sent[2].get()];
        let mut dropped = [0; DropReason::ALL.len()];
        for (out, cell) in dropped.iter_mut().zip(&c.dropped) {
            *out = cell.get();
        }
        let latency = c.latency.borrow().as_deref().cloned().unwrap_or_default();
        (sent, dropped, latency)
    })
}

/// Why messages were dropped, in the order of `ShardMetrics::dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A session's queue (or its spill to the log) was at its bound.
    QueueFull,
    /// Its Message Expiry Interval passed before it could be sent.
    Expired,
    /// Larger than the receiving client's Maximum Packet Size.
    TooLarge,
    /// Published where no subscription matched.
    NoSubscribers,
    /// The ACL refused the publish or the delivery.
    NotAuthorized,
    /// A QoS 0 message a congested or slow subscriber could not take.
    SlowConsumer,
    /// QoS 0 for an offline session that does not queue it.
    Offline,
    /// The log was at its share of `--max-disk-bytes`.
    DiskFull,
    /// A queued message kept only in the log could not be read back.
    LogError,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::TooLarge,
        DropReason::NoSubscribers,
        DropReason::NotAuthorized,
        DropReason::SlowConsumer,
        DropReason::Offline,
        DropReason::DiskFull,
        DropReason::LogError,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "too_large",
            DropReason::NoSubscribers => "no_subscribers",
            DropReason::NotAuthorized => "not_authorized",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::Offline => "offline",
            DropReason::DiskFull => "disk_full",
            DropReason::LogError => "log_error",
        }
    }
}

/// Buckets of a latency histogram: upper bounds in microseconds, doubling from 16 µs to
/// about 4 s (and +Inf).
pub const LATENCY_BUCKETS_US: [u64; 19] = [
    16, 32, 64, 128, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384, 32_768, 65_536, 131_072, 262_144, 524_288,
    1_048_576, 2_097_152, 4_194_304,
];

/// A latency histogram with fixed buckets: cheap to record, added up across shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative), the last one +Inf.
    pub counts: [u64; LATENCY_BUCKETS_US.len() + 1],
    pub sum_us: u64,
}

impl LatencyHistogram {
    pub fn record(&mut self, micros: u64) {
        let bucket = LATENCY_BUCKETS_US.iter().position(|b| micros <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.counts[bucket] += 1;
        self.sum_us += micros;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn add(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_thread_and_by_kind() {
        std::thread::spawn(|| {
            sent(QoS::AtLeastOnce);
            sent(QoS::AtLeastOnce);
            dropped(DropReason::Expired);
            dropped_n(DropReason::QueueFull, 3);
            let (s, d, _) = read();
            assert_eq!(s, [0, 2, 0]);
            assert_eq!(d[DropReason::Expired as usize], 1);
            assert_eq!(d[DropReason::QueueFull as usize], 3);
        })
        .join()
        .unwrap();
        let (s, _, _) = std::thread::spawn(read).join().unwrap();
        assert_eq!(s, [0, 0, 0], "another thread counts its own");
    }

    #[test]
    fn one_message_in_sample_every_is_timed() {
        std::thread::spawn(|| {
            let stamps: Vec<u32> = (0..SAMPLE_EVERY * 3).map(|_| stamp()).collect();
            assert_eq!(stamps.iter().filter(|s| **s != 0).count(), 3);
            for s in stamps {
                delivered(s);
            }
            assert_eq!(read().2.count(), 3);
        })
        .join()
        .unwrap();
    }
}
