//! The shard's table of sessions: each [`Session`] paired with the connection attached to
//! it and its place in the session log, and the surroundings ([`Io`]) every session call
//! is given. The sessions themselves hold neither.

use std::cell::{RefCell, RefMut};
use std::rc::Rc;
use std::time::Instant;

use ahash::AHashMap;

use crate::broker::conn_handle::ConnHandle;
use crate::broker::message::Message;
use crate::broker::session::{Io, Journal, NoJournal, Session, SessionId, SessionLimits, Spilled};
use crate::codec::{Connect, ProtocolVersion, QoS};
use crate::storage::SessionLog;

use super::dense::DenseMap;
use super::*;

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
    /// Who its client authenticated as and the rules it is held to, on a listener with
    /// authentication (the last connection's).
    pub auth: Option<Rc<crate::auth::SessionAuth>>,
}

/// The sessions whose client identifiers hash to this shard.
pub struct SessionTable {
    entries: DenseMap<SessionEntry>,
    by_client: AHashMap<Rc<str>, SessionId>,
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
    fn spills(&self) -> bool {
        true
    }
    fn disk_full(&self) -> bool {
        !self.log.has_room()
    }
    fn load(&mut self, seq: u64) -> Option<Spilled> {
        self.log.load(self.id, seq)
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
        SessionTable { entries: DenseMap::default(), by_client: AHashMap::new(), log: None, limits }
    }

    pub fn get(&self, sid: &SessionId) -> Option<&Session> {
        self.entries.get(sid).map(|e| &e.session)
    }

    pub fn get_mut(&mut self, sid: &SessionId) -> Option<&mut Session> {
        self.entries.get_mut(sid).map(|e| &mut e.session)
    }

    /// Whether a message on `topic` may be delivered to the session, by its read rules.
    pub fn readable(&self, sid: &SessionId, topic: &str) -> bool {
        self.entries.get(sid).and_then(|e| e.auth.as_ref()).is_none_or(|auth| auth.can_read(topic))
    }

    /// Whether the session's subscriptions were judged before the rules were reloaded.
    pub fn remark_due(&self, sid: &SessionId, generation: u32) -> bool {
        self.entries.get(sid).and_then(|e| e.auth.as_ref()).is_some_and(|a| a.remarked.get() != generation)
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

    pub fn entries(&self) -> impl Iterator<Item = &SessionEntry> {
        self.entries.values()
    }

    pub fn values(&self) -> impl Iterator<Item = &Session> {
        self.entries.values().map(|e| &e.session)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        self.entries.values_mut().map(|e| &mut e.session)
    }

    /// The session of a client identifier.
    pub fn of_client(&self, client_id: &str) -> Option<SessionId> {
        self.by_client.get(client_id).copied()
    }

    /// A client identifier as the shard keeps it: shared with its session, if it has one.
    pub fn client_id(&self, client_id: &str) -> Rc<str> {
        match self.by_client.get_key_value(client_id) {
            Some((kept, _)) => kept.clone(),
            None => client_id.into(),
        }
    }

    pub fn insert(&mut self, session: Session) {
        self.by_client.insert(session.client_id.clone(), session.id);
        self.entries.insert(session.id, SessionEntry { session, conn: None, journal: None, auth: None });
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
}

impl Shard {
    /// Rebuilds the persistent sessions recovered from this shard's log, all offline: an
    /// expiry or will delay that fell due while the broker was down applies now. A session
    /// whose client was connected when the broker stopped counts as offline from now.
    /// Returns what the subscriptions wait for (peers learning of them).
    pub fn restore(&mut self, recovered: Vec<RecoveredSession>) -> Vec<Rc<PendingAcks>> {
        let Some(log) = self.sessions.log.clone() else { return Vec::new() };
        let now = Instant::now();
        let wall_now = crate::storage::record::unix_ms(std::time::SystemTime::now());
        let mut waits = Vec::new();
        for r in recovered {
            let sid = self.next_id();
            let mut session = Session::new(sid, r.client_id.as_str().into(), r.version, now);
            // Logs of earlier versions hold 3.1.1 sessions that never expired.
            session.expiry_interval = r.expiry.min(self.config.max_session_expiry);
            let offline_for = r.offline_at.map_or(0, |at| wall_now.saturating_sub(at)) / 1000;
            let left = u64::from(session.expiry_interval).saturating_sub(offline_for);
            session.expires_at = Some(now + Duration::from_secs(left));
            if let Some(will) = &r.will {
                let delay = u64::from(will.properties.will_delay_interval().unwrap_or(0));
                session.will_at = Some(now + Duration::from_secs(delay.saturating_sub(offline_for)));
            }
            let has_will = r.will.is_some();
            session.will = r.will.map(Box::new);
            session.restore_qos2(r.qos2_inbound);
            for message in r.messages {
                session.restore(message, Some(&self.sessions.limits));
            }
            session.restore_spilled(r.spilled);
            self.insert_session(session);
            // Held to its client's rules again, before anything is delivered to it.
            let auth = r.owner.as_ref().and_then(|owner| self.restored_auth(owner, &r.client_id));
            if let Some(entry) = self.sessions.entry_mut(&sid) {
                entry.auth = auth;
            }
            for (filter, sub) in r.subscriptions {
                let (pending, _) = match shared::parse(&filter) {
                    Some(Ok(key)) => self.join_group(sid, filter, key, sub),
                    Some(Err(_)) => continue,
                    None => self.subscribe(sid, filter, sub),
                };
                waits.extend(pending);
            }
            self.remark_subscriptions(sid);
            if r.offline_at.is_none() {
                log.borrow_mut().offline(r.log_id, r.expiry, has_will);
            }
            // Journaled from here: what restore itself did is in the log already.
            if let Some(entry) = self.sessions.entry_mut(&sid) {
                entry.journal = Some(r.log_id);
                let subscriptions = entry.session.subscriptions.len() as isize;
                self.durable_subscriptions_changed(subscriptions);
            }
        }
        // Wills and expiries that fell due while the broker was down apply at the first
        // tick after every shard started (see `Global::started`).
        waits
    }

    /// The rules a restored session's client is held to: its listener's (by name), or, if
    /// that listener is gone, the first one's that has authentication; none if no listener
    /// has any now.
    fn restored_auth(
        &self,
        owner: &crate::storage::record::SessionOwner,
        client_id: &str,
    ) -> Option<Rc<crate::auth::SessionAuth>> {
        let listeners = &self.global.listeners;
        let info = listeners
            .iter()
            .find(|l| *l.name == owner.listener && l.auth.is_some())
            .or_else(|| listeners.iter().find(|l| l.auth.is_some()))?;
        let identity = crate::auth::Identity {
            username: owner.username.as_deref().map(Box::from),
            verified: owner.verified,
            ..Default::default()
        };
        let slot = info.auth.clone()?;
        Some(Rc::new(crate::auth::SessionAuth::new(slot, info.name.clone(), identity, client_id)))
    }

    /// Whether `--max-sessions` leaves room for what CONNECT needs: an existing session for
    /// its client identifier is reused or replaced, not added. The count is the whole
    /// broker's, so sessions piling up on one shard cannot lock out the identifiers it owns
    /// while the others have room (shards admitting at the same moment may pass the bound
    /// by at most one each).
    pub fn has_room_for_session(&mut self, connect: &Connect) -> bool {
        let room =
            |s: &Shard| s.global.sessions.load(std::sync::atomic::Ordering::Relaxed) < s.config.max_sessions;
        if self.sessions.of_client(&connect.client_id).is_some() || room(self) {
            return true;
        }
        // Sessions that expired since the last tick still count: end them first (at most
        // once per SWEEP_EVERY, so refused CONNECTs cannot make a scan each).
        let now = Instant::now();
        if now.duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.fire_due_sessions(now);
        }
        room(self)
    }

    /// Adds a session to this shard's, and to the broker's count.
    pub(super) fn insert_session(&mut self, session: Session) {
        crate::broker::adjust(&self.global.sessions, 1);
        self.sessions.insert(session);
    }

    /// The Session Expiry Interval a CONNECT gets: what a v5 client asked for, at most
    /// `--max-session-expiry` (it is told in CONNACK when less); a 3.1.1 persistent session
    /// (`clean_session=0`) has no expiry of its own and gets the maximum, as Mosquitto's
    /// `persistent_client_expiration` does, so abandoned ones cannot pile up forever.
    pub fn session_expiry(&self, connect: &Connect) -> u32 {
        match connect.protocol {
            ProtocolVersion::V5 => {
                connect.properties.session_expiry_interval().unwrap_or(0).min(self.config.max_session_expiry)
            }
            _ if connect.clean_start => 0,
            _ => self.config.max_session_expiry,
        }
    }

    /// Whether CONNECT resumes an existing session (CONNACK's session-present flag).
    pub fn session_present(&self, connect: &Connect) -> bool {
        self.sessions.present(connect, Instant::now())
    }

    /// Attaches a new connection to its session, creating, resuming or replacing it.
    /// Returns the session and whether it was present (CONNACK's session-present flag).
    /// Whether a CONNECT as `username` (`None`: anonymous, or from a listener without
    /// authentication) may take over the session of its client identifier: with
    /// `TakeoverPolicy::SameUser`, only if that session's last client proved the same
    /// username. A session whose client proved nothing (anonymous, a listener without
    /// authentication, or restored from an older log) may be taken.
    pub fn may_take_over(&self, client_id: &str, username: Option<&str>, verified: bool) -> bool {
        if self.config.takeover == crate::config::TakeoverPolicy::Any {
            return true;
        }
        let Some(sid) = self.sessions.of_client(client_id) else { return true };
        match self.sessions.entry(&sid).and_then(|e| e.auth.as_ref()) {
            Some(owner) if owner.verified => verified && owner.username.as_deref() == username,
            _ => true,
        }
    }

    pub fn connect(
        &mut self,
        conn: Rc<ConnHandle>,
        connect: &Connect,
        auth: Option<Rc<crate::auth::SessionAuth>>,
    ) -> (SessionId, bool) {
        let now = Instant::now();
        let mut existing = self.sessions.of_client(&connect.client_id);
        // A session whose expiry passed before the tick ended it is gone.
        if let Some(sid) = existing.filter(|sid| self.sessions.get(sid).is_some_and(|s| s.expired_at(now))) {
            self.end_session(sid);
            existing = None;
        }
        if let Some(sid) = existing {
            let old_conn = self.sessions.entry(&sid).and_then(|e| e.conn.clone());
            if let Some(old) = old_conn {
                tracing::info!(client_id = %old.client_id, "session taken over by a new connection");
                self.end_connection(sid, &old, ReasonCode::SessionTakenOver);
            }
        }
        let resumed = match existing {
            Some(sid) if !connect.clean_start && self.sessions.contains_key(&sid) => Some(sid),
            Some(sid) => {
                self.end_session(sid);
                None
            }
            None => None,
        };
        let sid = match resumed {
            Some(sid) => sid,
            None => {
                let sid = self.next_id();
                self.insert_session(Session::new(sid, conn.client_id.clone(), connect.protocol, now));
                sid
            }
        };
        let receive_maximum = connect.properties.receive_maximum().map_or(usize::from(u16::MAX), usize::from);
        let expiry = self.session_expiry(connect);
        conn.session.set(sid);
        self.conns.insert(conn.id, conn.clone());
        if let Some((entry, log, limits)) = self.sessions.split(&sid) {
            let session = &mut entry.session;
            session.expiry_interval = expiry;
            // Its own copy: the will outlives the buffer the CONNECT was read into.
            session.will = connect.will.as_ref().map(|w| {
                Box::new(Will {
                    topic: w.topic.with_bytes(Bytes::copy_from_slice(w.topic.as_bytes())),
                    payload: Bytes::copy_from_slice(&w.payload),
                    ..w.clone()
                })
            });
            let had_journal = entry.journal.is_some();
            match (log, session.is_persistent()) {
                (Some(log), true) => {
                    let id = log.borrow_mut().session_opened(
                        &session.client_id,
                        conn.version,
                        expiry,
                        session.will.as_deref(),
                        auth.as_ref().map(|a| crate::storage::record::SessionOwner {
                            listener: a.listener.to_string(),
                            username: a.username.as_deref().map(str::to_string),
                            verified: a.verified,
                        }),
                    );
                    entry.journal = Some(id);
                }
                // A session resumed without expiry that is still owed spilled messages
                // keeps its log until it ends: they are read back from there.
                (_, false) if entry.session.has_spill() => {}
                (log, false) => {
                    if let (Some(id), Some(log)) = (entry.journal.take(), log) {
                        log.borrow_mut().ended(id);
                    }
                }
                (None, true) => {}
            }
            let subscriptions = entry.session.subscriptions.len() as isize;
            let delta = match (had_journal, entry.journal.is_some()) {
                (false, true) => subscriptions,
                (true, false) => -subscriptions,
                _ => 0,
            };
            entry.conn = Some(conn.clone());
            entry.auth = auth;
            with_io(entry, log, limits, |session, io| session.attach(conn.version, receive_maximum, io));
            self.durable_subscriptions_changed(delta);
        }
        if resumed.is_some() {
            // Its subscriptions were judged under its previous client's rules.
            self.remark_subscriptions(sid);
        }
        self.advertise_groups_of(sid);
        self.continue_retained(sid);
        self.client_event(&connect.client_id, "connected", connect.protocol);
        (sid, resumed.is_some())
    }

    /// A connection ended (any cause). Applies its will and its session's expiry, unless
    /// the connection had already been replaced.
    pub fn disconnected(&mut self, conn: &ConnHandle, will: WillAction) {
        if self.conns.remove(&conn.id).is_none() {
            return;
        }
        self.client_event(&conn.client_id, "disconnected", conn.version);
        self.connection_ended(conn.session.get(), will, Instant::now());
    }

    /// Closes the connection attached to `sid` for `reason` (sent to a v5 client) and
    /// applies its end now, as for any end the client did not ask for (its will included);
    /// its task, when it stops, finds it already gone.
    pub(super) fn end_connection(&mut self, sid: SessionId, conn: &ConnHandle, reason: ReasonCode) {
        conn.close(Some(reason));
        self.conns.remove(&conn.id);
        self.connection_ended(sid, WillAction::Publish, Instant::now());
    }

    pub(super) fn connection_ended(&mut self, sid: SessionId, will: WillAction, now: Instant) {
        let Some(entry) = self.sessions.entry_mut(&sid) else { return };
        entry.conn = None;
        entry.session.detach();
        self.relieve(sid);
        let Some(pending) = self.sessions.with_journal(&sid, |s, journal| s.take_shared_pending(journal))
        else {
            return;
        };
        self.advertise_groups_of(sid);
        for (key, message) in pending {
            self.redispatch_shared(sid, key, message);
        }
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        if will == WillAction::Discard {
            session.will = None;
        }
        if let Some(w) = &session.will {
            let delay = w.properties.will_delay_interval().unwrap_or(0);
            session.will_at = Some(now + Duration::from_secs(u64::from(delay)));
        }
        let (expiry, has_will) = (session.expiry_interval, session.will.is_some());
        if expiry > 0 {
            self.sessions.journal(&sid, |log, id| log.offline(id, expiry, has_will));
        }
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        match session.expiry_interval {
            // Taken over by another node: it lives until that node has it.
            _ if self.moving.contains_key(&*session.client_id) => session.expires_at = None,
            0 => {
                self.end_session(sid);
                return;
            }
            secs => session.expires_at = Some(now + Duration::from_secs(u64::from(secs))),
        }
        self.fire_due(sid, now);
    }

    /// Publishes the wills that are due and ends the sessions that expired (once every
    /// shard started: see `Global::started`).
    pub(super) fn fire_due_sessions(&mut self, now: Instant) {
        if !self.global.started.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        self.last_sweep = now;
        let due: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| {
                !s.is_attached()
                    && (s.will_at.is_some_and(|at| at <= now) || s.expires_at.is_some_and(|at| at <= now))
            })
            .map(|s| s.id)
            .collect();
        for sid in due {
            self.fire_due(sid, now);
        }
    }

    /// Publishes a will that is due and ends a session that expired.
    pub(super) fn fire_due(&mut self, sid: SessionId, now: Instant) {
        let Some(session) = self.sessions.get(&sid) else { return };
        if !session.is_attached() && session.expires_at.is_some_and(|at| at <= now) {
            self.end_session(sid);
            return;
        }
        if session.will_at.is_some_and(|at| at <= now) {
            self.publish_will(sid);
        }
    }

    pub(super) fn publish_will(&mut self, sid: SessionId) {
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        session.will_at = None;
        let Some(will) = session.will.take() else { return };
        let will = *will;
        let client_id = session.client_id.clone();
        // Checked again now: the rules may have been reloaded since CONNECT (and a will
        // restored from an older log was never checked).
        let auth = self.sessions.entry(&sid).and_then(|e| e.auth.as_ref());
        if crate::auth::is_sys(will.topic.as_str())
            || auth.is_some_and(|a| !a.can_publish(will.topic.as_str()))
        {
            tracing::info!(%client_id, topic = %will.topic, "will refused by the ACL");
            self.stats.acl_denied += 1;
            self.sessions.journal(&sid, |log, id| log.will_published(id));
            return;
        }
        let message = Message::new(will.topic, will.payload, will.qos, will.retain, &will.properties);
        tracing::debug!(%client_id, topic = %message.topic, "publishing will");
        self.sessions.journal(&sid, |log, id| log.will_published(id));
        self.publish(None, message, None);
    }

    /// Ends a session: its pending will is published, its subscriptions removed.
    pub fn end_session(&mut self, sid: SessionId) {
        if self.sessions.get(&sid).is_some_and(|s| s.will_at.is_some()) {
            self.publish_will(sid);
        }
        // Shared messages it still holds go to the group's other members.
        let shared = self
            .sessions
            .with_journal(
                &sid,
                |s, journal| if s.is_attached() { Vec::new() } else { s.take_shared_pending(journal) },
            )
            .unwrap_or_default();
        let Some(entry) = self.sessions.remove(&sid) else { return };
        let session = entry.session;
        self.session_ended(&session.client_id);
        for (key, message) in shared {
            self.redispatch_shared(sid, key, message);
        }
        crate::broker::adjust(&self.global.sessions, -1);
        self.relieve(sid);
        if let (Some(id), Some(log)) = (entry.journal, &self.sessions.log) {
            log.borrow_mut().ended(id);
            self.durable_subscriptions_changed(-(session.subscriptions.len() as isize));
        }
        crate::broker::adjust(&self.global.subscriptions, -(session.subscriptions.len() as isize));
        crate::broker::adjust(&self.global.subscription_bytes, -(session.subscriptions.bytes() as isize));
        for filter in session.subscriptions.keys() {
            self.remove_subscription(sid, filter);
        }
    }
}
