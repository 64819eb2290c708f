//! The operator's door: an HTTP endpoint (`--http-bind`, default 127.0.0.1:18083) on a
//! thread of its own, off the shards' hot path, with Prometheus `/metrics`, the admin
//! API under `/api/v1`, `/healthz`, `/readyz` and a dashboard page at `/`.
//!
//! - [`request`]: HTTP/1.1 requests and responses, pure.
//! - [`metrics`]: the Prometheus text exposition, pure.
//! - [`api`]: the routes, turning requests into questions for the shards.
//! - [`server`]: the thread, its connections and its channels to the shards.

pub mod api;
pub mod metrics;
pub mod request;
pub mod server;

/// Reads the bearer token: the file's first line, trimmed (an empty one is an error).
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(format!("{}: the first line (the token) is empty", path.display()));
    }
    Ok(token)
}

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::broker::Global;
use crate::config::Config;
use crate::server::{Shutdown, StartError};

/// The endpoint's bearer token and the file it came from: read again on SIGHUP, replaced
/// whole; read once per request, never on the publish path.
#[derive(Debug, Default)]
pub struct TokenSlot {
    file: Option<std::path::PathBuf>,
    current: std::sync::RwLock<Option<String>>,
}

impl TokenSlot {
    /// Whether a token is configured (then the admin verbs always need it).
    pub fn configured(&self) -> bool {
        self.file.is_some()
    }

    pub fn current(&self) -> Option<String> {
        // A poisoned lock still holds a whole token (it is replaced, not edited).
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the file again; a file that does not read keeps the old token (logged).
    pub fn reload(&self) {
        let Some(path) = &self.file else { return };
        match read_token(path) {
            Ok(token) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(token);
                tracing::info!(file = %path.display(), "HTTP token reloaded");
            }
            Err(err) => tracing::warn!(%err, "HTTP token not reloaded: the old one stays"),
        }
    }
}

/// The endpoint's socket, bound, and its token.
pub struct Bound {
    socket: std::net::TcpListener,
    token: Arc<TokenSlot>,
}

/// Binds the HTTP endpoint's socket and reads its token. The default address, taken by
/// something else (another broker on this host), is skipped with a warning; one asked
/// for explicitly must be bound.
pub fn bind(config: &Config) -> Result<Option<Bound>, StartError> {
    let Some(settings) = &config.http else { return Ok(None) };
    let token = match &settings.token_file {
        Some(path) => Some(read_token(path).map_err(StartError::Http)?),
        None => None,
    };
    let slot =
        Arc::new(TokenSlot { file: settings.token_file.clone(), current: std::sync::RwLock::new(token) });
    if !settings.bind.ip().is_loopback() && !slot.configured() {
        return Err(StartError::Http(format!(
            "{} is not a loopback address: the admin API needs --http-token-file there",
            settings.bind
        )));
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(settings.bind),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| StartError::Http(e.to_string()))?;
    let _ = socket.set_reuse_address(true);
    let bound = socket.bind(&settings.bind.into()).and_then(|()| socket.listen(128));
    match bound {
        Ok(()) => Ok(Some(Bound { socket: socket.into(), token: slot })),
        Err(err) if !settings.required => {
            tracing::warn!(addr = %settings.bind, %err, "HTTP endpoint not started (--http-bind ADDR or none)");
            Ok(None)
        }
        Err(source) => Err(StartError::Bind { addr: settings.bind, source }),
    }
}

/// A running endpoint.
pub struct Started {
    pub thread: std::thread::JoinHandle<()>,
    pub addr: Option<SocketAddr>,
    /// Its token, for SIGHUP.
    pub token: Arc<TokenSlot>,
    connected: Arc<AtomicUsize>,
    shards: usize,
}

impl Started {
    /// Waits (at most `timeout`) until the endpoint's channels to every shard are
    /// connected, which they are as soon as the shards run: then its API answers.
    pub fn wait_connected(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.connected.load(Ordering::Acquire) < self.shards {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Waits for the channels (see `wait_connected`), hands its thread to `threads` and
    /// returns the address it serves and its token.
    pub fn finish(
        self,
        threads: &mut Vec<std::thread::JoinHandle<()>>,
    ) -> (Option<SocketAddr>, Arc<TokenSlot>) {
        if !self.wait_connected(std::time::Duration::from_secs(5)) {
            tracing::warn!("the HTTP endpoint is not connected to every shard yet");
        }
        threads.push(self.thread);
        (self.addr, self.token)
    }
}

/// Starts the endpoint's thread: it answers `/healthz` at once, and the rest once the
/// shards connected their channels.
pub fn start(
    bound: Option<Bound>,
    ends: Option<server::EndpointEnds>,
    global: Arc<Global>,
    shutdown: Shutdown,
) -> Result<Option<Started>, StartError> {
    let (Some(bound), Some(ends)) = (bound, ends) else { return Ok(None) };
    let addr = bound.socket.local_addr().ok();
    let shards = global.gauges.len();
    let connected = Arc::new(AtomicUsize::new(0));
    let settings = server::Settings {
        connected: connected.clone(),
        token: bound.token.clone(),
        global,
        shutdown,
        started: std::time::Instant::now(),
    };
    let thread = server::spawn(bound.socket, ends, settings).map_err(StartError::Http)?;
    if let Some(addr) = addr {
        tracing::info!(%addr, "HTTP endpoint: /metrics, /api/v1, dashboard at /");
    }
    Ok(Some(Started { thread, addr, token: bound.token, connected, shards }))
}
