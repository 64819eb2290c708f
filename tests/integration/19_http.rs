//! The HTTP endpoint (`Config::http`): every route of the admin API, `/healthz`,
//! `/readyz` and the dashboard, spoken to over a real socket on 127.0.0.1 with a small
//! HTTP/1.1 client of our own, while MQTT clients make the state the API reports.
//! `19_http_metrics.rs` holds the Prometheus exposition and the token checks.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine;
use ringmq::broker::placement;
use ringmq::codec::{Connect, Property, ProtocolVersion, QoS, SubscriptionOptions};
use ringmq::config::HttpSettings;
use ringmq::Config;
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet as V5Packet};
use rumqttc::v5::{ConnectionError, Event, EventLoop, StateError};
use serde_json::{json, Value};

use crate::common::{client_id_on, TestBroker, WAIT};
use crate::qos::helpers::{connect_packet, opts, text, topic_on, Peer};

/// The HTTP client: raw requests over `std::net::TcpStream`, one connection each.
pub(crate) mod client {
    use super::*;

    #[derive(Debug)]
    pub struct Reply {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Reply {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }

        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        /// The body as JSON, which the Content-Type must announce.
        pub fn json(&self) -> Value {
            assert_eq!(self.header("content-type"), Some("application/json"), "{self:?}");
            serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
        }

        /// An error answer: `status`, and exactly `{"error": code, "message": "..."}`.
        pub fn assert_error(&self, status: u16, code: &str) {
            assert_eq!(self.status, status, "{}", self.text());
            let value = self.json();
            assert_eq!(value["error"], code, "{value}");
            assert!(value["message"].as_str().is_some_and(|m| !m.is_empty()), "{value}");
            assert_eq!(value.as_object().map(|o| o.len()), Some(2), "{value}");
        }
    }

    /// Writes `request` as it is and reads the answer until the server closes.
    pub fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
        let mut stream = TcpStream::connect(addr).expect("the HTTP endpoint accepts");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(request).unwrap();
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
                // A server that refuses an oversized request before reading all of it
                // may reset the connection after its answer.
                Err(e) if e.kind() == ErrorKind::ConnectionReset && !raw.is_empty() => break,
                Err(e) => panic!("reading the answer: {e}"),
            }
        }
        parse(&raw, request.starts_with(b"HEAD "))
    }

    fn parse(raw: &[u8], head_only: bool) -> Reply {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(raw)));
        let head = std::str::from_utf8(&raw[..end]).expect("an ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status = parts.next().and_then(|s| s.parse().ok()).expect("a status code");
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("header {line:?}"));
                (name.to_string(), value.trim().to_string())
            })
            .collect();
        let reply = Reply { status, headers, body: raw[end + 4..].to_vec() };
        // A HEAD's answer announces the length of a body it does not carry.
        if let Some(length) = reply.header("content-length").filter(|_| !head_only) {
            assert_eq!(length.parse::<usize>().ok(), Some(reply.body.len()), "Content-Length of {reply:?}");
        }
        reply
    }

    pub fn request(
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        exchange(addr, &bytes)
    }

    pub fn get(addr: SocketAddr, target: &str) -> Reply {
        request(addr, "GET", target, &[], b"")
    }

    /// GET that must answer 200 with JSON.
    pub fn get_json(addr: SocketAddr, target: &str) -> Value {
        let reply = get(addr, target);
        assert_eq!(reply.status, 200, "GET {target}: {}", reply.text());
        reply.json()
    }

    pub fn delete(addr: SocketAddr, target: &str) -> Reply {
        request(addr, "DELETE", target, &[], b"")
    }

    pub fn post(addr: SocketAddr, target: &str, body: &[u8]) -> Reply {
        request(addr, "POST", target, &[("Content-Type", "application/json")], body)
    }

    /// The endpoint's settings on an ephemeral loopback port.
    pub fn settings(token_file: Option<std::path::PathBuf>) -> HttpSettings {
        HttpSettings { bind: "127.0.0.1:0".parse().unwrap(), token_file, required: true }
    }

    /// A broker with the endpoint on and `$SYS` off (so counts are exact), and the
    /// endpoint's address.
    pub fn start(tweak: impl FnOnce(&mut Config)) -> (TestBroker, SocketAddr) {
        let broker = TestBroker::start_with(|c| {
            c.http = Some(settings(None));
            c.sys_interval = Duration::ZERO;
            tweak(c);
        });
        let http = broker.broker().http_addr().expect("the endpoint runs");
        api_connected(http, None);
        (broker, http)
    }

    /// Waits until the endpoint answers API requests (at once, since `ringmq::start` returns
    /// only once it is connected to every shard: `the_api_answers_as_soon_as_start_returns`).
    pub fn api_connected(http: SocketAddr, authorization: Option<&str>) {
        let headers: Vec<(&str, &str)> = authorization.map(|a| ("Authorization", a)).into_iter().collect();
        wait_until("the endpoint connected to the shards", || {
            (request(http, "GET", "/api/v1/stats", &headers, b"").status != 503).then_some(())
        });
    }

    /// Polls `probe` until it gives a value, for at most [`WAIT`].
    pub fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(value) = probe() {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

use client::{delete, get, get_json, post, request, start, wait_until};

/// The `key` field of every entry in a list answer's `data`.
fn ids(page: &Value, key: &str) -> Vec<String> {
    page["data"].as_array().expect("data").iter().map(|e| e[key].as_str().unwrap().to_string()).collect()
}

fn meta(page: &Value) -> (u64, u64, u64, bool) {
    let m = &page["meta"];
    (
        m["page"].as_u64().unwrap(),
        m["limit"].as_u64().unwrap(),
        m["count"].as_u64().unwrap(),
        m["hasnext"].as_bool().unwrap(),
    )
}

/// Percent-encodes everything but unreserved characters (so `/` becomes `%2F`).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn listed(http: SocketAddr, client_id: &str) -> Option<Value> {
    let page = get_json(http, &format!("/api/v1/clients?prefix={}&limit=1000", encode(client_id)));
    page["data"].as_array().unwrap().iter().find(|c| c["client_id"] == client_id).cloned()
}

fn with_username(version: ProtocolVersion, id: &str, username: &str) -> Connect {
    Connect { username: Some(username.into()), ..connect_packet(version, id, true) }
}

#[test]
fn health_readiness_and_the_dashboard_answer() {
    let (_broker, http) = start(|_| {});
    assert_eq!(get_json(http, "/healthz"), json!({ "status": "ok" }));
    // `ringmq::start` returns once every shard is up: ready at once, no waiting.
    assert_eq!(get_json(http, "/readyz"), json!({ "status": "ready" }));
    let page = get(http, "/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").is_some_and(|t| t.starts_with("text/html")), "{:?}", page.headers);
    assert!(page.text().contains("<html"), "{}", page.text());
    // HEAD: the GET's head, no body.
    let head = request(http, "HEAD", "/healthz", &[], b"");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("15"), "the length a GET's body has");
}

/// BUG (reported, not fixed here): the endpoint connects its channels to the shards in
/// tasks of its own thread, and nothing waits for them: right after `ringmq::start`
/// returned, while /readyz already answers 200, an API request can answer
/// 503 {"error":"not_ready","message":"the broker is starting"}, for 5-15 ms. It depends on
/// timing: seen 2 times in 30 runs of `cargo test --test integration http` (the first
/// request after start, with the other tests running), never alone.
#[test]
fn the_api_answers_as_soon_as_start_returns() {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                for _ in 0..10 {
                    let broker = TestBroker::start_with(|c| c.http = Some(client::settings(None)));
                    let http = broker.broker().http_addr().unwrap();
                    let reply = get(http, "/api/v1/stats");
                    assert_eq!(get(http, "/readyz").status, 200);
                    assert_eq!(reply.status, 200, "{}", reply.text());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("every API request answered");
    }
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
    let (_broker, http) = start(|_| {});
    for path in ["/nope", "/api/v1", "/api/v1/nope", "/api/v2/clients", "/metrics/x"] {
        get(http, path).assert_error(404, "not_found");
    }
    for (method, path, allow) in [
        ("POST", "/metrics", "GET, HEAD"),
        ("DELETE", "/api/v1/clients", "GET, HEAD"),
        ("PUT", "/api/v1/stats", "GET, HEAD"),
        ("GET", "/api/v1/publish", "POST"),
        ("PUT", "/api/v1/clients/x", "GET, HEAD, DELETE"),
        ("POST", "/api/v1/retained/a%2Fb", "GET, HEAD, DELETE"),
    ] {
        let reply = request(http, method, path, &[], b"");
        reply.assert_error(405, "method_not_allowed");
        assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
    }
}

#[test]
fn oversized_bodies_are_413_and_oversized_heads_431() {
    let (_broker, http) = start(|_| {});
    // The body is refused from its Content-Length, before a byte of it is read.
    let big = client::exchange(http, b"POST /api/v1/publish HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n");
    assert_eq!(big.status, 413, "{}", big.text());
    // The contract names no code for 413 and 431: the shape is checked, not the code.
    let shape = |r: &client::Reply| r.json()["error"].is_string() && r.json()["message"].is_string();
    assert!(shape(&big), "{}", big.text());
    // A head of more than 16 KiB...
    let long = format!("GET /healthz HTTP/1.1\r\nX-Filler: {}\r\n\r\n", "a".repeat(16 * 1024));
    let reply = client::exchange(http, long.as_bytes());
    assert_eq!(reply.status, 431, "{}", reply.text());
    assert!(shape(&reply), "{}", reply.text());
    // ...or of more than 64 header lines.
    let many: String = (0..65).map(|i| format!("X-{i}: v\r\n")).collect();
    let reply = client::exchange(http, format!("GET /healthz HTTP/1.1\r\n{many}\r\n").as_bytes());
    assert_eq!(reply.status, 431, "{}", reply.text());
    assert!(shape(&reply), "{}", reply.text());
    // A body just within the bound is read and judged on its content.
    let body = format!("{{\"topic\":\"big/one\",\"payload\":\"{}\"}}", "x".repeat((1 << 20) - 40));
    let reply = post(http, "/api/v1/publish", body.as_bytes());
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn stats_have_every_key_and_their_counters_grow_with_traffic() {
    let (broker, http) = start(|_| {});
    let before = get_json(http, "/api/v1/stats");
    for key in ["uptime_seconds", "connections", "inflight"] {
        assert!(before[key].is_u64(), "{key} in {before}");
    }
    for (group, keys) in [
        ("sessions", &["connected", "offline"][..]),
        ("subscriptions", &["total", "shared"]),
        ("messages", &["received", "sent", "dropped"]),
        ("bytes", &["received", "sent"]),
        ("retained", &["count", "bytes"]),
        ("queued", &["messages", "bytes"]),
    ] {
        for key in keys {
            assert!(before[group][key].is_u64(), "{group}.{key} in {before}");
        }
    }
    let cores = before["cores"].as_array().expect("cores");
    assert_eq!(cores.len(), 2, "{before}");
    for (i, core) in cores.iter().enumerate() {
        assert_eq!(core["core"], i);
        for key in ["connections", "tasks_run", "messages_received", "messages_sent"] {
            assert!(core[key].is_u64(), "cores[{i}].{key} in {before}");
        }
        assert!(core["busy_ratio"].as_f64().is_some_and(|r| (0.0..=1.0).contains(&r)), "{core}");
    }

    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "stats-sub"));
    sub.subscribe_granted("st/t", QoS::AtLeastOnce);
    sub.subscribe_granted("$share/g/st/u", QoS::AtMostOnce);
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "stats-pub"));
    for i in 0..5 {
        publisher.publish("st/t", format!("m{i}"), QoS::AtLeastOnce, false);
    }
    publisher.publish("st/kept", "r", QoS::AtLeastOnce, true);
    for _ in 0..5 {
        let p = sub.next_publish();
        sub.ack(&p);
    }
    let after = wait_until("the retained message counted", || {
        let s = get_json(http, "/api/v1/stats");
        (s["retained"]["count"] == 1).then_some(s)
    });
    let delta =
        |group: &str, key: &str| after[group][key].as_u64().unwrap() - before[group][key].as_u64().unwrap();
    assert_eq!(delta("messages", "received"), 6, "{after}");
    assert_eq!(delta("messages", "sent"), 5, "{after}");
    assert_eq!(delta("messages", "dropped"), 0, "the retained one is stored, not dropped: {after}");
    assert!(delta("bytes", "received") > 0 && delta("bytes", "sent") > 0, "{after}");
    assert_eq!(after["connections"], 2, "{after}");
    assert_eq!(after["sessions"], json!({ "connected": 2, "offline": 0 }), "{after}");
    // `total` leaves shared subscriptions out (see the ignored test below).
    assert_eq!(after["subscriptions"]["shared"], 1, "{after}");
    assert!(after["subscriptions"]["total"].as_u64().unwrap() >= 1, "{after}");
    // The store's own accounting: more than topic and payload.
    assert!(after["retained"]["bytes"].as_u64().unwrap() >= ("st/kept".len() + 1) as u64, "{after}");
    let per_core =
        |key: &str| after["cores"].as_array().unwrap().iter().map(|c| c[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(per_core("messages_received"), after["messages"]["received"].as_u64().unwrap());
    assert_eq!(per_core("messages_sent"), after["messages"]["sent"].as_u64().unwrap());
    assert_eq!(per_core("connections"), 2);
    // Executor figures are measured once per housekeeping tick.
    wait_until("every core's executor measured", || {
        let s = get_json(http, "/api/v1/stats");
        s["cores"].as_array().unwrap().iter().all(|c| c["tasks_run"].as_u64().unwrap() > 0).then_some(())
    });
}

/// BUG (reported, not fixed here): `subscriptions.total` in /api/v1/stats (and the
/// `ringmq_subscriptions` gauge) count the router's plain subscriptions only, so a shared
/// one is in `shared` but not in `total`, and `total` disagrees with the count that
/// /api/v1/subscriptions gives for the same subscriptions.
#[test]
fn stats_total_subscriptions_include_shared_ones() {
    let (broker, http) = start(|_| {});
    let mut sub = Peer::v3(broker.addr, "total-sub");
    sub.subscribe_granted("t/plain", QoS::AtMostOnce);
    sub.subscribe_granted("$share/g/t/shared", QoS::AtMostOnce);
    let listed = meta(&get_json(http, "/api/v1/subscriptions")).2;
    assert_eq!(listed, 2);
    let stats = get_json(http, "/api/v1/stats");
    assert_eq!(stats["subscriptions"], json!({ "total": 2, "shared": 1 }), "{stats}");
}

#[test]
fn clients_are_listed_sorted_filtered_and_paged() {
    let (broker, http) = start(|_| {});
    // Seven to page through, connected out of order, on both cores; two more beside them.
    let mut peers = Vec::new();
    for name in ["pg-e", "pg-b", "pg-g", "pg-a", "pg-d", "pg-f", "pg-c"] {
        let username = if name < "pg-c" { "alice" } else { "bob" };
        peers.push(Peer::connect_with(broker.addr, with_username(ProtocolVersion::V311, name, username)).0);
    }
    let mut five = Peer::connect_with(broker.addr, with_username(ProtocolVersion::V5, "other-5", "alice")).0;
    five.subscribe_granted("x/1", QoS::AtMostOnce);
    five.subscribe_granted("x/2", QoS::AtLeastOnce);
    peers.push(Peer::v3(broker.addr, "zz-anonymous"));

    let all = get_json(http, "/api/v1/clients");
    assert_eq!(
        ids(&all, "client_id"),
        ["other-5", "pg-a", "pg-b", "pg-c", "pg-d", "pg-e", "pg-f", "pg-g", "zz-anonymous"]
    );
    assert_eq!(meta(&all), (1, 50, 9, false));

    let one = listed(http, "other-5").unwrap();
    let local = five.raw.stream.local_addr().unwrap();
    let fields: Vec<&String> = one.as_object().unwrap().keys().collect();
    assert_eq!(fields.len(), 10, "{one}");
    assert_eq!(one["username"], "alice");
    assert_eq!(one["connected"], true);
    assert_eq!(one["address"], local.to_string(), "the client's own address");
    assert_eq!(one["listener"], format!("tcp:{}", broker.addr), "named with its real port");
    assert_eq!(one["protocol"], "5.0");
    assert_eq!(one["core"], placement::owner("other-5", 2));
    assert_eq!((&one["subscriptions"], &one["inflight"], &one["queued"]), (&json!(2), &json!(0), &json!(0)));
    let anonymous = listed(http, "zz-anonymous").unwrap();
    assert_eq!((&anonymous["username"], &anonymous["protocol"]), (&Value::Null, &json!("3.1.1")));

    let mut seen = Vec::new();
    for (page, expected, hasnext) in [
        (1, &["pg-a", "pg-b", "pg-c"][..], true),
        (2, &["pg-d", "pg-e", "pg-f"], true),
        (3, &["pg-g"], false),
    ] {
        let answer = get_json(http, &format!("/api/v1/clients?prefix=pg-&limit=3&page={page}"));
        assert_eq!(ids(&answer, "client_id"), expected, "page {page}");
        assert_eq!(meta(&answer), (page, 3, 7, hasnext), "page {page}");
        seen.extend(ids(&answer, "client_id"));
    }
    assert_eq!(seen.len(), 7);
    let beyond = get_json(http, "/api/v1/clients?prefix=pg-&limit=3&page=4");
    assert_eq!((ids(&beyond, "client_id").len(), meta(&beyond)), (0, (4, 3, 7, false)));
    let exact = get_json(http, "/api/v1/clients?prefix=pg-&limit=7");
    assert_eq!(meta(&exact), (1, 7, 7, false), "a last page that is full has no next");

    let alice = get_json(http, "/api/v1/clients?username=alice");
    assert_eq!(ids(&alice, "client_id"), ["other-5", "pg-a", "pg-b"]);
    let both = get_json(http, "/api/v1/clients?username=alice&prefix=pg-");
    assert_eq!(ids(&both, "client_id"), ["pg-a", "pg-b"]);
    assert_eq!(meta(&get_json(http, "/api/v1/clients?prefix=nobody")).2, 0);
    assert_eq!(meta(&get_json(http, "/api/v1/clients?limit=1000")).1, 1000);

    for query in ["limit=0", "limit=1001", "page=0", "page=abc", "limit=-1", "limit=1.5"] {
        get(http, &format!("/api/v1/clients?{query}")).assert_error(400, "bad_request");
        get(http, &format!("/api/v1/subscriptions?{query}")).assert_error(400, "bad_request");
        get(http, &format!("/api/v1/retained?{query}")).assert_error(400, "bad_request");
    }
    drop(peers);
}

#[test]
fn a_client_is_shown_with_its_subscriptions_and_ids_are_percent_decoded() {
    let (broker, http) = start(|_| {});
    let id = "dev/1 a+b";
    let mut connect = connect_packet(ProtocolVersion::V5, id, false);
    connect.keep_alive = 45;
    connect.properties.push(Property::SessionExpiryInterval(120));
    let (mut peer, _) = Peer::connect_with(broker.addr, connect);
    let options = SubscriptionOptions {
        no_local: true,
        retain_as_published: true,
        retain_handling: 2,
        ..opts(QoS::AtLeastOnce)
    };
    peer.subscribe_with(&[("d/+/t", options)], Default::default());
    peer.subscribe_granted("$share/grp/d/#", QoS::ExactlyOnce);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();

    for target in [format!("/api/v1/clients/{}", encode(id)), "/api/v1/clients/dev/1%20a+b".to_string()] {
        let detail = get_json(http, &target);
        assert_eq!(detail["client_id"], id, "{target}");
        assert_eq!(detail["keepalive"], 45);
        let at = detail["connected_at"].as_u64().expect("connected_at");
        assert!(at <= now + 1 && at + 60 >= now, "connected_at {at}, now {now}");
        assert_eq!(detail["session"]["expiry_interval"], 120, "{detail}");
        assert!(detail["session"]["queued_bytes"].is_u64());
        assert_eq!(detail["subscriptions"].as_array().unwrap().len(), 2, "{detail}");
        let by_filter = |f: &str| {
            detail["subscriptions"].as_array().unwrap().iter().find(|s| s["filter"] == f).cloned().unwrap()
        };
        let plain = by_filter("d/+/t");
        assert_eq!(
            (
                &plain["qos"],
                &plain["no_local"],
                &plain["retain_as_published"],
                &plain["retain_handling"],
                &plain["group"]
            ),
            (&json!(1), &json!(true), &json!(true), &json!(2), &Value::Null),
            "{plain}"
        );
        let shared = by_filter("$share/grp/d/#");
        assert_eq!(
            (&shared["qos"], &shared["group"], &shared["no_local"]),
            (&json!(2), &json!("grp"), &json!(false))
        );
    }
    // A clean v5 session without expiry has none to show.
    let _clean = Peer::v5(broker.addr, "clean five");
    assert_eq!(get_json(http, "/api/v1/clients/clean%20five")["session"]["expiry_interval"], Value::Null);
    get(http, "/api/v1/clients/nobody").assert_error(404, "not_found");
    get(http, "/api/v1/clients/dev%2F1").assert_error(404, "not_found");
}

/// An MQTT 5 rumqttc connection, polled by the caller; returns once CONNACK arrived.
async fn v5_connection(addr: SocketAddr, id: &str, expiry: Option<u32>) -> EventLoop {
    let mut options = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_start(expiry.is_none());
    options.set_session_expiry_interval(expiry);
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
    std::mem::forget(client); // Its drop would end the event loop's request channel.
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await.expect("CONNACK in time") {
            Ok(Event::Incoming(V5Packet::ConnAck(_))) => return eventloop,
            Ok(_) => continue,
            Err(err) => panic!("connecting {id}: {err:?}"),
        }
    }
}

/// Polls until the server's DISCONNECT, and returns its reason.
async fn disconnect_reason(eventloop: &mut EventLoop) -> DisconnectReasonCode {
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await.expect("a DISCONNECT in time") {
            Err(ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. })) => {
                return reason_code
            }
            Ok(Event::Incoming(V5Packet::Publish(p))) => panic!("unexpected {p:?}"),
            Ok(_) => continue,
            Err(err) => panic!("expected a DISCONNECT, the connection ended with {err:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_sends_administrative_action_and_ends_a_clean_session() {
    let (broker, http) = start(|_| {});
    let mut eventloop = v5_connection(broker.addr, "kick-me", None).await;
    assert_eq!(listed(http, "kick-me").expect("listed")["connected"], true);
    let reply = delete(http, "/api/v1/clients/kick-me");
    assert_eq!(reply.status, 204, "{}", reply.text());
    assert!(reply.body.is_empty());
    assert_eq!(disconnect_reason(&mut eventloop).await, DisconnectReasonCode::AdministrativeAction);
    drop(eventloop);
    // The 204 came after the shard acted: the session is gone already.
    assert_eq!(listed(http, "kick-me"), None);
    get(http, "/api/v1/clients/kick-me").assert_error(404, "not_found");
    delete(http, "/api/v1/clients/kick-me").assert_error(404, "not_found");
    delete(http, "/api/v1/clients/kick-me?session=maybe").assert_error(400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_keeps_a_persistent_session_unless_told_to_discard_it() {
    let (broker, http) = start(|_| {});
    let mut kept = v5_connection(broker.addr, "persist-keep", Some(300)).await;
    let mut dropped = v5_connection(broker.addr, "persist-drop", Some(300)).await;

    assert_eq!(delete(http, "/api/v1/clients/persist-keep").status, 204);
    assert_eq!(disconnect_reason(&mut kept).await, DisconnectReasonCode::AdministrativeAction);
    drop(kept);
    let offline = listed(http, "persist-keep").expect("the session stays");
    assert_eq!(
        (&offline["connected"], &offline["address"], &offline["listener"]),
        (&json!(false), &Value::Null, &Value::Null)
    );
    assert_eq!(offline["protocol"], "5.0");
    assert_eq!(get_json(http, "/api/v1/clients/persist-keep")["session"]["expiry_interval"], 300);
    assert_eq!(get_json(http, "/api/v1/stats")["sessions"], json!({ "connected": 1, "offline": 1 }));

    assert_eq!(delete(http, "/api/v1/clients/persist-drop?session=discard").status, 204);
    assert_eq!(disconnect_reason(&mut dropped).await, DisconnectReasonCode::AdministrativeAction);
    drop(dropped);
    assert_eq!(listed(http, "persist-drop"), None, "session=discard ends the session too");
    get(http, "/api/v1/clients/persist-drop").assert_error(404, "not_found");

    // Kicking an offline session that is kept does nothing, and says so.
    delete(http, "/api/v1/clients/persist-keep").assert_error(404, "not_found");
    assert!(listed(http, "persist-keep").is_some(), "still kept");
    // An offline session can be discarded too.
    assert_eq!(delete(http, "/api/v1/clients/persist-keep?session=discard").status, 204);
    assert_eq!(listed(http, "persist-keep"), None);
    assert_eq!(get_json(http, "/api/v1/stats")["sessions"], json!({ "connected": 0, "offline": 0 }));
}

#[test]
fn subscriptions_are_listed_by_filter_and_client_with_shared_groups() {
    let (broker, http) = start(|_| {});
    let (one, two) = (client_id_on(0, "subs"), client_id_on(1, "subs"));
    let mut first = Peer::v3(broker.addr, &one);
    first.subscribe_granted("a/b", QoS::AtLeastOnce);
    first.subscribe_granted("c/#", QoS::AtMostOnce);
    first.subscribe_granted("$share/g/x", QoS::ExactlyOnce);
    let mut second = Peer::v5(broker.addr, &two);
    second.subscribe_granted("a/b", QoS::ExactlyOnce);

    let all = get_json(http, "/api/v1/subscriptions");
    assert_eq!(meta(&all), (1, 50, 4, false));
    let pairs: Vec<(String, String)> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["client_id"].as_str().unwrap().into(), s["filter"].as_str().unwrap().into()))
        .collect();
    let mut sorted = pairs.clone();
    sorted.sort();
    assert_eq!(pairs, sorted, "sorted by client, then filter");
    let entry = |page: &Value, client: &str, filter: &str| {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["client_id"] == client && s["filter"] == filter)
            .cloned()
    };
    let ab = entry(&all, &two, "a/b").expect("listed");
    assert_eq!((&ab["qos"], &ab["group"], &ab["core"]), (&json!(2), &Value::Null, &json!(1)), "{ab}");

    let by_filter = get_json(http, "/api/v1/subscriptions?filter=a%2Fb");
    let mut both_ids = [one.clone(), two.clone()];
    both_ids.sort();
    assert_eq!(ids(&by_filter, "client_id"), both_ids, "sorted by client");
    assert_eq!(meta(&by_filter).2, 2);
    let by_client = get_json(http, &format!("/api/v1/subscriptions?client_id={one}"));
    assert_eq!(ids(&by_client, "filter"), ["$share/g/x", "a/b", "c/#"]);
    let shared = get_json(http, "/api/v1/subscriptions?filter=%24share%2Fg%2Fx");
    assert_eq!(shared["data"].as_array().unwrap().len(), 1, "{shared}");
    assert_eq!((&shared["data"][0]["group"], &shared["data"][0]["qos"]), (&json!("g"), &json!(2)));
    let both = get_json(http, &format!("/api/v1/subscriptions?client_id={two}&filter=c%2F%23"));
    assert_eq!(meta(&both).2, 0);
    let paged = get_json(http, "/api/v1/subscriptions?limit=3&page=2");
    assert_eq!((paged["data"].as_array().unwrap().len(), meta(&paged)), (1, (2, 3, 4, false)));
    assert_eq!(meta(&get_json(http, "/api/v1/subscriptions?client_id=nobody")).2, 0);
}

#[test]
fn retained_messages_are_listed_shown_and_deleted_without_a_delivery() {
    let (broker, http) = start(|_| {});
    let mut publisher = Peer::v3(broker.addr, "retainer");
    for (topic, payload) in [
        ("r/a", &b"alpha"[..]),
        ("r/b", b"beta"),
        ("r/c/d", b"deep"),
        ("other/x", b"x"),
        ("r/bin", &[0, 159, 255]),
    ] {
        publisher.publish(topic, payload, QoS::AtLeastOnce, true);
    }
    let all = wait_until("five retained messages", || {
        let page = get_json(http, "/api/v1/retained");
        (meta(&page).2 == 5).then_some(page)
    });
    assert_eq!(
        ids(&all, "topic"),
        ["other/x", "r/a", "r/b", "r/bin", "r/c/d"],
        "filter # by default, sorted"
    );
    let by_topic = |page: &Value, topic: &str| {
        page["data"].as_array().unwrap().iter().find(|m| m["topic"] == topic).cloned().unwrap()
    };
    assert_eq!(
        by_topic(&all, "r/a"),
        json!({ "topic": "r/a", "qos": 1, "payload": "YWxwaGE=", "payload_size": 5, "payload_text": "alpha" })
    );
    let binary = by_topic(&all, "r/bin");
    assert_eq!((&binary["payload_text"], &binary["payload_size"]), (&Value::Null, &json!(3)));
    let decoded =
        base64::engine::general_purpose::STANDARD.decode(binary["payload"].as_str().unwrap()).unwrap();
    assert_eq!(decoded, [0, 159, 255]);

    let level = get_json(http, "/api/v1/retained?filter=r%2F%2B");
    assert_eq!(ids(&level, "topic"), ["r/a", "r/b", "r/bin"]);
    let first = get_json(http, "/api/v1/retained?filter=r/%23&limit=2");
    assert_eq!(
        (ids(&first, "topic"), meta(&first)),
        (vec!["r/a".to_string(), "r/b".into()], (1, 2, 4, true))
    );
    let last = get_json(http, "/api/v1/retained?filter=r/%23&limit=2&page=2");
    assert_eq!(
        (ids(&last, "topic"), meta(&last)),
        (vec!["r/bin".to_string(), "r/c/d".into()], (2, 2, 4, false))
    );
    get(http, "/api/v1/retained?filter=a%2F%23%2Fb").assert_error(400, "bad_request");

    assert_eq!(get_json(http, "/api/v1/retained/r%2Fa")["payload_text"], "alpha");
    assert_eq!(get_json(http, "/api/v1/retained/r/c/d")["payload_text"], "deep", "slashes left plain");
    get(http, "/api/v1/retained/r%2F%2B").assert_error(404, "not_found");
    get(http, "/api/v1/retained/r%2Fnone").assert_error(404, "not_found");

    // A subscriber to r/# takes its retained messages, then sees nothing of the delete.
    let mut sub = Peer::v3(broker.addr, "retained-watch");
    sub.subscribe_granted("r/#", QoS::AtLeastOnce);
    for _ in 0..4 {
        let p = sub.next_publish();
        assert!(p.retain, "{p:?}");
        sub.ack(&p);
    }
    assert_eq!(delete(http, "/api/v1/retained/r%2Fa").status, 204);
    get(http, "/api/v1/retained/r%2Fa").assert_error(404, "not_found");
    delete(http, "/api/v1/retained/r%2Fa").assert_error(404, "not_found");
    assert_eq!(ids(&get_json(http, "/api/v1/retained?filter=r%2F%2B"), "topic"), ["r/b", "r/bin"]);
    // The marker is published on the deleted topic's core, after the delete: anything the
    // delete had sent the subscriber would come first.
    let owner = placement::owner("r/a", 2);
    let marker = topic_on(owner, "r/marker");
    let reply = post(
        http,
        "/api/v1/publish",
        json!({ "topic": marker, "payload": "end", "qos": 1 }).to_string().as_bytes(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    sub.expect_marker_first(&marker, "the delete delivered nothing");
}

#[test]
fn publish_delivers_at_the_asked_qos_and_refuses_bad_requests() {
    let (broker, http) = start(|_| {});
    let mut sub = Peer::v5(broker.addr, &client_id_on(1, "api-sub"));
    sub.subscribe_granted("p/#", QoS::ExactlyOnce);
    let publish = |body: Value| post(http, "/api/v1/publish", body.to_string().as_bytes());

    let reply = publish(json!({ "topic": "p/a", "payload": "hello" }));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({ "topic": "p/a", "matched": true }));
    let p = sub.next_publish();
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str(), p.qos, p.retain),
        ("p/a", "hello", QoS::AtMostOnce, false)
    );

    let reply = publish(json!({ "topic": "p/b", "payload": "AAEC/w==", "encoding": "base64", "qos": 1 }));
    assert_eq!(reply.json()["matched"], true);
    let p = sub.next_publish();
    assert_eq!((&p.payload[..], p.qos), (&[0u8, 1, 2, 255][..], QoS::AtLeastOnce));
    sub.ack(&p);

    assert_eq!(
        publish(json!({ "topic": "p/c", "payload": "two", "qos": 2, "encoding": "plain" })).status,
        200
    );
    let p = sub.next_publish();
    assert_eq!((text(&p).as_str(), p.qos), ("two", QoS::ExactlyOnce));
    sub.ack(&p);

    assert_eq!(
        publish(json!({ "topic": "nobody/here", "payload": "x" })).json(),
        json!({ "topic": "nobody/here", "matched": false })
    );

    assert_eq!(
        publish(json!({ "topic": "p/kept", "payload": "kept", "qos": 1, "retain": true })).status,
        200
    );
    let p = sub.next_publish();
    assert_eq!(text(&p), "kept");
    sub.ack(&p);
    let stored = wait_until("p/kept retained", || {
        let reply = get(http, "/api/v1/retained/p%2Fkept");
        (reply.status == 200).then(|| reply.json())
    });
    assert_eq!((&stored["payload_text"], &stored["qos"]), (&json!("kept"), &json!(1)));
    let mut late = Peer::v3(broker.addr, "late");
    late.subscribe_granted("p/kept", QoS::AtLeastOnce);
    let p = late.next_publish();
    assert_eq!((text(&p).as_str(), p.retain), ("kept", true));

    for body in [
        json!({ "payload": "no topic" }).to_string(),
        json!({ "topic": 7 }).to_string(),
        json!({ "topic": "" }).to_string(),
        json!({ "topic": "a/+" }).to_string(),
        json!({ "topic": "a/#" }).to_string(),
        json!({ "topic": "a", "qos": 3 }).to_string(),
        json!({ "topic": "a", "qos": "1" }).to_string(),
        json!({ "topic": "a", "retain": "yes" }).to_string(),
        json!({ "topic": "a", "payload": "!!not base64!!", "encoding": "base64" }).to_string(),
        json!({ "topic": "a", "encoding": "hex" }).to_string(),
        "{\"topic\": \"a\"".to_string(),
        String::new(),
    ] {
        post(http, "/api/v1/publish", body.as_bytes()).assert_error(400, "bad_request");
    }
    // Nothing of those reached the subscriber.
    assert_eq!(publish(json!({ "topic": "p/end", "payload": "end" })).status, 200);
    sub.expect_marker_first("p/end", "refused publishes are not delivered");
}
