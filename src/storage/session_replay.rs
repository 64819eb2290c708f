//! Replaying a session log: sessions rebuilt from its records, in log order.

use std::collections::{BTreeMap, BTreeSet};

use super::super::log::Loc;
use super::super::record::{Record, SessionOwner};
use super::{RecoveredMessage, RecoveredSession};
use crate::broker::message::Message;
use crate::broker::session::Subscription;
use crate::codec::{ProtocolVersion, QoS, Will};
use crate::topic::TopicFilter;

/// Rebuilds sessions from records in log order. Records copied forward by compaction may
/// come after newer ones of another kind, so the result does not depend on that order:
/// Open and Offline carry a stamp, and the other records name what they change.
#[derive(Default)]
pub(super) struct Replay {
    pub(super) sessions: BTreeMap<u64, Partial>,
    /// Message bodies are not kept while replaying (only where they are): `finish` reads
    /// back the ones it returns.
    pub(super) lazy: bool,
}

#[derive(Default)]
pub(super) struct Partial {
    client_id: Option<String>,
    version: Option<ProtocolVersion>,
    expiry: u32,
    will: Option<Will>,
    owner: Option<SessionOwner>,
    online_stamp: u64,
    /// Stamp, time, expiry and will-pending of the newest Offline record.
    offline: Option<(u64, u64, u32, bool)>,
    subs: BTreeMap<String, (TopicFilter, Subscription)>,
    messages: BTreeMap<u64, PartialMessage>,
    qos2_in: BTreeSet<u16>,
}

#[derive(Default)]
struct PartialMessage {
    body: Option<Body>,
    packet_id: Option<u16>,
    released: bool,
}

enum Body {
    /// Boxed: a replay of a long queue keeps millions of `At`s, which stay small.
    Decoded(Box<(QoS, bool, Vec<u32>, Message)>),
    /// Where its record is, and its size as a spilled message.
    At(Loc, u32),
}

impl Replay {
    pub(super) fn apply(&mut self, record: Record, loc: Option<Loc>) {
        let lazy = self.lazy;
        let Some(session) = record.session() else { return };
        if let Record::Ended { .. } = record {
            self.sessions.remove(&session);
            return;
        }
        let p = self.sessions.entry(session).or_default();
        match record {
            Record::Open { stamp, client_id, version, expiry, will, owner, .. } => {
                if stamp >= p.online_stamp {
                    p.online_stamp = stamp;
                    p.client_id = Some(client_id);
                    p.version = ProtocolVersion::from_level(version);
                    p.expiry = expiry;
                    p.will = will;
                    p.owner = owner;
                }
            }
            Record::Offline { stamp, at, expiry, will, .. } => {
                if p.offline.is_none_or(|(s, _, _, _)| stamp > s) {
                    p.offline = Some((stamp, at, expiry, will));
                }
            }
            Record::Subscribe { filter, options, identifier, .. } => {
                p.subs.insert(
                    filter.as_str().to_string(),
                    (filter, Subscription { options, identifier, acl: crate::auth::AclMark::OPEN }),
                );
            }
            Record::Unsubscribe { filter, .. } => {
                p.subs.remove(filter.as_str());
            }
            Record::Message { seq, qos, retain, identifiers, message, .. } => {
                let body = match loc {
                    Some(loc) if lazy => {
                        let size = message.size() + std::mem::size_of_val(identifiers.as_slice());
                        Body::At(loc, size as u32)
                    }
                    _ => Body::Decoded(Box::new((qos, retain, identifiers, message))),
                };
                p.messages.entry(seq).or_default().body = Some(body);
            }
            Record::Sent { seq, packet_id, .. } => {
                let m = p.messages.entry(seq).or_default();
                if !m.released {
                    m.packet_id = Some(packet_id);
                }
            }
            Record::Released { seq, packet_id, .. } => {
                let m = p.messages.entry(seq).or_default();
                m.packet_id = Some(packet_id);
                m.released = true;
            }
            Record::Done { seq, .. } => {
                p.messages.remove(&seq);
            }
            Record::Qos2In { packet_id, .. } => {
                p.qos2_in.insert(packet_id);
            }
            Record::Qos2InDone { packet_id, .. } => {
                p.qos2_in.remove(&packet_id);
            }
            Record::Ended { .. } | Record::RetainedSet(_) | Record::RetainedDelete(_) => {}
        }
    }

    /// The sessions replayed. Of each one's queued messages (not yet sent) only the first
    /// `keep_queued` are read back (`load`); the rest are returned as spilled.
    pub(super) fn finish(
        self,
        keep_queued: usize,
        load: impl Fn(Loc) -> Option<(QoS, bool, Vec<u32>, Message)>,
    ) -> Vec<RecoveredSession> {
        let mut out = Vec::with_capacity(self.sessions.len());
        for (log_id, p) in self.sessions {
            let Some(client_id) = p.client_id else { continue };
            let (expiry, offline_at, will) = match p.offline {
                Some((stamp, at, expiry, will_pending)) if stamp > p.online_stamp => {
                    (expiry, Some(at), p.will.filter(|_| will_pending))
                }
                _ => (p.expiry, None, p.will),
            };
            let mut messages = Vec::new();
            let mut spilled = Vec::new();
            let mut queued = 0;
            for (seq, m) in p.messages {
                let (qos, retain, identifiers, message) = match m.body {
                    None => continue,
                    Some(Body::At(_, size))
                        if m.packet_id.is_none() && (queued >= keep_queued || !spilled.is_empty()) =>
                    {
                        spilled.push((seq, size));
                        continue;
                    }
                    Some(Body::At(loc, _)) => match load(loc) {
                        Some(body) => body,
                        None => continue,
                    },
                    Some(Body::Decoded(body)) => *body,
                };
                queued += usize::from(m.packet_id.is_none());
                messages.push(RecoveredMessage {
                    seq,
                    qos,
                    retain,
                    identifiers,
                    message,
                    packet_id: m.packet_id,
                    released: m.released,
                });
            }
            out.push(RecoveredSession {
                log_id,
                client_id,
                version: p.version.unwrap_or(ProtocolVersion::V5),
                expiry,
                will,
                owner: p.owner,
                offline_at,
                subscriptions: p.subs.into_values().collect(),
                messages,
                spilled,
                qos2_inbound: p.qos2_in.into_iter().collect(),
            });
        }
        out
    }
}
