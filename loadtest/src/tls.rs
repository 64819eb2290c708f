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

/// A connection's socket, plain or TLS, with the readiness calls the loop makes.
pub enum ClientStream {
    Plain(TcpStream),
    Tls { tcp: TcpStream, tls: Box<ClientConnection>, plain_ready: usize },
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

    pub fn set_nodelay(&self) {
        let _ = match self {
            ClientStream::Plain(tcp) | ClientStream::Tls { tcp, .. } => tcp.set_nodelay(true),
        };
    }

    /// Ready to read: decrypted bytes wait, or the socket has something.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            ClientStream::Tls { plain_ready, .. } if *plain_ready > 0 => Ok(()),
            ClientStream::Plain(tcp) | ClientStream::Tls { tcp, .. } => tcp.readable().await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            ClientStream::Plain(tcp) | ClientStream::Tls { tcp, .. } => tcp.writable().await,
        }
    }

    /// TLS records wait to be written (the loop waits for the socket then).
    pub fn wants_write(&self) -> bool {
        matches!(self, ClientStream::Tls { tls, .. } if tls.wants_write())
    }

    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(tcp) => tcp.try_write(buf),
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
