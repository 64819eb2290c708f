//! Log records (`ringmq::storage::record::Record`) decoded from arbitrary bytes, as recovery
//! reads a damaged or foreign segment: decoding never panics, and a record that decodes
//! encodes again into bytes that decode to the same record (message expiry deadlines,
//! stored as wall-clock time, may move by the time the round trip takes).

#![no_main]

use std::time::{Duration, Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringmq::storage::record::Record;

/// The message expiry a record carries, taken out of it so the rest compares exactly.
fn take_expiry(record: &mut Record) -> Option<Option<Instant>> {
    match record {
        Record::RetainedSet(message) | Record::Message { message, .. } => Some(message.expires_at.take()),
        _ => None,
    }
}

fn close(a: Option<Option<Instant>>, b: Option<Option<Instant>>) -> bool {
    match (a, b) {
        (Some(Some(a)), Some(Some(b))) => {
            let gap = if a > b { a - b } else { b - a };
            gap <= Duration::from_secs(1)
        }
        (a, b) => a.map(|x| x.is_some()) == b.map(|x| x.is_some()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut record) = Record::decode(data) else { return };
    let mut buf = BytesMut::new();
    record.encode(&mut buf);
    let mut again = match Record::decode(&buf) {
        Ok(again) => again,
        Err(err) => panic!("a decoded record re-encodes into bytes that do not decode ({err}): {record:?}"),
    };
    let (expiry, expiry_again) = (take_expiry(&mut record), take_expiry(&mut again));
    assert_eq!(again, record, "the re-encoded record decodes differently");
    assert!(close(expiry, expiry_again), "expiry moved: {expiry:?} -> {expiry_again:?}");
});
