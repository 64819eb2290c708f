//! Durability: per-shard, memory-mapped logs of retained messages and persistent sessions.
//!
//! - [`log`]: segments, records with length and CRC32C, recovery that cuts torn tails.
//! - [`record`]: what the records say.
//! - [`RetainedLog`]: a shard's retained messages, in memory and in its log.
//! - [`SessionLog`]: the changes of a shard's persistent sessions.
//! - [`layout`]: where the logs live under `--data-dir`, and re-partitioning them when
//!   `--cores` changed.

pub mod layout;
pub mod log;
pub mod record;
mod retained_log;
mod session_log;

pub use log::{FlushJob, RecoveryReport, StorageError};
pub use retained_log::RetainedLog;
pub use session_log::{RecoveredMessage, RecoveredSession, SessionLog};
