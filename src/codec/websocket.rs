//! MQTT over WebSocket (RFC 6455, MQTT 5.0 §6): the HTTP upgrade a client opens with, and
//! the frames that carry MQTT bytes after it. Pure: bytes in, requests, payload bytes and
//! control frames out. MQTT rides in binary frames only (MQTT-6.0.0-1); a packet may be
//! split over frames and a frame may hold several packets, so frames decode to a byte
//! stream the MQTT decoder reads as it reads TCP.

use bytes::{Buf, BytesMut};

/// Longest HTTP upgrade request accepted (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Subprotocols a client may ask for, in order of preference.
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// A valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub path: String,
    pub key: String,
    /// The subprotocol chosen from the client's list (`None` when it offered none).
    pub protocol: Option<&'static str>,
    pub origin: Option<String>,
    /// Bytes the request took: what follows is already WebSocket frames.
    pub len: usize,
}

/// Why an upgrade or a frame was refused: the HTTP status to answer an upgrade with, or the
/// close code for a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("bad upgrade request: {0}")]
    BadRequest(&'static str),
    #[error("upgrade request longer than 8 KiB")]
    RequestTooLarge,
    #[error("a text frame (MQTT rides in binary frames, MQTT-6.0.0-1)")]
    TextFrame,
    #[error("an unmasked frame from a client (RFC 6455 §5.1)")]
    Unmasked,
    #[error("a frame of {0} bytes, more than the largest packet allowed")]
    TooLarge(u64),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl WsError {
    /// The close code a frame error is answered with (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::TextFrame => 1003,
            WsError::TooLarge(_) => 1009,
            _ => 1002,
        }
    }
}

/// Reads an upgrade request from the front of `buf`: `Ok(None)` while incomplete.
pub fn parse_upgrade(buf: &[u8]) -> Result<Option<Upgrade>, WsError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_REQUEST { Err(WsError::RequestTooLarge) } else { Ok(None) };
    };
    if end + 4 > MAX_REQUEST {
        return Err(WsError::RequestTooLarge);
    }
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| WsError::BadRequest("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (Some("GET"), Some(path), Some(version)) = (request.next(), request.next(), request.next()) else {
        return Err(WsError::BadRequest("not a GET request"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(WsError::BadRequest("not HTTP/1.1"));
    }
    let (mut key, mut upgrade, mut connection, mut ws_version, mut protocols, mut origin) =
        (None, false, false, false, Vec::new(), None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(WsError::BadRequest("a header line without a colon"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "connection" => connection = value.split(',').any(|v| v.trim().eq_ignore_ascii_case("upgrade")),
            "sec-websocket-key" => key = Some(value.to_string()),
            "sec-websocket-version" => ws_version = value == "13",
            "sec-websocket-protocol" => protocols.extend(value.split(',').map(|p| p.trim().to_string())),
            "origin" => origin = Some(value.to_string()),
            _ => {}
        }
    }
    if !upgrade || !connection {
        return Err(WsError::BadRequest("not a WebSocket upgrade"));
    }
    if !ws_version {
        return Err(WsError::BadRequest("Sec-WebSocket-Version is not 13"));
    }
    let key = key.filter(|k| !k.is_empty()).ok_or(WsError::BadRequest("no Sec-WebSocket-Key"))?;
    let protocol = if protocols.is_empty() {
        None
    } else {
        let chosen = SUBPROTOCOLS.iter().find(|ours| protocols.iter().any(|p| p.eq_ignore_ascii_case(ours)));
        Some(*chosen.ok_or(WsError::BadRequest("no MQTT subprotocol offered"))?)
    };
    Ok(Some(Upgrade { path: path.to_string(), key, protocol, origin, len: end + 4 }))
}

/// The 101 response that completes an upgrade.
pub fn accept_response(upgrade: &Upgrade) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(&upgrade.key)
    );
    if let Some(protocol) = upgrade.protocol {
        out.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// An HTTP error answer to a request that is not a valid upgrade here.
pub fn error_response(status: u16, reason: &str) -> Vec<u8> {
    let text = match status {
        404 => "Not Found",
        403 => "Forbidden",
        _ => "Bad Request",
    };
    format!(
        "HTTP/1.1 {status} {text}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nSec-WebSocket-Version: 13\r\n\r\n{reason}",
        reason.len()
    )
    .into_bytes()
}

/// `Sec-WebSocket-Accept` for a client's key: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(GUID);
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64(digest.as_ref())
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A control frame a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// To be answered with a pong carrying the same payload.
    Ping(Vec<u8>),
    /// The client closes: answer with a close and end the connection.
    Close,
}

/// Decodes frames into the MQTT byte stream. Whole frames only: a frame waits in the input
/// until complete, so the input holds at most one frame (`max_frame` bytes and its header)
/// beyond what has been decoded.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    pub max_frame: u64,
    /// The frames come from a client (masked, as they must be) rather than from a server
    /// (unmasked: the load generator's side).
    pub from_client: bool,
}

impl FrameDecoder {
    /// Moves every complete frame at the front of `input` out: data to `out`, control
    /// frames returned. Stops at the first close.
    pub fn decode(&self, input: &mut BytesMut, out: &mut BytesMut) -> Result<Vec<Control>, WsError> {
        let mut controls = Vec::new();
        while input.len() >= 2 {
            let (b0, b1) = (input[0], input[1]);
            if b0 & 0x70 != 0 {
                return Err(WsError::Malformed("reserved bits set"));
            }
            let opcode = b0 & 0x0F;
            let masked = b1 & 0x80 != 0;
            if masked != self.from_client {
                return Err(if masked {
                    WsError::Malformed("a masked frame from a server")
                } else {
                    WsError::Unmasked
                });
            }
            let (len, mut at) = match b1 & 0x7F {
                126 if input.len() >= 4 => (u64::from(u16::from_be_bytes([input[2], input[3]])), 4),
                127 if input.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&input[2..10]);
                    (u64::from_be_bytes(b), 10)
                }
                126 | 127 => return Ok(controls),
                n => (u64::from(n), 2),
            };
            let control = opcode & 0x08 != 0;
            if control && (len > 125 || b0 & 0x80 == 0) {
                return Err(WsError::Malformed("a control frame longer than 125 bytes or fragmented"));
            }
            if len > self.max_frame {
                return Err(WsError::TooLarge(len));
            }
            let total = at + if masked { 4 } else { 0 } + len as usize;
            if input.len() < total {
                return Ok(controls);
            }
            let mut payload;
            if masked {
                let mask = [input[at], input[at + 1], input[at + 2], input[at + 3]];
                at += 4;
                payload = input[at..total].to_vec();
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            } else {
                payload = input[at..total].to_vec();
            }
            input.advance(total);
            match opcode {
                // Binary, or a continuation (of a binary frame: text frames are refused at
                // their first fragment).
                0x2 | 0x0 => out.extend_from_slice(&payload),
                0x1 => return Err(WsError::TextFrame),
                0x8 => {
                    controls.push(Control::Close);
                    return Ok(controls);
                }
                0x9 => controls.push(Control::Ping(payload)),
                0xA => {}
                _ => return Err(WsError::Malformed("unknown opcode")),
            }
        }
        Ok(controls)
    }
}

/// Appends one unmasked server frame (`opcode` 0x2 binary, 0x8 close, 0xA pong).
pub fn encode_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Appends one client frame (masked with `mask`, as RFC 6455 §5.3 requires of clients):
/// for clients of this crate (the load generator, tests).
pub fn encode_client_frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// A close frame with its code.
pub fn close_frame(code: u16, out: &mut Vec<u8>) {
    encode_frame(0x8, &code.to_be_bytes(), out);
}

/// What a WebSocket connection has read and not yet handed on: it moves with a handoff.
pub struct WsState {
    /// Frame bytes read, at most one incomplete frame after decoding.
    pub raw: BytesMut,
    /// Decoded MQTT bytes not yet read.
    pub plain: BytesMut,
    /// The pong to send before the next data frame: only the latest ping is answered
    /// (RFC 6455 §5.5.3 allows it), so a flood of pings holds one payload, not a queue.
    pub pong: Option<Vec<u8>>,
    /// The close code to send (the client's close is answered; a protocol error closes).
    pub close: Option<u16>,
    pub decoder: FrameDecoder,
    /// A close was received, or is to be sent: reads end.
    pub closed: bool,
    /// The close frame went out: no data frame may follow it.
    pub close_sent: bool,
}

impl WsState {
    /// Decodes the complete frames read: data to `plain`; a ping leaves its pong due (the
    /// latest only), a close (or a frame that breaks the protocol) its close. Reads end
    /// after either.
    pub fn decode(&mut self) -> Result<(), WsError> {
        match self.decoder.decode(&mut self.raw, &mut self.plain) {
            Ok(controls) => {
                for control in controls {
                    match control {
                        Control::Ping(payload) => self.pong = Some(payload),
                        Control::Close => {
                            self.close = Some(1000);
                            self.closed = true;
                        }
                    }
                }
                Ok(())
            }
            Err(err) => {
                self.close = Some(err.close_code());
                self.closed = true;
                Err(err)
            }
        }
    }

    /// Appends the control frames due (the pong, then the close) to `out`.
    pub fn take_control(&mut self, out: &mut Vec<u8>) {
        if let Some(payload) = self.pong.take() {
            encode_frame(0xA, &payload, out);
        }
        if let Some(code) = self.close.take() {
            close_frame(code, out);
            self.close_sent = true;
        }
    }

    /// After an upgrade: `rest` is what followed the request.
    pub fn new(rest: &[u8], max_frame: usize) -> WsState {
        WsState {
            raw: BytesMut::from(rest),
            plain: BytesMut::new(),
            pong: None,
            close: None,
            decoder: FrameDecoder { max_frame: max_frame as u64, from_client: true },
            closed: false,
            close_sent: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &str = "GET /mqtt HTTP/1.1\r\nHost: localhost:8083\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\nOrigin: http://example.com\r\n\r\n";

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_client_frame(opcode, fin, payload, [0x37, 0xfa, 0x21, 0x3d], &mut out);
        out
    }

    #[test]
    fn the_rfc_example_key_gives_the_rfc_accept() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn an_upgrade_request_is_parsed_and_mqtt_chosen() {
        let mut bytes = REQUEST.as_bytes().to_vec();
        bytes.extend_from_slice(&[0x82, 0x80]);
        let up = parse_upgrade(&bytes).unwrap().unwrap();
        assert_eq!(up.path, "/mqtt");
        assert_eq!(up.protocol, Some("mqtt"));
        assert_eq!(up.origin.as_deref(), Some("http://example.com"));
        assert_eq!(up.len, REQUEST.len());
        let response = String::from_utf8(accept_response(&up)).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 "));
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(response.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
        for cut in 0..REQUEST.len() {
            assert_eq!(parse_upgrade(&REQUEST.as_bytes()[..cut]), Ok(None));
        }
    }

    #[test]
    fn bad_upgrades_are_refused() {
        let no_mqtt = REQUEST.replace("mqttv3.1, mqtt", "chat");
        assert!(parse_upgrade(no_mqtt.as_bytes()).is_err());
        assert!(parse_upgrade(REQUEST.replace("GET", "POST").as_bytes()).is_err());
        assert!(parse_upgrade(REQUEST.replace("Version: 13", "Version: 8").as_bytes()).is_err());
        assert!(parse_upgrade(REQUEST.replace("Upgrade: websocket\r\n", "").as_bytes()).is_err());
        assert_eq!(parse_upgrade(&vec![b'a'; MAX_REQUEST]), Err(WsError::RequestTooLarge));
    }

    #[test]
    fn packets_split_over_frames_and_merged_in_one_come_out_as_one_stream() {
        let decoder = FrameDecoder { max_frame: 1 << 20, from_client: true };
        let connect = [0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x00];
        let mut input = BytesMut::new();
        // CONNECT split over a first fragment and a continuation, then a ping, then two
        // PINGREQs in one frame.
        input.extend_from_slice(&masked(0x2, false, &connect[..5]));
        input.extend_from_slice(&masked(0x0, true, &connect[5..]));
        input.extend_from_slice(&masked(0x9, true, b"hi"));
        input.extend_from_slice(&masked(0x2, true, &[0xc0, 0x00, 0xc0, 0x00]));
        let all = input.clone();
        // Fed a byte at a time, the result is the same.
        let mut out = BytesMut::new();
        let mut controls = Vec::new();
        let mut fed = BytesMut::new();
        for b in all.iter() {
            fed.extend_from_slice(&[*b]);
            controls.extend(decoder.decode(&mut fed, &mut out).unwrap());
        }
        assert!(fed.is_empty());
        let mut expected = connect.to_vec();
        expected.extend_from_slice(&[0xc0, 0x00, 0xc0, 0x00]);
        assert_eq!(&out[..], &expected[..]);
        assert_eq!(controls, [Control::Ping(b"hi".to_vec())]);
    }

    #[test]
    fn text_unmasked_oversized_and_close_frames() {
        let decoder = FrameDecoder { max_frame: 1000, from_client: true };
        let mut out = BytesMut::new();
        let text = masked(0x1, true, b"{}");
        assert_eq!(decoder.decode(&mut BytesMut::from(&text[..]), &mut out), Err(WsError::TextFrame));
        assert_eq!(WsError::TextFrame.close_code(), 1003);
        let unmasked = [0x82, 0x01, 0x00];
        assert_eq!(decoder.decode(&mut BytesMut::from(&unmasked[..]), &mut out), Err(WsError::Unmasked));
        // The length is refused from the header, before the payload is buffered.
        let big = &masked(0x2, true, &vec![0; 70_000])[..14];
        assert_eq!(decoder.decode(&mut BytesMut::from(big), &mut out), Err(WsError::TooLarge(70_000)));
        let close = masked(0x8, true, &1000u16.to_be_bytes());
        assert_eq!(decoder.decode(&mut BytesMut::from(&close[..]), &mut out), Ok(vec![Control::Close]));
        assert!(out.is_empty());
    }

    #[test]
    fn a_flood_of_pings_leaves_one_pong_due_and_a_close_ends_reading() {
        let mut state = WsState::new(&[], 1000);
        for i in 0..10_000u32 {
            state.raw.extend_from_slice(&masked(0x9, true, &i.to_be_bytes()));
            state.decode().unwrap();
        }
        assert_eq!(state.pong.as_deref(), Some(&9_999u32.to_be_bytes()[..]));
        let mut out = Vec::new();
        state.take_control(&mut out);
        assert_eq!(out, [0x8A, 4, 0, 0, 0x27, 0x0F]);
        state.take_control(&mut out);
        assert_eq!(out.len(), 6, "nothing more due");

        state.raw.extend_from_slice(&masked(0x8, true, &1000u16.to_be_bytes()));
        state.decode().unwrap();
        assert!(state.closed);
        out.clear();
        state.take_control(&mut out);
        assert_eq!(out, [0x88, 2, 0x03, 0xE8]);
        assert!(state.close_sent);

        let mut bad = WsState::new(&masked(0x1, true, b"text"), 1000);
        assert_eq!(bad.decode(), Err(WsError::TextFrame));
        assert_eq!((bad.closed, bad.close), (true, Some(1003)));
    }

    #[test]
    fn a_client_decodes_unmasked_server_frames_and_refuses_masked_ones() {
        let client = FrameDecoder { max_frame: 1 << 20, from_client: false };
        let mut input = Vec::new();
        encode_frame(0x2, &[0x20, 0x02], &mut input);
        encode_frame(0x2, &[0x00, 0x00, 0xd0], &mut input);
        encode_frame(0x2, &[0x00], &mut input);
        let mut out = BytesMut::new();
        assert_eq!(client.decode(&mut BytesMut::from(&input[..]), &mut out), Ok(vec![]));
        assert_eq!(&out[..], &[0x20, 0x02, 0x00, 0x00, 0xd0, 0x00]);
        let masked_frame = masked(0x2, true, b"x");
        assert!(client.decode(&mut BytesMut::from(&masked_frame[..]), &mut out).is_err());
    }

    #[test]
    fn server_frames_have_the_right_length_forms() {
        for (n, header) in [(5usize, 2usize), (200, 4), (70_000, 10)] {
            let mut out = Vec::new();
            encode_frame(0x2, &vec![7; n], &mut out);
            assert_eq!(out.len(), header + n);
            assert_eq!(out[0], 0x82);
        }
    }
}
