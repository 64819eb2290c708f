//! [`ClusterStore`] on a real etcd (v3 API), through the JSON gateway etcd serves on its
//! client port: HTTP/1.1 `POST /v3/...` with base64 keys and values, numbers as strings.
//! Blocking, over a plain `TcpStream`: the control thread is its only user, and this needs
//! neither `protoc` nor a gRPC stack nor a second async runtime (see docs/ARCHITECTURE.md).
//! [`EtcdWatch`] reads the watch stream (`POST /v3/watch`, one JSON object per line) on a
//! thread of its own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use super::store::{ClusterStore, Compare, Event, KeyValue, LeaseId, Op, Revision, StoreError, TxnResult};

/// The largest response read (a range over many routes): beyond it the store counts as
/// unavailable rather than the node holding an unbounded body.
const MAX_BODY: usize = 256 << 20;
/// The longest header line or chunk-size line.
const MAX_LINE: usize = 16 << 10;

/// Where etcd listens: `host:port` endpoints, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints(pub Vec<String>);

impl Endpoints {
    /// Parses `etcd://HOST:PORT[,HOST:PORT…]` (`http://` is accepted too).
    pub fn parse(url: &str) -> Result<Endpoints, String> {
        let rest = url
            .strip_prefix("etcd://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| format!("{url:?}: expected etcd://HOST:PORT[,HOST:PORT…]"))?;
        let hosts: Vec<String> =
            rest.trim_end_matches('/').split(',').map(str::trim).map(str::to_string).collect();
        if hosts.iter().any(|h| h.is_empty() || !h.contains(':')) {
            return Err(format!("{url:?}: every endpoint needs HOST:PORT"));
        }
        Ok(Endpoints(hosts))
    }
}

/// A blocking etcd client: one keep-alive HTTP connection, moved to the next endpoint
/// when it fails.
pub struct EtcdStore {
    endpoints: Endpoints,
    next: usize,
    conn: Option<HttpConn>,
    timeout: Duration,
}

impl EtcdStore {
    /// `timeout` bounds each request (connect, write, read): past it etcd counts as
    /// unavailable.
    pub fn new(endpoints: Endpoints, timeout: Duration) -> EtcdStore {
        EtcdStore { endpoints, next: 0, conn: None, timeout }
    }

    fn call(&mut self, path: &str, body: &Value) -> Result<Value, StoreError> {
        let body = body.to_string();
        if self.conn.is_none() {
            self.conn = Some(connect_any(&self.endpoints, &mut self.next, self.timeout)?);
        }
        let Some(conn) = self.conn.as_mut() else { return Err(unavailable("no connection")) };
        // Not retried after a failure: a transaction may have been applied before the
        // answer was lost, and only its caller knows whether running it again is safe.
        match conn.request(path, &body) {
            Ok((status, value)) => {
                if status >= 500 {
                    // A member without a leader or quorum answers 503: the next one may
                    // have both.
                    self.conn = None;
                    self.next += 1;
                }
                answer(status, value)
            }
            Err(err) => {
                self.conn = None;
                self.next += 1;
                Err(unavailable(&err.to_string()))
            }
        }
    }
}

impl ClusterStore for EtcdStore {
    fn grant_lease(&mut self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        let ttl = ttl_ms.div_ceil(1000).max(1);
        let v = self.call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() }))?;
        int(&v["ID"]).filter(|id| *id != 0).ok_or_else(|| unavailable("lease grant: no ID"))
    }

    fn keep_alive(&mut self, lease: LeaseId) -> Result<(), StoreError> {
        let v = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        // An unknown lease answers without a TTL (0).
        match int(&v["result"]["TTL"]) {
            Some(ttl) if ttl > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    fn revoke(&mut self, lease: LeaseId) -> Result<(), StoreError> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })).map_err(|err| match err {
            StoreError::Unavailable(m) if m.contains("lease not found") => StoreError::LeaseNotFound(lease),
            other => other,
        })?;
        Ok(())
    }

    fn txn(&mut self, compare: &[Compare], success: &[Op], failure: &[Op]) -> Result<TxnResult, StoreError> {
        let compare: Vec<Value> = compare.iter().map(compare_json).collect();
        let ops = |ops: &[Op]| ops.iter().map(op_json).collect::<Vec<Value>>();
        let body = json!({ "compare": compare, "success": ops(success), "failure": ops(failure) });
        let v = self.call("/v3/kv/txn", &body).map_err(|err| lease_error(err, success, failure))?;
        Ok(TxnResult { succeeded: v["succeeded"].as_bool().unwrap_or(false), revision: revision(&v)? })
    }

    fn range(&mut self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let body = json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&range_end(prefix)) });
        let v = self.call("/v3/kv/range", &body)?;
        let kvs = key_values(&v)?;
        Ok((kvs, revision(&v)?))
    }

    fn range_page(
        &mut self,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<(Vec<KeyValue>, bool), StoreError> {
        let start = from.max(prefix);
        let body = json!({
            "key": b64(start.as_bytes()),
            "range_end": b64(&range_end(prefix)),
            "limit": limit.to_string(),
        });
        let v = self.call("/v3/kv/range", &body)?;
        let kvs = key_values(&v)?;
        Ok((kvs, v["more"].as_bool().unwrap_or(false)))
    }
}

/// A watch on a prefix from a revision: blocks for the next changes.
pub struct EtcdWatch {
    reader: BufReader<ChunkedBody<BufReader<TcpStream>>>,
    stream: TcpStream,
}

impl EtcdWatch {
    /// Watches keys starting with `prefix`, from the revision after `after` on.
    pub fn open(
        endpoints: &Endpoints,
        prefix: &str,
        after: Revision,
        timeout: Duration,
    ) -> Result<EtcdWatch, StoreError> {
        let mut next = 0;
        let conn = connect_any(endpoints, &mut next, timeout)?;
        let body = json!({ "create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&range_end(prefix)),
            "start_revision": (after + 1).to_string(),
            "prev_kv": true,
        }})
        .to_string();
        let HttpConn { mut reader, host } = conn;
        let stream = reader.get_ref().try_clone().map_err(|e| unavailable(&e.to_string()))?;
        write_request(reader.get_mut(), &host, "/v3/watch", &body)
            .map_err(|e| unavailable(&e.to_string()))?;
        let (status, framing) = read_head(&mut reader).map_err(|e| unavailable(&e.to_string()))?;
        if status != 200 || framing != Framing::Chunked {
            return Err(unavailable(&format!("watch answered HTTP {status}")));
        }
        // Changes may be minutes apart: no read timeout (`close` ends a wait).
        let _ = stream.set_read_timeout(None);
        // The bytes already buffered past the head stay with their reader.
        Ok(EtcdWatch { reader: BufReader::new(ChunkedBody::new(reader)), stream })
    }

    /// A handle that ends a blocked [`EtcdWatch::next_changes`] from another thread.
    pub fn closer(&self) -> Option<TcpStream> {
        self.stream.try_clone().ok()
    }

    /// The next changes, in order (never empty); blocks until there are some.
    pub fn next_changes(&mut self) -> Result<Vec<Event>, StoreError> {
        loop {
            let mut line = Vec::new();
            let read = (&mut self.reader).take(MAX_BODY as u64).read_until(b'\n', &mut line);
            match read {
                Ok(0) => return Err(unavailable("the watch stream ended")),
                Ok(_) => {}
                Err(err) => return Err(unavailable(&err.to_string())),
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(&line).map_err(|e| unavailable(&format!("watch: {e}")))?;
            if v.get("error").is_some() {
                return Err(unavailable(&v["error"].to_string()));
            }
            let result = &v["result"];
            if let Some(oldest) = int(&result["compact_revision"]).filter(|r| *r > 0) {
                return Err(StoreError::Compacted { requested: 0, oldest: oldest as Revision });
            }
            if result["canceled"].as_bool() == Some(true) {
                return Err(unavailable("the watch was canceled"));
            }
            let Some(events) = result["events"].as_array() else { continue };
            let mut out = Vec::with_capacity(events.len());
            for e in events {
                let kv = key_value(&e["kv"])?;
                if e["type"].as_str() == Some("DELETE") {
                    // The key as it was (prev_kv), deleted at the event's revision.
                    let mut old = match e.get("prev_kv") {
                        Some(prev) if prev.is_object() => key_value(prev)?,
                        _ => kv.clone(),
                    };
                    old.mod_revision = kv.mod_revision;
                    out.push(Event::Delete(old));
                } else {
                    out.push(Event::Put(kv));
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

fn unavailable(why: &str) -> StoreError {
    StoreError::Unavailable(why.to_string())
}

/// A failed put names its lease in the message; the caller wants the lease's id.
fn lease_error(err: StoreError, success: &[Op], failure: &[Op]) -> StoreError {
    match err {
        StoreError::Unavailable(m) if m.contains("lease not found") => {
            let lease = success.iter().chain(failure).find_map(|op| match op {
                Op::Put { lease: Some(lease), .. } => Some(*lease),
                _ => None,
            });
            lease.map_or(StoreError::Unavailable(m), StoreError::LeaseNotFound)
        }
        other => other,
    }
}

/// etcd's answer: its JSON on 200, else its error (`{"error", "code"}`).
fn answer(status: u16, v: Value) -> Result<Value, StoreError> {
    if status == 200 && v.get("error").is_none() {
        return Ok(v);
    }
    let message = v["message"].as_str().or(v["error"].as_str()).unwrap_or("no message").to_string();
    if message.contains("required revision has been compacted") {
        return Err(StoreError::Compacted { requested: 0, oldest: 0 });
    }
    Err(StoreError::Unavailable(format!("HTTP {status}: {message}")))
}

fn revision(v: &Value) -> Result<Revision, StoreError> {
    int(&v["header"]["revision"])
        .map(|r| r as Revision)
        .ok_or_else(|| unavailable("no revision in the answer"))
}

/// etcd's JSON numbers are strings (int64); an absent one is 0.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        Value::Null => Some(0),
        _ => None,
    }
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn unb64(v: &Value) -> Result<Vec<u8>, StoreError> {
    match v.as_str() {
        None => Ok(Vec::new()),
        Some(s) => B64.decode(s).map_err(|e| unavailable(&format!("base64: {e}"))),
    }
}

/// The end of a prefix range: the prefix with its last byte incremented.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the key space.
    vec![0]
}

/// The keys a range answered (none: etcd leaves the field out).
fn key_values(v: &Value) -> Result<Vec<KeyValue>, StoreError> {
    v["kvs"].as_array().map_or(Ok(Vec::new()), |kvs| kvs.iter().map(key_value).collect())
}

fn key_value(v: &Value) -> Result<KeyValue, StoreError> {
    let num = |field: &str| int(&v[field]).unwrap_or(0);
    let key = String::from_utf8(unb64(&v["key"])?).map_err(|_| unavailable("a key is not UTF-8"))?;
    Ok(KeyValue {
        key,
        value: unb64(&v["value"])?,
        create_revision: num("create_revision") as Revision,
        mod_revision: num("mod_revision") as Revision,
        version: num("version") as u64,
        lease: Some(num("lease")).filter(|l| *l != 0),
    })
}

fn compare_json(c: &Compare) -> Value {
    match c {
        Compare::ModRevision(key, rev) => json!({
            "key": b64(key.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()
        }),
        Compare::CreateRevision(key, rev) => json!({
            "key": b64(key.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": rev.to_string()
        }),
        Compare::Value(key, value) => json!({
            "key": b64(key.as_bytes()), "target": "VALUE", "result": "EQUAL", "value": b64(value)
        }),
    }
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::Put { key, value, lease } => json!({ "request_put": {
            "key": b64(key.as_bytes()), "value": b64(value), "lease": lease.unwrap_or(0).to_string()
        }}),
        Op::Delete { key } => json!({ "request_delete_range": { "key": b64(key.as_bytes()) } }),
    }
}

/// One HTTP/1.1 connection to an etcd endpoint.
struct HttpConn {
    reader: BufReader<TcpStream>,
    host: String,
}

fn connect_any(endpoints: &Endpoints, next: &mut usize, timeout: Duration) -> Result<HttpConn, StoreError> {
    let mut last = String::from("no endpoint");
    for _ in 0..endpoints.0.len() {
        let host = &endpoints.0[*next % endpoints.0.len()];
        match connect(host, timeout) {
            Ok(stream) => return Ok(HttpConn { reader: BufReader::new(stream), host: host.clone() }),
            Err(err) => {
                last = format!("{host}: {err}");
                *next += 1;
            }
        }
    }
    Err(unavailable(&last))
}

fn connect(host: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in host.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(err) => last = err,
        }
    }
    Err(last)
}

impl HttpConn {
    fn request(&mut self, path: &str, body: &str) -> std::io::Result<(u16, Value)> {
        write_request(self.reader.get_mut(), &self.host, path, body)?;
        let (status, framing) = read_head(&mut self.reader)?;
        let mut bytes = Vec::new();
        match framing {
            Framing::Length(n) if n > MAX_BODY => return Err(invalid("response too large")),
            Framing::Length(n) => {
                bytes.resize(n, 0);
                self.reader.read_exact(&mut bytes)?;
            }
            Framing::Chunked => {
                let mut body = ChunkedBody::new(&mut self.reader);
                (&mut body).take(MAX_BODY as u64 + 1).read_to_end(&mut bytes)?;
                if bytes.len() > MAX_BODY {
                    return Err(invalid("response too large"));
                }
                body.finish()?;
            }
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| invalid(&format!("etcd answered {e}")))?;
        Ok((status, value))
    }
}

fn invalid(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string())
}

fn write_request(stream: &mut TcpStream, host: &str, path: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body.as_bytes());
    stream.write_all(&request)
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
}

fn read_line(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = Vec::new();
    reader.take(MAX_LINE as u64).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Err(invalid("a line too long or cut"));
    }
    let text = String::from_utf8(line).map_err(|_| invalid("not UTF-8"))?;
    Ok(text.trim_end().to_string())
}

/// The status and how the body is framed.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<(u16, Framing)> {
    let status_line = read_line(reader)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(&format!("bad status line {status_line:?}")))?;
    let mut framing = Framing::Length(0);
    for _ in 0..100 {
        let line = read_line(reader)?;
        if line.is_empty() {
            return Ok((status, framing));
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            framing = Framing::Length(value.parse().map_err(|_| invalid("bad Content-Length"))?);
        } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            framing = Framing::Chunked;
        }
    }
    Err(invalid("too many header lines"))
}

/// A chunked body as a byte stream; EOF at the last chunk.
struct ChunkedBody<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> ChunkedBody<R> {
    fn new(inner: R) -> Self {
        ChunkedBody { inner, left: 0, done: false }
    }

    /// Reads the trailers after the last chunk, leaving the connection at the next answer.
    fn finish(&mut self) -> std::io::Result<()> {
        if !self.done {
            return Err(invalid("body not read to its end"));
        }
        for _ in 0..100 {
            if read_line(&mut self.inner)?.is_empty() {
                return Ok(());
            }
        }
        Err(invalid("too many trailer lines"))
    }
}

impl<R: BufRead> Read for ChunkedBody<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let line = read_line(&mut self.inner)?;
            let size = line.split(';').next().unwrap_or("").trim();
            self.left = usize::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        if self.left == 0 && !read_line(&mut self.inner)?.is_empty() {
            return Err(invalid("a chunk without its CRLF"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_ranges_end_after_the_prefix() {
        let e = Endpoints::parse("etcd://127.0.0.1:2379,10.0.0.2:2379").unwrap();
        assert_eq!(e.0, ["127.0.0.1:2379", "10.0.0.2:2379"]);
        assert!(Endpoints::parse("127.0.0.1:2379").is_err());
        assert!(Endpoints::parse("etcd://host").is_err());
        assert_eq!(range_end("/ringmq/"), b"/ringmq0");
        assert_eq!(int(&json!("42")), Some(42));
        assert_eq!(int(&Value::Null), Some(0));
    }

    #[test]
    fn a_chunked_body_reads_to_its_last_chunk_and_trailers() {
        let raw = b"5\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let mut reader = std::io::Cursor::new(&raw[..]);
        let mut body = ChunkedBody::new(&mut reader);
        let mut out = Vec::new();
        body.read_to_end(&mut out).unwrap();
        body.finish().unwrap();
        assert_eq!(out, b"hello world");
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[test]
    fn watch_events_and_errors_decode() {
        let kv = json!({"key": b64(b"/k"), "value": b64(b"v"), "create_revision": "3", "mod_revision": "5", "version": "2", "lease": "7"});
        let parsed = key_value(&kv).unwrap();
        assert_eq!((parsed.key.as_str(), parsed.value.as_slice()), ("/k", &b"v"[..]));
        assert_eq!(
            (parsed.create_revision, parsed.mod_revision, parsed.version, parsed.lease),
            (3, 5, 2, Some(7))
        );
        let err = answer(404, json!({"error": "etcdserver: requested lease not found", "code": 5}));
        assert!(matches!(err, Err(StoreError::Unavailable(m)) if m.contains("lease not found")));
        let err = lease_error(
            StoreError::Unavailable("lease not found".into()),
            &[Op::Put { key: "/a".into(), value: vec![], lease: Some(9) }],
            &[],
        );
        assert_eq!(err, StoreError::LeaseNotFound(9));
    }
}
