//! What the HTTP endpoint asks of a shard ([`AdminRequest`]), answered from the shard's
//! own state on its own core: metrics, client and subscription listings, kicks, retained
//! messages, publishes as the broker. The requests arrive on a channel of their own, and
//! their task yields between them: an operator's query waits behind the core's clients,
//! not the other way round.

use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};

use super::*;
use crate::broker::admin::{
    AdminAnswer, AdminEnvelope, AdminReply, AdminRequest, ClientDetail, ClientInfo, ClientQuery, DropReason,
    RetainedInfo, ShardMetrics, SubscriptionInfo, SubscriptionQuery,
};
use crate::broker::core_counters;
use crate::broker::session::Subscription;

/// Retained messages fetched per store call while listing.
const LIST_PAGE: usize = 1024;

/// The executor's busy time as the shard's tick last measured it.
#[derive(Debug, Default)]
pub struct ExecutorUsage {
    pub busy: Duration,
    pub tasks: u64,
    pub ratio: f64,
    last: Option<Instant>,
}

impl ExecutorUsage {
    /// Adds what the executor did since the last call (glommio hands its counts out once).
    pub fn measure(&mut self, now: Instant) {
        let stats = glommio::executor().executor_stats();
        self.busy += stats.total_runtime();
        self.tasks += stats.tasks_executed();
        if let Some(last) = self.last {
            let wall = now.duration_since(last).as_secs_f64();
            if wall > 0.0 {
                self.ratio = (stats.total_runtime().as_secs_f64() / wall).min(1.0);
            }
        }
        self.last = Some(now);
    }
}

/// Answers the HTTP endpoint's requests, one at a time, until its channel closes.
pub async fn run_admin(
    shard: ShardRef,
    requests: ConnectedReceiver<AdminEnvelope>,
    replies: ConnectedSender<AdminAnswer>,
) {
    while let Some(AdminEnvelope { id, request }) = requests.recv().await {
        let reply = shard.borrow_mut().answer(request);
        if replies.send(AdminAnswer { id, reply }).await.is_err() {
            return;
        }
        glommio::yield_if_needed().await;
    }
}

impl Shard {
    pub fn answer(&mut self, request: AdminRequest) -> AdminReply {
        match request {
            AdminRequest::Metrics => AdminReply::Metrics(Box::new(self.metrics())),
            AdminRequest::Clients(query) => {
                let (count, first) = self.list_clients(&query);
                AdminReply::Clients { count, first }
            }
            AdminRequest::Client(id) => AdminReply::Client(self.client_detail(&id).map(Box::new)),
            AdminRequest::Kick { client_id, discard } => AdminReply::Kicked(self.kick(&client_id, discard)),
            AdminRequest::Subscriptions(query) => {
                let (count, first) = self.list_subscriptions(&query);
                AdminReply::Subscriptions { count, first }
            }
            AdminRequest::Retained { filter, want } => match TopicFilter::new(filter.into_bytes()) {
                Ok(filter) => {
                    let (count, first) = self.list_retained(&filter, want);
                    AdminReply::Retained { count, first }
                }
                Err(_) => AdminReply::Retained { count: 0, first: Vec::new() },
            },
            AdminRequest::DeleteRetained(topic) => AdminReply::Deleted(self.delete_retained(&topic)),
            AdminRequest::Publish { topic, payload, qos, retain } => {
                AdminReply::Published(self.publish_as_broker(topic, payload, qos, retain))
            }
        }
    }

    /// The shard's counters and gauges now.
    pub fn metrics(&mut self) -> ShardMetrics {
        self.stats.bytes_sent = self.bytes_sent.get();
        let (sent, mut dropped, delivery_latency) = core_counters::read();
        dropped[DropReason::NoSubscribers as usize] += self.stats.no_subscribers;
        // Messages the ACL stopped (publishes, deliveries, wills); refused filters are not.
        dropped[DropReason::NotAuthorized as usize] +=
            self.stats.acl_denied - self.stats.subscriptions_denied;
        let mut m = ShardMetrics {
            core: self.id,
            connections: self.conns.len(),
            parked: self.parked,
            connects: self.stats.connects,
            connects_refused: self.stats.refused.iter().map(|(r, n)| (reason_label(*r), *n)).collect(),
            disconnects: self.stats.disconnects.clone(),
            auth_failures: self.stats.auth_failures,
            subscriptions: self.router.subscriptions.len(),
            received: self.stats.received_by_qos,
            sent,
            bytes_received: self.stats.bytes_received,
            bytes_sent: self.stats.bytes_sent,
            dropped,
            retained_messages: self.retained.store.len(),
            log_compactions: self.stats.compactions,
            flush_latency: self.stats.flush_latency.clone(),
            delivery_latency,
            tasks_run: self.usage.tasks,
            busy_seconds: self.usage.busy.as_secs_f64(),
            busy_ratio: self.usage.ratio,
            ..ShardMetrics::default()
        };
        for session in self.sessions.values() {
            if session.is_attached() {
                m.sessions_connected += 1;
            } else {
                m.sessions_offline += 1;
            }
            let (queued, inflight) = session.backlog();
            m.queued_messages += queued;
            m.inflight += inflight;
            m.queued_bytes += session.queued_bytes();
            m.subscriptions_shared += session.subscriptions.keys().filter(|f| is_shared(f.as_str())).count();
        }
        // The router's tree holds the plain ones; shared ones live with their groups.
        m.subscriptions += m.subscriptions_shared;
        let (mut bytes, mut segments) = self.retained.store.disk_usage();
        if let Some(log) = &self.sessions.log {
            let (b, s) = log.borrow().disk_usage();
            bytes += b;
            segments += s;
        }
        m.log_bytes = bytes;
        m.log_segments = segments;
        m.mesh_backlog = (0..self.shard_count)
            .filter(|peer| *peer != self.id)
            .map(|peer| (peer, self.peers.outbox[peer].len(), self.peers.bytes[peer]))
            .collect();
        m
    }

    fn client_info(&self, entry: &sessions::SessionEntry) -> ClientInfo {
        let session = &entry.session;
        let (queued, inflight) = session.backlog();
        let conn = entry.conn.as_deref();
        let username = conn
            .and_then(|c| c.meta.username.as_deref())
            .or_else(|| entry.auth.as_ref().and_then(|a| a.username.as_deref()));
        ClientInfo {
            client_id: session.client_id.to_string(),
            username: username.map(str::to_string),
            connected: conn.is_some(),
            address: conn.map(|c| c.meta.peer.to_string()),
            listener: conn.and_then(|c| c.meta.listener.as_ref()).map(|l| l.name.to_string()),
            protocol: conn.map_or(session.version, |c| c.version).name(),
            core: self.id,
            subscriptions: session.subscriptions.len(),
            inflight,
            queued,
        }
    }

    /// How many sessions match, and the first `want` of them by client identifier.
    fn list_clients(&self, query: &ClientQuery) -> (usize, Vec<ClientInfo>) {
        let mut matching: Vec<&sessions::SessionEntry> = self
            .sessions
            .entries()
            .filter(|e| query.prefix.as_deref().is_none_or(|p| e.session.client_id.starts_with(p)))
            .filter(|e| {
                query.username.as_deref().is_none_or(|u| {
                    let conn_user = e.conn.as_ref().and_then(|c| c.meta.username.as_deref());
                    let auth_user = e.auth.as_ref().and_then(|a| a.username.as_deref());
                    conn_user.or(auth_user) == Some(u)
                })
            })
            .collect();
        let count = matching.len();
        first_sorted(&mut matching, query.want, |e| &*e.session.client_id);
        (count, matching.into_iter().map(|e| self.client_info(e)).collect())
    }

    fn client_detail(&self, client_id: &str) -> Option<ClientDetail> {
        let sid = self.sessions.of_client(client_id)?;
        let entry = self.sessions.entry(&sid)?;
        let session = &entry.session;
        let mut subscriptions: Vec<SubscriptionInfo> =
            session.subscriptions.iter().map(|(f, s)| self.subscription_info(client_id, f, s)).collect();
        subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
        let conn = entry.conn.as_deref();
        Some(ClientDetail {
            info: self.client_info(entry),
            keep_alive: conn.map(|c| c.meta.keep_alive),
            connected_at: conn.map(|c| u64::from(c.meta.connected_at)),
            expiry_interval: session.is_persistent().then_some(session.expiry_interval),
            queued_bytes: session.queued_bytes(),
            subscriptions,
        })
    }

    fn subscription_info(
        &self,
        client_id: &str,
        filter: &TopicFilter,
        sub: &Subscription,
    ) -> SubscriptionInfo {
        let text = filter.as_str();
        let group = text.strip_prefix("$share/").and_then(|rest| rest.split('/').next()).map(str::to_string);
        SubscriptionInfo {
            client_id: client_id.to_string(),
            filter: text.to_string(),
            group,
            qos: sub.options.qos as u8,
            no_local: sub.options.no_local,
            retain_as_published: sub.options.retain_as_published,
            retain_handling: sub.options.retain_handling,
            core: self.id,
        }
    }

    /// Closes the client's connection as an administrative action (its will is published,
    /// as for any end the client did not ask for); `discard` also ends its session.
    /// Whether anything was done: false for an unknown client, and for an offline session
    /// kept.
    pub fn kick(&mut self, client_id: &str, discard: bool) -> bool {
        let Some(sid) = self.sessions.of_client(client_id) else { return false };
        let conn = self.sessions.entry(&sid).and_then(|e| e.conn.clone());
        let connected = conn.is_some();
        if let Some(conn) = conn {
            tracing::info!(client_id, "kicked by an operator");
            self.end_connection(sid, &conn, ReasonCode::AdministrativeAction);
            self.client_event(client_id, "disconnected", conn.version);
        }
        if discard && self.sessions.contains_key(&sid) {
            self.end_session(sid);
            return true;
        }
        connected
    }

    fn list_subscriptions(&self, query: &SubscriptionQuery) -> (usize, Vec<SubscriptionInfo>) {
        let mut matching: Vec<(&str, &TopicFilter, &Subscription)> = Vec::new();
        let sessions: Box<dyn Iterator<Item = &Session>> = match &query.client_id {
            Some(id) => {
                Box::new(self.sessions.of_client(id).and_then(|sid| self.sessions.get(&sid)).into_iter())
            }
            None => Box::new(self.sessions.values()),
        };
        for session in sessions {
            for (filter, sub) in session.subscriptions.iter() {
                if query.filter.as_deref().is_none_or(|f| f == filter.as_str()) {
                    matching.push((&session.client_id, filter, sub));
                }
            }
        }
        let count = matching.len();
        first_sorted_by(&mut matching, query.want, |a, b| (a.0, a.1.as_str()).cmp(&(b.0, b.1.as_str())));
        (count, matching.into_iter().map(|(id, f, s)| self.subscription_info(id, f, s)).collect())
    }

    /// How many retained messages of this partition match, and the first `want` by topic.
    fn list_retained(&self, filter: &TopicFilter, want: usize) -> (usize, Vec<RetainedInfo>) {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let mut page = Vec::new();
            let next = self.retained.store.matching(filter, after.as_ref(), LIST_PAGE, &mut page);
            all.extend(page);
            match next {
                Some(topic) => after = Some(topic),
                None => break,
            }
        }
        let count = all.len();
        first_sorted(&mut all, want, |m| m.topic.as_str());
        let first = all
            .into_iter()
            .map(|m| RetainedInfo {
                topic: m.topic.as_str().to_string(),
                qos: m.qos as u8,
                payload: m.payload,
            })
            .collect();
        (count, first)
    }

    /// Removes a retained message without delivering anything; whether there was one.
    fn delete_retained(&mut self, topic: &str) -> bool {
        let Ok(name) = TopicName::new(Bytes::copy_from_slice(topic.as_bytes())) else { return false };
        let Ok(exact) = TopicFilter::new(Bytes::copy_from_slice(topic.as_bytes())) else { return false };
        let mut found = Vec::new();
        self.retained.store.matching(&exact, None, 1, &mut found);
        if found.is_empty() {
            return false;
        }
        let empty = Message::new(name, Bytes::new(), QoS::AtMostOnce, true, &Default::default());
        self.store_retained(empty);
        true
    }

    /// Publishes as the broker: routed like a will (no ACL, no publisher session).
    fn publish_as_broker(
        &mut self,
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<bool, String> {
        let topic = TopicName::new(topic).map_err(|e| format!("invalid topic: {e}"))?;
        if topic.as_str().contains(['+', '#']) {
            return Err("a topic name has no wildcards".into());
        }
        let message = Message::new(topic, payload, qos, retain, &Default::default());
        Ok(self.publish(None, message, None).matched)
    }
}

/// Puts the `want` smallest items by `key` first, sorted, and drops the rest: O(n) to find
/// them, O(want log want) to sort.
fn first_sorted<T>(items: &mut Vec<T>, want: usize, key: impl Fn(&T) -> &str) {
    first_sorted_by(items, want, |a, b| key(a).cmp(key(b)));
}

/// [`first_sorted`] in the order `order` gives.
fn first_sorted_by<T>(items: &mut Vec<T>, want: usize, order: impl Fn(&T, &T) -> std::cmp::Ordering) {
    if want == 0 {
        items.clear();
        return;
    }
    if items.len() > want {
        items.select_nth_unstable_by(want - 1, &order);
        items.truncate(want);
    }
    items.sort_unstable_by(order);
}

fn is_shared(filter: &str) -> bool {
    filter.starts_with("$share/")
}

/// A CONNACK reason as a label: `not_authorized`, `bad_user_name_or_password`, ...
fn reason_label(reason: ReasonCode) -> &'static str {
    match reason {
        ReasonCode::NotAuthorized => "not_authorized",
        ReasonCode::BadUserNameOrPassword => "bad_username_or_password",
        ReasonCode::ClientIdentifierNotValid => "client_identifier_not_valid",
        ReasonCode::BadAuthenticationMethod => "bad_authentication_method",
        ReasonCode::QuotaExceeded => "quota_exceeded",
        ReasonCode::ServerUnavailable => "server_unavailable",
        ReasonCode::UnsupportedProtocolVersion => "unsupported_protocol_version",
        ReasonCode::Banned => "banned",
        ReasonCode::ServerBusy => "server_busy",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::first_sorted;

    #[test]
    fn first_sorted_keeps_the_smallest_in_order() {
        let mut items = vec!["d", "a", "c", "b", "e"];
        first_sorted(&mut items, 3, |s| s);
        assert_eq!(items, ["a", "b", "c"]);
        let mut items = vec!["b", "a"];
        first_sorted(&mut items, 10, |s| s);
        assert_eq!(items, ["a", "b"]);
        first_sorted(&mut items, 0, |s| s);
        assert!(items.is_empty());
    }
}
