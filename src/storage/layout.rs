//! Where the logs live: `{data-dir}/shards-{N}/{shard}/retained` and `.../sessions` for a
//! broker of N shards. When the directory holds the logs of another shard count, they are
//! re-partitioned before the shards start: one thread per new shard reads every old log,
//! keeps what it owns now (placement recomputed from topics and client identifiers) and
//! writes it to `shards-{N}.migrating/`, which is renamed to `shards-{N}` once complete;
//! only then are the old logs removed. An interrupted migration starts over.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::log::StorageError;
use super::retained_store::RetainedStore;
use super::{RetainedLog, SessionLog};
use crate::broker::placement;

/// Holds `{data-dir}/LOCK` locked (`flock`) while the broker runs: a second broker on the
/// same directory would interleave its appends with ours.
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
}

impl DataDirLock {
    pub fn acquire(root: &Path) -> Result<DataDirLock, StorageError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let path = root.join("LOCK");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a descriptor we own; released when the file closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) } != 0
        {
            return Err(StorageError::Locked(root.to_path_buf()));
        }
        Ok(DataDirLock { _file: file })
    }
}

pub struct Layout {
    root: PathBuf,
    shards: usize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.to_path_buf(), source }
}

fn generation(root: &Path, shards: usize) -> PathBuf {
    root.join(format!("shards-{shards}"))
}

impl Layout {
    pub fn new(root: &Path, shards: usize) -> Layout {
        Layout { root: root.to_path_buf(), shards }
    }

    pub fn retained_dir(&self, shard: usize) -> PathBuf {
        generation(&self.root, self.shards).join(shard.to_string()).join("retained")
    }

    pub fn sessions_dir(&self, shard: usize) -> PathBuf {
        generation(&self.root, self.shards).join(shard.to_string()).join("sessions")
    }

    /// Makes the data directory ready for this shard count, re-partitioning the logs of
    /// another one. Returns the old shard count when it did.
    pub fn prepare(&self, segment_size: usize) -> Result<Option<usize>, StorageError> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let mut others = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let entry = entry.map_err(io_err(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".migrating") {
                fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
                continue;
            }
            if let Some(n) = name.strip_prefix("shards-").and_then(|n| n.parse::<usize>().ok()) {
                if n != self.shards {
                    others.push(n);
                }
            }
        }
        let current = generation(&self.root, self.shards);
        if current.exists() {
            // Leftovers of a migration that completed (renamed) before they were removed.
            for n in others {
                let old = generation(&self.root, n);
                fs::remove_dir_all(&old).map_err(io_err(&old))?;
            }
            return Ok(None);
        }
        let Some(&from) = others.iter().max() else { return Ok(None) };
        let started = Instant::now();
        let target = self.root.join(format!("shards-{}.migrating", self.shards));
        let old = generation(&self.root, from);
        let results: Vec<Result<(usize, usize), StorageError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..self.shards)
                .map(|shard| {
                    let (target, old) = (&target, &old);
                    scope.spawn(move || migrate_shard(old, from, target, shard, self.shards, segment_size))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(Err(StorageError::Panicked))).collect()
        });
        let (mut retained, mut sessions) = (0, 0);
        for result in results {
            let (r, s) = result?;
            retained += r;
            sessions += s;
        }
        fs::rename(&target, &current).map_err(io_err(&current))?;
        fs::File::open(&self.root).and_then(|d| d.sync_all()).map_err(io_err(&self.root))?;
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
        tracing::info!(
            from,
            to = self.shards,
            retained,
            sessions,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "re-partitioned the data directory for the new core count"
        );
        Ok(Some(from))
    }
}

/// Writes what new shard `shard` owns of the old logs into `target/{shard}`. Returns the
/// retained messages and sessions it took.
fn migrate_shard(
    old: &Path,
    old_shards: usize,
    target: &Path,
    shard: usize,
    shards: usize,
    segment_size: usize,
) -> Result<(usize, usize), StorageError> {
    let dir = target.join(shard.to_string());
    // No bound while re-partitioning: every retained message moves.
    let (mut retained, _) = RetainedLog::open(&dir.join("retained"), segment_size, 0.5, Default::default())?;
    let (mut sessions, _, _) = SessionLog::open(&dir.join("sessions"), segment_size, 0.5)?;
    let (mut taken_retained, mut taken_sessions) = (0, 0);
    for old_shard in 0..old_shards {
        let old_dir = old.join(old_shard.to_string());
        let mut mine = Vec::new();
        RetainedLog::read_dir(&old_dir.join("retained"), |m| {
            if placement::owner(m.topic.as_str(), shards) == shard {
                mine.push(m.clone());
            }
        })?;
        for message in mine {
            if retained.set(message).is_ok() {
                taken_retained += 1;
            }
        }
        let (recovered, _) = SessionLog::read_dir(&old_dir.join("sessions"))?;
        for session in recovered.iter().filter(|s| placement::owner(&s.client_id, shards) == shard) {
            sessions.persist(session);
            taken_sessions += 1;
        }
    }
    for job in [retained.take_flush(), sessions.take_flush()].into_iter().flatten() {
        job.run().map_err(io_err(&dir))?;
    }
    Ok((taken_retained, taken_sessions))
}
