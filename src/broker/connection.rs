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

use bytes::{Bytes, BytesMut};
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

use super::mesh::{Confirm, CrossMsg, Handoff};
use ahash::AHashMap;

use super::message::Message;
use super::notify::{Event, Notify};
use super::session::{SessionId, Subscription};
use super::shard::{Published, ShardRef, WillAction};
use super::{placement, ConnectionSlot};
use crate::codec::{
    self, ConnAck, Connect, DecodeError, Disconnect, Packet, PacketId, Properties, Property, ProtocolVersion,
    PubAck, QoS, ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::topic::{TopicFilter, TopicName};

pub type ConnId = u64;

/// The part of a connection other tasks of its shard may touch.
pub struct ConnHandle {
    pub id: ConnId,
    pub client_id: String,
    pub version: ProtocolVersion,
    /// The client's Maximum Packet Size (v5), or the protocol maximum.
    pub max_packet_size: usize,
    outbox: RefCell<BytesMut>,
    outbox_limit: usize,
    /// Bytes the writer took from the outbox and is writing: they count against the bound.
    writing: Cell<usize>,
    /// Someone (the reader, or the session's QoS 1/2 flow) waits for the outbox to drain
    /// below half its bound: the writer then fires `room` and pumps the session.
    wants_room: Cell<bool>,
    room: Event,
    /// Partial writes completed (wrapping): the write-timeout check compares it.
    writes: Cell<u64>,
    /// `writes` as the shard's tick last saw it change, and when.
    write_watch: Cell<(u64, Instant)>,
    wake_writer: Notify,
    /// Wakes a reader waiting in `read` when the connection is closed from elsewhere.
    wake_reader: Notify,
    closing: Cell<bool>,
    /// Descriptor the writer shuts down; valid while the connection is registered.
    fd: RawFd,
    last_read: Cell<Instant>,
    /// The reader waits for room in the outbox: keep-alive is not counted.
    paused: Cell<bool>,
    /// 1.5 × the keep-alive the client asked for; `None` when it asked for none.
    keep_alive_limit: Option<Duration>,
    /// The session this connection is attached to.
    pub session: Cell<SessionId>,
    /// The shard's count of bytes written, for `$SYS`.
    bytes_sent: Rc<Cell<u64>>,
    /// The client's Topic Alias Maximum (v5): aliases this server may assign.
    topic_alias_maximum: u16,
    /// v5 and the client did not turn Request Problem Information off: acknowledgements
    /// may carry a Reason String (MQTT-3.1.2-29).
    problem_information: bool,
    /// PUBACK/PUBREC waiting for confirmations that their message is in the logs, in the
    /// order their PUBLISH arrived (MQTT-4.6.0-2); the front has sequence `acks_base`.
    pending_acks: RefCell<VecDeque<PendingAck>>,
    acks_base: Cell<u64>,
    /// Fired when pending acknowledgements went out: a reader paused on too many resumes.
    acks_sent: Event,
    /// Topic aliases this server assigned, by topic.
    aliases_out: RefCell<AHashMap<Bytes, u16>>,
}

struct PendingAck {
    packet: Packet,
    waiting: u32,
}

/// Acknowledgements one connection may have waiting for log confirmations before its
/// reader pauses (back-pressure on a publisher faster than the logs).
const MAX_PENDING_ACKS: usize = 4096;

impl ConnHandle {
    /// The sequence the next queued acknowledgement gets.
    pub fn next_ack_seq(&self) -> u64 {
        self.acks_base.get() + self.pending_acks.borrow().len() as u64
    }

    /// Sends an acknowledgement once `waiting` confirmations arrived and every earlier one
    /// went out.
    pub fn queue_ack(&self, packet: Packet, waiting: u32) {
        let mut pending = self.pending_acks.borrow_mut();
        if waiting == 0 && pending.is_empty() {
            drop(pending);
            self.acks_base.set(self.acks_base.get() + 1);
            self.send(&packet);
            return;
        }
        pending.push_back(PendingAck { packet, waiting });
    }

    /// A confirmation for acknowledgement `seq` arrived.
    pub fn confirm(&self, seq: u64) {
        let mut pending = self.pending_acks.borrow_mut();
        let base = self.acks_base.get();
        let Some(entry) = seq.checked_sub(base).and_then(|i| pending.get_mut(i as usize)) else { return };
        entry.waiting = entry.waiting.saturating_sub(1);
        let mut sent = 0;
        while pending.front().is_some_and(|e| e.waiting == 0) {
            if let Some(ready) = pending.pop_front() {
                self.send(&ready.packet);
                sent += 1;
            }
        }
        self.acks_base.set(base + sent);
        if sent > 0 {
            self.acks_sent.notify_all();
        }
    }

    /// Properties of an acknowledgement that failed: a Reason String when the client takes
    /// one and it fits the client's Maximum Packet Size (MQTT-3.4.2-2).
    pub fn problem(&self, why: &str) -> Properties {
        let mut properties = Properties::default();
        if self.problem_information && why.len() + 64 < self.max_packet_size {
            properties.push(Property::ReasonString(why.to_string()));
        }
        properties
    }

    /// Bytes waiting to be written to this connection, including those being written.
    pub fn pending(&self) -> usize {
        self.outbox.borrow().len() + self.writing.get()
    }

    /// Whether the outbox takes another PUBLISH (QoS 1/2 sends wait while it does not).
    pub fn can_send(&self) -> bool {
        !self.closing.get() && self.pending() < self.outbox_limit
    }

    /// Asks the writer to say when the outbox drained below half its bound.
    pub fn want_room(&self) {
        self.wants_room.set(true);
    }

    /// Queues encoded bytes; false (and nothing queued) when the outbox is full. As for
    /// every producer, "full" is "at or past the bound": a packet is never refused for
    /// its own size, so the bound is passed by at most one packet.
    pub fn enqueue(&self, bytes: Bytes) -> bool {
        if self.closing.get() || self.pending() >= self.outbox_limit {
            return false;
        }
        self.outbox.borrow_mut().extend_from_slice(&bytes);
        self.wake_writer.notify();
        true
    }

    /// Encodes a control packet into the outbox. Control packets (acks, CONNACK) are
    /// answers to what the client sent: the reader stops reading while the outbox is full,
    /// so they overshoot the bound by at most one packet's answer.
    pub fn send(&self, packet: &Packet) {
        if self.closing.get() {
            return;
        }
        if let Err(err) = codec::encode_with_limit(
            packet,
            self.version,
            self.max_packet_size,
            &mut self.outbox.borrow_mut(),
        ) {
            tracing::debug!(client_id = %self.client_id, %err, "packet not sent");
            return;
        }
        self.wake_writer.notify();
    }

    /// Sends a PUBLISH made for this connection: skipped (false) when it exceeds the
    /// client's Maximum Packet Size (MQTT-3.1.2-25) or, if `bounded`, when the outbox is
    /// full; its topic replaced by an alias when the client accepts them (MQTT-3.3.2.3.4).
    pub fn send_publish(&self, mut publish: codec::OutgoingPublish<'_>, bounded: bool) -> bool {
        if self.closing.get() || (bounded && self.pending() >= self.outbox_limit) {
            return false;
        }
        // An alias is recorded only once the packet that introduces it is sent.
        let mut new_alias = None;
        if self.topic_alias_maximum > 0 {
            let aliases = self.aliases_out.borrow();
            match aliases.get(publish.topic) {
                Some(alias) => {
                    publish.topic_alias = Some(*alias);
                    publish.topic = &[];
                }
                None if aliases.len() < usize::from(self.topic_alias_maximum) => {
                    let alias = aliases.len() as u16 + 1;
                    publish.topic_alias = Some(alias);
                    new_alias = Some(alias);
                }
                None => {}
            }
        }
        if let Err(err) = publish.encode(self.version, self.max_packet_size, &mut self.outbox.borrow_mut()) {
            tracing::debug!(client_id = %self.client_id, %err, "publish not sent");
            return false;
        }
        if let Some(alias) = new_alias {
            // Its own copy: the alias outlives the buffer the topic was read into.
            self.aliases_out.borrow_mut().insert(Bytes::copy_from_slice(publish.topic), alias);
        }
        self.wake_writer.notify();
        true
    }

    /// Whether shared QoS 0 bytes can go to this connection as they are: not when it uses
    /// topic aliases, which make each connection's encoding its own.
    pub fn takes_shared_encoding(&self) -> bool {
        self.topic_alias_maximum == 0
    }

    /// Whether the outbox is below half its bound: room for bulk deliveries.
    pub fn has_room(&self) -> bool {
        self.pending() < self.outbox_limit / 2
    }

    /// Called by the shard's tick: whether bytes have waited unwritten, with no write
    /// making progress, for `timeout` (a client that does not read).
    pub fn write_stalled(&self, now: Instant, timeout: Duration) -> bool {
        let (seen, since) = self.write_watch.get();
        if self.pending() == 0 || self.writes.get() != seen {
            self.write_watch.set((self.writes.get(), now));
            return false;
        }
        now.duration_since(since) >= timeout
    }

    /// Ends a connection that stopped reading: its socket is shut down, which fails the
    /// write it is stuck in. Only while its writer runs (the descriptor is still open).
    pub fn abort(&self) {
        // SAFETY: the writer has not finished, so the stream owning `fd` is still open.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        self.mark_closing();
    }

    /// Marks the connection closing and wakes whoever waits on it: the reader (in `read`,
    /// for room, or on unconfirmed acknowledgements) and the writer.
    fn mark_closing(&self) {
        self.closing.set(true);
        self.wake_reader.notify();
        self.room.notify_all();
        self.acks_sent.notify_all();
        self.wake_writer.notify();
    }

    /// Asks the connection to end; a v5 client is first told why.
    pub fn close(&self, reason: Option<ReasonCode>) {
        self.close_because(reason, None);
    }

    /// [`ConnHandle::close`] with a Reason String for a v5 client, left out when it would
    /// exceed the client's Maximum Packet Size (MQTT-3.14.2-3).
    pub fn close_because(&self, reason: Option<ReasonCode>, why: Option<&str>) {
        if self.closing.get() {
            return;
        }
        if let (Some(reason), true) = (reason, self.version.is_v5()) {
            let mut disconnect = Disconnect { reason, properties: Properties::default() };
            if let Some(why) = why {
                disconnect.properties.push(Property::ReasonString(why.to_string()));
                let size = codec::encoded_size(&Packet::Disconnect(disconnect.clone()), self.version);
                if size > self.max_packet_size {
                    disconnect.properties = Properties::default();
                }
            }
            self.send(&Packet::Disconnect(disconnect));
        }
        self.mark_closing();
    }

    pub fn keep_alive_expired(&self, now: Instant) -> bool {
        if self.paused.get() {
            return false;
        }
        match self.keep_alive_limit {
            Some(limit) => now.duration_since(self.last_read.get()) > limit,
            None => false,
        }
    }
}

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

/// Per-connection state the reader keeps to itself.
struct Reader {
    shard: ShardRef,
    conn: Rc<ConnHandle>,
    session: SessionId,
    max_packet_size: usize,
    peer: SocketAddr,
    /// What happens to the will when the reader stops.
    will: WillAction,
    /// Topic aliases the client set (v5), at most `max_topic_alias`.
    aliases: AHashMap<u16, TopicName>,
    max_topic_alias: u16,
    /// The Receive Maximum advertised to the client: QoS 2 publishes awaiting PUBREL.
    receive_maximum: usize,
    max_topic_levels: usize,
    max_session_expiry: u32,
    /// Size of the allocation `buf` is a view of: what a PUBLISH decoded from it pins.
    alloc: usize,
}

enum Flow {
    Continue,
    Stop,
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

    let mut reader = Reader {
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
    reader.run(&stream, &mut buf, read_buffer).await;
    // Not kept through the linger: it may be as large as a packet.
    drop(buf);

    conn.close(None);
    shard.borrow_mut().disconnected(&conn, reader.will);
    writer.await;
    linger(&stream, fd).await;
    tracing::debug!(%peer, client_id = %conn.client_id, "disconnected");
}

impl Reader {
    async fn run(&mut self, stream: &SharedStream, buf: &mut BytesMut, read_buffer: usize) {
        let mut chunk = MIN_READ.min(read_buffer);
        // The CONNECT's buffer is an allocation of unknown size: go on in one whose size is
        // known, so that what is decoded says what it pins (`Message::pinned`).
        let mut fresh = BytesMut::with_capacity(buf.len().max(chunk));
        fresh.extend_from_slice(buf);
        *buf = fresh;
        self.alloc = buf.capacity();
        loop {
            // Handle everything already buffered before reading more.
            loop {
                // Answers wait for room in the outbox: a client that does not read what
                // its packets cause is not read either (TCP back-pressure).
                self.wait_for_room().await;
                if self.conn.closing.get() {
                    return;
                }
                match codec::decode(buf, self.conn.version, self.max_packet_size) {
                    Ok(Some(packet)) => {
                        if let Flow::Stop = self.handle(packet).await {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(err) => {
                        tracing::info!(peer = %self.peer, client_id = %self.conn.client_id, %err, "closing on a bad packet");
                        self.conn.close_because(Some(err.reason_code()), Some(&err.to_string()));
                        return;
                    }
                }
                // A client whose packets are all buffered must not keep the core from
                // every other connection.
                glommio::yield_if_needed().await;
            }
            self.wait_for_mesh().await;
            while self.conn.pending_acks.borrow().len() >= MAX_PENDING_ACKS && !self.conn.closing.get() {
                self.conn.acks_sent.wait().await;
            }
            if self.conn.closing.get() {
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
                self.alloc = buf.capacity();
            }
            buf.resize(start + chunk, 0);
            match stream.read_or(&mut buf[start..], &self.conn.wake_reader).await {
                None | Some(Ok(0) | Err(_)) => return,
                Some(Ok(n)) => {
                    self.conn.last_read.set(Instant::now());
                    buf.truncate(start + n);
                    self.shard.borrow_mut().stats.bytes_received += n as u64;
                    // Reads that fill the chunk double it; short reads shrink it.
                    chunk = if n == chunk { chunk * 2 } else { (n * 2).next_power_of_two() };
                    chunk = chunk.clamp(MIN_READ.min(read_buffer), read_buffer);
                }
            }
        }
    }

    /// Pauses the reader while the outbox is over its bound, until the writer drained it
    /// to half.
    async fn wait_for_room(&self) {
        if self.conn.closing.get() || self.conn.pending() < self.conn.outbox_limit {
            return;
        }
        // Not reading is the broker's doing here, not the client's: keep-alive is not
        // counted meanwhile (`--write-timeout` ends a client that reads nothing).
        self.conn.paused.set(true);
        while !self.conn.closing.get() && self.conn.pending() >= self.conn.outbox_limit {
            self.conn.want_room();
            self.conn.room.wait().await;
        }
        self.conn.paused.set(false);
        self.conn.last_read.set(Instant::now());
    }

    /// Pauses this publisher while a peer shard's queue is over its bound.
    async fn wait_for_mesh(&self) {
        loop {
            let drained = {
                let s = self.shard.borrow();
                if !s.mesh_backlogged() {
                    return;
                }
                s.mesh_drained.clone()
            };
            drained.wait().await;
        }
    }

    /// Routes a client's PUBLISH and queues its acknowledgement. Returns whether a
    /// subscriber's queue is now over half its bound (the caller pauses), or the flow that
    /// ends the connection.
    fn route_publish(
        &mut self,
        message: Message,
        qos: QoS,
        packet_id: Option<PacketId>,
    ) -> Result<bool, Flow> {
        let mut shard = self.shard.borrow_mut();
        let confirm = self.confirm(shard.id);
        match (qos, packet_id) {
            (QoS::AtMostOnce, _) => {
                shard.publish(Some(self.session), message, None);
            }
            (QoS::AtLeastOnce, Some(id)) => {
                // Acknowledged once every log it went to has it (acknowledge after append).
                let published = shard.publish(Some(self.session), message, Some(confirm));
                if published.failed {
                    // Not in the logs: no PUBACK, the connection is closing (refused).
                    return Err(Flow::Stop);
                }
                let puback = ack(id, self.delivery_reason(published.matched));
                self.conn.queue_ack(Packet::PubAck(puback), published.waits);
            }
            (QoS::ExactlyOnce, Some(id)) => {
                let (pending, duplicate) = shard
                    .sessions
                    .get(&self.session)
                    .map_or((0, false), |s| (s.qos2_inbound.len(), s.qos2_inbound.contains(&id.get())));
                // A resent duplicate takes no new slot of the Receive Maximum.
                if self.conn.version.is_v5() && !duplicate && pending >= self.receive_maximum {
                    drop(shard);
                    return Err(self.close_with(
                        ReasonCode::ReceiveMaximumExceeded,
                        "more QoS 2 publishes unacknowledged than the Receive Maximum",
                    ));
                }
                // Delivered once even if the client resends before PUBREL (method B).
                let before = shard.log_position();
                let first = shard.sessions.get_mut(&self.session).is_some_and(|s| s.receive_qos2(id.get()));
                // A resent duplicate was accepted before: Success.
                let confirm = Confirm { qos2_packet_id: Some(id.get()), ..confirm };
                let published = match first {
                    true => shard.publish_after(Some(self.session), message, Some(confirm), before),
                    false => Published { matched: true, waits: 0, failed: false },
                };
                if published.failed {
                    // Not in the logs: no PUBREC, the identifier is released, the
                    // connection is closing (refused).
                    return Err(Flow::Stop);
                }
                let pubrec = ack(id, self.delivery_reason(published.matched));
                self.conn.queue_ack(Packet::PubRec(pubrec), published.waits);
            }
            _ => {
                drop(shard);
                return Err(self.protocol_error("QoS > 0 without a packet identifier"));
            }
        }
        Ok(shard.take_pressure_hit())
    }

    /// `$SYS/...` is the broker's own: a client's PUBLISH there is not delivered. v5
    /// clients are told (0x87 Not authorized); 3.1.1 has no way to say it, so the flow is
    /// completed as usual (Mosquitto does the same).
    fn refuse_sys_publish(&mut self, qos: QoS, packet_id: Option<PacketId>) -> Flow {
        tracing::debug!(client_id = %self.conn.client_id, "PUBLISH to $SYS refused");
        let reason = if self.conn.version.is_v5() { ReasonCode::NotAuthorized } else { ReasonCode::Success };
        let mut answer = ack_with(packet_id, reason);
        if reason.is_error() {
            if let Some(answer) = answer.as_mut() {
                answer.properties = self.conn.problem("$SYS topics are the broker's own");
            }
        }
        match (qos, answer) {
            (QoS::AtLeastOnce, Some(puback)) => self.conn.queue_ack(Packet::PubAck(puback), 0),
            (QoS::ExactlyOnce, Some(pubrec)) => self.conn.queue_ack(Packet::PubRec(pubrec), 0),
            _ => {}
        }
        Flow::Continue
    }

    /// What the next acknowledgement queued on this connection waits for, asked of the
    /// shards that log what it acknowledges.
    fn confirm(&self, shard: usize) -> Confirm {
        Confirm {
            shard,
            conn: self.conn.id,
            seq: self.conn.next_ack_seq(),
            session: self.session,
            qos2_packet_id: None,
        }
    }

    fn protocol_error(&self, what: &str) -> Flow {
        self.close_with(ReasonCode::ProtocolError, what)
    }

    /// The reason code acknowledging an accepted PUBLISH: v5 clients learn when no
    /// subscription matched it (0x10, a success code).
    fn delivery_reason(&self, matched: bool) -> ReasonCode {
        if matched || !self.conn.version.is_v5() {
            ReasonCode::Success
        } else {
            ReasonCode::NoMatchingSubscribers
        }
    }

    fn close_with(&self, reason: ReasonCode, what: &str) -> Flow {
        tracing::info!(peer = %self.peer, client_id = %self.conn.client_id, "closing: {what}");
        self.conn.close_because(Some(reason), Some(what));
        Flow::Stop
    }

    async fn handle(&mut self, packet: Packet) -> Flow {
        match packet {
            Packet::Publish(mut publish) => {
                if let Some(alias) = publish.properties.topic_alias() {
                    if alias > self.max_topic_alias {
                        return self
                            .close_with(ReasonCode::TopicAliasInvalid, "topic alias above the maximum");
                    }
                    if publish.topic.is_empty() {
                        match self.aliases.get(&alias) {
                            Some(topic) => publish.topic = topic.clone(),
                            None => {
                                return self.close_with(ReasonCode::TopicAliasInvalid, "unknown topic alias")
                            }
                        }
                    } else {
                        // Kept as its own copy: an alias outlives the read buffer it came in.
                        let topic = TopicName::new(Bytes::copy_from_slice(publish.topic.as_bytes()));
                        if let Ok(topic) = topic {
                            self.aliases.insert(alias, topic);
                        }
                    }
                } else if publish.topic.is_empty() {
                    return self.protocol_error("empty topic without a topic alias [MQTT-3.3.2-1]");
                }
                if publish.properties.subscription_identifiers().next().is_some() {
                    return self.protocol_error(
                        "PUBLISH from a client with a Subscription Identifier [MQTT-3.3.4-6]",
                    );
                }
                if publish.topic.len() >= self.max_topic_levels
                    && publish.topic.levels().count() > self.max_topic_levels
                {
                    return self.close_with(
                        ReasonCode::TopicNameInvalid,
                        "topic has more levels than --max-topic-levels",
                    );
                }
                let (qos, packet_id) = (publish.qos, publish.packet_id);
                if publish.topic.as_str() == "$SYS" || publish.topic.as_str().starts_with("$SYS/") {
                    return self.refuse_sys_publish(qos, packet_id);
                }
                let message = Message::from_publish(publish, self.alloc);
                let hit = match self.route_publish(message, qos, packet_id) {
                    Ok(hit) => hit,
                    Err(flow) => return flow,
                };
                if hit {
                    // This publisher's message left a subscriber's queue over half its
                    // bound: wait until it drained (back-pressure instead of drops).
                    super::mesh::wait_for_pressure(&self.shard, Some(self.session)).await;
                }
                Flow::Continue
            }
            Packet::PubRel(rel) => {
                let mut shard = self.shard.borrow_mut();
                let before = shard.log_position();
                let known = shard
                    .sessions
                    .get_mut(&self.session)
                    .is_some_and(|s| s.release_qos2(rel.packet_id.get()));
                let mut comp = ack(rel.packet_id, ReasonCode::Success);
                if !known {
                    comp.reason = ReasonCode::PacketIdentifierNotFound;
                    comp.properties =
                        self.conn.problem("no QoS 2 publish awaits PUBREL with this identifier");
                }
                // With --fsync always, PUBCOMP waits until the released identifier is on the
                // device: the client may reuse it at once.
                let confirm = self.confirm(shard.id);
                if shard.log_position().failed_since(before) {
                    // The release is not in the log: no PUBCOMP. Kept pending, so that the
                    // PUBREL the client resends is logged again.
                    if let (true, Some(session)) = (known, shard.sessions.get_mut(&self.session)) {
                        session.qos2_inbound.insert(rel.packet_id.get());
                    }
                    shard.refuse_confirm(confirm);
                    return Flow::Stop;
                }
                let waits = shard.flush_wait(confirm, before);
                self.conn.queue_ack(Packet::PubComp(comp), waits);
                Flow::Continue
            }
            Packet::PubAck(a) => {
                self.shard.borrow_mut().on_puback(self.session, a.packet_id);
                Flow::Continue
            }
            Packet::PubRec(a) => {
                self.shard.borrow_mut().on_pubrec(self.session, a.packet_id, a.reason);
                Flow::Continue
            }
            Packet::PubComp(a) => {
                self.shard.borrow_mut().on_pubcomp(self.session, a.packet_id);
                Flow::Continue
            }
            Packet::Subscribe(subscribe) => self.subscribe(subscribe).await,
            Packet::Unsubscribe(unsubscribe) => {
                self.unsubscribe(unsubscribe);
                Flow::Continue
            }
            Packet::PingReq => {
                self.conn.send(&Packet::PingResp);
                Flow::Continue
            }
            Packet::Disconnect(disconnect) => self.disconnect(disconnect),
            Packet::Connect(_) => self.protocol_error("second CONNECT [MQTT-3.1.0-2]"),
            Packet::Auth(_) => self.protocol_error("AUTH without an authentication method"),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.protocol_error("server-to-client packet sent by a client")
            }
        }
    }

    fn disconnect(&mut self, disconnect: Disconnect) -> Flow {
        if let Some(expiry) = disconnect.properties.session_expiry_interval() {
            let mut shard = self.shard.borrow_mut();
            if let Some(session) = shard.sessions.get_mut(&self.session) {
                if session.expiry_interval == 0 && expiry != 0 {
                    drop(shard);
                    return self.protocol_error("session expiry set at DISCONNECT after 0 [MQTT-3.14.2-2]");
                }
                session.expiry_interval = expiry.min(self.max_session_expiry);
            }
        }
        self.will = if disconnect.reason == ReasonCode::DisconnectWithWillMessage {
            WillAction::Publish
        } else {
            WillAction::Discard
        };
        Flow::Stop
    }

    async fn subscribe(&mut self, subscribe: Subscribe) -> Flow {
        let v5 = self.conn.version.is_v5();
        let identifier = subscribe.properties.subscription_identifiers().next();
        let filters = subscribe.filters;
        // A filter repeated in one SUBSCRIBE is applied once, with its last options (each
        // replaces the one before, MQTT-3.8.4-3), and answered alike at every place.
        let mut last: AHashMap<&TopicFilter, usize> = AHashMap::with_capacity(filters.len());
        for (index, (filter, _)) in filters.iter().enumerate() {
            last.insert(filter, index);
        }
        let mut reasons = vec![ReasonCode::UnspecifiedError; filters.len()];
        let mut refused: Option<String> = None;
        let mut waits = Vec::new();
        let mut retained = Vec::new();
        for (index, (filter, options)) in filters.iter().enumerate() {
            if last.get(filter) != Some(&index) {
                continue;
            }
            let options = *options;
            let subscription = Subscription { options, identifier };
            let failure = |code: ReasonCode| if v5 { code } else { ReasonCode::UnspecifiedError };
            // A shared filter's `$share/{group}/` is not part of the topic it matches.
            let prefix = if filter.as_str().starts_with("$share/") { 2 } else { 0 };
            if filter.levels().count().saturating_sub(prefix) > self.max_topic_levels {
                refused = Some(format!("{filter}: more levels than --max-topic-levels"));
                reasons[index] = failure(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if let Err(why) = self.shard.borrow().subscription_room(self.session, filter) {
                refused = Some(format!("{filter}: {why}"));
                reasons[index] = failure(ReasonCode::QuotaExceeded);
                continue;
            }
            // Its own copy: a subscription outlives the buffer the SUBSCRIBE was read into.
            let filter = filter.to_compact();
            match crate::broker::shared::parse(&filter) {
                Some(Ok(key)) => {
                    // No retained messages for a shared subscription (MQTT 5.0 §4.8.2).
                    let (pending, _) =
                        self.shard.borrow_mut().join_group(self.session, filter, key, subscription);
                    waits.extend(pending);
                    reasons[index] = granted(options.qos);
                    continue;
                }
                Some(Err(err)) => {
                    tracing::info!(client_id = %self.conn.client_id, %err, "shared subscription refused");
                    refused = Some(format!("{filter}: {err}"));
                    reasons[index] = failure(ReasonCode::TopicFilterInvalid);
                    continue;
                }
                None => {}
            }
            let (pending, existed) =
                self.shard.borrow_mut().subscribe(self.session, filter.clone(), subscription);
            waits.extend(pending);
            // Retain Handling (MQTT-3.3.1-9..11); v3 subscriptions always use 0.
            if options.retain_handling == 0 || (options.retain_handling == 1 && !existed) {
                retained.push((filter, options.qos, identifier));
            }
            reasons[index] = granted(options.qos);
        }
        for (index, (filter, _)) in filters.iter().enumerate() {
            if let Some(&at) = last.get(filter).filter(|at| **at != index) {
                reasons[index] = reasons[at];
            }
        }
        drop(last);
        // A persistent session's new subscription: peers must know to wait for appends here.
        waits.extend(self.shard.borrow().durable_announcement());
        for pending in waits {
            pending.wait().await;
        }
        let properties = refused.map_or_else(Properties::default, |why| self.conn.problem(&why));
        self.conn.send(&Packet::SubAck(SubAck { packet_id: subscribe.packet_id, properties, reasons }));
        let mut shard = self.shard.borrow_mut();
        for (filter, qos, identifier) in retained {
            shard.request_retained(self.session, filter, qos, identifier);
        }
        Flow::Continue
    }

    fn unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for filter in unsubscribe.filters {
            let existed = self.shard.borrow_mut().unsubscribe(self.session, &filter);
            reasons.push(if existed { ReasonCode::Success } else { ReasonCode::NoSubscriptionExisted });
        }
        if !self.conn.version.is_v5() {
            reasons.clear();
        }
        self.conn.send(&Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            properties: Properties::default(),
            reasons,
        }));
    }
}

fn granted(qos: QoS) -> ReasonCode {
    match qos {
        QoS::AtMostOnce => ReasonCode::GRANTED_QOS0,
        QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
        QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
    }
}

fn ack_with(packet_id: Option<PacketId>, reason: ReasonCode) -> Option<PubAck> {
    packet_id.map(|id| ack(id, reason))
}

fn ack(packet_id: PacketId, reason: ReasonCode) -> PubAck {
    PubAck { packet_id, reason, properties: Properties::default() }
}
