//! The HTTP endpoint's Prometheus exposition, read by a real parser (`prometheus-parse`)
//! and checked line by line against the 0.0.4 text format, with counters compared to the
//! traffic the test made; its bearer token: who needs one, for what, on which address;
//! and when `ringmq::start` runs it, or refuses to.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use prometheus_parse::{LineInfo, Sample, Scrape, Value as Metric};
use ringmq::codec::QoS;
use ringmq::config::HttpSettings;
use ringmq::{Config, Shutdown, StartError};
use serde_json::json;

use crate::common::{client_id_on, TestBroker};
use crate::http::client::{self, get, get_json, request, wait_until, Reply};
use crate::qos::helpers::Peer;

/// One scrape: the text as served and what the parser made of it.
struct Exposition {
    scrape: Scrape,
    /// Each family's declared type, by its name.
    types: HashMap<String, String>,
}

impl Exposition {
    fn fetch(http: SocketAddr) -> Exposition {
        let reply = get(http, "/metrics");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
        let text = reply.text();
        let types = check_format(&text);
        let scrape =
            Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("prometheus-parse reads it");
        Exposition { scrape, types }
    }

    fn samples(&self, name: &str) -> Vec<&Sample> {
        let found: Vec<&Sample> = self.scrape.samples.iter().filter(|s| s.metric == name).collect();
        assert!(!found.is_empty(), "no samples of {name}");
        found
    }

    /// The family's samples, which must all have exactly `labels` and be of `kind`.
    fn family(&self, name: &str, kind: &str, labels: &[&str]) -> Vec<&Sample> {
        assert_eq!(self.types.get(name).map(String::as_str), Some(kind), "TYPE of {name}");
        let samples = self.samples(name);
        for s in &samples {
            let mut have: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            have.sort_unstable();
            let mut want = labels.to_vec();
            want.sort_unstable();
            assert_eq!(have, want, "labels of {name}: {s:?}");
            let typed = match (&s.value, kind) {
                (Metric::Counter(v), "counter") | (Metric::Gauge(v), "gauge") => v.is_finite() && *v >= 0.0,
                (Metric::Histogram(_), "histogram") => true,
                _ => false,
            };
            assert!(typed, "{name} is a {kind}: {s:?}");
        }
        samples
    }

    /// The sum of a counter or gauge's samples whose labels include `filter`.
    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .iter()
            .filter(|s| filter.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => v,
                _ => panic!("{name} is not a single value: {s:?}"),
            })
            .sum()
    }
}

/// Checks the exposition line by line, strictly (prometheus-parse skips what it cannot
/// read): every line is a HELP, a TYPE or a sample of the family last declared, every
/// family has both, no series appears twice, counters end in `_total`. Returns the types.
fn check_format(text: &str) -> HashMap<String, String> {
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let name_ok = |n: &str| {
        n.chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    let (mut types, mut helps) = (HashMap::new(), HashSet::new());
    let mut series = HashSet::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let words: Vec<&str> = line.splitn(4, ' ').collect();
        match words.as_slice() {
            ["#", "HELP", name, help] => {
                assert!(matches!(LineInfo::parse(line), LineInfo::Doc { .. }), "{line}");
                assert!(!help.is_empty() && helps.insert(name.to_string()), "HELP once for {name}");
            }
            ["#", "TYPE", name, kind] => {
                assert!(matches!(LineInfo::parse(line), LineInfo::Type { .. }), "{line}");
                assert!(name_ok(name), "metric name {name:?}");
                assert!(["counter", "gauge", "histogram"].contains(kind), "{line}");
                assert!(helps.contains(*name), "HELP before TYPE for {name}");
                assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice for {name}");
                if *kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name} ends in _total");
                }
                current = Some((name.to_string(), kind.to_string()));
            }
            _ => {
                let LineInfo::Sample { metric_name, labels, value, timestamp } = LineInfo::parse(line) else {
                    panic!("not a sample line: {line:?}");
                };
                assert_eq!(timestamp, None, "{line}");
                let (family, kind) =
                    current.as_ref().unwrap_or_else(|| panic!("sample before any TYPE: {line}"));
                let allowed = if kind == "histogram" {
                    ["_bucket", "_sum", "_count"].iter().any(|s| metric_name == format!("{family}{s}"))
                } else {
                    metric_name == family
                };
                assert!(allowed, "{metric_name} under the TYPE of {family}");
                assert!(value == "+Inf" || value.parse::<f64>().is_ok_and(f64::is_finite), "value of {line}");
                if let Some(labels) = labels {
                    check_labels(labels, line);
                }
                assert!(
                    series.insert(format!("{metric_name}{{{}}}", labels.unwrap_or(""))),
                    "series twice: {line}"
                );
            }
        }
    }
    let declared: HashSet<&String> = types.keys().collect();
    assert_eq!(declared, helps.iter().collect(), "every family has HELP and TYPE");
    types
}

/// `name="value",...` with valid names and escapes only.
fn check_labels(labels: &str, line: &str) {
    let mut rest = labels;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("label in {line}"));
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "label {name:?} in {line}"
        );
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    assert!(matches!(chars.next(), Some((_, '\\' | '"' | 'n'))), "escape in {line}")
                }
                Some((i, '"')) => break i,
                Some(_) => {}
                None => panic!("unterminated label value in {line}"),
            }
        };
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or_else(|| {
            assert!(rest.is_empty(), "after a label value in {line}");
            rest
        });
    }
}

/// A histogram family: one series per core, buckets ascending to +Inf, cumulative, and
/// `_count` equal to the +Inf bucket. Returns the observations, all cores together.
fn check_histogram(m: &Exposition, name: &str) -> f64 {
    let mut total = 0.0;
    let series = m.family(name, "histogram", &["core"]);
    assert_eq!(series.len(), 2, "{name}: one per core");
    for s in series {
        let Metric::Histogram(buckets) = &s.value else { unreachable!() };
        assert!(buckets.len() > 2, "{name}: {buckets:?}");
        assert!(
            buckets.windows(2).all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count),
            "{name}: {buckets:?}"
        );
        let last = buckets.last().unwrap();
        assert!(last.less_than.is_infinite(), "{name} ends with +Inf");
        let core = s.labels.get("core").unwrap();
        assert_eq!(m.sum(&format!("{name}_count"), &[("core", core)]), last.count, "{name}_count");
        assert!(m.sum(&format!("{name}_sum"), &[("core", core)]) >= 0.0);
        total += last.count;
    }
    total
}

#[test]
fn the_metrics_parse_as_prometheus_text_and_count_the_traffic_exactly() {
    // `$SYS` stays on (every 10 s, the first at start): it is routed, not received, and
    // nobody here subscribes to it, so it moves none of the counters compared below.
    let broker = TestBroker::start_with(|c| c.http = Some(client::settings(None)));
    let http = broker.broker().http_addr().unwrap();
    client::api_connected(http, None);
    let before = Exposition::fetch(http);
    for family in
        ["ringmq_messages_received_total", "ringmq_messages_sent_total", "ringmq_messages_dropped_total"]
    {
        assert_eq!(before.sum(family, &[]), 0.0, "{family} at start");
    }

    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "m-sub"));
    sub.subscribe_granted("m/t", QoS::AtLeastOnce);
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "m-pub"));
    publisher.publish_burst("m/t", 300);
    for i in 0..300 {
        let p = sub.next_publish();
        assert_eq!(&p.payload[..], i.to_string().as_bytes());
        sub.ack(&p);
    }
    let reply = client::post(http, "/api/v1/publish", br#"{"topic":"m/t","payload":"api","qos":1}"#);
    assert_eq!(reply.json(), json!({ "topic": "m/t", "matched": true }));
    let p = sub.next_publish();
    sub.ack(&p);
    publisher.publish("nobody/listens", "x", QoS::AtMostOnce, false);
    // The PINGRESP follows the QoS 0 publish: it has been routed.
    assert!(publisher.ping().is_empty());
    let m = wait_until("bytes counted", || {
        let m = Exposition::fetch(http);
        (m.sum("ringmq_bytes_received_total", &[]) >= 3000.0
            && m.sum("ringmq_bytes_sent_total", &[]) >= 3000.0)
            .then_some(m)
    });

    let received = m.family("ringmq_messages_received_total", "counter", &["core", "qos"]);
    let sent = m.family("ringmq_messages_sent_total", "counter", &["core", "qos"]);
    for family in [&received, &sent] {
        let mut series: Vec<(&str, &str)> =
            family.iter().map(|s| (s.labels.get("core").unwrap(), s.labels.get("qos").unwrap())).collect();
        series.sort_unstable();
        assert_eq!(series, [("0", "0"), ("0", "1"), ("0", "2"), ("1", "0"), ("1", "1"), ("1", "2")]);
    }
    // 300 from the client and one from the API at QoS 1, one at QoS 0 that nobody wanted.
    assert_eq!(m.sum("ringmq_messages_received_total", &[]), 302.0);
    assert_eq!(m.sum("ringmq_messages_received_total", &[("qos", "1")]), 301.0);
    assert_eq!(m.sum("ringmq_messages_received_total", &[("qos", "0")]), 1.0);
    // Counted where published: the client's core, and the topic's owner for the API.
    let api_core = ringmq::broker::placement::owner("m/t", 2);
    let on_core_1 = 300.0 + f64::from(u8::from(api_core == 1));
    assert_eq!(m.sum("ringmq_messages_received_total", &[("core", "1"), ("qos", "1")]), on_core_1);
    assert_eq!(m.sum("ringmq_messages_sent_total", &[]), 301.0);
    // Counted where delivered: the subscriber's core.
    assert_eq!(m.sum("ringmq_messages_sent_total", &[("core", "0"), ("qos", "1")]), 301.0);

    let dropped = m.family("ringmq_messages_dropped_total", "counter", &["core", "reason"]);
    let reasons: HashSet<&str> = dropped.iter().map(|s| s.labels.get("reason").unwrap()).collect();
    for reason in
        ["queue_full", "expired", "too_large", "no_subscribers", "not_authorized", "slow_consumer", "offline"]
    {
        assert!(reasons.contains(reason), "reason {reason} in {reasons:?}");
    }
    assert_eq!(m.sum("ringmq_messages_dropped_total", &[("reason", "no_subscribers")]), 1.0);
    assert_eq!(m.sum("ringmq_messages_dropped_total", &[]), 1.0);

    let connections = m.family("ringmq_connections", "gauge", &["listener"]);
    assert_eq!(connections.len(), 1);
    assert_eq!(connections[0].labels.get("listener"), Some(format!("tcp:{}", broker.addr).as_str()));
    assert_eq!(m.sum("ringmq_connections", &[]), 2.0);
    m.family("ringmq_sessions", "gauge", &["state"]);
    assert_eq!(m.sum("ringmq_sessions", &[("state", "connected")]), 2.0);
    assert_eq!(m.sum("ringmq_sessions", &[("state", "offline")]), 0.0);
    m.family("ringmq_bytes_received_total", "counter", &["core"]);
    m.family("ringmq_bytes_sent_total", "counter", &["core"]);
    m.family("ringmq_core_busy_ratio", "gauge", &["core"]);
    assert_eq!(m.sum("ringmq_subscriptions", &[]), 1.0);
    assert_eq!(m.sum("ringmq_ready", &[]), 1.0);
    assert_eq!(m.sum("ringmq_connects_total", &[]), 2.0);

    check_histogram(&m, "ringmq_log_flush_duration_seconds");
    // One message in 128 is timed, counted per core where it arrived: 300 on core 1.
    assert!(check_histogram(&m, "ringmq_delivery_latency_seconds") >= 2.0, "deliveries timed");
}

/// A token file holding `s3cret` (and a newline, which is not part of it).
fn token_file(name: &str, contents: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ringmq-http-token-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

/// A request with an `Authorization` header (and, with a body, declared as JSON).
fn with_token(addr: SocketAddr, method: &str, target: &str, authorization: &str, body: &[u8]) -> Reply {
    let mut headers = vec![("Authorization", authorization)];
    if !body.is_empty() {
        headers.push(("Content-Type", "application/json"));
    }
    request(addr, method, target, &headers, body)
}

fn assert_unauthorized(reply: &Reply) {
    reply.assert_error(401, "unauthorized");
    assert!(reply.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")), "{:?}", reply.headers);
}

#[test]
fn on_loopback_a_token_guards_changes_but_not_reads() {
    let path = token_file("loopback", "s3cret\n");
    let broker = TestBroker::start_with(|c| c.http = Some(client::settings(Some(path.clone()))));
    let http = broker.broker().http_addr().unwrap();
    client::api_connected(http, None);
    let _victim = Peer::v3(broker.addr, "victim");

    for target in
        ["/healthz", "/", "/readyz", "/metrics", "/api/v1/stats", "/api/v1/clients", "/api/v1/retained"]
    {
        assert_eq!(get(http, target).status, 200, "GET {target} without a token on loopback");
    }
    let publish = br#"{"topic":"t/a","payload":"x"}"#;
    assert_unauthorized(&request(http, "POST", "/api/v1/publish", &[], publish));
    assert_unauthorized(&request(http, "DELETE", "/api/v1/clients/victim", &[], b""));
    assert_unauthorized(&request(http, "DELETE", "/api/v1/retained/t%2Fa", &[], b""));
    for wrong in [
        "Bearer wrong",
        "Bearer s3cret2",
        "Bearer s3cre",
        "Bearer S3CRET",
        "Basic s3cret",
        "s3cret",
        "Bearer",
    ] {
        assert_unauthorized(&with_token(http, "POST", "/api/v1/publish", wrong, publish));
        assert_unauthorized(&with_token(http, "DELETE", "/api/v1/clients/victim", wrong, b""));
    }
    assert!(get_json(http, "/api/v1/clients/victim")["connected"] == true, "nothing was done");

    let reply = with_token(http, "POST", "/api/v1/publish", "Bearer s3cret", publish);
    assert_eq!((reply.status, reply.json()["matched"].clone()), (200, json!(false)));
    assert_eq!(with_token(http, "DELETE", "/api/v1/clients/victim", "bearer s3cret", b"").status, 204);
    with_token(http, "DELETE", "/api/v1/clients/victim", "Bearer s3cret", b"").assert_error(404, "not_found");
    let _ = std::fs::remove_file(path);
}

#[test]
fn off_loopback_reads_need_the_token_too() {
    // 0.0.0.0 is not a loopback address, yet reachable through 127.0.0.1.
    let path = token_file("any", "s3cret\n");
    let broker = TestBroker::start_with(|c| {
        c.http = Some(HttpSettings {
            bind: "0.0.0.0:0".parse().unwrap(),
            token_file: Some(path.clone()),
            required: true,
        })
    });
    let port = broker.broker().http_addr().unwrap().port();
    let http: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    client::api_connected(http, Some("Bearer s3cret"));
    for target in ["/healthz", "/"] {
        assert_eq!(get(http, target).status, 200, "GET {target} needs no token");
    }
    for target in [
        "/readyz",
        "/metrics",
        "/api/v1/stats",
        "/api/v1/clients",
        "/api/v1/clients/x",
        "/api/v1/subscriptions",
        "/api/v1/retained",
    ] {
        assert_unauthorized(&get(http, target));
        assert_unauthorized(&with_token(http, "GET", target, "Bearer nope", b""));
    }
    assert_eq!(with_token(http, "GET", "/api/v1/stats", "Bearer s3cret", b"").status, 200);
    assert_eq!(with_token(http, "GET", "/metrics", "Bearer s3cret", b"").status, 200);
    assert_unauthorized(&request(http, "POST", "/api/v1/publish", &[], br#"{"topic":"a"}"#));
    let _ = std::fs::remove_file(path);
}

fn start_error(http: HttpSettings) -> StartError {
    let mut config = Config::new("127.0.0.1:0".parse().unwrap());
    config.cores = 2;
    config.io_memory = 512 * 1024;
    config.http = Some(http);
    match ringmq::start(config, Shutdown::new()) {
        Ok(broker) => {
            broker.stop();
            panic!("the broker started");
        }
        Err(err) => err,
    }
}

#[test]
fn start_refuses_an_open_bind_without_a_token_and_bad_token_files() {
    let open = HttpSettings { bind: "0.0.0.0:0".parse().unwrap(), token_file: None, required: true };
    let err = start_error(open);
    assert!(matches!(&err, StartError::Http(why) if why.contains("token")), "{err:?}");
    let v6 = HttpSettings { bind: "[::]:0".parse().unwrap(), token_file: None, required: false };
    assert!(matches!(start_error(v6), StartError::Http(_)));

    let empty = token_file("empty", "\nsecond line\n");
    let err = start_error(client::settings(Some(empty.clone())));
    assert!(matches!(&err, StartError::Http(_)), "{err:?}");
    let _ = std::fs::remove_file(empty);
    let err = start_error(client::settings(Some(PathBuf::from("/nonexistent/ringmq-token"))));
    assert!(matches!(&err, StartError::Http(_)), "{err:?}");
}

#[test]
fn the_endpoint_is_off_unless_configured() {
    let broker = TestBroker::start();
    assert_eq!(broker.broker().http_addr(), None);
}

#[test]
fn a_taken_address_stops_the_start_only_when_required() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = start_error(HttpSettings { bind: addr, token_file: None, required: true });
    assert!(matches!(&err, StartError::Bind { addr: a, .. } if *a == addr), "{err:?}");
    // The default address, taken: the broker runs without its endpoint.
    let broker = TestBroker::start_with(|c| {
        c.http = Some(HttpSettings { bind: addr, token_file: None, required: false })
    });
    assert_eq!(broker.broker().http_addr(), None);
}

/// What a web page in the operator's browser must not do to a loopback endpoint without a
/// token: read it through a rebound DNS name, write to it from another origin, or publish
/// with a body a cross-site form can send.
#[test]
fn foreign_pages_can_neither_read_nor_write() {
    let (broker, http) = client::start(|_| {});
    let raw = |head: String| client::exchange(http, head.as_bytes());
    let reply = raw(format!(
        "GET /api/v1/stats HTTP/1.1\r\nHost: evil.example:{}\r\nConnection: close\r\n\r\n",
        http.port()
    ));
    reply.assert_error(403, "forbidden");
    let reply = raw("GET /api/v1/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".into());
    assert_eq!(reply.status, 200, "localhost is loopback");

    let publish = br#"{"topic":"f/a","payload":"x"}"#;
    let json = ("Content-Type", "application/json");
    let foreign =
        request(http, "POST", "/api/v1/publish", &[json, ("Origin", "https://evil.example")], publish);
    foreign.assert_error(403, "forbidden");
    let own = format!("http://{http}");
    let same = request(http, "POST", "/api/v1/publish", &[json, ("Origin", own.as_str())], publish);
    assert_eq!(same.status, 200, "{}", same.text());
    let form = request(http, "POST", "/api/v1/publish", &[("Content-Type", "text/plain")], publish);
    form.assert_error(415, "unsupported_media_type");
    let kick = request(http, "DELETE", "/api/v1/clients/x", &[("Origin", "https://evil.example")], b"");
    kick.assert_error(403, "forbidden");

    let page = get(http, "/");
    let policy = page.header("content-security-policy").unwrap_or_default().to_string();
    assert!(policy.contains("script-src 'sha256-") && policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    drop(broker);
}

/// SIGHUP (`Broker::reload_auth`) reads the token file again: the old token stops working,
/// the new one works; a file that no longer reads keeps the token in force.
#[test]
fn a_reload_replaces_the_token() {
    let path = token_file("reload", "old-token\n");
    let broker = TestBroker::start_with(|c| c.http = Some(client::settings(Some(path.clone()))));
    let http = broker.broker().http_addr().unwrap();
    client::api_connected(http, Some("Bearer old-token"));
    let publish = br#"{"topic":"r/a","payload":"x"}"#;
    assert_eq!(with_token(http, "POST", "/api/v1/publish", "Bearer old-token", publish).status, 200);

    std::fs::write(&path, "new-token\n").unwrap();
    broker.broker().reload_auth();
    assert_unauthorized(&with_token(http, "POST", "/api/v1/publish", "Bearer old-token", publish));
    assert_eq!(with_token(http, "POST", "/api/v1/publish", "Bearer new-token", publish).status, 200);

    std::fs::write(&path, "\n").unwrap();
    broker.broker().reload_auth();
    assert_eq!(with_token(http, "POST", "/api/v1/publish", "Bearer new-token", publish).status, 200, "kept");
    let _ = std::fs::remove_file(path);
}
