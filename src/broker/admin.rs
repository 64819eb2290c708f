//! The typed messages between the HTTP endpoint's thread and the shards: what an
//! operator may ask of a shard (its metrics, its clients, a kick, a publish) and what
//! the shard answers. The endpoint never touches a shard's state; it sends one of these
//! and waits for the reply, as one core waits for another.

use bytes::Bytes;

pub use super::core_counters::{DropReason, LatencyHistogram, LATENCY_BUCKETS_US};
use crate::codec::QoS;

/// A request and the number its reply carries back.
pub struct AdminEnvelope {
    pub id: u64,
    pub request: AdminRequest,
}

/// A reply to the request numbered `id`.
pub struct AdminAnswer {
    pub id: u64,
    pub reply: AdminReply,
}

/// Which of a shard's clients a listing wants.
#[derive(Debug, Clone, Default)]
pub struct ClientQuery {
    /// Client identifiers starting with this.
    pub prefix: Option<String>,
    /// Clients that connected with this username.
    pub username: Option<String>,
    /// The first `want` matches in client-identifier order (the caller merges shards).
    pub want: usize,
}

/// Which subscriptions a listing wants.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionQuery {
    /// Subscriptions whose filter is exactly this.
    pub filter: Option<String>,
    pub client_id: Option<String>,
    pub want: usize,
}

pub enum AdminRequest {
    /// The shard's counters and gauges now.
    Metrics,
    Clients(ClientQuery),
    /// One client, on the shard that owns its identifier.
    Client(String),
    /// Closes the client's connection (v5: DISCONNECT 0x98); `discard` also ends its
    /// session.
    Kick {
        client_id: String,
        discard: bool,
    },
    Subscriptions(SubscriptionQuery),
    /// Retained messages of this shard's partition whose topics match `filter`.
    Retained {
        filter: String,
        want: usize,
    },
    /// Removes the retained message of `topic` (on the shard that owns the topic), without
    /// delivering anything.
    DeleteRetained(String),
    /// Publishes as the broker itself (no client, no ACL), as a will is published.
    Publish {
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    },
}

pub enum AdminReply {
    Metrics(Box<ShardMetrics>),
    Clients {
        count: usize,
        first: Vec<ClientInfo>,
    },
    Client(Option<Box<ClientDetail>>),
    /// Whether the client was known.
    Kicked(bool),
    Subscriptions {
        count: usize,
        first: Vec<SubscriptionInfo>,
    },
    Retained {
        count: usize,
        first: Vec<RetainedInfo>,
    },
    /// Whether there was a retained message.
    Deleted(bool),
    /// Whether a subscription matched; `Err` why it could not be published.
    Published(Result<bool, String>),
}

/// One client as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub connected: bool,
    pub address: Option<String>,
    pub listener: Option<String>,
    /// "3.1.1" or "5.0" (of the session when offline).
    pub protocol: &'static str,
    pub core: usize,
    pub subscriptions: usize,
    pub inflight: usize,
    pub queued: usize,
}

/// One client in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientDetail {
    pub info: ClientInfo,
    pub keep_alive: Option<u16>,
    /// Unix seconds.
    pub connected_at: Option<u64>,
    /// Seconds the session outlives its connection; `None`: it ends with it.
    pub expiry_interval: Option<u32>,
    pub queued_bytes: usize,
    pub subscriptions: Vec<SubscriptionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionInfo {
    pub client_id: String,
    /// As subscribed, `$share/<group>/` included.
    pub filter: String,
    pub group: Option<String>,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub core: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedInfo {
    pub topic: String,
    pub qos: u8,
    pub payload: Bytes,
}

/// One shard's counters (since start) and gauges (now), for `/metrics` and the stats.
#[derive(Debug, Clone, Default)]
pub struct ShardMetrics {
    pub core: usize,
    /// Connections served by this core (per listener: the listeners' own counts).
    pub connections: usize,
    pub parked: usize,
    /// CONNECTs accepted, and refused per reason code name.
    pub connects: u64,
    pub connects_refused: Vec<(&'static str, u64)>,
    /// Connections ended, per reason (`normal`, `keep_alive`, `taken_over`, `kicked`,
    /// `protocol_error`, `closed`, ...).
    pub disconnects: Vec<(&'static str, u64)>,
    pub auth_failures: u64,
    pub sessions_connected: usize,
    pub sessions_offline: usize,
    pub subscriptions: usize,
    pub subscriptions_shared: usize,
    /// Per QoS 0, 1, 2.
    pub received: [u64; 3],
    pub sent: [u64; 3],
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Per [`DropReason::ALL`].
    pub dropped: [u64; DropReason::ALL.len()],
    pub retained_messages: usize,
    pub queued_messages: usize,
    pub queued_bytes: usize,
    pub inflight: usize,
    pub log_bytes: u64,
    pub log_segments: usize,
    pub log_compactions: u64,
    pub flush_latency: LatencyHistogram,
    pub delivery_latency: LatencyHistogram,
    /// Per peer core: messages and bytes waiting in this core's outbox to it.
    pub mesh_backlog: Vec<(usize, usize, usize)>,
    pub tasks_run: u64,
    /// Seconds the executor ran tasks (and polled I/O) since start.
    pub busy_seconds: f64,
    /// Of the last second or so.
    pub busy_ratio: f64,
}
