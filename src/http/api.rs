//! The routes: `/metrics`, `/healthz`, `/readyz`, the admin API under `/api/v1`, the
//! dashboard at `/`. Each turns a request into questions for the shards and their
//! answers into JSON (or Prometheus text). Lists are paged (`page`, `limit`) in a stable
//! order (client identifier, filter, topic) and say how many matched in all.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};

use super::metrics::{render, BrokerView};
use super::request::{decode_component, Head, Response};
use super::server::{ShardClient, Unavailable};
use crate::broker::admin::{
    AdminReply, AdminRequest, ClientDetail, ClientInfo, ClientQuery, RetainedInfo, ShardMetrics,
    SubscriptionInfo, SubscriptionQuery,
};
use crate::broker::{placement, Global};
use crate::codec::QoS;

/// The dashboard: one static page, no build step.
const DASHBOARD: &str = include_str!("dashboard.html");
/// Entries a list may be asked for, all pages before the one asked included: a deeper
/// page would make every shard sort that many.
const MAX_LISTED: usize = 100_000;
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

pub struct Api {
    pub shards: Rc<ShardClient>,
    /// Shards whose channels to the endpoint are connected.
    pub connected: Arc<std::sync::atomic::AtomicUsize>,
    /// The bearer token, when one is configured.
    pub token: Arc<super::TokenSlot>,
    /// The endpoint listens on a loopback address: reads need no token.
    pub loopback: bool,
    pub global: Arc<Global>,
    pub started: Instant,
}

/// What a route needs of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Public,
    Read,
    Admin,
}

impl Api {
    /// Whether the request may go on, from its head alone: answered before its body is
    /// read, so a caller without the token cannot make the endpoint hold one.
    pub fn admit(&self, head: &Head) -> Option<Response> {
        let access = match (method_of(head), head.path.as_str()) {
            ("GET", "/" | "/healthz" | "/favicon.ico") => Access::Public,
            ("GET", _) => Access::Read,
            _ => Access::Admin,
        };
        let refusal = self.check_origin(head, access).or_else(|| self.check_token(head, access));
        if refusal.is_none() && access == Access::Admin && !self.global.started.load(Ordering::Acquire) {
            // No change while the shards still replay their logs.
            return Some(Response::error(503, "not_ready", "the broker is starting"));
        }
        refusal
    }

    /// Answers a request [`Api::admit`] let in.
    pub async fn handle(&self, head: &Head, body: &[u8]) -> Response {
        match self.route(method_of(head), head.path.as_str(), head, body).await {
            Ok(response) => response,
            Err(Unavailable::Starting) => Response::error(503, "not_ready", "the broker is starting"),
            Err(Unavailable::TimedOut) => Response::error(504, "timeout", "a core did not answer in time"),
        }
    }

    /// What a web page in the operator's browser must not do. On a loopback endpoint, the
    /// `Host` must name a loopback address (a rebound DNS name pointing a foreign page at
    /// 127.0.0.1 does not); a write must come from no page or from the endpoint's own
    /// (`Origin`); a publish must also say it is JSON (`is_json`).
    fn check_origin(&self, head: &Head, access: Access) -> Option<Response> {
        let host = head.header("host").unwrap_or("");
        // A client without a Host header (HTTP/1.0 probes) is no browser.
        if self.loopback && !host.is_empty() && !is_loopback_host(host) {
            return Some(Response::error(
                403,
                "forbidden",
                format!("Host {host:?} is not a loopback address"),
            ));
        }
        if access != Access::Admin {
            return None;
        }
        if let Some(origin) = head.header("origin") {
            let same =
                origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host);
            if !same {
                return Some(Response::error(
                    403,
                    "forbidden",
                    format!("cross-origin request from {origin:?}"),
                ));
            }
        }
        None
    }

    fn check_token(&self, head: &Head, access: Access) -> Option<Response> {
        let needed = match access {
            Access::Public => false,
            Access::Read => !self.loopback,
            Access::Admin => self.token.configured() || !self.loopback,
        };
        if !needed {
            return None;
        }
        let ok = match (&self.token.current(), head.bearer()) {
            (Some(token), Some(given)) => constant_time_eq(token.as_bytes(), given.as_bytes()),
            _ => false,
        };
        if ok {
            return None;
        }
        let mut response =
            Response::error(401, "unauthorized", "a bearer token is required (--http-token-file)");
        response.headers.push("WWW-Authenticate: Bearer realm=\"ringmq\"".into());
        Some(response)
    }

    async fn route(
        &self,
        method: &str,
        path: &str,
        head: &Head,
        body: &[u8],
    ) -> Result<Response, Unavailable> {
        const CLIENTS: &str = "/api/v1/clients/";
        const RETAINED: &str = "/api/v1/retained/";
        let response = match (method, path) {
            ("GET", "/") => Response {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: DASHBOARD.as_bytes().to_vec(),
                headers: vec![dashboard_policy().to_string()],
            },
            // Browsers ask for it; nothing to show.
            ("GET", "/favicon.ico") => Response::no_content(),
            ("GET", "/healthz") => Response::json(200, &json!({ "status": "ok" })),
            ("GET", "/readyz")
                if self.global.started.load(Ordering::Acquire)
                    && self.connected.load(Ordering::Acquire) == self.shards.shard_count() =>
            {
                Response::json(200, &json!({ "status": "ready" }))
            }
            ("GET", "/readyz") => Response::error(503, "not_ready", "shards are still replaying their logs"),
            ("GET", "/metrics") => {
                let shards = self.metrics().await?;
                Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: render(&shards, &self.view()).into_bytes(),
                    headers: Vec::new(),
                }
            }
            ("GET", "/api/v1/stats") => {
                let shards = self.metrics().await?;
                Response::json(200, &stats_json(&shards, &self.view()))
            }
            ("GET", "/api/v1/clients") => self.clients(head).await?,
            ("GET", p) if p.starts_with(CLIENTS) => {
                let id = decode_component(&p[CLIENTS.len()..], false);
                let owner = placement::owner(&id, self.shards.shard_count());
                match self.shards.ask(owner, AdminRequest::Client(id.clone())).await? {
                    AdminReply::Client(Some(detail)) => Response::json(200, &detail_json(&detail)),
                    _ => not_found(&format!("no client {id:?}")),
                }
            }
            ("DELETE", p) if p.starts_with(CLIENTS) => {
                let client_id = decode_component(&p[CLIENTS.len()..], false);
                let discard = match head.param("session") {
                    None | Some("keep") => false,
                    Some("discard") => true,
                    Some(other) => return Ok(bad_request(&format!("session={other}: keep or discard"))),
                };
                let owner = placement::owner(&client_id, self.shards.shard_count());
                let request = AdminRequest::Kick { client_id: client_id.clone(), discard };
                match self.shards.ask(owner, request).await? {
                    AdminReply::Kicked(true) => Response::no_content(),
                    _ => not_found(&format!(
                        "no connected client {client_id:?} (an offline session is ended with ?session=discard)"
                    )),
                }
            }
            ("GET", "/api/v1/subscriptions") => self.subscriptions(head).await?,
            ("GET", "/api/v1/retained") => self.retained(head).await?,
            ("GET", p) if p.starts_with(RETAINED) => {
                let topic = decode_component(&p[RETAINED.len()..], false);
                let request = || AdminRequest::Retained { filter: topic.clone(), want: 1 };
                let owner = placement::owner(&topic, self.shards.shard_count());
                match self.shards.ask(owner, request()).await? {
                    AdminReply::Retained { first, .. }
                        if !topic.contains(['+', '#']) && !first.is_empty() =>
                    {
                        Response::json(200, &retained_json(&first[0]))
                    }
                    _ => not_found(&format!("no retained message on {topic:?}")),
                }
            }
            ("DELETE", p) if p.starts_with(RETAINED) => {
                let topic = decode_component(&p[RETAINED.len()..], false);
                let owner = placement::owner(&topic, self.shards.shard_count());
                match self.shards.ask(owner, AdminRequest::DeleteRetained(topic.clone())).await? {
                    AdminReply::Deleted(true) => Response::no_content(),
                    _ => not_found(&format!("no retained message on {topic:?}")),
                }
            }
            ("POST", "/api/v1/publish") if !is_json(head) => {
                Response::error(415, "unsupported_media_type", "send Content-Type: application/json")
            }
            ("POST", "/api/v1/publish") => self.publish(body).await?,
            (_, p) if known(p) => {
                let mut response =
                    Response::error(405, "method_not_allowed", format!("{method} is not allowed on {p}"));
                response.headers.push(format!("Allow: {}", allowed(p)));
                response
            }
            _ => not_found(&format!("no route {path}")),
        };
        Ok(response)
    }

    async fn metrics(&self) -> Result<Vec<ShardMetrics>, Unavailable> {
        let replies = self.shards.ask_all(|| AdminRequest::Metrics).await?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                AdminReply::Metrics(m) => Some(*m),
                _ => None,
            })
            .collect())
    }

    fn view(&self) -> BrokerView {
        BrokerView {
            listeners: self
                .global
                .listeners
                .iter()
                .map(|l| (l.name.to_string(), l.connections.load(Ordering::Relaxed)))
                .collect(),
            retained_bytes: self.global.retained.bytes(),
            uptime_seconds: self.started.elapsed().as_secs(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            ready: self.global.started.load(Ordering::Acquire),
        }
    }

    async fn clients(&self, head: &Head) -> Result<Response, Unavailable> {
        let page = match Page::of(head) {
            Ok(page) => page,
            Err(refusal) => return Ok(refusal),
        };
        let query = ClientQuery {
            prefix: head.given("prefix").map(str::to_string),
            username: head.given("username").map(str::to_string),
            want: page.want(),
        };
        let replies = self.shards.ask_all(|| AdminRequest::Clients(query.clone())).await?;
        let (count, mut all) = merged(replies, |r| match r {
            AdminReply::Clients { count, first } => Some((count, first)),
            _ => None,
        });
        all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(page.answer(count, all.iter().map(client_json)))
    }

    async fn subscriptions(&self, head: &Head) -> Result<Response, Unavailable> {
        let page = match Page::of(head) {
            Ok(page) => page,
            Err(refusal) => return Ok(refusal),
        };
        let query = SubscriptionQuery {
            filter: head.given("filter").map(str::to_string),
            client_id: head.given("client_id").map(str::to_string),
            want: page.want(),
        };
        let replies = self.shards.ask_all(|| AdminRequest::Subscriptions(query.clone())).await?;
        let (count, mut all) = merged(replies, |r| match r {
            AdminReply::Subscriptions { count, first } => Some((count, first)),
            _ => None,
        });
        all.sort_by(|a, b| (&a.client_id, &a.filter).cmp(&(&b.client_id, &b.filter)));
        Ok(page.answer(count, all.iter().map(subscription_json)))
    }

    async fn retained(&self, head: &Head) -> Result<Response, Unavailable> {
        let page = match Page::of(head) {
            Ok(page) => page,
            Err(refusal) => return Ok(refusal),
        };
        let filter = head.given("filter").unwrap_or("#").to_string();
        if crate::topic::TopicFilter::new(Bytes::from(filter.clone())).is_err() {
            return Ok(bad_request(&format!("{filter:?} is not a topic filter")));
        }
        let replies = self
            .shards
            .ask_all(|| AdminRequest::Retained { filter: filter.clone(), want: page.want() })
            .await?;
        let (count, mut all) = merged(replies, |r| match r {
            AdminReply::Retained { count, first } => Some((count, first)),
            _ => None,
        });
        all.sort_by(|a, b| a.topic.cmp(&b.topic));
        Ok(page.answer(count, all.iter().map(retained_json)))
    }

    async fn publish(&self, body: &[u8]) -> Result<Response, Unavailable> {
        let request = match PublishRequest::parse(body) {
            Ok(request) => request,
            Err(why) => return Ok(bad_request(&why)),
        };
        let owner = placement::owner(&request.topic, self.shards.shard_count());
        let topic = request.topic.clone();
        let ask = AdminRequest::Publish {
            topic: Bytes::from(request.topic),
            payload: request.payload,
            qos: request.qos,
            retain: request.retain,
        };
        Ok(match self.shards.ask(owner, ask).await? {
            AdminReply::Published(Ok(matched)) => {
                Response::json(200, &json!({ "topic": topic, "matched": matched }))
            }
            AdminReply::Published(Err(why)) => bad_request(&why),
            _ => Response::error(500, "internal", "unexpected answer"),
        })
    }
}

/// A page of a list: which one, and how long.
struct Page {
    page: usize,
    limit: usize,
}

impl Page {
    fn of(head: &Head) -> Result<Page, Response> {
        let number = |name: &str, default: usize| match head.param(name) {
            None | Some("") => Ok(default),
            Some(text) => {
                text.parse::<usize>().map_err(|_| bad_request(&format!("{name}={text} is not a number")))
            }
        };
        let page = number("page", 1)?;
        let limit = number("limit", DEFAULT_LIMIT)?;
        if page == 0 {
            return Err(bad_request("page starts at 1"));
        }
        if limit == 0 || limit > MAX_LIMIT {
            return Err(bad_request(&format!("limit must be between 1 and {MAX_LIMIT}")));
        }
        if page.saturating_mul(limit) > MAX_LISTED {
            return Err(bad_request(&format!(
                "pages reach at most {MAX_LISTED} entries deep: narrow the query"
            )));
        }
        Ok(Page { page, limit })
    }

    /// Entries each shard sends: everything up to the end of this page.
    fn want(&self) -> usize {
        self.page * self.limit
    }

    /// `{"data": [...this page...], "meta": {...}}` from the merged, sorted entries.
    fn answer(&self, count: usize, sorted: impl Iterator<Item = Value>) -> Response {
        let data: Vec<Value> = sorted.skip((self.page - 1) * self.limit).take(self.limit).collect();
        Response::json(
            200,
            &json!({
                "data": data,
                "meta": { "page": self.page, "limit": self.limit, "count": count, "hasnext": self.want() < count },
            }),
        )
    }
}

/// The body of `POST /api/v1/publish`.
struct PublishRequest {
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
}

impl PublishRequest {
    fn parse(body: &[u8]) -> Result<PublishRequest, String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
        let topic = value.get("topic").and_then(Value::as_str).ok_or("\"topic\" (a string) is required")?;
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err("\"topic\" must be a topic name: not empty, no wildcards".into());
        }
        let text = value.get("payload").and_then(Value::as_str).unwrap_or("");
        let payload = match value.get("encoding").and_then(Value::as_str).unwrap_or("plain") {
            "plain" => Bytes::copy_from_slice(text.as_bytes()),
            "base64" => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| format!("payload: {e}"))?,
            ),
            other => return Err(format!("encoding {other:?}: plain or base64")),
        };
        let qos = match value.get("qos").map(|q| q.as_u64()) {
            None | Some(Some(0)) => QoS::AtMostOnce,
            Some(Some(1)) => QoS::AtLeastOnce,
            Some(Some(2)) => QoS::ExactlyOnce,
            _ => return Err("\"qos\" must be 0, 1 or 2".into()),
        };
        let retain = match value.get("retain") {
            None => false,
            Some(Value::Bool(b)) => *b,
            _ => return Err("\"retain\" must be true or false".into()),
        };
        Ok(PublishRequest { topic: topic.to_string(), payload, qos, retain })
    }
}

/// Every shard's count added up and their first entries together (sorted by the caller).
fn merged<T>(
    replies: Vec<AdminReply>,
    take: impl Fn(AdminReply) -> Option<(usize, Vec<T>)>,
) -> (usize, Vec<T>) {
    let (mut count, mut all) = (0, Vec::new());
    for (n, first) in replies.into_iter().filter_map(take) {
        count += n;
        all.extend(first);
    }
    (count, all)
}

fn bad_request(why: &str) -> Response {
    Response::error(400, "bad_request", why)
}

fn not_found(why: &str) -> Response {
    Response::error(404, "not_found", why)
}

/// Paths that exist, for 405 rather than 404.
fn known(path: &str) -> bool {
    !allowed(path).is_empty()
}

fn allowed(path: &str) -> &'static str {
    match path {
        "/"
        | "/healthz"
        | "/readyz"
        | "/metrics"
        | "/api/v1/stats"
        | "/api/v1/clients"
        | "/api/v1/subscriptions"
        | "/api/v1/retained" => "GET, HEAD",
        "/api/v1/publish" => "POST",
        p if p.starts_with("/api/v1/clients/") || p.starts_with("/api/v1/retained/") => "GET, HEAD, DELETE",
        _ => "",
    }
}

/// The method as routed: HEAD is GET without the body.
fn method_of(head: &Head) -> &str {
    if head.method == "HEAD" {
        "GET"
    } else {
        head.method.as_str()
    }
}

/// A body declared as JSON: what a cross-site form cannot send without the browser asking
/// the endpoint first.
fn is_json(head: &Head) -> bool {
    head.header("content-type").is_some_and(|t| t.trim_start().starts_with("application/json"))
}

/// A `Host` header naming a loopback address (`localhost`, `127.0.0.1:18083`, `[::1]`).
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The dashboard's Content-Security-Policy: its own inline script and style only (by
/// hash), requests to this endpoint only, never framed.
fn dashboard_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        let hashes = |tag: &str| {
            let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
            let mut out = String::new();
            let mut rest = DASHBOARD;
            while let Some(start) = rest.find(&open) {
                let body = &rest[start + open.len()..];
                let Some(end) = body.find(&close) else { break };
                let digest = ring::digest::digest(&ring::digest::SHA256, &body.as_bytes()[..end]);
                let hash = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
                out.push_str(&format!(" 'sha256-{hash}'"));
                rest = &body[end..];
            }
            out
        };
        format!(
            "Content-Security-Policy: default-src 'none'; connect-src 'self'; img-src 'self' data:; \
             script-src{}; style-src{}; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            hashes("script"),
            hashes("style")
        )
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn client_json(c: &ClientInfo) -> Value {
    json!({
        "client_id": c.client_id,
        "username": c.username,
        "connected": c.connected,
        "address": c.address,
        "listener": c.listener,
        "protocol": c.protocol,
        "core": c.core,
        "subscriptions": c.subscriptions,
        "inflight": c.inflight,
        "queued": c.queued,
    })
}

fn detail_json(d: &ClientDetail) -> Value {
    let mut value = client_json(&d.info);
    if let Value::Object(map) = &mut value {
        map.insert("keepalive".into(), json!(d.keep_alive));
        map.insert("connected_at".into(), json!(d.connected_at));
        map.insert(
            "session".into(),
            json!({ "expiry_interval": d.expiry_interval, "queued_bytes": d.queued_bytes }),
        );
        map.insert(
            "subscriptions".into(),
            Value::Array(d.subscriptions.iter().map(subscription_json).collect()),
        );
    }
    value
}

fn subscription_json(s: &SubscriptionInfo) -> Value {
    json!({
        "client_id": s.client_id,
        "filter": s.filter,
        "group": s.group,
        "qos": s.qos,
        "no_local": s.no_local,
        "retain_as_published": s.retain_as_published,
        "retain_handling": s.retain_handling,
        "core": s.core,
    })
}

fn retained_json(r: &RetainedInfo) -> Value {
    json!({
        "topic": r.topic,
        "qos": r.qos,
        "payload": base64::engine::general_purpose::STANDARD.encode(&r.payload),
        "payload_size": r.payload.len(),
        "payload_text": std::str::from_utf8(&r.payload).ok(),
    })
}

/// `/api/v1/stats`: totals since start and gauges now, and per core.
fn stats_json(shards: &[ShardMetrics], view: &BrokerView) -> Value {
    let sum = |f: &dyn Fn(&ShardMetrics) -> u64| shards.iter().map(f).sum::<u64>();
    let cores: Vec<Value> = shards
        .iter()
        .map(|m| {
            json!({
                "core": m.core,
                "connections": m.connections,
                "busy_ratio": m.busy_ratio,
                "tasks_run": m.tasks_run,
                "messages_received": m.received.iter().sum::<u64>(),
                "messages_sent": m.sent.iter().sum::<u64>(),
            })
        })
        .collect();
    json!({
        "uptime_seconds": view.uptime_seconds,
        "uptime_ms": view.uptime_ms,
        "connections": view.listeners.iter().map(|(_, n)| n).sum::<usize>(),
        "sessions": {
            "connected": sum(&|m| m.sessions_connected as u64),
            "offline": sum(&|m| m.sessions_offline as u64),
        },
        "subscriptions": { "total": sum(&|m| m.subscriptions as u64), "shared": sum(&|m| m.subscriptions_shared as u64) },
        "messages": {
            "received": sum(&|m| m.received.iter().sum()),
            "sent": sum(&|m| m.sent.iter().sum()),
            "dropped": sum(&|m| m.dropped.iter().sum()),
        },
        "bytes": { "received": sum(&|m| m.bytes_received), "sent": sum(&|m| m.bytes_sent) },
        "retained": { "count": sum(&|m| m.retained_messages as u64), "bytes": view.retained_bytes },
        "queued": { "messages": sum(&|m| m.queued_messages as u64), "bytes": sum(&|m| m.queued_bytes as u64) },
        "inflight": sum(&|m| m.inflight as u64),
        "cores": cores,
    })
}
