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

use crate::codec::websocket::{encode_frame, WsState};

/// Plaintext taken into TLS records per write: rustls buffers at most this much ciphertext.
const MAX_PLAIN: usize = 16 * 1024;

pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
    /// WebSocket frames over TCP or TLS.
    Ws(Box<WsStream>),
}

impl Transport {
    pub fn as_raw_fd(&self) -> RawFd {
        match self {
            Transport::Tcp(s) => s.as_raw_fd(),
            Transport::Tls(s) => s.tcp.as_raw_fd(),
            Transport::Ws(s) => s.inner.as_raw_fd(),
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
            Transport::Ws(s) => {
                s.inner.set_nodelay();
                Ok(())
            }
        };
    }

    /// Who the client's verified certificate names (TLS with client certificates): kept
    /// with the connection's TLS state, for authentication by certificate identity.
    pub fn peer_identity(&self) -> Option<crate::tls::CertIdentity> {
        match self {
            Transport::Tcp(_) => None,
            Transport::Tls(s) => {
                s.tls.peer_certificates()?.first().and_then(|c| crate::tls::cert_identity(c))
            }
            Transport::Ws(s) => s.inner.peer_identity(),
        }
    }

    /// TLS's close_notify, sent before the socket's write side shuts; nothing for TCP.
    pub fn poll_close_notify(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Tcp(_) => Poll::Ready(Ok(())),
            Transport::Tls(s) => {
                s.tls.send_close_notify();
                s.poll_flush_tls(cx)
            }
            Transport::Ws(s) => s.poll_close(cx),
        }
    }

    /// The stream, the TLS state and the WebSocket state, for a handoff to another shard
    /// (taken before anything was written after the upgrade).
    pub fn into_parts(self) -> (TcpStream, Option<Box<ServerConnection>>, Option<Box<WsState>>) {
        match self {
            Transport::Tcp(s) => (s, None, None),
            Transport::Tls(s) => {
                let TlsStream { tcp, tls, .. } = *s;
                (tcp, Some(Box::new(tls)), None)
            }
            Transport::Ws(s) => {
                let WsStream { inner, state, .. } = *s;
                let (tcp, tls, _) = inner.into_parts();
                (tcp, tls, Some(Box::new(state)))
            }
        }
    }

    /// Rebuilds a transport from its parts (the owner shard's side of a handoff).
    pub fn from_parts(
        tcp: TcpStream,
        tls: Option<Box<ServerConnection>>,
        ws: Option<Box<WsState>>,
    ) -> Transport {
        let inner = match tls {
            None => Transport::Tcp(tcp),
            Some(tls) => Transport::Tls(Box::new(TlsStream { tcp, tls: *tls, pending_plain: 0 })),
        };
        match ws {
            None => inner,
            Some(state) => Transport::Ws(Box::new(WsStream::with_state(inner, *state))),
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
            Transport::Ws(s) => s.poll_read_payload(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => s.poll_write_plain(cx, buf),
            Transport::Ws(s) => s.poll_write_payload(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => s.poll_flush_tls(cx),
            Transport::Ws(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_close_notify(cx)
    }
}

/// Payload bytes per WebSocket frame the broker sends.
const MAX_WS_FRAME: usize = 16 * 1024;

/// MQTT over WebSocket frames, over TCP or TLS.
pub struct WsStream {
    inner: Transport,
    state: WsState,
    /// The frame being written, and how much of it is on the wire.
    out: Vec<u8>,
    out_at: usize,
    /// Payload of the caller's current write framed in `out`: reported written once `out`
    /// is on the wire.
    pending_plain: usize,
}

impl WsStream {
    pub fn with_state(inner: Transport, state: WsState) -> WsStream {
        WsStream { inner, state, out: Vec::new(), out_at: 0, pending_plain: 0 }
    }

    fn poll_read_payload(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut scratch = [0u8; 4096];
        loop {
            let st = &mut self.state;
            if !st.plain.is_empty() {
                let n = st.plain.len().min(buf.len());
                buf[..n].copy_from_slice(&st.plain[..n]);
                bytes::Buf::advance(&mut st.plain, n);
                return Poll::Ready(Ok(n));
            }
            if st.closed {
                return Poll::Ready(Ok(0));
            }
            // Pongs and the close are answered with the next write (a write here would
            // take the writer's readiness waker).
            if let Err(err) = st.decode() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, err)));
            }
            if !st.plain.is_empty() || st.closed {
                continue;
            }
            match Pin::new(&mut self.inner).poll_read(cx, &mut scratch) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => self.state.raw.extend_from_slice(&scratch[..n]),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_write_payload(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.pending_plain == 0 {
            if !self.state.close_sent {
                if buf.is_empty() {
                    return Poll::Ready(Ok(0));
                }
                self.out.clear();
                self.out_at = 0;
                self.state.take_control(&mut self.out);
            }
            if self.state.close_sent {
                // The close goes alone: no data frame may follow it.
                if self.poll_write_out(cx)?.is_pending() {
                    return Poll::Pending;
                }
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            let n = buf.len().min(MAX_WS_FRAME);
            encode_frame(0x2, &buf[..n], &mut self.out);
            self.pending_plain = n;
        }
        if self.poll_write_out(cx)?.is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(Ok(std::mem::take(&mut self.pending_plain)))
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.out_at += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.out_at = 0;
        if self.out.capacity() > 2 * MAX_WS_FRAME {
            self.out = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Sends a close frame (unless one went already) and TLS's close_notify beneath.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Not in the middle of a data frame: queue the close (once) after any control frame.
        if self.pending_plain == 0 && self.out_at >= self.out.len() && !self.state.close_sent {
            if self.state.close.is_none() {
                self.state.close = Some(1000);
                self.state.closed = true;
            }
            self.out.clear();
            self.out_at = 0;
            self.state.take_control(&mut self.out);
        }
        if self.poll_write_out(cx)?.is_pending() {
            return Poll::Pending;
        }
        self.inner.poll_close_notify(cx)
    }
}
