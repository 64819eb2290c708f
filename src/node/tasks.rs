//! The bridge's executor: the tasks that feed [`Bridge`] and drain what it queues — one
//! sender and one receiver per shard (as a peer's in the mesh), the control events, the
//! listener for other nodes' links, and per link a reader and a writer task over two
//! descriptors of one socket.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};
use glommio::net::{TcpListener, TcpStream};

use super::bridge::{Bridge, ControlEvent, ControlRequest, NodeId};
use super::frame::{Frame, FrameLimits};
use super::BridgeEnds;
use crate::broker::cross::{Batch, CrossMsg, HELD};
use crate::broker::notify::{Event, Notify};
use crate::broker::Global;
use crate::config::ClusterSettings;

/// Frames written per syscall at most.
const WRITE_BATCH: usize = 256;
/// Bytes read from a link at a time.
const READ_CHUNK: usize = 64 << 10;
/// Pause between attempts to reach a node.
const RECONNECT: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// What a link reads before its hello is verified: a challenge, a hello or a welcome,
/// nothing large.
const HANDSHAKE_LIMITS: FrameLimits = FrameLimits { frame: 4096, handover: 0 };
/// Incoming links still in their handshake at most: more are closed at once.
const MAX_HANDSHAKES: usize = 64;
/// How long a joining node waits for a peer's retained set before it serves anyway.
const SYNC_WAIT: Duration = Duration::from_secs(5);
/// How often the stop flag is looked at.
const POLL: Duration = Duration::from_millis(100);
/// How often a link's reader paused for the shards looks at what they applied (on their
/// cores, which wake nothing here).
const APPLIED_RECHECK: Duration = Duration::from_millis(1);

pub(super) struct Inputs {
    pub listener: std::net::TcpListener,
    pub events: Receiver<ControlEvent>,
    pub wake: UnixStream,
    pub requests: Sender<ControlRequest>,
    pub limits: FrameLimits,
}

/// An incoming link's current connection.
struct InConn {
    id: u64,
    wake: Rc<Notify>,
    fd: std::os::fd::RawFd,
}

/// The bridge and the wake-ups of the tasks around it.
struct Node {
    bridge: RefCell<Bridge>,
    settings: ClusterSettings,
    global: Arc<Global>,
    requests: Sender<ControlRequest>,
    shard_wake: Vec<Rc<Notify>>,
    /// Per shard: the count of messages from here it applied (written on its core).
    shard_applied: Vec<Arc<AtomicU64>>,
    /// Per other node: its outgoing link's writer.
    out_wake: RefCell<Vec<Rc<Notify>>>,
    /// Per dialling node (name, incarnation): its incoming link's current connection (its
    /// number, its writer's wake-up, its socket).
    in_wake: RefCell<AHashMap<(String, u64), InConn>>,
    /// Fired when the bridge's outboxes to the shards drained: incoming links read on.
    drained: Event,
    incarnation: u64,
    /// This node's own bounds on what it reads (from `--max-packet-size`), declared in its
    /// hellos; an incoming link is read with the
    /// larger of these and what its node declared (`FrameLimits::reading`).
    max_frame: FrameLimits,
    /// Incoming links between accept and a verified hello.
    handshakes: std::cell::Cell<usize>,
    /// Numbers the incoming links' connections: a link's state is touched only by its
    /// current connection.
    next_conn: std::cell::Cell<u64>,
    /// The last node (by the name its hello gave) and version whose link was closed for
    /// its version.
    other_version: RefCell<Option<(String, u32)>>,
}

impl Node {
    /// Wakes whoever has something to do after the bridge changed.
    fn flush(&self) {
        let mut bridge = self.bridge.borrow_mut();
        if bridge.sys_dirty && bridge.loaded {
            bridge.publish_cluster_sys();
        }
        for (shard, wake) in self.shard_wake.iter().enumerate() {
            if !bridge.outbox[shard].is_empty() {
                wake.notify();
            }
        }
        for request in bridge.control.drain(..) {
            let _ = self.requests.send(request);
        }
        let out_wake = self.out_wake.borrow();
        for (id, node) in bridge.nodes.iter().enumerate() {
            if node.out.connected && node.out.frames.range(node.out.written + 1..).next().is_some() {
                if let Some(wake) = out_wake.get(id) {
                    wake.notify();
                }
            }
        }
        let in_wake = self.in_wake.borrow();
        for (key, link) in &bridge.in_links {
            if !link.replies.is_empty() {
                if let Some(conn) = in_wake.get(key) {
                    conn.wake.notify();
                }
            }
        }
        self.update_backlog(&bridge);
    }

    /// Tells the shards whether the links' windows are over their bound (their forwarding
    /// publishers pause): after anything that adds to the windows or takes from them.
    fn update_backlog(&self, bridge: &Bridge) {
        let over = bridge.backlogged();
        if self.global.cluster_backlogged.load(Ordering::Relaxed) != over {
            self.global.cluster_backlogged.store(over, Ordering::Relaxed);
        }
    }

    /// Whether the links may be read, as of what the shards applied now.
    fn may_read_links(&self) -> bool {
        let mut bridge = self.bridge.borrow_mut();
        for (shard, applied) in self.shard_applied.iter().enumerate() {
            bridge.applied(shard, applied.load(Ordering::Acquire) & !HELD);
        }
        bridge.may_read_links()
    }
}

pub(super) async fn run(
    settings: ClusterSettings,
    shards: usize,
    global: Arc<Global>,
    stop: Arc<AtomicBool>,
    ends: BridgeEnds,
    inputs: Inputs,
) {
    let incarnation =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let mut bridge = Bridge::new(shards, &settings.node);
    bridge.bounds =
        super::bridge::Bounds { window: settings.window_bound(), per_shard: settings.shard_share(shards) };
    let node = Rc::new(Node {
        bridge: RefCell::new(bridge),
        settings,
        global,
        requests: inputs.requests,
        shard_wake: (0..shards).map(|_| Rc::new(Notify::default())).collect(),
        shard_applied: ends.to_shards.iter().map(|(_, applied)| applied.clone()).collect(),
        out_wake: RefCell::new(Vec::new()),
        in_wake: RefCell::new(AHashMap::new()),
        drained: Event::default(),
        incarnation,
        max_frame: inputs.limits,
        handshakes: std::cell::Cell::new(0),
        next_conn: std::cell::Cell::new(0),
        other_version: RefCell::new(None),
    });
    for (shard, (tx, _)) in ends.to_shards.into_iter().enumerate() {
        let node = node.clone();
        glommio::spawn_local(async move { run_sender(node, shard, tx.connect().await).await }).detach();
    }
    for (shard, (rx, applied, taken)) in ends.from_shards.into_iter().enumerate() {
        let node = node.clone();
        glommio::spawn_local(
            async move { run_receiver(node, shard, rx.connect().await, applied, taken).await },
        )
        .detach();
    }
    // SAFETY: the descriptors are owned by the std objects handed over here.
    let listener = unsafe { TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(inputs.listener)) };
    glommio::spawn_local(accept_links(node.clone(), listener)).detach();
    let wake =
        unsafe { glommio::net::UnixStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(inputs.wake)) };
    glommio::spawn_local(run_control_events(node.clone(), wake, inputs.events)).detach();
    while !stop.load(Ordering::Acquire) {
        glommio::timer::sleep(POLL).await;
    }
}

async fn run_sender(node: Rc<Node>, shard: usize, tx: ConnectedSender<Batch>) {
    let wake = node.shard_wake[shard].clone();
    loop {
        wake.notified().await;
        loop {
            let batch = {
                let mut bridge = node.bridge.borrow_mut();
                let Some((batch, bytes)) = bridge.outbox[shard].take_batch() else { break };
                bridge.outbox_bytes[shard] -= bytes;
                // Counted until the shard applied it.
                bridge.handed(shard, batch.len(), bytes);
                batch
            };
            if tx.send(batch).await.is_err() {
                return;
            }
            node.drained.notify_all();
        }
    }
}

/// Applies what a shard sends. `taken` counts the bytes of the messages taken, for the
/// shard's bound on what it handed here: they are counted in the links' windows from now on
/// (where the backlog flag, set first, pauses the publishers).
async fn run_receiver(
    node: Rc<Node>,
    shard: usize,
    rx: ConnectedReceiver<Batch>,
    applied: Arc<AtomicU64>,
    taken: Arc<AtomicU64>,
) {
    let mut count = 0u64;
    while let Some(batch) = rx.recv().await {
        let ready_before = node.bridge.borrow().ready;
        let bytes: usize = batch.iter().map(CrossMsg::size).sum();
        {
            let mut bridge = node.bridge.borrow_mut();
            for msg in batch {
                count += 1;
                bridge.on_shard(shard, msg);
            }
        }
        applied.store(count, Ordering::Release);
        if node.bridge.borrow().ready != ready_before && node.bridge.borrow().ready == node.shard_wake.len() {
            tracing::info!(node = %node.settings.node, "cluster: every shard is ready");
        }
        node.flush();
        taken.fetch_add(bytes as u64, Ordering::Release);
        glommio::yield_if_needed().await;
    }
}

async fn run_control_events(
    node: Rc<Node>,
    mut wake: glommio::net::UnixStream,
    events: Receiver<ControlEvent>,
) {
    let mut buf = [0u8; 64];
    let mut waiting = true;
    loop {
        while let Ok(event) = events.try_recv() {
            if let ControlEvent::Fenced(fenced) = &event {
                // Refused at CONNECT from now on; the bridge closes the connections.
                node.global.fenced.store(*fenced, Ordering::Release);
            }
            node.bridge.borrow_mut().on_control(event);
            ensure_out_links(&node);
            if waiting && node.bridge.borrow().loaded {
                waiting = false;
                glommio::spawn_local(announce_when_synced(node.clone())).detach();
            }
        }
        node.flush();
        match wake.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Tells the shards the bridge is ready (so the node starts listening) once it holds the
/// retained set a peer had, or after `SYNC_WAIT` (a peer that does not answer does not
/// keep the node from serving; what it missed it gets as it is published again).
async fn announce_when_synced(node: Rc<Node>) {
    let deadline = Instant::now() + SYNC_WAIT;
    while !node.bridge.borrow().sync_done && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    if !node.bridge.borrow().sync_done {
        tracing::warn!("cluster: no peer sent its retained set in time: serving without it");
    }
    node.bridge.borrow_mut().announce_ready();
    node.flush();
}

/// Starts an outgoing link task for every node that has none yet.
fn ensure_out_links(node: &Rc<Node>) {
    let count = node.bridge.borrow().nodes.len();
    let have = node.out_wake.borrow().len();
    for id in have..count {
        let wake = Rc::new(Notify::default());
        node.out_wake.borrow_mut().push(wake.clone());
        glommio::spawn_local(run_out_link(node.clone(), id as NodeId, wake)).detach();
    }
}

/// Keeps this node's link to `id` connected while the node is live: writes its frames,
/// reads its confirmations.
async fn run_out_link(node: Rc<Node>, id: NodeId, wake: Rc<Notify>) {
    let mut refusal: Option<String> = None;
    loop {
        let (live, addr, name) = {
            let bridge = node.bridge.borrow();
            let n = &bridge.nodes[id as usize];
            (n.live, n.addr, n.name.clone())
        };
        let Some(addr) = addr.filter(|_| live) else {
            glommio::timer::sleep(RECONNECT).await;
            continue;
        };
        match dial(&node, &name, addr).await {
            Ok(Dialled { reader, writer, buf, accepts }) => {
                refusal = None;
                tracing::info!(
                    node = %name,
                    %addr,
                    frame = accepts.frame,
                    handover = accepts.handover,
                    "cluster: link up (the node reads frames up to these bytes)"
                );
                node.bridge.borrow_mut().nodes[id as usize].out.accepts = Some(accepts);
                node.bridge.borrow_mut().link_state(id, true);
                node.flush();
                let read = read_replies(node.clone(), id, reader, buf);
                let write = write_frames(node.clone(), id, writer, wake.clone(), accepts);
                futures_lite::future::or(read, write).await;
                node.bridge.borrow_mut().link_state(id, false);
                node.flush();
                tracing::warn!(node = %name, %addr, "cluster: link lost");
            }
            Err(err) if is_refusal(&err) => {
                // Once per cause, not at every attempt.
                let why = err.to_string();
                if refusal.as_deref() != Some(why.as_str()) {
                    tracing::warn!(node = %name, %addr, %err, "cluster: not linking with the node");
                    refusal = Some(why);
                }
            }
            Err(err) => tracing::debug!(node = %name, %addr, %err, "cluster: cannot reach node"),
        }
        glommio::timer::sleep(RECONNECT).await;
    }
}

/// A connected outgoing link: two descriptors of the socket, one per direction, what was
/// read past the handshake, and the bounds the node reads the link with.
struct Dialled {
    reader: TcpStream,
    writer: TcpStream,
    buf: BytesMut,
    accepts: FrameLimits,
}

/// Connects to node `peer`, answers its challenge with this node's hello (declaring its
/// bounds) and reads its welcome (the bounds it reads the link with), checking that it
/// speaks this build's link protocol and proves the cluster's secret. `Err` of kind
/// `Unsupported` or `PermissionDenied`: the node is not one to link with (worth a warning).
async fn dial(node: &Node, peer: &str, addr: SocketAddr) -> std::io::Result<Dialled> {
    use super::handshake::{self, LINK_VERSION};
    let refused = |why: &str| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why.to_string());
    let secret = node.bridge.borrow().secret.clone().ok_or_else(|| refused("no cluster secret yet"))?;
    let mut stream = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).await?;
    stream.set_nodelay(true)?;
    keep_alive(&stream);
    let mut buf = BytesMut::with_capacity(64);
    let challenge = read_frame(&mut stream, &mut buf, HANDSHAKE_LIMITS);
    let nonce = match timed(challenge).await {
        Some(Ok(Some(Frame::Challenge { nonce, version: LINK_VERSION }))) => nonce,
        Some(Ok(Some(Frame::Challenge { version, .. }))) => {
            let why = format!(
                "the node speaks link protocol version {version}, this build {LINK_VERSION}: the nodes of a cluster run one build (docs/CLUSTER.md)"
            );
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, why));
        }
        _ => return Err(std::io::Error::other("no challenge from the node")),
    };
    let mine = handshake::random().ok_or_else(|| std::io::Error::other("no randomness for a challenge"))?;
    let (cluster, name) = (node.settings.name.clone(), node.settings.node.clone());
    let (incarnation, limits) = (node.incarnation, node.max_frame);
    let who = handshake::Identity {
        cluster: &cluster,
        node: &name,
        incarnation,
        limits,
        version: LINK_VERSION,
        challenge: mine,
    };
    let mac = handshake::proof(&secret, &nonce, who);
    let mut hello = BytesMut::new();
    let frame = Frame::Hello {
        cluster,
        node: name,
        incarnation,
        limits,
        mac,
        version: LINK_VERSION,
        challenge: mine,
    };
    frame.encode(&mut hello, Instant::now());
    stream.write_all(&hello).await?;
    let accepts = match timed(read_frame(&mut stream, &mut buf, HANDSHAKE_LIMITS)).await {
        Some(Ok(Some(Frame::Welcome { limits, mac: theirs })))
            if handshake::verify_welcome(&secret, &mac, peer, limits, &theirs) =>
        {
            limits
        }
        Some(Ok(Some(Frame::Welcome { .. }))) => {
            return Err(refused("its welcome does not prove the cluster's secret for this node and hello"))
        }
        _ => return Err(std::io::Error::other("no welcome from the node (hello refused?)")),
    };
    let reader = duplicate(&stream)?;
    Ok(Dialled { reader, writer: stream, buf, accepts })
}

/// Whether `dial` found a node not to link with (another version, a welcome that proves
/// nothing), rather than one it could not reach.
fn is_refusal(err: &std::io::Error) -> bool {
    matches!(err.kind(), std::io::ErrorKind::Unsupported | std::io::ErrorKind::PermissionDenied)
}

/// `future`'s result, unless it takes longer than `CONNECT_TIMEOUT`.
async fn timed<T>(future: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(future.await) }, async {
        glommio::timer::sleep(CONNECT_TIMEOUT).await;
        None
    })
    .await
}

fn duplicate(stream: &TcpStream) -> std::io::Result<TcpStream> {
    // SAFETY: dup of a descriptor we hold; the new one is owned by the returned stream.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { TcpStream::from_raw_fd(fd) })
}

/// Writes `id`'s frames as the bridge queues them; one larger than the node reads
/// (`accepts`) is refused instead (`Bridge::unwritable`).
async fn write_frames(
    node: Rc<Node>,
    id: NodeId,
    mut writer: TcpStream,
    wake: Rc<Notify>,
    accepts: FrameLimits,
) {
    let mut buf = BytesMut::new();
    loop {
        buf.clear();
        let (taken, refused) = {
            let mut bridge = node.bridge.borrow_mut();
            let written = bridge.write_frames(id, WRITE_BATCH, &mut buf, Instant::now(), &accepts);
            // QoS 0 frames leave the window as they are taken: publishers paused on it go
            // on without waiting for some other event.
            node.update_backlog(&bridge);
            written
        };
        if taken == 0 {
            wake.notified().await;
            continue;
        }
        if refused {
            // Too large for the node: their answers go out.
            node.flush();
        }
        if buf.is_empty() {
            // All refused: the buffer a large one grew is not kept.
            buf = BytesMut::new();
            continue;
        }
        if writer.write_all(&buf).await.is_err() {
            return;
        }
        if buf.capacity() > 4 * READ_CHUNK {
            buf = BytesMut::new();
        }
    }
}

async fn read_replies(node: Rc<Node>, id: NodeId, mut reader: TcpStream, mut buf: BytesMut) {
    loop {
        match read_frame(&mut reader, &mut buf, node.max_frame).await {
            Ok(Some(frame)) => {
                node.bridge.borrow_mut().on_link_reply(id, frame);
                node.flush();
            }
            Ok(None) => return,
            Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(%err, "cluster: bad frame on an outgoing link, closed");
                return;
            }
            Err(err) => {
                tracing::debug!(%err, "cluster: outgoing link ended");
                return;
            }
        }
    }
}

/// The next frame, reading as needed; `None` at the end of the stream.
async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max: FrameLimits,
) -> std::io::Result<Option<Frame>> {
    loop {
        match Frame::decode(buf, max, Instant::now()) {
            Ok(Some(frame)) => return Ok(Some(frame)),
            Ok(None) => {}
            Err(err) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, err.to_string())),
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        // At most a chunk is zeroed per read: a large frame is not zeroed over and over.
        let start = buf.len();
        let room = (buf.capacity() - start).min(READ_CHUNK);
        buf.resize(start + room, 0);
        let n = stream.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Ok(None);
        }
    }
}

async fn accept_links(node: Rc<Node>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) if node.handshakes.get() >= MAX_HANDSHAKES => {
                tracing::warn!(peer = ?stream.peer_addr().ok(), "cluster: too many node links in their handshake, closed");
            }
            Ok(stream) => {
                node.handshakes.set(node.handshakes.get() + 1);
                glommio::spawn_local(serve_in_link(node.clone(), stream)).detach();
            }
            Err(err) => {
                tracing::warn!(%err, "cluster: accepting a node link failed");
                glommio::timer::sleep(RECONNECT).await;
            }
        }
    }
}

/// A link another node dialled: its frames in, this node's confirmations out.
async fn serve_in_link(node: Rc<Node>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    keep_alive(&stream);
    // Counted while its hello is awaited.
    let handshaking = Handshaking(node.clone());
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let (Some(secret), Some(nonce)) = (node.bridge.borrow().secret.clone(), super::handshake::random())
    else {
        return;
    };
    let mut challenge = BytesMut::new();
    Frame::Challenge { nonce, version: super::handshake::LINK_VERSION }
        .encode(&mut challenge, Instant::now());
    if stream.write_all(&challenge).await.is_err() {
        return;
    }
    let hello = timed(read_frame(&mut stream, &mut buf, HANDSHAKE_LIMITS)).await;
    drop(handshaking);
    let verified = |cluster: &str, name: &str, incarnation, limits, version, challenge, mac: &[u8; 32]| {
        let who = super::handshake::Identity { cluster, node: name, incarnation, limits, version, challenge };
        cluster == node.settings.name && super::handshake::verify(&secret, &nonce, who, mac)
    };
    let (key, declared, hello_mac) = match hello {
        Some(Ok(Some(Frame::Hello { node: name, version, .. })))
            if version != super::handshake::LINK_VERSION =>
        {
            // Warned once per node and version, not at each of its redials.
            let said = Some((name, version));
            if *node.other_version.borrow() != said {
                let peer = stream.peer_addr().ok();
                let name = said.as_ref().map(|(n, _)| n.as_str());
                let this_build = super::handshake::LINK_VERSION;
                tracing::warn!(
                    ?peer,
                    node = name,
                    version,
                    this_build,
                    "cluster: a node link of another link protocol version, closed (the nodes of a cluster run one build)"
                );
                *node.other_version.borrow_mut() = said;
            }
            return;
        }
        Some(Ok(Some(Frame::Hello {
            cluster,
            node: name,
            incarnation,
            limits,
            mac,
            version,
            challenge,
        }))) if verified(&cluster, &name, incarnation, limits, version, challenge, &mac) => {
            ((name, incarnation), limits, mac)
        }
        _ => {
            let peer = stream.peer_addr().ok();
            tracing::warn!(?peer, "cluster: a node link without a valid hello for this cluster, closed");
            return;
        }
    };
    // Read with what the node writes (its own bounds may be larger than this node's),
    // within the cap; it is told, and refuses itself what is larger still.
    let (limits, capped) = node.max_frame.reading(declared);
    if capped {
        tracing::warn!(
            node = %key.0,
            declared_frame = declared.frame,
            declared_handover = declared.handover,
            frame = limits.frame,
            handover = limits.handover,
            "cluster: a node declares frames larger than a link is read with at most: read with the cap, \
             larger frames it refuses (check its --max-packet-size)"
        );
    }
    let mut welcome = BytesMut::new();
    let mac = super::handshake::welcome_proof(&secret, &hello_mac, &node.settings.node, limits);
    Frame::Welcome { limits, mac }.encode(&mut welcome, Instant::now());
    if stream.write_all(&welcome).await.is_err() {
        return;
    }
    tracing::info!(node = %key.0, frame = limits.frame, handover = limits.handover, "cluster: incoming link up");
    // A node that restarted starts its numbering again: its old link's state goes.
    node.bridge.borrow_mut().in_links.retain(|k, _| k.0 != key.0 || k.1 == key.1);
    node.bridge.borrow_mut().in_links.entry(key.clone()).or_default();
    let wake = Rc::new(Notify::default());
    let id = node.next_conn.get() + 1;
    node.next_conn.set(id);
    let conn = InConn { id, wake: wake.clone(), fd: stream.as_raw_fd() };
    // A connection the node replaced (it reconnected) is shut: its tasks end, and leave
    // the link's state to this one.
    if let Some(old) = node.in_wake.borrow_mut().insert(key.clone(), conn) {
        // SAFETY: plain syscall; the old connection's tasks own the descriptor until they end.
        unsafe { libc::shutdown(old.fd, libc::SHUT_RDWR) };
    }
    let Ok(writer) = duplicate(&stream) else { return };
    let read = read_in_frames(node.clone(), key.clone(), stream, buf, limits);
    let write = write_replies(node.clone(), key.clone(), id, writer, wake);
    futures_lite::future::or(read, write).await;
    let mut in_wake = node.in_wake.borrow_mut();
    if in_wake.get(&key).is_some_and(|c| c.id == id) {
        in_wake.remove(&key);
    }
    tracing::warn!(node = %key.0, "cluster: incoming link lost");
}

/// Counts an incoming link in its handshake while it lives.
struct Handshaking(Rc<Node>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.handshakes.set(self.0.handshakes.get().saturating_sub(1));
    }
}

/// TCP keep-alive on a node link: a peer gone without a word (a cut cable, lost NAT
/// state) ends the link in about 20 s instead of the kernel's 15 minutes of retries.
fn keep_alive(stream: &TcpStream) {
    let fd = stream.as_raw_fd();
    let set = |level: i32, name: i32, value: i32| {
        // SAFETY: setsockopt on an open descriptor with a valid int.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as u32,
            );
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    // Unacknowledged written data gives up after 20 s too.
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 20_000);
}

/// An incoming link's frames, read with `limits` (see `FrameLimits::reading`).
async fn read_in_frames(
    node: Rc<Node>,
    key: (String, u64),
    mut stream: TcpStream,
    mut buf: BytesMut,
    limits: FrameLimits,
) {
    loop {
        // The shards take what arrives at their pace: a link is not read while one of them
        // has its share of `--node-link-buffer` waiting (see `Bridge::may_read_links`).
        while !node.may_read_links() {
            futures_lite::future::or(node.drained.wait(), glommio::timer::sleep(APPLIED_RECHECK)).await;
        }
        match read_frame(&mut stream, &mut buf, limits).await {
            Ok(Some(frame)) => {
                node.bridge.borrow_mut().on_link_frame(&key, frame);
                node.flush();
            }
            Ok(None) => return,
            Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(node = %key.0, %err, "cluster: bad frame on an incoming link, closed");
                return;
            }
            Err(err) => {
                tracing::debug!(node = %key.0, %err, "cluster: incoming link ended");
                return;
            }
        }
    }
}

async fn write_replies(node: Rc<Node>, key: (String, u64), id: u64, mut writer: TcpStream, wake: Rc<Notify>) {
    let mut buf = BytesMut::new();
    loop {
        buf.clear();
        if node.in_wake.borrow().get(&key).is_none_or(|c| c.id != id) {
            // Replaced by a newer connection: the replies are its to write.
            return;
        }
        {
            let mut bridge = node.bridge.borrow_mut();
            let Some(link) = bridge.in_links.get_mut(&key) else { return };
            for frame in link.replies.drain(..) {
                frame.encode(&mut buf, Instant::now());
            }
        }
        if buf.is_empty() {
            wake.notified().await;
            continue;
        }
        if writer.write_all(&buf).await.is_err() {
            return;
        }
    }
}
