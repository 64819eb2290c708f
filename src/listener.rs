//! Listening sockets: every listener is bound once per shard (SO_REUSEPORT), listened on
//! once the shards are ready, and served by an accept loop per shard, which claims a
//! connection slot and starts the connection's task.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

use crate::broker::shard::ShardRef;
use crate::broker::{connection, ConnectionSlot, Global, ListenerInfo, TlsSlot};
use crate::config::Listener;
use crate::server::StartError;

const LISTEN_BACKLOG: i32 = 4096;
/// How long start-up waits for a port a killed broker's io_uring still holds.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(3);

/// One listener bound on every shard.
pub struct Bound {
    /// One socket per shard, in shard order.
    pub sockets: Vec<std::net::TcpListener>,
    pub info: Arc<ListenerInfo>,
}

/// Binds every listener once per shard (not listening yet). Two listeners on one address
/// are refused like any port already taken.
pub fn bind_all(listeners: &[Listener], shards: usize) -> Result<Vec<Bound>, StartError> {
    listeners
        .iter()
        .map(|l| {
            let tls = match &l.tls {
                Some(files) => Some(TlsSlot::new(
                    files.clone(),
                    crate::tls::server_config(files)
                        .map_err(|source| StartError::Tls { listener: l.name(), source })?,
                )),
                None => None,
            };
            let auth = crate::auth::load_slot(&l.auth)
                .map_err(|source| StartError::Auth { listener: l.name(), source })?
                .map(Arc::new);
            warn_if_open(l, auth.as_deref());
            let sockets = bind_listeners(l.bind, shards)?;
            let addr = sockets.first().map_or(l.bind, |(_, a)| *a);
            let name = Listener { bind: addr, ..l.clone() }.name();
            Ok(Bound {
                sockets: sockets.into_iter().map(|(s, _)| s).collect(),
                info: Arc::new(ListenerInfo {
                    name: name.into(),
                    addr,
                    proxy_protocol: l.proxy_protocol,
                    tls,
                    websocket: l.kind.is_websocket().then(|| crate::broker::WsSettings {
                        path: l.path.clone(),
                        allowed_origins: l.allowed_origins.clone(),
                    }),
                    max_connections: l.max_connections,
                    connections: AtomicUsize::new(0),
                    auth,
                }),
            })
        })
        .collect()
}

/// Mosquitto 2's warning: a listener reachable from other hosts that lets anyone in.
fn warn_if_open(l: &Listener, auth: Option<&crate::auth::AuthSlot>) {
    let anonymous = auth.is_none_or(|slot| slot.current().allow_anonymous);
    if anonymous && !l.bind.ip().is_loopback() && l.auth.allow_anonymous.is_none() {
        tracing::warn!(
            listener = %l.name(),
            "anonymous clients may connect from other hosts: no password file, JWT key or certificate identity is set (--allow-anonymous true silences this)"
        );
    }
}

/// Starts listening on a shard's bound socket.
pub fn listen(socket: std::net::TcpListener, info: &ListenerInfo) -> Result<TcpListener, StartError> {
    // SAFETY: plain syscall on the bound socket we own.
    if unsafe { libc::listen(socket.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(StartError::Bind { addr: info.addr, source: std::io::Error::last_os_error() });
    }
    // SAFETY: the descriptor is a bound, listening socket we own.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// One listening socket per shard on the same address; the first fixes the port when
/// port 0 was asked for.
fn bind_listeners(
    addr: SocketAddr,
    shards: usize,
) -> Result<Vec<(std::net::TcpListener, SocketAddr)>, StartError> {
    // A broker that was just killed can hold its port for a moment after it exited: the
    // kernel tears its io_uring (and the listeners pending accepts there) down
    // asynchronously. A restart waits that out instead of failing.
    let deadline = Instant::now() + PORT_RELEASE_WAIT;
    let bind_addr = loop {
        match claim_port(addr) {
            Err(StartError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => break other?,
        }
    };
    let mut listeners: Vec<(std::net::TcpListener, SocketAddr)> = Vec::with_capacity(shards);
    for _ in 0..shards {
        let err = |source| StartError::Bind { addr: bind_addr, source };
        let socket = new_socket(bind_addr).map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        socket.bind(&bind_addr.into()).map_err(err)?;
        // Listening starts once every shard is ready (`all_shards_ready`): until then a
        // client is refused and retries, rather than waiting in a backlog for a shard that
        // would serve it before the broker knows every subscription.
        listeners.push((socket.into(), bind_addr));
    }
    Ok(listeners)
}

/// Binds `addr` once without SO_REUSEPORT and lets it go: this fails when any other socket
/// holds the port, including another ringmq whose SO_REUSEPORT listeners would otherwise
/// silently share it. Returns the address with the port resolved.
fn claim_port(addr: SocketAddr) -> Result<SocketAddr, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let probe = new_socket(addr).map_err(err)?;
    probe.bind(&addr.into()).map_err(err)?;
    let local = probe.local_addr().map_err(err)?;
    Ok(local.as_socket().unwrap_or(addr))
}

fn new_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let domain = if addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restarted broker bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// Accepts connections on one listener of this shard until dropped: each claims a slot
/// (the broker's `--max-connections` and the listener's own bound) and starts its task.
pub async fn accept_loop(
    shard: ShardRef,
    parker: Rc<connection::Parker>,
    listener: TcpListener,
    global: Arc<Global>,
    max_connections: usize,
    info: Arc<ListenerInfo>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(err) => {
                // Out of descriptors or memory: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(slot) = ConnectionSlot::claim(&global, max_connections, &info) else {
            tracing::warn!(listener = %info.name, max_connections, listener_max = info.max_connections, "connection refused: --max-connections or the listener's max_connections reached");
            continue;
        };
        let peer = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        glommio::spawn_local(connection::accept(shard.clone(), parker.clone(), stream, peer, slot)).detach();
    }
}
