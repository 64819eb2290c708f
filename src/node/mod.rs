//! This node's side of a cluster (issue 16, `--cluster`): the node bridge — one more peer of
//! the shards' mesh, on an executor thread of its own, which carries publishes to and from
//! the other nodes over node links — and the control thread that keeps the node's lease,
//! routes and membership in etcd (`cluster::` holds the pure parts and the etcd client).
//!
//! - [`frame`]: the node link's wire format (pure).
//! - [`handshake`]: how a dialling node proves it belongs to the cluster (pure).
//! - [`bridge`]: the bridge's state (sans I/O): routes, link windows, confirmations.
//! - [`tasks`]: the bridge's executor: channels to the shards, links, control events.
//! - [`control`]: the control thread and its etcd watcher.

pub mod bridge;
pub mod control;
pub mod frame;
pub mod handshake;
mod tasks;

use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};

use crate::broker::cross::{Batch, CHANNEL_CAPACITY};
use crate::broker::Global;
use crate::config::ClusterSettings;

/// glommio I/O memory of the bridge's executor (counted in the RLIMIT_MEMLOCK raise).
pub const LOCKED_MEMORY: usize = 256 << 10;

/// A shard's ends of its channels with the bridge, as a peer's: sender with the count the
/// bridge applied, receiver with the count the shard applied; and the bytes of messages the
/// bridge took from the shard's channel, in all (the shard counts what it handed the bridge
/// and the bridge has not taken against its share of `--node-link-buffer`).
pub struct ShardEnds {
    pub to_bridge: (SharedSender<Batch>, Arc<AtomicU64>),
    pub from_bridge: (SharedReceiver<Batch>, Arc<AtomicU64>),
    pub taken: Arc<AtomicU64>,
}

/// The bridge's ends, per shard: to it with the count it applied, from it with the counts
/// of messages and bytes the bridge applied.
struct BridgeEnds {
    to_shards: Vec<(SharedSender<Batch>, Arc<AtomicU64>)>,
    from_shards: Vec<(SharedReceiver<Batch>, Arc<AtomicU64>, Arc<AtomicU64>)>,
}

/// A started node side: join it after the broker stops.
pub struct NodeThreads {
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen for node links on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the node bridge: {0}")]
    Thread(String),
}

/// Binds the node link listener, and starts the control thread and the bridge's executor.
/// The shards' ends are returned for their mesh.
pub fn start(
    mut settings: ClusterSettings,
    limits: frame::FrameLimits,
    shards: usize,
    global: Arc<Global>,
    stop: Arc<AtomicBool>,
) -> Result<(Vec<ShardEnds>, NodeThreads), NodeError> {
    let bind = settings.bind;
    let listener =
        std::net::TcpListener::bind(bind).map_err(|source| NodeError::Bind { addr: bind, source })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Bind { addr: bind, source })?;
    // Port 0 (tests): the others dial the port the system picked.
    if settings.advertise.port() == 0 {
        settings.advertise.set_port(addr.port());
    }
    let mut shard_ends = Vec::with_capacity(shards);
    let mut ends = BridgeEnds { to_shards: Vec::new(), from_shards: Vec::new() };
    for _ in 0..shards {
        let (to_bridge, from_shard) = shared_channel::new_bounded(CHANNEL_CAPACITY);
        let (to_shard, from_bridge) = shared_channel::new_bounded(CHANNEL_CAPACITY);
        let (bridge_applied, shard_applied) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let taken = Arc::new(AtomicU64::new(0));
        shard_ends.push(ShardEnds {
            to_bridge: (to_bridge, bridge_applied.clone()),
            from_bridge: (from_bridge, shard_applied.clone()),
            taken: taken.clone(),
        });
        ends.to_shards.push((to_shard, shard_applied));
        ends.from_shards.push((from_shard, bridge_applied, taken));
    }
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let (requests_tx, requests_rx) = crossbeam_channel::unbounded();
    let (wake_ours, wake_theirs) = UnixStream::pair().map_err(|e| NodeError::Thread(e.to_string()))?;
    wake_theirs.set_nonblocking(true).map_err(|e| NodeError::Thread(e.to_string()))?;
    let to_bridge = control::ToBridge { events: events_tx, wake: Arc::new(wake_theirs) };
    let mut threads = Vec::new();
    {
        let (settings, stop) = (settings.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ringmq-control".into())
            .spawn(move || control::run(settings, requests_rx, to_bridge, stop))
            .map_err(|e| NodeError::Thread(e.to_string()))?;
        threads.push(thread);
    }
    let thread = std::thread::Builder::new()
        .name("ringmq-bridge".into())
        .spawn(move || {
            let builder = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .name("ringmq-bridge")
                .io_memory(LOCKED_MEMORY);
            let executor = match builder.make() {
                Ok(executor) => executor,
                Err(err) => {
                    tracing::error!(%err, "cannot start the node bridge's executor");
                    stop.store(true, std::sync::atomic::Ordering::Release);
                    return;
                }
            };
            let inputs =
                tasks::Inputs { listener, events: events_rx, wake: wake_ours, requests: requests_tx, limits };
            executor.run(tasks::run(settings, shards, global, stop, ends, inputs));
        })
        .map_err(|e| NodeError::Thread(e.to_string()))?;
    threads.push(thread);
    Ok((shard_ends, NodeThreads { threads, addr }))
}
