//! HTTP/1.1 as the endpoint needs it, pure: a request head parsed from bytes (bounded),
//! a response encoded to bytes. No I/O here.

/// Bytes a request head may have.
pub const MAX_HEAD: usize = 16 * 1024;
/// Bytes a request body may have (a publish's payload, base64 included).
pub const MAX_BODY: usize = 1 << 20;
/// Headers a request may have.
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("request body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::Malformed(_) => 400,
        }
    }
}

/// A request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The path, percent-decoded per segment by the caller (kept raw here).
    pub path: String,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub content_length: usize,
    /// HTTP/1.1 without `Connection: close` (or 1.0 with keep-alive).
    pub keep_alive: bool,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// A query parameter given a value (`?prefix=` counts as not given).
    pub fn given(&self, name: &str) -> Option<&str> {
        self.param(name).filter(|v| !v.is_empty())
    }

    /// The bearer token of an `Authorization` header.
    pub fn bearer(&self) -> Option<&str> {
        let value = self.header("authorization")?;
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }
}

/// Parses a request head from the front of `buf`: `Ok(None)` while it is incomplete,
/// else the head and the bytes it took.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD { Err(HttpError::HeadTooLarge) } else { Ok(None) };
    };
    if end > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::Malformed("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or(HttpError::Malformed("no request line"))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("request line"));
    };
    if !method.bytes().all(|b| b.is_ascii_uppercase()) || method.is_empty() {
        return Err(HttpError::Malformed("method"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(HttpError::Malformed("HTTP version")),
    };
    if !target.starts_with('/') {
        return Err(HttpError::Malformed("request target"));
    }
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(HttpError::HeadTooLarge);
        }
        let (name, value) = line.split_once(':').ok_or(HttpError::Malformed("header line"))?;
        if name.is_empty() || name.contains(' ') {
            return Err(HttpError::Malformed("header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let find_header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    if find_header("transfer-encoding").is_some() {
        return Err(HttpError::Malformed("chunked bodies are not accepted: send Content-Length"));
    }
    let content_length = match find_header("content-length") {
        Some(v) => v.parse::<usize>().map_err(|_| HttpError::Malformed("Content-Length"))?,
        None => 0,
    };
    if content_length > MAX_BODY {
        return Err(HttpError::BodyTooLarge);
    }
    let connection = find_header("connection").map(str::to_ascii_lowercase);
    let keep_alive = match connection.as_deref() {
        Some(c) if c.contains("close") => false,
        Some(c) if c.contains("keep-alive") => true,
        _ => http11,
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, parse_query(query)),
        None => (target, Vec::new()),
    };
    let head = Head {
        method: method.to_string(),
        path: path.to_string(),
        query,
        headers,
        content_length,
        keep_alive,
    };
    Ok(Some((head, end + 4)))
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode_component(k, true), decode_component(v, true)),
            None => (decode_component(pair, true), String::new()),
        })
        .collect()
}

/// Percent-decodes (and, in a query, `+` as space); invalid escapes are kept as they are,
/// invalid UTF-8 replaced.
pub fn decode_component(text: &str, query: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' if query => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: Option<&u8>) -> Option<u8> {
    match b? {
        b @ b'0'..=b'9' => Some(b - b'0'),
        b @ b'a'..=b'f' => Some(b - b'a' + 10),
        b @ b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A response to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra header lines (`Name: value`).
    pub headers: Vec<String>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
            headers: Vec::new(),
        }
    }

    /// An error as `{"error": code, "message": text}`.
    pub fn error(status: u16, code: &str, message: impl std::fmt::Display) -> Response {
        Response::json(status, &serde_json::json!({ "error": code, "message": message.to_string() }))
    }

    pub fn no_content() -> Response {
        Response { status: 204, content_type: "", body: Vec::new(), headers: Vec::new() }
    }

    /// The bytes on the wire; `head_only` for a HEAD request.
    pub fn encode(&self, keep_alive: bool, head_only: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if !self.content_type.is_empty() {
            out.push_str(&format!("Content-Type: {}\r\n", self.content_type));
        }
        if self.status != 204 {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n");
        for header in &self.headers {
            out.push_str(header);
            out.push_str("\r\n");
        }
        out.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_get_with_query_and_headers() {
        let raw = b"GET /api/v1/clients?prefix=a%2Fb&limit=5&x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer s3cret\r\n\r\nrest";
        let (head, used) = parse_head(raw).unwrap().unwrap();
        assert_eq!(used, raw.len() - 4);
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/api/v1/clients");
        assert_eq!(head.param("prefix"), Some("a/b"));
        assert_eq!(head.param("limit"), Some("5"));
        assert_eq!(head.param("x"), Some(""));
        assert_eq!(head.bearer(), Some("s3cret"));
        assert!(head.keep_alive);
    }

    #[test]
    fn incomplete_heads_wait_and_bounds_hold() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let big = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(parse_head(&big), Err(HttpError::HeadTooLarge));
        let body = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(parse_head(body.as_bytes()), Err(HttpError::BodyTooLarge));
        assert!(matches!(parse_head(b"GET / HTTP/2\r\n\r\n"), Err(HttpError::Malformed(_))));
        assert!(matches!(parse_head(b"get / HTTP/1.1\r\n\r\n"), Err(HttpError::Malformed(_))));
        assert!(matches!(parse_head(b"GET x HTTP/1.1\r\n\r\n"), Err(HttpError::Malformed(_))));
        assert!(matches!(
            parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        let (head, _) = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!head.keep_alive);
    }

    #[test]
    fn percent_decoding_keeps_what_it_cannot_decode() {
        assert_eq!(decode_component("a%2Fb%20c", false), "a/b c");
        assert_eq!(decode_component("a+b", true), "a b");
        assert_eq!(decode_component("a+b", false), "a+b");
        assert_eq!(decode_component("100%", false), "100%");
        assert_eq!(decode_component("%zz%4", false), "%zz%4");
        assert_eq!(decode_component("%23", false), "#");
    }

    #[test]
    fn responses_carry_length_and_connection() {
        let r = Response::error(404, "not_found", "no such client");
        let text = String::from_utf8(r.encode(false, false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with(r#"{"error":"not_found","message":"no such client"}"#), "{text}");
        let text = String::from_utf8(Response::no_content().encode(true, false)).unwrap();
        assert!(!text.contains("Content-Length"), "{text}");
    }
}
