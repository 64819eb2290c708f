//! An append-only log of checksummed records in memory-mapped segment files.
//!
//! One directory per shard and kind (retained messages, sessions). A segment is a file
//! mapped shared: appending is a copy into the page cache, so a record survives a crash of
//! the process as soon as `append` returns; `--fsync` decides when the pages reach the
//! device. Segments grow: a log's first is 1 MiB, each next one twice the one before, up to
//! `--segment-size` (see `Log::next_capacity`), so a fresh data directory takes a few MiB.
//! Every segment's blocks are reserved when it is created; recovery takes each file's own
//! length, so directories written with fixed-size segments open as they are.
//!
//! Segment: `MAGIC` (8 bytes), its sequence number (u64 LE), then records. Record: payload
//! length (u32 LE), CRC32C of the payload (u32 LE), payload. A zero length ends the data
//! (files are created zero-filled). The length is written last, so a record torn by a
//! crash reads as the end or fails its checksum; recovery cuts it and reports it.
//!
//! The log does not interpret payloads. Its owner marks records dead (`kill`) when newer
//! ones replace them; a sealed segment whose live fraction fell below the threshold is
//! compacted by the owner, which re-appends what is still live and then retires the
//! segment. A retired segment (also an oldest one with nothing live) is deleted by the next
//! flush job, after that job flushed what was written before: the copies, and the records
//! that made the old ones dead. Until then a power loss finds the segment still there.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

const MAGIC: &[u8; 8] = b"RINGMQL1";
const SEGMENT_HEADER: usize = 16;
pub const RECORD_HEADER: usize = 8;
/// The size of a log's first segment (or `--segment-size`, when that is smaller).
pub const FIRST_SEGMENT: usize = 1 << 20;

/// Where a record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loc {
    pub segment: u64,
    pub offset: u32,
    /// The whole record: header and payload.
    pub len: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("record of {0} bytes is larger than a segment can hold")]
    RecordTooLarge(usize),
    #[error("a re-partitioning thread panicked")]
    Panicked,
    #[error("{0} is in use by another running broker")]
    Locked(PathBuf),
    /// Indexes keep segment numbers in 32 bits (`PackedLoc`): 2³² segments, 256 PiB at
    /// 64 MiB each, is where a log stops taking records rather than mislabel them.
    #[error("the log has used up its segment numbers")]
    SegmentsExhausted,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.to_path_buf(), source }
}

/// What recovery found wrong in a log: each cut tail (torn or corrupt) and unreadable file.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub records: u64,
    pub bytes: u64,
    pub segments: usize,
    pub problems: Vec<String>,
}

struct Segment {
    path: PathBuf,
    map: Arc<MmapRaw>,
    capacity: usize,
    /// End of the valid records.
    len: usize,
    /// Bytes of records still live (the owner's `kill` subtracts).
    live: usize,
    /// Bytes already flushed to the device.
    flushed: usize,
    /// Bytes whose pages were released from this process (`Log::release_pages`).
    released: usize,
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `capacity` bytes long and lives as long as `self.map`; this
        // process is the only writer, and writes happen through `&mut Log` only.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.capacity) }
    }
}

/// What one compaction step found to do.
pub enum Compaction {
    Idle,
    /// The oldest segment had nothing live: retired without a scan.
    Retired,
    /// Segment `seq` is to be emptied: its owner copies out what is live (`copy_forward`),
    /// then retires it. `oldest`: no older segment exists (its tombstones can go).
    CopyOut {
        seq: u64,
        oldest: bool,
    },
}

/// Data to flush, taken from the log so the flush can run off the executor.
pub struct FlushJob {
    ranges: Vec<(Arc<MmapRaw>, usize, usize)>,
    dir: PathBuf,
    sync_dir: bool,
    /// Segments compaction emptied: deleted once what it copied out of them (written
    /// before this job was taken) is on the device.
    delete: Vec<(u64, PathBuf)>,
}

impl FlushJob {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && !self.sync_dir && self.delete.is_empty()
    }

    /// Writes the ranges to the device, then deletes the emptied segments, oldest first,
    /// syncing the directory after each (a newer segment's tombstones may cancel records
    /// of an older one: the older must be gone first). Blocking. Returns the segments
    /// deleted (to hand to `Log::deleted`).
    pub fn run(self) -> io::Result<Vec<u64>> {
        #[cfg(test)]
        let _gate = test_gate::enter(&self.dir);
        for (map, offset, len) in &self.ranges {
            map.flush_range(*offset, *len)?;
        }
        if self.sync_dir {
            File::open(&self.dir)?.sync_all()?;
        }
        let mut deleted = Vec::with_capacity(self.delete.len());
        for (seq, path) in &self.delete {
            match fs::remove_file(path) {
                Ok(()) => File::open(&self.dir)?.sync_all()?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            deleted.push(*seq);
        }
        Ok(deleted)
    }
}

pub struct Log {
    dir: PathBuf,
    segment_size: usize,
    segments: BTreeMap<u64, Segment>,
    /// Compacted segments waiting for the flush of what was copied out of them before they
    /// are deleted; they still count as older segments for tombstones.
    retired: BTreeMap<u64, Segment>,
    /// A segment was created since the last flush: the directory needs a sync too.
    new_files: bool,
}

impl Log {
    /// Opens (creating) the log in `dir`, passing every valid record to `visit` in order.
    /// Torn or corrupt data is cut: in the last segment appending resumes where the valid
    /// records end; in an earlier one the rest of that segment is skipped.
    pub fn open(
        dir: &Path,
        segment_size: usize,
        mut visit: impl FnMut(Loc, &[u8]),
    ) -> Result<(Log, RecoveryReport), StorageError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut log = Log {
            dir: dir.to_path_buf(),
            segment_size,
            segments: BTreeMap::new(),
            retired: BTreeMap::new(),
            new_files: false,
        };
        let mut report = RecoveryReport::default();
        let files = segment_files(dir)?;
        let last = files.last().map(|(seq, _)| *seq);
        for (seq, path) in files {
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
            let capacity = file.metadata().map_err(io_err(&path))?.len() as usize;
            if capacity < SEGMENT_HEADER {
                report
                    .problems
                    .push(format!("{}: {capacity} bytes, shorter than a header; removed", path.display()));
                drop(file);
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let map = Arc::new(MmapOptions::new().len(capacity).map_raw(&file).map_err(io_err(&path))?);
            let mut segment =
                Segment { path: path.clone(), map, capacity, len: 0, live: 0, flushed: 0, released: 0 };
            let header_ok =
                segment.bytes()[..8] == MAGIC[..] && segment.bytes()[8..16] == seq.to_le_bytes()[..];
            let end = if header_ok {
                scan(seq, segment.bytes(), &mut report, &mut visit)
            } else {
                report.problems.push(format!("{}: bad segment header, segment skipped", path.display()));
                SEGMENT_HEADER
            };
            segment.len = end;
            segment.flushed = end;
            segment.live = end - SEGMENT_HEADER;
            report.bytes += end as u64;
            report.segments += 1;
            if Some(seq) == last {
                if !header_ok {
                    write_at(&segment, 0, MAGIC);
                    write_at(&segment, 8, &seq.to_le_bytes());
                }
                zero_tail(&segment, end);
            }
            log.segments.insert(seq, segment);
        }
        if log.segments.is_empty() {
            log.new_segment(1, FIRST_SEGMENT.min(segment_size))?;
        }
        Ok((log, report))
    }

    /// Reads every valid record of a log directory without opening it for writing (the
    /// logs of a different shard count, being re-partitioned).
    pub fn read_dir(dir: &Path, mut visit: impl FnMut(&[u8])) -> Result<RecoveryReport, StorageError> {
        let mut report = RecoveryReport::default();
        for (seq, path) in segment_files(dir)? {
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            if bytes.len() < SEGMENT_HEADER || bytes[..8] != MAGIC[..] {
                report.problems.push(format!("{}: bad segment header, segment skipped", path.display()));
                continue;
            }
            let end = scan(seq, &bytes, &mut report, &mut |_, payload: &[u8]| visit(payload));
            report.bytes += end as u64;
            report.segments += 1;
        }
        Ok(report)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one record; it is in the page cache when this returns.
    pub fn append(&mut self, payload: &[u8]) -> Result<Loc, StorageError> {
        let need = RECORD_HEADER + payload.len();
        if need > u32::MAX as usize / 2 {
            return Err(StorageError::RecordTooLarge(payload.len()));
        }
        let fits = self.segments.values().next_back().is_some_and(|s| s.len + need <= s.capacity);
        if !fits {
            let seq = self.segments.keys().next_back().map_or(1, |s| s + 1);
            if seq > u64::from(u32::MAX) {
                return Err(StorageError::SegmentsExhausted);
            }
            self.new_segment(seq, self.next_capacity(SEGMENT_HEADER + need))?;
        }
        let Some((&seq, segment)) = self.segments.iter_mut().next_back() else {
            return Err(StorageError::RecordTooLarge(payload.len()));
        };
        let offset = segment.len;
        let crc = crc32c::crc32c(payload);
        // Payload and checksum first, length last: a torn record reads as the end.
        write_at(segment, offset + RECORD_HEADER, payload);
        write_at(segment, offset + 4, &crc.to_le_bytes());
        write_at(segment, offset, &(payload.len() as u32).to_le_bytes());
        segment.len += need;
        segment.live += need;
        Ok(Loc { segment: seq, offset: offset as u32, len: need as u32 })
    }

    /// The payload of a live record.
    pub fn read(&self, loc: Loc) -> Option<&[u8]> {
        let segment = self.segments.get(&loc.segment)?;
        let start = loc.offset as usize + RECORD_HEADER;
        let end = loc.offset as usize + loc.len as usize;
        (end <= segment.len).then(|| &segment.bytes()[start..end])
    }

    /// Marks a record's bytes dead: a newer record replaced it, or it no longer matters.
    pub fn kill(&mut self, loc: Loc) {
        if let Some(segment) = self.segments.get_mut(&loc.segment) {
            segment.live = segment.live.saturating_sub(loc.len as usize);
        }
    }

    /// The size of the segment to roll to for a record of `need` bytes (header included):
    /// twice the active segment, from `FIRST_SEGMENT` up to `--segment-size`, doubled
    /// further while the record does not fit, and never smaller than the record.
    ///
    /// Growing by new files, not by extending the active segment in place: rolling is the
    /// path every log already takes, a mapping never moves under a reader or a flush job,
    /// and compaction works on whole sealed segments, which one ever-growing file would
    /// never become. Compaction copies live records forward with `append`, so its copies
    /// land in segments of this rule too: at most `--segment-size` (or one record).
    fn next_capacity(&self, need: usize) -> usize {
        let cap = self.segment_size.max(1);
        let first = FIRST_SEGMENT.min(cap);
        let previous = self.segments.values().next_back().map_or(0, |s| s.capacity);
        let mut size = previous.saturating_mul(2).clamp(first, cap);
        while size < need && size < cap {
            size = size.saturating_mul(2).min(cap);
        }
        size.max(need)
    }

    /// The oldest sealed segment whose live fraction is below `threshold`.
    ///
    /// Cancelling records (tombstones) are carried forward while an older segment exists,
    /// so an oldest segment that stays mostly live would let them pile up with traffic.
    /// When the log's segments take more than twice the bytes its live records need (in
    /// whole `--segment-size` segments) plus four segments of slack, the oldest sealed
    /// segment is compacted whatever its live fraction: the log rotates, and disk use
    /// stays proportional to live state. Bytes, not segments: a growing log's first
    /// segments are small, and a count would rotate a log that is all live.
    pub fn compaction_candidate(&self, threshold: f64) -> Option<u64> {
        let active = *self.segments.keys().next_back()?;
        let sealed = || self.segments.iter().filter(|(seq, _)| **seq != active);
        let size = self.segment_size.max(1);
        let live: usize = self.segments.values().map(|s| s.live).sum();
        let disk: usize = self.segments.values().map(|s| s.capacity).sum();
        let needed = live.div_ceil(size).saturating_mul(size);
        if disk > needed.saturating_mul(2).saturating_add(size.saturating_mul(4)) {
            if let Some((seq, _)) = sealed().next() {
                return Some(*seq);
            }
        }
        sealed()
            .find(|(_, s)| {
                let used = s.len.saturating_sub(SEGMENT_HEADER).max(1);
                (s.live as f64) < threshold * used as f64
            })
            .map(|(seq, _)| *seq)
    }

    /// The oldest sealed segment when nothing in it is live: it can go without a scan.
    /// Its tombstones can only cancel records of older segments, which are all retired:
    /// flush jobs delete retired segments oldest first, so those go before it.
    pub fn dead_oldest(&self) -> Option<u64> {
        let active = *self.segments.keys().next_back()?;
        let (&seq, segment) = self.segments.iter().next()?;
        (seq != active && segment.live == 0).then_some(seq)
    }

    /// The next compaction step; a dead oldest segment is retired here. It is not deleted
    /// at once: the records that made it dead may not be on the device yet.
    pub fn next_compaction(&mut self, threshold: f64) -> Result<Compaction, StorageError> {
        if let Some(seq) = self.dead_oldest() {
            self.retire_segment(seq);
            return Ok(Compaction::Retired);
        }
        Ok(match self.compaction_candidate(threshold) {
            Some(seq) => Compaction::CopyOut { seq, oldest: self.is_oldest(seq) },
            None => Compaction::Idle,
        })
    }

    /// Appends a copy of the record at `loc` (compaction); returns where it now is.
    pub fn copy_forward(&mut self, loc: Loc) -> Result<Option<Loc>, StorageError> {
        let Some(payload) = self.read(loc) else { return Ok(None) };
        let payload = payload.to_vec();
        self.append(&payload).map(Some)
    }

    /// Whether `seq` is the oldest segment, retired ones included (a tombstone in it has
    /// nothing older to cancel).
    pub fn is_oldest(&self, seq: u64) -> bool {
        self.segments.keys().next() == Some(&seq) && self.retired.keys().next().is_none_or(|r| *r > seq)
    }

    /// Every record of a segment, with its location.
    pub fn records(&self, seq: u64) -> Vec<Loc> {
        let mut out = Vec::new();
        if let Some(segment) = self.segments.get(&seq) {
            let mut report = RecoveryReport::default();
            scan(seq, &segment.bytes()[..segment.len], &mut report, &mut |loc, _| out.push(loc));
        }
        out
    }

    /// Sets aside a segment whose live records were copied forward (or that had none):
    /// the next flush job deletes it after flushing what was written before.
    pub fn retire_segment(&mut self, seq: u64) {
        if let Some(segment) = self.segments.remove(&seq) {
            self.retired.insert(seq, segment);
        }
    }

    /// Forgets retired segments a flush job deleted.
    pub fn deleted(&mut self, seqs: &[u64]) {
        for seq in seqs {
            self.retired.remove(seq);
        }
    }

    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Lets go of this process's mapping of the pages written so far (below the page the
    /// next append writes to). The mapping is shared with the file, so the data stays in the
    /// page cache and on its way to the device, and reading it again (compaction) faults it
    /// back in; but the broker's resident memory no longer grows with what it has logged,
    /// only with what it holds. Returns the bytes released.
    pub fn release_pages(&mut self) -> usize {
        const PAGE: usize = 4096;
        let mut released = 0;
        for segment in self.segments.values_mut() {
            let upto = segment.len / PAGE * PAGE;
            if upto <= segment.released {
                continue;
            }
            let start = segment.released;
            // SAFETY: a page-aligned range inside the mapping, which stays mapped; for a
            // shared file mapping MADV_DONTNEED only drops this process's page table
            // entries (the page cache keeps the contents, written or not).
            let rc = unsafe {
                libc::madvise(segment.map.as_mut_ptr().add(start).cast(), upto - start, libc::MADV_DONTNEED)
            };
            if rc == 0 {
                released += upto - start;
                segment.released = upto;
            }
        }
        released
    }

    /// Bytes the segment files take (their full size, written or not).
    pub fn disk_bytes(&self) -> u64 {
        self.segments.values().chain(self.retired.values()).map(|s| s.capacity as u64).sum()
    }

    /// Segment files, retired ones included.
    pub fn segment_count(&self) -> usize {
        self.segments.len() + self.retired.len()
    }

    /// Bytes written and not yet flushed.
    pub fn unflushed(&self) -> usize {
        self.segments.values().map(|s| s.len.saturating_sub(s.flushed)).sum()
    }

    /// Takes what is written and not yet flushed; it counts as flushed from here (the
    /// caller runs the job before acknowledging anything that waits on it).
    pub fn take_flush(&mut self) -> FlushJob {
        let mut ranges = Vec::new();
        for segment in self.segments.values_mut() {
            if segment.flushed < segment.len {
                ranges.push((segment.map.clone(), segment.flushed, segment.len - segment.flushed));
                segment.flushed = segment.len;
            }
        }
        let sync_dir = std::mem::take(&mut self.new_files);
        let delete = self.retired.iter().map(|(seq, s)| (*seq, s.path.clone())).collect();
        FlushJob { ranges, dir: self.dir.clone(), sync_dir, delete }
    }

    fn new_segment(&mut self, seq: u64, capacity: usize) -> Result<(), StorageError> {
        let path = self.dir.join(format!("{seq:020}.seg"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // Blocks reserved now, for the whole segment: writing through a mapping into a hole
        // of a full disk raises SIGBUS instead of returning an error; here a full disk is an
        // error on roll.
        // SAFETY: plain syscall on a descriptor we own.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, capacity as libc::off_t) };
        if rc != 0 {
            let _ = fs::remove_file(&path);
            return Err(io_err(&path)(io::Error::from_raw_os_error(rc)));
        }
        let map = Arc::new(MmapOptions::new().len(capacity).map_raw(&file).map_err(io_err(&path))?);
        let segment = Segment { path, map, capacity, len: SEGMENT_HEADER, live: 0, flushed: 0, released: 0 };
        write_at(&segment, 0, MAGIC);
        write_at(&segment, 8, &seq.to_le_bytes());
        self.segments.insert(seq, segment);
        self.new_files = true;
        Ok(())
    }
}

/// Tests hold flush jobs of a directory at a gate, to see what waits for them.
#[cfg(test)]
pub(crate) mod test_gate;

/// The segment files of a directory in sequence order.
fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut files = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(seq) =
            name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if seq > u64::from(u32::MAX) {
            // Never written by ringmq (see `StorageError::SegmentsExhausted`).
            tracing::warn!(path = %entry.path().display(), "ignoring a segment file numbered past 2^32");
            continue;
        }
        files.push((seq, entry.path()));
    }
    files.sort();
    Ok(files)
}

/// Visits the valid records of a segment's bytes; returns where they end. The first
/// record that does not fit or fails its checksum ends the scan and is reported.
fn scan(seq: u64, bytes: &[u8], report: &mut RecoveryReport, visit: &mut impl FnMut(Loc, &[u8])) -> usize {
    let mut offset = SEGMENT_HEADER;
    while offset + RECORD_HEADER <= bytes.len() {
        let len = u32::from_le_bytes([bytes[offset], bytes[offset + 1], bytes[offset + 2], bytes[offset + 3]])
            as usize;
        if len == 0 {
            return offset;
        }
        let crc =
            u32::from_le_bytes([bytes[offset + 4], bytes[offset + 5], bytes[offset + 6], bytes[offset + 7]]);
        let start = offset + RECORD_HEADER;
        let Some(payload) = bytes.get(start..start + len) else {
            report.problems.push(format!(
                "segment {seq}: record at offset {offset} runs past the end ({len} bytes); cut there"
            ));
            return offset;
        };
        if crc32c::crc32c(payload) != crc {
            report.problems.push(format!("segment {seq}: checksum mismatch at offset {offset}; cut there"));
            return offset;
        }
        visit(Loc { segment: seq, offset: offset as u32, len: (RECORD_HEADER + len) as u32 }, payload);
        report.records += 1;
        offset = start + len;
    }
    if bytes[offset.min(bytes.len())..].iter().any(|b| *b != 0) {
        report.problems.push(format!("segment {seq}: truncated record header at offset {offset}; cut there"));
    }
    offset.min(bytes.len())
}

fn write_at(segment: &Segment, offset: usize, bytes: &[u8]) {
    debug_assert!(offset + bytes.len() <= segment.capacity);
    if offset + bytes.len() > segment.capacity {
        return;
    }
    // SAFETY: in bounds of the mapping (checked above); single writer (the owning shard).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), segment.map.as_mut_ptr().add(offset), bytes.len())
    }
}

/// Zeroes what follows the valid records of the active segment, so a cut tail cannot be
/// read back as records after new appends.
fn zero_tail(segment: &Segment, end: usize) {
    let bytes = segment.bytes();
    let mut stop = end;
    // Garbage ends where zeroes begin; a record is never longer than the segment.
    while stop < segment.capacity {
        let chunk_end = (stop + 4096).min(segment.capacity);
        if bytes[stop..chunk_end].iter().all(|b| *b == 0) {
            break;
        }
        stop = chunk_end;
    }
    if stop > end {
        // SAFETY: in bounds of the mapping; single writer.
        unsafe { std::ptr::write_bytes(segment.map.as_mut_ptr().add(end), 0, stop - end) }
    }
}

#[cfg(test)]
mod tests;
