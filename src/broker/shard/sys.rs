//! `$SYS` topics and the gauges behind `Global::accounting`.

use super::*;

/// `$SYS`: shard 0 adds up every shard's counters.
pub struct Sys {
    /// Shard 0 only: the totals behind `$SYS`.
    pub(super) aggregator: Option<SysAggregator>,
    pub(super) next: Option<Instant>,
}

impl Sys {
    pub(super) fn new(shard: usize, shards: usize) -> Sys {
        Sys { aggregator: (shard == 0).then(|| SysAggregator::new(shards)), next: None }
    }
}

impl Shard {
    /// Writes this shard's gauges (`Global::accounting`).
    pub(super) fn measure(&self) {
        let Some(gauges) = self.global.gauges.get(self.id) else { return };
        let queues = self.sessions.values().map(Session::queued_bytes);
        let (queued, largest_queue) = queues.fold((0, 0), |(sum, max), b| (sum + b, max.max(b)));
        let outboxes = self.writers.values().map(|c| c.pending());
        let (outbox, largest_outbox) = outboxes.fold((0, 0), |(sum, max), b| (sum + b, max.max(b)));
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        gauges.queued_bytes.store(queued, relaxed);
        gauges.largest_queue_bytes.store(largest_queue, relaxed);
        gauges.outbox_bytes.store(outbox, relaxed);
        gauges.largest_outbox_bytes.store(largest_outbox, relaxed);
        gauges.mesh_bytes.store(self.peers.bytes.iter().sum(), relaxed);
        gauges.parked_connections.store(self.parked, relaxed);
        gauges.ticks.fetch_add(1, relaxed);
    }

    /// Once per `--sys-interval`: this shard's counters go to shard 0, which publishes
    /// the totals.
    pub(super) fn sys_tick(&mut self, now: Instant) {
        let interval = self.config.sys_interval;
        if interval.is_zero() {
            return;
        }
        let due = *self.sys.next.get_or_insert(now);
        if now < due {
            return;
        }
        self.sys.next = Some(now + interval);
        self.stats.bytes_sent = self.bytes_sent.get();
        let snapshot = SysSnapshot {
            shard: self.id,
            stats: self.stats.clone(),
            connected: self.conns.len(),
            parked: self.parked,
            sessions: self.sessions.len(),
            subscriptions: self.router.subscriptions.len(),
            retained: self.retained.store.len(),
        };
        if self.id != 0 {
            self.send_to(0, CrossMsg::Sys(Box::new(snapshot)));
            return;
        }
        let Some(sys) = self.sys.aggregator.as_mut() else { return };
        sys.record(snapshot);
        let mut topics = sys.topics(interval);
        // Per listener, by kind and address (`tcp:0.0.0.0:1883`): connections held now.
        for l in &self.global.listeners {
            let connected = l.connections.load(std::sync::atomic::Ordering::Relaxed);
            topics.push((format!("listeners/{}/clients/connected", l.name), connected.to_string()));
        }
        for (name, value) in topics {
            self.publish_sys(&format!("$SYS/broker/{name}"), value, true);
        }
    }

    pub(super) fn publish_sys(&mut self, topic: &str, value: String, retain: bool) {
        let Ok(topic) = TopicName::new(Bytes::from(topic.to_string())) else { return };
        let message =
            Message::new(topic, Bytes::from(value), QoS::AtMostOnce, retain, &codec::Properties::default());
        self.route(None, message, None);
    }

    /// `$SYS/broker/clients/<client id>/connected|disconnected`, not retained.
    pub(super) fn client_event(&mut self, client_id: &str, event: &str, version: ProtocolVersion) {
        if self.config.sys_interval.is_zero() {
            return;
        }
        let topic = format!("$SYS/broker/clients/{client_id}/{event}");
        // Cheap check that skips the event's work when nobody subscribes to it.
        let Ok(name) = TopicName::new(Bytes::from(topic.clone())) else { return };
        if !self.router.subscriptions.has_match(&name) && !self.router.interest.has_match(&name) {
            return;
        }
        let millis =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let payload = format!(
            "{{\"clientid\":{},\"proto_ver\":{},\"ts\":{millis}}}",
            json_string(client_id),
            version.level()
        );
        self.publish_sys(&topic, payload, false);
    }
}

/// A JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
