//! Retained messages of one shard's partition of the topic space.
//!
//! Topics are partitioned over shards by the same stable hash as client identifiers; a
//! subscription gathers matches from every shard a page at a time, so a wildcard over a
//! million retained topics never materialises them all at once.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::{FlushJob, StorageError};
use crate::broker::message::Message;
use crate::topic::{TopicFilter, TopicName};

/// Retained messages returned per query.
pub const RETAINED_PAGE: usize = 128;

/// Entries of the store a page may look at, matching or not: a filter whose wildcards leave
/// no prefix to search by (`+/x`) cannot make one page scan the whole store.
pub const RETAINED_VISITS: usize = 8 * RETAINED_PAGE;

/// Refusal to store a retained message.
#[derive(Debug, thiserror::Error)]
pub enum RetainedError {
    #[error("retained store is full (--max-retained-messages {messages}, --max-retained-bytes {bytes})")]
    Full { messages: usize, bytes: usize },
    #[error("retained log: {0}")]
    Storage(#[from] StorageError),
}

/// Where retained messages live: in memory ([`MemoryRetained`]) or in memory and in the
/// shard's log ([`crate::storage::RetainedLog`]).
pub trait RetainedStore {
    /// Stores `message` as the topic's retained message; an empty payload deletes it.
    fn set(&mut self, message: Message) -> Result<(), RetainedError>;
    /// Up to `limit` messages matching `filter` with topics after `after`, in topic order,
    /// appended to `out`, looking at no more than `limit × RETAINED_VISITS / RETAINED_PAGE`
    /// entries. Returns where the next page starts when more may follow (possibly after a
    /// page with nothing in it).
    fn matching(
        &self,
        filter: &TopicFilter,
        after: Option<&TopicName>,
        limit: usize,
        out: &mut Vec<Message>,
    ) -> Option<TopicName>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One step of log compaction; whether there was something to do.
    fn compact(&mut self) -> Result<bool, StorageError> {
        Ok(false)
    }
    /// What is written and not yet flushed to the device.
    fn take_flush(&mut self) -> Option<FlushJob> {
        None
    }
    /// Retired segments a flush job deleted.
    fn flushed(&mut self, _deleted: &[u64]) {}
    /// Compacted segments wait for a flush job to delete them.
    fn has_retired(&self) -> bool {
        false
    }
    /// Drops the process's mapping of logged pages (see `Log::release_pages`).
    fn release_pages(&mut self) -> usize {
        0
    }
    /// Removes the messages that expired by `now`; returns how many.
    fn purge_expired(&mut self, _now: Instant) -> usize {
        0
    }
    /// Records appended to the log so far (0 in memory).
    fn appended(&self) -> u64 {
        0
    }
    /// Appends to the log that failed so far (0 in memory).
    fn failures(&self) -> u64 {
        0
    }
    /// Bytes and segment files its log holds on disk ((0, 0) in memory).
    fn disk_usage(&self) -> (u64, usize) {
        (0, 0)
    }
}

/// The retained store's bounds, shared by every shard's store: the counts are the whole
/// broker's (`--max-retained-messages`, `--max-retained-bytes`), so topics that hash
/// unevenly over shards, or a changed `--cores`, never make one shard refuse while the
/// broker has room. Touched only by retained PUBLISHes, never by other traffic.
#[derive(Debug)]
pub struct RetainedBudget {
    pub max_messages: usize,
    pub max_bytes: usize,
    messages: AtomicUsize,
    bytes: AtomicUsize,
}

impl Default for RetainedBudget {
    /// No bounds (re-partitioning, tools, tests).
    fn default() -> RetainedBudget {
        RetainedBudget::new(usize::MAX, usize::MAX)
    }
}

impl RetainedBudget {
    pub fn new(max_messages: usize, max_bytes: usize) -> RetainedBudget {
        RetainedBudget { max_messages, max_bytes, messages: AtomicUsize::new(0), bytes: AtomicUsize::new(0) }
    }

    pub fn messages(&self) -> usize {
        self.messages.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Takes `messages` more topics and `bytes` more bytes if both stay within the bounds
    /// (shards claiming at the same moment may pass a bound by one message each).
    fn claim(&self, messages: usize, bytes: usize) -> bool {
        let fits = self.messages().saturating_add(messages) <= self.max_messages
            && self.bytes().saturating_add(bytes) <= self.max_bytes;
        if fits {
            self.force(messages as isize, bytes as isize);
        }
        fits
    }

    /// Adds (or with negative values, gives back) without checking the bounds.
    fn force(&self, messages: isize, bytes: isize) {
        crate::broker::adjust(&self.messages, messages);
        crate::broker::adjust(&self.bytes, bytes);
    }
}

/// Invariants: no entry has an empty payload; `budget` counts every entry, with its
/// `Message::size`; `expiries` holds exactly the entries that can expire.
pub struct MemoryRetained {
    messages: BTreeMap<TopicName, Message>,
    budget: Arc<RetainedBudget>,
    expiries: BTreeSet<(Instant, TopicName)>,
}

impl MemoryRetained {
    pub fn new(budget: Arc<RetainedBudget>) -> MemoryRetained {
        MemoryRetained { messages: BTreeMap::new(), budget, expiries: BTreeSet::new() }
    }

    /// What storing `message` adds (a topic or none, and bytes), and the size of the
    /// message it replaces.
    fn growth(&self, message: &Message) -> (usize, usize, usize) {
        let old = self.messages.get(&message.topic).map(Message::size);
        (usize::from(old.is_none()), message.size().saturating_sub(old.unwrap_or(0)), old.unwrap_or(0))
    }

    /// Claims room for `message` in the shared budget, before anything is written (another
    /// core may be claiming at the same moment).
    pub fn reserve(&self, message: &Message) -> Result<(), RetainedError> {
        let (topics, bytes, _) = self.growth(message);
        if !self.budget.claim(topics, bytes) {
            return Err(RetainedError::Full {
                messages: self.budget.max_messages,
                bytes: self.budget.max_bytes,
            });
        }
        Ok(())
    }

    /// Gives back a reservation that was not used (its log append failed).
    pub fn unreserve(&self, message: &Message) {
        let (topics, bytes, _) = self.growth(message);
        self.budget.force(-(topics as isize), -(bytes as isize));
    }

    /// Stores a message whose room was reserved.
    pub fn commit(&mut self, message: Message) {
        let (topics, _, old) = self.growth(&message);
        // The reservation counted the growth; `insert` un-counts the old message: count
        // it back.
        self.budget.force(1 - topics as isize, old.min(message.size()) as isize);
        self.insert(message);
    }

    /// Stores a message replayed from the log: never refused (a restart, or a changed
    /// `--cores`, keeps what was retained even past a lowered bound; new ones then wait
    /// until there is room again).
    pub fn load(&mut self, message: Message) {
        if message.payload.is_empty() {
            self.remove(&message.topic);
        } else {
            self.budget.force(1, message.size() as isize);
            self.insert(message);
        }
    }

    pub fn remove(&mut self, topic: &TopicName) {
        if let Some(old) = self.messages.remove(topic) {
            self.forget(&old);
            self.budget.force(-1, -(old.size() as isize));
        }
    }

    /// Inserts a counted message, un-counting the one it replaces.
    fn insert(&mut self, message: Message) {
        // A retained message lives long: it must not keep a client's read buffer alive.
        let message = message.held();
        if let Some(at) = message.expires_at {
            self.expiries.insert((at, message.topic.clone()));
        }
        if let Some(old) = self.messages.insert(message.topic.clone(), message) {
            self.forget(&old);
            self.budget.force(-1, -(old.size() as isize));
        }
    }

    fn forget(&mut self, old: &Message) {
        if let Some(at) = old.expires_at {
            self.expiries.remove(&(at, old.topic.clone()));
        }
    }

    /// Removes the messages whose Message Expiry Interval ran out (MQTT-3.3.2-5); returns
    /// their topics.
    pub fn purge_expired(&mut self, now: Instant) -> Vec<TopicName> {
        let mut gone = Vec::new();
        while let Some((at, _)) = self.expiries.first() {
            if *at > now {
                break;
            }
            let Some((_, topic)) = self.expiries.pop_first() else { break };
            if let Some(old) = self.messages.remove(&topic) {
                self.budget.force(-1, -(old.size() as isize));
            }
            gone.push(topic);
        }
        gone
    }
}

impl Drop for MemoryRetained {
    /// Gives the shared budget back what this store counted.
    fn drop(&mut self) {
        let bytes: usize = self.messages.values().map(Message::size).sum();
        self.budget.force(-(self.messages.len() as isize), -(bytes as isize));
    }
}

impl RetainedStore for MemoryRetained {
    fn set(&mut self, message: Message) -> Result<(), RetainedError> {
        if message.payload.is_empty() {
            self.remove(&message.topic);
            return Ok(());
        }
        self.reserve(&message)?;
        self.commit(message);
        Ok(())
    }

    fn purge_expired(&mut self, now: Instant) -> usize {
        MemoryRetained::purge_expired(self, now).len()
    }

    fn matching(
        &self,
        filter: &TopicFilter,
        after: Option<&TopicName>,
        limit: usize,
        out: &mut Vec<Message>,
    ) -> Option<TopicName> {
        // Every match starts with the filter's text up to its first wildcard.
        let text = filter.as_str();
        let mut prefix = &text[..text.find(['+', '#']).unwrap_or(text.len())];
        if text.ends_with("/#") && prefix.len() == text.len() - 1 {
            // `a/#` also matches `a` itself (MQTT-4.7.1-2).
            prefix = &prefix[..prefix.len() - 1];
        }
        let start = match after {
            Some(after) => Bound::Excluded(after.clone()),
            None => match TopicName::new(bytes::Bytes::copy_from_slice(prefix.as_bytes())) {
                Ok(name) => Bound::Included(name),
                Err(_) => Bound::Unbounded,
            },
        };
        let now = std::time::Instant::now();
        let mut taken = 0;
        let visits = limit.max(1) * (RETAINED_VISITS / RETAINED_PAGE);
        for (visited, (topic, message)) in self.messages.range((start, Bound::Unbounded)).enumerate() {
            if !topic.as_str().starts_with(prefix) {
                break;
            }
            if filter.matches(topic) && !message.is_expired(now) {
                out.push(message.clone());
                taken += 1;
            }
            if taken == limit || visited + 1 == visits {
                return Some(topic.clone());
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.messages.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;

    fn message(topic: &str, payload: &'static str) -> Message {
        Message {
            topic: TopicName::new(bytes::Bytes::copy_from_slice(topic.as_bytes())).unwrap(),
            payload: bytes::Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            expires_at: None,
            pinned: 0,
            born: Default::default(),
            id: Default::default(),
        }
    }

    fn topics(store: &MemoryRetained, filter: &str, page: usize) -> Vec<String> {
        let filter = TopicFilter::new(bytes::Bytes::copy_from_slice(filter.as_bytes())).unwrap();
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let mut out = Vec::new();
            after = store.matching(&filter, after.as_ref(), page, &mut out);
            all.extend(out.into_iter().map(|m| m.topic.to_string()));
            if after.is_none() {
                return all;
            }
        }
    }

    #[test]
    fn latest_wins_and_empty_deletes() {
        let mut store = MemoryRetained::new(Arc::new(RetainedBudget::new(10, usize::MAX)));
        store.set(message("a/b", "1")).unwrap();
        store.set(message("a/b", "2")).unwrap();
        let mut out = Vec::new();
        store.matching(&TopicFilter::from_static("a/b").unwrap(), None, 10, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].payload[..], b"2");
        store.set(message("a/b", "")).unwrap();
        assert!(store.is_empty());
    }

    #[test]
    fn wildcards_and_pages_agree_with_the_reference_matcher() {
        let mut store = MemoryRetained::new(Arc::new(RetainedBudget::new(1000, usize::MAX)));
        let names = ["a", "a/b", "a/b/c", "a/c", "b/a", "$sys/a", "ab", "a//c"];
        for name in names {
            store.set(message(name, "x")).unwrap();
        }
        for filter in ["#", "a/#", "a/+", "+/a", "a/+/c", "$sys/#", "ab", "+"] {
            let parsed = TopicFilter::new(bytes::Bytes::copy_from_slice(filter.as_bytes())).unwrap();
            let mut expected: Vec<String> = names
                .iter()
                .filter(|n| {
                    parsed.matches(&TopicName::new(bytes::Bytes::copy_from_slice(n.as_bytes())).unwrap())
                })
                .map(|n| n.to_string())
                .collect();
            expected.sort();
            for page in [1, 2, 100] {
                assert_eq!(topics(&store, filter, page), expected, "{filter} page {page}");
            }
        }
    }

    #[test]
    fn bounded() {
        let budget = Arc::new(RetainedBudget::new(2, usize::MAX));
        let mut store = MemoryRetained::new(budget.clone());
        store.set(message("a", "1")).unwrap();
        store.set(message("b", "1")).unwrap();
        assert!(matches!(store.set(message("c", "1")), Err(RetainedError::Full { messages: 2, .. })));
        store.set(message("a", "2")).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(budget.messages(), 2);
    }

    #[test]
    fn the_budget_counts_bytes_across_stores_and_is_given_back() {
        let one = message("a", "x").size();
        let budget = Arc::new(RetainedBudget::new(100, 3 * one));
        let (mut left, mut right) =
            (MemoryRetained::new(budget.clone()), MemoryRetained::new(budget.clone()));
        left.set(message("a", "x")).unwrap();
        right.set(message("b", "x")).unwrap();
        right.set(message("c", "x")).unwrap();
        assert!(matches!(left.set(message("d", "x")), Err(RetainedError::Full { .. })), "bytes are shared");
        // A larger replacement does not fit either; a same-size one does.
        assert!(left.set(message("a", "xx")).is_err());
        left.set(message("a", "y")).unwrap();
        assert_eq!((budget.messages(), budget.bytes()), (3, 3 * one));
        right.set(message("b", "")).unwrap();
        left.set(message("d", "x")).unwrap();
        drop(right);
        assert_eq!((budget.messages(), budget.bytes()), (2, 2 * one));
        // Replayed messages are never refused.
        left.load(message("e", "x"));
        left.load(message("f", "x"));
        assert_eq!(budget.messages(), 4);
    }

    #[test]
    fn a_page_looks_at_a_bounded_number_of_entries() {
        let mut store = MemoryRetained::new(Arc::default());
        for i in 0..5_000 {
            store.set(message(&format!("t/{i:05}"), "x")).unwrap();
        }
        // Matches nothing, and has no prefix to narrow the scan.
        let filter = TopicFilter::from_static("+/none").unwrap();
        let (mut pages, mut after) = (0, None);
        loop {
            let mut out = Vec::new();
            after = store.matching(&filter, after.as_ref(), RETAINED_PAGE, &mut out);
            assert!(out.is_empty());
            pages += 1;
            if after.is_none() {
                break;
            }
        }
        assert_eq!(pages, 5_000usize.div_ceil(RETAINED_VISITS));
    }

    #[test]
    fn expired_messages_are_purged() {
        let budget = Arc::new(RetainedBudget::default());
        let mut store = MemoryRetained::new(budget.clone());
        let now = Instant::now();
        for (topic, secs) in [("a", 1), ("b", 5), ("c", 0)] {
            let mut m = message(topic, "x");
            m.expires_at = (secs > 0).then(|| now + std::time::Duration::from_secs(secs));
            store.set(m).unwrap();
        }
        // Replaced before it expires: the old deadline no longer applies.
        store.set(message("a", "y")).unwrap();
        assert!(store.purge_expired(now + std::time::Duration::from_secs(2)).is_empty());
        assert_eq!(
            store.purge_expired(now + std::time::Duration::from_secs(6)),
            vec![TopicName::from_static("b")]
        );
        assert_eq!((store.len(), budget.messages()), (2, 2));
    }
}
