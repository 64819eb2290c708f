//! WebSocket listeners: the upgrade, MQTT in binary frames split and merged, ping/pong, a
//! wrong path, text frames, and a connection handed to its owner shard mid-stream.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use bytes::BytesMut;
use ringmq::codec::{self, Packet, ProtocolVersion};
use ringmq::config::{Listener, ListenerKind};

use crate::common::{client_id_on, connect_v311, TestBroker, WAIT};

fn ws_broker() -> TestBroker {
    TestBroker::start_with(|c| {
        c.listeners.push(Listener { kind: ListenerKind::Ws, ..Listener::tcp("127.0.0.1:0".parse().unwrap()) })
    })
}

/// A client frame: masked, as RFC 6455 requires of clients.
fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    codec::websocket::encode_client_frame(opcode, fin, payload, [0xa1, 0x07, 0x5c, 0xe3], &mut out);
    out
}

fn encode(packet: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode(packet, ProtocolVersion::V311, &mut out).unwrap();
    out.to_vec()
}

struct WsClient {
    sock: TcpStream,
    /// Bytes read and not yet taken as frames.
    raw: Vec<u8>,
    /// Payloads of the pongs received.
    pongs: Vec<Vec<u8>>,
}

impl WsClient {
    /// Opens the upgrade at `path`; the status line of the answer, and the client when it is 101.
    fn open(addr: SocketAddr, path: &str) -> (String, WsClient) {
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            sock,
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            if sock.read(&mut byte).unwrap_or(0) == 0 {
                break;
            }
            raw.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&raw).to_string();
        (
            head.lines().next().unwrap_or_default().to_string(),
            WsClient { sock, raw: Vec::new(), pongs: Vec::new() },
        )
    }

    /// The next server frame: (opcode, payload); `None` at the end of the stream.
    fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.raw.len() >= 2 {
                let (op, len7) = (self.raw[0] & 0x0f, self.raw[1] & 0x7f);
                assert_eq!(self.raw[1] & 0x80, 0, "server frames are not masked");
                let (len, at) = match len7 {
                    126 if self.raw.len() >= 4 => {
                        (u16::from_be_bytes([self.raw[2], self.raw[3]]) as usize, 4)
                    }
                    127 if self.raw.len() >= 10 => {
                        (u64::from_be_bytes(self.raw[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.raw.len() >= at + len {
                    let payload = self.raw[at..at + len].to_vec();
                    self.raw.drain(..at + len);
                    return Some((op, payload));
                }
            }
            let mut buf = [0u8; 4096];
            match self.sock.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The next MQTT packet from binary frames (one packet per frame is not assumed).
    fn recv(&mut self, stream: &mut BytesMut) -> Option<Packet> {
        loop {
            if let Some(p) = codec::decode(stream, ProtocolVersion::V311, usize::MAX).unwrap() {
                return Some(p);
            }
            match self.next_frame()? {
                (0x2, payload) | (0x0, payload) => stream.extend_from_slice(&payload),
                (0xA, payload) => self.pongs.push(payload),
                (0x8, _) => return None,
                _ => {}
            }
        }
    }
}

#[test]
fn mqtt_split_over_frames_and_merged_in_one_round_trips_on_either_shard() {
    let broker = ws_broker();
    let addr = broker.addrs[1];
    for shard in 0..2 {
        let (status, mut ws) = WsClient::open(addr, "/mqtt");
        assert_eq!(status, "HTTP/1.1 101 Switching Protocols");
        // CONNECT split over two frames (the second a continuation), sent with the start
        // of the next frame in the same write; one client id is handed to its owner shard.
        let connect = encode(&connect_v311(&client_id_on(shard, "ws-")));
        let mut bytes = frame(0x2, false, &connect[..3]);
        bytes.extend(frame(0x0, true, &connect[3..]));
        // Two PINGREQs in one frame, and a WebSocket ping.
        bytes.extend(frame(0x2, true, &[0xc0, 0x00, 0xc0, 0x00]));
        bytes.extend(frame(0x9, true, b"are you there"));
        ws.sock.write_all(&bytes).unwrap();
        let mut stream = BytesMut::new();
        assert!(matches!(ws.recv(&mut stream), Some(Packet::ConnAck(_))), "shard {shard}");
        assert_eq!(ws.recv(&mut stream), Some(Packet::PingResp));
        assert_eq!(ws.recv(&mut stream), Some(Packet::PingResp));
        // The pong goes out with the next write (here, before the PINGRESPs).
        ws.sock.write_all(&frame(0x2, true, &[0xc0, 0x00])).unwrap();
        assert_eq!(ws.recv(&mut stream), Some(Packet::PingResp));
        assert_eq!(ws.pongs, [b"are you there".to_vec()]);
        // A close is answered with a close.
        ws.sock.write_all(&frame(0x8, true, &1000u16.to_be_bytes())).unwrap();
        loop {
            match ws.next_frame() {
                Some((0x8, _)) | None => break,
                Some(_) => {}
            }
        }
    }
}

#[test]
fn a_wrong_path_is_not_found_and_a_text_frame_closes_the_connection() {
    let broker = ws_broker();
    let (status, _) = WsClient::open(broker.addrs[1], "/elsewhere");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    let (status, mut ws) = WsClient::open(broker.addrs[1], "/mqtt");
    assert!(status.contains("101"));
    ws.sock.write_all(&frame(0x2, true, &encode(&connect_v311("texter")))).unwrap();
    let mut stream = BytesMut::new();
    assert!(matches!(ws.recv(&mut stream), Some(Packet::ConnAck(_))));
    ws.sock.write_all(&frame(0x1, true, b"{\"not\": \"mqtt\"}")).unwrap();
    let mut sent_more = true;
    while sent_more {
        match ws.next_frame() {
            None | Some((0x8, _)) => sent_more = false,
            Some(_) => {}
        }
    }
    // Plain MQTT on a WebSocket port is no upgrade: answered 400.
    let mut plain = TcpStream::connect(broker.addrs[1]).unwrap();
    plain.set_read_timeout(Some(WAIT)).unwrap();
    plain.write_all(&encode(&connect_v311("not-ws"))).unwrap();
    plain.write_all(b"\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = plain.read_to_end(&mut reply);
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 400"), "{reply:?}");
}
