//! Recovery (order, torn and corrupt tails, truncated files), and when compaction
//! retires and deletes segments.

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
