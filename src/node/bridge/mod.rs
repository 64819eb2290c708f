//! The node's bridge to the other nodes, as a state machine without I/O: to the shards it is
//! one more peer of the mesh (index `shards`), to the other nodes it is the two ends of
//! every node link. Tasks (`node::tasks`) feed it what arrives — cross-core messages, link
//! frames, control-plane events — and drain what it queues.
//!
//! - **Routes out**: the shards' `Interest` tells it which filters this node subscribes to;
//!   a filter's first shard asks the control thread to write `routes/<filter>/<node>`, and
//!   the shards' `InterestAck`s (hence the SUBACK) wait until etcd committed it.
//! - **Routes in**: the other nodes' routes (from etcd) form a tree of node ids; a filter
//!   any node has is announced to every shard as this peer's `Interest`, so a shard sends
//!   a matching publish here once, whatever the number of nodes.
//! - **Publishes out**: one frame per matching node, on the link this node dials. QoS 1/2
//!   (and every retained set) stay in the link's window until the node confirms them
//!   (resent after a reconnect); the publisher's acknowledgement waits for every node's
//!   confirmation, like a peer core's.
//! - **Publishes in**: delivered to the matching shards as `DurablePublish`; the node that
//!   sent it is confirmed once every shard confirmed (its logs hold it).
//! - **Shared groups**: a node with members of `$share/{group}/{filter}` writes that as a
//!   route; a shard that picks this peer for a group's message hands it here, and one node
//!   with members (in turn) gets it, whose bridge gives it to one shard with members.
//!
//! Here: the shards' side; `links`: frames in and out; `membership`: the control plane's
//! events (nodes, their routes, commits).

mod flow;
mod links;
mod membership;
mod takeover;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use ahash::AHashMap;

pub use flow::Bounds;

use super::frame::{Frame, FrameLimits};
use crate::broker::cross::{Confirm, CrossMsg};
use crate::broker::message::Message;
use crate::broker::placement;
use crate::broker::shared::{self, GroupKey, Presence};
use crate::codec::QoS;
use crate::topic::{SubscriptionTree, TopicFilter};

/// Another node, by a small number.
pub type NodeId = u32;

/// What the bridge asks of the control thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRequest {
    /// This node's first subscriber of `filter`: write its route (then `Committed`).
    AddRoute(TopicFilter),
    /// Its last one left: delete the route.
    RemoveRoute(TopicFilter),
    /// Claim `client_id` for this node (then `Claimed { id, .. }`, or `Denied { id }` when
    /// its record names a user other than `user`).
    Claim { client_id: String, id: u64, user: Option<String> },
    /// Claim `id` is withdrawn: skipped if it has not been made yet.
    Cancel { id: u64 },
    /// Nothing here serves `client_id` any more: delete its owner record if it is still at
    /// `revision` (this node's claim).
    Unclaim { client_id: String, revision: u64 },
    /// Read a page of the owner records from key `from` on (`Records`), for those naming
    /// this node left by an earlier run.
    Sweep { from: String },
}

/// What the control thread tells the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// The whole membership and routes, as read at start or after the watch lost its place.
    Snapshot {
        nodes: Vec<(String, SocketAddr)>,
        routes: Vec<(String, TopicFilter)>,
    },
    NodeUp {
        node: String,
        addr: SocketAddr,
    },
    NodeDown {
        node: String,
    },
    Route {
        node: String,
        filter: TopicFilter,
        add: bool,
    },
    /// A route asked for with `AddRoute` is in etcd.
    Committed(TopicFilter),
    /// A claim's outcome: the node that had the client before, if any, and the revision of
    /// the claim; `Err`: not claimed.
    Claimed {
        id: u64,
        outcome: Result<(Option<String>, u64), String>,
    },
    /// Claim `id` was not made: the client's session is another user's.
    Denied {
        id: u64,
    },
    /// A page of the owner records naming this node (client, revision), and the key the
    /// next page starts at.
    Records {
        records: Vec<(String, u64)>,
        next: Option<String>,
    },
    /// `client_id`'s owner record now names `node` (written at `revision`).
    Owner {
        client_id: String,
        node: String,
        revision: u64,
    },
    /// The cluster's link secret (read or created in etcd at registration).
    Secret(Vec<u8>),
    /// The lease could not be renewed (`true`): the node closes its clients and refuses
    /// new ones until it is (`false`).
    Fenced(bool),
}

/// A node the bridge knows of (or knew: ids are not reused).
pub struct Node {
    pub name: String,
    pub addr: Option<SocketAddr>,
    /// Present in etcd (its lease holds).
    pub live: bool,
    pub out: OutLink,
}

/// What this node sends another, on the link it dials.
#[derive(Default)]
pub struct OutLink {
    pub next_seq: u64,
    /// Frames not yet written, and written QoS 1/2 and retained ones not yet confirmed, by
    /// sequence number.
    pub frames: BTreeMap<u64, Outgoing>,
    /// The highest sequence number written on the current connection.
    pub written: u64,
    /// Bytes of the messages in `frames`.
    pub bytes: usize,
    pub connected: bool,
    /// The bounds the node reads this link with, as its `Welcome` said (at the last
    /// connection): larger frames are not written but refused here (`unwritable`).
    pub accepts: Option<FrameLimits>,
}

pub struct Outgoing {
    pub frame: Frame,
    /// What this frame's confirmation answers.
    pub origin: Answers,
}

/// What a frame's confirmation (or refusal) answers.
#[derive(Clone, Copy)]
pub enum Answers {
    Nothing,
    /// The publisher's acknowledgement, when this frame is all it waits for (the common
    /// case: one node to go to, no entry in `origins`).
    Publisher(Confirm),
    /// One of the confirmations an entry of `origins` counts.
    Origin(u64),
}

/// What waits for other nodes' confirmations.
struct Origin {
    waiter: Waiter,
    remaining: usize,
}

enum Waiter {
    /// A publisher's acknowledgement.
    Publish(Confirm),
    /// SUBACKs: the shards' interest acknowledgements for a new route.
    Route(Vec<(usize, u64)>),
}

/// A frame from another node waiting for this node's shards.
struct Inbound {
    link: (String, u64),
    seq: u64,
    remaining: usize,
}

/// What this node knows of a dialling node's link (kept across its reconnections).
#[derive(Default)]
pub struct InLink {
    /// Sequence numbers below it were received: a resent one is not delivered again.
    pub next_expected: u64,
    /// Tokens of its frames still waiting for the shards, by sequence number.
    waiting: AHashMap<u64, u64>,
    /// Confirmations to write back.
    pub replies: VecDeque<Frame>,
}

pub struct Bridge {
    /// This bridge's index among the shards' peers.
    pub index: usize,
    pub shards: usize,
    pub node: String,
    /// Per shard: messages waiting for the sender task, and their bytes.
    pub outbox: Vec<crate::broker::outbox::Outbox>,
    pub outbox_bytes: Vec<usize>,
    /// Per shard: what its channel holds from here, not applied yet (see `flow`).
    handed: Vec<flow::Handed>,
    /// The byte bounds from `--node-link-buffer`.
    pub bounds: Bounds,
    /// Which shards have subscribers on each filter (their `Interest`).
    local: SubscriptionTree<usize, ()>,
    local_count: AHashMap<TopicFilter, usize>,
    /// Interest acknowledgements waiting for a route's commit, per filter.
    /// One entry per route write asked for and not committed yet, oldest first (a filter
    /// dropped and taken again before its write committed is written again).
    committing: AHashMap<TopicFilter, VecDeque<Vec<(usize, u64)>>>,
    /// Other nodes' routes, and on how many nodes each filter is.
    remote: SubscriptionTree<NodeId, ()>,
    remote_count: AHashMap<TopicFilter, usize>,
    /// Shared groups: the shards' presence in each (their `SharedInterest`), and the other
    /// nodes with members of each (from their `$share/...` routes) with a cursor for the
    /// next pick.
    local_groups: AHashMap<Arc<GroupKey>, Vec<Presence>>,
    group_cursor: usize,
    remote_groups: AHashMap<Arc<GroupKey>, (Vec<NodeId>, usize)>,
    pub nodes: Vec<Node>,
    by_name: AHashMap<String, NodeId>,
    origins: AHashMap<u64, Origin>,
    inbound: AHashMap<u64, Inbound>,
    /// Dialling nodes' links, by (node, incarnation).
    pub in_links: AHashMap<(String, u64), InLink>,
    next_token: u64,
    /// Requests for the control thread.
    pub control: Vec<ControlRequest>,
    /// Shards that said `Ready`.
    pub ready: usize,
    /// The control plane's first snapshot arrived.
    pub loaded: bool,
    /// The secret a dialling node proves it knows (see `handshake`); links wait for it.
    pub secret: Option<Vec<u8>>,
    /// Nodes or links changed since `$SYS/cluster/...` was last published.
    pub sys_dirty: bool,
    /// This node asked a peer for the retained set (once, at its first link).
    synced: bool,
    /// The retained set a peer had when this node joined is here (or there was no peer).
    pub sync_done: bool,
    /// Retained sets being sent to joining nodes: the shards still paging, per node.
    syncing: AHashMap<NodeId, usize>,
    /// Pages not asked for yet because the joining node's link window was full: (node,
    /// shard, where the next page starts).
    sync_paused: Vec<(NodeId, usize, Option<crate::topic::TopicName>)>,
    /// Reused per publish.
    scratch: Vec<NodeId>,
    takeovers: takeover::Takeovers,
}

impl Bridge {
    pub fn new(shards: usize, node: &str) -> Bridge {
        Bridge {
            index: shards,
            shards,
            node: node.to_string(),
            outbox: (0..shards).map(|_| Default::default()).collect(),
            outbox_bytes: vec![0; shards],
            handed: (0..shards).map(|_| flow::Handed::default()).collect(),
            bounds: Bounds::NONE,
            local: SubscriptionTree::new(),
            local_count: AHashMap::new(),
            committing: AHashMap::new(),
            remote: SubscriptionTree::new(),
            remote_count: AHashMap::new(),
            local_groups: AHashMap::new(),
            group_cursor: 0,
            remote_groups: AHashMap::new(),
            nodes: Vec::new(),
            by_name: AHashMap::new(),
            origins: AHashMap::new(),
            inbound: AHashMap::new(),
            in_links: AHashMap::new(),
            next_token: 0,
            control: Vec::new(),
            ready: 0,
            loaded: false,
            synced: false,
            sys_dirty: true,
            secret: None,
            sync_done: false,
            syncing: AHashMap::new(),
            sync_paused: Vec::new(),
            scratch: Vec::new(),
            takeovers: takeover::Takeovers::default(),
        }
    }

    pub fn send(&mut self, shard: usize, msg: CrossMsg) {
        let size = msg.size();
        self.outbox_bytes[shard] += size;
        self.outbox[shard].push_back(msg, size);
    }

    /// The local shards with a subscription matching `topic`, as a mask.
    fn local_shards(&self, topic: &crate::topic::TopicName) -> u128 {
        let mut shards: u128 = 0;
        self.local.for_each_match(topic, |_, shard, _| shards |= 1 << *shard);
        shards
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Bytes waiting on links to other nodes: over the bound, publishers pause.
    pub fn link_bytes(&self) -> usize {
        self.nodes.iter().map(|n| n.out.bytes).sum()
    }

    /// Messages waiting for the shards (a link's reader pauses over a bound).
    pub fn shard_backlog(&self) -> usize {
        self.outbox.iter().map(crate::broker::outbox::Outbox::len).max().unwrap_or(0)
    }

    // ---- the shards' messages ----

    /// Applies one message from shard `from`.
    pub fn on_shard(&mut self, from: usize, msg: CrossMsg) {
        match msg {
            CrossMsg::Publish(message) => self.publish_out(message, None, false),
            CrossMsg::DurablePublish { message, confirm } => self.publish_out(message, Some(confirm), false),
            CrossMsg::RetainSet(message, confirm) => self.publish_out(message, confirm, true),
            CrossMsg::Confirmed(confirm) => self.shard_confirmed(confirm, true),
            CrossMsg::Refused(confirm) => self.shard_confirmed(confirm, false),
            CrossMsg::Interest { from, filter, add, token } => self.local_interest(from, filter, add, token),
            CrossMsg::Durable { token, .. } => {
                if token != 0 {
                    self.send(from, CrossMsg::InterestAck { token });
                }
            }
            CrossMsg::SharedInterest { from, key, presence, token } => {
                self.local_group(from, key, presence, token)
            }
            CrossMsg::SharedPublish { key, message, confirm } => self.shared_out(&key, message, confirm),
            CrossMsg::Ready => {
                self.ready += 1;
                if self.ready == self.shards {
                    // Every session this node recovered is in place: records naming it
                    // that nothing here serves are an earlier run's.
                    self.control.push(ControlRequest::Sweep { from: String::new() });
                }
            }
            // The shards route a node's new route here: its `Route` frame is confirmed.
            CrossMsg::InterestAck { token } => {
                let confirm =
                    Confirm { shard: self.index, conn: 0, seq: token, session: 0, qos2_packet_id: None };
                self.shard_confirmed(confirm, true);
            }
            CrossMsg::Claim { shard, token, client_id, want_session, user } => {
                self.claim(shard, token, client_id, want_session, user)
            }
            CrossMsg::Adopted { token } => self.adopted(token),
            CrossMsg::AskPart { token } => self.ask_part(token),
            CrossMsg::Unclaim { client_id } => self.unclaim(client_id),
            CrossMsg::CancelClaim { token } => self.cancel_claim(from, token),
            CrossMsg::HandedOver { token, session, last } => self.shard_handed_over(token, session, last),
            // From the bridge to shards only.
            CrossMsg::Fence
            | CrossMsg::Claimed { .. }
            | CrossMsg::TakeOver { .. }
            | CrossMsg::Release { .. }
            | CrossMsg::Part { .. }
            | CrossMsg::NextPart { .. }
            | CrossMsg::SendMarker { .. }
            | CrossMsg::Marker { .. }
            | CrossMsg::Stay { .. }
            | CrossMsg::Unserved { .. }
            | CrossMsg::RetainSynced(..)
            | CrossMsg::RetainSyncDone
            | CrossMsg::Leftovers { .. } => {}
            // Not for the bridge: shards never send these to it.
            CrossMsg::RetainReply { cursor, messages, next, .. } => self.sync_page(cursor, messages, next),
            CrossMsg::RetainQuery { .. } | CrossMsg::Sys(_) | CrossMsg::Handoff(_) => {
                tracing::debug!(shard = from, "a cross-core message the bridge does not take");
            }
        }
    }

    fn local_interest(&mut self, shard: usize, filter: TopicFilter, add: bool, token: u64) {
        let count = self.local_count.entry(filter.clone()).or_insert(0);
        let (before, after);
        if add {
            before = *count > 0;
            if self.local.insert(&filter, shard, ()).is_none() {
                *count += 1;
            }
            after = true;
        } else {
            before = true;
            if self.local.remove(&filter, &shard).is_some() {
                *count = count.saturating_sub(1);
            }
            after = *count > 0;
            if !after {
                self.local_count.remove(&filter);
            }
        }
        self.node_route(shard, filter, before, after, token);
    }

    /// A shard's presence in a shared group changed: the node's route for the group is
    /// written on its first shard with members and deleted after its last.
    fn local_group(&mut self, shard: usize, key: Arc<GroupKey>, presence: Presence, token: u64) {
        let shards = self.shards;
        let slots = self.local_groups.entry(key.clone()).or_insert_with(|| vec![Presence::None; shards]);
        let before = slots.iter().any(|p| *p != Presence::None);
        if let Some(slot) = slots.get_mut(shard) {
            *slot = presence;
        }
        let after = slots.iter().any(|p| *p != Presence::None);
        if !after {
            self.local_groups.remove(&key);
        }
        self.node_route(shard, group_filter(&key), before, after, token);
    }

    /// The node went from (`before`) having subscribers on `filter` to (`after`) having
    /// them or not: its route is written or deleted; the shard's acknowledgement (its
    /// SUBACK) waits for a route being written.
    fn node_route(&mut self, shard: usize, filter: TopicFilter, before: bool, after: bool, token: u64) {
        if after && !before {
            self.committing.entry(filter.clone()).or_default().push_back(Vec::new());
            self.control.push(ControlRequest::AddRoute(filter.clone()));
        }
        if before && !after {
            self.control.push(ControlRequest::RemoveRoute(filter.clone()));
        }
        match self.committing.get_mut(&filter).and_then(|writes| writes.back_mut()) {
            Some(waiting) if token != 0 && after => waiting.push((shard, token)),
            _ if token != 0 => self.send(shard, CrossMsg::InterestAck { token }),
            _ => {}
        }
    }

    /// A message a local shard chose the other nodes for, for one member of a shared
    /// group: to one node with members, in turn.
    fn shared_out(&mut self, key: &Arc<GroupKey>, message: Message, confirm: Option<Confirm>) {
        let live: Vec<NodeId> = match self.remote_groups.get_mut(key) {
            Some((nodes, cursor)) => {
                *cursor = cursor.wrapping_add(1);
                let live: Vec<NodeId> =
                    nodes.iter().copied().filter(|n| self.nodes[*n as usize].live).collect();
                live.get(*cursor % live.len().max(1)).copied().into_iter().collect()
            }
            None => Vec::new(),
        };
        let Some(&node) = live.first() else {
            // The group left the other nodes meanwhile.
            crate::broker::core_counters::dropped(crate::broker::admin::DropReason::NoSubscribers);
            if let Some(confirm) = confirm {
                self.send(confirm.shard, CrossMsg::Confirmed(confirm));
            }
            return;
        };
        let origin = confirm.map_or(Answers::Nothing, Answers::Publisher);
        let group = group_filter(key).as_str().to_string();
        let out = &mut self.nodes[node as usize].out;
        out.next_seq += 1;
        let seq = out.next_seq;
        out.bytes += window_cost(&message);
        out.frames.insert(seq, Outgoing { frame: Frame::Shared { seq, group, message }, origin });
    }

    /// A shard confirmed (or refused) a frame from another node.
    fn shard_confirmed(&mut self, confirm: Confirm, ok: bool) {
        let Some(entry) = self.inbound.get_mut(&confirm.seq) else { return };
        entry.remaining = entry.remaining.saturating_sub(1);
        if ok && entry.remaining > 0 {
            return;
        }
        let Some(entry) = self.inbound.remove(&confirm.seq) else { return };
        let Some(link) = self.in_links.get_mut(&entry.link) else { return };
        link.waiting.remove(&entry.seq);
        let reply = if ok { Frame::Confirmed { seq: entry.seq } } else { Frame::Refused { seq: entry.seq } };
        link.replies.push_back(reply);
    }

    /// A publish (or, `retained`, a retained set) from a local shard for the other nodes.
    fn publish_out(&mut self, message: Message, confirm: Option<Confirm>, retained: bool) {
        if crate::auth::is_sys(message.topic.as_str()) {
            // `$SYS` is each node's own: neither forwarded nor replicated.
            if let Some(confirm) = confirm {
                self.send(confirm.shard, CrossMsg::Confirmed(confirm));
            }
            return;
        }
        let mut targets = std::mem::take(&mut self.scratch);
        if retained {
            // Every node keeps every retained message.
            targets.extend((0..self.nodes.len() as NodeId).filter(|n| self.nodes[*n as usize].live));
        } else {
            self.remote.for_each_match(&message.topic, |_, node, _| targets.push(*node));
            targets.sort_unstable();
            targets.dedup();
            targets.retain(|n| self.nodes[*n as usize].live);
        }
        let confirmed = retained || message.qos != QoS::AtMostOnce;
        let answers = match confirm {
            Some(confirm) if targets.len() == 1 => Answers::Publisher(confirm),
            Some(confirm) if !targets.is_empty() => {
                let id = self.token();
                self.origins
                    .insert(id, Origin { waiter: Waiter::Publish(confirm), remaining: targets.len() });
                Answers::Origin(id)
            }
            // Nowhere to go: nothing to wait for.
            Some(confirm) => {
                self.send(confirm.shard, CrossMsg::Confirmed(confirm));
                Answers::Nothing
            }
            None => Answers::Nothing,
        };
        for node in &targets {
            let out = &mut self.nodes[*node as usize].out;
            // A QoS 0 message is not kept for a link that is down (at most once).
            if !confirmed && !out.connected {
                crate::broker::core_counters::dropped(crate::broker::admin::DropReason::Offline);
                continue;
            }
            out.next_seq += 1;
            let seq = out.next_seq;
            out.bytes += window_cost(&message);
            let frame = if retained {
                Frame::Retain { seq, message: message.clone() }
            } else {
                Frame::Publish { seq, message: message.clone() }
            };
            out.frames.insert(seq, Outgoing { frame, origin: answers });
        }
        targets.clear();
        self.scratch = targets;
    }
}

/// The shards of a mask, lowest first.
pub(super) fn each_shard(mut mask: u128) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let shard = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            shard
        })
    })
}

/// `$share/{group}/{filter}`: the route a node writes for its members of a group.
pub(super) fn group_filter(key: &GroupKey) -> TopicFilter {
    let text = format!("$share/{}/{}", key.group, key.filter.as_str());
    TopicFilter::new(text.into_bytes()).unwrap_or_else(|_| key.filter.clone())
}

pub(super) fn needs_confirm(frame: &Frame) -> bool {
    match frame {
        Frame::Retain { .. }
        | Frame::SyncEntry { .. }
        | Frame::Route { .. }
        | Frame::TakeOver { .. }
        | Frame::Handover { .. }
        | Frame::Adopted { .. }
        | Frame::NextPart { .. }
        | Frame::Flush { .. }
        | Frame::Flushed { .. }
        | Frame::SyncRetained { .. }
        | Frame::SyncDone { .. } => true,
        Frame::Publish { message, .. } | Frame::Shared { message, .. } => message.qos != QoS::AtMostOnce,
        _ => false,
    }
}

/// What a message's frame costs in a link's window: its bytes, and the window's entry
/// (`Outgoing` and its key in a B-tree whose nodes are about half full when appended to,
/// in place of the queue entry `Message::size` counts).
pub(super) fn window_cost(message: &Message) -> usize {
    message.size() + WINDOW_ENTRY
}

const WINDOW_ENTRY: usize =
    (2 * std::mem::size_of::<(u64, Outgoing)>()).saturating_sub(crate::broker::message::MESSAGE_OVERHEAD);

pub(super) fn frame_size(frame: &Frame) -> usize {
    match frame {
        Frame::Publish { message, .. }
        | Frame::Retain { message, .. }
        | Frame::SyncEntry { message, .. }
        | Frame::Shared { message, .. } => window_cost(message),
        _ => 0,
    }
}
