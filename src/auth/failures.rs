//! Failed CONNECT attempts per source address, so guessing passwords from one address
//! stops being answered with a check.
//!
//! One per shard (no lock): an address's connections spread over the shards by the
//! kernel's SO_REUSEPORT hash, so it gets up to `MAX_FAILURES` per shard and window.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ahash::AHashMap;

/// Failures an address may have within [`WINDOW`] before its attempts are refused unchecked.
pub const MAX_FAILURES: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once: past it, expired entries are dropped, and if none is, the
/// oldest entry makes room.
const MAX_TRACKED: usize = 16_384;

/// What is counted: an IPv4 address, or an IPv6 address's /64 (one host holds a whole /64,
/// and counting its addresses one by one would be no limit).
fn key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[derive(Default)]
pub struct FailureLimiter {
    by_address: AHashMap<IpAddr, (u32, Instant)>,
}

impl FailureLimiter {
    /// Whether `address` has used up its failures for now.
    pub fn is_limited(&self, address: IpAddr, now: Instant) -> bool {
        self.by_address
            .get(&key(address))
            .is_some_and(|(count, since)| *count >= MAX_FAILURES && now.duration_since(*since) < WINDOW)
    }

    /// Counts one failure from `address`.
    pub fn record(&mut self, address: IpAddr, now: Instant) {
        let address = key(address);
        if self.by_address.len() >= MAX_TRACKED && !self.by_address.contains_key(&address) {
            self.by_address.retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
            if self.by_address.len() >= MAX_TRACKED {
                let oldest = self.by_address.iter().min_by_key(|(_, (_, since))| *since).map(|(a, _)| *a);
                if let Some(oldest) = oldest {
                    self.by_address.remove(&oldest);
                }
            }
        }
        let entry = self.by_address.entry(address).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
    }

    pub fn len(&self) -> usize {
        self.by_address.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_limited_after_max_failures_within_the_window_and_free_after_it() {
        let mut limiter = FailureLimiter::default();
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES - 1 {
            limiter.record(a, t0);
        }
        assert!(!limiter.is_limited(a, t0));
        limiter.record(a, t0);
        assert!(limiter.is_limited(a, t0));
        assert!(!limiter.is_limited(b, t0), "another address is not affected");
        assert!(!limiter.is_limited(a, t0 + WINDOW), "the window ends");
        limiter.record(a, t0 + WINDOW);
        assert!(!limiter.is_limited(a, t0 + WINDOW), "a new window starts from one failure");
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn tracking_is_bounded() {
        let mut limiter = FailureLimiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 100) {
            limiter.record(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert_eq!(limiter.len(), MAX_TRACKED);
        // A new address makes room (the oldest goes) and is counted.
        limiter.record(IpAddr::from([1, 2, 3, 4]), t0);
        assert_eq!(limiter.len(), MAX_TRACKED);
        assert_eq!(limiter.by_address.get(&IpAddr::from([1, 2, 3, 4])).map(|e| e.0), Some(1));
        // Once the window passed, old entries make room.
        limiter.record(IpAddr::from([1, 2, 3, 5]), t0 + WINDOW);
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64() {
        let mut limiter = FailureLimiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_FAILURES {
            let address: std::net::Ipv6Addr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            limiter.record(IpAddr::V6(address), t0);
        }
        let other: std::net::Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(limiter.is_limited(IpAddr::V6(other), t0));
        let elsewhere: std::net::Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert!(!limiter.is_limited(IpAddr::V6(elsewhere), t0));
    }
}
