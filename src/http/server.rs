//! The endpoint's thread: its own unpinned glommio executor, an accept loop, one task per
//! HTTP connection, and the channels to every shard. A request that needs the shards
//! sends each an [`AdminEnvelope`] and waits for the answers, as a core waits for
//! another; nothing here touches a shard's state, and nothing on a shard waits for it.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::shared_channel::{self, ConnectedSender, SharedReceiver, SharedSender};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

use super::api::Api;
use super::request::{parse_head, Response, MAX_BODY};
use crate::broker::admin::{AdminAnswer, AdminEnvelope, AdminReply, AdminRequest};
use crate::broker::notify::Event;
use crate::broker::Global;
use crate::server::Shutdown;

/// Requests one shard's channel holds before the endpoint waits to send more.
const CHANNEL_CAPACITY: usize = 64;
/// How long a request waits for a shard's answer.
const SHARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to send a request (or stay idle between two).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an answer may take to be written (the client reads it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 256;
/// Memory the executor registers with io_uring: it does no storage I/O.
const IO_MEMORY: usize = 64 * 1024;
/// What the executor locks in all (its I/O memory and its rings).
pub const LOCKED_MEMORY: usize = IO_MEMORY + (1 << 20);

/// A shard's ends of its channels with the endpoint.
pub struct ShardEnds {
    pub requests: SharedReceiver<AdminEnvelope>,
    pub replies: SharedSender<AdminAnswer>,
}

/// The endpoint's ends of every shard's channels.
pub struct EndpointEnds {
    requests: Vec<SharedSender<AdminEnvelope>>,
    replies: Vec<SharedReceiver<AdminAnswer>>,
}

/// One pair of channels per shard.
pub fn channels(shards: usize) -> (Vec<ShardEnds>, EndpointEnds) {
    let mut shard_ends = Vec::with_capacity(shards);
    let mut ends = EndpointEnds { requests: Vec::new(), replies: Vec::new() };
    for _ in 0..shards {
        let (req_tx, req_rx) = shared_channel::new_bounded(CHANNEL_CAPACITY);
        let (rep_tx, rep_rx) = shared_channel::new_bounded(CHANNEL_CAPACITY);
        shard_ends.push(ShardEnds { requests: req_rx, replies: rep_tx });
        ends.requests.push(req_tx);
        ends.replies.push(rep_rx);
    }
    (shard_ends, ends)
}

/// What the endpoint is configured with.
pub struct Settings {
    /// Counts the shards whose channels are connected (both ways).
    pub connected: Arc<std::sync::atomic::AtomicUsize>,
    pub token: Arc<super::TokenSlot>,
    pub global: Arc<Global>,
    pub shutdown: Shutdown,
    pub started: Instant,
}

/// Starts the endpoint's thread on a bound listener. Returns once its executor runs.
pub fn spawn(
    listener: std::net::TcpListener,
    ends: EndpointEnds,
    settings: Settings,
) -> Result<std::thread::JoinHandle<()>, String> {
    let builder = LocalExecutorBuilder::new(Placement::Unbound).name("ringmq-http").io_memory(IO_MEMORY);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("ringmq-http".into())
        .spawn(move || {
            let executor = match builder.make() {
                Ok(executor) => executor,
                Err(err) => {
                    let _ = ready_tx.send(Err(err.to_string()));
                    return;
                }
            };
            executor.run(run(listener, ends, settings, ready_tx));
        })
        .map_err(|e| e.to_string())?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(err)) => Err(err),
        Err(_) => Err("the HTTP thread ended during start-up".into()),
    }
}

async fn run(
    listener: std::net::TcpListener,
    ends: EndpointEnds,
    settings: Settings,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: a bound, listening socket we own.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    let client = Rc::new(ShardClient::new(ends.requests.len()));
    for (shard, (tx, rx)) in ends.requests.into_iter().zip(ends.replies).enumerate() {
        // Each connects when its shard does: the endpoint answers /healthz meanwhile.
        let (client, connected) = (client.clone(), settings.connected.clone());
        glommio::spawn_local(async move {
            let tx = tx.connect().await;
            let rx = rx.connect().await;
            client.senders.borrow_mut()[shard] = Some(Rc::new(tx));
            connected.fetch_add(1, std::sync::atomic::Ordering::Release);
            while let Some(AdminAnswer { id, reply }) = rx.recv().await {
                client.deliver(id, reply);
            }
        })
        .detach();
    }
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let api = Rc::new(Api {
        connected: settings.connected.clone(),
        shards: client,
        token: settings.token,
        loopback,
        global: settings.global,
        started: settings.started,
    });
    let _ = ready.send(Ok(()));
    drop(ready);
    let open = Rc::new(std::cell::Cell::new(0usize));
    let accepting = {
        let (api, open) = (api.clone(), open.clone());
        glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) if open.get() >= MAX_CONNECTIONS => drop(stream),
                    Ok(stream) => {
                        open.set(open.get() + 1);
                        let (api, open) = (api.clone(), open.clone());
                        glommio::spawn_local(async move {
                            serve(&api, stream).await;
                            open.set(open.get() - 1);
                        })
                        .detach();
                    }
                    Err(err) => {
                        tracing::warn!(%err, "HTTP accept failed");
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
        .detach()
    };
    while !settings.shutdown.is_triggered() {
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
    drop(accepting);
}

/// Serves one HTTP connection: requests one after the other (keep-alive), each within
/// [`IDLE_TIMEOUT`], each answer written within [`WRITE_TIMEOUT`] (a client that sends
/// requests and reads no answers is closed, not waited for). A request's head is judged
/// (token, Host, Origin) before its body is read.
async fn serve(api: &Api, mut stream: TcpStream) {
    let peer: Option<SocketAddr> = stream.peer_addr().ok();
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let request = glommio::timer::timeout(IDLE_TIMEOUT, async {
            loop {
                match parse_head(&buf) {
                    Ok(Some((head, used))) => {
                        if let Some(refusal) = api.admit(&head) {
                            return Ok(Some(Err(refusal)));
                        }
                        let need = used + head.content_length;
                        if buf.len() < need
                            && head.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
                        {
                            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                        }
                        while buf.len() < need {
                            if read_more(&mut stream, &mut buf).await? == 0 {
                                return Ok(None);
                            }
                        }
                        let body = buf[used..need].to_vec();
                        buf.drain(..need);
                        return Ok(Some(Ok((head, body))));
                    }
                    Ok(None) => {
                        if read_more(&mut stream, &mut buf).await? == 0 {
                            return Ok(None);
                        }
                    }
                    Err(err) => {
                        tracing::debug!(?peer, %err, "bad HTTP request");
                        let code = match err.status() {
                            413 => "payload_too_large",
                            431 => "headers_too_large",
                            _ => "bad_request",
                        };
                        return Ok(Some(Err(Response::error(err.status(), code, &err))));
                    }
                }
            }
        })
        .await;
        let (response, keep_alive, head_only) = match request {
            Ok(Some(Ok((head, body)))) => {
                (api.handle(&head, &body).await, head.keep_alive, head.method == "HEAD")
            }
            // Refused before its body was read: the connection cannot go on.
            Ok(Some(Err(refusal))) => (refusal, false, false),
            Ok(None) | Err(_) => return,
        };
        let bytes = response.encode(keep_alive, head_only);
        let written = glommio::timer::timeout(WRITE_TIMEOUT, async {
            stream.write_all(&bytes).await?;
            Ok(())
        })
        .await;
        if written.is_err() || !keep_alive {
            return;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> glommio::Result<usize, ()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    // A head, its blank line and a body at their bounds.
    if buf.len() + n > super::request::MAX_HEAD + 4 + MAX_BODY {
        return Ok(0);
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// An answer awaited.
#[derive(Default)]
struct Pending {
    reply: RefCell<Option<AdminReply>>,
    done: Event,
}

/// The endpoint's side of the shards' channels: sends requests, matches answers to them.
pub struct ShardClient {
    senders: RefCell<Vec<Option<Rc<ConnectedSender<AdminEnvelope>>>>>,
    pending: RefCell<AHashMap<u64, Rc<Pending>>>,
    next: std::cell::Cell<u64>,
}

/// A shard did not answer: not connected yet (starting) or too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    Starting,
    TimedOut,
}

impl ShardClient {
    fn new(shards: usize) -> ShardClient {
        ShardClient {
            senders: RefCell::new(vec![None; shards]),
            pending: RefCell::new(AHashMap::new()),
            next: std::cell::Cell::new(1),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.senders.borrow().len()
    }

    fn deliver(&self, id: u64, reply: AdminReply) {
        if let Some(pending) = self.pending.borrow_mut().remove(&id) {
            *pending.reply.borrow_mut() = Some(reply);
            pending.done.notify_all();
        }
    }

    /// Sends `request` to `shard` and waits for its answer.
    pub async fn ask(&self, shard: usize, request: AdminRequest) -> Result<AdminReply, Unavailable> {
        let deadline = Instant::now() + SHARD_TIMEOUT;
        let (id, pending) = self.send(shard, request, deadline).await?;
        self.wait(id, &pending, deadline).await
    }

    /// Asks every shard at once (`request` builds each one's) and waits for all.
    pub async fn ask_all(&self, request: impl Fn() -> AdminRequest) -> Result<Vec<AdminReply>, Unavailable> {
        let deadline = Instant::now() + SHARD_TIMEOUT;
        let mut sent = Vec::with_capacity(self.shard_count());
        for shard in 0..self.shard_count() {
            sent.push(self.send(shard, request(), deadline).await?);
        }
        let mut replies = Vec::with_capacity(sent.len());
        for (id, pending) in sent {
            replies.push(self.wait(id, &pending, deadline).await?);
        }
        Ok(replies)
    }

    async fn send(
        &self,
        shard: usize,
        request: AdminRequest,
        deadline: Instant,
    ) -> Result<(u64, Rc<Pending>), Unavailable> {
        let sender = self.senders.borrow().get(shard).cloned().flatten().ok_or(Unavailable::Starting)?;
        let id = self.next.get();
        self.next.set(id + 1);
        let pending = Rc::new(Pending::default());
        self.pending.borrow_mut().insert(id, pending.clone());
        let left = deadline.saturating_duration_since(Instant::now());
        match glommio::timer::timeout(left, async {
            Ok(sender.send(AdminEnvelope { id, request }).await.is_ok())
        })
        .await
        {
            Ok(true) => Ok((id, pending)),
            Ok(false) => {
                self.pending.borrow_mut().remove(&id);
                Err(Unavailable::Starting)
            }
            Err(_) => {
                self.pending.borrow_mut().remove(&id);
                Err(Unavailable::TimedOut)
            }
        }
    }

    async fn wait(&self, id: u64, pending: &Pending, deadline: Instant) -> Result<AdminReply, Unavailable> {
        let left = deadline.saturating_duration_since(Instant::now());
        let waited = glommio::timer::timeout(left, async {
            while pending.reply.borrow().is_none() {
                pending.done.wait().await;
            }
            Ok(())
        })
        .await;
        self.pending.borrow_mut().remove(&id);
        match (waited, pending.reply.borrow_mut().take()) {
            (_, Some(reply)) => Ok(reply),
            _ => Err(Unavailable::TimedOut),
        }
    }
}
