//! Retained messages of one shard's partition of the topic space.
//!
//! Topics are partitioned over shards by the same stable hash as client identifiers; a
//! subscription gathers matches from every shard a page at a time, so a wildcard over a
//! million retained topics never materialises them all at once.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::message::Message;
use crate::storage::{FlushJob, StorageError};
use crate::topic::{TopicFilter, TopicName};

/// Retained messages returned per query.
pub const RETAINED_PAGE: usize = 128;

/// Where the next page of retained messages for a new subscription comes from.
#[derive(Debug, Clone)]
pub struct RetainedCursor {
    pub shard: usize,
    pub filter: TopicFilter,
    pub qos: crate::codec::QoS,
    /// The new subscription's identifier, carried by what it delivers.
    pub identifier: Option<u32>,
    pub after: Option<TopicName>,
}

/// Refusal to store a retained message.
#[derive(Debug, thiserror::Error)]
pub enum RetainedError {
    #[error("retained store is full ({0} topics)")]
    Full(usize),
    #[error("retained log: {0}")]
    Storage(#[from] StorageError),
}

/// Where retained messages live: in memory ([`MemoryRetained`]) or in memory and in the
/// shard's log ([`crate::storage::RetainedLog`]).
pub trait RetainedStore {
    /// Stores `message` as the topic's retained message; an empty payload deletes it.
    fn set(&mut self, message: Message) -> Result<(), RetainedError>;
    /// Up to `limit` messages matching `filter` with topics after `after`, in topic order,
    /// appended to `out`. Returns the last topic returned when more may follow.
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
    /// Records appended to the log so far (0 in memory).
    fn appended(&self) -> u64 {
        0
    }
    /// Appends to the log that failed so far (0 in memory).
    fn failures(&self) -> u64 {
        0
    }
}

/// Invariants: at most `max` entries; no entry has an empty payload.
pub struct MemoryRetained {
    messages: BTreeMap<TopicName, Message>,
    max: usize,
}

impl MemoryRetained {
    pub fn new(max: usize) -> MemoryRetained {
        MemoryRetained { messages: BTreeMap::new(), max }
    }

    /// Whether `topic` may be stored: it is already, or there is room for one more.
    pub fn check_room(&self, topic: &TopicName) -> Result<(), RetainedError> {
        if self.messages.len() >= self.max && !self.messages.contains_key(topic) {
            return Err(RetainedError::Full(self.max));
        }
        Ok(())
    }

    pub fn remove(&mut self, topic: &TopicName) {
        self.messages.remove(topic);
    }
}

impl RetainedStore for MemoryRetained {
    fn set(&mut self, message: Message) -> Result<(), RetainedError> {
        if message.payload.is_empty() {
            self.messages.remove(&message.topic);
            return Ok(());
        }
        self.check_room(&message.topic)?;
        self.messages.insert(message.topic.clone(), message);
        Ok(())
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
        for (topic, message) in self.messages.range((start, Bound::Unbounded)) {
            if !topic.as_str().starts_with(prefix) {
                break;
            }
            if filter.matches(topic) && !message.is_expired(now) {
                out.push(message.clone());
                taken += 1;
                if taken == limit {
                    return Some(topic.clone());
                }
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
            properties: bytes::Bytes::new(),
            expires_at: None,
            pinned: 0,
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
        let mut store = MemoryRetained::new(10);
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
        let mut store = MemoryRetained::new(1000);
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
        let mut store = MemoryRetained::new(2);
        store.set(message("a", "1")).unwrap();
        store.set(message("b", "1")).unwrap();
        assert!(matches!(store.set(message("c", "1")), Err(RetainedError::Full(2))));
        store.set(message("a", "2")).unwrap();
        assert_eq!(store.len(), 2);
    }
}
