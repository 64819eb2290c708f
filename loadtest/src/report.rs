//! The figures of a run and their three forms: a table on stdout, one JSON object
//! (`--json`), and the latency histogram as an HdrHistogram `.hgrm` text (`--hdr-out`).

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cli::{Command, Opts};
use crate::plan::{Group, Plan};
use crate::stats::{new_histogram, HIST_SIGFIG};

#[derive(Debug, Clone)]
pub struct BrokerFigures {
    pub pid: u32,
    pub cpu_s: f64,
    pub cpu_s_per_million: f64,
    pub rss_before_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_after_kib: u64,
    pub peak_rss_kib: u64,
    pub rss_per_conn_bytes: f64,
}

pub struct Results {
    pub command: &'static str,
    /// The endpoints of `--host`, comma-separated.
    pub target: String,
    /// Per group of clients, how many connect to which endpoint.
    pub placement: Vec<(Group, Vec<(String, u32)>)>,
    pub mqtt: u8,
    pub qos: u8,
    pub size: u32,
    pub rate: u64,
    pub inflight: u32,
    pub workers: usize,
    pub planned: usize,
    pub publishers: u32,
    pub subscribers: u32,
    pub pub_topic: String,
    pub sub_filter: String,

    pub connect_attempts: u64,
    pub connected: u64,
    pub connect_failed: u64,
    pub connect_refused: u64,
    pub subscribed: u64,
    pub subscribe_failed: u64,
    pub granted: [u64; 3],
    pub closed_by_broker: u64,
    pub protocol_errors: u64,
    pub up_after_setup: u64,
    pub setup_s: f64,
    pub setup_complete: bool,
    pub connect_rate: f64,

    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
    pub refused: u64,
    pub expected: u64,
    pub recv_load: u64,
    pub recv_drain: u64,
    pub unique: u64,
    pub dup: u64,
    pub out_of_order: u64,
    pub gaps: u64,
    pub lost: u64,
    pub foreign: u64,

    pub load_s: f64,
    pub drain_s: f64,
    pub drain_complete: bool,
    pub last_activity_after_stop_s: f64,
    pub wall_s: f64,
    pub self_cpu_s: f64,

    pub latency: Histogram<u64>,
    pub connect_latency: Histogram<u64>,
    pub broker: Option<BrokerFigures>,
    pub errors: Vec<(String, u64)>,
}

/// Percentiles reported, as quantiles.
const QUANTILES: [(&str, f64); 4] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl Results {
    pub fn new(command: &Command, o: &Opts, plan: &Plan, workers: usize) -> Results {
        Results {
            command: command.name(),
            target: plan.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            placement: plan
                .placement()
                .into_iter()
                .map(|(group, used)| {
                    (group, used.into_iter().map(|(node, n)| (plan.endpoints[node].to_string(), n)).collect())
                })
                .collect(),
            mqtt: if o.mqtt == 5 { 5 } else { 3 },
            qos: o.qos,
            size: o.size,
            rate: o.rate,
            inflight: o.inflight,
            workers,
            planned: plan.conns.len(),
            publishers: plan.publishers,
            subscribers: plan.subscribers,
            pub_topic: plan.pub_topic.clone(),
            sub_filter: plan.sub_filter.clone(),
            connect_attempts: 0,
            connected: 0,
            connect_failed: 0,
            connect_refused: 0,
            subscribed: 0,
            subscribe_failed: 0,
            granted: [0; 3],
            closed_by_broker: 0,
            protocol_errors: 0,
            up_after_setup: 0,
            setup_s: 0.0,
            setup_complete: false,
            connect_rate: 0.0,
            sent: 0,
            acked: 0,
            unacked: 0,
            refused: 0,
            expected: 0,
            recv_load: 0,
            recv_drain: 0,
            unique: 0,
            dup: 0,
            out_of_order: 0,
            gaps: 0,
            lost: 0,
            foreign: 0,
            load_s: 0.0,
            drain_s: 0.0,
            drain_complete: false,
            last_activity_after_stop_s: 0.0,
            wall_s: 0.0,
            self_cpu_s: 0.0,
            latency: new_histogram(),
            connect_latency: new_histogram(),
            broker: None,
            errors: Vec::new(),
        }
    }

    fn delivered(&self) -> u64 {
        self.recv_load + self.recv_drain
    }

    fn per_s(&self, n: u64) -> f64 {
        if self.load_s > 0.0 {
            n as f64 / self.load_s
        } else {
            0.0
        }
    }

    /// Messages handled by this process per second of its CPU: sends plus deliveries.
    fn self_cpu_per_million(&self) -> f64 {
        let msgs = self.sent + self.delivered();
        if msgs > 0 {
            self.self_cpu_s / (msgs as f64 / 1e6)
        } else {
            0.0
        }
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<28} {v}");
        };
        row("command", format!("{} → {} (MQTT {}, QoS {})", self.command, self.target, self.mqtt, self.qos));
        row(
            "clients",
            format!(
                "{} planned: {} publishers, {} subscribers; {} workers",
                self.planned, self.publishers, self.subscribers, self.workers
            ),
        );
        // With one endpoint (no comma in the list) the command row says it all.
        if self.target.contains(',') {
            let groups: Vec<String> = self
                .placement
                .iter()
                .map(|(group, used)| {
                    let on: Vec<String> = used.iter().map(|(e, n)| format!("{n} on {e}")).collect();
                    format!("{} {}", group.name(), on.join(", "))
                })
                .collect();
            row("placement", groups.join("; "));
        }
        if !self.pub_topic.is_empty() || !self.sub_filter.is_empty() {
            row("topics", format!("publish {:?}, subscribe {:?}", self.pub_topic, self.sub_filter));
        }
        row(
            "connections",
            format!(
                "{} connected of {} attempts; {} failed, {} refused; {} up after set-up ({:.2} s{})",
                self.connected,
                self.connect_attempts,
                self.connect_failed,
                self.connect_refused,
                self.up_after_setup,
                self.setup_s,
                if self.setup_complete { "" } else { ", set-up timed out" }
            ),
        );
        row(
            "connect rate",
            format!(
                "{:.0} conn/s; CONNACK p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                self.connect_rate,
                ms(self.connect_latency.value_at_quantile(0.5)),
                ms(self.connect_latency.value_at_quantile(0.99)),
                ms(self.connect_latency.max())
            ),
        );
        if self.subscribers > 0 {
            row(
                "subscriptions",
                format!(
                    "{} granted (QoS 0/1/2: {}/{}/{}), {} failed",
                    self.subscribed, self.granted[0], self.granted[1], self.granted[2], self.subscribe_failed
                ),
            );
        }
        row(
            "errors",
            format!("{} closed by broker, {} protocol errors", self.closed_by_broker, self.protocol_errors),
        );
        if self.publishers > 0 || self.command == "sub" {
            row(
                "sent",
                format!(
                    "{} in {:.2} s = {:.0} msg/s ({} B payload)",
                    self.sent,
                    self.load_s,
                    self.per_s(self.sent),
                    self.size
                ),
            );
            if self.qos > 0 {
                row(
                    "acked",
                    format!("{} ({} refused, {} never acked)", self.acked, self.refused, self.unacked),
                );
            }
            // Delivery figures only where something in this process receives.
            let receives = self.subscribers > 0;
            if receives {
                row(
                    "received",
                    format!(
                        "{} = {} during load ({:.0} msg/s) + {} during drain",
                        self.delivered(),
                        self.recv_load,
                        self.per_s(self.recv_load),
                        self.recv_drain
                    ),
                );
                if self.expected > 0 {
                    row("expected", format!("{}", self.expected));
                }
                row(
                    "lost / dup / out-of-order",
                    format!(
                        "{} / {} / {}  (foreign {})",
                        self.lost, self.dup, self.out_of_order, self.foreign
                    ),
                );
            }
            row(
                "drain",
                format!(
                    "{:.3} s{}; last delivery or ack {:.3} s after publishing stopped",
                    self.drain_s,
                    if self.drain_complete { " (complete)" } else { " (timed out)" },
                    self.last_activity_after_stop_s
                ),
            );
            let h = &self.latency;
            if receives && h.is_empty() {
                row("latency", "no samples".into());
            } else if receives {
                let mut v = String::new();
                for (name, q) in QUANTILES {
                    let _ = write!(v, "{name} {:.3}  ", ms(h.value_at_quantile(q)));
                }
                let _ =
                    write!(v, "max {:.3}  mean {:.3} ms ({} samples)", ms(h.max()), h.mean() / 1e6, h.len());
                row("latency (ms)", v);
            }
        }
        if let Some(b) = &self.broker {
            row(
                "broker CPU",
                format!(
                    "{:.2} s ({:.3} s per million delivered), pid {}",
                    b.cpu_s, b.cpu_s_per_million, b.pid
                ),
            );
            row(
                "broker RSS",
                format!(
                    "{:.1} MiB before, {:.1} MiB connected, peak {:.1} MiB; {:.0} B per connection",
                    b.rss_before_kib as f64 / 1024.0,
                    b.rss_connected_kib as f64 / 1024.0,
                    b.peak_rss_kib as f64 / 1024.0,
                    b.rss_per_conn_bytes
                ),
            );
        }
        row(
            "load generator CPU",
            format!(
                "{:.2} s in {:.2} s wall ({:.0}% of one core; {:.3} s per million sent+received)",
                self.self_cpu_s,
                self.wall_s,
                100.0 * self.self_cpu_s / self.wall_s.max(1e-9),
                self.self_cpu_per_million()
            ),
        );
        for (text, n) in self.errors.iter().take(8) {
            row("error", format!("{n} × {text}"));
        }
        t
    }

    pub fn json(&self) -> Value {
        let hist = |h: &Histogram<u64>| {
            let mut v = json!({
                "count": h.len(),
                "min_ms": ms(h.min()),
                "mean_ms": if h.is_empty() { 0.0 } else { h.mean() / 1e6 },
                "max_ms": ms(h.max()),
            });
            for (name, q) in QUANTILES {
                v[format!("{name}_ms")] = json!(ms(h.value_at_quantile(q)));
            }
            v
        };
        let broker = self.broker.as_ref().map(|b| {
            json!({
                "pid": b.pid,
                "cpu_s": b.cpu_s,
                "cpu_s_per_million_delivered": b.cpu_s_per_million,
                "rss_before_kib": b.rss_before_kib,
                "rss_connected_kib": b.rss_connected_kib,
                "rss_after_kib": b.rss_after_kib,
                "peak_rss_kib": b.peak_rss_kib,
                "rss_per_connection_bytes": b.rss_per_conn_bytes,
            })
        });
        let mut placement = serde_json::Map::new();
        for (group, used) in &self.placement {
            let used = used.iter().map(|(e, n)| json!({"endpoint": e, "clients": n})).collect::<Vec<_>>();
            placement.insert(group.name().to_string(), used.into());
        }
        json!({
            "command": self.command,
            "target": self.target,
            "placement": placement,
            "mqtt": self.mqtt,
            "qos": self.qos,
            "payload_bytes": self.size,
            "rate_per_publisher": self.rate,
            "inflight": self.inflight,
            "workers": self.workers,
            "connections_planned": self.planned,
            "publishers": self.publishers,
            "subscribers": self.subscribers,
            "publish_topic": self.pub_topic,
            "subscribe_filter": self.sub_filter,
            "connect_attempts": self.connect_attempts,
            "connected": self.connected,
            "connect_failed": self.connect_failed,
            "connect_refused": self.connect_refused,
            "up_after_setup": self.up_after_setup,
            "setup_s": self.setup_s,
            "setup_complete": self.setup_complete,
            "connect_rate_per_s": self.connect_rate,
            "connect_latency": hist(&self.connect_latency),
            "subscribed": self.subscribed,
            "subscribe_failed": self.subscribe_failed,
            "granted_qos": self.granted,
            "closed_by_broker": self.closed_by_broker,
            "protocol_errors": self.protocol_errors,
            "sent": self.sent,
            "acked": self.acked,
            "refused": self.refused,
            "unacked": self.unacked,
            "expected": self.expected,
            "received": self.delivered(),
            "received_during_load": self.recv_load,
            "received_during_drain": self.recv_drain,
            "unique": self.unique,
            "lost": self.lost,
            "duplicates": self.dup,
            "out_of_order": self.out_of_order,
            "gaps": self.gaps,
            "foreign": self.foreign,
            "load_s": self.load_s,
            "publish_rate_per_s": self.per_s(self.sent),
            "receive_rate_per_s": self.per_s(self.recv_load),
            "drain_s": self.drain_s,
            "drain_complete": self.drain_complete,
            "last_activity_after_stop_s": self.last_activity_after_stop_s,
            "latency": hist(&self.latency),
            "broker": broker,
            "loadgen_cpu_s": self.self_cpu_s,
            "loadgen_wall_s": self.wall_s,
            "loadgen_cpu_s_per_million_msgs": self.self_cpu_per_million(),
            "errors": self.errors.iter().map(|(t, n)| json!({"error": t, "count": n})).collect::<Vec<_>>(),
        })
    }
}

/// Writes `hist` (ns) as HdrHistogram's percentile distribution text, in microseconds.
pub fn write_hgrm(hist: &Histogram<u64>, path: &Path) -> io::Result<()> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let us = |ns: u64| ns as f64 / 1e3;
    let mut count = 0u64;
    for v in hist.iter_quantiles(5) {
        count += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{:>12.3} {:>2.12} {:>10} {:>14.2}",
                us(v.value_iterated_to()),
                q,
                count,
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{:>12.3} {:>2.12} {:>10}", us(v.value_iterated_to()), q, count);
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        if hist.is_empty() { 0.0 } else { hist.mean() / 1e3 },
        if hist.is_empty() { 0.0 } else { hist.stdev() / 1e3 }
    );
    let _ = writeln!(out, "#[Max     = {:>12.3}, Total count    = {:>12}]", us(hist.max()), hist.len());
    let sub_buckets = (2 * 10u32.pow(u32::from(HIST_SIGFIG))).next_power_of_two();
    let _ = writeln!(out, "#[Buckets = {:>12}, SubBuckets     = {:>12}]", hist.buckets(), sub_buckets);
    std::fs::write(path, out)
}
