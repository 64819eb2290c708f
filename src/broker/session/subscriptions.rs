//! A session's subscriptions: a map allocated on the first one, so a session that
//! subscribes to nothing (most idle devices publish only) costs a pointer. It counts what
//! its filters hold (`cost`), for `--max-subscription-bytes-per-client`.

use ahash::AHashMap;

use super::Subscription;
use crate::topic::TopicFilter;

#[derive(Debug, Default)]
pub struct Subscriptions(Option<Box<Held>>);

#[derive(Debug, Default)]
struct Held {
    map: AHashMap<TopicFilter, Subscription>,
    bytes: usize,
}

/// About what a subscription to `filter` holds in memory: the filter, kept by the session
/// and once more as the subscription tree's level names, then once per other core that
/// learns of it; and a tree node per level in this core's subscription tree and in every
/// other core's interest tree (a hash table of its own each). Measured on 2 cores: about
/// 3.2 KB for a 4-level filter of 9 bytes (counted 3.6 KB), 6.0 KB for a 1-level one of
/// 1,008 bytes (counted 6.3 KB), 313 KB for a 3-level one of 65,000 bytes (counted 327 KB).
pub fn cost(filter: &TopicFilter) -> usize {
    let text = filter.as_str();
    let levels = text.split('/').count();
    5 * text.len() + 768 * levels + 512
}

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |h| h.map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What its filters hold, by [`cost`].
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |h| h.bytes)
    }

    pub fn contains_key(&self, filter: &TopicFilter) -> bool {
        self.0.as_ref().is_some_and(|h| h.map.contains_key(filter))
    }

    /// Adds or replaces a subscription; returns the one it replaced.
    pub fn insert(&mut self, filter: TopicFilter, subscription: Subscription) -> Option<Subscription> {
        let held = self.0.get_or_insert_with(Box::default);
        let size = cost(&filter);
        let replaced = held.map.insert(filter, subscription);
        if replaced.is_none() {
            held.bytes += size;
        }
        replaced
    }

    pub fn remove(&mut self, filter: &TopicFilter) -> Option<Subscription> {
        let held = self.0.as_mut()?;
        let removed = held.map.remove(filter);
        if removed.is_some() {
            held.bytes -= cost(filter);
        }
        if held.map.is_empty() {
            self.0 = None;
        }
        removed
    }

    pub fn keys(&self) -> impl Iterator<Item = &TopicFilter> {
        self.0.iter().flat_map(|h| h.map.keys())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&TopicFilter, &mut Subscription)> {
        self.0.iter_mut().flat_map(|h| h.map.iter_mut())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TopicFilter, &Subscription)> {
        self.0.iter().flat_map(|h| h.map.iter())
    }
}
