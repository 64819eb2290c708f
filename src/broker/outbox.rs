//! A per-peer outbox: the cross-core messages a shard (or the node bridge) has for one
//! peer, kept as the batches its sender task moves into the channel.
//!
//! Kept as batches, not one ring: a ring that grows to a 64k-message backlog doubles by
//! copying (11 → 23 MB held at once for a moment, and a 23 MB block the allocator keeps),
//! and every message was copied again out of it into a batch. Here a message is written
//! once, into the batch it travels in; what is spare is the tail batch's room only.

use std::collections::VecDeque;

use super::cross::{Batch, CrossMsg, MAX_BATCH, MAX_BATCH_BYTES};

#[derive(Default)]
pub struct Outbox {
    /// Closed batches first, then the open one (the back), each with its bytes.
    batches: VecDeque<(Batch, usize)>,
    len: usize,
}

impl Outbox {
    /// Appends `msg`, which holds `size` bytes (`CrossMsg::size`): to the open batch, or a
    /// new one once that has [`MAX_BATCH`] messages or [`MAX_BATCH_BYTES`].
    pub fn push_back(&mut self, msg: CrossMsg, size: usize) {
        self.len += 1;
        if let Some((batch, bytes)) = self.batches.back_mut().filter(|(b, bytes)| !is_full(b, *bytes)) {
            batch.push(msg);
            *bytes += size;
            return;
        }
        // Behind a full batch a backlog builds: the next one will fill too, so it gets its
        // room at once; otherwise it grows with what comes (one message is the usual case).
        let mut batch = if self.batches.is_empty() { Vec::new() } else { Vec::with_capacity(MAX_BATCH) };
        batch.push(msg);
        self.batches.push_back((batch, size));
    }

    /// The batch at the front (at most [`MAX_BATCH`] messages, and about
    /// [`MAX_BATCH_BYTES`]), with its bytes; `None` when the outbox is empty.
    pub fn take_batch(&mut self) -> Option<(Batch, usize)> {
        let (batch, bytes) = self.batches.pop_front()?;
        self.len -= batch.len();
        Some((batch, bytes))
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The messages waiting, in order.
    pub fn iter(&self) -> impl Iterator<Item = &CrossMsg> {
        self.batches.iter().flat_map(|(batch, _)| batch.iter())
    }

    /// Takes every message waiting, in order.
    pub fn take_all(&mut self) -> Vec<CrossMsg> {
        self.len = 0;
        self.batches.drain(..).flat_map(|(batch, _)| batch).collect()
    }

    pub fn clear(&mut self) {
        self.take_all();
    }
}

fn is_full(batch: &Batch, bytes: usize) -> bool {
    batch.len() >= MAX_BATCH || bytes >= MAX_BATCH_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> CrossMsg {
        CrossMsg::Ready
    }

    #[test]
    fn batches_close_at_their_count_or_bytes_and_keep_order() {
        let mut outbox = Outbox::default();
        assert!(outbox.take_batch().is_none());
        for _ in 0..MAX_BATCH + 3 {
            outbox.push_back(ready(), 10);
        }
        assert_eq!(outbox.len(), MAX_BATCH + 3);
        let (first, bytes) = outbox.take_batch().unwrap();
        assert_eq!((first.len(), bytes), (MAX_BATCH, MAX_BATCH * 10));
        assert_eq!(outbox.len(), 3);
        // Bytes close a batch after the message that reaches them.
        outbox.push_back(ready(), MAX_BATCH_BYTES);
        outbox.push_back(ready(), 1);
        let (second, bytes) = outbox.take_batch().unwrap();
        assert_eq!((second.len(), bytes), (4, 30 + MAX_BATCH_BYTES));
        let (third, bytes) = outbox.take_batch().unwrap();
        assert_eq!((third.len(), bytes), (1, 1));
        assert!(outbox.is_empty() && outbox.take_batch().is_none());
    }

    #[test]
    fn a_batch_behind_a_full_one_gets_its_room_at_once() {
        let mut outbox = Outbox::default();
        outbox.push_back(ready(), 1);
        assert!(outbox.batches[0].0.capacity() < MAX_BATCH, "a lone message does not reserve a batch");
        for _ in 0..MAX_BATCH {
            outbox.push_back(ready(), 1);
        }
        assert_eq!(outbox.batches[1].0.capacity(), MAX_BATCH);
        assert_eq!(outbox.take_all().len(), MAX_BATCH + 1);
        assert_eq!(outbox.len(), 0);
    }
}
