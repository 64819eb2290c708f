//! Broker configuration: one plain struct, filled from command-line flags by `main` or
//! built directly by tests. Every bound on what clients can make the broker hold is here,
//! finite by default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

mod cli;
pub mod file;

pub use cli::{Cli, Loaded};

pub use crate::broker::session::{Qos0Overflow, QueueFullPolicy};
pub use crate::broker::shared::SharedStrategy;

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// MQTT over plain TCP.
    Tcp,
    /// MQTT over TLS (1.2 and 1.3).
    Tls,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl ListenerKind {
    pub fn is_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    pub fn is_websocket(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }
}

impl std::fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        })
    }
}

/// One address the broker listens on; every shard binds it (SO_REUSEPORT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub kind: ListenerKind,
    pub bind: SocketAddr,
    /// A PROXY protocol header (v1 or v2, as HAProxy or an AWS NLB send it) must come
    /// before CONNECT; the client address in it is the one used everywhere after.
    pub proxy_protocol: bool,
    /// Connections this listener holds at once (all shards); `--max-connections` bounds
    /// the broker's total besides.
    pub max_connections: usize,
    /// Certificates of a TLS listener.
    pub tls: Option<TlsFiles>,
    /// A WebSocket listener's request path (`/mqtt`).
    pub path: String,
    /// A WebSocket listener's accepted `Origin` headers; empty: any.
    pub allowed_origins: Vec<String>,
    /// Authentication and authorization on this listener (after `AuthSettings::or` with
    /// the command line's, its complete settings).
    pub auth: AuthSettings,
}

/// Who may connect through a listener and what they may do. Every field is optional:
/// a listener's own setting (from the file) wins over the command line's, which applies to
/// every listener (`AuthSettings::or`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthSettings {
    /// A password file as `mosquitto_passwd` or `ringmq passwd` write it.
    pub password_file: Option<PathBuf>,
    /// An ACL file in Mosquitto's `acl_file` syntax.
    pub acl_file: Option<PathBuf>,
    /// Whether clients without credentials are let in. Unset: yes only while the listener
    /// has no way to authenticate anyone (Mosquitto 2's rule).
    pub allow_anonymous: Option<bool>,
    /// Use a verified client certificate's name as the username (TLS listeners).
    pub identity: Option<CertIdentityKind>,
    /// A key that signs JSON Web Tokens sent in the password field.
    pub jwt: Option<JwtKeySource>,
    /// The claim holding a token's username (`sub`).
    pub jwt_username_claim: Option<String>,
}

impl AuthSettings {
    /// Each of this listener's settings, or `global`'s where it has none.
    pub fn or(&self, global: &AuthSettings) -> AuthSettings {
        AuthSettings {
            password_file: self.password_file.clone().or_else(|| global.password_file.clone()),
            acl_file: self.acl_file.clone().or_else(|| global.acl_file.clone()),
            allow_anonymous: self.allow_anonymous.or(global.allow_anonymous),
            identity: self.identity.or(global.identity),
            jwt: self.jwt.clone().or_else(|| global.jwt.clone()),
            jwt_username_claim: self.jwt_username_claim.clone().or_else(|| global.jwt_username_claim.clone()),
        }
    }

    /// Whether anything authenticates clients (a password file, a JWT key or certificate
    /// identity): then anonymous clients are refused unless allowed explicitly.
    pub fn authenticates(&self) -> bool {
        self.password_file.is_some()
            || self.jwt.is_some()
            || self.identity.is_some_and(|i| i != CertIdentityKind::None)
    }

    /// Whether any setting is made at all.
    pub fn is_empty(&self) -> bool {
        *self == AuthSettings::default()
    }
}

/// Which name of a verified client certificate becomes the username.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertIdentityKind {
    /// The subject's common name (Mosquitto's `use_identity_as_username`).
    Cn,
    /// The first subject alternative name (DNS, e-mail or URI).
    San,
    /// Certificates do not name the user.
    None,
}

impl FromStr for CertIdentityKind {
    type Err = String;

    fn from_str(text: &str) -> Result<CertIdentityKind, String> {
        <CertIdentityKind as clap::ValueEnum>::from_str(text, false)
            .map_err(|_| format!("expected cn, san or none, got {text:?}"))
    }
}

/// Where a JWT verification key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeySource {
    /// An HS256 shared secret.
    Secret(String),
    /// A PEM public key (RSA: RS256, EC P-256: ES256).
    KeyFile(PathBuf),
}

/// What a PUBLISH the ACL refuses does to its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AclDenyAction {
    /// Dropped: v5 clients are answered 0x87 Not authorized, 3.1.1 clients get their
    /// usual acknowledgement (they have no way to be told).
    Ignore,
    /// The connection is closed (v5: DISCONNECT 0x87), as EMQX's `deny_action = disconnect`.
    Disconnect,
}

/// Who may take over a connected or persistent session with an authenticated CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TakeoverPolicy {
    /// Only a connection with the same username (anonymous takes over anonymous).
    SameUser,
    /// Any connection with the client identifier (MQTT's own rule).
    Any,
}

/// A TLS listener's PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Certificate authorities client certificates are verified against; without it no
    /// client certificate is asked for.
    pub ca: Option<PathBuf>,
    /// A client without a valid certificate is refused in the handshake (needs `ca`).
    pub require_client_cert: bool,
}

impl Listener {
    pub fn tcp(bind: SocketAddr) -> Listener {
        Listener {
            kind: ListenerKind::Tcp,
            bind,
            proxy_protocol: false,
            max_connections: usize::MAX,
            tls: None,
            path: DEFAULT_WS_PATH.to_string(),
            allowed_origins: Vec::new(),
            auth: AuthSettings::default(),
        }
    }

    /// Takes the command line's authentication settings where it has none of its own; a
    /// certificate identity only on a TLS listener (there are no certificates elsewhere).
    pub fn inherit_auth(&mut self, global: &AuthSettings) {
        self.auth = self.auth.or(global);
        if !self.kind.is_tls() {
            self.auth.identity = None;
        }
    }

    /// How logs and `$SYS` name it: `tcp:0.0.0.0:1883`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.kind, self.bind)
    }
}

/// Runtime settings of one broker.
#[derive(Debug, Clone)]
pub struct Config {
    /// Membership of a cluster; `None`: a single node.
    pub cluster: Option<ClusterSettings>,
    /// The HTTP endpoint (metrics, admin API, dashboard); `None`: off.
    pub http: Option<HttpSettings>,
    /// Connections and disconnections are logged at info.
    pub log_connections: bool,
    /// Where the broker listens: every shard binds each (SO_REUSEPORT). Port 0 picks a
    /// free port. Never empty.
    pub listeners: Vec<Listener>,
    /// Number of shards (executors, one per core).
    pub cores: usize,
    /// Bytes read from a socket at a time.
    pub read_buffer: usize,
    /// Bytes of encoded packets that may wait to be written to one connection; past it,
    /// QoS 0 deliveries to that connection are dropped and counted.
    pub write_buffer: usize,
    /// Largest packet accepted from a client, and advertised to v5 clients.
    pub max_packet_size: usize,
    /// Connections the whole broker accepts at once.
    pub max_connections: usize,
    /// io_uring buffer memory per executor; locked, so counted against RLIMIT_MEMLOCK.
    pub io_memory: usize,
    /// How long a socket may stay open without sending CONNECT.
    pub connect_timeout: Duration,
    /// QoS 1/2 messages in flight to one client (also capped by a v5 client's Receive Maximum).
    pub max_inflight: usize,
    /// Messages queued for one session beyond its in-flight window.
    pub max_queued_messages: usize,
    /// Bytes of messages queued for one session.
    pub max_queued_bytes: usize,
    /// Queue QoS 0 messages for offline persistent sessions too.
    pub queue_qos0: bool,
    /// Bytes of a persistent session's queue kept only in its log (with a data directory).
    pub max_spilled_bytes: u64,
    /// Bytes of session-log segment files on disk, all shards together: past it nothing
    /// more spills.
    pub max_disk_bytes: u64,
    /// What a full session queue gives up.
    pub queue_full_policy: QueueFullPolicy,
    /// What a QoS 0 message does at a connected subscriber's full outbox.
    pub qos0_overflow: Qos0Overflow,
    /// How long a subscriber holding publishers back (`Backpressure`) may make no progress
    /// before it pays: a clean session is disconnected (v5: 0x97), a persistent one stops
    /// holding publishers back.
    pub slow_consumer_timeout: Duration,
    /// Longest a QoS 0 PUBLISH waits for a congested subscriber before it is routed anyway
    /// (that subscriber then drops it).
    pub qos0_max_wait: Duration,
    /// Retained topics the broker stores, all shards together.
    pub max_retained_messages: usize,
    /// Longest keep-alive granted; v5 clients asking for more (or for none) are told this.
    pub max_keep_alive: u16,
    /// Topic aliases a v5 client may set per connection.
    pub max_topic_alias: u16,
    /// Receive Maximum advertised to v5 clients: QoS 2 publishes awaiting PUBREL.
    pub receive_maximum: u16,
    /// How often `$SYS` topics are published; zero turns them off.
    pub sys_interval: Duration,
    /// How a shared subscription group's next member is chosen.
    pub shared_strategy: SharedStrategy,
    /// How long a connected shared-subscription member may leave a message unacknowledged
    /// before the group's other members get its share; zero never.
    pub shared_ack_timeout: Duration,
    /// Sessions kept at once (connected or persistent and offline), all shards together.
    pub max_sessions: usize,
    /// Longest time a persistent session outlives its connection: a v5 client asking for
    /// more is told this one in CONNACK; a 3.1.1 `clean_session=0` session expires after it.
    pub max_session_expiry: u32,
    /// Levels a topic name or filter may have (`a/b/c` has 3).
    pub max_topic_levels: usize,
    /// How long a connection may leave written bytes unread before it is closed.
    pub write_timeout: Duration,
    /// How long a connection reads and writes nothing before it parks (its tasks end
    /// until it is woken); zero: never.
    pub park_after: Duration,
    /// Messages one shard's queue to a peer shard may hold before its publishers pause.
    pub mesh_backlog: usize,
    /// While a peer's receiver is held by a congested subscriber: how long the oldest
    /// message to it may wait unapplied (in the outbox or the channel) before the
    /// publishers feeding it on this core pause; zero: no time bound.
    pub mesh_max_wait: Duration,
    /// Bytes of retained messages stored, all shards together (as held in memory).
    pub max_retained_bytes: usize,
    /// Subscriptions one client may hold.
    pub max_subscriptions_per_client: usize,
    /// Subscriptions held, all clients together.
    pub max_subscriptions: usize,
    /// Bytes one client's subscriptions hold (`session::subscription_cost`).
    pub max_subscription_bytes_per_client: usize,
    /// Bytes subscriptions hold, all clients together.
    pub max_subscription_bytes: usize,
    /// Response Information sent to v5 clients that request it: `{prefix}/{client id}`;
    /// `None` sends none.
    pub response_prefix: Option<String>,
    /// Where the per-shard logs live; `None` keeps everything in memory only.
    pub data_dir: Option<PathBuf>,
    /// When written log pages are flushed to the device.
    pub fsync: FsyncMode,
    /// Largest size of a log segment file (a log's segments grow from 1 MiB by doubling).
    pub segment_size: usize,
    /// A sealed segment whose live fraction falls below this is compacted.
    pub compact_below: f64,
    /// What a PUBLISH the ACL refuses does to its connection.
    pub acl_deny_action: AclDenyAction,
    /// Who may take over an existing session when clients authenticate.
    pub takeover: TakeoverPolicy,
}

/// When the logs' pages reach the device. Every mode survives a crash of the process (a
/// record is in the page cache before anything that depends on it is acknowledged); they
/// differ on power loss or a kernel crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// Acknowledgements of QoS 1/2 messages for persistent sessions wait for the flush
    /// (grouped): nothing acknowledged is lost to power loss.
    Always,
    /// Flushed every so often: power loss loses at most that much.
    Interval(Duration),
    /// Left to the kernel's writeback (typically within 30 s).
    Never,
}

impl FromStr for FsyncMode {
    type Err = String;

    fn from_str(text: &str) -> Result<FsyncMode, String> {
        match text {
            "always" => Ok(FsyncMode::Always),
            "never" => Ok(FsyncMode::Never),
            _ => match text.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(FsyncMode::Interval(Duration::from_millis(ms))),
                _ => Err(format!("expected always, never or interval:MS (MS > 0), got {text:?}")),
            },
        }
    }
}

impl std::fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncMode::Always => f.write_str("always"),
            FsyncMode::Never => f.write_str("never"),
            FsyncMode::Interval(d) => write!(f, "interval:{}", d.as_millis()),
        }
    }
}

pub const DEFAULT_SEGMENT_SIZE: usize = 64 * 1024 * 1024;
pub const DEFAULT_MAX_SESSIONS: usize = 1_000_000;
/// Seven days, as EMQX's `session_expiry_interval` ceiling and Mosquitto users' usual
/// `persistent_client_expiration`.
pub const DEFAULT_MAX_SESSION_EXPIRY: u32 = 7 * 24 * 3600;
/// EMQX's `max_topic_levels` default.
pub const DEFAULT_MAX_TOPIC_LEVELS: usize = 128;
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_WS_PATH: &str = "/mqtt";
pub const DEFAULT_MESH_MAX_WAIT: Duration = Duration::ZERO;
pub const DEFAULT_PARK_AFTER: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_RETAINED_BYTES: usize = 512 * 1024 * 1024;
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 100_000;
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1_000_000;
pub const DEFAULT_MAX_SUBSCRIPTION_BYTES_PER_CLIENT: usize = 256 << 20;
pub const DEFAULT_MAX_SUBSCRIPTION_BYTES: usize = 4 << 30;

pub const DEFAULT_READ_BUFFER: usize = 16 * 1024;
pub const DEFAULT_WRITE_BUFFER: usize = 1024 * 1024;
pub const DEFAULT_MAX_PACKET_SIZE: usize = 1024 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
pub const DEFAULT_IO_MEMORY: usize = 2 * 1024 * 1024;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_INFLIGHT: usize = 128;
pub const DEFAULT_MAX_QUEUED_MESSAGES: usize = 1000;
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;
/// Session logs on disk, all shards together: 16 spilled sessions at `--max-spilled-bytes`.
pub const DEFAULT_MAX_DISK_BYTES: u64 = 16 << 30;
pub const DEFAULT_MAX_RETAINED_MESSAGES: usize = 1_000_000;
pub const DEFAULT_MAX_KEEP_ALIVE: u16 = 65535;
pub const DEFAULT_MAX_TOPIC_ALIAS: u16 = 64;
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 1024;
/// The protocol's own ceiling on a packet: 1 + 4 + 268,435,455 bytes.
pub const PROTOCOL_MAX_PACKET_SIZE: usize = 268_435_460;

impl Config {
    /// A broker on `bind` with every other setting at its default.
    pub fn new(bind: SocketAddr) -> Config {
        Config {
            listeners: vec![Listener::tcp(bind)],
            cores: available_cpus().len(),
            read_buffer: DEFAULT_READ_BUFFER,
            write_buffer: DEFAULT_WRITE_BUFFER,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            io_memory: DEFAULT_IO_MEMORY,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            queue_qos0: false,
            max_spilled_bytes: 1 << 30,
            max_disk_bytes: DEFAULT_MAX_DISK_BYTES,
            queue_full_policy: QueueFullPolicy::Backpressure,
            qos0_overflow: Qos0Overflow::Backpressure,
            slow_consumer_timeout: Duration::from_secs(30),
            qos0_max_wait: Duration::from_millis(250),
            max_retained_messages: DEFAULT_MAX_RETAINED_MESSAGES,
            max_keep_alive: DEFAULT_MAX_KEEP_ALIVE,
            max_topic_alias: DEFAULT_MAX_TOPIC_ALIAS,
            receive_maximum: DEFAULT_RECEIVE_MAXIMUM,
            sys_interval: Duration::from_secs(10),
            shared_strategy: SharedStrategy::RoundRobin,
            shared_ack_timeout: Duration::from_secs(10),
            response_prefix: Some("response".to_string()),
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_session_expiry: DEFAULT_MAX_SESSION_EXPIRY,
            max_topic_levels: DEFAULT_MAX_TOPIC_LEVELS,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            park_after: DEFAULT_PARK_AFTER,
            mesh_backlog: crate::broker::cross::MAX_BACKLOG,
            mesh_max_wait: DEFAULT_MESH_MAX_WAIT,
            max_retained_bytes: DEFAULT_MAX_RETAINED_BYTES,
            max_subscriptions_per_client: DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_subscription_bytes_per_client: DEFAULT_MAX_SUBSCRIPTION_BYTES_PER_CLIENT,
            max_subscription_bytes: DEFAULT_MAX_SUBSCRIPTION_BYTES,
            // Embedded use (tests, libraries) keeps nothing on disk unless asked; the command
            // line defaults to ./ringmq-data.
            data_dir: None,
            fsync: FsyncMode::Interval(Duration::from_secs(1)),
            segment_size: DEFAULT_SEGMENT_SIZE,
            compact_below: 0.5,
            acl_deny_action: AclDenyAction::Ignore,
            takeover: TakeoverPolicy::SameUser,
            // Embedded use runs no HTTP endpoint unless asked (the command line's default
            // is 127.0.0.1:18083).
            http: None,
            cluster: None,
            log_connections: true,
        }
    }
}

/// The HTTP endpoint's address and token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub bind: SocketAddr,
    /// Holds the bearer token (its first line, trimmed).
    pub token_file: Option<PathBuf>,
    /// Asked for explicitly: an address that cannot be bound stops the start. The default
    /// one, taken by something else, is skipped with a warning.
    pub required: bool,
}

/// This node's place in a cluster (`--cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The etcd endpoints of the control plane.
    pub etcd: crate::cluster::etcd::Endpoints,
    /// Keys live under `/ringmq/<name>/`.
    pub name: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// Where this node accepts links from the other nodes.
    pub bind: SocketAddr,
    /// The address other nodes dial (`bind` unless given).
    pub advertise: SocketAddr,
    /// The node's etcd lease: a node that cannot renew it closes its clients before it
    /// expires.
    pub lease_ttl: Duration,
    /// Bytes of messages the node holds for the other nodes, each way (see `shard_share`).
    pub link_buffer: usize,
    /// Bytes of a session's log a takeover moves in one part (`--node-handover-part`).
    pub handover_part: usize,
}

impl ClusterSettings {
    /// `--node-link-buffer` split in two halves: the links' windows (frames not written or
    /// not confirmed yet) hold one before publishers pause; the other is shared by the
    /// shards, as what one shard handed the node bridge and the bridge has not taken yet
    /// (and, the other way, what the bridge handed one shard from the links and it has not
    /// applied yet). At least 64 KiB a shard.
    pub fn shard_share(&self, shards: usize) -> usize {
        (self.link_buffer / 2 / shards.max(1)).max(64 << 10)
    }

    /// The links' windows' half of `--node-link-buffer` (see `shard_share`).
    pub fn window_bound(&self) -> usize {
        self.link_buffer / 2
    }
}

/// `--node-handover-part`'s default: bytes of a session's messages a takeover moves in one
/// part.
pub const DEFAULT_HANDOVER_PART: usize = 8 << 20;

/// `--node-handover-part`'s largest value.
pub const MAX_HANDOVER_PART: usize = 16 << 20;

/// `--http-bind`'s default.
pub const DEFAULT_HTTP_BIND: &str = "127.0.0.1:18083";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The CPUs this process may run on (its affinity mask), in order.
pub fn available_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if ok != 0 {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize).filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) }).collect()
}
