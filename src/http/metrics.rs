//! The Prometheus text exposition (format 0.0.4) of the shards' metrics, pure: what the
//! shards answered in, text out. Names and their EMQX/VerneMQ counterparts are listed in
//! docs/OPERATIONS.md.

use std::fmt::Write;

use crate::broker::admin::{DropReason, LatencyHistogram, ShardMetrics, LATENCY_BUCKETS_US};

/// What the endpoint knows beside the shards' answers.
#[derive(Debug, Clone, Default)]
pub struct BrokerView {
    /// Every listener's name and its connections (all cores).
    pub listeners: Vec<(String, usize)>,
    pub retained_bytes: usize,
    pub uptime_seconds: u64,
    /// The same in milliseconds: a dashboard's rates divide by the broker's clock.
    pub uptime_ms: u64,
    pub ready: bool,
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// One value per core.
    fn per_core(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        shards: &[ShardMetrics],
        f: impl Fn(&ShardMetrics) -> f64,
    ) {
        self.family(name, kind, help);
        for m in shards {
            self.sample(name, &[("core", &m.core.to_string())], f(m));
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &LatencyHistogram) {
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS_US.iter().zip(h.counts) {
            cumulative += count;
            let le = format!("{}", *bound as f64 / 1e6);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &with_le, cumulative);
        }
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &with_le, h.count());
        self.sample(&format!("{name}_sum"), labels, h.sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), labels, h.count());
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

const QOS: [&str; 3] = ["0", "1", "2"];

/// The whole exposition.
pub fn render(shards: &[ShardMetrics], view: &BrokerView) -> String {
    let mut o = Out(String::with_capacity(16 * 1024));
    o.family("ringmq_info", "gauge", "The broker's version.");
    o.sample("ringmq_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    o.gauge("ringmq_uptime_seconds", "Seconds since the broker started.", view.uptime_seconds);
    o.gauge("ringmq_ready", "1 once every shard replayed its logs and listens.", u8::from(view.ready));

    o.family("ringmq_connections", "gauge", "Client connections open, per listener.");
    for (name, count) in &view.listeners {
        o.sample("ringmq_connections", &[("listener", name)], count);
    }
    o.per_core("ringmq_core_connections", "gauge", "Client connections served by each core.", shards, |m| {
        m.connections as f64
    });
    o.per_core("ringmq_connections_parked", "gauge", "Idle connections parked (no tasks).", shards, |m| {
        m.parked as f64
    });
    o.per_core("ringmq_connects_total", "counter", "CONNECTs accepted.", shards, |m| m.connects as f64);
    o.family("ringmq_connects_refused_total", "counter", "CONNECTs refused, per CONNACK reason.");
    for m in shards {
        for (reason, n) in &m.connects_refused {
            o.sample(
                "ringmq_connects_refused_total",
                &[("core", &m.core.to_string()), ("reason", reason)],
                n,
            );
        }
    }
    o.family("ringmq_disconnects_total", "counter", "Connections ended, per reason.");
    for m in shards {
        for (reason, n) in &m.disconnects {
            o.sample("ringmq_disconnects_total", &[("core", &m.core.to_string()), ("reason", reason)], n);
        }
    }
    o.per_core("ringmq_auth_failures_total", "counter", "Credentials that did not check out.", shards, |m| {
        m.auth_failures as f64
    });

    o.family("ringmq_sessions", "gauge", "Sessions, connected or offline (persistent).");
    let connected: usize = shards.iter().map(|m| m.sessions_connected).sum();
    let offline: usize = shards.iter().map(|m| m.sessions_offline).sum();
    o.sample("ringmq_sessions", &[("state", "connected")], connected);
    o.sample("ringmq_sessions", &[("state", "offline")], offline);
    o.gauge(
        "ringmq_subscriptions",
        "Subscriptions held.",
        shards.iter().map(|m| m.subscriptions).sum::<usize>(),
    );
    o.gauge(
        "ringmq_subscriptions_shared",
        "Shared subscriptions ($share/...) held.",
        shards.iter().map(|m| m.subscriptions_shared).sum::<usize>(),
    );

    for (name, help, pick) in [
        ("ringmq_messages_received_total", "PUBLISHes received (clients, wills, the admin API).", 0),
        ("ringmq_messages_sent_total", "PUBLISHes written to subscribers' connections.", 1),
    ] {
        o.family(name, "counter", help);
        for m in shards {
            let counts = if pick == 0 { m.received } else { m.sent };
            for (qos, n) in QOS.iter().zip(counts) {
                o.sample(name, &[("core", &m.core.to_string()), ("qos", qos)], n);
            }
        }
    }
    o.per_core("ringmq_bytes_received_total", "counter", "Bytes read from clients.", shards, |m| {
        m.bytes_received as f64
    });
    o.per_core("ringmq_bytes_sent_total", "counter", "Bytes written to clients.", shards, |m| {
        m.bytes_sent as f64
    });
    o.family("ringmq_messages_dropped_total", "counter", "Messages given up, per reason.");
    for m in shards {
        for (reason, n) in DropReason::ALL.iter().zip(m.dropped) {
            o.sample(
                "ringmq_messages_dropped_total",
                &[("core", &m.core.to_string()), ("reason", reason.label())],
                n,
            );
        }
    }

    o.gauge(
        "ringmq_retained_messages",
        "Retained messages stored.",
        shards.iter().map(|m| m.retained_messages).sum::<usize>(),
    );
    o.gauge("ringmq_retained_bytes", "Bytes of retained messages stored.", view.retained_bytes);
    o.per_core("ringmq_queued_messages", "gauge", "Messages waiting in sessions' queues.", shards, |m| {
        m.queued_messages as f64
    });
    o.per_core("ringmq_queued_bytes", "gauge", "Bytes waiting in sessions' queues.", shards, |m| {
        m.queued_bytes as f64
    });
    o.per_core(
        "ringmq_inflight_messages",
        "gauge",
        "QoS 1/2 messages sent and not yet acknowledged.",
        shards,
        |m| m.inflight as f64,
    );

    o.per_core("ringmq_log_bytes", "gauge", "Bytes of the core's log segments on disk.", shards, |m| {
        m.log_bytes as f64
    });
    o.per_core("ringmq_log_segments", "gauge", "Log segment files of the core.", shards, |m| {
        m.log_segments as f64
    });
    o.per_core("ringmq_log_compactions_total", "counter", "Log segments compacted.", shards, |m| {
        m.log_compactions as f64
    });
    o.family("ringmq_log_flush_duration_seconds", "histogram", "Time to flush the logs to the device.");
    for m in shards {
        o.histogram("ringmq_log_flush_duration_seconds", &[("core", &m.core.to_string())], &m.flush_latency);
    }
    o.family(
        "ringmq_delivery_latency_seconds",
        "histogram",
        "From a PUBLISH's arrival to its delivery to a subscriber's connection, one message in 128.",
    );
    for m in shards {
        o.histogram("ringmq_delivery_latency_seconds", &[("core", &m.core.to_string())], &m.delivery_latency);
    }

    o.family("ringmq_mesh_backlog_messages", "gauge", "Messages waiting to cross from one core to another.");
    for m in shards {
        for (to, messages, _) in &m.mesh_backlog {
            o.sample(
                "ringmq_mesh_backlog_messages",
                &[("from", &m.core.to_string()), ("to", &to.to_string())],
                messages,
            );
        }
    }
    o.family("ringmq_mesh_backlog_bytes", "gauge", "Bytes waiting to cross from one core to another.");
    for m in shards {
        for (to, _, bytes) in &m.mesh_backlog {
            o.sample(
                "ringmq_mesh_backlog_bytes",
                &[("from", &m.core.to_string()), ("to", &to.to_string())],
                bytes,
            );
        }
    }
    o.per_core("ringmq_core_tasks_run_total", "counter", "Tasks the core's executor ran.", shards, |m| {
        m.tasks_run as f64
    });
    o.per_core(
        "ringmq_core_busy_seconds_total",
        "counter",
        "Seconds the core's executor ran tasks.",
        shards,
        |m| m.busy_seconds,
    );
    o.per_core(
        "ringmq_core_busy_ratio",
        "gauge",
        "Fraction of the last second the core's executor was busy.",
        shards,
        |m| m.busy_ratio,
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn histograms_are_cumulative_with_inf() {
        let mut h = LatencyHistogram::default();
        h.record(10);
        h.record(100);
        h.record(10_000_000);
        let mut o = Out(String::new());
        o.histogram("t", &[], &h);
        assert!(o.0.contains("t_bucket{le=\"0.000016\"} 1\n"), "{}", o.0);
        assert!(o.0.contains("t_bucket{le=\"0.000128\"} 2\n"), "{}", o.0);
        assert!(o.0.contains("t_bucket{le=\"4.194304\"} 2\n"), "{}", o.0);
        assert!(o.0.contains("t_bucket{le=\"+Inf\"} 3\n"), "{}", o.0);
        assert!(o.0.contains("t_count 3\n"));
    }
}
