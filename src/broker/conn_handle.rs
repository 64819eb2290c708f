//! The part of a connection the rest of its shard touches: the outbox its writer drains
//! (bounded by `--write-buffer`), the flags and wake-ups that close it, the
//! acknowledgements that wait for log confirmations. The connection's tasks (I/O) and the
//! shard both hold it; it does no I/O itself.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::{Bytes, BytesMut};

use super::session::{Link, SessionId};
use crate::codec::{self, Disconnect, Packet, Properties, Property, ProtocolVersion, ReasonCode};

pub type ConnId = u64;

/// The part of a connection other tasks of its shard may touch.
pub struct ConnHandle {
    pub id: ConnId,
    /// Shared with the session and the shard's index of client identifiers.
    pub client_id: Rc<str>,
    pub version: ProtocolVersion,
    /// The client's Maximum Packet Size (v5), or the protocol maximum.
    pub max_packet_size: usize,
    /// Bytes waiting to be written: the writer writes from its front. Empty, it holds no
    /// allocation.
    pub(super) outbox: RefCell<BytesMut>,
    pub(super) outbox_limit: usize,
    /// Bytes of the writer's current round (what the outbox held when it began) already
    /// written: they count against the bound until the whole round is written.
    pub(super) writing: Cell<usize>,
    /// Someone (the reader, or the session's QoS 1/2 flow) waits for the outbox to drain
    /// below half its bound: the writer then clears it, wakes the task and pumps the
    /// session.
    pub(super) wants_room: Cell<bool>,
    /// Partial writes completed (wrapping): the write-timeout check compares it.
    pub(super) writes: Cell<u64>,
    /// `writes` as the shard's tick last saw it change, and when.
    pub(super) write_watch: Cell<(u64, Instant)>,
    /// The connection's reader task, while it waits: woken when the outbox has room,
    /// acknowledgements went out, or the connection is closing. Whatever it waits for, it
    /// checks again when woken.
    pub(super) reader_waker: Cell<Option<Waker>>,
    /// The writer task, while it waits: woken when there is something to write or the
    /// connection is closing. Its own task: woken with the reader, it made every delivery
    /// poll the read side too (p2p QoS 1 -9%).
    pub(super) writer_waker: Cell<Option<Waker>>,
    pub(super) closing: Cell<bool>,
    /// Where the connection's tasks are in going idle (see [`Idle`]).
    pub(super) idle: Cell<Idle>,
    /// Seconds (housekeeping scans) with nothing read or written: what parks it.
    pub(super) quiet: Cell<u8>,
    /// Quiet seconds it needs before it parks, when more than `--park-after`: doubled each
    /// time it was revived sooner than that after parking.
    pub(super) park_delay: Cell<u8>,
    /// While parked (no tasks): whom to tell when something wakes it.
    pub(super) parked: Cell<Option<Rc<Revivals>>>,
    /// Descriptor the writer shuts down; valid while the connection is registered (a
    /// parked connection comes back on another descriptor).
    pub(super) fd: Cell<RawFd>,
    pub(super) last_read: Cell<Instant>,
    /// The reader waits for room in the outbox: keep-alive is not counted.
    pub(super) paused: Cell<bool>,
    /// 1.5 × the keep-alive the client asked for, in milliseconds; 0 when it asked for none.
    pub(super) keep_alive_limit_ms: u32,
    /// The session this connection is attached to.
    pub session: Cell<SessionId>,
    /// The client's Topic Alias Maximum (v5): aliases this server may assign.
    pub(super) topic_alias_maximum: u16,
    /// v5 and the client did not turn Request Problem Information off: acknowledgements
    /// may carry a Reason String (MQTT-3.1.2-29).
    pub(super) problem_information: bool,
    /// The sequence of the first acknowledgement in `Extras::pending_acks` (of the next
    /// one, while none waits).
    pub(super) acks_base: Cell<u64>,
    /// What few connections use: allocated on first use, kept while the connection lives.
    pub(super) extras: RefCell<Option<Box<Extras>>>,
    /// Who and where the client is, for logs and the admin API.
    pub meta: ConnMeta,
    /// Why it is closing, once it is.
    pub(super) cause: Cell<CloseCause>,
}

/// What an operator sees of a connection: set at CONNECT, never changed.
#[derive(Debug, Clone)]
pub struct ConnMeta {
    pub peer: std::net::SocketAddr,
    /// The listener it came in on (`None` only in tests).
    pub listener: Option<std::sync::Arc<super::ListenerInfo>>,
    /// The username of its CONNECT, verified or not.
    pub username: Option<Rc<str>>,
    /// The keep-alive it is held to, in seconds.
    pub keep_alive: u16,
    /// Unix seconds.
    pub connected_at: u32,
}

impl Default for ConnMeta {
    fn default() -> ConnMeta {
        ConnMeta {
            peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            listener: None,
            username: None,
            keep_alive: 0,
            connected_at: 0,
        }
    }
}

/// Why a connection ended: the `reason` of its log line and of
/// `ringmq_disconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CloseCause {
    /// Not closed by either side yet (when it ends so, the client went away).
    #[default]
    Open,
    /// The client sent DISCONNECT with this reason.
    Client(ReasonCode),
    /// The server closed it with this reason (sent in a v5 DISCONNECT).
    Server(ReasonCode),
    /// The server closed it without a reason (3.1.1 clients are told none either).
    ServerQuiet,
    /// It read nothing for `--write-timeout`: its socket was shut down.
    WriteTimeout,
}

impl CloseCause {
    /// The label of `ringmq_disconnects_total` and of the log line.
    pub fn label(self) -> &'static str {
        match self {
            CloseCause::Open => "connection_lost",
            CloseCause::Client(ReasonCode::Success) => "normal",
            CloseCause::Client(ReasonCode::DisconnectWithWillMessage) => "normal_with_will",
            CloseCause::Client(_) => "client_error",
            CloseCause::Server(ReasonCode::KeepAliveTimeout) => "keep_alive_timeout",
            CloseCause::Server(ReasonCode::SessionTakenOver) => "taken_over",
            CloseCause::Server(ReasonCode::AdministrativeAction) => "kicked",
            CloseCause::Server(ReasonCode::ServerShuttingDown) => "server_shutdown",
            CloseCause::Server(ReasonCode::NotAuthorized) => "not_authorized",
            CloseCause::Server(_) => "protocol_error",
            CloseCause::ServerQuiet => "closed_by_server",
            CloseCause::WriteTimeout => "write_timeout",
        }
    }
}

/// The part of a [`ConnHandle`] most connections never use.
#[derive(Default)]
pub(super) struct Extras {
    /// PUBACK/PUBREC waiting for confirmations that their message is in the logs, in the
    /// order their PUBLISH arrived (MQTT-4.6.0-2); the front has sequence `acks_base`.
    pub(super) pending_acks: VecDeque<PendingAck>,
    /// Topic aliases this server assigned, by topic.
    pub(super) aliases_out: AHashMap<Bytes, u16>,
    /// When the token the client authenticated with expires (unix seconds).
    pub(super) token_expires_at: Option<u64>,
}

pub(super) struct PendingAck {
    packet: Packet,
    waiting: u32,
}

/// Acknowledgements one connection may have waiting for log confirmations before its
/// reader pauses (back-pressure on a publisher faster than the logs).
pub(super) const MAX_PENDING_ACKS: usize = 4096;

impl ConnHandle {
    /// The client authenticated with a token that expires at `at` (unix seconds): the
    /// shard's tick closes the connection then.
    pub fn set_token_expiry(&self, at: u64) {
        self.extras.borrow_mut().get_or_insert_with(Box::default).token_expires_at = Some(at);
    }

    /// Whether the client's token has expired by `now` (unix seconds).
    pub fn token_expired(&self, now: u64) -> bool {
        self.extras.borrow().as_ref().and_then(|e| e.token_expires_at).is_some_and(|at| at <= now)
    }

    /// A connection's shard-facing part with the protocol's defaults: the client's
    /// Maximum Packet Size the protocol's, no keep-alive, no topic aliases, no Reason
    /// Strings (the connection sets what its CONNECT asked for).
    pub(super) fn new(
        id: ConnId,
        client_id: impl Into<Rc<str>>,
        version: ProtocolVersion,
        outbox_limit: usize,
        fd: RawFd,
    ) -> ConnHandle {
        ConnHandle {
            id,
            client_id: client_id.into(),
            version,
            max_packet_size: crate::config::PROTOCOL_MAX_PACKET_SIZE,
            outbox: RefCell::new(BytesMut::new()),
            outbox_limit,
            writing: Cell::new(0),
            wants_room: Cell::new(false),
            writes: Cell::new(0),
            write_watch: Cell::new((0, Instant::now())),
            reader_waker: Cell::new(None),
            writer_waker: Cell::new(None),
            closing: Cell::new(false),
            idle: Cell::new(Idle::Active),
            quiet: Cell::new(0),
            park_delay: Cell::new(0),
            parked: Cell::new(None),
            fd: Cell::new(fd),
            last_read: Cell::new(Instant::now()),
            paused: Cell::new(false),
            keep_alive_limit_ms: 0,
            session: Cell::new(0),
            topic_alias_maximum: 0,
            problem_information: false,
            acks_base: Cell::new(0),
            extras: RefCell::new(None),
            meta: ConnMeta::default(),
            cause: Cell::new(CloseCause::Open),
        }
    }

    /// Why the connection closed (`Open` while it has not).
    pub fn cause(&self) -> CloseCause {
        self.cause.get()
    }

    /// The client sent DISCONNECT.
    pub fn client_disconnected(&self, reason: ReasonCode) {
        if self.cause.get() == CloseCause::Open {
            self.cause.set(CloseCause::Client(reason));
        }
    }

    /// The sequence the next queued acknowledgement gets.
    pub fn next_ack_seq(&self) -> u64 {
        self.acks_base.get() + self.pending_acks() as u64
    }

    /// Acknowledgements waiting for confirmations.
    pub(super) fn pending_acks(&self) -> usize {
        self.extras.borrow().as_ref().map_or(0, |e| e.pending_acks.len())
    }

    fn extras(&self) -> std::cell::RefMut<'_, Extras> {
        std::cell::RefMut::map(self.extras.borrow_mut(), |e| &mut **e.get_or_insert_with(Default::default))
    }

    /// Sends an acknowledgement once `waiting` confirmations arrived and every earlier one
    /// went out.
    pub fn queue_ack(&self, packet: Packet, waiting: u32) {
        if waiting == 0 && self.pending_acks() == 0 {
            self.acks_base.set(self.acks_base.get() + 1);
            self.send(&packet);
            return;
        }
        self.extras().pending_acks.push_back(PendingAck { packet, waiting });
    }

    /// A confirmation for acknowledgement `seq` arrived.
    pub fn confirm(&self, seq: u64) {
        let mut extras = self.extras.borrow_mut();
        let Some(pending) = extras.as_mut().map(|e| &mut e.pending_acks) else { return };
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
            // A reader paused on too many pending acknowledgements resumes.
            self.wake_reader();
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
        self.wake_writer();
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
        self.wake_writer();
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
            let extras = self.extras.borrow();
            let aliases = extras.as_ref().map(|e| &e.aliases_out);
            match aliases.and_then(|a| a.get(publish.topic)) {
                Some(alias) => {
                    publish.topic_alias = Some(*alias);
                    publish.topic = &[];
                }
                None if aliases.map_or(0, |a| a.len()) < usize::from(self.topic_alias_maximum) => {
                    let alias = aliases.map_or(0, |a| a.len()) as u16 + 1;
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
        super::core_counters::sent(publish.qos);
        if let Some(alias) = new_alias {
            // Its own copy: the alias outlives the buffer the topic was read into.
            self.extras().aliases_out.insert(Bytes::copy_from_slice(publish.topic), alias);
        }
        self.wake_writer();
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
        if self.cause.get() == CloseCause::Open {
            self.cause.set(CloseCause::WriteTimeout);
        }
        // SAFETY: the writer has not finished, so the stream owning `fd` is still open.
        unsafe { libc::shutdown(self.fd.get(), libc::SHUT_RDWR) };
        self.mark_closing();
    }

    /// Marks the connection closing and wakes its task: the reader (in `read`, waiting
    /// for room or on unconfirmed acknowledgements) stops, the writer flushes and ends.
    pub(super) fn mark_closing(&self) {
        self.closing.set(true);
        self.wake_reader();
        self.wake_writer();
    }

    /// Wakes the reader task if it waits (room in the outbox, acknowledgements sent, a
    /// request to park); a parked connection is revived.
    pub(super) fn wake_reader(&self) {
        if !self.revive() {
            wake(&self.reader_waker);
        }
    }

    /// Wakes the writer task (something to write, closing); a parked connection is revived.
    pub(super) fn wake_writer(&self) {
        if !self.revive() {
            wake(&self.writer_waker);
        }
    }

    /// The connection's tasks ended while it was idle: whatever would wake them asks
    /// `revivals` to start them again.
    pub(super) fn park(&self, revivals: Rc<Revivals>) {
        // The ended tasks' wakers would keep their memory.
        self.reader_waker.take();
        self.writer_waker.take();
        self.parked.set(Some(revivals));
    }

    /// Whether the connection was parked (it no longer is).
    pub(super) fn unpark(&self) -> bool {
        self.parked.take().is_some()
    }

    fn revive(&self) -> bool {
        match self.parked.take() {
            Some(revivals) => {
                revivals.push(self.id);
                true
            }
            None => false,
        }
    }

    /// Registers the reader task to be woken by [`ConnHandle::wake_reader`].
    pub(super) fn park_reader(&self, cx: &Context<'_>) {
        park(&self.reader_waker, cx);
    }

    /// Registers the writer task to be woken when there is something to write.
    pub(super) fn park_writer(&self, cx: &Context<'_>) {
        park(&self.writer_waker, cx);
    }

    /// Waits until `ready` holds, checked whenever the reader task is woken.
    pub(super) async fn wait_until(&self, ready: impl Fn(&ConnHandle) -> bool) {
        std::future::poll_fn(|cx| {
            if ready(self) {
                return Poll::Ready(());
            }
            self.park_reader(cx);
            Poll::Pending
        })
        .await
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
        if self.cause.get() == CloseCause::Open {
            self.cause.set(reason.map_or(CloseCause::ServerQuiet, CloseCause::Server));
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
        let limit = Duration::from_millis(self.keep_alive_limit_ms.into());
        self.keep_alive_limit_ms > 0 && now.duration_since(self.last_read.get()) > limit
    }
}

/// How far an idle connection is in giving up its tasks. An idle connection's tasks and
/// their pending readiness poll are most of what it costs (about 1.4 KiB), so a
/// connection quiet for `--park-after` seconds parks: its tasks end, its descriptor is
/// watched by the shard's idle watcher, and anything that would wake a task (a byte from
/// the client, a delivery, closing) starts them again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Tasks running.
    Active,
    /// The housekeeping scan asked the reader to park; it does once it waits for the
    /// client with nothing buffered, queued or unacknowledged.
    Asked,
    /// The reader parked: the writer ends once the outbox is empty.
    Parking,
}

/// Parked connections something woke, for the idle watcher to revive. Shared by the
/// connections of one shard while they are parked.
#[derive(Default)]
pub struct Revivals {
    ids: RefCell<Vec<ConnId>>,
    waker: Cell<Option<Waker>>,
}

impl Revivals {
    fn push(&self, id: ConnId) {
        self.ids.borrow_mut().push(id);
        wake(&self.waker);
    }

    /// The connections woken since the last call; registers the caller's task to be woken
    /// by the next when there are none.
    pub fn poll_take(&self, cx: &Context<'_>) -> Poll<Vec<ConnId>> {
        let ids = std::mem::take(&mut *self.ids.borrow_mut());
        if ids.is_empty() {
            park(&self.waker, cx);
            return Poll::Pending;
        }
        Poll::Ready(ids)
    }
}

fn wake(waker: &Cell<Option<Waker>>) {
    if let Some(waker) = waker.take() {
        waker.wake();
    }
}

fn park(waker: &Cell<Option<Waker>>, cx: &Context<'_>) {
    match waker.take() {
        Some(old) if old.will_wake(cx.waker()) => waker.set(Some(old)),
        _ => waker.set(Some(cx.waker().clone())),
    }
}

impl Link for ConnHandle {
    fn can_send(&self) -> bool {
        ConnHandle::can_send(self)
    }

    fn want_room(&self) {
        ConnHandle::want_room(self)
    }

    fn has_room(&self) -> bool {
        ConnHandle::has_room(self)
    }

    fn send_publish(&self, publish: codec::OutgoingPublish<'_>, bounded: bool) -> bool {
        ConnHandle::send_publish(self, publish, bounded)
    }

    fn send(&self, packet: &Packet) {
        ConnHandle::send(self, packet)
    }

    fn problem(&self, why: &str) -> Properties {
        ConnHandle::problem(self, why)
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Wake;

    use super::*;

    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn a_parked_connection_is_revived_once_by_whatever_would_wake_its_tasks() {
        let conn = ConnHandle::new(7, "c", ProtocolVersion::V5, 1024, -1);
        let revivals = Rc::new(Revivals::default());
        let count = std::sync::Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        assert!(revivals.poll_take(&cx).is_pending());

        conn.park(revivals.clone());
        assert!(conn.enqueue(Bytes::from_static(b"x")));
        conn.close(None);
        assert_eq!(revivals.poll_take(&cx), Poll::Ready(vec![7]), "revived once");
        assert_eq!(count.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(!conn.unpark(), "no longer parked");

        conn.park(revivals.clone());
        assert!(conn.unpark());
        conn.wake_writer();
        assert!(revivals.poll_take(&cx).is_pending(), "unparked: nothing to revive");
    }
}
