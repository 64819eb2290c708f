//! What the logs hold: retained messages and the changes of persistent sessions, as
//! self-contained binary records (the log adds length and checksum). Sessions are named
//! by a number local to their log, introduced by an `Open` record carrying the client
//! identifier; no hash values are written (placement is recomputed at recovery).
//!
//! Times are wall-clock milliseconds since the Unix epoch: they must mean the same after a
//! restart.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::broker::message::{Message, MessageId};
use crate::codec::{Properties, PropertyContext, QoS, SubscriptionOptions, Will};
use crate::topic::{TopicFilter, TopicName};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable {0} in a log record")]
pub struct RecordError(&'static str);

/// One record of a retained-message log or a session log.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    RetainedSet(Message),
    RetainedDelete(TopicName),
    /// A persistent session connected (again): it is online from here.
    /// `stamp` orders Open and Offline records, which compaction may move past each other.
    Open {
        session: u64,
        stamp: u64,
        client_id: String,
        version: u8,
        expiry: u32,
        will: Option<Will>,
        /// Who its client authenticated as, on a listener with authentication: the rules
        /// it is held to after a restart, and who may take it over.
        owner: Option<SessionOwner>,
    },
    /// Its connection ended at `at`; the expiry interval then in force; whether its will
    /// is still to be published (a normal DISCONNECT discards it; a will that fired is
    /// gone: a newer Offline record says so).
    Offline {
        session: u64,
        stamp: u64,
        at: u64,
        expiry: u32,
        will: bool,
    },
    Ended {
        session: u64,
    },
    Subscribe {
        session: u64,
        filter: TopicFilter,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    },
    Unsubscribe {
        session: u64,
        filter: TopicFilter,
    },
    /// A QoS 1/2 message accepted for the session, at the QoS and RETAIN it is delivered with.
    Message {
        session: u64,
        seq: u64,
        qos: QoS,
        retain: bool,
        identifiers: Vec<u32>,
        message: Message,
    },
    /// Sent with this packet identifier (and not yet acknowledged).
    Sent {
        session: u64,
        seq: u64,
        packet_id: u16,
    },
    /// PUBREC received: only PUBREL/PUBCOMP remain.
    Released {
        session: u64,
        seq: u64,
        packet_id: u16,
    },
    /// Acknowledged or dropped: the message needs nothing more.
    Done {
        session: u64,
        seq: u64,
    },
    /// Inbound QoS 2 packet identifier between PUBREC and PUBREL (exactly once across a
    /// restart).
    Qos2In {
        session: u64,
        packet_id: u16,
    },
    Qos2InDone {
        session: u64,
        packet_id: u16,
    },
}

const RETAINED_SET: u8 = 1;
const RETAINED_DELETE: u8 = 2;
const OPEN: u8 = 10;
/// An Open record with its owner (or none) after the will: written from the release that
/// keeps owners; OPEN records of older logs read as owned by nobody.
const OPEN_OWNED: u8 = 22;
const OFFLINE: u8 = 11;
const ENDED: u8 = 12;
const SUBSCRIBE: u8 = 13;
const UNSUBSCRIBE: u8 = 14;
/// The first Message layout: identifier count as u16 (read, no longer written).
const MESSAGE_U16_COUNT: u8 = 15;
const SENT: u8 = 16;
const RELEASED: u8 = 17;
const DONE: u8 = 18;
const QOS2_IN: u8 = 19;
const QOS2_IN_DONE: u8 = 20;
/// A session can match more than 65535 subscriptions with identifiers: counted as u32.
/// (Read, no longer written.)
const MESSAGE_NO_ID: u8 = 21;
/// MESSAGE_NO_ID with the message's id after the sequence number (a session moving
/// between nodes tells a message that reached both from two messages by it).
const MESSAGE: u8 = 23;

/// The session and sequence number of a `Message` record, read without decoding its message:
/// compaction only needs to know whether the record is live, and a record may hold a
/// megabyte of payload or a hundred thousand properties.
pub fn peek_message(bytes: &[u8]) -> Option<(u64, u64)> {
    let (&kind, rest) = bytes.split_first()?;
    if !matches!(kind, MESSAGE | MESSAGE_NO_ID | MESSAGE_U16_COUNT) {
        return None;
    }
    let session = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
    Some((session, seq))
}

/// The topic of a `RetainedSet` record, read without decoding its message (as for
/// [`peek_message`]).
pub fn peek_retained_topic(bytes: &[u8]) -> Option<&[u8]> {
    let (&kind, rest) = bytes.split_first()?;
    if kind != RETAINED_SET {
        return None;
    }
    let len = usize::from(u16::from_le_bytes(rest.get(..2)?.try_into().ok()?));
    rest.get(2..2 + len)
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// An `Instant` deadline as wall-clock milliseconds (0 for none).
fn deadline_to_wall(at: Option<Instant>) -> u64 {
    let Some(at) = at else { return 0 };
    let now = Instant::now();
    let wall = SystemTime::now();
    let wall_at = if at >= now { wall + (at - now) } else { wall - (now - at) };
    unix_ms(wall_at).max(1)
}

/// Wall-clock milliseconds back to an `Instant` deadline; one already past is "now".
fn wall_to_deadline(ms: u64) -> Option<Instant> {
    if ms == 0 {
        return None;
    }
    let now = Instant::now();
    let left = ms.saturating_sub(unix_ms(SystemTime::now()));
    Some(now + Duration::from_millis(left))
}

impl Record {
    /// The session a session record is about.
    pub fn session(&self) -> Option<u64> {
        match self {
            Record::RetainedSet(_) | Record::RetainedDelete(_) => None,
            Record::Open { session, .. }
            | Record::Offline { session, .. }
            | Record::Ended { session }
            | Record::Subscribe { session, .. }
            | Record::Unsubscribe { session, .. }
            | Record::Message { session, .. }
            | Record::Sent { session, .. }
            | Record::Released { session, .. }
            | Record::Done { session, .. }
            | Record::Qos2In { session, .. }
            | Record::Qos2InDone { session, .. } => Some(*session),
        }
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.clear();
        match self {
            Record::RetainedSet(message) => {
                out.put_u8(RETAINED_SET);
                put_message(out, message);
            }
            Record::RetainedDelete(topic) => {
                out.put_u8(RETAINED_DELETE);
                put_str(out, topic.as_str());
            }
            Record::Open { session, stamp, client_id, version, expiry, will, owner } => {
                out.put_u8(OPEN_OWNED);
                out.put_u64_le(*session);
                out.put_u64_le(*stamp);
                put_str(out, client_id);
                out.put_u8(*version);
                out.put_u32_le(*expiry);
                match will {
                    None => out.put_u8(0),
                    Some(will) => {
                        out.put_u8(1);
                        put_str(out, will.topic.as_str());
                        out.put_u8(will.qos as u8);
                        out.put_u8(will.retain as u8);
                        put_properties(out, &will.properties);
                        put_bytes(out, &will.payload);
                    }
                }
                match owner {
                    None => out.put_u8(0),
                    Some(owner) => {
                        out.put_u8(1);
                        put_str(out, &owner.listener);
                        match &owner.username {
                            None => out.put_u8(0),
                            Some(name) => {
                                out.put_u8(if owner.verified { 2 } else { 1 });
                                put_str(out, name);
                            }
                        }
                    }
                }
            }
            Record::Offline { session, stamp, at, expiry, will } => {
                out.put_u8(OFFLINE);
                out.put_u64_le(*session);
                out.put_u64_le(*stamp);
                out.put_u64_le(*at);
                out.put_u32_le(*expiry);
                out.put_u8(u8::from(*will));
            }
            Record::Ended { session } => {
                out.put_u8(ENDED);
                out.put_u64_le(*session);
            }
            Record::Subscribe { session, filter, options, identifier } => {
                out.put_u8(SUBSCRIBE);
                out.put_u64_le(*session);
                put_str(out, filter.as_str());
                out.put_u8(options.qos as u8);
                out.put_u8(options.no_local as u8);
                out.put_u8(options.retain_as_published as u8);
                out.put_u8(options.retain_handling);
                out.put_u32_le(identifier.unwrap_or(0));
            }
            Record::Unsubscribe { session, filter } => {
                out.put_u8(UNSUBSCRIBE);
                out.put_u64_le(*session);
                put_str(out, filter.as_str());
            }
            Record::Message { session, seq, qos, retain, identifiers, message } => {
                out.put_u8(MESSAGE);
                out.put_u64_le(*session);
                out.put_u64_le(*seq);
                out.put_u64_le(message.id.0);
                out.put_u8(*qos as u8);
                out.put_u8(*retain as u8);
                out.put_u32_le(identifiers.len() as u32);
                for id in identifiers {
                    out.put_u32_le(*id);
                }
                put_message(out, message);
            }
            Record::Sent { session, seq, packet_id } | Record::Released { session, seq, packet_id } => {
                out.put_u8(if matches!(self, Record::Sent { .. }) { SENT } else { RELEASED });
                out.put_u64_le(*session);
                out.put_u64_le(*seq);
                out.put_u16_le(*packet_id);
            }
            Record::Done { session, seq } => {
                out.put_u8(DONE);
                out.put_u64_le(*session);
                out.put_u64_le(*seq);
            }
            Record::Qos2In { session, packet_id } | Record::Qos2InDone { session, packet_id } => {
                out.put_u8(if matches!(self, Record::Qos2In { .. }) { QOS2_IN } else { QOS2_IN_DONE });
                out.put_u64_le(*session);
                out.put_u16_le(*packet_id);
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        let mut r = Reader(bytes);
        let record = match r.u8("kind")? {
            RETAINED_SET => Record::RetainedSet(r.message()?),
            RETAINED_DELETE => Record::RetainedDelete(r.topic()?),
            kind @ (OPEN | OPEN_OWNED) => {
                let session = r.u64("session")?;
                let stamp = r.u64("stamp")?;
                let client_id = r.string()?;
                let version = r.u8("version")?;
                let expiry = r.u32("expiry")?;
                let will = match r.u8("will flag")? {
                    0 => None,
                    _ => Some(Will {
                        topic: r.topic()?,
                        qos: r.qos()?,
                        retain: r.u8("will retain")? != 0,
                        properties: r.properties(PropertyContext::Will)?,
                        payload: r.bytes()?,
                    }),
                };
                let owner = match kind == OPEN_OWNED && r.u8("owner flag")? != 0 {
                    false => None,
                    true => {
                        let listener = r.string()?;
                        let (username, verified) = match r.u8("username flag")? {
                            0 => (None, false),
                            flag => (Some(r.string()?), flag == 2),
                        };
                        Some(SessionOwner { listener, username, verified })
                    }
                };
                Record::Open { session, stamp, client_id, version, expiry, will, owner }
            }
            OFFLINE => Record::Offline {
                session: r.u64("session")?,
                stamp: r.u64("stamp")?,
                at: r.u64("at")?,
                expiry: r.u32("expiry")?,
                will: r.u8("will pending")? != 0,
            },
            ENDED => Record::Ended { session: r.u64("session")? },
            SUBSCRIBE => Record::Subscribe {
                session: r.u64("session")?,
                filter: r.filter()?,
                options: SubscriptionOptions {
                    qos: r.qos()?,
                    no_local: r.u8("no local")? != 0,
                    retain_as_published: r.u8("retain as published")? != 0,
                    retain_handling: r.u8("retain handling")?,
                },
                identifier: Some(r.u32("identifier")?).filter(|id| *id != 0),
            },
            UNSUBSCRIBE => Record::Unsubscribe { session: r.u64("session")?, filter: r.filter()? },
            kind @ (MESSAGE | MESSAGE_NO_ID | MESSAGE_U16_COUNT) => {
                let session = r.u64("session")?;
                let seq = r.u64("seq")?;
                let id = match kind {
                    MESSAGE => MessageId(r.u64("message id")?),
                    _ => MessageId::default(),
                };
                let qos = r.qos()?;
                let retain = r.u8("retain")? != 0;
                let count = match kind {
                    MESSAGE_U16_COUNT => u32::from(r.u16("identifier count")?),
                    _ => r.u32("identifier count")?,
                };
                // Each takes 4 bytes: a corrupt count cannot make this allocate more.
                if count as usize > r.0.len() / 4 {
                    return Err(RecordError("identifier count"));
                }
                let identifiers = (0..count).map(|_| r.u32("identifier")).collect::<Result<_, _>>()?;
                let message = Message { id, ..r.message()? };
                Record::Message { session, seq, qos, retain, identifiers, message }
            }
            kind @ (SENT | RELEASED) => {
                let (session, seq, packet_id) = (r.u64("session")?, r.u64("seq")?, r.u16("packet id")?);
                if kind == SENT {
                    Record::Sent { session, seq, packet_id }
                } else {
                    Record::Released { session, seq, packet_id }
                }
            }
            DONE => Record::Done { session: r.u64("session")?, seq: r.u64("seq")? },
            kind @ (QOS2_IN | QOS2_IN_DONE) => {
                let (session, packet_id) = (r.u64("session")?, r.u16("packet id")?);
                if kind == QOS2_IN {
                    Record::Qos2In { session, packet_id }
                } else {
                    Record::Qos2InDone { session, packet_id }
                }
            }
            _ => return Err(RecordError("record kind")),
        };
        if !r.0.is_empty() {
            return Err(RecordError("trailing bytes"));
        }
        Ok(record)
    }
}

/// Who a persistent session's client authenticated as, and through which listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOwner {
    /// The listener's name (`tls:0.0.0.0:8883`): whose rules apply.
    pub listener: String,
    pub username: Option<String>,
    /// A password, token or certificate proved the username.
    pub verified: bool,
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32_le(b.len() as u32);
    out.put_slice(b);
}

fn put_properties(out: &mut BytesMut, properties: &Properties) {
    let mut encoded = BytesMut::new();
    // Properties came from a decoded packet, so they encode.
    if properties.encode(&mut encoded).is_err() {
        encoded.clear();
        encoded.put_u8(0);
    }
    put_bytes(out, &encoded);
}

fn put_message(out: &mut BytesMut, message: &Message) {
    put_str(out, message.topic.as_str());
    out.put_u8(message.qos as u8);
    out.put_u8(message.retain as u8);
    out.put_u64_le(deadline_to_wall(message.expires_at));
    // The same bytes `put_properties` writes: Property Length, then the properties.
    let body = message.properties.as_bytes();
    let mut length = [0u8; 4];
    let (mut value, mut n) = (body.len(), 0);
    loop {
        length[n] = (value % 128) as u8;
        value /= 128;
        if value == 0 {
            break;
        }
        length[n] |= 0x80;
        n += 1;
    }
    out.put_u32_le((n + 1 + body.len()) as u32);
    out.put_slice(&length[..=n]);
    out.put_slice(body);
    put_bytes(out, &message.payload);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, RecordError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, RecordError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, RecordError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, RecordError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, RecordError> {
        let n = self.u16("string length")? as usize;
        let b = self.take(n, "string")?;
        String::from_utf8(b.to_vec()).map_err(|_| RecordError("UTF-8 string"))
    }
    fn bytes(&mut self) -> Result<Bytes, RecordError> {
        let n = self.u32("binary length")? as usize;
        Ok(Bytes::copy_from_slice(self.take(n, "binary")?))
    }
    fn topic(&mut self) -> Result<TopicName, RecordError> {
        TopicName::new_allow_empty(self.string()?).map_err(|_| RecordError("topic name"))
    }
    fn filter(&mut self) -> Result<TopicFilter, RecordError> {
        TopicFilter::new(Bytes::from(self.string()?)).map_err(|_| RecordError("topic filter"))
    }
    fn qos(&mut self) -> Result<QoS, RecordError> {
        QoS::from_u8(self.u8("qos")?).ok_or(RecordError("qos"))
    }
    fn properties(&mut self, context: PropertyContext) -> Result<Properties, RecordError> {
        let mut raw = self.bytes()?;
        Properties::decode(&mut raw, context).map_err(|_| RecordError("properties"))
    }
    fn message(&mut self) -> Result<Message, RecordError> {
        let topic = self.topic()?;
        let qos = self.qos()?;
        let retain = self.u8("retain")? != 0;
        let expires_at = wall_to_deadline(self.u64("expiry")?);
        let properties = self.properties(PropertyContext::Publish)?;
        let payload = self.bytes()?;
        // The expiry is the record's own (what remained of it when written).
        Ok(Message { expires_at, ..Message::new(topic, payload, qos, retain, &properties) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Property;

    fn message(topic: &str, payload: &str) -> Message {
        Message::new(
            TopicName::new_allow_empty(topic.to_string()).unwrap(),
            Bytes::copy_from_slice(payload.as_bytes()),
            QoS::AtLeastOnce,
            true,
            &Properties(vec![
                Property::UserProperty("k".into(), "v".into()),
                Property::ContentType("text/plain".into()),
            ]),
        )
    }

    #[test]
    fn every_record_round_trips() {
        let filter = TopicFilter::new(Bytes::from_static(b"a/+/#")).unwrap();
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
        };
        let will = Will {
            topic: TopicName::new_allow_empty("will/t".to_string()).unwrap(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties(vec![Property::WillDelayInterval(5)]),
        };
        let records = vec![
            Record::RetainedSet(message("r/t", "payload")),
            Record::RetainedDelete(TopicName::new_allow_empty("r/t".to_string()).unwrap()),
            Record::Open {
                session: 7,
                stamp: 1,
                client_id: "client-ü".into(),
                version: 5,
                expiry: 3600,
                will: Some(will),
                owner: Some(SessionOwner {
                    listener: "tls:0.0.0.0:8883".into(),
                    username: Some("alice".into()),
                    verified: true,
                }),
            },
            Record::Open {
                session: 8,
                stamp: 2,
                client_id: "c".into(),
                version: 4,
                expiry: u32::MAX,
                will: None,
                owner: None,
            },
            Record::Open {
                session: 9,
                stamp: 2,
                client_id: "anon".into(),
                version: 4,
                expiry: 60,
                will: None,
                owner: Some(SessionOwner {
                    listener: "tcp:[::]:1883".into(),
                    username: Some("claimed".into()),
                    verified: false,
                }),
            },
            Record::Offline { session: 7, stamp: 3, at: 1_700_000_000_000, expiry: 60, will: true },
            Record::Offline { session: 7, stamp: 4, at: 1_700_000_000_000, expiry: 60, will: false },
            Record::Ended { session: 7 },
            Record::Subscribe { session: 7, filter: filter.clone(), options, identifier: Some(42) },
            Record::Subscribe { session: 7, filter: filter.clone(), options, identifier: None },
            Record::Unsubscribe { session: 7, filter },
            Record::Message {
                session: 7,
                seq: 99,
                qos: QoS::AtLeastOnce,
                retain: false,
                identifiers: vec![1, 2],
                message: message("m/t", ""),
            },
            Record::Sent { session: 7, seq: 99, packet_id: 65535 },
            Record::Released { session: 7, seq: 99, packet_id: 1 },
            Record::Done { session: 7, seq: 99 },
            Record::Qos2In { session: 7, packet_id: 3 },
            Record::Qos2InDone { session: 7, packet_id: 3 },
        ];
        let mut buf = BytesMut::new();
        for record in records {
            record.encode(&mut buf);
            assert_eq!(Record::decode(&buf), Ok(record.clone()));
            // Every strict prefix fails to decode rather than panicking.
            for cut in 0..buf.len() {
                assert!(Record::decode(&buf[..cut]).is_err(), "{record:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn an_open_record_of_an_older_log_reads_as_owned_by_nobody() {
        let record = Record::Open {
            session: 3,
            stamp: 4,
            client_id: "old".into(),
            version: 4,
            expiry: 60,
            will: None,
            owner: None,
        };
        let mut buf = BytesMut::new();
        record.encode(&mut buf);
        // The older layout: kind OPEN, no owner flag.
        buf[0] = OPEN;
        buf.truncate(buf.len() - 1);
        assert_eq!(Record::decode(&buf), Ok(record));
    }

    #[test]
    fn a_message_matching_more_than_65535_identified_subscriptions_round_trips() {
        let record = Record::Message {
            session: 1,
            seq: 2,
            qos: QoS::AtLeastOnce,
            retain: false,
            identifiers: (1..=70_000).collect(),
            message: message("m/t", "x"),
        };
        let mut buf = BytesMut::new();
        record.encode(&mut buf);
        // Compared without printing seventy thousand identifiers.
        assert!(Record::decode(&buf) == Ok(record), "decodes to what was encoded");
    }

    #[test]
    fn a_message_record_of_the_first_layout_still_decodes() {
        // Kind 15 counted identifiers in a u16.
        let mut buf = BytesMut::new();
        buf.put_u8(15);
        buf.put_u64_le(7);
        buf.put_u64_le(99);
        buf.put_u8(QoS::ExactlyOnce as u8);
        buf.put_u8(1);
        buf.put_u16_le(2);
        buf.put_u32_le(5);
        buf.put_u32_le(6);
        put_message(&mut buf, &message("m/t", "old"));
        let expected = Record::Message {
            session: 7,
            seq: 99,
            qos: QoS::ExactlyOnce,
            retain: true,
            identifiers: vec![5, 6],
            message: message("m/t", "old"),
        };
        assert_eq!(Record::decode(&buf), Ok(expected));
    }

    #[test]
    fn a_message_keeps_its_id_and_one_of_the_layout_without_ids_reads_as_unknown() {
        let record = Record::Message {
            session: 7,
            seq: 99,
            qos: QoS::AtLeastOnce,
            retain: false,
            identifiers: vec![3],
            message: message("m/t", "x"),
        };
        let Record::Message { message: sent, .. } = &record else { unreachable!() };
        assert!(sent.id.is_known());
        let mut buf = BytesMut::new();
        record.encode(&mut buf);
        let Ok(Record::Message { message: back, .. }) = Record::decode(&buf) else { panic!("decodes") };
        assert_eq!(back.id.0, sent.id.0);
        // Kind 21: no id after the sequence number.
        let mut old = BytesMut::new();
        old.put_u8(MESSAGE_NO_ID);
        old.extend_from_slice(&buf[1..17]);
        old.extend_from_slice(&buf[25..]);
        assert_eq!(peek_message(&old), Some((7, 99)));
        let Ok(Record::Message { message: back, identifiers, .. }) = Record::decode(&old) else {
            panic!("decodes")
        };
        assert_eq!((back.id.is_known(), identifiers), (false, vec![3]));
    }

    #[test]
    fn peeks_read_the_keys_compaction_needs() {
        let mut buf = BytesMut::new();
        Record::Message {
            session: 7,
            seq: 99,
            qos: QoS::AtLeastOnce,
            retain: false,
            identifiers: vec![1],
            message: message("m/t", "x"),
        }
        .encode(&mut buf);
        assert_eq!(peek_message(&buf), Some((7, 99)));
        assert_eq!(peek_retained_topic(&buf), None);
        Record::RetainedSet(message("r/t", "x")).encode(&mut buf);
        assert_eq!(peek_retained_topic(&buf), Some(&b"r/t"[..]));
        assert_eq!(peek_message(&buf), None);
        for cut in 0..buf.len().min(6) {
            assert!(peek_retained_topic(&buf[..cut]).is_none());
        }
    }

    #[test]
    fn expiry_deadlines_survive_as_wall_clock_time() {
        let mut m = message("e/t", "x");
        m.expires_at = Some(Instant::now() + Duration::from_secs(100));
        let mut buf = BytesMut::new();
        Record::RetainedSet(m).encode(&mut buf);
        let Ok(Record::RetainedSet(back)) = Record::decode(&buf) else { panic!("decodes") };
        let left = back.expires_at.unwrap().saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(98) && left <= Duration::from_secs(100), "{left:?}");
    }
}
