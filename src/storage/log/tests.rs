//! Recovery (order, torn and corrupt tails, truncated files), when compaction retires and
//! deletes segments, and how segments grow (sizes, old fixed-size directories, compaction
//! across grown segments).

use super::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringmq-log-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn reopen(dir: &Path, size: usize) -> (Log, Vec<Vec<u8>>, RecoveryReport) {
    let mut seen = Vec::new();
    let (log, report) = Log::open(dir, size, |_, p| seen.push(p.to_vec())).unwrap();
    (log, seen, report)
}

#[test]
fn records_come_back_in_order_across_segments() {
    let dir = temp_dir("order");
    let (mut log, seen, _) = reopen(&dir, 4096);
    assert!(seen.is_empty());
    let payloads: Vec<Vec<u8>> = (0..500u32).map(|i| format!("record {i}").into_bytes()).collect();
    for p in &payloads {
        log.append(p).unwrap();
    }
    assert!(log.segment_count() > 1);
    drop(log);
    let (mut log, seen, report) = reopen(&dir, 4096);
    assert_eq!(seen, payloads);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Appending continues after what was recovered.
    log.append(b"after").unwrap();
    drop(log);
    let (_, seen, _) = reopen(&dir, 4096);
    assert_eq!(seen.last().map(Vec::as_slice), Some(&b"after"[..]));
    assert_eq!(seen.len(), 501);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_torn_tail_is_cut_and_reported() {
    let dir = temp_dir("torn");
    let (mut log, _, _) = reopen(&dir, 1 << 16);
    for i in 0..10u32 {
        log.append(format!("r{i}").as_bytes()).unwrap();
    }
    let last = log.append(b"the torn one").unwrap();
    drop(log);
    // Flip a payload byte of the last record.
    let path = dir.join(format!("{:020}.seg", last.segment));
    let mut bytes = fs::read(&path).unwrap();
    bytes[last.offset as usize + RECORD_HEADER + 2] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let (mut log, seen, report) = reopen(&dir, 1 << 16);
    assert_eq!(seen.len(), 10);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    // The cut place is reused, and nothing of the torn record comes back.
    log.append(b"new").unwrap();
    drop(log);
    let (_, seen, report) = reopen(&dir, 1 << 16);
    assert_eq!(seen.len(), 11);
    assert_eq!(seen.last().map(Vec::as_slice), Some(&b"new"[..]));
    assert!(report.problems.is_empty());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corruption_in_an_older_segment_keeps_the_later_segments() {
    let dir = temp_dir("older");
    let (mut log, _, _) = reopen(&dir, 1024);
    let locs: Vec<Loc> =
        (0..200u32).map(|i| log.append(format!("record {i:04}").as_bytes()).unwrap()).collect();
    drop(log);
    let first = locs[0];
    let path = dir.join(format!("{:020}.seg", first.segment));
    let mut bytes = fs::read(&path).unwrap();
    bytes[first.offset as usize + 5] ^= 0x01; // the checksum of the first record
    fs::write(&path, &bytes).unwrap();
    let in_first = locs.iter().filter(|l| l.segment == first.segment).count();
    let (_, seen, report) = reopen(&dir, 1024);
    assert_eq!(seen.len(), 200 - in_first);
    assert_eq!(seen.last().map(Vec::as_slice), Some(&b"record 0199"[..]));
    assert_eq!(report.problems.len(), 1);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_truncated_segment_recovers_its_whole_records() {
    let dir = temp_dir("truncated");
    let (mut log, _, _) = reopen(&dir, 1 << 16);
    let locs: Vec<Loc> = (0..20u32).map(|i| log.append(format!("record {i}").as_bytes()).unwrap()).collect();
    drop(log);
    let cut_at = locs[15].offset as usize + 3;
    let path = dir.join(format!("{:020}.seg", locs[0].segment));
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(cut_at as u64).unwrap();
    drop(file);
    let (_, seen, report) = reopen(&dir, 1 << 16);
    assert_eq!(seen.len(), 15);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_retired_segment_is_deleted_only_by_the_flush_after_the_copies() {
    let dir = temp_dir("retire");
    let (mut log, _, _) = reopen(&dir, 1024);
    let locs: Vec<Loc> =
        (0..100u32).map(|i| log.append(format!("record {i:04}").as_bytes()).unwrap()).collect();
    let first = locs[0].segment;
    let path = dir.join(format!("{first:020}.seg"));
    log.retire_segment(first);
    assert!(path.exists(), "kept until its copies are flushed");
    // Still counted as older: a tombstone in the next segment must be kept.
    assert!(!log.is_oldest(first + 1));
    let deleted = log.take_flush().run().unwrap();
    assert_eq!(deleted, vec![first]);
    assert!(!path.exists());
    log.deleted(&deleted);
    assert!(log.is_oldest(first + 1));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_dead_oldest_segment_is_deleted_only_by_the_flush_after_what_made_it_dead() {
    let dir = temp_dir("dead-oldest");
    let (mut log, _, _) = reopen(&dir, 1024);
    let locs: Vec<Loc> =
        (0..100u32).map(|i| log.append(format!("record {i:04}").as_bytes()).unwrap()).collect();
    log.take_flush().run().unwrap();
    let first = locs[0].segment;
    let path = dir.join(format!("{first:020}.seg"));
    // Newer records replace everything the first segment holds (a reconnection's Open
    // record replacing the old one, say); they are not on the device yet.
    let newer = log.append(b"the newer record").unwrap();
    for loc in locs.iter().filter(|l| l.segment == first) {
        log.kill(*loc);
    }
    log.next_compaction(0.5).unwrap();
    assert!(path.exists(), "deleted before the records that made it dead were flushed");
    let job = log.take_flush();
    assert!(
        job.ranges.iter().any(|(_, offset, len)| *offset <= newer.offset as usize
            && newer.offset as usize + newer.len as usize <= offset + len),
        "the job that deletes it flushes the newer record first"
    );
    let deleted = job.run().unwrap();
    assert_eq!(deleted, vec![first]);
    assert!(!path.exists());
    log.deleted(&deleted);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn consecutive_dead_segments_are_retired_without_copies_and_deleted_oldest_first() {
    let dir = temp_dir("dead-run");
    let (mut log, _, _) = reopen(&dir, 1024);
    let locs: Vec<Loc> =
        (0..200u32).map(|i| log.append(format!("record {i:04}").as_bytes()).unwrap()).collect();
    let active = locs.last().unwrap().segment;
    let sealed: BTreeMap<u64, ()> =
        locs.iter().filter(|l| l.segment != active).map(|l| (l.segment, ())).collect();
    assert!(sealed.len() > 2);
    for loc in locs.iter().filter(|l| l.segment != active) {
        log.kill(*loc);
    }
    log.take_flush().run().unwrap();
    let mut retired = 0;
    while matches!(log.next_compaction(0.5).unwrap(), Compaction::Retired) {
        retired += 1;
    }
    assert_eq!(retired, sealed.len(), "each retired while the older ones wait for the flush");
    assert_eq!(log.unflushed(), 0, "nothing was copied forward");
    let deleted = log.take_flush().run().unwrap();
    assert_eq!(deleted, sealed.keys().copied().collect::<Vec<_>>());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_log_far_larger_than_its_live_bytes_compacts_its_oldest_segment() {
    let dir = temp_dir("rotate");
    let (mut log, _, _) = reopen(&dir, 1024);
    // The first segment stays fully live; everything after it is dead (tombstones).
    let locs: Vec<Loc> =
        (0..400u32).map(|i| log.append(format!("record {i:04}").as_bytes()).unwrap()).collect();
    let first = locs[0].segment;
    for loc in locs.iter().filter(|l| l.segment != first) {
        log.kill(*loc);
    }
    assert!(log.segment_count() > 6);
    assert_eq!(log.compaction_candidate(0.5), Some(first), "the oldest goes though it is all live");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn live_fraction_picks_segments_to_compact() {
    let dir = temp_dir("compact");
    let (mut log, _, _) = reopen(&dir, 1024);
    let locs: Vec<Loc> =
        (0..100u32).map(|i| log.append(format!("record {i:04}").as_bytes()).unwrap()).collect();
    assert_eq!(log.compaction_candidate(0.5), None);
    let first = locs[0].segment;
    for loc in locs.iter().filter(|l| l.segment == first) {
        log.kill(*loc);
    }
    assert_eq!(log.compaction_candidate(0.5), Some(first));
    assert!(log.is_oldest(first));
    assert_eq!(log.records(first).len(), locs.iter().filter(|l| l.segment == first).count());
    let before = log.segment_count();
    log.retire_segment(first);
    let deleted = log.take_flush().run().unwrap();
    log.deleted(&deleted);
    assert_eq!(log.segment_count(), before - 1);
    assert_eq!(log.unflushed(), 0);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_segment_numbered_past_two_to_the_32_is_never_read_nor_written() {
    let dir = temp_dir("numbers");
    let (mut log, _, _) = reopen(&dir, 4096);
    log.append(b"kept").unwrap();
    drop(log);
    // A file ringmq never writes (indexes keep segment numbers in 32 bits).
    fs::write(dir.join(format!("{:020}.seg", u64::from(u32::MAX) + 1)), b"not a segment").unwrap();
    let (mut log, seen, _) = reopen(&dir, 4096);
    assert_eq!(seen, [b"kept".to_vec()]);
    // Appending goes on in the segments it numbers itself.
    let loc = log.append(b"next").unwrap();
    assert!(loc.segment <= u64::from(u32::MAX));
    fs::remove_dir_all(&dir).unwrap();
}

const MIB: usize = 1 << 20;

/// The segment files of a log directory: (sequence number, file length), in order.
fn files(dir: &Path) -> Vec<(u64, usize)> {
    segment_files(dir)
        .unwrap()
        .into_iter()
        .map(|(seq, p)| (seq, fs::metadata(p).unwrap().len() as usize))
        .collect()
}

fn sizes(dir: &Path) -> Vec<usize> {
    files(dir).into_iter().map(|(_, len)| len).collect()
}

/// Writes segment `seq` as a ringmq of fixed-size segments did: header, records, then
/// zeroes up to `capacity` (sparse here, which recovery cannot tell).
fn write_segment(dir: &Path, seq: u64, capacity: usize, payloads: &[Vec<u8>]) {
    fs::create_dir_all(dir).unwrap();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&seq.to_le_bytes());
    for p in payloads {
        bytes.extend_from_slice(&(p.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(p).to_le_bytes());
        bytes.extend_from_slice(p);
    }
    assert!(bytes.len() <= capacity);
    let path = dir.join(format!("{seq:020}.seg"));
    fs::write(&path, &bytes).unwrap();
    OpenOptions::new().write(true).open(&path).unwrap().set_len(capacity as u64).unwrap();
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    let mut p = format!("record {i:08} ").into_bytes();
    p.resize(len, (i % 251) as u8);
    p
}

#[test]
fn a_fresh_log_starts_with_a_segment_of_one_mib() {
    let dir = temp_dir("first-size");
    let (log, _, _) = reopen(&dir, 64 * MIB);
    assert_eq!(sizes(&dir), [MIB]);
    assert_eq!(log.disk_bytes(), MIB as u64);
    drop(log);
    // Below 1 MiB, `--segment-size` is the size of every segment, the first too.
    let small = temp_dir("first-size-small");
    let (_, _, _) = reopen(&small, 64 * 1024);
    assert_eq!(sizes(&small), [64 * 1024]);
    fs::remove_dir_all(&dir).unwrap();
    fs::remove_dir_all(&small).unwrap();
}

#[test]
fn segment_sizes_double_up_to_the_segment_size() {
    let dir = temp_dir("doubling");
    let (mut log, _, _) = reopen(&dir, 8 * MIB);
    let mut written = Vec::new();
    let mut i = 0;
    while log.segment_count() < 7 {
        let p = payload(i, 4000);
        log.append(&p).unwrap();
        written.push(p);
        i += 1;
    }
    assert_eq!(sizes(&dir), [MIB, 2 * MIB, 4 * MIB, 8 * MIB, 8 * MIB, 8 * MIB, 8 * MIB]);
    // Each segment is filled before the next: a record went to a new one only when the
    // active one could not take it.
    let used: Vec<usize> = log.segments.values().map(|s| s.len).collect();
    for (used, size) in used.iter().zip(sizes(&dir)).take(6) {
        assert!(size - used < RECORD_HEADER + 4000, "{used} of {size} used");
    }
    drop(log);
    let (mut log, seen, report) = reopen(&dir, 8 * MIB);
    assert_eq!(seen, written);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // A reopened log goes on from its last segment's real size.
    while log.segment_count() < 8 {
        log.append(&payload(i, 4000)).unwrap();
        i += 1;
    }
    assert_eq!(sizes(&dir).last(), Some(&(8 * MIB)));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_record_larger_than_the_next_size_gets_a_segment_that_holds_it() {
    let dir = temp_dir("large-record");
    let (mut log, _, _) = reopen(&dir, 4 * MIB);
    log.append(b"small").unwrap();
    // Larger than the next size (2 MiB) but within `--segment-size`: doubled until it fits.
    let three = payload(1, 3 * MIB);
    let loc = log.append(&three).unwrap();
    assert_eq!(loc.segment, 2);
    assert_eq!(sizes(&dir), [MIB, 4 * MIB]);
    // Larger than `--segment-size`: a segment of its own size, as before.
    let six = payload(2, 6 * MIB);
    let loc = log.append(&six).unwrap();
    assert_eq!(loc.segment, 3);
    assert_eq!(sizes(&dir)[2], SEGMENT_HEADER + RECORD_HEADER + 6 * MIB);
    // After it, segments are `--segment-size` again.
    let after = log.append(b"after").unwrap();
    assert_eq!(after.segment, 4);
    assert_eq!(sizes(&dir)[3], 4 * MIB);
    assert_eq!(log.read(loc), Some(&six[..]));
    drop(log);
    let (_, seen, report) = reopen(&dir, 4 * MIB);
    assert_eq!(seen, [b"small".to_vec(), three, six, b"after".to_vec()]);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_directory_of_fixed_size_segments_recovers_and_keeps_their_size() {
    let dir = temp_dir("old-fixed");
    // What a ringmq of fixed 4 MiB segments left: three full-size files.
    let records: Vec<Vec<u8>> = (0..30).map(|i| payload(i, 100)).collect();
    for (n, chunk) in records.chunks(10).enumerate() {
        write_segment(&dir, n as u64 + 1, 4 * MIB, chunk);
    }
    let (mut log, seen, report) = reopen(&dir, 4 * MIB);
    assert_eq!(seen, records);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.segments, 3);
    assert_eq!(log.disk_bytes(), 12 * MIB as u64);
    // Appending goes on in the last file, then rolls to a segment of `--segment-size`.
    let loc = log.append(b"appended").unwrap();
    assert_eq!(loc.segment, 3);
    while log.segment_count() < 4 {
        log.append(&payload(0, 64 * 1024)).unwrap();
    }
    assert_eq!(sizes(&dir), [4 * MIB; 4]);
    drop(log);
    // Opened with a larger `--segment-size`, the next segment doubles the last one.
    let (mut log, seen, _) = reopen(&dir, 64 * MIB);
    assert_eq!(seen[..30], records[..]);
    while log.segment_count() < 5 {
        log.append(&payload(0, 64 * 1024)).unwrap();
    }
    assert_eq!(sizes(&dir)[4], 8 * MIB);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_directory_of_mixed_segment_sizes_recovers_every_record() {
    let dir = temp_dir("mixed");
    // Old fixed-size segments, then a smaller `--segment-size`, an oversized record, and
    // grown ones: each read by its own length.
    let layout =
        [(64 * MIB, 3), (64 * 1024, 5), (MIB, 2), (2 * MIB + 300, 1), (2 * MIB, 4), (5 * 4096 + 17, 2)];
    let mut records = Vec::new();
    for (n, (capacity, count)) in layout.iter().enumerate() {
        let chunk: Vec<Vec<u8>> = (0..*count).map(|i| payload(records.len() + i, 200 + 97 * i)).collect();
        write_segment(&dir, n as u64 + 1, *capacity, &chunk);
        records.extend(chunk);
    }
    let (mut log, seen, report) = reopen(&dir, 4 * MIB);
    assert_eq!(seen, records);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.segments, layout.len());
    // The last segment (of an odd size) takes appends to its end; the next is the first
    // size doubled past it.
    let mut appended = Vec::new();
    while log.segment_count() == layout.len() {
        let p = payload(1000 + appended.len(), 1000);
        log.append(&p).unwrap();
        appended.push(p);
    }
    assert_eq!(sizes(&dir).last(), Some(&MIB));
    drop(log);
    let (_, seen, report) = reopen(&dir, 4 * MIB);
    records.extend(appended);
    assert_eq!(seen, records);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    fs::remove_dir_all(&dir).unwrap();
}

/// Compacts the way the owners do: copies what `live` holds forward, then retires.
fn compact_all(log: &mut Log, live: &mut BTreeMap<usize, (Loc, Vec<u8>)>, threshold: f64) -> usize {
    let mut steps = 0;
    loop {
        match log.next_compaction(threshold).unwrap() {
            Compaction::Idle => break,
            Compaction::Retired => {}
            Compaction::CopyOut { seq, .. } => {
                for loc in log.records(seq) {
                    if let Some((_, slot)) = live.iter_mut().find(|(_, (l, _))| *l == loc) {
                        slot.0 = log.copy_forward(loc).unwrap().unwrap();
                    }
                }
                log.retire_segment(seq);
            }
        }
        steps += 1;
        let deleted = log.take_flush().run().unwrap();
        log.deleted(&deleted);
    }
    steps
}

#[test]
fn compaction_copies_across_grown_segments_into_bounded_ones() {
    let dir = temp_dir("compact-grown");
    let cap = 4 * MIB;
    let (mut log, _, _) = reopen(&dir, cap);
    // Every tenth write is a key of its own that stays; the rest overwrite 50 keys: each
    // sealed segment ends up about a tenth live, whatever its size.
    let mut live: BTreeMap<usize, (Loc, Vec<u8>)> = BTreeMap::new();
    for i in 0..6000 {
        let key = if i % 10 == 0 { 1000 + i } else { i % 50 };
        let mut p = format!("key {key:08} ").into_bytes();
        p.extend(payload(i, 1500));
        let loc = log.append(&p).unwrap();
        if let Some((old, _)) = live.insert(key, (loc, p)) {
            log.kill(old);
        }
    }
    assert_eq!(sizes(&dir), [MIB, 2 * MIB, cap, cap]);
    let steps = compact_all(&mut log, &mut live, 0.5);
    assert!(steps >= 3, "the sealed segments were compacted ({steps} steps)");
    for (loc, p) in live.values() {
        assert_eq!(log.read(*loc), Some(&p[..]));
    }
    // Only the active segment is left, and what it rolled to: never past `--segment-size`.
    let after = files(&dir);
    assert!(after.iter().all(|(seq, len)| *seq >= 4 && *len <= cap), "{after:?}");
    let live_bytes: usize = live.values().map(|(l, _)| l.len as usize).sum();
    assert!(log.disk_bytes() as usize <= 2 * live_bytes.div_ceil(cap) * cap + 4 * cap);
    drop(log);
    // What recovery replays ends with the latest record of every key.
    let (_, seen, report) = reopen(&dir, cap);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    for (key, (_, p)) in &live {
        let prefix = format!("key {key:08} ").into_bytes();
        let last = seen.iter().rposition(|s| s.starts_with(&prefix)).unwrap();
        assert_eq!(seen[last], *p);
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_growing_log_that_is_all_live_is_not_rotated() {
    let dir = temp_dir("grown-live");
    let (mut log, _, _) = reopen(&dir, 64 * MIB);
    // 1 + 2 + ... + 32 MiB of records, all live, and the first of a 64 MiB segment: seven
    // segments for 63 MiB. Counting segments, this looked like a log of one segment's
    // worth of live data spread over seven, and its oldest would be copied for nothing.
    let mut i = 0;
    while log.segment_count() < 7 {
        log.append(&payload(i, 64 * 1024)).unwrap();
        i += 1;
    }
    assert_eq!(sizes(&dir), [MIB, 2 * MIB, 4 * MIB, 8 * MIB, 16 * MIB, 32 * MIB, 64 * MIB]);
    assert_eq!(log.compaction_candidate(0.5), None);
    drop(log);
    fs::remove_dir_all(&dir).unwrap();
}
