//! One MQTT client connection: a single task driving a socket with a state machine.
//!
//! The task never awaits per message. Each turn of its loop it (1) encodes whatever its
//! publisher may send now (rate, in-flight window and buffer space permitting) into its
//! write buffer, then (2) waits for the first of: a phase change, the socket readable,
//! the socket writable (only while there is something to write), the pacing or handshake
//! timer, the keep-alive tick. Subscribers read up to [`READ_CHUNK`] bytes at once and every
//! packet in them is handled before the next write, so acks produced by one read go out
//! in one write. Readiness plus `try_read`/`try_write` (not `write_all`) means reading
//! never waits behind a blocked write, so a broker that stops reading cannot deadlock us.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ahash::{HashMap, HashMapExt};
use bytes::{Buf, BytesMut};
use ringmq::codec::{
    self, Connect, Packet, Properties, ProtocolVersion, PubAck, Publish, QoS, ReasonCode, Subscribe,
    SubscriptionOptions,
};
use tokio::net::TcpStream;

use crate::tls::ClientStream;
use tokio::sync::watch;
use tokio::time::{interval_at, sleep_until, timeout, Instant, MissedTickBehavior};

use crate::payload::{now_ns, Stamp, Template};
use crate::plan::{Accounting, ConnSpec, Role};
use crate::stats::{self, Counters, Seen, Stream};
use crate::worker::{Local, Phase};

/// Bytes of free space a subscriber offers each read.
const READ_CHUNK: usize = 64 * 1024;
/// The same for publishers (acks are small) and idle connections (PINGRESP): buffers
/// are per connection, and `conn` runs hold hundreds of thousands of them.
const READ_CHUNK_PUBLISHER: usize = 16 * 1024;
const READ_CHUNK_IDLE: usize = 512;
/// Publishers stop encoding when this much is waiting to be written: enough for large
/// writes, small enough that a stamp is not taken long before its bytes leave.
const WRITE_HIGH: usize = 64 * 1024;
/// Reads per loop turn before writes get their turn.
const MAX_READS_PER_TURN: usize = 4;
/// Largest packet accepted from the broker.
const MAX_INBOUND_PACKET: usize = 256 * 1024 * 1024;

/// What every connection of a run shares (read-only).
#[derive(Debug)]
pub struct Settings {
    /// The broker endpoints (`--host`), indexed by `ConnSpec::node`.
    pub addrs: Vec<SocketAddr>,
    pub version: ProtocolVersion,
    pub qos: QoS,
    pub size: usize,
    pub rate: u64,
    pub inflight: u32,
    pub keepalive: u16,
    /// Subscribers' Session Expiry Interval; non-zero makes their sessions persistent.
    pub session_expiry: u32,
    pub connect_timeout: Duration,
    /// Start of the run; connection times are offsets from it.
    pub t0: Instant,
    /// CLOCK_MONOTONIC ns at `t0`.
    pub t0_ns: u64,
    pub publishers: u32,
    /// TLS for every connection (`--tls`).
    pub tls: Option<crate::tls::TlsSettings>,
    /// MQTT over WebSocket at this path (`--ws`).
    pub ws_path: Option<String>,
}

/// Shared by the tasks of one worker thread.
pub struct Worker {
    pub settings: Arc<Settings>,
    pub counters: Arc<Counters>,
    pub phase: watch::Receiver<Phase>,
    pub local: RefCell<Local>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitConnAck,
    AwaitSubAck,
    Ready,
}

/// The publishing half of a connection.
struct Publisher {
    id: u32,
    template: Template,
    /// Messages encoded so far; also the next sequence number.
    sent: u64,
    /// Unacknowledged packet ids; `true` once PUBREC arrived (QoS 2, PUBREL sent).
    inflight: HashMap<u16, bool>,
    window: usize,
    next_pid: u16,
    /// When message 0 was due; message k is due at `start + k / rate`.
    start: Option<Instant>,
    stopped: bool,
}

impl Publisher {
    /// Encodes what may go now; returns when the next message is due if the rate (not
    /// the window or the buffer) is what stops it.
    fn fill(&mut self, wbuf: &mut BytesMut, s: &Settings, now: Instant) -> (u64, Option<Instant>) {
        let Some(start) = self.start else { return (0, None) };
        let mut due = u64::MAX;
        if s.rate > 0 {
            let elapsed = now.saturating_duration_since(start).as_nanos();
            let total = (elapsed * u128::from(s.rate) / 1_000_000_000) as u64 + 1;
            due = total.saturating_sub(self.sent);
        }
        let window =
            if s.qos == QoS::AtMostOnce { u64::MAX } else { (self.window - self.inflight.len()) as u64 };
        let space = (WRITE_HIGH.saturating_sub(wbuf.len()) / self.template.len()).max(
            // Always make progress with payloads larger than the high-water mark.
            usize::from(wbuf.is_empty()),
        ) as u64;
        let n = due.min(window).min(space);
        if n > 0 {
            let sent_ns = now_ns();
            wbuf.reserve(n as usize * self.template.len());
            for _ in 0..n {
                let pid = if s.qos == QoS::AtMostOnce { 0 } else { self.take_pid() };
                let stamp = Stamp { sent_ns, publisher: self.id, seq: self.sent as u32 };
                self.template.write(wbuf, pid, stamp);
                self.sent += 1;
            }
        }
        let next = (s.rate > 0 && n == due).then(|| {
            start + Duration::from_nanos((u128::from(self.sent) * 1_000_000_000 / u128::from(s.rate)) as u64)
        });
        (n, next)
    }

    fn take_pid(&mut self) -> u16 {
        // The window is at most 65535, and this is only called with room in it, so a
        // free id exists; with acks in order the first one tried is free.
        loop {
            let pid = self.next_pid;
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            if let Entry::Vacant(e) = self.inflight.entry(pid) {
                e.insert(false);
                return pid;
            }
        }
    }
}

/// The receiving half of a subscriber.
struct Subscriber {
    accounting: Accounting,
    streams: HashMap<u32, Stream>,
    /// Group accounting: the last sequence seen per publisher by this member.
    last_seq: HashMap<u32, u32>,
    out_of_order: u64,
}

enum Event {
    Phase(Option<Phase>),
    Readable(io::Result<()>),
    Writable(io::Result<()>),
    Timer,
    Ping,
}

#[derive(Debug)]
enum End {
    /// The run is over.
    Done,
    /// The broker closed or refused the connection, or broke the protocol.
    Broken,
}

/// Runs one connection from its connect time to the end of the run.
pub async fn run(spec: ConnSpec, w: Rc<Worker>) {
    let s = &*w.settings;
    let c = &*w.counters;
    let mut phase_rx = w.phase.clone();

    // Wait for this connection's turn (or the end of the run).
    {
        tokio::select! {
            _ = sleep_until(s.t0 + spec.connect_at) => {}
            () = wait_done(&mut phase_rx) => return,
        }
    }

    Counters::add(&c.connect_attempts, 1);
    let attempt = Instant::now();
    c.first_attempt_ns.fetch_min(since(s, attempt), Relaxed);
    let addr = s.addrs[spec.node];
    let connecting = timeout(s.connect_timeout, TcpStream::connect(addr));
    let connected = tokio::select! {
        r = connecting => r,
        () = wait_done(&mut phase_rx) => return,
    };
    // A failed connect (TCP, or the TLS handshake after it) is counted and settles this
    // connection.
    let failed = |why: String| {
        w.local.borrow_mut().note_error(why);
        Counters::add(&c.connect_failed, 1);
        Counters::add(&c.settled, 1);
    };
    let tcp = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return failed(format!("connect to {addr}: {e}")),
        Err(_) => return failed(format!("connect to {addr}: TCP connect timed out")),
    };
    let _ = tcp.set_nodelay(true);
    // A TLS handshake, within the connect timeout, is part of connecting.
    let mut stream = match &s.tls {
        None => ClientStream::Plain(tcp),
        Some(tls) => match timeout(s.connect_timeout, ClientStream::tls(tcp, tls)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return failed(format!("TLS handshake: {e}")),
            Err(_) => return failed("TLS handshake timed out".into()),
        },
    };
    if let Some(path) = &s.ws_path {
        stream = match timeout(s.connect_timeout, ClientStream::ws(stream, "localhost", path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return failed(format!("WebSocket upgrade: {e}")),
            Err(_) => return failed("WebSocket upgrade timed out".into()),
        };
    }
    stream.set_nodelay();

    let (read_chunk, write_capacity) = match spec.role {
        Role::Idle => (READ_CHUNK_IDLE, 256),
        Role::Publisher { .. } => (READ_CHUNK_PUBLISHER, WRITE_HIGH + s.size + 64),
        Role::Subscriber { .. } => (READ_CHUNK, 4096),
    };
    let mut wbuf = BytesMut::with_capacity(write_capacity);
    let mut rbuf = BytesMut::with_capacity(read_chunk);
    let persistent = s.session_expiry > 0 && matches!(spec.role, Role::Subscriber { .. });
    let mut properties = Properties::new();
    if persistent && s.version == ProtocolVersion::V5 {
        properties.push(codec::Property::SessionExpiryInterval(s.session_expiry));
    }
    let connect = Packet::Connect(Connect {
        protocol: s.version,
        clean_start: !persistent,
        keep_alive: s.keepalive,
        client_id: spec.client_id.clone(),
        will: None,
        username: None,
        password: None,
        properties,
    });
    if let Err(e) = codec::encode(&connect, s.version, &mut wbuf) {
        w.local.borrow_mut().note_error(format!("encode CONNECT: {e}"));
        Counters::add(&c.connect_failed, 1);
        Counters::add(&c.settled, 1);
        return;
    }

    let mut publisher = None;
    let mut subscriber = None;
    let mut filter = None;
    match spec.role {
        Role::Idle => {}
        Role::Publisher { id, topic } => match Template::new(topic, s.qos, s.size, s.version) {
            Ok(template) => {
                publisher = Some(Publisher {
                    id,
                    template,
                    sent: 0,
                    inflight: HashMap::with_capacity(s.inflight as usize),
                    window: s.inflight as usize,
                    next_pid: 1,
                    start: None,
                    stopped: false,
                })
            }
            Err(e) => {
                w.local.borrow_mut().note_error(format!("encode PUBLISH: {e}"));
                Counters::add(&c.connect_failed, 1);
                Counters::add(&c.settled, 1);
                return;
            }
        },
        Role::Subscriber { filter: f, accounting } => {
            filter = Some(f);
            subscriber = Some(Subscriber {
                accounting,
                streams: HashMap::new(),
                last_seq: HashMap::new(),
                out_of_order: 0,
            });
        }
    }

    let mut phase = *phase_rx.borrow_and_update();
    let mut state = State::AwaitConnAck;
    let mut settled = false;
    let mut connected = false;
    let mut wrote = false;
    let mut timer = pin!(sleep_until(attempt + s.connect_timeout));
    let mut timer_at = Some(attempt + s.connect_timeout);
    let ping_every = Duration::from_millis(u64::from(s.keepalive.max(1)) * 500);
    let mut ping = interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let end = 'run: loop {
        // 1. Publish what may go now.
        let mut pace_at = None;
        if let Some(p) = publisher.as_mut() {
            if state == State::Ready && phase == Phase::Running && !p.stopped {
                if p.start.is_none() {
                    // Stagger publishers over one message interval so bursts don't align.
                    let offset = (1_000_000_000u64).checked_div(s.rate).map_or(Duration::ZERO, |interval| {
                        Duration::from_nanos(interval * u64::from(p.id) / u64::from(s.publishers.max(1)))
                    });
                    p.start = Some(Instant::now() + offset);
                    Counters::add(&c.publishing, 1);
                }
                let (n, next) = p.fill(&mut wbuf, s, Instant::now());
                Counters::add(&c.sent, n);
                if s.qos != QoS::AtMostOnce {
                    Counters::add(&c.inflight, n);
                }
                pace_at = next;
            }
        }
        if matches!(state, State::AwaitConnAck | State::AwaitSubAck) {
            pace_at = timer_at;
        }
        if pace_at != timer_at {
            if let Some(at) = pace_at {
                timer.as_mut().reset(at);
            }
            timer_at = pace_at;
        }

        // 2. Wait for something to do.
        let want_write = !wbuf.is_empty() || stream.wants_write();
        let event = tokio::select! {
            biased;
            r = phase_rx.changed() => Event::Phase(r.ok().map(|()| *phase_rx.borrow_and_update())),
            r = stream.readable() => Event::Readable(r),
            r = stream.writable(), if want_write => Event::Writable(r),
            _ = &mut timer, if timer_at.is_some() => Event::Timer,
            _ = ping.tick(), if s.keepalive > 0 => Event::Ping,
        };

        match event {
            Event::Phase(None) | Event::Phase(Some(Phase::Done)) => break End::Done,
            Event::Phase(Some(p)) => {
                phase = p;
                if phase == Phase::Draining {
                    if let Some(p) = publisher.as_mut() {
                        if p.start.is_some() && !p.stopped {
                            p.stopped = true;
                            Counters::add_sub(&c.publishing, 1);
                        }
                    }
                }
            }
            Event::Timer => {
                timer_at = None;
                if state != State::Ready {
                    let what = if state == State::AwaitConnAck { "CONNACK" } else { "SUBACK" };
                    w.local.borrow_mut().note_error(format!("no {what} within the connect timeout"));
                    if state == State::AwaitConnAck {
                        Counters::add(&c.connect_failed, 1);
                    } else {
                        Counters::add(&c.subscribe_failed, 1);
                    }
                    break End::Broken;
                }
            }
            Event::Ping => {
                if !wrote && state != State::AwaitConnAck {
                    let _ = codec::encode(&Packet::PingReq, s.version, &mut wbuf);
                }
                wrote = false;
            }
            Event::Writable(Err(e)) | Event::Readable(Err(e)) => {
                w.local.borrow_mut().note_error(format!("socket: {e}"));
                break End::Broken;
            }
            Event::Writable(Ok(())) => match stream.try_write(&wbuf) {
                Ok(n) => {
                    wbuf.advance(n);
                    wrote = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    w.local.borrow_mut().note_error(format!("write: {e}"));
                    break End::Broken;
                }
            },
            Event::Readable(Ok(())) => {
                let mut eof = false;
                for _ in 0..MAX_READS_PER_TURN {
                    rbuf.reserve(read_chunk);
                    match stream.try_read_buf(&mut rbuf) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) if n < read_chunk / 2 => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            w.local.borrow_mut().note_error(format!("read: {e}"));
                            eof = true;
                            break;
                        }
                    }
                }
                // Every packet in what was read.
                let now = now_ns();
                let mut local = w.local.borrow_mut();
                let mut delivered = 0u64;
                let mut unique = 0u64;
                let mut acked = 0u64;
                let mut freed = 0u64;
                loop {
                    let packet = match codec::decode(&mut rbuf, s.version, MAX_INBOUND_PACKET) {
                        Ok(Some(packet)) => packet,
                        Ok(None) => break,
                        Err(e) => {
                            local.note_error(format!("decode: {e}"));
                            Counters::add(&c.protocol_errors, 1);
                            break 'run End::Broken;
                        }
                    };
                    match packet {
                        Packet::ConnAck(ack) if state == State::AwaitConnAck => {
                            if ack.reason.is_error() {
                                local.note_error(format!("CONNACK refused: {:?}", ack.reason));
                                Counters::add(&c.connect_refused, 1);
                                break 'run End::Broken;
                            }
                            connected = true;
                            let t = Instant::now();
                            stats::record(&mut local.connect, (t - attempt).as_nanos() as u64);
                            c.last_connack_ns.fetch_max(since(s, t), Relaxed);
                            Counters::add(&c.connected, 1);
                            Counters::add(&c.up, 1);
                            if let Some(p) = publisher.as_mut() {
                                if let Some(max) = ack.properties.receive_maximum() {
                                    p.window = p.window.min(usize::from(max).max(1));
                                }
                            }
                            if let Some(f) = filter.take() {
                                let subscribe = Packet::Subscribe(Subscribe {
                                    packet_id: NonZeroU16::MIN,
                                    properties: Properties::new(),
                                    filters: vec![(
                                        f,
                                        SubscriptionOptions {
                                            qos: s.qos,
                                            no_local: false,
                                            retain_as_published: false,
                                            retain_handling: 0,
                                        },
                                    )],
                                });
                                if let Err(e) = codec::encode(&subscribe, s.version, &mut wbuf) {
                                    local.note_error(format!("encode SUBSCRIBE: {e}"));
                                    Counters::add(&c.subscribe_failed, 1);
                                    break 'run End::Broken;
                                }
                                state = State::AwaitSubAck;
                                timer_at = Some(Instant::now() + s.connect_timeout);
                                if let Some(at) = timer_at {
                                    timer.as_mut().reset(at);
                                }
                            } else {
                                state = State::Ready;
                                settled = true;
                                Counters::add(&c.settled, 1);
                            }
                        }
                        Packet::SubAck(ack) if state == State::AwaitSubAck => {
                            match ack.reasons.first() {
                                Some(r) if !r.is_error() => {
                                    local.granted[(r.as_u8() as usize).min(2)] += 1;
                                    Counters::add(&c.subscribed, 1);
                                }
                                r => {
                                    local.note_error(format!("SUBACK refused: {r:?}"));
                                    Counters::add(&c.subscribe_failed, 1);
                                    break 'run End::Broken;
                                }
                            }
                            state = State::Ready;
                            settled = true;
                            Counters::add(&c.settled, 1);
                        }
                        Packet::Publish(p) if state == State::Ready => {
                            let Some(sub) = subscriber.as_mut() else {
                                Counters::add(&c.protocol_errors, 1);
                                continue;
                            };
                            if let Some(pid) = p.packet_id {
                                let ack = PubAck {
                                    packet_id: pid,
                                    reason: ReasonCode::Success,
                                    properties: Properties::new(),
                                };
                                let ack = if p.qos == QoS::AtLeastOnce {
                                    Packet::PubAck(ack)
                                } else {
                                    Packet::PubRec(ack)
                                };
                                let _ = codec::encode(&ack, s.version, &mut wbuf);
                            }
                            delivered += 1;
                            unique += u64::from(on_delivery(sub, &p, now, s, &mut local));
                        }
                        Packet::PubRel(rel) => {
                            let comp = PubAck {
                                packet_id: rel.packet_id,
                                reason: ReasonCode::Success,
                                properties: Properties::new(),
                            };
                            let _ = codec::encode(&Packet::PubComp(comp), s.version, &mut wbuf);
                        }
                        Packet::PubAck(ack) | Packet::PubComp(ack) => {
                            let pid = ack.packet_id.get();
                            match publisher.as_mut().and_then(|p| p.inflight.remove(&pid)) {
                                Some(_) => {
                                    freed += 1;
                                    if ack.reason.is_error() {
                                        local.refused += 1;
                                    } else {
                                        acked += 1;
                                    }
                                }
                                None => Counters::add(&c.protocol_errors, 1),
                            }
                        }
                        Packet::PubRec(rec) => {
                            let pid = rec.packet_id.get();
                            let Some(p) = publisher.as_mut() else {
                                Counters::add(&c.protocol_errors, 1);
                                continue;
                            };
                            match p.inflight.get_mut(&pid) {
                                Some(_) if rec.reason.is_error() => {
                                    // Refused: the exchange ends here (MQTT 5.0 §4.3.3).
                                    p.inflight.remove(&pid);
                                    freed += 1;
                                    local.refused += 1;
                                }
                                Some(released) => {
                                    *released = true;
                                    let rel = PubAck {
                                        packet_id: rec.packet_id,
                                        reason: ReasonCode::Success,
                                        properties: Properties::new(),
                                    };
                                    let _ = codec::encode(&Packet::PubRel(rel), s.version, &mut wbuf);
                                }
                                None => Counters::add(&c.protocol_errors, 1),
                            }
                        }
                        Packet::PingResp => {}
                        Packet::Disconnect(d) => {
                            local.note_error(format!("DISCONNECT from broker: {:?}", d.reason));
                            break 'run End::Broken;
                        }
                        other => {
                            local.note_error(format!("unexpected packet {}", packet_name(&other)));
                            Counters::add(&c.protocol_errors, 1);
                        }
                    }
                }
                drop(local);
                if delivered > 0 {
                    if phase == Phase::Running {
                        Counters::add(&c.recv_load, delivered);
                    } else {
                        Counters::add(&c.recv_drain, delivered);
                    }
                    Counters::add(&c.recv_unique, unique);
                    c.last_delivery_ns.fetch_max(now - s.t0_ns, Relaxed);
                }
                Counters::add(&c.acked, acked);
                Counters::add_sub(&c.inflight, freed);
                if freed > 0 {
                    c.last_delivery_ns.fetch_max(now.saturating_sub(s.t0_ns), Relaxed);
                }
                if eof {
                    if !connected {
                        local_note(&w, "closed by the broker before CONNACK");
                        Counters::add(&c.connect_refused, 1);
                    }
                    break End::Broken;
                }
            }
        }
    };

    // Wind down: account for what this connection leaves behind.
    if let Some(p) = &publisher {
        if p.start.is_some() && !p.stopped {
            Counters::add_sub(&c.publishing, 1);
        }
        Counters::add_sub(&c.inflight, p.inflight.len() as u64);
        w.local.borrow_mut().unacked += p.inflight.len() as u64;
    }
    if let Some(sub) = &subscriber {
        let mut local = w.local.borrow_mut();
        for stream in sub.streams.values() {
            local.unique += stream.unique;
            local.dup += stream.dup;
            local.out_of_order += stream.out_of_order;
            local.gaps += stream.gap_count();
        }
        local.out_of_order += sub.out_of_order;
    }
    if connected {
        Counters::add_sub(&c.up, 1);
    }
    if !settled && connected {
        // Connected but never got its SUBACK: the failure was counted above, or here.
        Counters::add(&c.settled, 1);
    }
    match end {
        End::Done => {
            if connected {
                let bye = Packet::Disconnect(codec::Disconnect {
                    reason: ReasonCode::NORMAL_DISCONNECTION,
                    properties: Properties::new(),
                });
                let _ = codec::encode(&bye, s.version, &mut wbuf);
                let _ = stream.try_write(&wbuf);
            }
        }
        End::Broken => {
            if connected && settled && phase != Phase::Done {
                Counters::add(&c.closed_by_broker, 1);
            }
            if !connected && !settled {
                Counters::add(&c.settled, 1);
            }
        }
    }
}

/// Resolves when the run is over.
async fn wait_done(phase_rx: &mut watch::Receiver<Phase>) {
    loop {
        if phase_rx.changed().await.is_err() || *phase_rx.borrow_and_update() == Phase::Done {
            return;
        }
    }
}

fn local_note(w: &Worker, what: &str) {
    w.local.borrow_mut().note_error(what.to_string());
}

/// Accounts for one delivery; returns whether it was new.
#[inline]
fn on_delivery(sub: &mut Subscriber, p: &Publish, now: u64, s: &Settings, local: &mut Local) -> bool {
    let Some(stamp) = Stamp::parse(&p.payload) else {
        local.foreign += 1;
        return false;
    };
    // In composed scenarios the publishers are ours: anything else is foreign.
    if s.publishers > 0 && stamp.publisher >= s.publishers {
        local.foreign += 1;
        return false;
    }
    if stamp.sent_ns <= now {
        let ns = now - stamp.sent_ns;
        stats::record(&mut local.latency, ns);
        stats::record(&mut local.interval, ns);
    }
    match sub.accounting {
        Accounting::Streams => {
            sub.streams.entry(stamp.publisher).or_default().on_seq(stamp.seq) != Seen::Duplicate
        }
        Accounting::Group => {
            match sub.last_seq.entry(stamp.publisher) {
                Entry::Occupied(mut e) => {
                    if stamp.seq < *e.get() {
                        sub.out_of_order += 1;
                    }
                    *e.get_mut() = stamp.seq;
                }
                Entry::Vacant(e) => {
                    e.insert(stamp.seq);
                }
            }
            let new = local.group_insert(stamp.publisher, stamp.seq);
            if !new {
                local.group_dup += 1;
            }
            new
        }
    }
}

fn since(s: &Settings, t: Instant) -> u64 {
    t.saturating_duration_since(s.t0).as_nanos() as u64
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}
