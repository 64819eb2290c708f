//! What a connection reads and writes: plain TCP, or TLS over it. TLS is rustls'
//! `ServerConnection` (a state machine without I/O) driven here over the glommio stream, so
//! its state can leave the stream: a connection handed to its owner shard takes it along
//! with the descriptor (`into_parts`), and the owner serves the encrypted stream itself.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

/// Plaintext taken into TLS records per write: rustls buffers at most this much ciphertext.
const MAX_PLAIN: usize = 16 * 1024;

pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

impl Transport {
    pub fn as_raw_fd(&self) -> RawFd {
        match self {
            Transport::Tcp(s) => s.as_raw_fd(),
            Transport::Tls(s) => s.tcp.as_raw_fd(),
        }
    }

    /// Whether the connection may park (its tasks end, its descriptor is watched): a TLS
    /// connection's state lives with its stream, so it stays served.
    pub fn can_park(&self) -> bool {
        matches!(self, Transport::Tcp(_))
    }

    pub fn set_nodelay(&self) {
        let _ = match self {
            Transport::Tcp(s) => s.set_nodelay(true),
            Transport::Tls(s) => s.tcp.set_nodelay(true),
        };
    }

    /// TLS's close_notify, sent before the socket's write side shuts; nothing for TCP.
    pub fn poll_close_notify(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Tcp(_) => Poll::Ready(Ok(())),
            Transport::Tls(s) => {
                s.tls.send_close_notify();
                s.poll_flush_tls(cx)
            }
        }
    }

    /// The stream and the TLS state, for a handoff to another shard.
    pub fn into_parts(self) -> (TcpStream, Option<Box<ServerConnection>>) {
        match self {
            Transport::Tcp(s) => (s, None),
            Transport::Tls(s) => {
                let TlsStream { tcp, tls, .. } = *s;
                (tcp, Some(Box::new(tls)))
            }
        }
    }

    /// Rebuilds a transport from its parts (the owner shard's side of a handoff).
    pub fn from_parts(tcp: TcpStream, tls: Option<Box<ServerConnection>>) -> Transport {
        match tls {
            None => Transport::Tcp(tcp),
            Some(tls) => Transport::Tls(Box::new(TlsStream { tcp, tls: *tls, pending_plain: 0 })),
        }
    }
}

/// TLS over a TCP stream.
pub struct TlsStream {
    tcp: TcpStream,
    tls: ServerConnection,
    /// Plaintext of the caller's current write already in `tls`'s records: reported written
    /// only once those records are on the socket, so `Ok(n)` from a write means sent.
    pending_plain: usize,
}

/// Why a TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

impl TlsStream {
    /// Runs the server side of a TLS handshake on `tcp`. The caller bounds it in time.
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<TlsStream, HandshakeError> {
        let mut stream = TlsStream { tcp, tls: ServerConnection::new(config)?, pending_plain: 0 };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandshakeError>> {
        loop {
            match self.poll_flush_tls(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
            if !self.tls.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match self.tls.read_tls(&mut SyncIo { tcp: &mut self.tcp, cx }) {
                Ok(0) => return Poll::Ready(Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())),
                Ok(_) => {
                    if let Err(err) = self.tls.process_new_packets() {
                        // The alert rustls queued tells the client why.
                        let _ = self.poll_flush_tls(cx);
                        return Poll::Ready(Err(err.into()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    /// Writes every queued TLS record to the socket.
    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut SyncIo { tcp: &mut self.tcp, cx }) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_read_plain(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.tls.reader().read(buf) {
                // 0: the client's close_notify.
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            // Records the read side makes rustls queue (alerts, key updates) are sent by the
            // next write: a write attempt here would take the writer's readiness waker.
            match self.tls.read_tls(&mut SyncIo { tcp: &mut self.tcp, cx }) {
                Ok(0) => return Poll::Ready(Ok(0)),
                Ok(_) => {
                    if let Err(err) = self.tls.process_new_packets() {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, err)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write_plain(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.pending_plain == 0 {
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            // Whatever the read side queued goes first, then this write's records.
            if self.poll_flush_tls(cx)?.is_pending() {
                return Poll::Pending;
            }
            let n = self.tls.writer().write(&buf[..buf.len().min(MAX_PLAIN)])?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_plain = n;
        }
        if self.poll_flush_tls(cx)?.is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(Ok(std::mem::take(&mut self.pending_plain)))
    }
}

/// The glommio stream as the blocking `Read`/`Write` rustls drives: not ready is
/// `WouldBlock`, with the task's waker registered.
struct SyncIo<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for SyncIo<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_read(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for SyncIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => s.poll_read_plain(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => s.poll_write_plain(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => s.poll_flush_tls(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_close(cx),
            Transport::Tls(s) => {
                s.tls.send_close_notify();
                s.poll_flush_tls(cx)
            }
        }
    }
}
