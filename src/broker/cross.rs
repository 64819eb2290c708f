//! The typed messages shards send each other: the whole vocabulary of cross-core
//! traffic. The tasks that carry them are in `mesh`.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::BytesMut;

use super::conn_handle::ConnId;
use super::message::Message;
use super::session::{OwedMessage, RetainedCursor, SessionId, Subscription};
use super::shared::{GroupKey, Presence};
use super::sys::SysSnapshot;
use super::ConnectionSlot;
use crate::codec::{Connect, ProtocolVersion};
use crate::topic::{TopicFilter, TopicName};

/// Messages moved from one shard's outbox to a peer in one channel send.
pub const MAX_BATCH: usize = 256;
/// Bytes of messages one batch carries (at least one message): with the channel's
/// capacity in batches, this bounds what a channel holds in bytes.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Messages that may wait in one per-peer outbox before publishers on this shard pause
/// (`--mesh-backlog`'s default).
pub const MAX_BACKLOG: usize = 64 * 1024;
/// Bytes of messages that may wait in one per-peer outbox before publishers pause.
pub const MAX_BACKLOG_BYTES: usize = 64 << 20;
/// Batches a channel holds: at most `CHANNEL_CAPACITY × MAX_BATCH_BYTES` in flight from
/// one core to another.
pub const CHANNEL_CAPACITY: usize = 128;

/// Set in a receiver's applied count while it waits for a congested subscriber (see
/// `mesh::run_receiver`): what is
/// behind that message does not move, however idle the core.
pub const HELD: u64 = 1 << 63;

pub type Batch = Vec<CrossMsg>;

/// Asks the receiver of a QoS 1/2 message to say when what it wrote to its logs for it is
/// written (with `--fsync always`: flushed): the publisher's PUBACK/PUBREC waits for that
/// (acknowledge after append). `seq` is the acknowledgement's place on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    pub shard: usize,
    pub conn: ConnId,
    pub seq: u64,
    /// The publisher's session (it may outlive the connection).
    pub session: SessionId,
    /// The inbound QoS 2 packet identifier a PUBREC is for: if refused, the publisher's
    /// session forgets it, so that the resent PUBLISH is routed (and logged) again, even
    /// on a later connection.
    pub qos2_packet_id: Option<u16>,
}

/// Everything that crosses cores.
pub enum CrossMsg {
    /// A message for the receiver's local subscribers. Topic and payload are shared
    /// `Bytes`, so forwarding copies no payload.
    Publish(Message),
    /// [`CrossMsg::Publish`] of a QoS 1/2 message whose acknowledgement waits for the
    /// receiver's `Confirmed`.
    DurablePublish {
        message: Message,
        confirm: Confirm,
    },
    /// What a `Confirm` asked for is written.
    Confirmed(Confirm),
    /// What a `Confirm` asked for could not be written or flushed: the acknowledgement is
    /// withheld and the publisher's connection closed (the client resends).
    Refused(Confirm),
    /// The sender now has (or no longer has) subscriptions of persistent sessions it logs:
    /// QoS 1/2 publishes forwarded to it must (need not) wait for its `Confirmed`. A
    /// non-zero `token` asks for an `InterestAck`.
    Durable {
        from: usize,
        present: bool,
        token: u64,
    },
    /// A retained message for the shard that owns its topic.
    RetainSet(Message, Option<Confirm>),
    /// From the node bridge: an entry of the retained set another node sent this one when
    /// it joined, for the shard that owns its topic: stored unless the topic was written
    /// here since the node started (that value is newer than the set's).
    RetainSynced(Message, Option<Confirm>),
    /// From the node bridge: the retained set it joined with has all come; what is written
    /// from now on needs no record (see `RetainSynced`).
    RetainSyncDone,
    /// A page of the receiver's retained messages matching a new subscription.
    RetainQuery {
        from: usize,
        session: SessionId,
        cursor: RetainedCursor,
    },
    /// The answer to a `RetainQuery`; `next` is where the next page starts.
    RetainReply {
        session: SessionId,
        cursor: RetainedCursor,
        messages: Vec<Message>,
        next: Option<TopicName>,
    },
    /// The sender now has (`add`) or no longer has subscribers on `filter`. A non-zero
    /// `token` asks for an [`CrossMsg::InterestAck`], so that a SUBACK is sent only once
    /// every shard routes matching publishes to the subscriber.
    Interest {
        from: usize,
        filter: TopicFilter,
        add: bool,
        token: u64,
    },
    InterestAck {
        token: u64,
    },
    /// A shard's counters, for shard 0 to add up into `$SYS`.
    Sys(Box<SysSnapshot>),
    /// The sender's members of a shared subscription group: none, only offline, or some
    /// connected. A non-zero `token` asks for an `InterestAck`, as for `Interest`.
    SharedInterest {
        from: usize,
        key: Arc<GroupKey>,
        presence: Presence,
        token: u64,
    },
    /// A message for one of the receiver's members of a shared group.
    SharedPublish {
        key: Arc<GroupKey>,
        message: Message,
        confirm: Option<Confirm>,
    },
    /// A connection whose client identifier this shard owns, accepted elsewhere, with
    /// its CONNECT already read.
    Handoff(Box<Handoff>),
    /// To the node bridge: this shard is about to serve a CONNECT for `client_id`: claim
    /// it in etcd (fenced by the record's revision) and, when another node had it, take
    /// its session over (`want_session`: unless the CONNECT starts clean). Answered by
    /// `Claimed`.
    Claim {
        shard: usize,
        token: u64,
        client_id: Arc<str>,
        want_session: bool,
        /// The username its client proved, under `--takeover same-user`: another user's
        /// session elsewhere is not taken.
        user: Option<Arc<str>>,
    },
    /// From the bridge: the claim's outcome. Not `ok`: the CONNECT is refused (etcd not
    /// reachable, the previous node did not answer; `denied`: the session is another
    /// user's). `session`: handed over by the node that had it, in place before the CONNACK.
    Claimed {
        token: u64,
        client_id: Arc<str>,
        ok: bool,
        denied: bool,
        session: Option<Box<HandedSession>>,
    },
    /// To the bridge: the CONNECT behind claim `token` gave up waiting: withdraw it if it
    /// has not reached etcd yet.
    CancelClaim {
        token: u64,
    },
    /// To the bridge: `Claimed`'s session is in place here; its old node may let it go.
    Adopted {
        token: u64,
    },
    /// From the bridge: another node takes `client_id`: its connection here is closed
    /// (0x8E); a non-zero `token` asks for the session (answered by `HandedOver`), which
    /// stays here, receiving, until `Release`.
    TakeOver {
        client_id: Arc<str>,
        token: u64,
        want_session: bool,
    },
    /// From the bridge: the new owner has the session in place: what reached it here since
    /// the hand-over goes after it (`HandedOver` with `last`), and it ends here.
    Release {
        client_id: Arc<str>,
        token: u64,
    },
    /// To the bridge: the answer to `TakeOver` (`last` false) or to `Release`.
    HandedOver {
        token: u64,
        session: Option<Box<HandedSession>>,
        last: bool,
    },
    /// From the bridge: pass `Marker` `token` to shard `to` (after what this shard sent it
    /// before), for the barrier before a session there leaves for another node.
    SendMarker {
        to: usize,
        token: u64,
    },
    /// A barrier's marker from another shard (see `SendMarker`).
    Marker {
        token: u64,
    },
    /// From the bridge: the node taking `client_id` over is gone before it had the session
    /// in place: it stays here.
    Stay {
        client_id: Arc<str>,
    },
    /// From the bridge: an owner record in etcd names this node for `client_id` (read at
    /// start-up, left by an earlier run): its record goes unless something here serves it.
    Unserved {
        client_id: Arc<str>,
    },
    /// To the bridge: nothing on this node serves `client_id` any more (no session, no
    /// CONNECT claiming it).
    Unclaim {
        client_id: Arc<str>,
    },
    /// To the bridge: the session of claim `token` is in place so far, its next part please.
    AskPart {
        token: u64,
    },
    /// From the bridge: the next part of the session handed over for claim `token`.
    Part {
        client_id: Arc<str>,
        token: u64,
        messages: Vec<OwedMessage>,
        more: bool,
    },
    /// From the bridge: the node taking `client_id` over asks for the next part of it.
    NextPart {
        client_id: Arc<str>,
        token: u64,
    },
    /// From the bridge: messages that reached a session's old node after its hand-over
    /// (none when that node is gone), for the claim `token`; `more`: a part of them, the
    /// next one to be asked for (`AskPart`).
    Leftovers {
        client_id: Arc<str>,
        token: u64,
        messages: Vec<OwedMessage>,
        more: bool,
    },
    /// From the node bridge: the node is fenced from the cluster (its lease could not be
    /// renewed): every connection is closed (v5: 0x9C Use another server).
    Fence,
    /// At start-up: the sender replayed its logs and its peers acknowledged its
    /// subscriptions (see `server::all_shards_ready`).
    Ready,
}

impl CrossMsg {
    /// Bytes this message holds while it waits to cross (what the mesh's byte bounds
    /// count): the messages it carries, or a small fixed cost. One carrying a message
    /// counts two slots too: its own in the batch it travels in (an outbox is kept as its
    /// batches, without spare room: see `outbox`), and about what it will hold in a node
    /// link's window, where a message taken from a shard is counted again (a B-tree entry
    /// of about that size, at about half-full nodes: `window_cost`). Counted alike on both
    /// sides of the node bridge, what the shards hand it and the links' windows stay
    /// within `--node-link-buffer` together. For a small message the slots are most of
    /// what it holds (64 B QoS 0 across nodes: 162 MB held against 64 MiB counted with the
    /// message's size alone).
    pub fn size(&self) -> usize {
        const SMALL: usize = 64;
        // What `Message::size` does not count of it already.
        const SLOT: usize =
            (2 * std::mem::size_of::<CrossMsg>()).saturating_sub(crate::broker::message::MESSAGE_OVERHEAD);
        match self {
            CrossMsg::Publish(message)
            | CrossMsg::DurablePublish { message, .. }
            | CrossMsg::RetainSet(message, _)
            | CrossMsg::RetainSynced(message, _)
            | CrossMsg::SharedPublish { message, .. } => message.size() + SLOT,
            CrossMsg::RetainReply { messages, .. } => {
                SMALL + messages.iter().map(Message::size).sum::<usize>()
            }
            CrossMsg::Handoff(handoff) => SMALL + handoff.rest.len(),
            _ => SMALL,
        }
    }
}

/// A session moving to another node: what the new owner needs to go on with it.
#[derive(Debug, Clone, PartialEq)]
pub struct HandedSession {
    pub version: ProtocolVersion,
    pub expiry: u32,
    pub subscriptions: Vec<(TopicFilter, Subscription)>,
    /// In the order they are owed; those in flight with their packet identifiers and
    /// PUBREC state, so the client's QoS 2 state stays true across the move.
    pub messages: Vec<OwedMessage>,
    /// Inbound QoS 2 packet identifiers between PUBREC and PUBREL: a PUBLISH the client
    /// sends again with one of them is not delivered twice.
    pub qos2_inbound: Vec<u16>,
    /// More of its messages follow (a part at a time, each asked for: what it spilled to
    /// its log can be more than one frame or the receiver's memory holds).
    pub more: bool,
}

/// A socket moving to its owner shard: the descriptor, the decoded CONNECT and whatever
/// the client sent after it.
pub struct Handoff {
    pub fd: OwnedFd,
    /// The connection's TLS state, on a TLS listener: the owner serves the encrypted
    /// stream itself.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// A WebSocket connection's undelivered frames and bytes.
    pub ws: Option<Box<crate::codec::websocket::WsState>>,
    pub peer: SocketAddr,
    pub connect: Connect,
    pub rest: BytesMut,
    pub slot: ConnectionSlot,
    /// Who the accepting shard found the client to be, on a listener with authentication.
    pub identity: Option<Box<crate::auth::Identity>>,
}
