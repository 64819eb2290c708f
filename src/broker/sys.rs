//! `$SYS` topics, with the names Mosquitto users know. Every shard sends its counters to
//! shard 0 once per `--sys-interval`; shard 0 adds them up and publishes the totals as
//! retained messages, so a client subscribing to `$SYS/#` gets the latest values at once.
//! Client connect and disconnect events are published by the client's own shard, not
//! retained: `$SYS/broker/clients/<client id>/connected` and `.../disconnected` (EMQX has
//! the same events under `$SYS/brokers/<node>/clients/...`).

use std::time::{Duration, Instant};

use super::admin::LatencyHistogram;
use super::conn_handle::CloseCause;
use super::session::Delivery;
use crate::codec::ReasonCode;

/// Counters of one shard, summed across shards for `$SYS` and logs.
#[derive(Debug, Default, Clone)]
pub struct ShardStats {
    pub messages_received: u64,
    pub messages_sent: u64,
    pub messages_queued: u64,
    pub messages_dropped: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub forwarded: u64,
    pub retained_refused: u64,
    /// Subscribers made to pay for holding publishers back without progress.
    pub slow_consumers: u64,
    /// PUBLISHes, subscriptions and deliveries the ACL refused.
    pub acl_denied: u64,
    /// SUBSCRIBE filters the ACL refused (counted in `acl_denied` too; not messages).
    pub subscriptions_denied: u64,
    /// PUBLISHes received, per QoS.
    pub received_by_qos: [u64; 3],
    /// PUBLISHes no subscription matched.
    pub no_subscribers: u64,
    /// CONNECTs answered with a successful CONNACK.
    pub connects: u64,
    /// CONNECTs refused, per CONNACK reason code.
    pub refused: Vec<(ReasonCode, u64)>,
    /// Credentials that did not check out.
    pub auth_failures: u64,
    /// Connections ended, per [`CloseCause::label`].
    pub disconnects: Vec<(&'static str, u64)>,
    /// Log compaction passes that did work.
    pub compactions: u64,
    /// How long flushing the logs to the device took.
    pub flush_latency: LatencyHistogram,
}

impl ShardStats {
    pub fn count_refused(&mut self, reason: ReasonCode) {
        bump(&mut self.refused, reason);
    }

    pub fn count_disconnect(&mut self, cause: CloseCause) {
        bump(&mut self.disconnects, cause.label());
    }

    pub fn count(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Sent => self.messages_sent += 1,
            Delivery::Queued => self.messages_queued += 1,
            Delivery::Dropped => self.messages_dropped += 1,
            // Counted where its first copy was.
            Delivery::Duplicate => {}
        }
    }
}

/// Adds one to `key`'s count in a short list of (key, count).
fn bump<K: PartialEq>(counts: &mut Vec<(K, u64)>, key: K) {
    match counts.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => counts.push((key, 1)),
    }
}

/// One shard's counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct SysSnapshot {
    pub shard: usize,
    pub stats: ShardStats,
    pub connected: usize,
    /// Connected clients whose connections are parked (idle, no tasks).
    pub parked: usize,
    pub sessions: usize,
    pub subscriptions: usize,
    pub retained: usize,
}

/// Load averages the way Mosquitto computes them: an exponentially decaying average of
/// the per-minute rate over 1, 5 and 15 minutes.
#[derive(Debug, Clone, Default)]
struct Load {
    previous: Option<u64>,
    averages: [f64; 3],
}

impl Load {
    fn update(&mut self, total: u64, interval: Duration) {
        if let Some(previous) = self.previous {
            let per_minute = total.saturating_sub(previous) as f64 * 60.0 / interval.as_secs_f64().max(0.001);
            for (average, minutes) in self.averages.iter_mut().zip([1.0, 5.0, 15.0]) {
                let decay = (-interval.as_secs_f64() / (60.0 * minutes)).exp();
                *average = per_minute + decay * (*average - per_minute);
            }
        }
        self.previous = Some(total);
    }
}

/// Shard 0's view of the whole broker.
pub struct SysAggregator {
    started: Instant,
    latest: Vec<Option<SysSnapshot>>,
    maximum_connected: usize,
    received: Load,
    sent: Load,
}

impl SysAggregator {
    pub fn new(shards: usize) -> SysAggregator {
        SysAggregator {
            started: Instant::now(),
            latest: vec![None; shards],
            maximum_connected: 0,
            received: Load::default(),
            sent: Load::default(),
        }
    }

    pub fn record(&mut self, snapshot: SysSnapshot) {
        if let Some(slot) = self.latest.get_mut(snapshot.shard) {
            *slot = Some(snapshot);
        }
    }

    /// The `$SYS` topics and their values, totals first, then per shard.
    pub fn topics(&mut self, interval: Duration) -> Vec<(String, String)> {
        let all: Vec<&SysSnapshot> = self.latest.iter().flatten().collect();
        let sum = |f: &dyn Fn(&SysSnapshot) -> u64| all.iter().map(|s| f(s)).sum::<u64>();
        let connected = sum(&|s| s.connected as u64);
        self.maximum_connected = self.maximum_connected.max(connected as usize);
        let received = sum(&|s| s.stats.messages_received);
        let sent = sum(&|s| s.stats.messages_sent);
        self.received.update(received, interval);
        self.sent.update(sent, interval);
        let mut topics = vec![
            ("version".to_string(), format!("ringmq version {}", env!("CARGO_PKG_VERSION"))),
            ("uptime".to_string(), format!("{} seconds", self.started.elapsed().as_secs())),
            ("clients/connected".to_string(), connected.to_string()),
            ("clients/parked".to_string(), sum(&|s| s.parked as u64).to_string()),
            ("clients/total".to_string(), sum(&|s| s.sessions as u64).to_string()),
            (
                "clients/disconnected".to_string(),
                sum(&|s| (s.sessions - s.connected.min(s.sessions)) as u64).to_string(),
            ),
            ("clients/maximum".to_string(), self.maximum_connected.to_string()),
            ("messages/received".to_string(), received.to_string()),
            ("messages/sent".to_string(), sent.to_string()),
            ("messages/dropped".to_string(), sum(&|s| s.stats.messages_dropped).to_string()),
            ("clients/slow_consumers".to_string(), sum(&|s| s.stats.slow_consumers).to_string()),
            ("bytes/received".to_string(), sum(&|s| s.stats.bytes_received).to_string()),
            ("bytes/sent".to_string(), sum(&|s| s.stats.bytes_sent).to_string()),
            ("subscriptions/count".to_string(), sum(&|s| s.subscriptions as u64).to_string()),
            ("retained messages/count".to_string(), sum(&|s| s.retained as u64).to_string()),
            ("shards".to_string(), self.latest.len().to_string()),
        ];
        for (name, load) in [("received", &self.received), ("sent", &self.sent)] {
            for (average, window) in load.averages.iter().zip(["1min", "5min", "15min"]) {
                topics.push((format!("load/messages/{name}/{window}"), format!("{average:.2}")));
            }
        }
        for s in &all {
            let n = s.shard;
            topics.push((format!("shards/{n}/clients/connected"), s.connected.to_string()));
            topics.push((format!("shards/{n}/messages/received"), s.stats.messages_received.to_string()));
            topics.push((format!("shards/{n}/messages/sent"), s.stats.messages_sent.to_string()));
            topics.push((format!("shards/{n}/messages/dropped"), s.stats.messages_dropped.to_string()));
            topics.push((format!("shards/{n}/messages/forwarded"), s.stats.forwarded.to_string()));
        }
        topics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(shard: usize, connected: usize, received: u64) -> SysSnapshot {
        SysSnapshot {
            shard,
            stats: ShardStats { messages_received: received, ..ShardStats::default() },
            connected,
            parked: connected / 2,
            sessions: connected + 1,
            subscriptions: 3,
            retained: 2,
        }
    }

    fn value(topics: &[(String, String)], name: &str) -> String {
        topics.iter().find(|(t, _)| t == name).map(|(_, v)| v.clone()).unwrap_or_default()
    }

    #[test]
    fn totals_add_up_over_shards() {
        let mut sys = SysAggregator::new(2);
        sys.record(snapshot(0, 4, 10));
        sys.record(snapshot(1, 6, 32));
        let topics = sys.topics(Duration::from_secs(10));
        assert_eq!(value(&topics, "clients/connected"), "10");
        assert_eq!(value(&topics, "clients/parked"), "5");
        assert_eq!(value(&topics, "clients/total"), "12");
        assert_eq!(value(&topics, "clients/disconnected"), "2");
        assert_eq!(value(&topics, "messages/received"), "42");
        assert_eq!(value(&topics, "subscriptions/count"), "6");
        assert_eq!(value(&topics, "retained messages/count"), "4");
        assert_eq!(value(&topics, "shards/1/clients/connected"), "6");
        sys.record(snapshot(1, 1, 32));
        let topics = sys.topics(Duration::from_secs(10));
        assert_eq!(value(&topics, "clients/connected"), "5");
        assert_eq!(value(&topics, "clients/maximum"), "10");
    }

    #[test]
    fn load_average_follows_the_rate() {
        let mut load = Load::default();
        // 600 messages every 10 s is 3,600 a minute.
        for i in 0..200u64 {
            load.update(i * 600, Duration::from_secs(10));
        }
        assert!((load.averages[0] - 3600.0).abs() < 1.0, "{:?}", load.averages);
        assert!(load.averages[2] > 3000.0, "{:?}", load.averages);
    }
}
