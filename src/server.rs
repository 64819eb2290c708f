//! Start-up and shutdown: locked-memory limit, one SO_REUSEPORT listener per shard, the
//! channel mesh between shards, and one pinned glommio executor per shard.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};

use crate::broker::mesh::{self, Batch, CHANNEL_CAPACITY};
use crate::broker::notify::Notify;
use crate::broker::retained::RetainedStore;
use crate::broker::shard::{LogKind, Shard, ShardRef};
use crate::broker::{connection, Global, ListenerInfo};
use crate::codec::ReasonCode;
use crate::config::{self, Config, FsyncMode};
use crate::listener;
use crate::storage::layout::{DataDirLock, Layout};
use crate::storage::{FlushJob, RetainedLog, SessionLog, StorageError};

/// One end of a channel between two shards, with the count of messages its receiver
/// applied (the sender's time bound reads it).
type MeshEnd<T> = (T, Arc<AtomicU64>);

/// Shards a broker may run: publish routing keeps peer sets in a 128-bit mask.
pub const MAX_SHARDS: usize = 128;
/// How often each shard checks for shutdown.
const TICK: Duration = Duration::from_millis(100);
/// How often keep-alive, delayed wills and session expiry are checked.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Time a shard spends compacting its logs per tick, beyond the first segment.
const COMPACTION_SLICE: Duration = Duration::from_millis(5);
/// How long shutdown waits for connections to flush their last packets.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--cores must be between 1 and {MAX_SHARDS}, got {0}")]
    Cores(usize),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("locked memory limit (RLIMIT_MEMLOCK) is {limit} bytes, {needed} are needed for {shards} shards × --io-memory; raise it (ulimit -l) or lower --io-memory")]
    MemLock { limit: u64, needed: u64, shards: usize },
    #[error("cannot start shard {shard}: {reason} (is io_uring available and permitted? kernel 5.8 or later is needed)")]
    Executor { shard: usize, reason: String },
    #[error("data directory: {0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Config(&'static str),
    #[error("TLS listener {listener}: {source}")]
    Tls { listener: String, source: crate::tls::TlsError },
    #[error("listener {listener}: {source}")]
    Auth { listener: String, source: crate::auth::AuthLoadError },
    #[error("HTTP endpoint: {0}")]
    Http(String),
    #[error("cluster: {0}")]
    Node(#[from] crate::node::NodeError),
}

/// Tells a running broker to stop. Cloneable; triggering any clone stops it.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    pub fn trigger(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// The flag itself, for threads below the server (the node's control thread).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

/// A started broker.
pub struct Broker {
    /// Every listener's address, in the configuration's order.
    listener_addrs: Vec<SocketAddr>,
    listeners: Vec<Arc<ListenerInfo>>,
    global: Arc<Global>,
    shutdown: Shutdown,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The HTTP endpoint's address and token, when it runs.
    http: Option<(Option<SocketAddr>, Arc<crate::http::TokenSlot>)>,
    /// Released after the shards stopped (and flushed).
    _data_lock: Option<DataDirLock>,
}

impl Broker {
    /// The first listener's address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener_addrs[0]
    }

    /// Every listener's address, in the configuration's order.
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.listener_addrs
    }

    /// The HTTP endpoint's address (the real port when 0 was asked for), when it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|(addr, _)| *addr)
    }

    /// Reads every TLS listener's certificate and key files again (SIGHUP): new
    /// connections get the new ones, established ones keep theirs. A listener whose files
    /// do not load keeps its old configuration; the error is logged and counted in the
    /// result (listeners reloaded, listeners that failed).
    pub fn reload_tls(&self) -> (usize, usize) {
        self.reload_each("TLS certificate", |info| {
            info.tls.as_ref().map(|tls| tls.reload().map_err(|e| e.to_string()))
        })
    }

    /// Reads the HTTP endpoint's token file and every listener's password file, ACL file
    /// and JWT key again (SIGHUP): each
    /// listener's set is replaced whole, and every later operation of every session is
    /// checked against it; a listener whose files do not load keeps its old set (logged
    /// with the file and line). Returns (listeners reloaded, listeners that failed).
    pub fn reload_auth(&self) -> (usize, usize) {
        if let Some((_, token)) = &self.http {
            token.reload();
        }
        self.reload_each("authentication files", |info| {
            info.auth.as_ref().map(|auth| auth.reload().map_err(|e| e.to_string()))
        })
    }

    /// Reloads what `reload` finds on each listener, logging each outcome.
    fn reload_each(
        &self,
        what: &str,
        reload: impl Fn(&ListenerInfo) -> Option<Result<(), String>>,
    ) -> (usize, usize) {
        let (mut reloaded, mut failed) = (0, 0);
        for info in &self.listeners {
            match reload(info) {
                None => {}
                Some(Ok(())) => {
                    reloaded += 1;
                    tracing::info!(listener = %info.name, "{what} reloaded");
                }
                Some(Err(err)) => {
                    failed += 1;
                    tracing::warn!(listener = %info.name, %err, "{what} not reloaded: the old ones stay");
                }
            }
        }
        (reloaded, failed)
    }

    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// What the broker holds against its bounds (gauges as of each shard's last tick).
    pub fn accounting(&self) -> crate::broker::Accounting {
        self.global.accounting()
    }

    /// Waits until the broker has stopped (after its [`Shutdown`] is triggered).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }

    /// Stops the broker and waits for it.
    pub fn stop(self) {
        self.shutdown.trigger();
        self.join();
    }
}

/// Starts the broker and returns once every shard is listening.
pub fn start(config: Config, shutdown: Shutdown) -> Result<Broker, StartError> {
    let shards = config.cores;
    // In a cluster the node bridge takes one of the peer masks' bits.
    if shards == 0 || shards + usize::from(config.cluster.is_some()) > MAX_SHARDS {
        return Err(StartError::Cores(shards));
    }
    if config.queue_full_policy.is_lossless() && config.slow_consumer_timeout.is_zero() {
        // Without it, clients that publish to each other could hold each other forever.
        return Err(StartError::Config(
            "--queue-full-policy backpressure or refuse needs --slow-consumer-timeout above 0",
        ));
    }
    let http_memory = if config.http.is_some() { crate::http::server::LOCKED_MEMORY } else { 0 };
    let node_memory = if config.cluster.is_some() { crate::node::LOCKED_MEMORY + (1 << 20) } else { 0 };
    raise_memlock_limit(shards, config.io_memory, http_memory + node_memory)?;
    let bound = listener::bind_all(&config.listeners, shards)?;
    let http = crate::http::bind(&config)?;
    let data_lock = match &config.data_dir {
        Some(dir) => {
            let lock = DataDirLock::acquire(dir)?;
            Layout::new(dir, shards).prepare(config.segment_size)?;
            Some(lock)
        }
        None => None,
    };
    let listener_addrs: Vec<SocketAddr> = bound.iter().map(|b| b.info.addr).collect();
    let infos: Vec<Arc<ListenerInfo>> = bound.iter().map(|b| b.info.clone()).collect();
    // Each shard's socket of every listener.
    let mut per_shard: Vec<Vec<(std::net::TcpListener, Arc<ListenerInfo>)>> =
        (0..shards).map(|_| Vec::new()).collect();
    for b in bound {
        for (shard, socket) in b.sockets.into_iter().enumerate() {
            per_shard[shard].push((socket, b.info.clone()));
        }
    }

    // One channel per ordered pair of shards: senders[from][to], receivers[to][from].
    let mut senders: Vec<Vec<Option<MeshEnd<SharedSender<Batch>>>>> =
        (0..shards).map(|_| (0..shards).map(|_| None).collect()).collect();
    let mut receivers: Vec<Vec<Option<MeshEnd<SharedReceiver<Batch>>>>> =
        (0..shards).map(|_| (0..shards).map(|_| None).collect()).collect();
    // With each, the count of messages the receiver applied, which the sender reads.
    for from in 0..shards {
        for to in (0..shards).filter(|to| *to != from) {
            let (tx, rx) = shared_channel::new_bounded(CHANNEL_CAPACITY);
            let applied = Arc::new(AtomicU64::new(0));
            senders[from][to] = Some((tx, applied.clone()));
            receivers[to][from] = Some((rx, applied));
        }
    }

    let cpus = config::available_cpus();
    let mut global = Global::new(shards, config.max_retained_messages, config.max_retained_bytes);
    global.listeners = infos.clone();
    let global = Arc::new(global);
    let (mut node_ends, node_threads) = match &config.cluster {
        Some(settings) => {
            let limits = crate::node::frame::FrameLimits::for_node(config.max_packet_size);
            let (ends, threads) =
                crate::node::start(settings.clone(), limits, shards, global.clone(), shutdown.flag())?;
            tracing::info!(node = %settings.node, links = %threads.addr, "cluster: node links listening");
            (ends.into_iter().map(Some).collect(), Some(threads))
        }
        None => ((0..shards).map(|_| None).collect::<Vec<_>>(), None),
    };
    let config = Arc::new(config);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), StartError>>();
    let mut threads = Vec::with_capacity(shards + 3);
    threads.extend(node_threads.into_iter().flat_map(|n| n.threads));
    let (mut admin_ends, endpoint_ends) = match &http {
        Some(_) => {
            let (shard_ends, endpoint) = crate::http::server::channels(shards);
            (shard_ends.into_iter().map(Some).collect(), Some(endpoint))
        }
        None => ((0..shards).map(|_| None).collect::<Vec<_>>(), None),
    };
    for (((id, listeners), tx), rx) in per_shard.into_iter().enumerate().zip(senders).zip(receivers) {
        let admin = admin_ends[id].take();
        let node = node_ends[id].take();
        let placement = match cpus.get(id % cpus.len().max(1)) {
            Some(cpu) if shards <= cpus.len() => Placement::Fixed(*cpu),
            _ => Placement::Unbound,
        };
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("ringmq-shard-{id}"))
            .io_memory(config.io_memory);
        let ready = ready_tx.clone();
        let (config, global, shutdown) = (config.clone(), global.clone(), shutdown.clone());
        let thread = std::thread::Builder::new()
            .name(format!("ringmq-{id}"))
            .spawn(move || {
                let executor = match builder.make() {
                    Ok(executor) => executor,
                    Err(err) => {
                        let _ = ready.send(Err(StartError::Executor { shard: id, reason: err.to_string() }));
                        return;
                    }
                };
                let mesh = MeshEnds { senders: tx, receivers: rx, admin, node };
                executor.run(run_shard(id, shards, config, global, shutdown, listeners, mesh, ready));
            })
            .map_err(|err| StartError::Executor { shard: id, reason: err.to_string() })?;
        threads.push(thread);
    }
    drop(ready_tx);
    // The endpoint answers /healthz (and /readyz: not yet) while the shards replay.
    let endpoint = match crate::http::start(http, endpoint_ends, global.clone(), shutdown.clone()) {
        Ok(endpoint) => endpoint,
        Err(err) => {
            shutdown.trigger();
            return Err(err);
        }
    };
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                shutdown.trigger();
                return Err(err);
            }
            Err(_) => {
                shutdown.trigger();
                return Err(StartError::Executor {
                    shard: 0,
                    reason: "executor thread ended during start-up".into(),
                });
            }
        }
    }
    let retained = &global.retained;
    if retained.messages() > retained.max_messages || retained.bytes() > retained.max_bytes {
        tracing::warn!(
            messages = retained.messages(),
            bytes = retained.bytes(),
            "the data directory holds more retained messages than --max-retained-messages/--max-retained-bytes allow: all are kept, new ones are refused until there is room"
        );
    }
    // Connected as the shards started: a caller may use the API once this returns.
    let http = endpoint.map(|e| e.finish(&mut threads));
    global.started.store(true, std::sync::atomic::Ordering::Release);
    for info in &infos {
        tracing::info!(listener = %info.name, shards, "ringmq listening");
    }
    Ok(Broker { listener_addrs, listeners: infos, global, shutdown, threads, http, _data_lock: data_lock })
}

/// Starts the broker and blocks until `shutdown` is triggered and it has stopped.
pub fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    start(config, shutdown)?.join();
    Ok(())
}

/// A shard's ends of the channels to its peers and to the HTTP endpoint.
struct MeshEnds {
    senders: Vec<Option<MeshEnd<SharedSender<Batch>>>>,
    receivers: Vec<Option<MeshEnd<SharedReceiver<Batch>>>>,
    admin: Option<crate::http::server::ShardEnds>,
    /// In a cluster: the channels with the node bridge, the last peer.
    node: Option<crate::node::ShardEnds>,
}

/// glommio registers `--io-memory` per executor with io_uring, which counts against
/// RLIMIT_MEMLOCK on many kernels: raise the limit where the process may.
fn raise_memlock_limit(shards: usize, io_memory: usize, extra: usize) -> Result<(), StartError> {
    // Each executor also locks its rings; 1 MiB per shard covers them.
    let needed = (shards as u64) * (io_memory as u64 + (1 << 20)) + extra as u64;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Ok(());
    }
    if limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur >= needed {
        return Ok(());
    }
    let raised = libc::rlimit { rlim_cur: needed.max(limit.rlim_cur), rlim_max: limit.rlim_max.max(needed) };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
        return Ok(());
    }
    let soft = libc::rlimit { rlim_cur: limit.rlim_max.min(needed), rlim_max: limit.rlim_max };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &soft) } == 0 && soft.rlim_cur >= needed {
        return Ok(());
    }
    Err(StartError::MemLock { limit: limit.rlim_max, needed, shards })
}

#[allow(clippy::too_many_arguments)]
async fn run_shard(
    id: usize,
    shards: usize,
    config: Arc<Config>,
    global: Arc<Global>,
    shutdown: Shutdown,
    listeners: Vec<(std::net::TcpListener, Arc<ListenerInfo>)>,
    mesh: MeshEnds,
    ready: mpsc::Sender<Result<(), StartError>>,
) {
    let MeshEnds { mut senders, mut receivers, admin, node } = mesh;
    let config = Rc::new((*config).clone());
    let shard: ShardRef =
        Rc::new(std::cell::RefCell::new(Shard::new(id, shards, config.clone(), global.clone())));
    if let Some(node) = node {
        senders.push(Some(node.to_bridge));
        receivers.push(Some(node.from_bridge));
        shard.borrow_mut().peers.bridge_taken = node.taken;
    }
    let parker = connection::Parker::start(&shard, config.park_after);
    mesh::spawn_tasks(&shard, &parker, senders, receivers);
    glommio::spawn_local(crate::broker::shard::run_retained(shard.clone())).detach();
    if let Some(ends) = admin {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let (requests, replies) = (ends.requests.connect().await, ends.replies.connect().await);
            crate::broker::shard::admin::run_admin(shard, requests, replies).await;
        })
        .detach();
    }
    let mut flusher = None;
    if let Some(dir) = &config.data_dir {
        match recover(&shard, id, &Layout::new(dir, shards), &config) {
            Ok(mut waits) => {
                // Peers learn of the recovered subscriptions before anyone may publish.
                waits.extend(shard.borrow().durable_announcement());
                for pending in waits {
                    pending.wait().await;
                }
            }
            Err(err) => {
                let _ = ready.send(Err(StartError::Storage(err)));
                return;
            }
        }
        flusher = Some(spawn_flusher(&shard, config.fsync));
    }
    // No shard accepts a client before every shard has replayed its logs and told the
    // others its subscriptions: a publish accepted earlier could miss a subscriber whose
    // shard was still replaying, and be acknowledged and lost.
    if !mesh::all_peers_ready(&shard, || shutdown.is_triggered()).await {
        return;
    }
    let mut acceptors = Vec::with_capacity(listeners.len());
    for (socket, info) in listeners {
        let listener = match listener::listen(socket, &info) {
            Ok(listener) => listener,
            Err(err) => {
                let _ = ready.send(Err(err));
                return;
            }
        };
        let (shard, parker, global) = (shard.clone(), parker.clone(), global.clone());
        acceptors.push(glommio::spawn_local(listener::accept_loop(
            shard,
            parker,
            listener,
            global,
            config.max_connections,
            info,
        )));
    }
    let _ = ready.send(Ok(()));
    drop(ready);

    let mut last_housekeeping = Instant::now();
    while !shutdown.is_triggered() {
        glommio::timer::sleep(TICK).await;
        let now = Instant::now();
        if now.duration_since(last_housekeeping) >= HOUSEKEEPING {
            last_housekeeping = now;
            shard.borrow_mut().usage.measure(now);
            shard.borrow_mut().tick(now);
        }
        shard.borrow_mut().compact_logs(COMPACTION_SLICE);
    }
    drop(acceptors);
    shard.borrow_mut().close_all(ReasonCode::ServerShuttingDown);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while shard.borrow().connection_count() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    // Whatever the --fsync mode, a clean stop leaves the logs on the device.
    if let Some(flusher) = flusher {
        flusher.finish().await;
    }
}

/// Opens this shard's logs, loads the retained messages and rebuilds the sessions.
fn recover(
    shard: &ShardRef,
    id: usize,
    layout: &Layout,
    config: &Config,
) -> Result<Vec<Rc<crate::broker::shard::PendingAcks>>, StorageError> {
    let started = Instant::now();
    let (retained, retained_report) = RetainedLog::open(
        &layout.retained_dir(id),
        config.segment_size,
        config.compact_below,
        shard.borrow().global.retained.clone(),
    )?;
    let (mut sessions, recovered, sessions_report) = SessionLog::open_keeping(
        &layout.sessions_dir(id),
        config.segment_size,
        config.compact_below,
        config.max_queued_messages,
    )?;
    // Each shard's session log holds its share of the directory's bound; below four
    // segments it would count as full from the start (many cores, or a small bound).
    let floor = 4 * config.segment_size as u64;
    let share = config.max_disk_bytes / config.cores.max(1) as u64;
    if share < floor {
        tracing::warn!(
            shard = id,
            share,
            floor,
            "--max-disk-bytes leaves this shard's session log less than four segments: it gets four"
        );
    }
    sessions.set_max_disk_bytes(share.max(floor));
    for problem in retained_report.problems.iter().chain(&sessions_report.problems) {
        tracing::warn!(shard = id, "log recovery: {problem}");
    }
    let messages: usize = recovered.iter().map(|s| s.messages.len() + s.spilled.len()).sum();
    let session_count = recovered.len();
    let mut s = shard.borrow_mut();
    let retained_count = retained.len();
    s.retained.store = Box::new(retained);
    s.sessions.log = Some(Rc::new(std::cell::RefCell::new(sessions)));
    let waits = s.restore(recovered);
    // Replay allocated and freed much (records decoded, a map per message): give the
    // freed pages back, so RSS after a restart is what the broker holds.
    // SAFETY: plain glibc call, no pointers.
    unsafe { libc::malloc_trim(0) };
    tracing::info!(
        shard = id,
        retained = retained_count,
        sessions = session_count,
        messages,
        log_bytes = retained_report.bytes + sessions_report.bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered from the data directory"
    );
    Ok(waits)
}

/// The task that does all the flushing of a shard's logs.
struct Flusher {
    task: glommio::task::JoinHandle<()>,
    stop: Rc<Cell<bool>>,
    wake: Rc<Notify>,
}

impl Flusher {
    /// Flushes what is left and waits for it (clean stop).
    async fn finish(self) {
        self.stop.set(true);
        self.wake.notify();
        self.task.await;
    }
}

/// Starts the shard's flusher for `--fsync` `mode`; dropping the returned handle does not
/// stop it.
fn spawn_flusher(shard: &ShardRef, mode: FsyncMode) -> Flusher {
    let stop = Rc::new(Cell::new(false));
    let wake = shard.borrow().durability.flush_wake.clone();
    let task = glommio::spawn_local(run_flusher(shard.clone(), mode, stop.clone())).detach();
    Flusher { task, stop, wake }
}

/// Runs flush jobs off the executor, then tells the logs which retired segments went.
/// Returns false when a job failed (logged).
async fn run_flush(shard: &ShardRef, jobs: Vec<(LogKind, FlushJob)>) -> bool {
    let mut ok = true;
    for (kind, job) in jobs {
        let started = Instant::now();
        let done = glommio::executor().spawn_blocking(move || job.run()).await;
        shard.borrow_mut().stats.flush_latency.record(started.elapsed().as_micros() as u64);
        match done {
            Ok(deleted) => shard.borrow_mut().flush_done(kind, &deleted),
            Err(err) => {
                tracing::error!(%err, "flushing the logs failed");
                ok = false;
            }
        }
    }
    ok
}

/// The one task that flushes a shard's logs, so flush jobs never overlap: a job marks what
/// it takes as flushed, and a second job running beside it could finish first and release
/// acknowledgements whose records the first still holds.
///
/// It flushes when an acknowledgement waits (`--fsync always`: woken on demand; what
/// arrives during a flush goes with the next one, group commit), on a timer (every MS with
/// `interval:MS`; every second in the other modes, when compaction retired segments, which
/// are deleted only once what was written before is on the device), and once more when
/// `stop` is set. The confirmations taken with a job are released when it completed; when
/// it failed, they are refused: their connections are closed (the clients resend).
async fn run_flusher(shard: ShardRef, mode: FsyncMode, stop: Rc<Cell<bool>>) {
    let (every, appends) = match mode {
        FsyncMode::Interval(every) => (every, true),
        FsyncMode::Always | FsyncMode::Never => (HOUSEKEEPING, false),
    };
    let wake = shard.borrow().durability.flush_wake.clone();
    let mut due = Instant::now() + every;
    loop {
        let wait = due.saturating_duration_since(Instant::now());
        futures_lite::future::or(wake.notified(), glommio::timer::sleep(wait)).await;
        let stopping = stop.get();
        let timer = Instant::now() >= due;
        if timer {
            due = Instant::now() + every;
        }
        let (jobs, confirms) = {
            let mut s = shard.borrow_mut();
            let work = stopping
                || !s.durability.awaiting_flush.is_empty()
                || (timer && (appends || s.has_retired()));
            if !work {
                continue;
            }
            // Taken together: every confirmation here waits only for what this job holds
            // or what earlier jobs, all completed, held.
            (s.take_flush(), std::mem::take(&mut s.durability.awaiting_flush))
        };
        let ok = run_flush(&shard, jobs).await;
        let mut s = shard.borrow_mut();
        for confirm in confirms {
            if ok {
                s.reply_confirm(confirm);
            } else {
                s.refuse_confirm(confirm);
            }
        }
        drop(s);
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::future::Future;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::broker::mesh::{Confirm, CrossMsg};
    use crate::broker::message::Message;
    use crate::broker::shard::handle_cross;
    use crate::codec::{Properties, QoS};
    use crate::storage::log::test_gate::FlushGate;
    use crate::topic::TopicName;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ringmq-server-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn on_executor<F: Future<Output = ()> + 'static>(test: impl FnOnce() -> F + Send + 'static) {
        let builder = LocalExecutorBuilder::new(Placement::Unbound).io_memory(512 * 1024);
        builder.spawn(test).expect("executor").join().expect("test body");
    }

    /// Shard 0 of 2 with its logs in `dir` and small segments, `--fsync always`.
    fn durable_shard(dir: &Path) -> ShardRef {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap());
        config.cores = 2;
        config.data_dir = Some(dir.to_path_buf());
        config.fsync = FsyncMode::Always;
        config.segment_size = 4096;
        let shard: ShardRef =
            Rc::new(RefCell::new(Shard::new(0, 2, Rc::new(config.clone()), Arc::new(Global::default()))));
        recover(&shard, 0, &Layout::new(dir, 2), &config).expect("logs open");
        shard
    }

    fn retained(topic: &str, payload: &str) -> Message {
        Message::new(
            TopicName::new_allow_empty(topic.to_string()).unwrap(),
            bytes::Bytes::copy_from_slice(payload.as_bytes()),
            QoS::AtLeastOnce,
            true,
            &Properties::default(),
        )
    }

    /// Shard 1 asks shard 0 to store a retained message and confirm (acknowledgement `seq`).
    fn retain_for_peer(shard: &ShardRef, topic: &str, seq: u64) {
        let confirm = Confirm { shard: 1, conn: 7, seq, session: 0, qos2_packet_id: None };
        handle_cross(shard, CrossMsg::RetainSet(retained(topic, "v"), Some(confirm)));
    }

    /// The acknowledgements shard 0 confirmed to shard 1 so far.
    fn confirmed(shard: &ShardRef) -> Vec<u64> {
        let s = shard.borrow();
        s.peers.outbox[1]
            .iter()
            .filter_map(|m| match m {
                CrossMsg::Confirmed(c) => Some(c.seq),
                _ => None,
            })
            .collect()
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn with_fsync_always_a_confirmation_waits_until_its_flush_completed() {
        let dir = temp_dir("ack-after-flush");
        let gate = FlushGate::install(&Layout::new(&dir, 2).retained_dir(0));
        let cleanup = dir.clone();
        on_executor(move || async move {
            let shard = durable_shard(&dir);
            let _flusher = spawn_flusher(&shard, FsyncMode::Always);
            retain_for_peer(&shard, "a", 1);
            until("the flush job started", || gate.started() == 1).await;
            glommio::timer::sleep(Duration::from_millis(200)).await;
            assert_eq!(confirmed(&shard), Vec::<u64>::new(), "confirmed before its flush completed");
            gate.allow(1);
            until("the confirmation went", || confirmed(&shard) == [1]).await;
            assert_eq!(gate.completed(), 1);
            gate.allow(100);
        });
        let _ = std::fs::remove_dir_all(&cleanup);
    }

    /// Compaction retired segments, so the logs are also flushed on a timer: a flush that
    /// took the records of a confirmation must complete before it is released, even when
    /// another flush finished in the meantime.
    #[test]
    fn a_confirmation_waits_for_the_flush_holding_its_records_when_segments_were_retired() {
        let dir = temp_dir("overlap");
        let cleanup = dir.clone();
        on_executor(move || async move {
            let shard = durable_shard(&dir);
            {
                let mut s = shard.borrow_mut();
                // Only what the test writes next is to flush.
                for (kind, job) in s.take_flush() {
                    let deleted = job.run().unwrap();
                    s.flush_done(kind, &deleted);
                }
                s.retained.store.set(retained("keep", "k")).unwrap();
                for i in 0..60 {
                    s.retained.store.set(retained("churn", &format!("{i:0200}"))).unwrap();
                }
                s.compact_logs(Duration::from_secs(1));
                assert!(s.has_retired(), "compaction retired segments");
            }
            let gate = FlushGate::install(&Layout::new(&dir, 2).retained_dir(0));
            let _flusher = spawn_flusher(&shard, FsyncMode::Always);
            retain_for_peer(&shard, "a", 1);
            until("the first flush job started", || gate.started() == 1).await;
            retain_for_peer(&shard, "b", 2);
            // Longer than the timer's period (a second).
            glommio::timer::sleep(HOUSEKEEPING + Duration::from_millis(500)).await;
            assert_eq!(confirmed(&shard), Vec::<u64>::new());
            gate.allow(1);
            until("the first confirmation went", || confirmed(&shard).contains(&1)).await;
            glommio::timer::sleep(Duration::from_millis(200)).await;
            assert_eq!(
                confirmed(&shard),
                [1],
                "b confirmed while the flush job holding it is held ({} of {} jobs completed)",
                gate.completed(),
                gate.started()
            );
            gate.allow(1);
            until("the second confirmation went", || confirmed(&shard) == [1, 2]).await;
            gate.allow(100);
        });
        let _ = std::fs::remove_dir_all(&cleanup);
    }
}
