//! A `Shard` owns one core's share of the broker: the sessions whose client identifiers
//! hash to it, their subscriptions, its partition of the retained messages, and what it
//! knows of the other shards' interests. It is mutated only by tasks of its own executor;
//! other cores reach it only through [`CrossMsg`]s.
//!
//! Invariants:
//! - `by_client[id]` names an entry of `sessions` whose `client_id` is `id`.
//! - A (filter, session) pair is in `subscriptions` iff that session lists the filter.
//! - Every peer has been told (`Interest { add: true }`) of exactly the filters with at
//!   least one local subscriber; `interest` holds, per peer, the filters it told us of.
//! - `conns` holds every live connection; a session's `conn` is one of them.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::{Bytes, BytesMut};

use super::conn_handle::{ConnHandle, ConnId};
use super::cross::Handoff;
use super::mesh::{Confirm, CrossMsg, MAX_BACKLOG, MAX_BACKLOG_BYTES};
use super::message::Message;
use super::notify::{Event, Notify};
use super::placement;
use super::retained::{MemoryRetained, RetainedStore, RETAINED_PAGE};
use super::session::{Delivery, RetainedCursor, Session, SessionId, SessionLimits, Subscription};
use super::shared::{self, GroupId, GroupKey, Groups, Presence, SharedStrategy};
use super::sys::{SysAggregator, SysSnapshot};
use super::Global;
use crate::codec::{self, Connect, PacketId, ProtocolVersion, QoS, ReasonCode, Will};
use crate::config::Config;
use crate::storage::{LogMark, RecoveredSession};
use crate::topic::{SubscriptionTree, TopicFilter, TopicName};

pub mod inbound;
pub mod sessions;

use sessions::{with_io, SessionTable};

pub type ShardRef = Rc<RefCell<Shard>>;

/// Time `continue_retained` spends on local pages before leaving the rest to the shard's
/// retained task.
const RETAINED_SLICE: Duration = Duration::from_millis(1);

/// How often a CONNECT refused by `--max-sessions` may make the shard end its expired
/// sessions before the tick does.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Counters of one shard, summed across shards for `$SYS` and logs.
#[derive(Debug, Default, Clone)]
pub struct ShardStats {
    pub messages_received: u64,
    pub messages_sent: u64,
    pub messages_queued: u64,
    pub messages_dropped: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub forwarded: u64,
    pub retained_refused: u64,
}

impl ShardStats {
    fn count(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Sent => self.messages_sent += 1,
            Delivery::Queued => self.messages_queued += 1,
            Delivery::Dropped => self.messages_dropped += 1,
        }
    }
}

/// What happens to a will when its connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillAction {
    /// Normal DISCONNECT: the will is discarded (MQTT-3.1.2-10).
    Discard,
    /// Any other end: the will is published, after its delay (MQTT-3.1.2-8).
    Publish,
}

pub struct Shard {
    pub id: usize,
    pub shard_count: usize,
    pub config: Rc<Config>,
    pub global: Arc<Global>,
    pub conns: AHashMap<ConnId, Rc<ConnHandle>>,
    /// Connections whose writer still runs (connected, or flushing their last packets):
    /// the tick closes those whose client stopped reading.
    pub writers: AHashMap<ConnId, Rc<ConnHandle>>,
    pub sessions: SessionTable,
    subscriptions: SubscriptionTree<SessionId, Subscription>,
    /// Filters other shards have subscribers on; the key is the peer's shard index.
    interest: SubscriptionTree<usize, ()>,
    pub retained: Box<dyn RetainedStore>,
    /// Subscriptions held by sessions this shard logs (persistent ones): while there are
    /// any, peers forward QoS 1/2 publishes here as `DurablePublish` and wait for the append.
    durable_subs: usize,
    durable_announced: bool,
    /// The announcement that this shard has durable subscriptions, until every peer acked.
    durable_pending: Option<Rc<PendingAcks>>,
    /// Which peers have durable subscriptions.
    peer_durable: Vec<bool>,
    /// Connected, acknowledging sessions whose queues passed half their bound: the
    /// publishers that fed them wait until every one drained (see `Session::congested`).
    congested: ahash::AHashSet<SessionId>,
    /// A delivery since the last `take_pressure_hit` left its session congested.
    pressure_hit: bool,
    /// Fired when the last congested session drained.
    pub pressure_released: Rc<Event>,
    /// `--fsync always`: confirmations that wait for the next flush of the logs.
    pub awaiting_flush: Vec<Confirm>,
    /// Wakes the flusher (`--fsync always`).
    pub flush_wake: Rc<Notify>,
    fsync_always: bool,
    /// Per peer: messages waiting for the sender task.
    pub mesh_outbox: Vec<std::collections::VecDeque<CrossMsg>>,
    /// Bytes held by each per-peer outbox (`CrossMsg::size`).
    pub mesh_outbox_bytes: Vec<usize>,
    pub mesh_wake: Vec<Rc<Notify>>,
    /// Fired whenever a sender task moved a batch: publishers paused on backlog retry.
    pub mesh_drained: Rc<Event>,
    pending_interest: AHashMap<u64, Rc<PendingAcks>>,
    /// The announcement of each filter whose first local subscription peers have not all
    /// acknowledged yet: a second subscriber's SUBACK waits for it too.
    announcing: AHashMap<TopicFilter, Rc<PendingAcks>>,
    next_id: u64,
    /// Reused per publish to gather matching subscribers without allocating.
    scratch: Vec<(SessionId, Subscription)>,
    pub stats: ShardStats,
    /// Bytes the connections' writers wrote; shared with them, read for `$SYS`.
    pub bytes_sent: Rc<std::cell::Cell<u64>>,
    /// Shard 0 only: the totals behind `$SYS`.
    sys: Option<SysAggregator>,
    next_sys: Option<Instant>,
    /// The shared subscription groups this shard has members of or peers told it of.
    groups: Groups,
    /// Every group with members anywhere, by its inner filter: what a publish matches.
    shared_tree: SubscriptionTree<GroupId, ()>,
    /// Reused per publish to gather the matching groups without allocating.
    group_scratch: Vec<GroupId>,
    shared_strategy: SharedStrategy,
    shared_ack_timeout: Duration,
    /// xorshift state for the random strategy.
    random: u64,
    /// When expired sessions were last ended.
    last_sweep: Instant,
    /// Sessions whose retained fetch goes on in the retained task (see `continue_retained`).
    pub retained_ready: std::collections::VecDeque<SessionId>,
    pub retained_wake: Rc<Notify>,
    /// Peers that said `Ready` at start-up, and the event that wakes the wait for them.
    pub peers_ready: usize,
    pub peer_ready_event: Rc<Event>,
}

/// Interest acknowledgements a SUBSCRIBE waits for.
#[derive(Default)]
pub struct PendingAcks {
    remaining: std::cell::Cell<usize>,
    /// Several SUBACKs may wait for one announcement.
    done: Event,
}

impl PendingAcks {
    pub async fn wait(&self) {
        while self.remaining.get() > 0 {
            self.done.wait().await;
        }
    }
}

impl Shard {
    pub fn new(id: usize, shard_count: usize, config: Rc<Config>, global: Arc<Global>) -> Shard {
        let limits = SessionLimits {
            max_inflight: config.max_inflight,
            max_queued_messages: config.max_queued_messages,
            max_queued_bytes: config.max_queued_bytes,
            queue_qos0: config.queue_qos0,
            policy: config.queue_full_policy,
        };
        let shared_strategy = config.shared_strategy;
        let shared_ack_timeout = config.shared_ack_timeout;
        let fsync_always = config.fsync == crate::config::FsyncMode::Always && config.data_dir.is_some();
        let retained_budget = global.retained.clone();
        Shard {
            id,
            shard_count,
            config,
            global,
            conns: AHashMap::new(),
            writers: AHashMap::new(),
            sessions: SessionTable::new(limits),
            subscriptions: SubscriptionTree::new(),
            interest: SubscriptionTree::new(),
            retained: Box::new(MemoryRetained::new(retained_budget)),
            awaiting_flush: Vec::new(),
            durable_subs: 0,
            durable_announced: false,
            durable_pending: None,
            peer_durable: vec![false; shard_count],
            congested: ahash::AHashSet::new(),
            pressure_hit: false,
            pressure_released: Rc::new(Event::default()),
            flush_wake: Rc::new(Notify::default()),
            fsync_always,
            mesh_outbox: (0..shard_count).map(|_| std::collections::VecDeque::new()).collect(),
            mesh_outbox_bytes: vec![0; shard_count],
            mesh_wake: (0..shard_count).map(|_| Rc::new(Notify::default())).collect(),
            mesh_drained: Rc::new(Event::default()),
            pending_interest: AHashMap::new(),
            announcing: AHashMap::new(),
            next_id: 1,
            scratch: Vec::new(),
            stats: ShardStats::default(),
            bytes_sent: Rc::new(std::cell::Cell::new(0)),
            sys: (id == 0).then(|| SysAggregator::new(shard_count)),
            next_sys: None,
            groups: Groups::default(),
            shared_tree: SubscriptionTree::new(),
            group_scratch: Vec::new(),
            shared_strategy,
            shared_ack_timeout,
            random: 0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1),
            last_sweep: Instant::now(),
            retained_ready: std::collections::VecDeque::new(),
            retained_wake: Rc::new(Notify::default()),
            peers_ready: 0,
            peer_ready_event: Rc::new(Event::default()),
        }
    }

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
            let mut session = Session::new(sid, r.client_id.clone(), r.version, now);
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
                session.restore(message);
            }
            self.insert_session(session);
            for (filter, sub) in r.subscriptions {
                let (pending, _) = match shared::parse(&filter) {
                    Some(Ok(key)) => self.join_group(sid, filter, key, sub),
                    Some(Err(_)) => continue,
                    None => self.subscribe(sid, filter, sub),
                };
                waits.extend(pending);
            }
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

    /// Compacts the logs for at most `budget` (at least one segment each when there is
    /// work): called every tick, so a sustained stream's consumed segments go as fast as
    /// they fill, without long stalls of the executor.
    pub fn compact_logs(&mut self, budget: Duration) {
        // What was logged since the last tick leaves the process's resident memory: the
        // broker's RSS follows what it holds, not what it wrote.
        self.retained.release_pages();
        if let Some(log) = &self.sessions.log {
            log.borrow_mut().release_pages();
        }
        let started = Instant::now();
        let mut retained_done = false;
        let mut sessions_done = self.sessions.log.is_none();
        while !(retained_done && sessions_done) {
            if !retained_done {
                retained_done = !self.retained.compact().unwrap_or_else(|err| {
                    tracing::error!(shard = self.id, %err, "retained log compaction failed");
                    false
                });
            }
            if let (false, Some(log)) = (sessions_done, &self.sessions.log) {
                sessions_done = !log.borrow_mut().compact().unwrap_or_else(|err| {
                    tracing::error!(shard = self.id, %err, "session log compaction failed");
                    false
                });
            }
            if started.elapsed() >= budget {
                return;
            }
        }
    }

    /// What the logs wrote and did not flush yet.
    pub fn take_flush(&mut self) -> Vec<(LogKind, crate::storage::FlushJob)> {
        let mut jobs: Vec<_> =
            self.retained.take_flush().map(|j| (LogKind::Retained, j)).into_iter().collect();
        if let Some(log) = &self.sessions.log {
            jobs.extend(log.borrow_mut().take_flush().map(|j| (LogKind::Sessions, j)));
        }
        jobs
    }

    /// A flush job of `kind`'s log finished and deleted these retired segments.
    pub fn flush_done(&mut self, kind: LogKind, deleted: &[u64]) {
        match kind {
            LogKind::Retained => self.retained.flushed(deleted),
            LogKind::Sessions => {
                if let Some(log) = &self.sessions.log {
                    log.borrow_mut().flushed(deleted);
                }
            }
        }
    }

    /// Compacted segments wait for a flush to be deleted.
    pub fn has_retired(&self) -> bool {
        self.retained.has_retired() || self.sessions.log.as_ref().is_some_and(|l| l.borrow().has_retired())
    }

    /// Notes a session a QoS 1/2 delivery left congested.
    fn note_congestion(&mut self, sid: SessionId) {
        if self.sessions.get(&sid).is_some_and(|s| s.congested(&self.sessions.limits)) {
            self.congested.insert(sid);
            self.pressure_hit = true;
        }
    }

    /// Releases the publishers a session held back once it drained, stopped acknowledging
    /// or went away.
    fn relieve(&mut self, sid: SessionId) {
        let limits = &self.sessions.limits;
        if !self.congested.contains(&sid) || self.sessions.get(&sid).is_some_and(|s| !s.relieved(limits)) {
            return;
        }
        self.congested.remove(&sid);
        if self.congested.is_empty() {
            self.pressure_released.notify_all();
        }
    }

    /// Whether a delivery since the last call left a session congested; the caller (the
    /// publisher's reader, or a peer's receiver) then waits while `under_pressure`.
    pub fn take_pressure_hit(&mut self) -> bool {
        std::mem::take(&mut self.pressure_hit)
    }

    /// Whether a session other than `except` (the waiting publisher's own: a client that
    /// subscribes to what it publishes must keep reading its acknowledgements) is congested.
    pub fn under_pressure(&self, except: Option<SessionId>) -> bool {
        self.congested.iter().any(|sid| Some(*sid) != except)
    }

    /// A fresh identifier for connections, sessions and tokens.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Every other shard's index.
    fn peers(&self) -> impl Iterator<Item = usize> {
        let me = self.id;
        (0..self.shard_count).filter(move |p| *p != me)
    }

    pub fn send_to(&mut self, peer: usize, msg: CrossMsg) {
        self.mesh_outbox_bytes[peer] += msg.size();
        self.mesh_outbox[peer].push_back(msg);
        self.mesh_wake[peer].notify();
    }

    /// Whether publishers on this shard should pause until a peer drains.
    pub fn mesh_backlogged(&self) -> bool {
        self.mesh_outbox
            .iter()
            .zip(&self.mesh_outbox_bytes)
            .any(|(q, b)| q.len() >= MAX_BACKLOG || *b >= MAX_BACKLOG_BYTES)
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

    /// Whether `sid` may subscribe to `filter`: replacing one of its subscriptions always,
    /// a new one within `--max-subscriptions-per-client` and `--max-subscriptions`.
    pub fn subscription_room(&self, sid: SessionId, filter: &TopicFilter) -> Result<(), &'static str> {
        let Some(session) = self.sessions.get(&sid) else { return Ok(()) };
        if session.subscriptions.contains_key(filter) {
            return Ok(());
        }
        if session.subscriptions.len() >= self.config.max_subscriptions_per_client {
            return Err("--max-subscriptions-per-client reached");
        }
        if self.global.subscriptions.load(std::sync::atomic::Ordering::Relaxed)
            >= self.config.max_subscriptions
        {
            return Err("--max-subscriptions reached");
        }
        Ok(())
    }

    /// Adds a session to this shard's, and to the broker's count.
    fn insert_session(&mut self, session: Session) {
        super::adjust(&self.global.sessions, 1);
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
    pub fn connect(&mut self, conn: Rc<ConnHandle>, connect: &Connect) -> (SessionId, bool) {
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
                old.close(Some(ReasonCode::SessionTakenOver));
                self.conns.remove(&old.id);
                self.connection_ended(sid, WillAction::Publish, now);
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
                self.insert_session(Session::new(sid, connect.client_id.clone(), connect.protocol, now));
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
                    );
                    entry.journal = Some(id);
                }
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
            with_io(entry, log, limits, |session, io| session.attach(conn.version, receive_maximum, io));
            self.durable_subscriptions_changed(delta);
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

    fn connection_ended(&mut self, sid: SessionId, will: WillAction, now: Instant) {
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
    fn fire_due_sessions(&mut self, now: Instant) {
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
    fn fire_due(&mut self, sid: SessionId, now: Instant) {
        let Some(session) = self.sessions.get(&sid) else { return };
        if !session.is_attached() && session.expires_at.is_some_and(|at| at <= now) {
            self.end_session(sid);
            return;
        }
        if session.will_at.is_some_and(|at| at <= now) {
            self.publish_will(sid);
        }
    }

    fn publish_will(&mut self, sid: SessionId) {
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        session.will_at = None;
        let Some(will) = session.will.take() else { return };
        let will = *will;
        let message = Message::new(will.topic, will.payload, will.qos, will.retain, &will.properties);
        tracing::debug!(client_id = %session.client_id, topic = %message.topic, "publishing will");
        self.sessions.journal(&sid, |log, id| log.will_published(id));
        self.publish(None, message, None);
    }

    /// Ends a session: its pending will is published, its subscriptions removed.
    pub fn end_session(&mut self, sid: SessionId) {
        if self.sessions.get(&sid).is_some_and(|s| s.will_at.is_some()) {
            self.publish_will(sid);
        }
        let Some(entry) = self.sessions.remove(&sid) else { return };
        let session = entry.session;
        super::adjust(&self.global.sessions, -1);
        self.relieve(sid);
        if let (Some(id), Some(log)) = (entry.journal, &self.sessions.log) {
            log.borrow_mut().ended(id);
            self.durable_subscriptions_changed(-(session.subscriptions.len() as isize));
        }
        super::adjust(&self.global.subscriptions, -(session.subscriptions.len() as isize));
        for filter in session.subscriptions.keys() {
            self.remove_subscription(sid, filter);
        }
    }

    /// Lists a subscription in its session (and its store, when persistent). Returns
    /// whether it replaced one, or `None` without such a session.
    fn record_subscription(
        &mut self,
        sid: SessionId,
        filter: TopicFilter,
        subscription: Subscription,
    ) -> Option<bool> {
        self.sessions.journal(&sid, |log, id| log.subscribe(id, &filter, &subscription));
        let entry = self.sessions.entry_mut(&sid)?;
        let journaled = entry.journal.is_some();
        let replaced = entry.session.subscriptions.insert(filter, subscription).is_some();
        if !replaced {
            super::adjust(&self.global.subscriptions, 1);
            if journaled {
                self.durable_subscriptions_changed(1);
            }
        }
        Some(replaced)
    }

    /// Subscriptions of logged (persistent) sessions changed by `delta`. Peers learn when
    /// this shard starts or stops having any: a QoS 1/2 publish they forward here waits
    /// for its append only then, so clean-session traffic never waits on another core.
    fn durable_subscriptions_changed(&mut self, delta: isize) {
        self.durable_subs = self.durable_subs.saturating_add_signed(delta);
        let present = self.durable_subs > 0;
        if present == self.durable_announced {
            return;
        }
        self.durable_announced = present;
        if self.shard_count == 1 {
            return;
        }
        let token = if present {
            let token = self.next_id();
            let pending = Rc::new(PendingAcks::default());
            pending.remaining.set(self.shard_count - 1);
            self.pending_interest.insert(token, pending.clone());
            self.durable_pending = Some(pending);
            token
        } else {
            0
        };
        for peer in self.peers() {
            self.send_to(peer, CrossMsg::Durable { from: self.id, present, token });
        }
    }

    /// While peers have not all acknowledged that this shard has durable subscriptions, what
    /// a SUBACK (or start-up) waits for.
    pub fn durable_announcement(&self) -> Option<Rc<PendingAcks>> {
        self.durable_pending.as_ref().filter(|p| p.remaining.get() > 0).cloned()
    }

    /// Adds or replaces a subscription. Returns the acknowledgements to wait for before
    /// SUBACK (when this shard had no subscriber on the filter) and whether it existed.
    pub fn subscribe(
        &mut self,
        sid: SessionId,
        filter: TopicFilter,
        subscription: Subscription,
    ) -> (Option<Rc<PendingAcks>>, bool) {
        let Some(existed) = self.record_subscription(sid, filter.clone(), subscription) else {
            return (None, false);
        };
        let first = self.subscriptions.subscriber_count(&filter) == 0;
        self.subscriptions.insert(&filter, sid, subscription);
        if self.shard_count == 1 {
            return (None, existed);
        }
        if !first {
            // Peers may not have acknowledged the first subscriber's announcement yet.
            let pending = self.announcing.get(&filter).filter(|p| p.remaining.get() > 0).cloned();
            return (pending, existed);
        }
        let token = self.next_id();
        let pending = Rc::new(PendingAcks::default());
        pending.remaining.set(self.shard_count - 1);
        self.pending_interest.insert(token, pending.clone());
        self.announcing.insert(filter.clone(), pending.clone());
        for peer in self.peers() {
            let msg = CrossMsg::Interest { from: self.id, filter: filter.clone(), add: true, token };
            self.send_to(peer, msg);
        }
        (Some(pending), existed)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&mut self, sid: SessionId, filter: &TopicFilter) -> bool {
        let Some(session) = self.sessions.get_mut(&sid) else { return false };
        let existed = session.subscriptions.remove(filter).is_some();
        session.retained.cancel(filter);
        if existed {
            super::adjust(&self.global.subscriptions, -1);
        }
        if !existed {
            return false;
        }
        if self.sessions.entry(&sid).is_some_and(|e| e.journal.is_some()) {
            self.sessions.journal(&sid, |log, id| log.unsubscribe(id, filter));
            self.durable_subscriptions_changed(-1);
        }
        self.remove_subscription(sid, filter);
        true
    }

    fn remove_subscription(&mut self, sid: SessionId, filter: &TopicFilter) {
        if let Some(Ok(key)) = shared::parse(filter) {
            self.leave_group(sid, &key);
            return;
        }
        if self.subscriptions.remove(filter, &sid).is_none() {
            return;
        }
        if self.subscriptions.subscriber_count(filter) == 0 {
            self.announcing.remove(filter);
            for peer in self.peers() {
                let msg = CrossMsg::Interest { from: self.id, filter: filter.clone(), add: false, token: 0 };
                self.send_to(peer, msg);
            }
        }
    }

    /// Routes a message published on this shard (by a client, or a will): stored if
    /// retained, delivered to local subscribers, and sent once to every peer shard with a
    /// matching subscriber.
    /// Routes a message from a client or a will. With a data directory and `confirm`
    /// (QoS 1/2), every shard that may write it to a log confirms, and the returned
    /// `waits` says how many confirmations the acknowledgement waits for.
    pub fn publish(
        &mut self,
        from: Option<SessionId>,
        message: Message,
        confirm: Option<Confirm>,
    ) -> Published {
        // Only an acknowledgement compares log positions; skip the reads else.
        let before = if confirm.is_some() && self.sessions.log.is_some() {
            self.log_position()
        } else {
            LogMark::default()
        };
        self.publish_after(from, message, confirm, before)
    }

    /// [`Shard::publish`] when what the acknowledgement covers began to be logged at log
    /// position `before` (a QoS 2 PUBLISH records its packet identifier first). When an
    /// append failed on the way, `confirm` is refused (`failed`: no acknowledgement).
    pub fn publish_after(
        &mut self,
        from: Option<SessionId>,
        message: Message,
        confirm: Option<Confirm>,
        before: LogMark,
    ) -> Published {
        self.stats.messages_received += 1;
        let confirm = confirm.filter(|_| self.sessions.log.is_some() && message.qos != QoS::AtMostOnce);
        let (matched, mut waits) = self.route(from, message, confirm);
        let mut failed = false;
        if let Some(confirm) = confirm {
            failed = self.log_position().failed_since(before);
            if failed {
                self.refuse_confirm(confirm);
            } else {
                waits += self.flush_wait(confirm, before);
            }
        }
        Published { matched, waits, failed }
    }

    /// With `--fsync always`, when this shard's logs grew since `before`: the
    /// acknowledgement `confirm` waits for the next flush (1 returned), else 0.
    pub fn flush_wait(&mut self, confirm: Confirm, before: LogMark) -> u32 {
        if !self.fsync_always || !self.log_position().wrote_since(before) {
            return 0;
        }
        self.awaiting_flush.push(confirm);
        self.flush_wake.notify();
        1
    }

    /// Records appended to this shard's logs so far, and appends that failed.
    pub fn log_position(&self) -> LogMark {
        let sessions = self.sessions.log.as_ref().map(|log| {
            let log = log.borrow();
            (log.appended(), log.failures())
        });
        let (appended, failures) = sessions.unwrap_or_default();
        LogMark {
            appended: appended + self.retained.appended(),
            failures: failures + self.retained.failures(),
        }
    }

    /// A peer asked to know when what it sent is written: now, or after the next flush
    /// when `--fsync always` and this shard wrote something for it since `before`; refused
    /// when an append failed since.
    fn confirm_written(&mut self, confirm: Confirm, before: LogMark) {
        if self.log_position().failed_since(before) {
            self.refuse_confirm(confirm);
        } else if self.flush_wait(confirm, before) == 0 {
            self.reply_confirm(confirm);
        }
    }

    /// What an acknowledgement waited for could not be appended or flushed: it is not
    /// sent, and the publisher's connection is closed (the client resends). A peer's
    /// confirmation is refused to its shard, which does that.
    pub fn refuse_confirm(&mut self, confirm: Confirm) {
        if confirm.shard != self.id {
            self.send_to(confirm.shard, CrossMsg::Refused(confirm));
            return;
        }
        if let Some(packet_id) = confirm.qos2_packet_id {
            self.sessions.with_journal(&confirm.session, |s, journal| s.release_qos2(packet_id, journal));
        }
        let Some(conn) = self.conns.get(&confirm.conn).cloned() else { return };
        tracing::warn!(client_id = %conn.client_id, "closing: a log could not be written or flushed");
        conn.close(Some(ReasonCode::UnspecifiedError));
    }

    pub fn reply_confirm(&mut self, confirm: Confirm) {
        if confirm.shard == self.id {
            self.confirmed(confirm);
        } else {
            self.send_to(confirm.shard, CrossMsg::Confirmed(confirm));
        }
    }

    /// One of the confirmations an acknowledgement waits for arrived.
    fn confirmed(&mut self, confirm: Confirm) {
        if let Some(conn) = self.conns.get(&confirm.conn) {
            conn.confirm(confirm.seq);
        }
    }

    /// Stores a retained message with its topic's owner and delivers everywhere. Returns
    /// whether any subscription matched and the confirmations asked of peers.
    fn route(&mut self, from: Option<SessionId>, message: Message, confirm: Option<Confirm>) -> (bool, u32) {
        let mut waits = 0;
        if message.retain {
            let owner = placement::owner(message.topic.as_str(), self.shard_count);
            if owner == self.id {
                self.store_retained(message.clone());
            } else {
                waits += u32::from(confirm.is_some());
                self.send_to(owner, CrossMsg::RetainSet(message.clone(), confirm));
            }
        }
        let mut peers: u128 = 0;
        self.interest.for_each_match(&message.topic, |_, peer, _| {
            peers |= 1 << *peer;
        });
        let mut matched = peers != 0;
        while peers != 0 {
            let peer = peers.trailing_zeros() as usize;
            peers &= peers - 1;
            self.stats.forwarded += 1;
            let msg = match confirm {
                Some(confirm) if self.peer_durable[peer] => {
                    waits += 1;
                    CrossMsg::DurablePublish { message: message.clone(), confirm }
                }
                _ => CrossMsg::Publish(message.clone()),
            };
            self.send_to(peer, msg);
        }
        if !self.shared_tree.is_empty() {
            let mut groups = std::mem::take(&mut self.group_scratch);
            self.shared_tree.for_each_match(&message.topic, |_, id, _| groups.push(*id));
            matched |= !groups.is_empty();
            for id in &groups {
                waits += self.route_shared(*id, &message, confirm);
            }
            groups.clear();
            self.group_scratch = groups;
        }
        (self.deliver_local(from, &message) || matched, waits)
    }

    /// Adds a member to a shared subscription group. Returns what SUBACK waits for (peers
    /// learning of the group) and whether the session was already a member.
    pub fn join_group(
        &mut self,
        sid: SessionId,
        full_filter: TopicFilter,
        key: GroupKey,
        subscription: Subscription,
    ) -> (Option<Rc<PendingAcks>>, bool) {
        let Some(existed) = self.record_subscription(sid, full_filter, subscription) else {
            return (None, false);
        };
        let id = self.group_entry(&Arc::new(key));
        if let Some(group) = self.groups.get_mut(id) {
            group.local.insert(sid, subscription);
        }
        (self.advertise_group(id, true), existed)
    }

    /// The group's number, creating it (and its place in the tree of shared filters).
    fn group_entry(&mut self, key: &Arc<GroupKey>) -> GroupId {
        let (id, new) = self.groups.entry(key, self.shard_count);
        if new {
            self.shared_tree.insert(&key.filter, id, ());
        }
        id
    }

    /// Forgets a group nobody has any more.
    fn forget_group_if_unused(&mut self, id: GroupId) {
        if let Some(group) = self.groups.remove_if_unused(id) {
            self.shared_tree.remove(&group.key.filter, &id);
        }
    }

    fn leave_group(&mut self, sid: SessionId, key: &GroupKey) {
        let Some(id) = self.groups.id(key) else { return };
        if let Some(group) = self.groups.get_mut(id) {
            group.local.remove(sid);
        }
        self.advertise_group(id, false);
    }

    /// What this shard has of a group: connected members, offline ones, or none.
    fn local_presence(&self, id: GroupId) -> Presence {
        let Some(group) = self.groups.get(id) else { return Presence::None };
        let members = &group.local.members;
        let online = members.iter().any(|(sid, _)| self.sessions.get(sid).is_some_and(Session::takes_work));
        match (online, members.is_empty()) {
            (true, _) => Presence::Online,
            (false, false) => Presence::Offline,
            (false, true) => Presence::None,
        }
    }

    /// The groups a session is a member of.
    fn groups_of(&self, sid: SessionId) -> Vec<GroupId> {
        let Some(session) = self.sessions.get(&sid) else { return Vec::new() };
        let keys = session.subscriptions.keys().filter_map(|f| shared::parse(f)?.ok());
        keys.filter_map(|key| self.groups.id(&key)).collect()
    }

    /// Called whenever a session's membership or readiness changed (it connected, left,
    /// stalled): each of its groups re-computes and advertises this shard's presence.
    fn advertise_groups_of(&mut self, sid: SessionId) {
        for id in self.groups_of(sid) {
            self.advertise_group(id, false);
        }
    }

    /// Records this shard's presence in a group (`LocalGroup::advertised`, which publishes
    /// read instead of counting members) and tells peers when it changed; forgets a group
    /// nobody has. With `ack`, returns the acknowledgements a SUBACK waits for.
    fn advertise_group(&mut self, id: GroupId, ack: bool) -> Option<Rc<PendingAcks>> {
        let presence = self.local_presence(id);
        let group = self.groups.get_mut(id)?;
        let advertised = std::mem::replace(&mut group.local.advertised, presence);
        let key = group.key.clone();
        if presence == Presence::None {
            self.forget_group_if_unused(id);
        }
        if presence == advertised || self.shard_count == 1 {
            return None;
        }
        let pending = ack.then(|| {
            let pending = Rc::new(PendingAcks::default());
            pending.remaining.set(self.shard_count - 1);
            pending
        });
        let token = match &pending {
            Some(pending) => {
                let token = self.next_id();
                self.pending_interest.insert(token, pending.clone());
                token
            }
            None => 0,
        };
        for peer in self.peers() {
            let msg = CrossMsg::SharedInterest { from: self.id, key: key.clone(), presence, token };
            self.send_to(peer, msg);
        }
        pending
    }

    fn next_random(&mut self) -> u64 {
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        self.random
    }

    /// Sends a message matching a shared group to one shard with a member. Returns the
    /// confirmations asked of peers (0 or 1). Constant work and no allocation per group.
    fn route_shared(&mut self, id: GroupId, message: &Message, confirm: Option<Confirm>) -> u32 {
        let random = self.next_random();
        let (me, strategy) = (self.id, self.shared_strategy);
        let Some(group) = self.groups.get_mut(id) else { return 0 };
        let local = group.local.advertised;
        match group.pick_shard(me, local, strategy, random) {
            Some(shard) if shard == me => {
                if !self.deliver_shared_local(id, message, None) {
                    self.stats.messages_dropped += 1;
                }
            }
            Some(shard) => {
                let key = group.key.clone();
                self.stats.forwarded += 1;
                let confirm = confirm.filter(|_| self.peer_durable[shard]);
                let msg = CrossMsg::SharedPublish { key, message: message.clone(), confirm };
                self.send_to(shard, msg);
                return u32::from(confirm.is_some());
            }
            None => self.stats.messages_dropped += 1,
        }
        0
    }

    /// Gives a message to one local member of a group, connected ones first; false when
    /// the group has no member here (other than `exclude`).
    fn deliver_shared_local(&mut self, id: GroupId, message: &Message, exclude: Option<SessionId>) -> bool {
        let random = self.next_random();
        let strategy = self.shared_strategy;
        let sessions = &self.sessions;
        let Some(group) = self.groups.get_mut(id) else { return false };
        let candidate = |online: bool| {
            move |sid: SessionId| {
                Some(sid) != exclude && sessions.get(&sid).is_some_and(|s| s.takes_work() || !online)
            }
        };
        let Some((sid, sub)) = group
            .local
            .pick(strategy, random, candidate(true))
            .or_else(|| group.local.pick(strategy, random, candidate(false)))
        else {
            return false;
        };
        let key = group.key.clone();
        let qos = message.qos.min(sub.options.qos);
        let retain = sub.options.retain_as_published && message.retain;
        let identifiers = sub.identifier.as_slice();
        let delivery = self
            .sessions
            .with(&sid, |session, io| session.deliver(message, qos, retain, identifiers, Some(key), io));
        let Some(delivery) = delivery else { return false };
        self.stats.count(delivery);
        if delivery == Delivery::Queued {
            self.note_congestion(sid);
        }
        true
    }

    /// A shared message a member gave up (its connection ended, or it stopped
    /// acknowledging): to another member taking work here or on another shard, else back
    /// to the same session's queue.
    fn redispatch_shared(&mut self, sid: SessionId, key: Arc<GroupKey>, message: Message) {
        if let Some(id) = self.groups.id(&key) {
            if self.other_local_member(id, sid) && self.deliver_shared_local(id, &message, Some(sid)) {
                return;
            }
            let random = self.next_random();
            let (me, strategy) = (self.id, self.shared_strategy);
            let online_remote = self.groups.get_mut(id).and_then(|group| {
                let shard = group.pick_shard(me, Presence::None, strategy, random)?;
                (shard != me && group.remote.get(shard) == Some(&Presence::Online)).then_some(shard)
            });
            if let Some(shard) = online_remote {
                self.send_to(shard, CrossMsg::SharedPublish { key, message, confirm: None });
                return;
            }
        }
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        let qos = session
            .subscriptions
            .iter()
            .find(|(f, _)| shared::parse(f).and_then(Result::ok).as_ref() == Some(key.as_ref()))
            .map_or(message.qos, |(_, sub)| message.qos.min(sub.options.qos));
        self.sessions.with(&sid, |session, io| session.deliver(&message, qos, false, &[], Some(key), io));
    }

    /// Whether a member of the group other than `sid` here takes work.
    fn other_local_member(&self, id: GroupId, sid: SessionId) -> bool {
        self.groups.get(id).is_some_and(|g| {
            g.local
                .members
                .iter()
                .any(|(s, _)| *s != sid && self.sessions.get(s).is_some_and(Session::takes_work))
        })
    }

    /// Whether a message of the group given up by `sid` has somewhere else to go.
    fn group_has_other_taker(&self, id: GroupId, sid: SessionId) -> bool {
        self.other_local_member(id, sid) || self.groups.get(id).is_some_and(|g| g.online_elsewhere(self.id))
    }

    /// Marks connected sessions that stopped acknowledging for `--shared-ack-timeout`
    /// (and those that started again). A stalled session no longer holds publishers back
    /// (its queue overflows by `--queue-full-policy` instead). A shared-group member that
    /// stalls gives its queued shared messages and its unacknowledged QoS 1 ones to the
    /// rest of its groups; while stalled, new messages pass it over and what still reaches
    /// its queue moves on each tick.
    fn check_stalled_sessions(&mut self, now: Instant) {
        if self.shared_ack_timeout.is_zero() {
            return;
        }
        let timeout = self.shared_ack_timeout;
        let mut changed = Vec::new();
        let mut still = Vec::new();
        for session in self.sessions.values_mut() {
            let stalled = session.check_stalled(now, timeout);
            if stalled != session.stalled {
                session.stalled = stalled;
                changed.push((session.id, stalled));
            } else if stalled {
                still.push(session.id);
            }
        }
        for (sid, stalled) in changed {
            self.relieve(sid);
            if let Some(session) = self.sessions.get(&sid).filter(|_| stalled) {
                tracing::info!(
                    client_id = %session.client_id,
                    "client stopped acknowledging: it no longer holds publishers back; its shared-subscription messages go to other members"
                );
            }
            self.advertise_groups_of(sid);
            if stalled {
                self.hand_over_stalled(sid, true);
            }
        }
        for sid in still {
            self.hand_over_stalled(sid, false);
        }
    }

    fn hand_over_stalled(&mut self, sid: SessionId, in_flight: bool) {
        let keys: ahash::AHashSet<Arc<GroupKey>> = self
            .groups_of(sid)
            .into_iter()
            .filter(|id| self.group_has_other_taker(*id, sid))
            .filter_map(|id| Some(self.groups.get(id)?.key.clone()))
            .collect();
        if keys.is_empty() {
            return;
        }
        let taken = self.sessions.with_journal(&sid, |session, journal| {
            session.take_shared_stalled(in_flight, |key| keys.contains(key), journal)
        });
        let Some(taken) = taken else { return };
        for (key, message) in taken {
            self.redispatch_shared(sid, key, message);
        }
    }

    fn store_retained(&mut self, message: Message) {
        if let Err(err) = self.retained.set(message) {
            self.stats.retained_refused += 1;
            // Every refusal counts; the log says so at 1, 2, 4, 8… (a flood stays quiet).
            if self.stats.retained_refused.is_power_of_two() {
                tracing::warn!(%err, refused = self.stats.retained_refused, "retained message not stored");
            }
        }
    }

    /// Delivers to this shard's subscribers; each session gets one copy, at the highest
    /// QoS of its matching subscriptions (MQTT-3.3.4-2), with every matching subscription's
    /// identifier (MQTT-3.3.4-3).
    /// Returns whether a subscription here matched.
    fn deliver_local(&mut self, from: Option<SessionId>, message: &Message) -> bool {
        if message.is_expired_now() {
            return false;
        }
        let mut matches = std::mem::take(&mut self.scratch);
        self.subscriptions.for_each_match(&message.topic, |_, sid, sub| {
            matches.push((*sid, *sub));
        });
        // Several subscribers may each keep a copy: a message that would pin its read
        // buffer is copied out once here, not once per subscriber.
        let own;
        let message = if matches.len() > 1 && message.qos != QoS::AtMostOnce && message.pins() {
            own = message.held();
            &own
        } else {
            message
        };
        if matches.len() > 1 {
            matches.sort_unstable_by_key(|(sid, _)| *sid);
        }
        let mut encoded = EncodedCache::default();
        let mut identifiers: Vec<u32> = Vec::new();
        let mut start = 0;
        while start < matches.len() {
            let sid = matches[start].0;
            let end = start + matches[start..].iter().take_while(|(s, _)| *s == sid).count();
            let mut best: Option<QoS> = None;
            let mut retain_as_published = false;
            identifiers.clear();
            for (_, sub) in &matches[start..end] {
                // No Local applies per subscription (MQTT-3.8.3-3).
                if sub.options.no_local && from == Some(sid) {
                    continue;
                }
                best = best.max(Some(sub.options.qos));
                retain_as_published |= sub.options.retain_as_published;
                identifiers.extend(sub.identifier);
            }
            start = end;
            let Some(sub_qos) = best else { continue };
            let Some((entry, log, limits)) = self.sessions.split(&sid) else { continue };
            let qos = message.qos.min(sub_qos);
            let retain = retain_as_published && message.retain;
            let delivery = match (&entry.conn, qos) {
                (Some(conn), QoS::AtMostOnce) if identifiers.is_empty() && conn.takes_shared_encoding() => {
                    match encoded.get(conn.version, retain, message, conn.max_packet_size) {
                        Some(bytes) => entry.session.deliver_encoded_qos0(conn.enqueue(bytes)),
                        None => Delivery::Dropped,
                    }
                }
                _ => {
                    let delivery = with_io(entry, log, limits, |session, io| {
                        session.deliver(message, qos, retain, &identifiers, None, io)
                    });
                    if delivery == Delivery::Queued {
                        self.note_congestion(sid);
                    }
                    delivery
                }
            };
            self.stats.count(delivery);
        }
        let matched = !matches.is_empty();
        matches.clear();
        self.scratch = matches;
        matched
    }

    /// Starts sending the retained messages matching a new subscription, from every shard.
    pub fn request_retained(
        &mut self,
        sid: SessionId,
        filter: TopicFilter,
        qos: QoS,
        identifier: Option<u32>,
    ) {
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        session.retained.request(filter, qos, identifier, self.shard_count);
        self.continue_retained(sid);
    }

    /// Fetches the next pages of the session's retained queries while it has room: a page
    /// asked of another shard is awaited before the next, and after `RETAINED_SLICE` of
    /// local pages the shard's retained task goes on later, so neither one subscription nor
    /// many keep the core from other work.
    pub fn continue_retained(&mut self, sid: SessionId) {
        // Called on every acknowledgement: nothing (not even a clock read) when there is
        // nothing to fetch.
        if self.sessions.get(&sid).is_none_or(|s| s.retained.is_empty()) {
            return;
        }
        let started = Instant::now();
        loop {
            let Some(ready) = self.sessions.with(&sid, |session, io| {
                let pending = &session.retained;
                !pending.asked && !pending.scheduled && io.link.is_some() && session.has_room(io)
            }) else {
                return;
            };
            let Some(session) = self.sessions.get_mut(&sid).filter(|_| ready) else { return };
            let Some(cursor) = session.retained.next_cursor() else { return };
            if cursor.shard != self.id {
                session.retained.asked = true;
                let peer = cursor.shard;
                self.send_to(peer, CrossMsg::RetainQuery { from: self.id, session: sid, cursor });
                return;
            }
            let mut messages = Vec::new();
            let next =
                self.retained.matching(&cursor.filter, cursor.after.as_ref(), RETAINED_PAGE, &mut messages);
            self.deliver_retained(sid, cursor, messages, next);
            if started.elapsed() >= RETAINED_SLICE {
                if let Some(session) = self.sessions.get_mut(&sid) {
                    session.retained.scheduled = true;
                    self.retained_ready.push_back(sid);
                    self.retained_wake.notify();
                }
                return;
            }
        }
    }

    /// Delivers a page of retained messages while the session has room; where it stops
    /// (or the page ends) its cursor goes on later. A page is not forced into a session
    /// that has no room for it: what did not fit would be dropped (MQTT-3.3.1-9 wants
    /// every one).
    fn deliver_retained(
        &mut self,
        sid: SessionId,
        mut cursor: RetainedCursor,
        messages: Vec<Message>,
        next: Option<TopicName>,
    ) {
        let stats = &mut self.stats;
        self.sessions.with(&sid, |session, io| {
            let Some((qos, identifier)) = session.retained.options(&cursor) else { return };
            for message in messages {
                if !session.has_room(io) {
                    session.retained.resume(cursor);
                    return;
                }
                let qos = message.qos.min(qos);
                stats.count(session.deliver(&message, qos, true, identifier.as_slice(), None, io));
                cursor.after = Some(message.topic);
            }
            match next {
                Some(after) => {
                    cursor.after = Some(after);
                    session.retained.resume(cursor);
                }
                None => session.retained.finish(&cursor),
            }
        });
    }

    /// The connection's outbox drained after it had no room: QoS 1/2 messages and
    /// retained pages that waited for it go on.
    pub fn on_writable(&mut self, sid: SessionId) {
        self.sessions.with(&sid, |session, io| {
            session.pump(io);
        });
        self.relieve(sid);
        self.continue_retained(sid);
    }

    pub fn on_puback(&mut self, sid: SessionId, packet_id: PacketId) {
        self.sessions.with(&sid, |session, io| {
            session.on_puback(packet_id, io);
        });
        self.relieve(sid);
        self.continue_retained(sid);
    }

    pub fn on_pubrec(&mut self, sid: SessionId, packet_id: PacketId, reason: ReasonCode) {
        self.sessions.with(&sid, |session, io| {
            session.on_pubrec(packet_id, reason, io);
        });
        self.relieve(sid);
    }

    pub fn on_pubcomp(&mut self, sid: SessionId, packet_id: PacketId) {
        self.sessions.with(&sid, |session, io| {
            session.on_pubcomp(packet_id, io);
        });
        self.relieve(sid);
        self.continue_retained(sid);
    }

    /// Keep-alive, delayed wills and session expiry. Called about once a second.
    pub fn tick(&mut self, now: Instant) {
        self.sys_tick(now);
        self.check_stalled_sessions(now);
        for conn in self.conns.values() {
            if conn.keep_alive_expired(now) {
                tracing::info!(client_id = %conn.client_id, "keep-alive timeout");
                conn.close(Some(ReasonCode::KeepAliveTimeout));
            }
        }
        let write_timeout = self.config.write_timeout;
        for conn in self.writers.values() {
            if conn.write_stalled(now, write_timeout) {
                tracing::info!(
                    client_id = %conn.client_id,
                    unread = conn.pending(),
                    "closing: the client read nothing for --write-timeout"
                );
                conn.abort();
            }
        }
        self.announcing.retain(|_, pending| pending.remaining.get() > 0);
        self.retained.purge_expired(now);
        self.measure();
        self.fire_due_sessions(now);
        // Retained pages wait for room; room appears as connections drain.
        let waiting: Vec<SessionId> =
            self.sessions.values().filter(|s| !s.retained.is_empty()).map(|s| s.id).collect();
        for sid in waiting {
            self.continue_retained(sid);
        }
    }

    /// Writes this shard's gauges (`Global::accounting`).
    fn measure(&self) {
        let Some(gauges) = self.global.gauges.get(self.id) else { return };
        let queues = self.sessions.values().map(Session::queued_bytes);
        let (queued, largest_queue) = queues.fold((0, 0), |(sum, max), b| (sum + b, max.max(b)));
        let outboxes = self.writers.values().map(|c| c.pending());
        let (outbox, largest_outbox) = outboxes.fold((0, 0), |(sum, max), b| (sum + b, max.max(b)));
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        gauges.queued_bytes.store(queued, relaxed);
        gauges.largest_queue_bytes.store(largest_queue, relaxed);
        gauges.outbox_bytes.store(outbox, relaxed);
        gauges.largest_outbox_bytes.store(largest_outbox, relaxed);
        gauges.mesh_bytes.store(self.mesh_outbox_bytes.iter().sum(), relaxed);
        gauges.ticks.fetch_add(1, relaxed);
    }

    /// Once per `--sys-interval`: this shard's counters go to shard 0, which publishes
    /// the totals.
    fn sys_tick(&mut self, now: Instant) {
        let interval = self.config.sys_interval;
        if interval.is_zero() {
            return;
        }
        let due = *self.next_sys.get_or_insert(now);
        if now < due {
            return;
        }
        self.next_sys = Some(now + interval);
        self.stats.bytes_sent = self.bytes_sent.get();
        let snapshot = SysSnapshot {
            shard: self.id,
            stats: self.stats.clone(),
            connected: self.conns.len(),
            sessions: self.sessions.len(),
            subscriptions: self.subscriptions.len(),
            retained: self.retained.len(),
        };
        if self.id != 0 {
            self.send_to(0, CrossMsg::Sys(snapshot));
            return;
        }
        let Some(sys) = self.sys.as_mut() else { return };
        sys.record(snapshot);
        for (name, value) in sys.topics(interval) {
            self.publish_sys(&format!("$SYS/broker/{name}"), value, true);
        }
    }

    fn publish_sys(&mut self, topic: &str, value: String, retain: bool) {
        let Ok(topic) = TopicName::new(Bytes::from(topic.to_string())) else { return };
        let message =
            Message::new(topic, Bytes::from(value), QoS::AtMostOnce, retain, &codec::Properties::default());
        self.route(None, message, None);
    }

    /// `$SYS/broker/clients/<client id>/connected|disconnected`, not retained.
    fn client_event(&mut self, client_id: &str, event: &str, version: ProtocolVersion) {
        if self.config.sys_interval.is_zero() {
            return;
        }
        let topic = format!("$SYS/broker/clients/{client_id}/{event}");
        // Cheap check that skips the event's work when nobody subscribes to it.
        let Ok(name) = TopicName::new(Bytes::from(topic.clone())) else { return };
        if !self.subscriptions.has_match(&name) && !self.interest.has_match(&name) {
            return;
        }
        let millis =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let payload = format!(
            "{{\"clientid\":{},\"proto_ver\":{},\"ts\":{millis}}}",
            json_string(client_id),
            version.level()
        );
        self.publish_sys(&topic, payload, false);
    }

    pub fn close_all(&mut self, reason: ReasonCode) {
        for conn in self.conns.values() {
            conn.close(Some(reason));
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

/// One encoding of a QoS 0 publish per (protocol family, retain flag), reused for every
/// subscriber that wants the same bytes: fan-out encodes once.
#[derive(Default)]
struct EncodedCache {
    entries: [Option<Bytes>; 4],
}

impl EncodedCache {
    fn get(
        &mut self,
        version: ProtocolVersion,
        retain: bool,
        message: &Message,
        max: usize,
    ) -> Option<Bytes> {
        let slot = (version.is_v5() as usize) * 2 + retain as usize;
        let bytes = match &self.entries[slot] {
            Some(bytes) => bytes.clone(),
            None => {
                let publish = message.outgoing(QoS::AtMostOnce, retain, false, None, &[]);
                let mut buf = BytesMut::with_capacity(publish.encoded_size(version));
                if let Err(err) = publish.encode(version, usize::MAX, &mut buf) {
                    tracing::debug!(%err, "publish not encodable");
                    return None;
                }
                let bytes = buf.freeze();
                self.entries[slot] = Some(bytes.clone());
                bytes
            }
        };
        // A v5 client's Maximum Packet Size: the message is skipped for it (MQTT-3.1.2-25).
        (bytes.len() <= max).then_some(bytes)
    }
}

/// Which of a shard's logs a flush job belongs to.
#[derive(Debug, Clone, Copy)]
pub enum LogKind {
    Retained,
    Sessions,
}

/// What routing a publish did.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// A subscription matched somewhere.
    pub matched: bool,
    /// Confirmations the acknowledgement waits for.
    pub waits: u32,
    /// An append failed: the acknowledgement is withheld and the connection closing.
    pub failed: bool,
}

/// Goes on with the retained fetches whose time slice ran out (`continue_retained`), one
/// session at a time, yielding the core between them.
pub async fn run_retained(shard: ShardRef) {
    let wake = shard.borrow().retained_wake.clone();
    loop {
        wake.notified().await;
        loop {
            let next = shard.borrow_mut().retained_ready.pop_front();
            let Some(sid) = next else { break };
            {
                let mut s = shard.borrow_mut();
                if let Some(session) = s.sessions.get_mut(&sid) {
                    session.retained.scheduled = false;
                }
                s.continue_retained(sid);
            }
            glommio::yield_if_needed().await;
        }
    }
}

/// Applies one message from a peer shard; a connection handed over is returned, for the
/// caller to serve.
pub fn handle_cross(shard: &ShardRef, msg: CrossMsg) -> Option<Box<Handoff>> {
    match msg {
        CrossMsg::Publish(message) => {
            shard.borrow_mut().deliver_local(None, &message);
        }
        CrossMsg::DurablePublish { message, confirm } => {
            let mut s = shard.borrow_mut();
            let before = s.log_position();
            s.deliver_local(None, &message);
            s.confirm_written(confirm, before);
        }
        CrossMsg::Confirmed(confirm) => shard.borrow_mut().confirmed(confirm),
        CrossMsg::Refused(confirm) => shard.borrow_mut().refuse_confirm(confirm),
        CrossMsg::Durable { from, present, token } => {
            let mut s = shard.borrow_mut();
            if let Some(slot) = s.peer_durable.get_mut(from) {
                *slot = present;
            }
            if token != 0 {
                s.send_to(from, CrossMsg::InterestAck { token });
            }
        }
        CrossMsg::RetainSet(message, confirm) => {
            let mut s = shard.borrow_mut();
            let before = s.log_position();
            s.store_retained(message);
            if let Some(confirm) = confirm {
                s.confirm_written(confirm, before);
            }
        }
        CrossMsg::RetainQuery { from, session, cursor } => {
            let mut s = shard.borrow_mut();
            let mut messages = Vec::new();
            let next =
                s.retained.matching(&cursor.filter, cursor.after.as_ref(), RETAINED_PAGE, &mut messages);
            s.send_to(from, CrossMsg::RetainReply { session, cursor, messages, next });
        }
        CrossMsg::RetainReply { session, cursor, messages, next } => {
            let mut s = shard.borrow_mut();
            if let Some(waiting) = s.sessions.get_mut(&session) {
                waiting.retained.asked = false;
            }
            s.deliver_retained(session, cursor, messages, next);
            s.continue_retained(session);
        }
        CrossMsg::Interest { from, filter, add, token } => {
            let mut s = shard.borrow_mut();
            if add {
                s.interest.insert(&filter, from, ());
            } else {
                s.interest.remove(&filter, &from);
            }
            if token != 0 {
                s.send_to(from, CrossMsg::InterestAck { token });
            }
        }
        CrossMsg::SharedInterest { from, key, presence, token } => {
            let mut s = shard.borrow_mut();
            let id = match s.groups.id(&key) {
                Some(id) => Some(id),
                None if presence != Presence::None => Some(s.group_entry(&key)),
                None => None,
            };
            if let Some(id) = id {
                if let Some(slot) = s.groups.get_mut(id).and_then(|g| g.remote.get_mut(from)) {
                    *slot = presence;
                }
                if presence == Presence::None {
                    s.forget_group_if_unused(id);
                }
            }
            if token != 0 {
                s.send_to(from, CrossMsg::InterestAck { token });
            }
        }
        CrossMsg::SharedPublish { key, message, confirm } => {
            let mut s = shard.borrow_mut();
            let before = s.log_position();
            let id = s.groups.id(&key);
            if !id.is_some_and(|id| s.deliver_shared_local(id, &message, None)) {
                s.stats.messages_dropped += 1;
            }
            if let Some(confirm) = confirm {
                s.confirm_written(confirm, before);
            }
        }
        CrossMsg::Sys(snapshot) => {
            if let Some(sys) = shard.borrow_mut().sys.as_mut() {
                sys.record(snapshot);
            }
        }
        CrossMsg::InterestAck { token } => {
            let mut s = shard.borrow_mut();
            if let Some(pending) = s.pending_interest.get(&token).cloned() {
                let left = pending.remaining.get().saturating_sub(1);
                pending.remaining.set(left);
                if left == 0 {
                    s.pending_interest.remove(&token);
                    pending.done.notify_all();
                }
            }
        }
        CrossMsg::Ready => {
            let mut s = shard.borrow_mut();
            s.peers_ready += 1;
            s.peer_ready_event.notify_all();
        }
        CrossMsg::Handoff(handoff) => return Some(handoff),
    }
    None
}

/// A JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
