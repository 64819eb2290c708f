//! Command-line flags (clap derive). Names follow emqtt-bench where it has one.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ringmq-loadtest",
    about = "MQTT load generator: drives any MQTT 3.1.1/5.0 broker and measures loss, \
             duplicates, ordering, end-to-end latency and the broker's CPU and memory."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open `--clients` connections at `--connect-rate` and hold them for `--duration`;
    /// reports the connect rate achieved, CONNECT→CONNACK latency and failures.
    Conn(Opts),
    /// `--clients` publishers on `--topic` (default `lt/%i`); no receiving side.
    Pub(Opts),
    /// `--clients` subscribers on `--topic` (default `lt/#`); counts what arrives from
    /// `pub` runs of this tool (another process on the same host: the timestamps are
    /// CLOCK_MONOTONIC, so latency is measured too).
    Sub(Opts),
    /// `--clients` publishers on distinct topics (`lt/fanin/%i`) → one subscriber on the
    /// wildcard (`%i` replaced by `+`).
    Fanin(Opts),
    /// `--publishers` publishers → `--subscribers` (default: `--clients`) subscribers,
    /// all on one topic (`lt/fanout`). Every subscriber should get every message.
    Fanout(Opts),
    /// `--clients` publisher/subscriber pairs, pair i on its own topic (`lt/p2p/%i`).
    P2p(Opts),
    /// `--clients` publishers (`lt/shared/%i`) → `--subscribers` (default 2) members of
    /// one shared subscription `$share/<group>/lt/shared/+`. Each message should reach
    /// exactly one member: loss and duplicates are counted across the group.
    Sharedsub(Opts),
}

impl Command {
    pub fn opts(&self) -> &Opts {
        match self {
            Command::Conn(o)
            | Command::Pub(o)
            | Command::Sub(o)
            | Command::Fanin(o)
            | Command::Fanout(o)
            | Command::P2p(o)
            | Command::Sharedsub(o) => o,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Conn(_) => "conn",
            Command::Pub(_) => "pub",
            Command::Sub(_) => "sub",
            Command::Fanin(_) => "fanin",
            Command::Fanout(_) => "fanout",
            Command::P2p(_) => "p2p",
            Command::Sharedsub(_) => "sharedsub",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Opts {
    /// Broker endpoints, comma-separated, one per cluster node: `HOST` or `HOST:PORT`
    /// (IPv6: `[ADDR]:PORT`). Clients are spread over them (--pub-nodes, --sub-nodes).
    #[arg(
        short = 'H',
        long,
        visible_alias = "hosts",
        default_value = "127.0.0.1",
        value_name = "HOST[:PORT],..."
    )]
    pub host: String,

    /// Broker TCP port of the --host entries that do not give their own.
    #[arg(short, long, default_value_t = 1883)]
    pub port: u16,

    /// Hosts the publishers connect to: indexes into --host (0 is the first),
    /// comma-separated; publisher i goes to the (i mod n)-th of them. Default: every host.
    #[arg(long, value_delimiter = ',', value_name = "INDEX,...")]
    pub pub_nodes: Vec<usize>,

    /// Hosts the subscribers connect to, as --pub-nodes. Default: every host. Idle
    /// connections (conn) go round-robin over every host.
    #[arg(long, value_delimiter = ',', value_name = "INDEX,...")]
    pub sub_nodes: Vec<usize>,

    /// Number of clients: connections (conn), publishers (pub, fanin, sharedsub),
    /// subscribers (sub, fanout unless --subscribers), pairs (p2p).
    #[arg(short = 'c', long = "clients", default_value_t = 10)]
    pub clients: u32,

    /// Publishers in fanout.
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,

    /// Subscribers in fanout (default: --clients) or members of the shared group in
    /// sharedsub (default: 2).
    #[arg(long)]
    pub subscribers: Option<u32>,

    /// QoS of publishes and subscriptions.
    #[arg(short, long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,

    /// Payload size in bytes; at least 16 (send timestamp, publisher id, sequence number).
    #[arg(short, long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=16_000_000))]
    pub size: u32,

    /// Messages per second per publisher. 0: as fast as the in-flight window allows
    /// (QoS 1/2) or the socket accepts (QoS 0).
    #[arg(short = 'r', long, default_value_t = 1000)]
    pub rate: u64,

    /// Most unacknowledged QoS 1/2 messages per publisher (1..=65535).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub inflight: u32,

    /// Seconds of load (publishing, or holding connections in `conn`), counted from the
    /// moment every client is connected and subscribed.
    #[arg(short, long, default_value_t = 10)]
    pub duration: u64,

    /// Seconds to wait after publishing stops for in-flight deliveries and acks.
    #[arg(long, default_value_t = 5)]
    pub drain_timeout: u64,

    /// Topic pattern; `%i` is the client index (publishers), replaced by `+` in the
    /// subscriber's filter for fanin and sharedsub. Defaults depend on the command.
    #[arg(short, long)]
    pub topic: Option<String>,

    /// Shared subscription group name (sharedsub).
    #[arg(long, default_value = "lt")]
    pub group: String,

    /// MQTT protocol version: 3 (3.1.1) or 5.
    #[arg(short = 'V', long = "mqtt", default_value_t = 5, value_parser = clap::value_parser!(u8).range(3..=5))]
    pub mqtt: u8,

    /// Keep-alive in seconds sent in CONNECT; a PINGREQ is sent when the connection has
    /// been quiet for half of it. 0 disables keep-alive.
    #[arg(short, long, default_value_t = 60)]
    pub keepalive: u16,

    /// Subscribers keep persistent sessions: clean start off and, for MQTT 5, this Session
    /// Expiry Interval in seconds (3.1.1: clean session 0). 0 (default): clean sessions.
    #[arg(long, default_value_t = 0)]
    pub session_expiry: u32,

    /// New connections per second (0: all at once).
    #[arg(short = 'R', long, default_value_t = 2000)]
    pub connect_rate: u64,

    /// MQTT over TLS: every connection does a full handshake (counted in connecting);
    /// needs --ca.
    #[arg(long, requires = "ca")]
    pub tls: bool,

    /// PEM file of the certificate authorities the broker's certificate is checked against.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// MQTT over WebSocket (with --tls: wss): every connection upgrades first.
    #[arg(long)]
    pub ws: bool,

    /// Request path of the WebSocket endpoint.
    #[arg(long, default_value = "/mqtt")]
    pub ws_path: String,

    /// Name the broker's certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    pub tls_server_name: String,

    /// Seconds to wait for one CONNACK (or SUBACK) before counting a failure.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,

    /// Worker threads, each multiplexing its share of the connections (default: CPUs).
    #[arg(short, long)]
    pub workers: Option<usize>,

    /// Client identifier prefix; the id is `<prefix><role><index>`
    /// (default `lt-<pid>-`).
    #[arg(long)]
    pub client_prefix: Option<String>,

    /// Write every figure of the summary as one JSON object to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write the end-to-end latency histogram to this file (HdrHistogram `.hgrm`
    /// percentile distribution, in microseconds).
    #[arg(long)]
    pub hdr_out: Option<PathBuf>,

    /// Sample this broker process's CPU (/proc/PID/stat) and RSS (/proc/PID/status)
    /// during the run.
    #[arg(long)]
    pub broker_pid: Option<u32>,

    /// No live line on stderr.
    #[arg(long)]
    pub quiet: bool,
}
