//! One client connection: a reader task that decodes and handles packets, and a writer
//! task that drains the connection's outbox, so that many packets leave in one write.
//!
//! Who waits, who pays: the outbox is bounded by `--write-buffer` in bytes, counting what
//! the writer is writing. A client that sends faster than it reads what its packets cause
//! (acknowledgements, PINGRESP, SUBACK) finds its reader paused once the outbox is full:
//! TCP back-pressure, it waits. QoS 1/2 deliveries wait in the session's queue until the
//! outbox has room; QoS 0 deliveries to a full outbox are dropped (the slow consumer pays).
//! A client that leaves written bytes unread for `--write-timeout` is disconnected.
//!
//! The reader and writer share one descriptor and one glommio stream (`SharedStream`: each
//! poll borrows it only while it runs; glommio wakes reads and writes separately), so a
//! connection costs one file descriptor and neither task needs a lock. Anything that wants the connection closed (takeover, keep-alive,
//! shutdown) calls [`ConnHandle::close`]: the writer flushes what is queued, then shuts
//! the socket down, which ends the reader.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::BytesMut;
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

use super::conn_handle::{ConnHandle, MAX_PENDING_ACKS};
use super::mesh::{CrossMsg, Handoff};
use super::notify::{Event, Notify};
use super::shard::inbound::{Flow, Inbound};
use super::shard::{ShardRef, WillAction};
use super::{placement, ConnectionSlot};
use crate::codec::{
    self, ConnAck, Connect, DecodeError, Packet, Properties, Property, ProtocolVersion, ReasonCode,
};

/// One socket, shared by its connection's reader and writer tasks on the same core. A poll
/// borrows it only while it runs (never across an await), and glommio keeps separate
/// readiness wakers for reading and writing, so both tasks can wait on it at once: one
/// descriptor and one stream per connection.
#[derive(Clone)]
struct SharedStream(Rc<RefCell<TcpStream>>);

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

    /// Reads, or `None` once `wake` fires first (the connection is closing). The read
    /// left behind is not lost: its result stays with the stream for the next read.
    async fn read_or(&self, buf: &mut [u8], wake: &Notify) -> Option<std::io::Result<usize>> {
        futures_lite::future::or(async { Some(self.read(buf).await) }, async {
            wake.notified().await;
            None
        })
        .await
    }
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

/// Writes the outbox until the connection closes.
async fn run_writer(shard: ShardRef, conn: Rc<ConnHandle>, stream: SharedStream) {
    shard.borrow_mut().writers.insert(conn.id, conn.clone());
    loop {
        let chunk = {
            let mut outbox = conn.outbox.borrow_mut();
            if outbox.is_empty() {
                None
            } else {
                Some(outbox.split())
            }
        };
        match chunk {
            Some(chunk) => {
                conn.writing.set(chunk.len());
                let written = stream.write_all(&chunk, &conn.writes).await;
                conn.writing.set(0);
                if written.is_err() {
                    break;
                }
                conn.bytes_sent.set(conn.bytes_sent.get() + chunk.len() as u64);
                if conn.wants_room.get() && conn.has_room() {
                    conn.wants_room.set(false);
                    conn.room.notify_all();
                    shard.borrow_mut().on_writable(conn.session.get());
                }
            }
            None if conn.closing.get() => break,
            None => conn.wake_writer.notified().await,
        }
    }
    shard.borrow_mut().writers.remove(&conn.id);
    conn.mark_closing();
}

/// The smallest read: what an idle connection keeps allocated while it waits.
const MIN_READ: usize = 512;

/// Why reading the CONNECT failed.
enum ConnectFailure {
    Closed,
    TimedOut,
    Invalid(DecodeError),
    NotConnect,
}

/// Serves a socket accepted by this shard: reads its CONNECT, then serves it here or
/// hands it to the shard that owns its client identifier.
pub async fn accept(shard: ShardRef, mut stream: TcpStream, peer: SocketAddr, slot: ConnectionSlot) {
    let _ = stream.set_nodelay(true);
    let (read_buffer, max_packet, connect_timeout) = {
        let s = shard.borrow();
        (s.config.read_buffer, s.config.max_packet_size, s.config.connect_timeout)
    };
    let mut buf = BytesMut::with_capacity(MIN_READ);
    let read = glommio::timer::timeout(connect_timeout, async {
        Ok(read_connect(&mut stream, &mut buf, read_buffer, max_packet).await)
    })
    .await;
    let connect = match read {
        Ok(Ok(connect)) => connect,
        Err(_) | Ok(Err(ConnectFailure::TimedOut)) => {
            tracing::info!(%peer, "no CONNECT within the connect timeout");
            return;
        }
        Ok(Err(ConnectFailure::Closed)) => return,
        Ok(Err(ConnectFailure::NotConnect)) => {
            let first = buf.first().copied().unwrap_or_default();
            tracing::info!(%peer, first_byte = format_args!("{first:#04x}"), "closing: first packet is not CONNECT [MQTT-3.1.0-1]");
            return;
        }
        Ok(Err(ConnectFailure::Invalid(err))) => {
            tracing::info!(%peer, %err, "invalid CONNECT");
            refuse_invalid_connect(stream, &err).await;
            return;
        }
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
            let candidate = format!("ringmq-{local}-{counter:x}-{:x}", std::process::id());
            if placement::owner(&candidate, shards) == local {
                connect.client_id = candidate;
                break;
            }
            counter = shard.borrow_mut().next_id();
        }
        serve(shard, stream, peer, connect, buf, slot, true).await;
        return;
    }
    let owner = placement::owner(&connect.client_id, shards);
    if owner == local || connect.client_id.is_empty() {
        serve(shard, stream, peer, connect, buf, slot, false).await;
        return;
    }
    // Hand the socket to its owner: duplicate the descriptor, let this shard's stream go.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        tracing::warn!(%peer, err = %std::io::Error::last_os_error(), "dup failed during handoff");
        return;
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    drop(stream);
    let handoff = Handoff { fd, peer, connect, rest: buf, slot };
    shard.borrow_mut().send_to(owner, CrossMsg::Handoff(Box::new(handoff)));
}

/// Continues a connection handed over by another shard.
pub async fn adopt(shard: ShardRef, handoff: Handoff) {
    let Handoff { fd, peer, connect, rest, slot } = handoff;
    // SAFETY: the descriptor was duplicated for us and is owned by the handoff.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    serve(shard, stream, peer, connect, rest, slot, false).await;
}

async fn read_connect(
    stream: &mut TcpStream,
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

/// 3.1 requires an identifier; 3.1.1 allows an empty one only with a clean session
/// (MQTT-3.1.3-7/8). v5 always assigns one.
fn refuse_empty_id(connect: &Connect) -> bool {
    match connect.protocol {
        ProtocolVersion::V31 => true,
        ProtocolVersion::V311 => !connect.clean_start,
        ProtocolVersion::V5 => false,
    }
}

/// Answers a CONNECT that could not be accepted as sent, in the version the client spoke.
async fn refuse_invalid_connect(stream: TcpStream, err: &DecodeError) {
    let (version, reason) = match err {
        DecodeError::UnsupportedProtocolVersion { .. } => {
            (ProtocolVersion::V311, ReasonCode::UnsupportedProtocolVersion)
        }
        // Other malformed CONNECTs are closed without a CONNACK (MQTT-4.8.0-1): the
        // version the client speaks is not known for sure.
        _ => return,
    };
    refuse(stream, version, reason).await;
}

/// Sends a refusing CONNACK and closes, lingering so the client reads it.
async fn refuse(stream: TcpStream, version: ProtocolVersion, reason: ReasonCode) {
    let packet =
        Packet::ConnAck(ConnAck { session_present: false, reason, properties: Properties::default() });
    let mut buf = BytesMut::new();
    if codec::encode(&packet, version, &mut buf).is_err() {
        return;
    }
    let fd = stream.as_raw_fd();
    let stream = SharedStream(Rc::new(RefCell::new(stream)));
    if stream.write_all(&buf, &Cell::new(0)).await.is_ok() {
        linger(&stream, fd).await;
    }
}

async fn serve(
    shard: ShardRef,
    stream: TcpStream,
    peer: SocketAddr,
    connect: Connect,
    buf: BytesMut,
    slot: ConnectionSlot,
    assigned: bool,
) {
    let _slot = slot;
    let version = connect.protocol;
    if connect.client_id.is_empty() {
        tracing::info!(%peer, "empty client identifier refused [MQTT-3.1.3-8]");
        refuse(stream, version, ReasonCode::ClientIdentifierNotValid).await;
        return;
    }
    if version.is_v5() && connect.properties.authentication_method().is_some() {
        // No authentication methods are configured (MQTT-4.12.0-1 lets the server refuse).
        tracing::info!(%peer, client_id = %connect.client_id, "authentication method not supported");
        refuse(stream, version, ReasonCode::BadAuthenticationMethod).await;
        return;
    }
    if !shard.borrow_mut().has_room_for_session(&connect) {
        tracing::warn!(%peer, client_id = %connect.client_id, "connection refused: --max-sessions reached");
        refuse(stream, version, ReasonCode::QuotaExceeded).await;
        return;
    }
    let (max_packet_size, write_buffer, read_buffer, conn_id) = {
        let mut s = shard.borrow_mut();
        (s.config.max_packet_size, s.config.write_buffer, s.config.read_buffer, s.next_id())
    };
    let response_prefix = shard.borrow().config.response_prefix.clone();
    let (max_keep_alive, max_topic_alias, receive_maximum, max_topic_levels) = {
        let s = shard.borrow();
        (
            s.config.max_keep_alive,
            s.config.max_topic_alias,
            s.config.receive_maximum,
            s.config.max_topic_levels,
        )
    };
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
    let keep_alive_limit = (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500));
    let conn = Rc::new(ConnHandle {
        id: conn_id,
        client_id: connect.client_id.clone(),
        version,
        max_packet_size: client_max,
        outbox: RefCell::new(BytesMut::with_capacity(256)),
        outbox_limit: write_buffer,
        writing: Cell::new(0),
        wants_room: Cell::new(false),
        room: Event::default(),
        writes: Cell::new(0),
        write_watch: Cell::new((0, Instant::now())),
        wake_writer: Notify::default(),
        wake_reader: Notify::default(),
        closing: Cell::new(false),
        fd: stream.as_raw_fd(),
        last_read: Cell::new(Instant::now()),
        paused: Cell::new(false),
        keep_alive_limit,
        session: Cell::new(0),
        bytes_sent: shard.borrow().bytes_sent.clone(),
        // Bounded by our own limit too: each alias keeps a topic in memory.
        topic_alias_maximum: connect.properties.topic_alias_maximum().unwrap_or(0).min(max_topic_alias),
        problem_information: version.is_v5()
            && connect.properties.request_problem_information().unwrap_or(true),
        pending_acks: RefCell::new(VecDeque::new()),
        acks_base: Cell::new(0),
        acks_sent: Event::default(),
        aliases_out: RefCell::new(AHashMap::new()),
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
            (connect.properties.request_response_information(), response_prefix.as_deref())
        {
            // The basis of response topics this client may use (MQTT 5.0 §4.10).
            properties.push(Property::ResponseInformation(format!("{prefix}/{}", connect.client_id)));
        }
    }
    // CONNACK goes out before anything the resumed session resends.
    let session_present = shard.borrow().session_present(&connect);
    conn.send(&Packet::ConnAck(ConnAck { session_present, reason: ReasonCode::Success, properties }));
    let (session, _) = shard.borrow_mut().connect(conn.clone(), &connect);
    tracing::debug!(%peer, client_id = %conn.client_id, ?version, session_present, "connected");
    let fd = stream.as_raw_fd();
    let stream = SharedStream(Rc::new(RefCell::new(stream)));
    let writer = glommio::spawn_local(run_writer(shard.clone(), conn.clone(), stream.clone()));

    let mut reader = Inbound {
        shard: shard.clone(),
        conn: conn.clone(),
        session,
        max_packet_size,
        peer,
        will: WillAction::Publish,
        aliases: AHashMap::new(),
        max_topic_alias,
        receive_maximum: usize::from(receive_maximum),
        max_topic_levels,
        max_session_expiry: shard.borrow().config.max_session_expiry,
        alloc: 0,
    };
    let mut buf = buf;
    read_loop(&mut reader, &stream, &mut buf, read_buffer).await;
    // Not kept through the linger: it may be as large as a packet.
    drop(buf);

    conn.close(None);
    shard.borrow_mut().disconnected(&conn, reader.will);
    writer.await;
    linger(&stream, fd).await;
    tracing::debug!(%peer, client_id = %conn.client_id, "disconnected");
}

/// The read loop: decodes what the client sends and hands each packet to the shard
/// layer ([`Inbound`]), reading more only once everything buffered was handled.
async fn read_loop(inbound: &mut Inbound, stream: &SharedStream, buf: &mut BytesMut, read_buffer: usize) {
    let mut chunk = MIN_READ.min(read_buffer);
    // The CONNECT's buffer is an allocation of unknown size: go on in one whose size is
    // known, so that what is decoded says what it pins (`Message::pinned`).
    let mut fresh = BytesMut::with_capacity(buf.len().max(chunk));
    fresh.extend_from_slice(buf);
    *buf = fresh;
    inbound.alloc = buf.capacity();
    loop {
        // Handle everything already buffered before reading more.
        loop {
            // Answers wait for room in the outbox: a client that does not read what
            // its packets cause is not read either (TCP back-pressure).
            wait_for_room(&inbound.conn).await;
            if inbound.conn.closing.get() {
                return;
            }
            match codec::decode(buf, inbound.conn.version, inbound.max_packet_size) {
                Ok(Some(packet)) => {
                    if let Flow::Stop = inbound.handle(packet).await {
                        return;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::info!(peer = %inbound.peer, client_id = %inbound.conn.client_id, %err, "closing on a bad packet");
                    inbound.conn.close_because(Some(err.reason_code()), Some(&err.to_string()));
                    return;
                }
            }
            // A client whose packets are all buffered must not keep the core from
            // every other connection.
            glommio::yield_if_needed().await;
        }
        inbound.wait_for_mesh().await;
        while inbound.conn.pending_acks.borrow().len() >= MAX_PENDING_ACKS && !inbound.conn.closing.get() {
            inbound.conn.acks_sent.wait().await;
        }
        if inbound.conn.closing.get() {
            return;
        }
        // A quiet connection gives back a large buffer: idle clients cost little memory.
        if buf.is_empty() && buf.capacity() > 4 * chunk {
            *buf = BytesMut::new();
        }
        let start = buf.len();
        // Grown here, not by `resize`, so `alloc` knows the allocation's size; a packet
        // whose header says it is large gets its whole size at once.
        if buf.capacity() < start + chunk && !buf.try_reclaim(chunk) {
            let whole = codec::packet_size(buf).unwrap_or(0);
            let mut fresh = BytesMut::with_capacity((start + chunk).max(whole));
            fresh.extend_from_slice(buf);
            *buf = fresh;
            inbound.alloc = buf.capacity();
        }
        buf.resize(start + chunk, 0);
        match stream.read_or(&mut buf[start..], &inbound.conn.wake_reader).await {
            None | Some(Ok(0) | Err(_)) => return,
            Some(Ok(n)) => {
                inbound.conn.last_read.set(Instant::now());
                buf.truncate(start + n);
                inbound.shard.borrow_mut().stats.bytes_received += n as u64;
                // Reads that fill the chunk double it; short reads shrink it.
                chunk = if n == chunk { chunk * 2 } else { (n * 2).next_power_of_two() };
                chunk = chunk.clamp(MIN_READ.min(read_buffer), read_buffer);
            }
        }
    }
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
        conn.want_room();
        conn.room.wait().await;
    }
    conn.paused.set(false);
    conn.last_read.set(Instant::now());
}
