//! What the bridge holds, counted against `--node-link-buffer`: the links' windows (one
//! half; over it, publishers that forward to other nodes pause) and, per shard, what came
//! from the links and waits for that shard — in the bridge's outbox to it or in the channel,
//! not applied yet (its share of the other half; over it, the links are not read, so the
//! sending nodes wait on TCP). The shards count their own side (what they handed the bridge
//! and it has not taken) against the same share (`Shard::cluster_backlogged`).

use super::*;

/// The byte bounds the bridge applies (`ClusterSettings::window_bound`, `shard_share`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Bytes of messages the links' windows hold before publishers pause.
    pub window: usize,
    /// Bytes of messages from the links that may wait for one shard before the links are
    /// no longer read.
    pub per_shard: usize,
}

impl Bounds {
    /// No bound (a bridge that is only a state machine, in tests).
    pub const NONE: Bounds = Bounds { window: usize::MAX, per_shard: usize::MAX };
}

/// Batches the bridge moved into one shard's channel that the shard has not applied yet.
#[derive(Default)]
pub(super) struct Handed {
    /// Messages moved in all.
    sent: u64,
    /// Per batch not applied yet: the count `sent` reached with it, and its bytes.
    batches: VecDeque<(u64, usize)>,
    bytes: usize,
}

impl Bridge {
    /// Whether publishers that forward to other nodes should pause: the links' windows hold
    /// their half of `--node-link-buffer` or more.
    pub fn backlogged(&self) -> bool {
        self.link_bytes() >= self.bounds.window
    }

    /// The sender task moved a batch of `count` messages (`bytes`) from `outbox[shard]`
    /// into the shard's channel.
    pub fn handed(&mut self, shard: usize, count: usize, bytes: usize) {
        let Some(handed) = self.handed.get_mut(shard) else { return };
        handed.sent += count as u64;
        handed.bytes += bytes;
        handed.batches.push_back((handed.sent, bytes));
    }

    /// `shard` has applied `applied` of the messages the bridge sent it (its receiver's
    /// count, without the held mark): the batches it finished no longer count.
    pub fn applied(&mut self, shard: usize, applied: u64) {
        let Some(handed) = self.handed.get_mut(shard) else { return };
        while let Some(&(end, bytes)) = handed.batches.front() {
            if end > applied {
                break;
            }
            handed.batches.pop_front();
            handed.bytes -= bytes;
        }
    }

    /// Bytes waiting for `shard`: in the outbox to it, and handed to its channel but not
    /// applied yet.
    pub fn to_shard_bytes(&self, shard: usize) -> usize {
        self.outbox_bytes[shard] + self.handed.get(shard).map_or(0, |h| h.bytes)
    }

    /// Whether the links may be read: no shard has its share of messages waiting (nor
    /// `MAX_BACKLOG` messages in its outbox). Frames not read wait in the sockets, and the
    /// sending nodes' windows fill: their publishers pause.
    pub fn may_read_links(&self) -> bool {
        self.shard_backlog() < crate::broker::cross::MAX_BACKLOG
            && (0..self.shards).all(|shard| self.to_shard_bytes(shard) < self.bounds.per_shard)
    }
}
