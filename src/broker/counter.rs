//! Counts shared by every shard (sessions, subscriptions, retained bytes), changed off
//! the publish path.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Adds `delta` (which may be negative) to a shared count.
pub fn adjust(count: &AtomicUsize, delta: isize) {
    if delta >= 0 {
        count.fetch_add(delta as usize, Ordering::Relaxed);
    } else {
        count.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}
