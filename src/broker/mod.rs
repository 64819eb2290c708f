//! The broker proper: shards, connections and the mesh between cores.
//!
//! - [`shard`]: the state one core owns and the routing of a publish.
//! - [`connection`]: a client connection's reader and writer tasks.
//! - [`session`]: a client's session state machine (QoS 1/2 flows, queue, will).
//! - [`message`]: an application message as the broker holds it.
//! - [`shared`]: shared subscriptions across shards.
//! - [`retained`]: the retained-message store of a shard's partition.
//! - [`sys`]: the `$SYS` topics.
//! - [`mesh`]: the typed messages between shards and the tasks that carry them.
//! - [`placement`]: which shard owns a client identifier.
//! - [`notify`]: single-core wake-ups.

pub mod admin;
pub mod conn_handle;
pub mod connection;
pub mod core_counters;
pub mod cross;
pub mod mesh;
pub mod message;
pub mod notify;
pub mod outbox;
pub mod placement;
pub use counter::adjust;
mod counter;
/// The retained-message store lives with the logs (`storage`), below the shard.
pub use crate::storage::retained_store as retained;
pub mod session;
pub mod shard;
pub mod shared;
pub mod sys;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The little state every shard shares: counters read by all, written rarely.
/// Nothing on the publish path touches it.
#[derive(Debug, Default)]
pub struct Global {
    pub connections: AtomicUsize,
    /// Every listener, with its count of connections (for `$SYS`).
    pub listeners: Vec<Arc<ListenerInfo>>,
    pub shutdown: AtomicBool,
    /// In a cluster: the node links hold more than `--node-link-buffer` bytes waiting for
    /// other nodes (written by the node bridge, read by publishers that forwarded).
    pub cluster_backlogged: AtomicBool,
    /// In a cluster: the node could not renew its lease; it closed its clients and
    /// refuses CONNECTs until it can (set by the node bridge).
    pub fenced: AtomicBool,
    /// Every shard has recovered and learnt its peers' subscriptions: wills and expiries
    /// that fell due while the broker was down may now be applied (a will published
    /// earlier could miss a subscriber whose shard had not told the others yet).
    pub started: AtomicBool,
    /// Sessions kept, all shards together (`--max-sessions`): changed when a session is
    /// created or ends, never on the publish path.
    pub sessions: AtomicUsize,
    /// Subscriptions held, all shards together (`--max-subscriptions`), and what they hold
    /// (`--max-subscription-bytes`, counted by `session::subscription_cost`).
    pub subscriptions: AtomicUsize,
    pub subscription_bytes: AtomicUsize,
    /// Retained messages stored and the bytes they hold, with their bounds
    /// (`--max-retained-messages`, `--max-retained-bytes`): changed only by retained
    /// PUBLISHes.
    pub retained: Arc<retained::RetainedBudget>,
    /// One per shard: what it holds for its clients, as its last tick measured it.
    pub gauges: Vec<ShardGauges>,
}

impl Global {
    pub fn new(shards: usize, max_retained_messages: usize, max_retained_bytes: usize) -> Global {
        Global {
            gauges: (0..shards).map(|_| ShardGauges::default()).collect(),
            retained: Arc::new(retained::RetainedBudget::new(max_retained_messages, max_retained_bytes)),
            ..Global::default()
        }
    }

    /// The broker's bounded resources now (gauges as of each shard's last tick).
    pub fn accounting(&self) -> Accounting {
        let load = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let sum = |f: fn(&ShardGauges) -> &AtomicUsize| self.gauges.iter().map(|g| load(f(g))).sum::<usize>();
        let max =
            |f: fn(&ShardGauges) -> &AtomicUsize| self.gauges.iter().map(|g| load(f(g))).max().unwrap_or(0);
        Accounting {
            connections: load(&self.connections),
            sessions: load(&self.sessions),
            subscriptions: load(&self.subscriptions),
            subscription_bytes: load(&self.subscription_bytes),
            retained_messages: self.retained.messages(),
            retained_bytes: self.retained.bytes(),
            queued_bytes: sum(|g| &g.queued_bytes),
            largest_queue_bytes: max(|g| &g.largest_queue_bytes),
            outbox_bytes: sum(|g| &g.outbox_bytes),
            largest_outbox_bytes: max(|g| &g.largest_outbox_bytes),
            mesh_bytes: sum(|g| &g.mesh_bytes),
            parked_connections: sum(|g| &g.parked_connections),
            ticks: self.gauges.iter().map(|g| g.ticks.load(Ordering::Relaxed)).min().unwrap_or(0),
        }
    }
}

/// What one shard holds for its clients, written by its tick (once a second).
#[derive(Debug, Default)]
pub struct ShardGauges {
    /// Bytes in its sessions' queues, and in the largest one.
    pub queued_bytes: AtomicUsize,
    pub largest_queue_bytes: AtomicUsize,
    /// Bytes waiting in its connections' outboxes (being written included), and in the
    /// largest one.
    pub outbox_bytes: AtomicUsize,
    pub largest_outbox_bytes: AtomicUsize,
    /// Bytes waiting in its outboxes to other shards.
    pub mesh_bytes: AtomicUsize,
    pub parked_connections: AtomicUsize,
    /// Ticks that wrote these.
    pub ticks: AtomicU64,
}

/// A snapshot of the broker's bounded resources, in the units the bounds count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accounting {
    pub connections: usize,
    pub sessions: usize,
    pub subscriptions: usize,
    pub subscription_bytes: usize,
    pub retained_messages: usize,
    pub retained_bytes: usize,
    pub queued_bytes: usize,
    pub largest_queue_bytes: usize,
    pub outbox_bytes: usize,
    pub largest_outbox_bytes: usize,
    pub mesh_bytes: usize,
    /// Connections whose tasks ended while they were idle (`--park-after`).
    pub parked_connections: usize,
    /// The fewest ticks any shard has measured: a caller waiting for fresh gauges waits
    /// for this to grow.
    pub ticks: u64,
}

/// A claim on one of `--max-connections`; released when dropped, on whichever core the
/// connection ended up.
#[derive(Debug)]
pub struct ConnectionSlot {
    global: Arc<Global>,
    listener: Arc<ListenerInfo>,
}

impl ConnectionSlot {
    /// Claims a slot, or `None` when the broker (`max`) or the listener is full.
    pub fn claim(global: &Arc<Global>, max: usize, listener: &Arc<ListenerInfo>) -> Option<ConnectionSlot> {
        let previous = global.connections.fetch_add(1, Ordering::Relaxed);
        if previous >= max {
            global.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        if listener.connections.fetch_add(1, Ordering::Relaxed) >= listener.max_connections {
            listener.connections.fetch_sub(1, Ordering::Relaxed);
            global.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot { global: global.clone(), listener: listener.clone() })
    }

    /// The listener the connection came in on.
    pub fn listener(&self) -> &ListenerInfo {
        &self.listener
    }

    /// The same, to keep.
    pub fn listener_info(&self) -> Arc<ListenerInfo> {
        self.listener.clone()
    }
}

/// A TLS listener's configuration and the files it came from. Replaced whole on reload
/// (SIGHUP); a connection takes the current one when its handshake starts, so one already
/// established keeps the certificate it began with. Read once per TLS accept, never on
/// the publish path.
#[derive(Debug)]
pub struct TlsSlot {
    pub files: crate::config::TlsFiles,
    current: std::sync::RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsSlot {
    pub fn new(files: crate::config::TlsFiles, config: Arc<rustls::ServerConfig>) -> TlsSlot {
        TlsSlot { files, current: std::sync::RwLock::new(config) }
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        // A poisoned lock still holds a whole configuration (it is replaced, not edited).
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the files again; on failure the old configuration stays.
    pub fn reload(&self) -> Result<(), crate::tls::TlsError> {
        let fresh = crate::tls::server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

/// A WebSocket listener's endpoint.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// The request path served (`/mqtt`); others are answered 404.
    pub path: String,
    /// `Origin` headers accepted; empty: any.
    pub allowed_origins: Vec<String>,
}

/// A listener as its connections see it: its name in logs, whether a PROXY header comes
/// first, and its count of connections against its own bound.
#[derive(Debug)]
pub struct ListenerInfo {
    /// `tcp:0.0.0.0:1883`, with the port actually bound.
    pub name: Arc<str>,
    pub addr: std::net::SocketAddr,
    pub proxy_protocol: bool,
    /// The TLS configuration of a TLS listener.
    pub tls: Option<TlsSlot>,
    /// Set on a WebSocket listener (ws, or wss with `tls`).
    pub websocket: Option<WsSettings>,
    /// Authentication and authorization; `None`: anyone may connect and do anything but
    /// publish to `$SYS`.
    pub auth: Option<Arc<crate::auth::AuthSlot>>,
    pub max_connections: usize,
    pub connections: AtomicUsize,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.global.connections.fetch_sub(1, Ordering::Relaxed);
        self.listener.connections.fetch_sub(1, Ordering::Relaxed);
    }
}
