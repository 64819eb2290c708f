//! The command line: every flag of the broker (`Cli`), read together with the `--config`
//! file (`Cli::load`) and turned into a [`Config`].

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use super::*;
/// ringmq: a thread-per-core MQTT 3.1.1/5.0 broker on io_uring.
#[derive(Debug, Parser)]
#[command(name = "ringmq", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// A TOML file of settings: every flag has a key of the same name in snake case
    /// (`max_inflight = 64`); flags on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validates the configuration (flags and --config file), prints the effective
    /// settings as TOML with where each came from, and exits (1 if invalid).
    #[arg(long)]
    pub check_config: bool,
    /// Prints the commented example configuration file (every key, its default) and exits.
    #[arg(long, hide = true)]
    pub example_config: bool,
    /// Address to listen on; every shard binds it with SO_REUSEPORT.
    #[arg(long, default_value = "0.0.0.0:1883")]
    pub bind: SocketAddr,
    /// Address of a TLS listener (MQTT over TLS, usually port 8883); needs --tls-cert and
    /// --tls-key.
    #[arg(long, value_name = "ADDR")]
    pub tls_bind: Option<SocketAddr>,
    /// PEM file of the TLS listener's certificate chain.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the TLS listener's private key.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM file of the certificate authorities client certificates are verified against
    /// (without it no client certificate is asked for).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Refuse TLS clients without a certificate signed by --tls-ca.
    #[arg(long)]
    pub tls_require_client_cert: bool,
    /// Address of a WebSocket listener (MQTT over ws://, usually port 8083).
    #[arg(long, value_name = "ADDR")]
    pub ws_bind: Option<SocketAddr>,
    /// Address of a secure WebSocket listener (wss://, usually port 8084); uses --tls-cert
    /// and --tls-key (and --tls-ca).
    #[arg(long, value_name = "ADDR")]
    pub wss_bind: Option<SocketAddr>,
    /// Request path of the WebSocket listeners; other paths are answered 404.
    #[arg(long, default_value = DEFAULT_WS_PATH)]
    pub ws_path: String,
    /// Password file (`user:hash` lines as `mosquitto_passwd` or `ringmq passwd` write
    /// them): CONNECT must carry a username and its password. Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// ACL file in Mosquitto's `acl_file` syntax (`user`, `topic`, `pattern` with %c/%u):
    /// enforced on SUBSCRIBE, PUBLISH, wills and every delivery; anything not granted is
    /// denied. Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub acl_file: Option<PathBuf>,
    /// Let clients without credentials in [default: true while no password file, JWT key
    /// or certificate identity is configured, false once one is].
    #[arg(long, value_name = "BOOL", value_parser = clap::value_parser!(bool))]
    pub allow_anonymous: Option<bool>,
    /// Which name of a verified client certificate (TLS listeners with --tls-ca) becomes
    /// the username: cn, san, or none [default: none].
    #[arg(long, value_name = "KIND")]
    pub tls_identity: Option<CertIdentityKind>,
    /// HS256 secret that signs JSON Web Tokens sent as the CONNECT password.
    #[arg(long, value_name = "SECRET", conflicts_with = "jwt_key")]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA: RS256, EC P-256: ES256) that verifies JSON Web Tokens sent as
    /// the CONNECT password. Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub jwt_key: Option<PathBuf>,
    /// The token claim that holds the username [default: sub].
    #[arg(long, value_name = "CLAIM")]
    pub jwt_username_claim: Option<String>,
    /// What a PUBLISH the ACL refuses does: ignore (dropped; MQTT 5 clients are answered
    /// 0x87) or disconnect.
    #[arg(long, value_enum, default_value_t = AclDenyAction::Ignore)]
    pub acl_deny_action: AclDenyAction,
    /// Who may take over a session when clients authenticate: same-user (a connection with
    /// the session's username) or any.
    #[arg(long, value_enum, default_value_t = TakeoverPolicy::SameUser)]
    pub takeover: TakeoverPolicy,
    /// Number of shards, one executor pinned per core [default: every CPU this process may use].
    #[arg(long)]
    pub cores: Option<usize>,
    /// Bytes read from a socket per read call.
    #[arg(long, default_value_t = DEFAULT_READ_BUFFER, value_parser = parse_size::<512, { 16 * 1024 * 1024 }>)]
    pub read_buffer: usize,
    /// Bytes of outgoing packets that may wait for one slow connection before QoS 0
    /// deliveries to it are dropped.
    #[arg(long, default_value_t = DEFAULT_WRITE_BUFFER, value_parser = parse_size::<4096, { 1 << 30 }>)]
    pub write_buffer: usize,
    /// Largest packet accepted from a client (bytes, whole packet); advertised to MQTT 5
    /// clients as Maximum Packet Size. Larger packets close the connection (v5: reason 0x95).
    #[arg(long, default_value_t = DEFAULT_MAX_PACKET_SIZE, value_parser = parse_size::<64, PROTOCOL_MAX_PACKET_SIZE>)]
    pub max_packet_size: usize,
    /// Connections accepted at once across all shards; more are refused.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// io_uring buffer memory per shard (bytes). It is locked memory: the process raises
    /// RLIMIT_MEMLOCK to cover it where allowed.
    #[arg(long, default_value_t = DEFAULT_IO_MEMORY)]
    pub io_memory: usize,
    /// Seconds a new socket may stay open without sending CONNECT.
    #[arg(long, default_value_t = DEFAULT_CONNECT_TIMEOUT.as_secs())]
    pub connect_timeout: u64,
    /// QoS 1/2 messages in flight to one client before further ones queue (a v5 client's
    /// Receive Maximum lowers it).
    #[arg(long, default_value_t = DEFAULT_MAX_INFLIGHT, value_parser = parse_size::<1, 65535>)]
    pub max_inflight: usize,
    /// Messages queued for one session (offline, or beyond its in-flight window); past it
    /// QoS 0 messages are dropped first, then --queue-full-policy applies.
    #[arg(long, default_value_t = DEFAULT_MAX_QUEUED_MESSAGES, value_parser = parse_size::<1, { 1 << 30 }>)]
    pub max_queued_messages: usize,
    /// Bytes of messages queued for one session.
    #[arg(long, default_value_t = DEFAULT_MAX_QUEUED_BYTES, value_parser = parse_size::<1024, { 1 << 40 }>)]
    pub max_queued_bytes: usize,
    /// Also queue QoS 0 messages for offline persistent sessions.
    #[arg(long)]
    pub queue_qos0: bool,
    /// With a data directory: bytes of one persistent session's QoS 1/2 messages kept only
    /// in its log, past its in-memory queue (`--max-queued-messages`/`--max-queued-bytes`);
    /// they are read back as the client drains. Past it new messages for it are dropped.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_spilled_bytes: u64,
    /// With a data directory: bytes the session logs' segment files may take, all shards
    /// together (each holds its share). Past it nothing more spills: a connected
    /// subscriber's publishers wait (it takes one message past the bound), an offline or
    /// slow one's new messages are dropped (counted). Retained messages are bounded apart
    /// (`--max-retained-bytes`).
    #[arg(long, default_value_t = DEFAULT_MAX_DISK_BYTES)]
    pub max_disk_bytes: u64,
    /// What a session queue does at its bound. `backpressure` (the default) drops nothing
    /// acknowledged: publishers feeding a connected subscriber wait while its queue is
    /// over half full. `refuse`: as `backpressure`, but an MQTT 5 publisher is not held:
    /// what would not fit a congested subscriber's queue on its core is answered 0x97
    /// Quota exceeded (QoS 1/2) or dropped (QoS 0). `drop-oldest` and `drop-new` are lossy:
    /// they drop QoS 1/2 messages already acknowledged to their publishers.
    #[arg(long, value_enum, default_value_t = QueueFullPolicy::Backpressure)]
    pub queue_full_policy: QueueFullPolicy,
    /// What a QoS 0 message does when a connected subscriber's outbox is full.
    /// `backpressure` (the default, with `--queue-full-policy backpressure`): it waits in
    /// the subscriber's queue, whose bound holds its publishers back, so a subscriber is
    /// served at its drain rate. `drop`: it is dropped (lossy telemetry; publishers are
    /// never slowed by QoS 0 subscribers).
    #[arg(long, value_enum, default_value_t = Qos0Overflow::Backpressure)]
    pub qos0_overflow: Qos0Overflow,
    /// Seconds a subscriber holding publishers back (`backpressure`) may make no progress
    /// (acknowledge nothing, take no queued message) before it pays: a clean session is disconnected (MQTT 5: 0x97 Quota
    /// exceeded), a persistent one stops holding publishers back (its queue's bound
    /// applies). 0: never (allowed only with a lossy policy).
    #[arg(long, default_value_t = 30)]
    pub slow_consumer_timeout: u64,
    /// Milliseconds a QoS 0 PUBLISH may wait for a congested subscriber (QoS 0
    /// back-pressure) before it is routed anyway and that subscriber drops it (counted): a
    /// subscriber that drains is served losslessly, one that does not read cannot stall QoS
    /// 0 publishers for longer than this per message.
    #[arg(long, default_value_t = 250)]
    pub qos0_max_wait_ms: u64,
    /// Retained topics stored, all shards together (each shard holds its share).
    #[arg(long, default_value_t = DEFAULT_MAX_RETAINED_MESSAGES, value_parser = parse_size::<1, { 1 << 40 }>)]
    pub max_retained_messages: usize,
    /// Longest keep-alive (seconds) granted; an MQTT 5 client asking for more, or for none,
    /// is given this one through Server Keep Alive.
    #[arg(long, default_value_t = DEFAULT_MAX_KEEP_ALIVE, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_keepalive: u16,
    /// Topic aliases an MQTT 5 client may set on one connection (0: none).
    #[arg(long, default_value_t = DEFAULT_MAX_TOPIC_ALIAS)]
    pub max_topic_alias: u16,
    /// Receive Maximum advertised to MQTT 5 clients: QoS 2 publishes a client may have
    /// awaiting PUBREL; one more ends the connection with reason 0x93.
    #[arg(long, default_value_t = DEFAULT_RECEIVE_MAXIMUM, value_parser = clap::value_parser!(u16).range(1..))]
    pub receive_maximum: u16,
    /// How a shared subscription group's next member is chosen.
    #[arg(long, value_enum, default_value_t = SharedStrategy::RoundRobin)]
    pub shared_strategy: SharedStrategy,
    /// Seconds a connected shared-subscription member may leave a message unacknowledged
    /// before its QoS 1 and queued messages go to other members (0: never).
    #[arg(long, default_value_t = 10)]
    pub shared_ack_timeout: u64,
    /// Sessions kept at once, connected or persistent and offline, all shards together; a
    /// CONNECT that would create one more is refused (v5: 0x97 Quota exceeded, 3.1.1: 3).
    #[arg(long, default_value_t = DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,
    /// Longest time (seconds) a persistent session outlives its connection: MQTT 5 clients
    /// asking for more are told this one; 3.1.1 persistent sessions expire after it.
    #[arg(long, default_value_t = DEFAULT_MAX_SESSION_EXPIRY, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_session_expiry: u32,
    /// Levels a topic name or filter may have: a deeper filter is refused in SUBACK
    /// (0x8F Topic Filter invalid; 3.1.1: 0x80), a PUBLISH to a deeper topic ends the
    /// connection (0x90 Topic Name invalid).
    #[arg(long, default_value_t = DEFAULT_MAX_TOPIC_LEVELS, value_parser = parse_size::<1, 65536>)]
    pub max_topic_levels: usize,
    /// Seconds a connection may leave written bytes unread before it is closed.
    #[arg(long, default_value_t = DEFAULT_WRITE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout: u64,
    /// Seconds a connection reads and writes nothing before it parks: its tasks end (an
    /// idle connection then holds about 1 KiB) until its client sends or something is
    /// delivered to it. 0: never.
    #[arg(long, default_value_t = DEFAULT_PARK_AFTER.as_secs(), value_parser = clap::value_parser!(u64).range(0..=255))]
    pub park_after: u64,
    /// Messages one core's queue to another core may hold before the publishers on the
    /// first core that feed it pause (besides 64 MiB of them).
    #[arg(long, default_value_t = crate::broker::cross::MAX_BACKLOG, value_parser = parse_size::<1, { 1 << 24 }>)]
    pub mesh_backlog: usize,
    /// While another core's receiver waits for a congested subscriber: milliseconds the
    /// oldest message to it may wait unapplied before the publishers feeding it on this
    /// core pause (a bound in time, for latency at saturation; it costs throughput when
    /// queues are long). 0: only the count bound (one `--max-queued-messages` in flight to
    /// a held core).
    #[arg(long, default_value_t = DEFAULT_MESH_MAX_WAIT.as_millis() as u64)]
    pub mesh_max_wait_ms: u64,
    /// Bytes of retained messages stored (as held in memory), all shards together; a
    /// retained PUBLISH past it is delivered but not stored (counted and logged).
    #[arg(long, default_value_t = DEFAULT_MAX_RETAINED_BYTES, value_parser = parse_size::<1024, { 1 << 40 }>)]
    pub max_retained_bytes: usize,
    /// Subscriptions one client may hold; more are refused in SUBACK (0x97; 3.1.1: 0x80).
    #[arg(long, default_value_t = DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT, value_parser = parse_size::<1, { 1 << 32 }>)]
    pub max_subscriptions_per_client: usize,
    /// Subscriptions held by all clients together; more are refused in SUBACK.
    #[arg(long, default_value_t = DEFAULT_MAX_SUBSCRIPTIONS, value_parser = parse_size::<1, { 1 << 40 }>)]
    pub max_subscriptions: usize,
    /// Bytes one client's subscriptions may hold (counted as held: each filter five times
    /// its length, plus 768 bytes per level and 512; `a/b/c/d` 3.6 KB); more are refused
    /// in SUBACK (0x97; 3.1.1: 0x80).
    #[arg(long, default_value_t = DEFAULT_MAX_SUBSCRIPTION_BYTES_PER_CLIENT, value_parser = parse_size::<4096, { 1 << 40 }>)]
    pub max_subscription_bytes_per_client: usize,
    /// Bytes subscriptions may hold, all clients together (counted as for one client); more
    /// are refused in SUBACK.
    #[arg(long, default_value_t = DEFAULT_MAX_SUBSCRIPTION_BYTES, value_parser = parse_size::<4096, { 1 << 44 }>)]
    pub max_subscription_bytes: usize,
    /// Topic prefix of the Response Information given to v5 clients that request it
    /// (`{prefix}/{client id}`); empty gives none.
    #[arg(long, default_value = "response")]
    pub response_prefix: String,
    /// Directory of the per-core logs of retained messages and persistent sessions;
    /// `none` keeps state in memory only.
    #[arg(long, default_value = "ringmq-data")]
    pub data_dir: String,
    /// Keep everything in memory (the same as --data-dir none).
    #[arg(long)]
    pub in_memory: bool,
    /// When log pages are flushed to the device: always (acknowledgements wait for it),
    /// interval:MS, or never (the kernel's writeback). Every mode survives a process crash.
    #[arg(long, default_value = "interval:1000")]
    pub fsync: FsyncMode,
    /// Largest size of a log segment file in bytes: a log's first segment is 1 MiB (or this,
    /// if smaller) and each next one twice the one before, up to this; a larger record gets a
    /// segment of its own size.
    #[arg(long, default_value_t = DEFAULT_SEGMENT_SIZE, value_parser = parse_size::<{ 64 * 1024 }, { 1 << 30 }>)]
    pub segment_size: usize,
    /// Compact a sealed log segment once less than this fraction of it is live.
    #[arg(long, default_value_t = 0.5)]
    pub compact_below: f64,
    /// Seconds between `$SYS` updates (0: no `$SYS` topics).
    #[arg(long, default_value_t = 10)]
    pub sys_interval: u64,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log line format on stderr: text (colour only on a terminal) or json (one object
    /// per line).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log every client connection and disconnection at info (client id, address,
    /// listener, protocol, reason).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub log_connections: bool,
    /// Address of the HTTP endpoint (Prometheus /metrics, the admin API under /api/v1,
    /// the dashboard at /), or `none`. Not loopback needs --http-token-file.
    #[arg(long, default_value = DEFAULT_HTTP_BIND, value_name = "ADDR|none")]
    pub http_bind: String,
    /// File holding the bearer token of the HTTP endpoint (its first line): required for
    /// the admin verbs (DELETE, POST) and, when --http-bind is not loopback, for every
    /// route but /healthz and the dashboard page.
    #[arg(long, value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,
    /// Joins a cluster whose control plane is this etcd: etcd://HOST:PORT[,HOST:PORT…].
    /// Needs --node-name and --node-bind. Without it the broker is a single node.
    #[arg(long, value_name = "etcd://HOST:PORT[,…]")]
    pub cluster: Option<String>,
    /// The cluster's name: its keys live under /ringmq/<name>/ in etcd.
    #[arg(long, default_value = "ringmq")]
    pub cluster_name: String,
    /// This node's name in the cluster (unique).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Address this node accepts links from the other nodes on.
    #[arg(long, value_name = "ADDR")]
    pub node_bind: Option<SocketAddr>,
    /// Address the other nodes dial to reach this one (default: --node-bind).
    #[arg(long, value_name = "ADDR")]
    pub node_advertise: Option<SocketAddr>,
    /// Seconds of the node's etcd lease: a node that cannot renew it closes its clients
    /// before it expires, and the others forget its routes when it does.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=600))]
    pub cluster_lease_ttl: u64,
    /// Bytes of messages a node holds for the other nodes, each way: out, the links'
    /// windows (unsent or unconfirmed, half of it) and what the cores handed the node
    /// bridge (the other half, shared by the cores); in, what came from the links and the
    /// cores have not applied (half, shared by the cores). Past a part, publishers that
    /// forward to other nodes pause, or the links are not read (TCP back-pressure).
    #[arg(long, default_value_t = 64 << 20, value_parser = parse_size::<{ 1 << 20 }, { 1 << 40 }>)]
    pub node_link_buffer: usize,
    /// Bytes of a session's messages (in flight, queued, in its log) a takeover moves to
    /// the other node in one part (it moves in parts, the next asked for once one is in
    /// place): smaller parts hold less at once on both nodes, larger ones take fewer round
    /// trips.
    #[arg(long, default_value_t = crate::config::DEFAULT_HANDOVER_PART, value_parser = parse_size::<1, { crate::config::MAX_HANDOVER_PART }>)]
    pub node_handover_part: usize,
    /// Prints the shard (of --cores) that owns each given client identifier or retained
    /// topic, one per line, and exits: for test scripts that place clients on shards.
    #[arg(long, hide = true, num_args = 1.., value_name = "ID")]
    pub owner_of: Vec<String>,
}

/// The command line and the `--config` file read together.
pub struct Loaded {
    pub cli: Cli,
    /// `--check-config`'s report: the effective settings as TOML.
    pub effective: String,
    /// Every listener: `--bind`'s (unless the file has listeners and no `bind`), then the
    /// file's.
    pub listeners: Vec<Listener>,
}

impl Cli {
    /// Parses `args` (the program name first) and the `--config` file they name: the
    /// file's keys become flags placed before the command line's, so the command line wins.
    /// Command-line errors exit as clap does (usage, code 2); file errors are returned.
    pub fn load(args: Vec<OsString>) -> Result<Loaded, file::ConfigFileError> {
        let command = <Cli as clap::CommandFactory>::command();
        let cli_matches = command.clone().try_get_matches_from(&args).unwrap_or_else(|e| e.exit());
        let mut file_args = file::FileArgs::default();
        if let Some(path) = cli_matches.get_one::<PathBuf>("config") {
            file_args = file::FileArgs::read(path, &command)?;
        }
        let mut all = Vec::with_capacity(args.len() + file_args.args.len());
        all.extend(args.first().cloned());
        all.extend(file_args.args.iter().cloned());
        all.extend(args.into_iter().skip(1));
        let matches = command.clone().try_get_matches_from(&all).unwrap_or_else(|e| e.exit());
        let from_cli =
            |id: &str| cli_matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        let effective = file::render_effective(&command, &matches, &file_args, from_cli);
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        // Listeners in the file replace the default `--bind` one unless `bind` is set too
        // (Mosquitto's rule for its default listener).
        let bind_set = from_cli("bind") || file_args.keys.iter().any(|k| k == "bind");
        let keep_bind = file_args.listeners.is_empty() || bind_set;
        let mut listeners = Vec::new();
        if keep_bind {
            listeners.push(Listener::tcp(cli.bind));
        }
        if let Some(bind) = cli.ws_bind {
            listeners.push(Listener {
                kind: ListenerKind::Ws,
                path: cli.ws_path.clone(),
                ..Listener::tcp(bind)
            });
        }
        for (bind, kind) in [(cli.tls_bind, ListenerKind::Tls), (cli.wss_bind, ListenerKind::Wss)] {
            let Some(bind) = bind else { continue };
            let (Some(cert), Some(key)) = (cli.tls_cert.clone(), cli.tls_key.clone()) else {
                return Err(file::ConfigFileError::Flags(format!(
                    "--{kind}-bind needs --tls-cert and --tls-key"
                )));
            };
            if cli.tls_require_client_cert && cli.tls_ca.is_none() {
                return Err(file::ConfigFileError::Flags("--tls-require-client-cert needs --tls-ca".into()));
            }
            let files = TlsFiles {
                cert,
                key,
                ca: cli.tls_ca.clone(),
                require_client_cert: cli.tls_require_client_cert,
            };
            listeners.push(Listener {
                kind,
                tls: Some(files),
                path: cli.ws_path.clone(),
                ..Listener::tcp(bind)
            });
        }
        listeners.extend(file_args.listeners.iter().cloned());
        let global = cli.auth_settings();
        for listener in &mut listeners {
            listener.inherit_auth(&global);
            let identity = listener.auth.identity.is_some_and(|i| i != CertIdentityKind::None);
            if identity && listener.tls.as_ref().is_none_or(|t| t.ca.is_none()) {
                return Err(file::ConfigFileError::Flags(format!(
                    "listener {}: certificate identity needs client certificates (`ca`, --tls-ca)",
                    listener.name()
                )));
            }
        }
        let mut effective = effective;
        for l in &file_args.listeners {
            effective.push_str(&format!(
                "\n[[listeners]]  # file\nkind = \"{}\"\nbind = \"{}\"\nproxy_protocol = {}\n",
                l.kind, l.bind, l.proxy_protocol,
            ));
            if l.max_connections != usize::MAX {
                effective.push_str(&format!("max_connections = {}\n", l.max_connections));
            }
            if l.kind.is_websocket() {
                effective.push_str(&format!("path = {:?}\n", l.path));
                if !l.allowed_origins.is_empty() {
                    effective.push_str(&format!("allowed_origins = {:?}\n", l.allowed_origins));
                }
            }
            if let Some(tls) = &l.tls {
                effective.push_str(&format!("cert = {:?}\nkey = {:?}\n", tls.cert, tls.key));
                if let Some(ca) = &tls.ca {
                    effective.push_str(&format!(
                        "ca = {ca:?}\nrequire_client_cert = {}\n",
                        tls.require_client_cert
                    ));
                }
            }
        }
        Ok(Loaded { cli, effective, listeners })
    }
}

impl Loaded {
    /// The broker's configuration: the flags' settings and every listener.
    pub fn into_config(self) -> Config {
        let mut config = self.cli.into_config();
        config.listeners = self.listeners;
        config
    }
}

impl Cli {
    pub fn into_config(self) -> Config {
        let auth = self.auth_settings();
        // Checked by `cluster_settings` before the broker starts.
        let cluster = self.cluster_settings().ok().flatten();
        let mut config = Config::new(self.bind);
        if let Some(cores) = self.cores {
            config.cores = cores;
        }
        config.read_buffer = self.read_buffer;
        config.write_buffer = self.write_buffer;
        config.max_packet_size = self.max_packet_size;
        config.max_connections = self.max_connections;
        config.io_memory = self.io_memory;
        config.connect_timeout = Duration::from_secs(self.connect_timeout);
        config.max_inflight = self.max_inflight;
        config.max_queued_messages = self.max_queued_messages;
        config.max_queued_bytes = self.max_queued_bytes;
        config.queue_qos0 = self.queue_qos0;
        config.max_spilled_bytes = self.max_spilled_bytes;
        config.max_disk_bytes = self.max_disk_bytes;
        config.queue_full_policy = self.queue_full_policy;
        config.qos0_overflow = self.qos0_overflow;
        config.slow_consumer_timeout = Duration::from_secs(self.slow_consumer_timeout);
        config.qos0_max_wait = Duration::from_millis(self.qos0_max_wait_ms);
        config.max_retained_messages = self.max_retained_messages;
        config.max_keep_alive = self.max_keepalive;
        config.max_topic_alias = self.max_topic_alias;
        config.receive_maximum = self.receive_maximum;
        config.sys_interval = Duration::from_secs(self.sys_interval);
        config.shared_strategy = self.shared_strategy;
        config.shared_ack_timeout = Duration::from_secs(self.shared_ack_timeout);
        config.max_sessions = self.max_sessions.max(1);
        config.max_session_expiry = self.max_session_expiry;
        config.max_topic_levels = self.max_topic_levels;
        config.write_timeout = Duration::from_secs(self.write_timeout);
        config.park_after = Duration::from_secs(self.park_after);
        config.mesh_backlog = self.mesh_backlog;
        config.mesh_max_wait = Duration::from_millis(self.mesh_max_wait_ms);
        config.max_retained_bytes = self.max_retained_bytes;
        config.max_subscriptions_per_client = self.max_subscriptions_per_client;
        config.max_subscriptions = self.max_subscriptions;
        config.max_subscription_bytes_per_client = self.max_subscription_bytes_per_client;
        config.max_subscription_bytes = self.max_subscription_bytes;
        config.response_prefix = (!self.response_prefix.is_empty()).then_some(self.response_prefix);
        config.data_dir = (!self.in_memory && self.data_dir != "none").then(|| PathBuf::from(self.data_dir));
        config.fsync = self.fsync;
        config.segment_size = self.segment_size;
        config.compact_below = self.compact_below.clamp(0.0, 1.0);
        config.acl_deny_action = self.acl_deny_action;
        config.takeover = self.takeover;
        config.log_connections = self.log_connections;
        config.http = match self.http_bind.as_str() {
            "none" | "" => None,
            // Checked by `http_settings` before the broker starts.
            text => text.parse().ok().map(|bind| HttpSettings {
                bind,
                token_file: self.http_token_file.clone(),
                required: text != DEFAULT_HTTP_BIND,
            }),
        };
        for listener in &mut config.listeners {
            listener.inherit_auth(&auth);
        }
        config.cluster = cluster;
        config
    }

    /// `--cluster` and the node's flags, read together.
    pub fn cluster_settings(&self) -> Result<Option<crate::config::ClusterSettings>, String> {
        let Some(url) = &self.cluster else { return Ok(None) };
        let etcd = crate::cluster::etcd::Endpoints::parse(url).map_err(|e| format!("--cluster {e}"))?;
        let node = self.node_name.clone().filter(|n| !n.is_empty()).ok_or("--cluster needs --node-name")?;
        if node.len() > 255 || node.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!(
                "--node-name {node:?}: at most 255 characters, no spaces or control characters"
            ));
        }
        let bind = self.node_bind.ok_or("--cluster needs --node-bind ADDR")?;
        let advertise = match self.node_advertise {
            Some(addr) => addr,
            None if bind.ip().is_unspecified() => {
                return Err(format!(
                    "--node-bind {bind} is every address: say which one others dial with --node-advertise"
                ))
            }
            None => bind,
        };
        Ok(Some(crate::config::ClusterSettings {
            etcd,
            name: self.cluster_name.clone(),
            node,
            bind,
            advertise,
            lease_ttl: Duration::from_secs(self.cluster_lease_ttl),
            link_buffer: self.node_link_buffer,
            handover_part: self.node_handover_part,
        }))
    }
}

impl Cli {
    /// Checks `--http-bind` and `--http-token-file` together.
    pub fn check_http(&self) -> Result<(), String> {
        if matches!(self.http_bind.as_str(), "none" | "") {
            return Ok(());
        }
        let bind: SocketAddr = self
            .http_bind
            .parse()
            .map_err(|e| format!("--http-bind {}: {e} (an address, or none)", self.http_bind))?;
        if !bind.ip().is_loopback() && self.http_token_file.is_none() {
            return Err(format!(
                "--http-bind {bind} is not a loopback address: the admin API needs --http-token-file there"
            ));
        }
        Ok(())
    }

    /// The authentication settings the command line gives every listener.
    pub fn auth_settings(&self) -> AuthSettings {
        AuthSettings {
            password_file: self.password_file.clone(),
            acl_file: self.acl_file.clone(),
            allow_anonymous: self.allow_anonymous,
            identity: self.tls_identity,
            jwt: match (&self.jwt_secret, &self.jwt_key) {
                (Some(secret), _) => Some(JwtKeySource::Secret(secret.clone())),
                (None, Some(path)) => Some(JwtKeySource::KeyFile(path.clone())),
                (None, None) => None,
            },
            jwt_username_claim: self.jwt_username_claim.clone(),
        }
    }
}

/// A byte count within `MIN..=MAX`.
fn parse_size<const MIN: usize, const MAX: usize>(text: &str) -> Result<usize, String> {
    let value: usize = text.parse().map_err(|e| format!("{e}"))?;
    if (MIN..=MAX).contains(&value) {
        Ok(value)
    } else {
        Err(format!("must be between {MIN} and {MAX}"))
    }
}
