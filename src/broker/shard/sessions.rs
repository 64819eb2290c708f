//! The shard's table of sessions: each [`Session`] paired with the connection attached to
//! it and its place in the session log, and the surroundings ([`Io`]) every session call
//! is given. The sessions themselves hold neither.

use std::cell::{RefCell, RefMut};
use std::rc::Rc;
use std::time::Instant;

use ahash::AHashMap;

use crate::broker::conn_handle::ConnHandle;
use crate::broker::message::Message;
use crate::broker::session::{Io, Journal, NoJournal, Session, SessionId, SessionLimits};
use crate::codec::{Connect, ProtocolVersion, QoS};
use crate::storage::SessionLog;

/// The shard's session log, shared with the flusher.
pub type SharedLog = Rc<RefCell<SessionLog>>;

/// A session and what the shard keeps beside it.
pub struct SessionEntry {
    pub session: Session,
    /// The connection attached, while there is one.
    pub conn: Option<Rc<ConnHandle>>,
    /// Its number in the session log, while it is persistent and the broker keeps a data
    /// directory.
    pub journal: Option<u64>,
}

/// The sessions whose client identifiers hash to this shard.
pub struct SessionTable {
    entries: AHashMap<SessionId, SessionEntry>,
    by_client: AHashMap<String, SessionId>,
    /// The persistent sessions' log, with a data directory.
    pub log: Option<SharedLog>,
    pub limits: SessionLimits,
}

/// A persistent session's records, appended to the shard's session log.
struct LogJournal<'a> {
    log: RefMut<'a, SessionLog>,
    id: u64,
}

impl Journal for LogJournal<'_> {
    fn message(&mut self, qos: QoS, retain: bool, identifiers: &[u32], message: &Message) -> u64 {
        self.log.message(self.id, qos, retain, identifiers, message)
    }
    fn sent(&mut self, seq: u64, packet_id: u16) {
        self.log.sent(self.id, seq, packet_id)
    }
    fn released(&mut self, seq: u64, packet_id: u16) {
        self.log.released(self.id, seq, packet_id)
    }
    fn done(&mut self, seq: u64) {
        self.log.done(self.id, seq)
    }
    fn qos2_in(&mut self, packet_id: u16) {
        self.log.qos2_in(self.id, packet_id)
    }
    fn qos2_in_done(&mut self, packet_id: u16) {
        self.log.qos2_in_done(self.id, packet_id)
    }
}

/// Runs `f` with `entry`'s session and its surroundings.
pub fn with_io<R>(
    entry: &mut SessionEntry,
    log: Option<&SharedLog>,
    limits: &SessionLimits,
    f: impl FnOnce(&mut Session, &mut Io<'_, ConnHandle>) -> R,
) -> R {
    let link = entry.conn.as_deref();
    match (entry.journal, log) {
        (Some(id), Some(log)) => {
            let mut journal = LogJournal { log: log.borrow_mut(), id };
            f(&mut entry.session, &mut Io { link, journal: &mut journal, limits })
        }
        _ => f(&mut entry.session, &mut Io { link, journal: &mut NoJournal, limits }),
    }
}

impl SessionTable {
    pub fn new(limits: SessionLimits) -> SessionTable {
        SessionTable { entries: AHashMap::new(), by_client: AHashMap::new(), log: None, limits }
    }

    pub fn get(&self, sid: &SessionId) -> Option<&Session> {
        self.entries.get(sid).map(|e| &e.session)
    }

    pub fn get_mut(&mut self, sid: &SessionId) -> Option<&mut Session> {
        self.entries.get_mut(sid).map(|e| &mut e.session)
    }

    pub fn entry(&self, sid: &SessionId) -> Option<&SessionEntry> {
        self.entries.get(sid)
    }

    pub fn entry_mut(&mut self, sid: &SessionId) -> Option<&mut SessionEntry> {
        self.entries.get_mut(sid)
    }

    pub fn contains_key(&self, sid: &SessionId) -> bool {
        self.entries.contains_key(sid)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &Session> {
        self.entries.values().map(|e| &e.session)
    }

    pub fn entries(&self) -> impl Iterator<Item = &SessionEntry> {
        self.entries.values()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        self.entries.values_mut().map(|e| &mut e.session)
    }

    /// The session of a client identifier.
    pub fn of_client(&self, client_id: &str) -> Option<SessionId> {
        self.by_client.get(client_id).copied()
    }

    pub fn insert(&mut self, session: Session) {
        self.by_client.insert(session.client_id.clone(), session.id);
        self.entries.insert(session.id, SessionEntry { session, conn: None, journal: None });
    }

    pub fn remove(&mut self, sid: &SessionId) -> Option<SessionEntry> {
        let entry = self.entries.remove(sid)?;
        if self.by_client.get(&entry.session.client_id) == Some(sid) {
            self.by_client.remove(&entry.session.client_id);
        }
        Some(entry)
    }

    /// Session `sid`'s entry beside the log and bounds its calls need.
    pub fn split(
        &mut self,
        sid: &SessionId,
    ) -> Option<(&mut SessionEntry, Option<&SharedLog>, &SessionLimits)> {
        let entry = self.entries.get_mut(sid)?;
        Some((entry, self.log.as_ref(), &self.limits))
    }

    /// Runs `f` with session `sid` and its surroundings; `None` without such a session.
    pub fn with<R>(
        &mut self,
        sid: &SessionId,
        f: impl FnOnce(&mut Session, &mut Io<'_, ConnHandle>) -> R,
    ) -> Option<R> {
        let entry = self.entries.get_mut(sid)?;
        Some(with_io(entry, self.log.as_ref(), &self.limits, f))
    }

    /// Appends to `sid`'s log records, when it has any.
    pub fn journal(&self, sid: &SessionId, write: impl FnOnce(&mut SessionLog, u64)) {
        if let (Some(id), Some(log)) = (self.entries.get(sid).and_then(|e| e.journal), &self.log) {
            write(&mut log.borrow_mut(), id);
        }
    }

    /// Runs `f` with session `sid` and its journal (no connection needed).
    pub fn with_journal<R>(
        &mut self,
        sid: &SessionId,
        f: impl FnOnce(&mut Session, &mut dyn Journal) -> R,
    ) -> Option<R> {
        self.with(sid, |session, io| f(session, io.journal))
    }

    /// Whether CONNECT resumes an existing, unexpired session (CONNACK's session-present
    /// flag).
    pub fn present(&self, connect: &Connect, now: Instant) -> bool {
        !connect.clean_start
            && self
                .of_client(&connect.client_id)
                .is_some_and(|sid| self.get(&sid).is_some_and(|s| !s.expired_at(now)))
    }

    /// Connected, acknowledging sessions among `sid`s.
    pub fn takes_work(&self, sid: &SessionId) -> bool {
        self.get(sid).is_some_and(Session::takes_work)
    }

    /// A session's version, for events about it.
    pub fn version(&self, sid: &SessionId) -> Option<ProtocolVersion> {
        self.get(sid).map(|s| s.version)
    }
}
