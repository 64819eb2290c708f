//! A shard's retained messages kept in memory for matching and in its own log for
//! restarts: every change is appended before `set` returns.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ahash::AHashMap;
use bytes::BytesMut;

use super::log::{Compaction, FlushJob, Loc, Log, RecoveryReport, StorageError};
use super::record::Record;
use super::retained_store::{MemoryRetained, RetainedBudget, RetainedError, RetainedStore};
use crate::broker::message::Message;
use crate::topic::{TopicFilter, TopicName};

pub struct RetainedLog {
    memory: MemoryRetained,
    log: Log,
    /// Where each stored topic's live record is.
    index: AHashMap<TopicName, Loc>,
    buf: BytesMut,
    compact_below: f64,
    appended: u64,
    failures: u64,
}

impl RetainedLog {
    /// Opens the log in `dir` and loads what it holds, counted in `budget` (never refused:
    /// what was retained stays retained across restarts and changes of `--cores`).
    pub fn open(
        dir: &Path,
        segment_size: usize,
        compact_below: f64,
        budget: Arc<RetainedBudget>,
    ) -> Result<(RetainedLog, RecoveryReport), StorageError> {
        let mut memory = MemoryRetained::new(budget);
        let mut index: AHashMap<TopicName, Loc> = AHashMap::new();
        let mut dead = Vec::new();
        let mut undecodable = 0u64;
        let (log, mut report) = Log::open(dir, segment_size, |loc, payload| match Record::decode(payload) {
            Ok(Record::RetainedSet(message)) => {
                let topic = message.topic.clone();
                memory.load(message);
                if let Some(old) = index.insert(topic, loc) {
                    dead.push(old);
                }
            }
            Ok(Record::RetainedDelete(topic)) => {
                memory.remove(&topic);
                dead.extend(index.remove(&topic));
                dead.push(loc);
            }
            _ => {
                undecodable += 1;
                dead.push(loc);
            }
        })?;
        if undecodable > 0 {
            report.problems.push(format!("{undecodable} undecodable records skipped"));
        }
        let mut store =
            RetainedLog { memory, log, index, buf: BytesMut::new(), compact_below, appended: 0, failures: 0 };
        for loc in dead {
            store.log.kill(loc);
        }
        Ok((store, report))
    }

    /// The retained messages of a log directory, replayed without opening it for writing.
    pub fn read_dir(dir: &Path, mut keep: impl FnMut(&Message)) -> Result<RecoveryReport, StorageError> {
        let mut latest: AHashMap<TopicName, Option<Message>> = AHashMap::new();
        let report = Log::read_dir(dir, |payload| match Record::decode(payload) {
            Ok(Record::RetainedSet(message)) => {
                latest.insert(message.topic.clone(), Some(message));
            }
            Ok(Record::RetainedDelete(topic)) => {
                latest.insert(topic, None);
            }
            _ => {}
        })?;
        for message in latest.into_values().flatten() {
            keep(&message);
        }
        Ok(report)
    }

    fn append(&mut self, record: &Record) -> Result<Loc, StorageError> {
        record.encode(&mut self.buf);
        let result = self.log.append(&self.buf);
        match &result {
            Ok(_) => self.appended += 1,
            Err(err) => {
                self.failures += 1;
                if self.failures.is_power_of_two() {
                    tracing::error!(%err, failures = self.failures, "retained log append failed");
                }
            }
        }
        result
    }

    pub fn disk_bytes(&self) -> u64 {
        self.log.disk_bytes()
    }
}

impl RetainedStore for RetainedLog {
    fn disk_usage(&self) -> (u64, usize) {
        (self.log.disk_bytes(), self.log.segment_count())
    }

    fn set(&mut self, message: Message) -> Result<(), RetainedError> {
        // Its own bytes from here: the index keeps the topic as long as it is retained.
        let message = message.held();
        let topic = message.topic.clone();
        if message.payload.is_empty() {
            if self.index.contains_key(&topic) {
                let loc = self.append(&Record::RetainedDelete(topic.clone()))?;
                // A tombstone is garbage from the start; compaction carries it forward
                // only while an older segment may still hold the topic.
                self.log.kill(loc);
                if let Some(old) = self.index.remove(&topic) {
                    self.log.kill(old);
                }
            }
            return self.memory.set(message);
        }
        self.memory.reserve(&message)?;
        let loc = match self.append(&Record::RetainedSet(message.clone())) {
            Ok(loc) => loc,
            Err(err) => {
                self.memory.unreserve(&message);
                return Err(err.into());
            }
        };
        if let Some(old) = self.index.insert(topic, loc) {
            self.log.kill(old);
        }
        self.memory.commit(message);
        Ok(())
    }

    fn matching(
        &self,
        filter: &TopicFilter,
        after: Option<&TopicName>,
        limit: usize,
        out: &mut Vec<Message>,
    ) -> Option<TopicName> {
        self.memory.matching(filter, after, limit, out)
    }

    fn len(&self) -> usize {
        self.memory.len()
    }

    fn compact(&mut self) -> Result<bool, StorageError> {
        let (seq, oldest) = match self.log.next_compaction(self.compact_below)? {
            Compaction::Idle => return Ok(false),
            Compaction::Retired => return Ok(true),
            Compaction::CopyOut { seq, oldest } => (seq, oldest),
        };
        for loc in self.log.records(seq) {
            // A set is only copied: whether it is live needs its topic alone.
            if let Some(topic) = self.log.read(loc).and_then(super::record::peek_retained_topic) {
                if self.index.get(topic) != Some(&loc) {
                    continue;
                }
                let topic = topic.to_vec();
                if let Some(moved) = self.log.copy_forward(loc)? {
                    if let Some(slot) = self.index.get_mut(&topic[..]) {
                        *slot = moved;
                    }
                }
                continue;
            }
            let Some(record) = self.log.read(loc).and_then(|p| Record::decode(p).ok()) else { continue };
            let carry = match &record {
                Record::RetainedSet(m) => self.index.get(&m.topic) == Some(&loc),
                // A newer set of the topic makes the delete moot: carried after it, the
                // delete would win at replay.
                Record::RetainedDelete(topic) => !oldest && !self.index.contains_key(topic),
                _ => false,
            };
            if !carry {
                continue;
            }
            let Some(moved) = self.log.copy_forward(loc)? else { continue };
            match record {
                Record::RetainedSet(m) => {
                    self.index.insert(m.topic, moved);
                }
                _ => self.log.kill(moved),
            }
        }
        self.log.retire_segment(seq);
        Ok(true)
    }

    fn appended(&self) -> u64 {
        self.appended
    }

    fn release_pages(&mut self) -> usize {
        self.log.release_pages()
    }

    fn purge_expired(&mut self, now: Instant) -> usize {
        let gone = self.memory.purge_expired(now);
        for topic in &gone {
            // A delete, as for an empty retained PUBLISH, so a restart does not bring it
            // back (it would be dropped as expired then, but only after being loaded).
            if let Some(old) = self.index.remove(topic) {
                self.log.kill(old);
                if let Ok(loc) = self.append(&Record::RetainedDelete(topic.clone())) {
                    self.log.kill(loc);
                }
            }
        }
        gone.len()
    }

    fn failures(&self) -> u64 {
        self.failures
    }

    fn flushed(&mut self, deleted: &[u64]) {
        self.log.deleted(deleted);
    }

    fn has_retired(&self) -> bool {
        self.log.has_retired()
    }

    fn take_flush(&mut self) -> Option<FlushJob> {
        let job = self.log.take_flush();
        (!job.is_empty()).then_some(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(topic: &str, payload: &str) -> Message {
        Message {
            topic: TopicName::new_allow_empty(topic.to_string()).unwrap(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: crate::codec::QoS::AtLeastOnce,
            retain: true,
            properties: Default::default(),
            expires_at: None,
            pinned: 0,
            born: Default::default(),
            id: Default::default(),
        }
    }

    fn value(store: &RetainedLog, topic: &str) -> Option<Bytes> {
        let mut out = Vec::new();
        store.matching(
            &TopicFilter::new(Bytes::copy_from_slice(topic.as_bytes())).unwrap(),
            None,
            10,
            &mut out,
        );
        out.first().map(|m| m.payload.clone())
    }

    /// A retained message that arrived in a large read buffer is stored, and indexed, on
    /// its own bytes: nothing the store keeps points into the buffer.
    #[test]
    fn a_stored_message_keeps_no_slice_of_its_read_buffer() {
        let dir = std::env::temp_dir().join(format!("ringmq-retained-log-{}-pin", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut store, _) = RetainedLog::open(&dir, 4096, 0.5, Arc::default()).unwrap();
        let buffer = Bytes::from(vec![b'p'; 1 << 20]);
        let message = Message {
            topic: TopicName::new(buffer.slice(0..5)).unwrap(),
            payload: buffer.slice(5..6),
            pinned: buffer.len() as u32,
            ..message("x", "y")
        };
        store.set(message).unwrap();
        let inside = |b: &[u8]| buffer.as_ptr_range().contains(&b.as_ptr());
        let (topic, loc) = store.index.iter().next().unwrap();
        assert!(!inside(topic.as_bytes()), "the index keeps the read buffer alive");
        assert!(store.log.read(*loc).is_some());
        let mut out = Vec::new();
        store.matching(&TopicFilter::new(Bytes::from_static(b"ppppp")).unwrap(), None, 10, &mut out);
        assert!(!inside(out[0].topic.as_bytes()) && !inside(&out[0].payload));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_delete_is_not_carried_past_a_newer_set() {
        let dir = std::env::temp_dir().join(format!("ringmq-retained-log-{}-delete", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut store, _) = RetainedLog::open(&dir, 4096, 0.5, Arc::default()).unwrap();
        let filler = "f".repeat(200);
        let roll = |store: &mut RetainedLog, tag: &str| {
            for i in 0..20 {
                store.set(message(&format!("fill/{tag}/{i}"), &filler)).unwrap();
            }
        };
        // Segment 1 stays mostly live (its fillers stay), so the delete's segment is never
        // the oldest.
        store.set(message("t", "v1")).unwrap();
        roll(&mut store, "a");
        store.set(message("t", "")).unwrap();
        // The delete's segment: fillers that are replaced below, so it gets compacted while
        // segment 1 still exists.
        for i in 0..20 {
            store.set(message(&format!("fill/b/{i}"), &filler)).unwrap();
        }
        // The newer set, in a segment that stays live (not compacted, not moved).
        store.set(message("t", "v2")).unwrap();
        roll(&mut store, "c");
        for i in 0..20 {
            store.set(message(&format!("fill/b/{i}"), &format!("{filler}2"))).unwrap();
        }
        while store.compact().unwrap() {}
        assert_eq!(value(&store, "t").as_deref(), Some(&b"v2"[..]));
        drop(store);
        let (store, report) = RetainedLog::open(&dir, 4096, 0.5, Arc::default()).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(value(&store, "t").as_deref(), Some(&b"v2"[..]), "the delete won at replay");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
