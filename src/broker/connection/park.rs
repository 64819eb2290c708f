//! Idle connections without tasks. A served connection is two tasks (reader and writer)
//! and a readiness poll glommio keeps for the pending read: about 1.4 KiB of the 2.3 KiB an
//! idle connection cost. One that read and wrote nothing for `--park-after` seconds parks:
//! its tasks end, the shard keeps a small [`Parked`] record, and its descriptor joins the
//! shard's idle watcher, an epoll set waited on by a thread of its own (glommio offers no
//! public way to wait on a set of descriptors), which writes the ids of connections with
//! input to a socket this shard reads. A parked connection is revived (its tasks started
//! again) when its client sends or closes, or when the shard wakes it: a delivery, a
//! confirmation, closing (the connection's [`ConnHandle`] tells [`Revivals`]).
//!
//! Who waits, who pays: the first packet after a quiet stretch waits for one hop through
//! the watcher thread (tens of microseconds); the housekeeping scan visits every active
//! connection once a second; the kernel keeps an epoll entry per parked descriptor.

use std::cell::RefCell;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

use super::read_buffer::ReadBuffer;
use super::{inbound, run_connection, Connection, SharedStream};
use crate::broker::conn_handle::{ConnHandle, ConnId, Idle, Revivals};
use crate::broker::session::SessionId;
use crate::broker::shard::{ShardRef, WillAction};
use crate::broker::ConnectionSlot;
use crate::topic::TopicName;

/// The longest wait before a connection that keeps coming back parks again, in seconds.
const MAX_PARK_DELAY: u8 = 64;

/// The watcher's id for its own end of the socket: its peer closed, the shard is gone.
const STOP: u64 = u64::MAX;

/// A shard's parked connections and the watcher of their descriptors.
pub struct Parker {
    shard: ShardRef,
    parked: RefCell<AHashMap<ConnId, Parked>>,
    revivals: Rc<Revivals>,
    /// The watcher's epoll set; `None` when parking is off.
    epoll: Option<Arc<OwnedFd>>,
    /// Housekeeping scans (seconds) without reads or writes before a connection parks.
    park_after: u8,
    /// Housekeeping scans so far (wrapping): when a connection parked.
    scans: std::cell::Cell<u16>,
}

/// What a parked connection keeps: what its reader and writer cannot rebuild from the
/// shard's configuration.
struct Parked {
    conn: Rc<ConnHandle>,
    session: SessionId,
    will: WillAction,
    aliases: Option<Box<AHashMap<u16, TopicName>>>,
    fd: OwnedFd,
    /// The scan it parked at.
    since: u16,
    slot: ConnectionSlot,
}

impl Parker {
    /// Starts the shard's idle watcher (a thread and three small tasks). Parking is off
    /// when `park_after` is zero or the watcher cannot start (logged).
    pub fn start(shard: &ShardRef, park_after: Duration) -> Rc<Parker> {
        let park_after = park_after.as_secs().min(u64::from(u8::MAX)) as u8;
        let mut watcher = None;
        if park_after > 0 {
            let id = shard.borrow().id;
            match start_watcher(id) {
                Ok(started) => watcher = Some(started),
                Err(err) => {
                    tracing::warn!(%err, "idle connections are not parked: the watcher did not start")
                }
            }
        }
        let parker = Rc::new(Parker {
            shard: shard.clone(),
            parked: RefCell::default(),
            revivals: Rc::default(),
            epoll: watcher.as_ref().map(|(epoll, _)| epoll.clone()),
            park_after,
            scans: Default::default(),
        });
        if let Some((_, input)) = watcher {
            // SAFETY: the descriptor is our end of a fresh socket pair, moved in here.
            let input = unsafe { glommio::net::UnixStream::from_raw_fd(input.into_raw_fd()) };
            glommio::spawn_local(run_input(parker.clone(), input)).detach();
            glommio::spawn_local(run_revivals(parker.clone())).detach();
            glommio::spawn_local(run_scan(parker.clone())).detach();
        }
        parker
    }

    /// Parks a connection whose tasks ended (its reader asked, its writer is done), or
    /// gives it back when its descriptor cannot be watched.
    pub(super) fn park(self: &Rc<Self>, c: Connection) -> Result<(), Box<Connection>> {
        let Some(epoll) = &self.epoll else { return Err(Box::new(c)) };
        let conn = c.reader.conn.clone();
        // The stream's descriptor closes with the stream; the watcher gets its own.
        // SAFETY: duplicating the stream's open descriptor.
        let fd = unsafe { libc::dup(conn.fd.get()) };
        if fd < 0 {
            tracing::warn!(err = %std::io::Error::last_os_error(), "not parked: dup failed");
            return Err(Box::new(c));
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // One report, then silence until it is watched again (after its next park).
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: conn.id,
        };
        // SAFETY: both descriptors are open; `event` outlives the call.
        if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut event) } != 0
        {
            tracing::warn!(err = %std::io::Error::last_os_error(), "not parked: epoll_ctl failed");
            return Err(Box::new(c));
        }
        let Connection { reader, stream, buf, slot, parker: _ } = c;
        drop((stream, buf));
        conn.fd.set(fd.as_raw_fd());
        conn.park(self.revivals.clone());
        let parked = Parked {
            conn: conn.clone(),
            session: reader.session,
            will: reader.will,
            aliases: reader.aliases,
            fd,
            since: self.scans.get(),
            slot,
        };
        self.parked.borrow_mut().insert(conn.id, parked);
        self.shard.borrow_mut().parked = self.parked();
        // Woken while its tasks were ending (no one was there to hear it).
        if conn.pending() > 0 || conn.closing.get() {
            self.revive(conn.id);
        }
        Ok(())
    }

    /// Starts a parked connection's tasks again; nothing when it is not parked (a stale
    /// report from the watcher, or revived already).
    fn revive(self: &Rc<Self>, id: ConnId) {
        let Some(p) = self.parked.borrow_mut().remove(&id) else { return };
        self.shard.borrow_mut().parked = self.parked();
        p.conn.unpark();
        if let Some(epoll) = &self.epoll {
            // SAFETY: both descriptors are open.
            unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    p.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            };
        }
        p.conn.idle.set(Idle::Active);
        p.conn.quiet.set(0);
        // A client active again sooner than it took to park it (one packet every
        // `--park-after` + ε seconds) would pay a park and a revival per packet: it waits
        // twice as long before the next park, up to a minute; one that stayed parked four
        // times as long goes back to `--park-after`.
        let delay = self.delay(&p.conn);
        let parked_for = self.scans.get().wrapping_sub(p.since);
        if parked_for < u16::from(delay) {
            p.conn.park_delay.set(delay.saturating_mul(2).min(MAX_PARK_DELAY));
        } else if parked_for >= 4 * u16::from(delay) {
            p.conn.park_delay.set(0);
        }
        // What the client sent is taken now, not by the task's first read: that read would
        // be queued behind packets other connections sent later (a SUBSCRIBE here, then
        // another client's PUBLISH it should receive).
        let mut first = [0u8; 4096];
        // SAFETY: the descriptor is open; the buffer is valid for its length.
        let n = unsafe {
            libc::recv(p.fd.as_raw_fd(), first.as_mut_ptr().cast(), first.len(), libc::MSG_DONTWAIT)
        };
        let first = first.get(..usize::try_from(n).unwrap_or(0)).unwrap_or_default();
        if !first.is_empty() {
            // Read here, not by the reader loop: it counts for keep-alive all the same (a
            // client that only pings would be closed at 1.5 × its keep-alive otherwise).
            p.conn.last_read.set(Instant::now());
            p.conn.quiet.set(0);
            self.shard.borrow_mut().stats.bytes_received += first.len() as u64;
        }
        // SAFETY: the record owned the descriptor; the stream owns it now.
        let stream = unsafe { TcpStream::from_raw_fd(p.fd.into_raw_fd()) };
        let peer = p.conn.meta.peer;
        let mut reader = inbound(self.shard.clone(), p.conn, p.session, peer);
        reader.will = p.will;
        reader.aliases = p.aliases;
        let read_buffer = self.shard.borrow().config.read_buffer;
        let connection = Connection {
            reader,
            stream: Rc::new(SharedStream(RefCell::new(super::Transport::Tcp(stream)))),
            buf: ReadBuffer::new(first, read_buffer),
            slot: p.slot,
            parker: self.clone(),
        };
        glommio::spawn_local(run_connection(connection)).detach();
    }

    /// Quiet seconds `conn` needs before it parks.
    fn delay(&self, conn: &ConnHandle) -> u8 {
        self.park_after.max(conn.park_delay.get())
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        self.parked.borrow().len()
    }

    /// Once a second: counts another quiet second for each active connection with nothing
    /// to write, and asks those quiet for `park_after` to park.
    /// Asks `conn` to park after `grace` unless it read or was sent something since (a new
    /// connection's birth parking). Nothing when parking is off.
    pub(super) fn ask_after(&self, conn: &Rc<ConnHandle>, grace: Duration) {
        if self.epoll.is_none() {
            return;
        }
        let (conn, born) = (conn.clone(), conn.last_read.get());
        glommio::spawn_local(async move {
            glommio::timer::sleep(grace).await;
            let quiet = conn.last_read.get() == born && conn.pending() == 0 && conn.pending_acks() == 0;
            if quiet && !conn.closing.get() && conn.idle.get() == Idle::Active {
                conn.idle.set(Idle::Asked);
                conn.wake_reader();
            }
        })
        .detach();
    }

    fn scan(&self) {
        self.scans.set(self.scans.get().wrapping_add(1));
        let shard = self.shard.borrow();
        for conn in shard.writers.values() {
            if conn.closing.get() || conn.idle.get() != Idle::Active || conn.pending() > 0 {
                continue;
            }
            let quiet = conn.quiet.get().saturating_add(1);
            conn.quiet.set(quiet);
            if quiet > self.delay(conn) {
                conn.idle.set(Idle::Asked);
                conn.wake_reader();
            }
        }
    }
}

/// Reads the watcher's reports: ids of parked connections whose client sent or closed.
async fn run_input(parker: Rc<Parker>, mut input: glommio::net::UnixStream) {
    let mut buf = vec![0u8; 4096];
    let mut have = 0;
    loop {
        match input.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
        let whole = have - have % 8;
        for id in buf[..whole].chunks_exact(8) {
            if let Ok(id) = <[u8; 8]>::try_from(id) {
                parker.revive(u64::from_le_bytes(id));
            }
        }
        buf.copy_within(whole..have, 0);
        have -= whole;
    }
}

/// Revives the parked connections the shard woke.
async fn run_revivals(parker: Rc<Parker>) {
    loop {
        let ids = std::future::poll_fn(|cx| parker.revivals.poll_take(cx)).await;
        for id in ids {
            parker.revive(id);
        }
    }
}

async fn run_scan(parker: Rc<Parker>) {
    loop {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        parker.scan();
    }
}

/// The epoll set and the shard's end of the socket the watcher thread reports on. The
/// thread ends when the shard's end closes.
fn start_watcher(shard: usize) -> std::io::Result<(Arc<OwnedFd>, UnixStream)> {
    // SAFETY: plain syscall.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let epoll = Arc::new(unsafe { OwnedFd::from_raw_fd(epoll) });
    let (ours, theirs) = UnixStream::pair()?;
    let mut event = libc::epoll_event { events: libc::EPOLLRDHUP as u32, u64: STOP };
    // SAFETY: both descriptors are open; `event` outlives the call.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, theirs.as_raw_fd(), &mut event) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    ours.set_nonblocking(true)?;
    let watched = epoll.clone();
    std::thread::Builder::new()
        .name(format!("ringmq-idle-{shard}"))
        .spawn(move || watch(&watched, theirs))?;
    Ok((epoll, ours))
}

/// The watcher thread: reports each parked descriptor with input (or closed) once.
fn watch(epoll: &OwnedFd, mut out: UnixStream) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut ids = Vec::with_capacity(events.len() * 8);
    loop {
        // SAFETY: `events` is valid for its length.
        let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        ids.clear();
        for event in &events[..n as usize] {
            // A copy: the struct is packed.
            let id = { event.u64 };
            if id == STOP {
                return;
            }
            ids.extend_from_slice(&id.to_le_bytes());
        }
        // Blocks while the shard is behind on reading: bounded by the socket's buffer.
        if out.write_all(&ids).is_err() {
            return;
        }
    }
}
