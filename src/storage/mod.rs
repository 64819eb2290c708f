//! Durability: per-shard, memory-mapped logs of retained messages and persistent sessions.
//!
//! - [`log`]: segments, records with length and CRC32C, recovery that cuts torn tails.
//! - [`record`]: what the records say.
//! - [`retained_store`]: the retained-message store a shard queries (in memory, or
//!   [`RetainedLog`] with a data directory) and the budget all shards share.
//! - [`RetainedLog`]: a shard's retained messages, in memory and in its log.
//! - [`SessionLog`]: the changes of a shard's persistent sessions.
//! - [`layout`]: where the logs live under `--data-dir`, and re-partitioning them when
//!   `--cores` changed.

pub mod layout;
pub mod log;
pub mod record;
mod retained_log;
pub mod retained_store;
mod session_log;

pub use log::{FlushJob, RecoveryReport, StorageError};
pub use retained_log::RetainedLog;
pub use session_log::{RecoveredMessage, RecoveredSession, SessionLog};

/// How far a shard's logs got, summed over them: records appended, and appends that failed
/// (disk full, I/O error). What happened between two marks decides whether an
/// acknowledgement waits for a flush, or is withheld.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogMark {
    pub appended: u64,
    pub failures: u64,
}

impl LogMark {
    /// Something was appended since `before`.
    pub fn wrote_since(&self, before: LogMark) -> bool {
        self.appended > before.appended
    }

    /// An append failed since `before`: what it was for is not in the log.
    pub fn failed_since(&self, before: LogMark) -> bool {
        self.failures > before.failures
    }
}
