//! Tests of the session log: replay, compaction, spilled recovery.
use super::*;
use crate::topic::TopicName;

fn will() -> Will {
    Will {
        topic: TopicName::from_static("wills/x"),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: crate::codec::Properties::default(),
    }
}

fn reopen(dir: &Path) -> Vec<RecoveredSession> {
    SessionLog::open(dir, 1 << 20, 0.5).unwrap().1
}

#[test]
fn a_discarded_or_published_will_is_not_armed_again() {
    let dir = std::env::temp_dir().join(format!("ringmq-session-log-{}-wills", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut log, _, _) = SessionLog::open(&dir, 1 << 20, 0.5).unwrap();
    let polite = log.session_opened("polite", ProtocolVersion::V5, 3600, Some(&will()), None);
    let abrupt = log.session_opened("abrupt", ProtocolVersion::V5, 3600, Some(&will()), None);
    let pending = log.session_opened("pending", ProtocolVersion::V5, 3600, Some(&will()), None);
    log.offline(polite, 3600, false); // normal DISCONNECT
    log.offline(abrupt, 3600, true);
    log.will_published(abrupt); // its will fired while offline
    log.offline(pending, 3600, true); // delay not over yet
    drop(log);
    let sessions = reopen(&dir);
    let will_of = |id: &str| sessions.iter().find(|s| s.client_id == id).map(|s| s.will.is_some());
    assert_eq!(will_of("polite"), Some(false));
    assert_eq!(will_of("abrupt"), Some(false));
    assert_eq!(will_of("pending"), Some(true));
    // The offline time survives the will's publication.
    assert!(sessions.iter().all(|s| s.offline_at.is_some()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_long_queue_is_recovered_as_spilled_and_read_back_from_the_log() {
    let dir = std::env::temp_dir().join(format!("ringmq-session-log-{}-spilled", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut log, _, _) = SessionLog::open(&dir, 1 << 20, 0.5).unwrap();
    let id = log.session_opened("behind", ProtocolVersion::V5, 3600, None, None);
    log.offline(id, 3600, false);
    let message = |n: usize| {
        let topic = TopicName::new(bytes::Bytes::from(format!("q/{n}"))).unwrap();
        let payload = bytes::Bytes::from(n.to_string());
        Message::new(topic, payload, QoS::AtLeastOnce, false, &crate::codec::Properties::default())
    };
    let seqs: Vec<u64> =
        (0..10).map(|n| log.message(id, QoS::AtLeastOnce, false, &[], &message(n))).collect();
    // The first one was sent and is in flight: it is read back whatever the limit.
    log.sent(id, seqs[0], 1);
    drop(log);
    let (log, sessions, _) = SessionLog::open_keeping(&dir, 1 << 20, 0.5, 3).unwrap();
    let s = &sessions[0];
    let read: Vec<u64> = s.messages.iter().map(|m| m.seq).collect();
    assert_eq!(read, seqs[..4], "the one in flight and three queued");
    let spilled: Vec<u64> = s.spilled.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(spilled, seqs[4..]);
    for (n, seq) in seqs.iter().enumerate().skip(4) {
        let back = log.load(s.log_id, *seq).expect("a spilled message is in the log");
        assert_eq!(back.message.payload, n.to_string().as_bytes());
    }
    // Without a limit, every one is read.
    drop(log);
    assert_eq!(reopen(&dir)[0].messages.len(), 10);
    std::fs::remove_dir_all(&dir).unwrap();
}
