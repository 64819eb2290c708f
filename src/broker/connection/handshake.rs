//! What happens on a new socket before it is served: the PROXY protocol header of a
//! `proxy_protocol` listener and the HTTP upgrade of a WebSocket one (TLS's handshake is in
//! `transport`), then, after its CONNECT, its credentials.

use std::net::SocketAddr;

use bytes::BytesMut;
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

use std::cell::{Cell, RefCell};

use super::{linger, transport, ConnectFailure, SharedStream, Transport};
use crate::broker::shard::ShardRef;
use crate::codec::{self, ConnAck, Connect, DecodeError, Packet, Properties, ProtocolVersion, ReasonCode};

/// The HTTP upgrade of a WebSocket listener, on TCP or TLS: answered 101 and the stream
/// then speaks frames, or answered with an HTTP error and closed.
pub(super) async fn upgrade(
    mut stream: Transport,
    ws: &crate::broker::WsSettings,
    max_packet: usize,
) -> Result<Transport, ConnectFailure> {
    use codec::websocket::{accept_response, error_response, parse_upgrade};
    use futures_lite::AsyncWriteExt;
    let mut request = Vec::new();
    let mut scratch = [0u8; 1024];
    let refuse = |status: u16, why: String| (error_response(status, &why), why);
    let outcome = loop {
        match parse_upgrade(&request) {
            Ok(Some(up)) if up.path.split('?').next() != Some(ws.path.as_str()) => {
                break Err(refuse(404, format!("no WebSocket endpoint at {}", up.path)));
            }
            Ok(Some(up))
                if !ws.allowed_origins.is_empty()
                    && !up.origin.as_ref().is_some_and(|o| ws.allowed_origins.iter().any(|a| a == o)) =>
            {
                break Err(refuse(403, format!("origin {:?} not allowed", up.origin)));
            }
            Ok(Some(up)) => break Ok(up),
            Ok(None) => {}
            Err(err) => break Err(refuse(400, err.to_string())),
        }
        match stream.read(&mut scratch).await {
            Ok(0) | Err(_) => return Err(ConnectFailure::Closed),
            Ok(n) => request.extend_from_slice(&scratch[..n]),
        }
    };
    match outcome {
        Ok(up) => {
            if stream.write_all(&accept_response(&up)).await.is_err() {
                return Err(ConnectFailure::Closed);
            }
            // A frame holds at most one packet's worth, and its header.
            let state = codec::websocket::WsState::new(&request[up.len..], max_packet + 14);
            Ok(Transport::Ws(Box::new(transport::WsStream::with_state(stream, state))))
        }
        Err((response, why)) => {
            let _ = stream.write_all(&response).await;
            Err(ConnectFailure::WebSocket(why))
        }
    }
}

/// Reads the PROXY protocol header a `proxy_protocol` listener requires: the client's
/// address (`None` for the proxy's own health checks). What follows it stays in `buf`.
pub(super) async fn read_proxy_header(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<Option<SocketAddr>, ConnectFailure> {
    // Never a byte past the header: on a TLS listener what follows is the handshake.
    let mut scratch = [0u8; 256];
    loop {
        match codec::proxy::parse(buf) {
            Ok(Some(header)) => {
                bytes::Buf::advance(buf, header.len);
                return Ok(header.source);
            }
            Ok(None) => {}
            Err(err) => return Err(ConnectFailure::Proxy(err)),
        }
        let want = codec::proxy::bytes_wanted(buf).min(scratch.len());
        match stream.read(&mut scratch[..want]).await {
            Ok(0) | Err(_) => return Err(ConnectFailure::Closed),
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
        }
    }
}

/// Password checks one shard runs at once (each may take ~0.2 s and 64 MiB of argon2id on
/// the shard's blocking thread, which also flushes its logs): a CONNECT past them is
/// answered "server busy" (v5 0x89, 3.1.1 3) rather than queued.
const MAX_PASSWORD_CHECKS: usize = 4;

/// Releases a password check's place when it ends (or its task is dropped).
struct Checking(ShardRef);

impl Drop for Checking {
    fn drop(&mut self) {
        let mut shard = self.0.borrow_mut();
        shard.password_checks = shard.password_checks.saturating_sub(1);
    }
}

/// Checks a CONNECT's credentials on a listener with authentication: refused at once for
/// an address with too many recent failures or while the shard checks too many passwords
/// already, else checked within `--connect-timeout` (a password on the blocking pool).
pub(super) async fn check_credentials(
    shard: &ShardRef,
    auth: &crate::auth::AuthSlot,
    connect: &Connect,
    stream: &Transport,
    peer: SocketAddr,
) -> Result<crate::auth::Identity, crate::auth::Refusal> {
    let now = std::time::Instant::now();
    if shard.borrow().auth_failures.is_limited(peer.ip(), now) {
        return Err(crate::auth::Refusal::RateLimited);
    }
    let current = auth.current();
    let _checking = match current.passwords.is_some() && connect.password.is_some() {
        false => None,
        true => {
            let mut s = shard.borrow_mut();
            if s.password_checks >= MAX_PASSWORD_CHECKS {
                return Err(crate::auth::Refusal::Busy);
            }
            s.password_checks += 1;
            Some(Checking(shard.clone()))
        }
    };
    let unix_now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let timeout = shard.borrow().config.connect_timeout;
    let check = crate::auth::authenticate(&current, connect, stream.peer_identity(), unix_now);
    let result = glommio::timer::timeout(timeout, async { Ok(check.await) })
        .await
        .unwrap_or(Err(crate::auth::Refusal::Busy));
    if result.as_ref().is_err_and(|r| *r != crate::auth::Refusal::Busy) {
        // Failures count; a success does not wipe them (guessing between logins is still
        // guessing).
        shard.borrow_mut().auth_failures.record(peer.ip(), now);
    }
    result
}

/// Why the rules refuse a CONNECT whose credentials held (v5: 0x87): a will it may not
/// publish (checked again when it is published), or a session another user holds (nor is
/// one taken from a listener without authentication).
pub(super) fn refused_by_rules(
    shard: &ShardRef,
    connect: &Connect,
    auth: Option<&crate::auth::SessionAuth>,
) -> Option<&'static str> {
    let will_refused = connect.will.as_ref().is_some_and(|will| {
        crate::auth::is_sys(will.topic.as_str()) || auth.is_some_and(|a| !a.can_publish(will.topic.as_str()))
    });
    if will_refused {
        return Some("the ACL refuses its will");
    }
    let (username, verified) = (auth.and_then(|a| a.username.as_deref()), auth.is_some_and(|a| a.verified));
    (!shard.borrow().may_take_over(&connect.client_id, username, verified))
        .then_some("the session is another user's")
}

/// 3.1 requires an identifier; 3.1.1 allows an empty one only with a clean session
/// (MQTT-3.1.3-7/8). v5 always assigns one.
pub(super) fn refuse_empty_id(connect: &Connect) -> bool {
    match connect.protocol {
        ProtocolVersion::V31 => true,
        ProtocolVersion::V311 => !connect.clean_start,
        ProtocolVersion::V5 => false,
    }
}

/// Answers a CONNECT that could not be accepted as sent, in the version the client spoke.
pub(super) async fn refuse_invalid_connect(stream: Transport, err: &DecodeError) {
    let (version, reason) = match err {
        DecodeError::UnsupportedProtocolVersion { .. } => {
            (ProtocolVersion::V311, ReasonCode::UnsupportedProtocolVersion)
        }
        // Other malformed CONNECTs are closed without a CONNACK (MQTT-4.8.0-1): the
        // version the client speaks is not known for sure.
        _ => return,
    };
    refuse(stream, version, reason).await;
}

/// Sends a refusing CONNACK and closes, lingering so the client reads it.
pub(super) async fn refuse(stream: Transport, version: ProtocolVersion, reason: ReasonCode) {
    let packet =
        Packet::ConnAck(ConnAck { session_present: false, reason, properties: Properties::default() });
    let mut buf = BytesMut::new();
    if codec::encode(&packet, version, &mut buf).is_err() {
        return;
    }
    let fd = stream.as_raw_fd();
    let stream = SharedStream(RefCell::new(stream));
    if stream.write_all(&buf, &Cell::new(0)).await.is_ok() {
        linger(&stream, fd).await;
    }
}
