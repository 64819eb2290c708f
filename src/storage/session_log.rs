//! The persistent sessions a shard owns, as a log of their changes: opened, went offline,
//! subscribed, each QoS 1/2 message accepted for them and its packet-identifier state,
//! inbound QoS 2 identifiers, ended.
//!
//! Every record is appended before the call returns (the page cache keeps it through a
//! crash of the process). An index of the live records lets compaction copy forward just
//! those; records that only cancel older ones (Unsubscribe, Done, Ended, Qos2InDone) are
//! carried forward only while an older segment may still hold what they cancel and no
//! newer record took its place.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::SystemTime;

use ahash::AHashMap;
use bytes::BytesMut;

use super::log::{Compaction, FlushJob, Loc, Log, RecoveryReport, StorageError};
use super::record::{unix_ms, Record, SessionOwner};
use crate::broker::message::Message;
use crate::broker::session::Subscription;
use crate::codec::{ProtocolVersion, QoS, Will};
use crate::topic::TopicFilter;
use replay::Replay;

/// A QoS 1/2 message a recovered session still owes its client.
pub use crate::broker::session::OwedMessage as RecoveredMessage;

#[path = "session_replay.rs"]
mod replay;

/// A persistent session as its log left it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveredSession {
    /// Its number in the log it lives in now.
    pub log_id: u64,
    pub client_id: String,
    pub version: ProtocolVersion,
    pub expiry: u32,
    pub will: Option<Will>,
    /// Who its client authenticated as, if it did.
    pub owner: Option<SessionOwner>,
    /// When its connection ended (Unix ms); `None`: connected when the broker stopped.
    pub offline_at: Option<u64>,
    pub subscriptions: Vec<(TopicFilter, Subscription)>,
    /// In the order they were accepted.
    pub messages: Vec<RecoveredMessage>,
    /// Queued messages after `messages` left in the log (sequence number, size as
    /// `--max-spilled-bytes` counts it), in order: more than the in-memory queue holds.
    pub spilled: Vec<(u64, u32)>,
    pub qos2_inbound: Vec<u16>,
}

/// Where a message's records are. 24 bytes, not 48: an offline session may be owed a
/// million messages, each with an entry here.
#[derive(Default)]
struct MessageIndex {
    body: PackedLoc,
    state: PackedLoc,
}

/// An `Option<Loc>` in 12 bytes: a record is never empty, so `len == 0` is `None`, and a
/// log refuses to number a segment past 2³² (`StorageError::SegmentsExhausted`).
#[derive(Default, Clone, Copy)]
struct PackedLoc {
    segment: u32,
    offset: u32,
    len: u32,
}

impl PackedLoc {
    fn get(self) -> Option<Loc> {
        (self.len != 0).then_some(Loc {
            segment: u64::from(self.segment),
            offset: self.offset,
            len: self.len,
        })
    }

    /// Sets it; returns what it was.
    fn set(&mut self, loc: Option<Loc>) -> Option<Loc> {
        let old = self.get();
        *self = match loc {
            Some(l) => PackedLoc { segment: l.segment as u32, offset: l.offset, len: l.len },
            None => PackedLoc::default(),
        };
        old
    }
}

#[derive(Default)]
struct SessionIndex {
    client_id: String,
    open: Option<Loc>,
    offline: Option<Loc>,
    /// Stamps of `open` and `offline` (replay meets them in either order).
    open_stamp: u64,
    offline_stamp: u64,
    /// Time and expiry of the live Offline record.
    offline_state: Option<(u64, u32)>,
    subs: AHashMap<String, Loc>,
    messages: AHashMap<u64, MessageIndex>,
    qos2_in: AHashMap<u16, Loc>,
}

impl SessionIndex {
    fn locs(&self) -> impl Iterator<Item = Loc> + '_ {
        self.open
            .iter()
            .chain(self.offline.iter())
            .chain(self.subs.values())
            .chain(self.qos2_in.values())
            .copied()
            .chain(self.messages.values().flat_map(|m| m.body.get().into_iter().chain(m.state.get())))
    }
}

pub struct SessionLog {
    log: Log,
    buf: BytesMut,
    index: AHashMap<u64, SessionIndex>,
    by_client: AHashMap<String, u64>,
    next_session: u64,
    /// Message sequence numbers and Open/Offline stamps: one counter, never reused.
    next_seq: u64,
    compact_below: f64,
    /// Records appended since start: a publish that appended nothing needs no flush.
    appended: u64,
    failures: u64,
    /// This shard's share of `--max-disk-bytes`: past it nothing more spills.
    max_disk_bytes: u64,
}

impl SessionLog {
    /// Opens the log in `dir` and returns the sessions it holds, every message read.
    pub fn open(
        dir: &Path,
        segment_size: usize,
        compact_below: f64,
    ) -> Result<(SessionLog, Vec<RecoveredSession>, RecoveryReport), StorageError> {
        Self::open_keeping(dir, segment_size, compact_below, usize::MAX)
    }

    /// [`SessionLog::open`], reading back no more than `keep_queued` queued messages per
    /// session: the rest stay in the log (`RecoveredSession::spilled`), so a session owed a
    /// million messages is recovered without holding them.
    pub fn open_keeping(
        dir: &Path,
        segment_size: usize,
        compact_below: f64,
        keep_queued: usize,
    ) -> Result<(SessionLog, Vec<RecoveredSession>, RecoveryReport), StorageError> {
        let mut replay = Replay { lazy: true, ..Replay::default() };
        let mut index: AHashMap<u64, SessionIndex> = AHashMap::new();
        let mut dead = Vec::new();
        let (mut max_session, mut max_seq, mut undecodable) = (0u64, 0u64, 0u64);
        let (log, mut report) = Log::open(dir, segment_size, |loc, payload| {
            let Ok(record) = Record::decode(payload) else {
                undecodable += 1;
                dead.push(loc);
                return;
            };
            if let Some(session) = record.session() {
                max_session = max_session.max(session);
            }
            max_seq = max_seq.max(record_seq(&record));
            index_record(&mut index, &record, loc, &mut dead);
            replay.apply(record, Some(loc));
        })?;
        if undecodable > 0 {
            report.problems.push(format!("{undecodable} undecodable records skipped"));
        }
        let sessions = replay.finish(keep_queued, |loc| match Record::decode(log.read(loc)?).ok()? {
            Record::Message { qos, retain, identifiers, message, .. } => {
                Some((qos, retain, identifiers, message))
            }
            _ => None,
        });
        let by_client = sessions.iter().map(|s| (s.client_id.clone(), s.log_id)).collect();
        // Index entries of sessions that did not survive replay are dead.
        let alive: BTreeSet<u64> = sessions.iter().map(|s| s.log_id).collect();
        let mut lost = Vec::new();
        index.retain(|id, entry| {
            if alive.contains(id) {
                return true;
            }
            lost.extend(entry.locs());
            false
        });
        for s in &sessions {
            if let Some(entry) = index.get_mut(&s.log_id) {
                entry.client_id = s.client_id.clone();
            }
        }
        let mut store = SessionLog {
            log,
            buf: BytesMut::new(),
            index,
            by_client,
            next_session: max_session + 1,
            next_seq: max_seq + 1,
            compact_below,
            appended: 0,
            failures: 0,
            max_disk_bytes: u64::MAX,
        };
        for loc in dead.into_iter().chain(lost) {
            store.log.kill(loc);
        }
        Ok((store, sessions, report))
    }

    /// The sessions of a log directory, replayed without opening it for writing.
    pub fn read_dir(dir: &Path) -> Result<(Vec<RecoveredSession>, RecoveryReport), StorageError> {
        let mut replay = Replay::default();
        let report = Log::read_dir(dir, |payload| {
            if let Ok(record) = Record::decode(payload) {
                replay.apply(record, None);
            }
        })?;
        Ok((replay.finish(usize::MAX, |_| None), report))
    }

    /// Writes a session recovered from elsewhere (another shard count's logs) into this
    /// log; returns its number here.
    pub fn persist(&mut self, s: &RecoveredSession) -> u64 {
        let id = self.session_opened(&s.client_id, s.version, s.expiry, s.will.as_ref(), s.owner.clone());
        if let Some(at) = s.offline_at {
            self.offline_at(id, s.expiry, at, s.will.is_some());
        }
        for (filter, sub) in &s.subscriptions {
            self.subscribe(id, filter, sub);
        }
        for m in &s.messages {
            let seq = self.message(id, m.qos, m.retain, &m.identifiers, &m.message);
            match (m.packet_id, m.released) {
                (Some(pid), false) => self.sent(id, seq, pid),
                (Some(pid), true) => self.released(id, seq, pid),
                (None, _) => {}
            }
        }
        for pid in &s.qos2_inbound {
            self.qos2_in(id, *pid);
        }
        id
    }

    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Appends that failed since start (each logged, the first and then at powers of two).
    pub fn failures(&self) -> u64 {
        self.failures
    }

    pub fn disk_bytes(&self) -> u64 {
        self.log.disk_bytes()
    }

    /// Sets the bytes on disk past which persistent sessions' queues no longer spill.
    pub fn set_max_disk_bytes(&mut self, bytes: u64) {
        self.max_disk_bytes = bytes;
    }

    /// Whether the log's segment files take less than its share of `--max-disk-bytes`.
    pub fn has_room(&self) -> bool {
        self.max_disk_bytes == u64::MAX || self.log.disk_bytes() < self.max_disk_bytes
    }

    fn append(&mut self, record: &Record) -> Option<Loc> {
        record.encode(&mut self.buf);
        match self.log.append(&self.buf) {
            Ok(loc) => {
                self.appended += 1;
                Some(loc)
            }
            Err(err) => {
                self.failures += 1;
                if self.failures.is_power_of_two() {
                    tracing::error!(%err, failures = self.failures, "session log append failed");
                }
                None
            }
        }
    }

    /// Appends a record that only cancels older ones: garbage from the start.
    fn append_tombstone(&mut self, record: &Record) {
        if let Some(loc) = self.append(record) {
            self.log.kill(loc);
        }
    }

    fn kill(&mut self, loc: Option<Loc>) {
        if let Some(loc) = loc {
            self.log.kill(loc);
        }
    }

    fn stamp(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// A persistent session connected (created or resumed); returns its number.
    pub fn session_opened(
        &mut self,
        client_id: &str,
        version: ProtocolVersion,
        expiry: u32,
        will: Option<&Will>,
        owner: Option<SessionOwner>,
    ) -> u64 {
        let session = match self.by_client.get(client_id) {
            Some(id) => *id,
            None => {
                let id = self.next_session;
                self.next_session += 1;
                self.by_client.insert(client_id.to_string(), id);
                self.index
                    .insert(id, SessionIndex { client_id: client_id.to_string(), ..SessionIndex::default() });
                id
            }
        };
        let stamp = self.stamp();
        let record = Record::Open {
            session,
            stamp,
            client_id: client_id.to_string(),
            version: version.level(),
            expiry,
            will: will.cloned(),
            owner,
        };
        let loc = self.append(&record);
        let (old_open, old_offline) = match self.index.get_mut(&session) {
            Some(entry) => {
                entry.open_stamp = stamp;
                entry.offline_state = None;
                (std::mem::replace(&mut entry.open, loc), entry.offline.take())
            }
            None => (None, None),
        };
        self.kill(old_open);
        self.kill(old_offline);
        session
    }

    /// Its connection ended; `expiry` is the interval in force from now; `will`: its will
    /// is still to be published.
    pub fn offline(&mut self, session: u64, expiry: u32, will: bool) {
        self.offline_at(session, expiry, unix_ms(SystemTime::now()), will);
    }

    /// The offline session's will was published: it must not be armed again at restart.
    pub fn will_published(&mut self, session: u64) {
        let Some(&(at, expiry)) = self.index.get(&session).and_then(|e| e.offline_state.as_ref()) else {
            return;
        };
        self.offline_at(session, expiry, at, false);
    }

    fn offline_at(&mut self, session: u64, expiry: u32, at: u64, will: bool) {
        let stamp = self.stamp();
        let loc = self.append(&Record::Offline { session, stamp, at, expiry, will });
        let old = self.index.get_mut(&session).and_then(|e| {
            e.offline_stamp = stamp;
            e.offline_state = Some((at, expiry));
            std::mem::replace(&mut e.offline, loc)
        });
        self.kill(old);
    }

    pub fn ended(&mut self, session: u64) {
        self.append_tombstone(&Record::Ended { session });
        if let Some(entry) = self.index.remove(&session) {
            self.by_client.remove(&entry.client_id);
            for loc in entry.locs() {
                self.log.kill(loc);
            }
        }
    }

    pub fn subscribe(&mut self, session: u64, filter: &TopicFilter, sub: &Subscription) {
        let record = Record::Subscribe {
            session,
            filter: filter.clone(),
            options: sub.options,
            identifier: sub.identifier,
        };
        let Some(loc) = self.append(&record) else { return };
        let old = self.index.get_mut(&session).and_then(|e| e.subs.insert(filter.as_str().to_string(), loc));
        self.kill(old);
    }

    pub fn unsubscribe(&mut self, session: u64, filter: &TopicFilter) {
        self.append_tombstone(&Record::Unsubscribe { session, filter: filter.clone() });
        let old = self.index.get_mut(&session).and_then(|e| e.subs.remove(filter.as_str()));
        self.kill(old);
    }

    /// A QoS 1/2 message accepted for the session; returns its sequence number.
    pub fn message(
        &mut self,
        session: u64,
        qos: QoS,
        retain: bool,
        identifiers: &[u32],
        message: &Message,
    ) -> u64 {
        let seq = self.stamp();
        let record = Record::Message {
            session,
            seq,
            qos,
            retain,
            identifiers: identifiers.to_vec(),
            message: message.clone(),
        };
        let loc = self.append(&record);
        if let Some(entry) = self.index.get_mut(&session) {
            let mut index = MessageIndex::default();
            index.body.set(loc);
            entry.messages.insert(seq, index);
        }
        seq
    }

    pub fn sent(&mut self, session: u64, seq: u64, packet_id: u16) {
        let loc = self.append(&Record::Sent { session, seq, packet_id });
        self.set_state(session, seq, loc);
    }

    pub fn released(&mut self, session: u64, seq: u64, packet_id: u16) {
        let loc = self.append(&Record::Released { session, seq, packet_id });
        self.set_state(session, seq, loc);
    }

    fn set_state(&mut self, session: u64, seq: u64, loc: Option<Loc>) {
        let old = self
            .index
            .get_mut(&session)
            .and_then(|e| e.messages.get_mut(&seq))
            .and_then(|m| m.state.set(loc));
        self.kill(old);
    }

    /// Message `seq` of `session`, read back from the log (a spilled message).
    pub fn load(&self, session: u64, seq: u64) -> Option<crate::broker::session::Spilled> {
        let loc = self.index.get(&session)?.messages.get(&seq)?.body.get()?;
        match Record::decode(self.log.read(loc)?).ok()? {
            Record::Message { qos, retain, identifiers, message, .. } => {
                Some(crate::broker::session::Spilled { qos, retain, identifiers, message })
            }
            _ => None,
        }
    }

    /// Acknowledged, dropped or handed to another session.
    pub fn done(&mut self, session: u64, seq: u64) {
        self.append_tombstone(&Record::Done { session, seq });
        if let Some(m) = self.index.get_mut(&session).and_then(|e| e.messages.remove(&seq)) {
            self.kill(m.body.get());
            self.kill(m.state.get());
        }
    }

    pub fn qos2_in(&mut self, session: u64, packet_id: u16) {
        let Some(loc) = self.append(&Record::Qos2In { session, packet_id }) else { return };
        let old = self.index.get_mut(&session).and_then(|e| e.qos2_in.insert(packet_id, loc));
        self.kill(old);
    }

    pub fn qos2_in_done(&mut self, session: u64, packet_id: u16) {
        self.append_tombstone(&Record::Qos2InDone { session, packet_id });
        let old = self.index.get_mut(&session).and_then(|e| e.qos2_in.remove(&packet_id));
        self.kill(old);
    }

    /// Whether the record at `loc` is still needed, by the index.
    fn is_live(&self, record: &Record, loc: Loc, oldest: bool) -> bool {
        let Some(entry) = record.session().and_then(|s| self.index.get(&s)) else {
            // Ended sessions: only their Ended record may still matter.
            return matches!(record, Record::Ended { .. }) && !oldest;
        };
        match record {
            Record::Open { .. } => entry.open == Some(loc),
            Record::Offline { .. } => entry.offline == Some(loc),
            Record::Subscribe { filter, .. } => entry.subs.get(filter.as_str()) == Some(&loc),
            Record::Message { seq, .. } => entry.messages.get(seq).is_some_and(|m| m.body.get() == Some(loc)),
            Record::Sent { seq, .. } | Record::Released { seq, .. } => {
                entry.messages.get(seq).is_some_and(|m| m.state.get() == Some(loc))
            }
            Record::Qos2In { packet_id, .. } => entry.qos2_in.get(packet_id) == Some(&loc),
            Record::Unsubscribe { filter, .. } => !oldest && !entry.subs.contains_key(filter.as_str()),
            Record::Qos2InDone { packet_id, .. } => !oldest && !entry.qos2_in.contains_key(packet_id),
            Record::Done { .. } => !oldest,
            Record::Ended { .. } | Record::RetainedSet(_) | Record::RetainedDelete(_) => false,
        }
    }

    /// Drops the process's mapping of logged pages (see `Log::release_pages`).
    pub fn release_pages(&mut self) -> usize {
        self.log.release_pages()
    }

    /// Bytes and segment files the log holds on disk.
    pub fn disk_usage(&self) -> (u64, usize) {
        (self.log.disk_bytes(), self.log.segment_count())
    }

    /// One compaction step: copies the live records of the sparsest sealed segment
    /// forward and retires it (the next flush job deletes it). Whether there was one.
    pub fn compact(&mut self) -> Result<bool, StorageError> {
        let (seq, oldest) = match self.log.next_compaction(self.compact_below)? {
            Compaction::Idle => return Ok(false),
            Compaction::Retired => return Ok(true),
            Compaction::CopyOut { seq, oldest } => (seq, oldest),
        };
        for loc in self.log.records(seq) {
            // A message record is only copied: its liveness is in its first bytes.
            if let Some((session, message)) = self.log.read(loc).and_then(super::record::peek_message) {
                let body = self.index.get(&session).and_then(|e| e.messages.get(&message)?.body.get());
                if body != Some(loc) {
                    continue;
                }
                if let Some(moved) = self.log.copy_forward(loc)? {
                    let entry = self.index.get_mut(&session).and_then(|e| e.messages.get_mut(&message));
                    if let Some(index) = entry {
                        index.body.set(Some(moved));
                    }
                }
                continue;
            }
            let Some(record) = self.log.read(loc).and_then(|p| Record::decode(p).ok()) else { continue };
            if !self.is_live(&record, loc, oldest) {
                continue;
            }
            if let Some(moved) = self.log.copy_forward(loc)? {
                self.moved(&record, moved);
            }
        }
        self.log.retire_segment(seq);
        Ok(true)
    }

    /// Points the index at a record's new place (tombstones stay garbage).
    fn moved(&mut self, record: &Record, loc: Loc) {
        let entry = record.session().and_then(|s| self.index.get_mut(&s));
        let slot: Option<&mut Loc> = match (entry, record) {
            (Some(e), Record::Open { .. }) => e.open.as_mut(),
            (Some(e), Record::Offline { .. }) => e.offline.as_mut(),
            (Some(e), Record::Subscribe { filter, .. }) => e.subs.get_mut(filter.as_str()),
            (Some(e), Record::Message { seq, .. }) => {
                if let Some(m) = e.messages.get_mut(seq).filter(|m| m.body.get().is_some()) {
                    m.body.set(Some(loc));
                    return;
                }
                None
            }
            (Some(e), Record::Sent { seq, .. } | Record::Released { seq, .. }) => {
                if let Some(m) = e.messages.get_mut(seq).filter(|m| m.state.get().is_some()) {
                    m.state.set(Some(loc));
                    return;
                }
                None
            }
            (Some(e), Record::Qos2In { packet_id, .. }) => e.qos2_in.get_mut(packet_id),
            _ => None,
        };
        match slot {
            Some(slot) => *slot = loc,
            None => self.log.kill(loc),
        }
    }

    /// Retired segments the last flush job deleted.
    pub fn flushed(&mut self, deleted: &[u64]) {
        self.log.deleted(deleted);
    }

    pub fn has_retired(&self) -> bool {
        self.log.has_retired()
    }

    pub fn take_flush(&mut self) -> Option<FlushJob> {
        let job = self.log.take_flush();
        (!job.is_empty()).then_some(job)
    }
}

/// The sequence number or stamp a record carries (0 for none).
fn record_seq(record: &Record) -> u64 {
    match record {
        Record::Open { stamp, .. } | Record::Offline { stamp, .. } => *stamp,
        Record::Message { seq, .. }
        | Record::Sent { seq, .. }
        | Record::Released { seq, .. }
        | Record::Done { seq, .. } => *seq,
        _ => 0,
    }
}

/// Keeps the index of live records while a log is replayed; what a record supersedes goes
/// to `dead`.
fn index_record(index: &mut AHashMap<u64, SessionIndex>, record: &Record, loc: Loc, dead: &mut Vec<Loc>) {
    let Some(session) = record.session() else {
        dead.push(loc);
        return;
    };
    if let Record::Ended { .. } = record {
        dead.push(loc);
        if let Some(entry) = index.remove(&session) {
            dead.extend(entry.locs());
        }
        return;
    }
    let e = index.entry(session).or_default();
    let old = match record {
        // Compaction may have moved an older Open after a newer Offline: stamps order them.
        Record::Open { stamp, .. } => {
            e.open_stamp = *stamp;
            if e.offline_stamp < *stamp {
                dead.extend(e.offline.take());
                e.offline_state = None;
            }
            e.open.replace(loc)
        }
        Record::Offline { stamp, .. } if *stamp < e.open_stamp => Some(loc),
        Record::Offline { stamp, at, expiry, .. } => {
            e.offline_stamp = *stamp;
            e.offline_state = Some((*at, *expiry));
            e.offline.replace(loc)
        }
        Record::Subscribe { filter, .. } => e.subs.insert(filter.as_str().to_string(), loc),
        Record::Unsubscribe { filter, .. } => {
            dead.push(loc);
            e.subs.remove(filter.as_str())
        }
        Record::Message { seq, .. } => e.messages.entry(*seq).or_default().body.set(Some(loc)),
        Record::Sent { seq, .. } | Record::Released { seq, .. } => {
            e.messages.entry(*seq).or_default().state.set(Some(loc))
        }
        Record::Done { seq, .. } => {
            dead.push(loc);
            match e.messages.remove(seq) {
                Some(m) => {
                    dead.extend(m.body.get());
                    m.state.get()
                }
                None => None,
            }
        }
        Record::Qos2In { packet_id, .. } => e.qos2_in.insert(*packet_id, loc),
        Record::Qos2InDone { packet_id, .. } => {
            dead.push(loc);
            e.qos2_in.remove(packet_id)
        }
        Record::Ended { .. } | Record::RetainedSet(_) | Record::RetainedDelete(_) => None,
    };
    dead.extend(old);
}

#[cfg(test)]
#[path = "session_log_tests.rs"]
mod tests;
