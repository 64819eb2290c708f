//! The node link's wire format, pure: bytes in, typed frames out.
//!
//! A frame is a 4-byte big-endian length (of what follows), a type byte and its body. A
//! message's topic, properties and payload are written once into the link's write buffer
//! and decoded as slices of the read buffer: a payload crosses nodes with one copy.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::broker::cross::HandedSession;
use crate::broker::message::{Message, MessageId, WireProperties};
use crate::broker::session::{OwedMessage, Subscription};
use crate::codec::{ProtocolVersion, QoS, SubscriptionOptions};
use crate::topic::TopicName;

use super::handshake::NONCE;

/// What a frame needs beyond the message it carries.
pub const FRAME_OVERHEAD: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The accepting node's first frame: a random challenge, and the link protocol version
    /// it speaks (`handshake::LINK_VERSION`; 0 when absent: a build from before versions).
    Challenge { nonce: [u8; NONCE], version: u32 },
    /// The dialling node's answer, introducing itself: `incarnation` changes at every start
    /// (sequence numbers are per incarnation); `limits`: the largest frames it means to
    /// write (its own bounds); `version`: the link protocol it speaks; `challenge`: its own
    /// to the accepting node; `mac` proves it knows the cluster's secret
    /// (`handshake::proof`, which covers all of these).
    Hello {
        cluster: String,
        node: String,
        incarnation: u64,
        limits: FrameLimits,
        mac: [u8; 32],
        version: u32,
        challenge: [u8; NONCE],
    },
    /// The accepting node's answer to a verified hello: the bounds it reads this link with
    /// (see [`FrameLimits::reading`]); the dialling node writes nothing larger. `mac`
    /// proves the node knows the secret (`handshake::welcome_proof`).
    Welcome { limits: FrameLimits, mac: [u8; 32] },
    /// A message for the receiving node's subscribers. `seq` 0: nothing to confirm (QoS 0).
    Publish { seq: u64, message: Message },
    /// A message for one member of the shared group `group` (`$share/{group}/{filter}`)
    /// on the receiving node: the sending node chose it for this message.
    Shared { seq: u64, group: String, message: Message },
    /// A retained message for the receiving node's store (and nobody's delivery).
    Retain { seq: u64, message: Message },
    /// One of the retained set a joining node asked for (`SyncRetained`): stored unless
    /// its topic was written there since the node started (that value is newer).
    SyncEntry { seq: u64, message: Message },
    /// The sending node has a new route, committed in etcd: confirmed once the receiving
    /// node's shards route matching publishes to it (the subscriber's SUBACK waits for
    /// that, as it waits for the other cores).
    Route { seq: u64, filter: String },
    /// The sending node claimed `client_id` in etcd: the receiving node, which had it,
    /// closes its connection and answers with `Handover` (`want_session`: with the session).
    TakeOver { seq: u64, id: u64, client_id: String, want_session: bool },
    /// The answer to `TakeOver` `id` (`last` false), or what the session received since
    /// (`last`, after `Adopted`).
    Handover { seq: u64, id: u64, last: bool, session: Option<Box<HandedSession>> },
    /// The sending node joined: the receiving node sends it every retained message it
    /// holds (as `SyncEntry` frames).
    SyncRetained { seq: u64 },
    /// The retained set asked for by `SyncRetained` has been sent, all of it.
    SyncDone { seq: u64 },
    /// The session of takeover `id` is in place on the sending node.
    Adopted { seq: u64, id: u64 },
    /// The next part of the session of takeover `id`, please (its `Handover` said `more`).
    NextPart { seq: u64, id: u64 },
    /// Barrier `id` before a session leaves the sending node: answered with `Flushed` on
    /// the receiving node's own link to it, after every frame it wrote there before.
    Flush { seq: u64, id: u64 },
    /// The answer to `Flush` `id`.
    Flushed { seq: u64, id: u64 },
    /// What `seq` asked for is delivered and written on the receiving node.
    Confirmed { seq: u64 },
    /// What `seq` asked for could not be written there: the publisher is not acknowledged.
    Refused { seq: u64 },
}

/// Room in a hand-over part for what is not its messages' counted bytes: the session's
/// subscriptions and in-flight state, the messages' fields.
const SESSION_ROOM: usize = 64 << 20;

/// The largest frames a link reads: any frame (a message and its fields), and a session's
/// hand-over (its subscriptions and every message it owes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub frame: usize,
    pub handover: usize,
}

// A node's own bounds (`FrameLimits::for_node`) are under the cap for any packet size MQTT
// allows.
const _: () = {
    let frame = crate::config::PROTOCOL_MAX_PACKET_SIZE + (128 << 10) + FRAME_OVERHEAD;
    assert!(frame <= FrameLimits::CAP.frame);
    assert!(
        FrameLimits::CAP.frame + crate::config::MAX_HANDOVER_PART + SESSION_ROOM <= FrameLimits::CAP.handover
    );
};

impl FrameLimits {
    /// What a node reads a link with at most, whatever the dialling node declares: a frame
    /// carries one MQTT packet at most (256 MiB) and its fields, so any `--max-packet-size`
    /// fits, and so does any node's hand-over part ([`FrameLimits::for_node`]). A node's
    /// own bounds are never lowered by it: only what a peer may raise them to.
    pub const CAP: FrameLimits = FrameLimits { frame: 257 << 20, handover: 2 << 30 };

    /// A node's own bounds for its `--max-packet-size`: a frame carries a client's packet
    /// (a PUBLISH's size leaves out a topic sent as an alias, and a shared group's frame
    /// carries its group: room for both); a hand-over part carries messages up to
    /// `--node-handover-part` or one message larger (`Session::owed`), with room for the
    /// session's subscriptions and its messages' other fields. That one message may have
    /// come from a node with a larger `--max-packet-size` than either node's: room for
    /// the largest any node reads.
    pub fn for_node(max_packet_size: usize) -> FrameLimits {
        let frame = max_packet_size + (128 << 10) + FRAME_OVERHEAD;
        FrameLimits { frame, handover: Self::CAP.frame + crate::config::MAX_HANDOVER_PART + SESSION_ROOM }
    }

    /// The bounds to read a link with, for a node whose own bounds are `self` and a peer
    /// that declared `declared` (authenticated): the larger of each, the peer's capped at
    /// [`FrameLimits::CAP`]. The second value: whether the cap cut the declaration.
    pub fn reading(self, declared: FrameLimits) -> (FrameLimits, bool) {
        let raise = |own: usize, theirs: usize, cap: usize| own.max(theirs.min(cap));
        let read = FrameLimits {
            frame: raise(self.frame, declared.frame, Self::CAP.frame),
            handover: raise(self.handover, declared.handover, Self::CAP.handover),
        };
        let capped = declared.frame > read.frame || declared.handover > read.handover;
        (read, capped)
    }

    /// The bound `frame` is held to: a hand-over's own, or any frame's.
    pub fn bound_of(&self, frame: &Frame) -> usize {
        match frame {
            Frame::Handover { .. } => self.handover,
            _ => self.frame,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the link's bound")]
    TooLarge(usize),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame body malformed: {0}")]
    Malformed(&'static str),
}

const HELLO: u8 = 1;
const CHALLENGE: u8 = 13;
const PUBLISH: u8 = 2;
const RETAIN: u8 = 3;
const CONFIRMED: u8 = 4;
const REFUSED: u8 = 5;
const ROUTE: u8 = 6;
const SHARED: u8 = 7;
const TAKE_OVER: u8 = 8;
const HANDOVER: u8 = 9;
const ADOPTED: u8 = 10;
const SYNC_RETAINED: u8 = 11;
const SYNC_DONE: u8 = 12;
const NEXT_PART: u8 = 14;
const WELCOME: u8 = 15;
const FLUSH: u8 = 16;
const FLUSHED: u8 = 17;
const SYNC_ENTRY: u8 = 18;

impl Frame {
    /// The sequence number of a frame that carries one (all but `Hello` and the answers).
    pub fn seq(&self) -> Option<u64> {
        match self {
            Frame::Publish { seq, .. }
            | Frame::Retain { seq, .. }
            | Frame::SyncEntry { seq, .. }
            | Frame::Shared { seq, .. }
            | Frame::Route { seq, .. }
            | Frame::TakeOver { seq, .. }
            | Frame::Handover { seq, .. }
            | Frame::Adopted { seq, .. }
            | Frame::NextPart { seq, .. }
            | Frame::Flush { seq, .. }
            | Frame::Flushed { seq, .. }
            | Frame::SyncRetained { seq }
            | Frame::SyncDone { seq } => Some(*seq),
            Frame::Hello { .. }
            | Frame::Challenge { .. }
            | Frame::Welcome { .. }
            | Frame::Confirmed { .. }
            | Frame::Refused { .. } => None,
        }
    }

    /// Appends the frame to `out`; a message's expiry is sent as what is left of it at `now`.
    pub fn encode(&self, out: &mut BytesMut, now: Instant) {
        let start = out.len();
        out.put_u32(0);
        match self {
            Frame::Hello { cluster, node, incarnation, limits, mac, version, challenge } => {
                out.put_u8(HELLO);
                put_str(out, cluster);
                put_str(out, node);
                out.put_u64(*incarnation);
                put_limits(out, limits);
                out.put_slice(mac);
                // Past what a build from before versions wrote and reads.
                out.put_u32(*version);
                out.put_slice(challenge);
            }
            Frame::Welcome { limits, mac } => {
                out.put_u8(WELCOME);
                put_limits(out, limits);
                out.put_slice(mac);
            }
            Frame::Challenge { nonce, version } => {
                out.put_u8(CHALLENGE);
                out.put_slice(nonce);
                out.put_u32(*version);
            }
            Frame::Publish { seq, message }
            | Frame::Retain { seq, message }
            | Frame::SyncEntry { seq, message } => {
                out.put_u8(match self {
                    Frame::Publish { .. } => PUBLISH,
                    Frame::Retain { .. } => RETAIN,
                    _ => SYNC_ENTRY,
                });
                out.put_u64(*seq);
                put_message(out, message, now);
            }
            Frame::Shared { seq, group, message } => {
                out.put_u8(SHARED);
                out.put_u64(*seq);
                put_str(out, group);
                put_message(out, message, now);
            }
            Frame::Route { seq, filter } => {
                out.put_u8(ROUTE);
                out.put_u64(*seq);
                put_str(out, filter);
            }
            Frame::TakeOver { seq, id, client_id, want_session } => {
                out.put_u8(TAKE_OVER);
                out.put_u64(*seq);
                out.put_u64(*id);
                put_str(out, client_id);
                out.put_u8(u8::from(*want_session));
            }
            Frame::Handover { seq, id, last, session } => {
                out.put_u8(HANDOVER);
                out.put_u64(*seq);
                out.put_u64(*id);
                out.put_u8(u8::from(*last) | (u8::from(session.is_some()) << 1));
                if let Some(session) = session {
                    put_session(out, session, now);
                }
            }
            Frame::SyncRetained { seq } => {
                out.put_u8(SYNC_RETAINED);
                out.put_u64(*seq);
            }
            Frame::SyncDone { seq } => {
                out.put_u8(SYNC_DONE);
                out.put_u64(*seq);
            }
            Frame::Adopted { seq, id } => {
                out.put_u8(ADOPTED);
                out.put_u64(*seq);
                out.put_u64(*id);
            }
            Frame::NextPart { seq, id } | Frame::Flush { seq, id } | Frame::Flushed { seq, id } => {
                out.put_u8(match self {
                    Frame::NextPart { .. } => NEXT_PART,
                    Frame::Flush { .. } => FLUSH,
                    _ => FLUSHED,
                });
                out.put_u64(*seq);
                out.put_u64(*id);
            }
            Frame::Confirmed { seq } => {
                out.put_u8(CONFIRMED);
                out.put_u64(*seq);
            }
            Frame::Refused { seq } => {
                out.put_u8(REFUSED);
                out.put_u64(*seq);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Splits the next whole frame off `buf`, or `None` when more bytes are needed. A
    /// frame longer than `max` is refused before it is buffered. `pinned`: the size of the
    /// read buffer the messages' slices keep alive.
    pub fn decode(buf: &mut BytesMut, max: FrameLimits, now: Instant) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        // A session handed over carries what it owes: its own, larger bound.
        let bound = if buf[4] == HANDOVER { max.handover } else { max.frame };
        if len > bound {
            return Err(FrameError::TooLarge(len));
        }
        if len == 0 {
            return Err(FrameError::Malformed("empty frame"));
        }
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            return Ok(None);
        }
        let pinned = buf.capacity();
        buf.advance(4);
        let mut body = buf.split_to(len).freeze();
        let kind = body.get_u8();
        let frame = match kind {
            HELLO => {
                let (cluster, node) = (get_str(&mut body)?, get_str(&mut body)?);
                let (incarnation, limits) = (get_u64(&mut body)?, get_limits(&mut body)?);
                let mac = get_array(&mut body)?;
                // A build from before versions ends here.
                let (version, challenge) = match body.is_empty() {
                    true => (0, [0; NONCE]),
                    false => (get_u32(&mut body)?, get_array(&mut body)?),
                };
                Frame::Hello { cluster, node, incarnation, limits, mac, version, challenge }
            }
            WELCOME => {
                let limits = get_limits(&mut body)?;
                // A build from before versions proves nothing: it fails the check.
                let mac = if body.is_empty() { [0; 32] } else { get_array(&mut body)? };
                Frame::Welcome { limits, mac }
            }
            CHALLENGE => {
                let nonce = get_array(&mut body)?;
                let version = if body.is_empty() { 0 } else { get_u32(&mut body)? };
                Frame::Challenge { nonce, version }
            }
            PUBLISH | RETAIN | SYNC_ENTRY => {
                let seq = get_u64(&mut body)?;
                let message = get_message(body, now, pinned)?;
                match kind {
                    PUBLISH => Frame::Publish { seq, message },
                    RETAIN => Frame::Retain { seq, message },
                    _ => Frame::SyncEntry { seq, message },
                }
            }
            SHARED => {
                let seq = get_u64(&mut body)?;
                let group = get_str(&mut body)?;
                Frame::Shared { seq, group, message: get_message(body, now, pinned)? }
            }
            ROUTE => Frame::Route { seq: get_u64(&mut body)?, filter: get_str(&mut body)? },
            TAKE_OVER => Frame::TakeOver {
                seq: get_u64(&mut body)?,
                id: get_u64(&mut body)?,
                client_id: get_str(&mut body)?,
                want_session: get_u8(&mut body)? != 0,
            },
            HANDOVER => {
                let (seq, id) = (get_u64(&mut body)?, get_u64(&mut body)?);
                let flags = get_u8(&mut body)?;
                let session = match flags & 2 {
                    0 => None,
                    _ => Some(Box::new(get_session(&mut body, now, pinned)?)),
                };
                Frame::Handover { seq, id, last: flags & 1 != 0, session }
            }
            SYNC_RETAINED => Frame::SyncRetained { seq: get_u64(&mut body)? },
            SYNC_DONE => Frame::SyncDone { seq: get_u64(&mut body)? },
            ADOPTED => Frame::Adopted { seq: get_u64(&mut body)?, id: get_u64(&mut body)? },
            NEXT_PART => Frame::NextPart { seq: get_u64(&mut body)?, id: get_u64(&mut body)? },
            FLUSH => Frame::Flush { seq: get_u64(&mut body)?, id: get_u64(&mut body)? },
            FLUSHED => Frame::Flushed { seq: get_u64(&mut body)?, id: get_u64(&mut body)? },
            CONFIRMED => Frame::Confirmed { seq: get_u64(&mut body)? },
            REFUSED => Frame::Refused { seq: get_u64(&mut body)? },
            other => return Err(FrameError::UnknownType(other)),
        };
        Ok(Some(frame))
    }
}

/// A frame's bound then a hand-over's, 8 bytes each.
fn put_limits(out: &mut BytesMut, limits: &FrameLimits) {
    out.put_u64(limits.frame as u64);
    out.put_u64(limits.handover as u64);
}

fn get_limits(body: &mut Bytes) -> Result<FrameLimits, FrameError> {
    // Past what this machine can address: as good as no bound (the reader caps it).
    let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Ok(FrameLimits { frame: size(get_u64(body)?), handover: size(get_u64(body)?) })
}

fn put_str(out: &mut BytesMut, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

fn get_str(body: &mut Bytes) -> Result<String, FrameError> {
    let len = get_u16(body)? as usize;
    if body.len() < len {
        return Err(FrameError::Malformed("string cut"));
    }
    String::from_utf8(body.split_to(len).to_vec()).map_err(|_| FrameError::Malformed("string not UTF-8"))
}

fn get_array<const N: usize>(body: &mut Bytes) -> Result<[u8; N], FrameError> {
    if body.len() < N {
        return Err(FrameError::Malformed("cut"));
    }
    let mut out = [0u8; N];
    body.copy_to_slice(&mut out);
    Ok(out)
}

fn get_u8(body: &mut Bytes) -> Result<u8, FrameError> {
    (!body.is_empty()).then(|| body.get_u8()).ok_or(FrameError::Malformed("cut"))
}

/// A handed-over session: protocol, expiry, subscriptions (filter, options, identifier),
/// then each owed message with its QoS, retain flag, identifiers and a length-prefixed
/// message.
fn put_session(out: &mut BytesMut, session: &HandedSession, now: Instant) {
    out.put_u8(session.version.level());
    out.put_u32(session.expiry);
    out.put_u32(session.subscriptions.len() as u32);
    for (filter, sub) in &session.subscriptions {
        put_str(out, filter.as_str());
        let o = &sub.options;
        let options = o.qos as u8
            | (u8::from(o.no_local) << 2)
            | (u8::from(o.retain_as_published) << 3)
            | ((o.retain_handling & 3) << 4);
        out.put_u8(options);
        out.put_u32(sub.identifier.unwrap_or(0));
    }
    out.put_u32(session.messages.len() as u32);
    for m in &session.messages {
        // Bit 3: sent with a packet identifier (which follows); bit 4: PUBREC received.
        let sent = m.packet_id.filter(|p| *p != 0);
        out.put_u8(
            m.qos as u8
                | (u8::from(m.retain) << 2)
                | (u8::from(sent.is_some()) << 3)
                | (u8::from(m.released) << 4),
        );
        if let Some(packet_id) = sent {
            out.put_u16(packet_id);
        }
        out.put_u16(m.identifiers.len().min(u16::MAX as usize) as u16);
        for id in m.identifiers.iter().take(u16::MAX as usize) {
            out.put_u32(*id);
        }
        let start = out.len();
        out.put_u32(0);
        put_message(out, &m.message, now);
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
    out.put_u8(u8::from(session.more));
    out.put_u16(session.qos2_inbound.len().min(u16::MAX as usize) as u16);
    for packet_id in session.qos2_inbound.iter().take(u16::MAX as usize) {
        out.put_u16(*packet_id);
    }
}

/// A count of entries of at least 7 bytes each: one past what the frame holds is a lie.
fn get_count(body: &mut Bytes, what: &'static str) -> Result<usize, FrameError> {
    let count = get_u32(body)? as usize;
    match count > body.len() / 7 {
        true => Err(FrameError::Malformed(what)),
        false => Ok(count),
    }
}

fn get_session(body: &mut Bytes, now: Instant, pinned: usize) -> Result<HandedSession, FrameError> {
    let version =
        ProtocolVersion::from_level(get_u8(body)?).ok_or(FrameError::Malformed("bad protocol level"))?;
    let expiry = get_u32(body)?;
    let count = get_count(body, "subscription count")?;
    // Counts come off the wire: grown as entries are read, not sized from them.
    let mut subscriptions = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let filter = get_str(body)?;
        let filter = crate::topic::TopicFilter::new(filter.into_bytes())
            .map_err(|_| FrameError::Malformed("bad filter"))?;
        let options = get_u8(body)?;
        let identifier = Some(get_u32(body)?).filter(|i| *i != 0);
        let options = SubscriptionOptions {
            qos: QoS::from_u8(options & 3).ok_or(FrameError::Malformed("bad QoS"))?,
            no_local: options & 4 != 0,
            retain_as_published: options & 8 != 0,
            retain_handling: (options >> 4) & 3,
        };
        subscriptions.push((filter, Subscription { options, identifier, acl: crate::auth::AclMark::OPEN }));
    }
    let count = get_count(body, "message count")?;
    let mut messages = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let flags = get_u8(body)?;
        let packet_id = match flags & 8 {
            0 => None,
            _ => Some(get_u16(body)?).filter(|p| *p != 0),
        };
        let ids = get_u16(body)? as usize;
        let mut identifiers = Vec::with_capacity(ids.min(body.len() / 4));
        for _ in 0..ids {
            identifiers.push(get_u32(body)?);
        }
        let len = get_u32(body)? as usize;
        if body.len() < len {
            return Err(FrameError::Malformed("message cut"));
        }
        let message = get_message(body.split_to(len), now, pinned)?;
        messages.push(OwedMessage {
            seq: 0,
            qos: QoS::from_u8(flags & 3).ok_or(FrameError::Malformed("bad QoS"))?,
            retain: flags & 4 != 0,
            identifiers,
            message,
            released: packet_id.is_some() && flags & 16 != 0,
            packet_id,
        });
    }
    let more = get_u8(body)? != 0;
    let count = get_u16(body)? as usize;
    let qos2_inbound = (0..count).map(|_| get_u16(body)).collect::<Result<_, _>>()?;
    Ok(HandedSession { version, expiry, subscriptions, messages, qos2_inbound, more })
}

fn get_u16(body: &mut Bytes) -> Result<u16, FrameError> {
    (body.len() >= 2).then(|| body.get_u16()).ok_or(FrameError::Malformed("cut"))
}

fn get_u32(body: &mut Bytes) -> Result<u32, FrameError> {
    (body.len() >= 4).then(|| body.get_u32()).ok_or(FrameError::Malformed("cut"))
}

fn get_u64(body: &mut Bytes) -> Result<u64, FrameError> {
    (body.len() >= 8).then(|| body.get_u64()).ok_or(FrameError::Malformed("cut"))
}

/// QoS and retain, the message's id, topic, properties (wire form), the expiry left in ms
/// (`u32::MAX`: none), then the payload to the frame's end.
fn put_message(out: &mut BytesMut, message: &Message, now: Instant) {
    out.put_u8(message.qos as u8 | (u8::from(message.retain) << 2));
    out.put_u64(message.id.0);
    out.put_u16(message.topic.len() as u16);
    out.put_slice(message.topic.as_bytes());
    let props = message.properties.as_bytes();
    out.put_u32(props.len() as u32);
    out.put_slice(props);
    let left = message.expires_at.map_or(u32::MAX, |at| {
        let ms = at.saturating_duration_since(now).as_millis();
        u32::try_from(ms).unwrap_or(u32::MAX - 1).max(1)
    });
    out.put_u32(left);
    out.put_slice(&message.payload);
}

fn get_message(mut body: Bytes, now: Instant, pinned: usize) -> Result<Message, FrameError> {
    if body.is_empty() {
        return Err(FrameError::Malformed("cut"));
    }
    let flags = body.get_u8();
    let qos = QoS::from_u8(flags & 3).ok_or(FrameError::Malformed("bad QoS"))?;
    let retain = flags & 4 != 0;
    let id = MessageId(get_u64(&mut body)?);
    let topic_len = get_u16(&mut body)? as usize;
    if body.len() < topic_len {
        return Err(FrameError::Malformed("topic cut"));
    }
    let topic = TopicName::new(body.split_to(topic_len)).map_err(|_| FrameError::Malformed("bad topic"))?;
    let props_len = get_u32(&mut body)? as usize;
    if body.len() < props_len {
        return Err(FrameError::Malformed("properties cut"));
    }
    let properties = WireProperties::from(&body.split_to(props_len)[..]);
    let left = get_u32(&mut body)?;
    let expires_at = (left != u32::MAX).then(|| now + Duration::from_millis(u64::from(left)));
    let mut message = Message::new(topic, body, qos, retain, &Default::default());
    message.properties = properties;
    message.expires_at = expires_at;
    message.pinned = u32::try_from(pinned).unwrap_or(u32::MAX);
    message.id = id;
    Ok(message)
}

#[cfg(test)]
mod tests;
