//! A connection's read buffer: what was read and not yet decoded.

use std::task::{Context, Poll};

use super::Transport;
use bytes::BytesMut;
use futures_lite::AsyncRead;

use crate::codec;

/// The smallest read, and the first after a wait with nothing buffered (on the stack).
pub(super) const MIN_READ: usize = 512;

/// A connection's read buffer: what was read and not yet decoded, and room for the next
/// read. A new (or revived) connection holds no allocation until its first read: glommio's
/// read waits for readiness and borrows the slice only during the `recv` itself, so the
/// wait needs no buffer, and the first read goes through a small array on the stack.
pub(super) struct ReadBuffer {
    pub(super) buf: BytesMut,
    /// The next read's size: doubled by reads that fill it, shrunk by short ones.
    chunk: usize,
    /// `--read-buffer`, the largest read.
    max: usize,
    /// Size of the allocation `buf` is a view of: what a PUBLISH decoded from it pins.
    pub(super) alloc: usize,
}

impl ReadBuffer {
    pub(super) fn new(rest: &[u8], max: usize) -> ReadBuffer {
        // The CONNECT's buffer is an allocation of unknown size: what follows it goes on in
        // one whose size is known, so that what is decoded says what it pins
        // (`Message::pinned`).
        let buf = BytesMut::from(rest);
        ReadBuffer { alloc: buf.capacity(), buf, chunk: MIN_READ.min(max), max }
    }

    /// One read of up to `chunk` bytes after what is buffered.
    pub(super) fn poll_read(
        &mut self,
        stream: &mut Transport,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        let start = self.buf.len();
        if start == 0 && self.buf.capacity() == 0 {
            // Waiting with nothing buffered and nothing allocated.
            let mut first = [0u8; MIN_READ];
            let n = match std::pin::Pin::new(stream).poll_read(cx, &mut first) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            // A full read means more is waiting: room for a whole chunk after it.
            let room = if n == MIN_READ { self.chunk.max(2 * n) } else { n };
            self.buf = BytesMut::with_capacity(room);
            self.buf.extend_from_slice(&first[..n]);
            self.alloc = self.buf.capacity();
            if n < MIN_READ {
                self.grown(n);
            }
            return Poll::Ready(Ok(n));
        }
        // Grown here, not by `resize`, so `alloc` knows the allocation's size; a packet
        // whose header says it is large gets its whole size at once.
        let chunk = self.chunk;
        if self.buf.capacity() < start + chunk && !self.buf.try_reclaim(chunk) {
            let whole = codec::packet_size(&self.buf).unwrap_or(0);
            let mut fresh = BytesMut::with_capacity((start + chunk).max(whole));
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
            self.alloc = self.buf.capacity();
        }
        self.buf.resize(start + chunk, 0);
        let read = std::pin::Pin::new(stream).poll_read(cx, &mut self.buf[start..]);
        let n = match &read {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        self.buf.truncate(start + n);
        match read {
            Poll::Ready(Ok(n)) => self.grown(n),
            // Nothing buffered: a large allocation is not kept through the wait (what was
            // decoded from it keeps it while it needs it). A small one is: dropping it at
            // every wait made each read a fresh allocation, freed by whichever core held
            // the last message from it — the allocator's arena lock, contended across
            // cores (p2p QoS 1 −6%). A parked connection drops it with its reader.
            Poll::Pending if start == 0 && self.buf.capacity() > 4 * self.chunk => self.buf = BytesMut::new(),
            _ => {}
        }
        read
    }

    /// Adapts the next read's size to this one's: reads that fill the chunk double it,
    /// short reads shrink it.
    fn grown(&mut self, n: usize) {
        let chunk = if n >= self.chunk { self.chunk * 2 } else { (n * 2).next_power_of_two() };
        self.chunk = chunk.clamp(MIN_READ.min(self.max), self.max);
    }
}
