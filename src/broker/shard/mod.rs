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
use super::cross::{Confirm, CrossMsg, MAX_BACKLOG_BYTES};
use super::message::Message;
use super::notify::{Event, Notify};
use super::placement;
use super::retained::{MemoryRetained, RetainedStore, RETAINED_PAGE};
use super::session::{Delivery, RetainedCursor, Session, SessionId, SessionLimits, Subscription};
use super::shared::{self, GroupId, GroupKey, Groups, Presence, SharedStrategy};
pub use super::sys::ShardStats;
use super::sys::{SysAggregator, SysSnapshot};
use super::Global;
use crate::codec::{self, PacketId, ProtocolVersion, QoS, ReasonCode, Will};
use crate::config::Config;
use crate::storage::{LogMark, RecoveredSession};
use crate::topic::{SubscriptionTree, TopicFilter, TopicName};

pub mod admin;
pub mod cluster;
mod dense;
mod durability;
mod groups;
pub mod inbound;
mod moving;
mod peers;
mod pressure;
mod retained;
mod router;
pub mod sessions;
mod sys;

use durability::Durability;
pub use durability::LogKind;
use groups::SharedGroups;
pub use peers::handle_cross;
use peers::Peers;
use pressure::Pressure;
pub use pressure::{wait_for_congested, wait_to_fit};
pub use retained::run_retained;
use retained::RetainedPartition;
use router::Router;
use sys::Sys;

use sessions::{with_io, SessionTable};

pub type ShardRef = Rc<RefCell<Shard>>;

/// Time `continue_retained` spends on local pages before leaving the rest to the shard's
/// retained task.
const RETAINED_SLICE: Duration = Duration::from_millis(1);

/// How often a CONNECT refused by `--max-sessions` may make the shard end its expired
/// sessions before the tick does.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

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
    /// The shards' peers in the mesh: the other shards and, in a cluster, the node bridge
    /// (index `shard_count`), which carries publishes to and from the other nodes.
    pub peer_count: usize,
    pub config: Rc<Config>,
    pub global: Arc<Global>,
    pub conns: AHashMap<ConnId, Rc<ConnHandle>>,
    /// Connections whose writer still runs (connected, or flushing their last packets):
    /// the tick closes those whose client stopped reading.
    pub writers: AHashMap<ConnId, Rc<ConnHandle>>,
    /// Connections parked (their tasks ended while idle), as the connection layer counts.
    pub parked: usize,
    /// The sessions, each with its connection and log id.
    pub sessions: SessionTable,
    /// Local subscriptions and the peers' interests.
    router: Router,
    /// Shared subscription groups.
    shared: SharedGroups,
    /// This shard's partition of the retained messages.
    pub retained: RetainedPartition,
    /// Confirmations, flushing, and which shards hold durable subscriptions.
    pub durability: Durability,
    /// Congested sessions holding publishers back.
    pub pressure: Pressure,
    /// Outboxes to the other shards.
    pub peers: Peers,
    /// `$SYS` aggregation (shard 0) and timing.
    sys: Sys,
    next_id: u64,
    pub stats: ShardStats,
    /// Bytes the connections' writers wrote; shared with them, read for `$SYS`.
    pub bytes_sent: Rc<std::cell::Cell<u64>>,
    /// When expired sessions were last ended.
    last_sweep: Instant,
    /// Failed CONNECT attempts per source address.
    pub auth_failures: crate::auth::FailureLimiter,
    /// Password checks running on the blocking pool.
    pub password_checks: usize,
    /// The executor's busy time, for `/metrics`.
    pub usage: admin::ExecutorUsage,
    /// In a cluster: CONNECTs waiting for their claim, sessions arriving from other nodes.
    claims: cluster::Claims,
    /// In a cluster: sessions leaving for other nodes, until released.
    moving: AHashMap<Arc<str>, moving::Moving>,
    /// In a cluster: the barriers before they leave.
    barriers: moving::Barriers,
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
            max_spilled_bytes: config.max_spilled_bytes,
            queue_qos0: config.queue_qos0,
            policy: config.queue_full_policy,
            qos0_overflow: config.qos0_overflow,
        };
        let fsync_always = config.fsync == crate::config::FsyncMode::Always && config.data_dir.is_some();
        let retained_budget = global.retained.clone();
        let peer_count = shard_count + usize::from(config.cluster.is_some());
        Shard {
            id,
            shard_count,
            peer_count,
            sessions: SessionTable::new(limits),
            router: Router::default(),
            shared: SharedGroups::new(id, config.shared_strategy, config.shared_ack_timeout),
            retained: RetainedPartition::new(
                Box::new(MemoryRetained::new(retained_budget)),
                config.cluster.is_some(),
            ),
            durability: Durability::new(peer_count, fsync_always),
            pressure: Pressure { slow_timeout: config.slow_consumer_timeout, ..Pressure::default() },
            peers: Peers::new(peer_count, config.cluster.as_ref().map(|c| c.shard_share(shard_count))),
            sys: Sys::new(id, shard_count),
            config,
            global,
            conns: AHashMap::new(),
            writers: AHashMap::new(),
            parked: 0,
            next_id: 1,
            stats: ShardStats::default(),
            bytes_sent: Rc::new(std::cell::Cell::new(0)),
            last_sweep: Instant::now(),
            auth_failures: crate::auth::FailureLimiter::default(),
            password_checks: 0,
            usage: admin::ExecutorUsage::default(),
            claims: cluster::Claims::default(),
            moving: AHashMap::default(),
            barriers: moving::Barriers::default(),
        }
    }

    /// The node bridge's index among the peers, in a cluster.
    pub fn bridge(&self) -> Option<usize> {
        (self.peer_count > self.shard_count).then_some(self.shard_count)
    }

    /// A fresh identifier for connections, sessions and tokens.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
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
        self.check_slow_consumers(now);
        self.forget_arrivals(now);
        self.forget_announced_takeovers(now);
        self.unclaim_ended();
        // Congestions left by deliveries no publisher waits for (wills, `$SYS`): not kept.
        self.pressure.hit.clear();
        let unix_now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        for conn in self.conns.values() {
            if conn.keep_alive_expired(now) {
                tracing::info!(client_id = %conn.client_id, "keep-alive timeout");
                conn.close(Some(ReasonCode::KeepAliveTimeout));
            } else if conn.token_expired(unix_now) {
                tracing::info!(client_id = %conn.client_id, "closing: its token expired");
                conn.close(Some(ReasonCode::NotAuthorized));
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
        self.router.announcing.retain(|_, pending| pending.remaining.get() > 0);
        self.retained.store.purge_expired(now);
        self.measure();
        self.fire_due_sessions(now);
        // Retained pages wait for room; room appears as connections drain.
        let waiting: Vec<SessionId> =
            self.sessions.values().filter(|s| !s.retained.is_empty()).map(|s| s.id).collect();
        for sid in waiting {
            self.continue_retained(sid);
        }
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

#[cfg(test)]
mod tests;
