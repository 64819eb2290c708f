//! TLS for the load generator's connections: rustls' client state machine over tokio's
//! readiness API (`readable`/`try_read`, `writable`/`try_write`), which the connection
//! loop uses for plain TCP too.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use tokio::net::TcpStream;

use ringmq::codec::websocket::{encode_client_frame, Control, FrameDecoder};

/// What every TLS connection of a run shares.
#[derive(Debug)]
pub struct TlsSettings {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl TlsSettings {
    /// Trusts the CA certificates in `ca` (PEM) and checks the server's name against
    /// `server_name`.
    pub fn new(ca: &Path, server_name: &str) -> Result<TlsSettings, String> {
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        for cert in certs {
            roots.add(cert.map_err(|e| format!("{}: {e}", ca.display()))?).map_err(|e| e.to_string())?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
        Ok(TlsSettings { config: Arc::new(config), server_name })
    }
}

/// A connection's socket, plain or TLS, and WebSocket over either, with the readiness
/// calls the loop makes.
pub enum ClientStream {
    Plain(TcpStream),
    Tls { tcp: TcpStream, tls: Box<ClientConnection>, plain_ready: usize },
    Ws(Box<WsClient>),
}

/// MQTT in WebSocket binary frames (masked, as a client's must be).
pub struct WsClient {
    inner: ClientStream,
    /// Frame bytes read and not yet decoded (at most one incomplete frame).
    raw: BytesMut,
    decoder: FrameDecoder,
    /// Framed bytes not yet written.
    out: Vec<u8>,
    mask: u32,
}

/// tokio's non-blocking calls as the `Read`/`Write` rustls drives.
struct Nonblocking<'a>(&'a TcpStream);

impl Read for Nonblocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Nonblocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ClientStream {
    /// Runs the client side of a TLS handshake on `tcp`.
    pub async fn tls(tcp: TcpStream, settings: &TlsSettings) -> io::Result<ClientStream> {
        let mut tls = ClientConnection::new(settings.config.clone(), settings.server_name.clone())
            .map_err(io::Error::other)?;
        while tls.is_handshaking() || tls.wants_write() {
            if tls.wants_write() {
                tcp.writable().await?;
                match tls.write_tls(&mut Nonblocking(&tcp)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            tcp.readable().await?;
            match tls.read_tls(&mut Nonblocking(&tcp)) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {
                    tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ClientStream::Tls { tcp, tls: Box::new(tls), plain_ready: 0 })
    }

    /// Upgrades `inner` to WebSocket at `path` (subprotocol `mqtt`).
    pub async fn ws(mut inner: ClientStream, host: &str, path: &str) -> io::Result<ClientStream> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mqtt\r\n\r\n"
        );
        let mut at = 0;
        while at < request.len() || inner.wants_write() {
            inner.writable().await?;
            match inner.try_write(&request.as_bytes()[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let mut raw = BytesMut::new();
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if raw.len() > 8192 {
                return Err(io::Error::other("WebSocket upgrade answer too long"));
            }
            inner.readable().await?;
            match inner.try_read_buf(&mut raw) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if !raw.starts_with(b"HTTP/1.1 101") {
            let status = String::from_utf8_lossy(&raw[..raw.len().min(40)]).to_string();
            return Err(io::Error::other(format!("WebSocket upgrade refused: {status}")));
        }
        bytes::Buf::advance(&mut raw, end);
        let decoder = FrameDecoder { max_frame: 1 << 28, from_client: false };
        Ok(ClientStream::Ws(Box::new(WsClient { inner, raw, decoder, out: Vec::new(), mask: 0x9e37_79b9 })))
    }

    pub fn set_nodelay(&self) {
        let _ = match self {
            ClientStream::Plain(tcp) | ClientStream::Tls { tcp, .. } => tcp.set_nodelay(true),
            ClientStream::Ws(ws) => {
                ws.inner.set_nodelay();
                Ok(())
            }
        };
    }

    /// Ready to read: decrypted bytes wait, or the socket has something.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            ClientStream::Tls { plain_ready, .. } if *plain_ready > 0 => Ok(()),
            ClientStream::Plain(tcp) | ClientStream::Tls { tcp, .. } => tcp.readable().await,
            ClientStream::Ws(ws) => Box::pin(ws.inner.readable()).await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            ClientStream::Plain(tcp) | ClientStream::Tls { tcp, .. } => tcp.writable().await,
            ClientStream::Ws(ws) => Box::pin(ws.inner.writable()).await,
        }
    }

    /// TLS records or WebSocket frames wait to be written (the loop waits for the socket
    /// then).
    pub fn wants_write(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls { tls, .. } => tls.wants_write(),
            ClientStream::Ws(ws) => !ws.out.is_empty() || ws.inner.wants_write(),
        }
    }

    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(tcp) => tcp.try_write(buf),
            ClientStream::Ws(ws) => {
                // Frames already made go first; then this write is framed whole and sent
                // as far as the socket takes it.
                ws.flush()?;
                if !ws.out.is_empty() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                if buf.is_empty() {
                    return Ok(0);
                }
                ws.mask = ws.mask.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                encode_client_frame(0x2, true, buf, ws.mask.to_be_bytes(), &mut ws.out);
                match ws.flush() {
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                    _ => {}
                }
                Ok(buf.len())
            }
            ClientStream::Tls { tcp, tls, .. } => {
                // What is queued goes first; then this write's records, sent as far as
                // the socket takes them (the rest with the next write).
                while tls.wants_write() {
                    tls.write_tls(&mut Nonblocking(tcp))?;
                }
                let n = tls.writer().write(buf)?;
                while tls.wants_write() {
                    match tls.write_tls(&mut Nonblocking(tcp)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                Ok(n)
            }
        }
    }

    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            ClientStream::Plain(tcp) => tcp.try_read_buf(buf),
            ClientStream::Ws(ws) => loop {
                let before = buf.len();
                let controls = ws
                    .decoder
                    .decode(&mut ws.raw, buf)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if controls.contains(&Control::Close) {
                    return Ok(0);
                }
                if buf.len() > before {
                    return Ok(buf.len() - before);
                }
                ws.raw.reserve(16 * 1024);
                if ws.inner.try_read_buf(&mut ws.raw)? == 0 {
                    return Ok(0);
                }
            },
            ClientStream::Tls { tcp, tls, plain_ready } => loop {
                if *plain_ready > 0 {
                    let mut chunk = [0u8; 16 * 1024];
                    let n = match tls.reader().read(&mut chunk) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            *plain_ready = 0;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    *plain_ready -= n.min(*plain_ready);
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                match tls.read_tls(&mut Nonblocking(tcp))? {
                    0 => return Ok(0),
                    _ => {
                        let state = tls
                            .process_new_packets()
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        *plain_ready = state.plaintext_bytes_to_read();
                        if state.peer_has_closed() && *plain_ready == 0 {
                            return Ok(0);
                        }
                    }
                }
            },
        }
    }
}

impl WsClient {
    /// Writes framed bytes while the socket takes them.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() || self.inner.wants_write() {
            let n = self.inner.try_write(&self.out)?;
            self.out.drain(..n);
            if n == 0 && self.out.is_empty() {
                break;
            }
        }
        Ok(())
    }
}
