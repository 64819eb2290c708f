//! Counting: per-stream sequence tracking, group (shared subscription) accounting, the
//! per-worker counters the coordinator reads live, and latency histograms.
//!
//! Invariants: a worker's [`Counters`] are written only by that worker's thread (relaxed
//! atomics, added once per read or write batch, never per message) and read by the
//! coordinator; histograms are thread-local to a worker and merged at the end.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hdrhistogram::Histogram;

/// Highest latency recorded: one hour in nanoseconds. Above it the value is clamped.
pub const HIST_MAX_NS: u64 = 3_600_000_000_000;
/// Significant figures kept by the histograms.
pub const HIST_SIGFIG: u8 = 3;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, HIST_SIGFIG).expect("valid histogram bounds")
}

#[inline]
pub fn record(hist: &mut Histogram<u64>, ns: u64) {
    hist.saturating_record(ns.max(1));
}

/// Open gaps kept per stream; past this the oldest gap is forgotten (a message in it
/// that arrives later is then counted as a duplicate).
const MAX_GAPS: usize = 1024;

/// What one (publisher → subscriber) stream has seen, for streams where every message is
/// expected once, in order.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    /// The sequence number expected next.
    next: u32,
    /// Distinct messages received.
    pub unique: u64,
    pub dup: u64,
    /// Messages that arrived after a later one of the same stream (filled a gap).
    pub out_of_order: u64,
    /// Missing ranges `[from, to)` below `next`, ascending.
    gaps: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Late,
    Duplicate,
}

impl Stream {
    #[inline]
    pub fn on_seq(&mut self, seq: u32) -> Seen {
        if seq == self.next {
            self.next = seq.wrapping_add(1);
            self.unique += 1;
            return Seen::New;
        }
        if seq > self.next {
            if self.gaps.len() == MAX_GAPS {
                self.gaps.remove(0);
            }
            self.gaps.push((self.next, seq));
            self.next = seq.wrapping_add(1);
            self.unique += 1;
            return Seen::New;
        }
        // Below `next`: fills a gap, or was seen already. Recent gaps are likelier.
        match self.gaps.iter().rposition(|&(from, to)| from <= seq && seq < to) {
            Some(i) => {
                let (from, to) = self.gaps[i];
                match (seq == from, seq + 1 == to) {
                    (true, true) => {
                        self.gaps.remove(i);
                    }
                    (true, false) => self.gaps[i].0 = seq + 1,
                    (false, true) => self.gaps[i].1 = seq,
                    (false, false) => {
                        self.gaps[i].1 = seq;
                        self.gaps.insert(i + 1, (seq + 1, to));
                    }
                }
                self.unique += 1;
                self.out_of_order += 1;
                Seen::Late
            }
            None => {
                self.dup += 1;
                Seen::Duplicate
            }
        }
    }

    /// Messages missing inside what was seen (not counting a missing tail).
    pub fn gap_count(&self) -> u64 {
        self.gaps.iter().map(|&(from, to)| u64::from(to - from)).sum()
    }
}

/// Which sequence numbers of one publisher a shared-subscription group has received, in
/// one worker; merged across workers at the end.
#[derive(Debug, Default, Clone)]
pub struct SeenSet {
    bits: Vec<u64>,
}

impl SeenSet {
    /// `true` when `seq` is new here.
    #[inline]
    pub fn insert(&mut self, seq: u32) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize((word + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << bit;
        let new = self.bits[word] & mask == 0;
        self.bits[word] |= mask;
        new
    }

    /// ORs `other` in; returns how many were in both (duplicates across workers).
    pub fn merge(&mut self, other: &SeenSet) -> u64 {
        if other.bits.len() > self.bits.len() {
            self.bits.resize(other.bits.len(), 0);
        }
        let mut both = 0;
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            both += u64::from((*a & *b).count_ones());
            *a |= *b;
        }
        both
    }

    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// A worker's live counters, read by the coordinator every second and at phase changes.
#[derive(Debug, Default)]
pub struct Counters {
    pub connect_attempts: AtomicU64,
    pub connected: AtomicU64,
    /// TCP connect errors and timeouts.
    pub connect_failed: AtomicU64,
    /// CONNACK with a failure code.
    pub connect_refused: AtomicU64,
    /// Connections up now.
    pub up: AtomicU64,
    /// Connections whose set-up is over: connected (and subscribed), or failed.
    pub settled: AtomicU64,
    pub subscribed: AtomicU64,
    pub subscribe_failed: AtomicU64,
    /// Established connections the broker closed (EOF, reset, DISCONNECT) before the end.
    pub closed_by_broker: AtomicU64,
    /// Packets the codec refused, or packets out of place.
    pub protocol_errors: AtomicU64,
    /// Messages handed to the socket buffer (encoded) by publishers.
    pub sent: AtomicU64,
    /// PUBACKs (QoS 1) and PUBCOMPs (QoS 2) received.
    pub acked: AtomicU64,
    /// Unacknowledged QoS 1/2 messages now.
    pub inflight: AtomicU64,
    /// Publishers currently publishing.
    pub publishing: AtomicU64,
    /// Deliveries while publishers run.
    pub recv_load: AtomicU64,
    /// Deliveries after publishing stopped.
    pub recv_drain: AtomicU64,
    /// Deliveries counted as new (distinct) by this worker.
    pub recv_unique: AtomicU64,
    /// Time of the latest delivery or ack, ns since the run's start.
    pub last_delivery_ns: AtomicU64,
    /// First connect attempt / last CONNACK, ns since the run's start (for the rate).
    pub first_attempt_ns: AtomicU64,
    pub last_connack_ns: AtomicU64,
}

impl Counters {
    pub fn new() -> Counters {
        let c = Counters::default();
        c.first_attempt_ns.store(u64::MAX, Relaxed);
        c
    }

    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        if n != 0 {
            counter.fetch_add(n, Relaxed);
        }
    }

    #[inline]
    pub fn add_sub(counter: &AtomicU64, n: u64) {
        if n != 0 {
            counter.fetch_sub(n, Relaxed);
        }
    }
}

/// Sum of one counter over all workers.
pub fn total(workers: &[std::sync::Arc<Counters>], f: impl Fn(&Counters) -> &AtomicU64) -> u64 {
    workers.iter().map(|w| f(w).load(Relaxed)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream() {
        let mut s = Stream::default();
        for i in 0..100 {
            assert_eq!(s.on_seq(i), Seen::New);
        }
        assert_eq!((s.unique, s.dup, s.out_of_order, s.gap_count()), (100, 0, 0, 0));
    }

    #[test]
    fn gaps_late_and_duplicates() {
        let mut s = Stream::default();
        for seq in [0, 1, 5, 6, 3, 3, 2, 4, 9, 0, 7] {
            s.on_seq(seq);
        }
        // Seen: 0..=7 and 9; 8 missing; duplicates: 3 and 0; late: 3, 2, 4, 7.
        assert_eq!(s.unique, 9);
        assert_eq!(s.dup, 2);
        assert_eq!(s.out_of_order, 4);
        assert_eq!(s.gap_count(), 1);
    }

    #[test]
    fn seen_set_merge_counts_overlap() {
        let mut a = SeenSet::default();
        let mut b = SeenSet::default();
        for i in 0..100 {
            assert!(a.insert(i));
        }
        assert!(!a.insert(5));
        for i in 90..300 {
            b.insert(i);
        }
        assert_eq!(a.merge(&b), 10);
        assert_eq!(a.count(), 300);
    }
}
