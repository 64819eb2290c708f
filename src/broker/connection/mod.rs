//! One client connection's I/O: accepting it, reading its CONNECT (and handing it to the
//! shard that owns its client identifier), then two tasks per connection over one stream:
//! the reader decodes packets and hands each to the shard layer ([`Inbound`]), the writer
//! drains the connection's outbox, so that many packets leave in one write. Nothing here
//! decides what a packet means.
//!
//! Who waits, who pays: the outbox is bounded by `--write-buffer` in bytes, counting what
//! the writer is writing. A client that sends faster than it reads what its packets cause
//! (acknowledgements, PINGRESP, SUBACK) finds its reader paused once the outbox is full:
//! TCP back-pressure, it waits. QoS 1/2 deliveries wait in the session's queue until the
//! outbox has room; QoS 0 deliveries to a full outbox are dropped (the slow consumer pays).
//! A client that leaves written bytes unread for `--write-timeout` is disconnected.
//!
//! A connection keeps a small read buffer and outbox between waits; one quiet for
//! `--park-after` seconds gives them up with its tasks ([`park`]). Anything that wants the connection closed (takeover, keep-alive,
//! shutdown) calls [`ConnHandle::close`]: the reader stops, the writer flushes what is
//! queued, then the socket lingers.

mod park;
mod read_buffer;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWrite};
use glommio::net::TcpStream;

use super::conn_handle::{ConnHandle, ConnMeta, Idle, MAX_PENDING_ACKS};
use super::mesh::{CrossMsg, Handoff};
use super::session::SessionId;
use super::shard::inbound::HeldPublish;
use super::shard::inbound::{Flow, Inbound};
use super::shard::{wait_for_congested, wait_to_fit, ShardRef, WillAction};
use super::{placement, ConnectionSlot};
use crate::codec::{
    self, ConnAck, Connect, DecodeError, Packet, Properties, Property, ProtocolVersion, ReasonCode,
};

mod events;
mod handshake;
mod transport;
use handshake::{
    check_credentials, read_proxy_header, refuse, refuse_empty_id, refuse_invalid_connect, refused_by_rules,
    upgrade,
};
pub use park::Parker;
use read_buffer::{ReadBuffer, MIN_READ};
pub use transport::Transport;
use transport::{HandshakeError, TlsStream};

/// One socket, shared by its connection's reader and writer, both in the connection's task.
/// A poll borrows it only while it runs (never across an await), and glommio keeps separate
/// readiness wakers for reading and writing, so both can wait on it at once.
struct SharedStream(RefCell<Transport>);

impl SharedStream {
    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| {
            futures_lite::AsyncRead::poll_read(std::pin::Pin::new(&mut *self.0.borrow_mut()), cx, buf)
        })
        .await
    }

    /// Writes everything, counting each partial write in `progress`.
    async fn write_all(&self, mut buf: &[u8], progress: &Cell<u64>) -> std::io::Result<()> {
        while !buf.is_empty() {
            let n = std::future::poll_fn(|cx| {
                futures_lite::AsyncWrite::poll_write(std::pin::Pin::new(&mut *self.0.borrow_mut()), cx, buf)
            })
            .await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            progress.set(progress.get().wrapping_add(1));
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Reads into `buf`, unless `conn` is closing or was asked to park first.
    async fn read_or(&self, buf: &mut ReadBuffer, conn: &ConnHandle) -> ReadEvent {
        std::future::poll_fn(|cx| {
            if conn.closing.get() {
                return Poll::Ready(ReadEvent::Closing);
            }
            if conn.idle.get() == Idle::Asked {
                // Only a connection with nothing in either direction parks: what it holds
                // then is what the parked record keeps.
                if buf.buf.is_empty()
                    && conn.pending() == 0
                    && conn.pending_acks() == 0
                    && self.0.borrow().can_park()
                {
                    return Poll::Ready(ReadEvent::Park);
                }
                conn.idle.set(Idle::Active);
            }
            conn.park_reader(cx);
            buf.poll_read(&mut self.0.borrow_mut(), cx).map(ReadEvent::Read)
        })
        .await
    }
}

/// What the reader's wait for its client ended with.
enum ReadEvent {
    Read(std::io::Result<usize>),
    Closing,
    Park,
}

/// How long, and for how many bytes, a closing connection keeps reading (and discarding)
/// what its client still sends after the last packet to it.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Lingering close: after the last packet to a client (a DISCONNECT with its reason, a
/// refusing CONNACK), the write side is shut down (FIN after the data), then what the client
/// still sends is read and discarded until it closes, within `LINGER`. Closing a socket
/// with unread data makes the kernel send a reset, which can destroy the packet the client
/// was about to read.
async fn linger(stream: &SharedStream, fd: RawFd) {
    // TLS says it is done first (close_notify), so the client reads a clean end.
    let _ = std::future::poll_fn(|cx| stream.0.borrow_mut().poll_close_notify(cx)).await;
    // SAFETY: `stream` owns `fd` and is open.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    // On the heap: an array here would be part of every connection's task, idle or not.
    let mut scratch = vec![0u8; 4096];
    let mut drained = 0;
    let _ = glommio::timer::timeout(LINGER, async {
        while drained < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
        Ok(())
    })
    .await;
}

/// The largest outbox allocation a connection keeps between writes.
const KEPT_OUTBOX: usize = 64 * 1024;

/// Writes the outbox until the connection closes: the write side of the connection's task.
/// Each round writes what the outbox held when it began, in place; bytes appended meanwhile
/// go in the next round.
///
/// A poll function, not an `async fn`: its only state is the round's length (what was
/// written of it is `ConnHandle::writing`), so it adds a few bytes to the connection's
/// future, where an `async fn` would add its largest await's state.
fn run_writer<'a>(
    shard: &'a ShardRef,
    conn: &'a Rc<ConnHandle>,
    stream: &'a SharedStream,
) -> impl std::future::Future<Output = ()> + 'a {
    shard.borrow_mut().writers.insert(conn.id, conn.clone());
    // The round being written: what the outbox held when it began; 0 between rounds.
    let mut round = 0;
    std::future::poll_fn(move |cx| {
        loop {
            if round == 0 {
                round = conn.outbox.borrow().len();
                if round == 0 && !conn.closing.get() {
                    if conn.idle.get() == Idle::Parking {
                        // The reader parked the connection: its tasks end, the
                        // connection does not, and holds no outbox allocation.
                        *conn.outbox.borrow_mut() = BytesMut::new();
                        shard.borrow_mut().writers.remove(&conn.id);
                        return Poll::Ready(());
                    }
                    conn.park_writer(cx);
                    return Poll::Pending;
                }
                if round == 0 {
                    break;
                }
            }
            let written = {
                let mut outbox = conn.outbox.borrow_mut();
                let front = &outbox[..round - conn.writing.get()];
                match std::pin::Pin::new(&mut *stream.0.borrow_mut()).poll_write(cx, front) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(n)) if n > 0 => {
                        bytes::Buf::advance(&mut *outbox, n);
                        Some(n)
                    }
                    Poll::Ready(_) => None,
                }
            };
            let Some(n) = written else {
                conn.writing.set(0);
                break;
            };
            conn.writes.set(conn.writes.get().wrapping_add(1));
            conn.writing.set(conn.writing.get() + n);
            if conn.writing.get() < round {
                continue;
            }
            // The round is written.
            conn.writing.set(0);
            conn.quiet.set(0);
            {
                let s = shard.borrow();
                s.bytes_sent.set(s.bytes_sent.get() + round as u64);
            }
            round = 0;
            {
                // Written out: a large outbox is given back; a small one is kept for the
                // next round (allocating one per round contended for the allocator's lock
                // with the other cores' frees). A parked connection holds none.
                let mut outbox = conn.outbox.borrow_mut();
                if outbox.is_empty() && outbox.capacity() > KEPT_OUTBOX {
                    *outbox = BytesMut::new();
                }
            }
            if conn.wants_room.get() && conn.has_room() {
                conn.wants_room.set(false);
                conn.wake_reader();
                shard.borrow_mut().on_writable(conn.session.get());
            }
        }
        shard.borrow_mut().writers.remove(&conn.id);
        conn.mark_closing();
        Poll::Ready(())
    })
}

/// Why reading the CONNECT failed.
enum ConnectFailure {
    Closed,
    TimedOut,
    Invalid(DecodeError),
    NotConnect,
    Proxy(codec::proxy::ProxyError),
    Tls(HandshakeError),
    WebSocket(String),
}

/// Serves a socket accepted by this shard: reads its CONNECT, then serves it here or
/// hands it to the shard that owns its client identifier.
pub async fn accept(
    shard: ShardRef,
    parker: Rc<Parker>,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
    slot: ConnectionSlot,
) {
    let _ = tcp.set_nodelay(true);
    let (read_buffer, max_packet, connect_timeout) = {
        let s = shard.borrow();
        (s.config.read_buffer, s.config.max_packet_size, s.config.connect_timeout)
    };
    let listener = slot.listener().name.clone();
    let mut buf = BytesMut::with_capacity(MIN_READ);
    // A PROXY header, where the listener requires one, and CONNECT: both within the
    // connect timeout.
    let tls = slot.listener().tls.as_ref().map(|t| t.current());
    let read = glommio::timer::timeout(connect_timeout, async {
        if slot.listener().proxy_protocol {
            match read_proxy_header(&mut tcp, &mut buf).await {
                Ok(Some(source)) => peer = source,
                Ok(None) => {}
                Err(failure) => return Ok((Err(failure), None)),
            }
        }
        let mut stream = match tls {
            None => Transport::Tcp(tcp),
            Some(config) => match TlsStream::accept(tcp, config).await {
                Ok(tls) => Transport::Tls(Box::new(tls)),
                Err(err) => return Ok((Err(ConnectFailure::Tls(err)), None)),
            },
        };
        if let Some(ws) = &slot.listener().websocket {
            stream = match upgrade(stream, ws, max_packet).await {
                Ok(stream) => stream,
                Err(failure) => return Ok((Err(failure), None)),
            };
        }
        let connect = read_connect(&mut stream, &mut buf, read_buffer, max_packet).await;
        Ok((connect, Some(stream)))
    })
    .await;
    let (connect, stream) = match read {
        Ok((Ok(connect), Some(stream))) => (connect, stream),
        Ok((Ok(_), None)) => return,
        Err(_) | Ok((Err(ConnectFailure::TimedOut), _)) => {
            tracing::info!(%peer, %listener, "no CONNECT within the connect timeout");
            return;
        }
        Ok((Err(ConnectFailure::Closed), _)) => return,
        Ok((Err(ConnectFailure::NotConnect), _)) => {
            let first = buf.first().copied().unwrap_or_default();
            tracing::info!(%peer, %listener, first_byte = format_args!("{first:#04x}"), "closing: first packet is not CONNECT [MQTT-3.1.0-1]");
            return;
        }
        Ok((Err(ConnectFailure::Tls(err)), _)) => {
            tracing::info!(%peer, %listener, %err, "TLS handshake failed");
            return;
        }
        Ok((Err(ConnectFailure::WebSocket(err)), _)) => {
            tracing::info!(%peer, %listener, %err, "WebSocket upgrade refused");
            return;
        }
        Ok((Err(ConnectFailure::Proxy(err)), _)) => {
            tracing::info!(%peer, %listener, %err, "closing: this listener requires a PROXY protocol header");
            return;
        }
        Ok((Err(ConnectFailure::Invalid(err)), stream)) => {
            tracing::info!(%peer, %listener, %err, "invalid CONNECT");
            if let Some(stream) = stream {
                refuse_invalid_connect(stream, &err).await;
            }
            return;
        }
    };
    let identity = match slot.listener().auth.clone() {
        None => None,
        Some(auth) => match check_credentials(&shard, &auth, &connect, &stream, peer).await {
            Ok(identity) => Some(Box::new(identity)),
            Err(refusal) => {
                tracing::info!(%peer, %listener, client_id = %connect.client_id, username = connect.username.as_deref(), ?refusal, "connection refused: authentication");
                shard.borrow_mut().stats.auth_failures += 1;
                events::refused(&shard, refusal.reason_code());
                // Answered after a delay: a guesser waits, on its own connection only.
                glommio::timer::sleep(crate::auth::FAILURE_DELAY).await;
                refuse(stream, connect.protocol, refusal.reason_code()).await;
                return;
            }
        },
    };
    let mut connect = connect;
    let (local, shards) = {
        let s = shard.borrow();
        (s.id, s.shard_count)
    };
    if connect.client_id.is_empty() && !refuse_empty_id(&connect) {
        // Pick an identifier this shard owns, so the connection needs no handoff.
        let mut counter = shard.borrow_mut().next_id();
        loop {
            // In a cluster the node's name keeps it unique across nodes (the process id
            // is 1 on every node in containers).
            let node =
                shard.borrow().config.cluster.as_ref().map(|c| format!("{}-", c.node)).unwrap_or_default();
            let candidate = format!("ringmq-{node}{local}-{counter:x}-{:x}", std::process::id());
            if placement::owner(&candidate, shards) == local {
                connect.client_id = candidate;
                break;
            }
            counter = shard.borrow_mut().next_id();
        }
        serve(shard, parker, stream, peer, connect, buf, slot, identity, true).await;
        return;
    }
    let owner = placement::owner(&connect.client_id, shards);
    if owner == local || connect.client_id.is_empty() {
        serve(shard, parker, stream, peer, connect, buf, slot, identity, false).await;
        return;
    }
    // Hand the socket to its owner: duplicate the descriptor, let this shard's stream go;
    // TLS state goes along.
    let (tcp, tls, ws) = stream.into_parts();
    let fd = unsafe { libc::dup(tcp.as_raw_fd()) };
    if fd < 0 {
        tracing::warn!(%peer, err = %std::io::Error::last_os_error(), "dup failed during handoff");
        return;
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    drop(tcp);
    let handoff = Handoff { fd, tls, ws, peer, connect, rest: buf, slot, identity };
    shard.borrow_mut().send_to(owner, CrossMsg::Handoff(Box::new(handoff)));
}

/// Continues a connection handed over by another shard.
pub async fn adopt(shard: ShardRef, parker: Rc<Parker>, handoff: Handoff) {
    let Handoff { fd, tls, ws, peer, connect, rest, slot, identity } = handoff;
    // SAFETY: the descriptor was duplicated for us and is owned by the handoff.
    let stream = Transport::from_parts(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }, tls, ws);
    serve(shard, parker, stream, peer, connect, rest, slot, identity, false).await;
}

async fn read_connect(
    stream: &mut Transport,
    buf: &mut BytesMut,
    read_buffer: usize,
    max_packet: usize,
) -> Result<Connect, ConnectFailure> {
    let mut scratch = vec![0u8; read_buffer.min(MIN_READ)];
    loop {
        // The first packet must be CONNECT (MQTT-3.1.0-1): anything else (a PROXY header,
        // an HTTP request, TLS) is refused at its first byte, not after the connect timeout.
        if buf.first().is_some_and(|first| *first != 0x10) {
            return Err(ConnectFailure::NotConnect);
        }
        match codec::decode(buf, ProtocolVersion::V311, max_packet) {
            Ok(Some(Packet::Connect(connect))) => return Ok(connect),
            Ok(Some(_)) => return Err(ConnectFailure::NotConnect),
            Ok(None) => {}
            Err(err) => return Err(ConnectFailure::Invalid(err)),
        }
        match stream.read(&mut scratch).await {
            Ok(0) | Err(_) => return Err(ConnectFailure::Closed),
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
        }
        if buf.len() > max_packet {
            return Err(ConnectFailure::TimedOut);
        }
    }
}

/// Everything a served connection's task holds for its lifetime.
struct Connection {
    reader: Inbound,
    /// Shared with the writer task.
    stream: Rc<SharedStream>,
    buf: ReadBuffer,
    /// Released when the connection ends.
    slot: ConnectionSlot,
    /// Keeps the connection while it is idle.
    parker: Rc<Parker>,
}

/// Answers a CONNECT this shard serves: refuses it, or attaches the connection to its
/// session, queues the CONNACK and starts the connection's task. What the CONNECT phase
/// held (its task, the decoded CONNECT, its buffer) is gone before the connection waits:
/// its task holds [`Connection`] only. In a cluster the client is first made this node's
/// (claimed in etcd, its session taken over from the node that had it).
#[allow(clippy::too_many_arguments)]
async fn serve(
    shard: ShardRef,
    parker: Rc<Parker>,
    stream: Transport,
    peer: SocketAddr,
    connect: Connect,
    rest: BytesMut,
    slot: ConnectionSlot,
    identity: Option<Box<crate::auth::Identity>>,
    assigned: bool,
) {
    let version = connect.protocol;
    // In a task of its own, which holds the connection's slot until it is done.
    let refuse = |stream, reason, slot: ConnectionSlot| {
        events::refused(&shard, reason);
        glommio::spawn_local(async move {
            refuse(stream, version, reason).await;
            drop(slot);
        })
        .detach();
    };
    if connect.client_id.is_empty() {
        tracing::info!(%peer, "empty client identifier refused [MQTT-3.1.3-8]");
        refuse(stream, ReasonCode::ClientIdentifierNotValid, slot);
        return;
    }
    if version.is_v5() && connect.properties.authentication_method().is_some() {
        // No authentication methods are configured (MQTT-4.12.0-1 lets the server refuse).
        tracing::info!(%peer, client_id = %connect.client_id, "authentication method not supported");
        refuse(stream, ReasonCode::BadAuthenticationMethod, slot);
        return;
    }
    let auth = slot.listener().auth.clone().zip(identity).map(|(rules, identity)| {
        Rc::new(crate::auth::SessionAuth::new(
            rules,
            slot.listener().name.clone(),
            *identity,
            &connect.client_id,
        ))
    });
    if let Some(why) = refused_by_rules(&shard, &connect, auth.as_deref()) {
        let username = auth.as_ref().and_then(|a| a.username.as_deref());
        tracing::info!(%peer, client_id = %connect.client_id, username, "connection refused: {why}");
        refuse(stream, ReasonCode::NotAuthorized, slot);
        return;
    }
    if shard.borrow().global.fenced.load(std::sync::atomic::Ordering::Acquire) {
        // A cluster node that cannot renew its lease serves nobody: another node may
        // already own this client.
        tracing::warn!(%peer, client_id = %connect.client_id, "connection refused: the node is fenced from the cluster");
        refuse(stream, ReasonCode::ServerUnavailable, slot);
        return;
    }
    if !shard.borrow_mut().has_room_for_session(&connect) {
        tracing::warn!(%peer, client_id = %connect.client_id, "connection refused: --max-sessions reached");
        refuse(stream, ReasonCode::QuotaExceeded, slot);
        return;
    }
    // Last, once nothing here refuses it: the client is made this node's (an identifier
    // this node assigned is its own already).
    if !assigned {
        // Under `--takeover same-user`, the name it proved: another user's session on
        // another node is not taken either.
        let same_user = shard.borrow().config.takeover == crate::config::TakeoverPolicy::SameUser;
        let user = same_user
            .then(|| auth.as_ref().filter(|a| a.verified).and_then(|a| a.username.as_deref()).unwrap_or(""));
        let claimed =
            crate::broker::shard::cluster::claim(&shard, &connect.client_id, connect.clean_start, user).await;
        if let Err(reason) = claimed {
            refuse(stream, reason, slot);
            return;
        }
    }
    let config = shard.borrow().config.clone();
    let conn_id = shard.borrow_mut().next_id();
    let client_id = shard.borrow().sessions.client_id(&connect.client_id);
    let (max_packet_size, max_topic_alias, receive_maximum) =
        (config.max_packet_size, config.max_topic_alias, config.receive_maximum);
    let max_keep_alive = config.max_keep_alive;
    // Server Keep Alive (MQTT-3.2.2-21): a v5 client asking for more, or for none, is told
    // the limit and held to it; a v3 client cannot be told, so it is held to what it asked.
    let keep_alive = match (version.is_v5(), connect.keep_alive) {
        (true, ka) if ka == 0 || ka > max_keep_alive => max_keep_alive,
        (_, ka) => ka,
    };
    let client_max = connect
        .properties
        .maximum_packet_size()
        .map_or(crate::config::PROTOCOL_MAX_PACKET_SIZE, |m| m as usize);

    let conn = Rc::new(ConnHandle {
        max_packet_size: client_max,
        keep_alive_limit_ms: u32::from(keep_alive) * 1500,
        // Bounded by our own limit too: each alias keeps a topic in memory.
        topic_alias_maximum: connect.properties.topic_alias_maximum().unwrap_or(0).min(max_topic_alias),
        problem_information: version.is_v5()
            && connect.properties.request_problem_information().unwrap_or(true),
        meta: ConnMeta {
            peer,
            listener: Some(slot.listener_info()),
            username: connect.username.as_deref().map(Rc::from),
            keep_alive,
            connected_at: events::unix_now() as u32,
        },
        ..ConnHandle::new(conn_id, client_id, version, config.write_buffer, stream.as_raw_fd())
    });
    let mut properties = Properties::default();
    if version.is_v5() {
        if assigned {
            properties.push(Property::AssignedClientIdentifier(connect.client_id.clone()));
        }
        properties.push(Property::MaximumPacketSize(max_packet_size as u32));
        properties.push(Property::ReceiveMaximum(receive_maximum));
        properties.push(Property::TopicAliasMaximum(max_topic_alias));
        if keep_alive != connect.keep_alive {
            properties.push(Property::ServerKeepAlive(keep_alive));
        }
        let expiry = shard.borrow().session_expiry(&connect);
        if connect.properties.session_expiry_interval().is_some_and(|asked| asked != expiry) {
            // The client uses the server's value from here (MQTT 5.0 §3.2.2.3.2).
            properties.push(Property::SessionExpiryInterval(expiry));
        }
        if let (Some(true), Some(prefix)) =
            (connect.properties.request_response_information(), config.response_prefix.as_deref())
        {
            // The basis of response topics this client may use (MQTT 5.0 §4.10).
            properties.push(Property::ResponseInformation(format!("{prefix}/{}", connect.client_id)));
        }
    }
    // CONNACK goes out before anything the resumed session resends.
    let session_present = shard.borrow().session_present(&connect);
    conn.send(&Packet::ConnAck(ConnAck { session_present, reason: ReasonCode::Success, properties }));
    if let Some(at) = auth.as_ref().and_then(|a| a.expires_at) {
        conn.set_token_expiry(at);
    }
    let (session, _) = shard.borrow_mut().connect(conn.clone(), &connect, auth.clone());
    let cert_cn = stream.peer_identity().and_then(|i| i.common_name);
    events::connected(&shard, &conn, session_present, cert_cn.as_deref());
    let reader = inbound(shard, conn, session, peer);
    let idle = rest.is_empty();
    let buf = ReadBuffer::new(&rest, config.read_buffer);
    let stream = Rc::new(SharedStream(RefCell::new(stream)));
    let connection = Connection { reader, stream, buf, slot, parker: parker.clone() };
    // A client that sent nothing after its CONNECT parks after `--park-after`, like any
    // other. Not at once: a parked connection's next packet goes through the idle watcher,
    // so a client that subscribes a moment after CONNACK would be served after packets
    // other clients sent later. (TLS connections never park: their state lives with
    // their stream.)
    if idle && connection.stream.0.borrow().can_park() {
        parker.ask_after(&connection.reader.conn, config.park_after);
    }
    glommio::spawn_local(run_connection(connection)).detach();
}

/// The reader's side of a connection attached to `session`, with the shard's limits.
fn inbound(shard: ShardRef, conn: Rc<ConnHandle>, session: SessionId, peer: SocketAddr) -> Inbound {
    let config = shard.borrow().config.clone();
    // The session's rules, also for a connection revived after parking.
    let auth = shard.borrow().sessions.entry(&session).and_then(|e| e.auth.clone());
    Inbound {
        shard,
        conn,
        session,
        max_packet_size: config.max_packet_size,
        peer,
        will: WillAction::Publish,
        aliases: None,
        max_topic_alias: config.max_topic_alias,
        receive_maximum: usize::from(config.receive_maximum),
        max_topic_levels: config.max_topic_levels,
        max_session_expiry: config.max_session_expiry,
        alloc: 0,
        forwarded: false,
        auth,
        denials: 0,
    }
}

/// A connection's task, from its CONNACK on. An `async` block, not an `async fn`: the
/// future keeps `c` once, where an `async fn` would keep its argument twice (as passed, and
/// moved into the body), for as long as the connection lives.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn run_connection(mut c: Connection) -> impl std::future::Future<Output = ()> {
    async move {
        // Taken out of the reader, which the read side borrows mutably.
        let (shard, conn) = (c.reader.shard.clone(), c.reader.conn.clone());
        let mut writer;
        loop {
            // The writer is a task of its own, woken only when there is something to
            // write: it goes on while the reader waits (for room, for the logs, for a
            // SUBSCRIBE's peers), and flushes what is left once the reader stopped.
            writer = Some({
                let (shard, conn, stream) = (shard.clone(), conn.clone(), c.stream.clone());
                glommio::spawn_local(async move { run_writer(&shard, &conn, &stream).await })
            });
            if let Ending::Closed = read_loop(&mut c.reader, &c.stream, &mut c.buf).await {
                break;
            }
            // Parking: the writer ends once the outbox is empty, then so does this task;
            // the idle watcher keeps what the connection needs to start them again.
            conn.idle.set(Idle::Parking);
            conn.wake_writer();
            if let Some(writer) = writer.take() {
                writer.await;
            }
            if conn.closing.get() {
                break;
            }
            let parker = c.parker.clone();
            match parker.park(c) {
                Ok(()) => return,
                // Not parked (out of descriptors): served on as it was.
                Err(back) => c = *back,
            }
            conn.idle.set(Idle::Active);
        }
        // Not kept through the flush and the linger: it may be as large as a packet.
        drop(std::mem::take(&mut c.buf.buf));
        // Read before `close` here marks it closed by the server.
        let cause = conn.cause();
        conn.close(None);
        shard.borrow_mut().disconnected(&conn, c.reader.will);
        events::disconnected(&shard, &conn, cause);
        if let Some(writer) = writer {
            writer.await;
        }
        // On the heap while it lasts: the linger's state is larger than an idle connection's.
        Box::pin(linger(&c.stream, conn.fd.get())).await;
        // Named here so that the block owns it (a field it did not use would not be moved
        // in, and would be dropped when this function returns).
        drop(c.slot);
    }
}

/// Why the read loop ended.
enum Ending {
    /// The connection ends.
    Closed,
    /// The connection was idle and asked to park.
    Park,
}

/// The read loop: decodes what the client sends and hands each packet to the shard
/// layer ([`Inbound`]), reading more only once everything buffered was handled.
async fn read_loop(inbound: &mut Inbound, stream: &SharedStream, buf: &mut ReadBuffer) -> Ending {
    loop {
        inbound.alloc = buf.alloc;
        // Handle everything already buffered before reading more.
        loop {
            // Answers wait for room in the outbox: a client that does not read what
            // its packets cause is not read either (TCP back-pressure).
            if !inbound.conn.closing.get() && inbound.conn.pending() >= inbound.conn.outbox_limit {
                // The rare waits are on the heap while they last (so below).
                Box::pin(wait_for_room(&inbound.conn)).await;
            }
            if inbound.conn.closing.get() {
                return Ending::Closed;
            }
            let dropped = inbound.shard.borrow().stats.messages_dropped;
            let flow = match codec::decode(&mut buf.buf, inbound.conn.version, inbound.max_packet_size) {
                Ok(Some(packet)) => inbound.handle(packet),
                Ok(None) => break,
                Err(err) => {
                    tracing::info!(peer = %inbound.peer, client_id = %inbound.conn.client_id, %err, "closing on a bad packet");
                    inbound.conn.close_because(Some(err.reason_code()), Some(&err.to_string()));
                    return Ending::Closed;
                }
            };
            // The rare waits are futures of their own, on the heap while they last:
            // inline, they would make every connection's task as large as they are.
            let mut flow = flow;
            while let Flow::Full(held) = flow {
                Box::pin(held_back(inbound, Hold::Room(&held))).await;
                if inbound.conn.closing.get() {
                    return Ending::Closed;
                }
                flow = inbound.publish(*held);
            }
            match flow {
                Flow::Continue | Flow::Full(_) => {}
                Flow::Stop => return Ending::Closed,
                Flow::Pressure { congested, qos0 } => {
                    Box::pin(held_back(inbound, Hold::Congested(congested, qos0))).await;
                }
                Flow::Subscribe(subscribe) => {
                    if let Flow::Stop = Box::pin(inbound.subscribe(subscribe)).await {
                        return Ending::Closed;
                    }
                }
            }
            if inbound.shard.borrow().stats.messages_dropped != dropped {
                // A subscriber's outbox was full: its writer drains it before this reader
                // goes on (without this, a flooding publisher kept the core for a whole
                // time slice and its subscriber's writer got one turn in ten).
                futures_lite::future::yield_now().await;
            } else {
                // A client whose packets are all buffered must not keep the core from
                // every other connection.
                glommio::yield_if_needed().await;
            }
        }
        if std::mem::take(&mut inbound.forwarded) && inbound.shard.borrow().mesh_backlogged() {
            Box::pin(inbound.wait_for_mesh()).await;
        }
        inbound.conn.wait_until(|c| c.closing.get() || c.pending_acks() < MAX_PENDING_ACKS).await;
        if inbound.conn.closing.get() {
            return Ending::Closed;
        }
        match stream.read_or(buf, &inbound.conn).await {
            ReadEvent::Closing | ReadEvent::Read(Ok(0) | Err(_)) => return Ending::Closed,
            ReadEvent::Park => return Ending::Park,
            ReadEvent::Read(Ok(n)) => {
                inbound.conn.last_read.set(Instant::now());
                inbound.conn.quiet.set(0);
                inbound.shard.borrow_mut().stats.bytes_received += n as u64;
            }
        }
    }
}

/// What a held publisher waits for.
enum Hold<'a> {
    /// The subscribers its last message congested (QoS 0 or not) to drain.
    Congested(Vec<SessionId>, bool),
    /// Room for a message that would not fit.
    Room(&'a HeldPublish),
}

/// Holds a publisher back until the subscribers its last message congested drained, or
/// until a message that would not fit may be tried again. A QoS 0 one waits for a
/// subscriber only while it makes progress (`--qos0-max-wait-ms`, `wait_qos0`). Not
/// reading is the broker's doing: keep-alive is not counted meanwhile.
async fn held_back(inbound: &Inbound, hold: Hold<'_>) {
    inbound.conn.paused.set(true);
    let own = Some(inbound.session);
    match hold {
        Hold::Congested(sessions, qos0) => wait_for_congested(&inbound.shard, own, sessions, qos0).await,
        Hold::Room(held) => wait_to_fit(&inbound.shard, own, held.message()).await,
    }
    inbound.conn.paused.set(false);
    inbound.conn.last_read.set(Instant::now());
}

/// Pauses the reader while the outbox is over its bound, until the writer drained it to
/// half.
async fn wait_for_room(conn: &ConnHandle) {
    if conn.closing.get() || conn.pending() < conn.outbox_limit {
        return;
    }
    // Not reading is the broker's doing here, not the client's: keep-alive is not
    // counted meanwhile (`--write-timeout` ends a client that reads nothing).
    conn.paused.set(true);
    while !conn.closing.get() && conn.pending() >= conn.outbox_limit {
        // The writer clears the flag once the outbox drained below half its bound.
        conn.want_room();
        conn.wait_until(|c| c.closing.get() || !c.wants_room.get()).await;
    }
    conn.paused.set(false);
    conn.last_read.set(Instant::now());
}
