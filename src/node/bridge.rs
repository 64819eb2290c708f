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

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use ahash::AHashMap;

use super::frame::Frame;
use crate::broker::cross::{Confirm, CrossMsg};
use crate::broker::message::Message;
use crate::broker::placement;
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
}

pub struct Outgoing {
    pub frame: Frame,
    /// The publisher's acknowledgement this frame's confirmation counts towards.
    pub origin: Option<u64>,
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
    pub outbox: Vec<VecDeque<CrossMsg>>,
    pub outbox_bytes: Vec<usize>,
    /// Which shards have subscribers on each filter (their `Interest`).
    local: SubscriptionTree<usize, ()>,
    local_count: AHashMap<TopicFilter, usize>,
    /// Interest acknowledgements waiting for a route's commit, per filter.
    committing: AHashMap<TopicFilter, Vec<(usize, u64)>>,
    /// Other nodes' routes, and on how many nodes each filter is.
    remote: SubscriptionTree<NodeId, ()>,
    remote_count: AHashMap<TopicFilter, usize>,
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
    /// Reused per publish.
    scratch: Vec<NodeId>,
}

impl Bridge {
    pub fn new(shards: usize, node: &str) -> Bridge {
        Bridge {
            index: shards,
            shards,
            node: node.to_string(),
            outbox: (0..shards).map(|_| VecDeque::new()).collect(),
            outbox_bytes: vec![0; shards],
            local: SubscriptionTree::new(),
            local_count: AHashMap::new(),
            committing: AHashMap::new(),
            remote: SubscriptionTree::new(),
            remote_count: AHashMap::new(),
            nodes: Vec::new(),
            by_name: AHashMap::new(),
            origins: AHashMap::new(),
            inbound: AHashMap::new(),
            in_links: AHashMap::new(),
            next_token: 0,
            control: Vec::new(),
            ready: 0,
            loaded: false,
            scratch: Vec::new(),
        }
    }

    pub fn send(&mut self, shard: usize, msg: CrossMsg) {
        self.outbox_bytes[shard] += msg.size();
        self.outbox[shard].push_back(msg);
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
        self.outbox.iter().map(VecDeque::len).max().unwrap_or(0)
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
            CrossMsg::Durable { token, .. } | CrossMsg::SharedInterest { token, .. } => {
                if token != 0 {
                    self.send(from, CrossMsg::InterestAck { token });
                }
            }
            CrossMsg::Ready => self.ready += 1,
            // The shards route a node's new route here: its `Route` frame is confirmed.
            CrossMsg::InterestAck { token } => {
                let confirm =
                    Confirm { shard: self.index, conn: 0, seq: token, session: 0, qos2_packet_id: None };
                self.shard_confirmed(confirm, true);
            }
            CrossMsg::Fence => {}
            // Not for the bridge: shards never send these to it.
            CrossMsg::RetainQuery { .. }
            | CrossMsg::RetainReply { .. }
            | CrossMsg::SharedPublish { .. }
            | CrossMsg::Sys(_)
            | CrossMsg::Handoff(_) => {
                tracing::debug!(shard = from, "a cross-core message the bridge does not take");
            }
        }
    }

    fn local_interest(&mut self, shard: usize, filter: TopicFilter, add: bool, token: u64) {
        let count = self.local_count.entry(filter.clone()).or_insert(0);
        if add {
            if self.local.insert(&filter, shard, ()).is_none() {
                *count += 1;
            }
            if *count == 1 && !self.committing.contains_key(&filter) {
                self.committing.insert(filter.clone(), Vec::new());
                self.control.push(ControlRequest::AddRoute(filter.clone()));
            }
            match self.committing.get_mut(&filter) {
                Some(waiting) if token != 0 => waiting.push((shard, token)),
                _ if token != 0 => self.send(shard, CrossMsg::InterestAck { token }),
                _ => {}
            }
        } else {
            if self.local.remove(&filter, &shard).is_some() {
                *count = count.saturating_sub(1);
            }
            if *count == 0 {
                self.local_count.remove(&filter);
                self.control.push(ControlRequest::RemoveRoute(filter));
            }
        }
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
        let origin = match confirm {
            Some(confirm) if !targets.is_empty() => {
                let id = self.token();
                self.origins
                    .insert(id, Origin { waiter: Waiter::Publish(confirm), remaining: targets.len() });
                Some(id)
            }
            // Nowhere to go: nothing to wait for.
            Some(confirm) => {
                self.send(confirm.shard, CrossMsg::Confirmed(confirm));
                None
            }
            None => None,
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
            out.bytes += message.size();
            let frame = if retained {
                Frame::Retain { seq, message: message.clone() }
            } else {
                Frame::Publish { seq, message: message.clone() }
            };
            out.frames.insert(seq, Outgoing { frame, origin });
        }
        targets.clear();
        self.scratch = targets;
    }

    // ---- the links ----

    /// Frames to write on `node`'s link now (each once per connection), in order; QoS 0
    /// ones leave the window as they are taken.
    pub fn take_writes(&mut self, node: NodeId, max: usize, out: &mut Vec<Frame>) {
        let link = &mut self.nodes[node as usize].out;
        let from = link.written + 1;
        let mut done = Vec::new();
        for (seq, outgoing) in link.frames.range(from..).take(max) {
            out.push(outgoing.frame.clone());
            link.written = *seq;
            if !needs_confirm(&outgoing.frame) {
                done.push(*seq);
            }
        }
        for seq in done {
            if let Some(gone) = link.frames.remove(&seq) {
                link.bytes -= frame_size(&gone.frame);
            }
        }
    }

    /// `node`'s link connected (`true`) or was lost: after a loss, whatever was not
    /// confirmed is written again on the next connection, in order.
    pub fn link_state(&mut self, node: NodeId, connected: bool) {
        let link = &mut self.nodes[node as usize].out;
        link.connected = connected;
        link.written = 0;
        if !connected {
            // QoS 0 frames not written yet are dropped with the connection.
            let dropped: Vec<u64> =
                link.frames.iter().filter(|(_, o)| !needs_confirm(&o.frame)).map(|(s, _)| *s).collect();
            for seq in dropped {
                if let Some(gone) = link.frames.remove(&seq) {
                    link.bytes -= frame_size(&gone.frame);
                }
            }
        }
    }

    /// A confirmation (or refusal) from `node` for one of this node's frames.
    pub fn on_link_reply(&mut self, node: NodeId, frame: Frame) {
        let (seq, ok) = match frame {
            Frame::Confirmed { seq } => (seq, true),
            Frame::Refused { seq } => (seq, false),
            other => {
                tracing::debug!(node, ?other, "unexpected frame on an outgoing link");
                return;
            }
        };
        let link = &mut self.nodes[node as usize].out;
        let Some(outgoing) = link.frames.remove(&seq) else { return };
        link.bytes -= frame_size(&outgoing.frame);
        if let Some(origin) = outgoing.origin {
            self.origin_answered(origin, ok);
        }
    }

    fn origin_answered(&mut self, id: u64, ok: bool) {
        let Some(origin) = self.origins.get_mut(&id) else { return };
        origin.remaining = origin.remaining.saturating_sub(1);
        if ok && origin.remaining > 0 {
            return;
        }
        let Some(origin) = self.origins.remove(&id) else { return };
        match origin.waiter {
            Waiter::Publish(confirm) => {
                let msg = if ok { CrossMsg::Confirmed(confirm) } else { CrossMsg::Refused(confirm) };
                self.send(confirm.shard, msg);
            }
            Waiter::Route(acks) => self.release_acks(acks),
        }
    }

    fn release_acks(&mut self, acks: Vec<(usize, u64)>) {
        for (shard, token) in acks {
            self.send(shard, CrossMsg::InterestAck { token });
        }
    }

    /// A route of this node is in etcd: every node linked now is told over its link, and
    /// the SUBACKs wait until each routes matching publishes here. (A node not linked now
    /// learns it from etcd's watch.)
    fn route_committed(&mut self, filter: TopicFilter) {
        let acks = self.committing.remove(&filter).unwrap_or_default();
        let linked: Vec<NodeId> = (0..self.nodes.len() as NodeId)
            .filter(|n| self.nodes[*n as usize].live && self.nodes[*n as usize].out.connected)
            .collect();
        if linked.is_empty() {
            self.release_acks(acks);
            return;
        }
        let id = self.token();
        self.origins.insert(id, Origin { waiter: Waiter::Route(acks), remaining: linked.len() });
        for node in linked {
            let out = &mut self.nodes[node as usize].out;
            out.next_seq += 1;
            let seq = out.next_seq;
            let frame = Frame::Route { seq, filter: filter.as_str().to_string() };
            out.frames.insert(seq, Outgoing { frame, origin: Some(id) });
        }
    }

    /// A frame from a dialling node `(name, incarnation)`.
    pub fn on_link_frame(&mut self, link: &(String, u64), frame: Frame) {
        let (seq, message, retained) = match frame {
            Frame::Publish { seq, message } => (seq, message, false),
            Frame::Retain { seq, message } => (seq, message, true),
            Frame::Route { seq, filter } => return self.link_route(link, seq, &filter),
            other => {
                tracing::debug!(node = %link.0, ?other, "unexpected frame on an incoming link");
                return;
            }
        };
        let confirmed = retained || message.qos != QoS::AtMostOnce;
        let state = self.in_links.entry(link.clone()).or_default();
        if seq < state.next_expected {
            // Resent after a reconnection: delivered before. Confirmed again once its
            // first delivery is (or now, if it was).
            if confirmed && !state.waiting.contains_key(&seq) {
                state.replies.push_back(Frame::Confirmed { seq });
            }
            return;
        }
        state.next_expected = seq + 1;
        let mut shards: u128 = 0;
        if retained {
            shards = 1 << placement::owner(message.topic.as_str(), self.shards);
        } else {
            self.local.for_each_match(&message.topic, |_, shard, _| shards |= 1 << *shard);
        }
        let count = shards.count_ones() as usize;
        let token = if confirmed && count > 0 {
            let token = self.token();
            self.inbound.insert(token, Inbound { link: link.clone(), seq, remaining: count });
            if let Some(state) = self.in_links.get_mut(link) {
                state.waiting.insert(seq, token);
            }
            Some(token)
        } else {
            if confirmed {
                if let Some(state) = self.in_links.get_mut(link) {
                    state.replies.push_back(Frame::Confirmed { seq });
                }
            }
            None
        };
        let confirm = token.map(|token| Confirm {
            shard: self.index,
            conn: 0,
            seq: token,
            session: 0,
            qos2_packet_id: None,
        });
        while shards != 0 {
            let shard = shards.trailing_zeros() as usize;
            shards &= shards - 1;
            let msg = match (retained, confirm) {
                (true, confirm) => CrossMsg::RetainSet(message.clone(), confirm),
                (false, Some(confirm)) => CrossMsg::DurablePublish { message: message.clone(), confirm },
                (false, None) => CrossMsg::Publish(message.clone()),
            };
            self.send(shard, msg);
        }
    }

    /// A dialling node's new route, ahead of etcd's watch: every shard is told, and the
    /// frame is confirmed once all acknowledged.
    fn link_route(&mut self, link: &(String, u64), seq: u64, filter: &str) {
        let state = self.in_links.entry(link.clone()).or_default();
        if seq < state.next_expected {
            if !state.waiting.contains_key(&seq) {
                state.replies.push_back(Frame::Confirmed { seq });
            }
            return;
        }
        state.next_expected = seq + 1;
        let Ok(filter) = TopicFilter::new(filter.to_string().into_bytes()) else {
            tracing::warn!(node = %link.0, filter, "cluster: a route with an invalid filter, refused");
            state.replies.push_back(Frame::Refused { seq });
            return;
        };
        self.remote_route(&link.0, filter.clone(), true);
        let token = self.token();
        self.inbound.insert(token, Inbound { link: link.clone(), seq, remaining: self.shards });
        if let Some(state) = self.in_links.get_mut(link) {
            state.waiting.insert(seq, token);
        }
        for shard in 0..self.shards {
            self.send(
                shard,
                CrossMsg::Interest { from: self.index, filter: filter.clone(), add: true, token },
            );
        }
    }

    // ---- the control plane ----

    fn node_id(&mut self, name: &str) -> NodeId {
        if let Some(id) = self.by_name.get(name) {
            return *id;
        }
        let id = self.nodes.len() as NodeId;
        self.nodes.push(Node { name: name.to_string(), addr: None, live: false, out: OutLink::default() });
        self.by_name.insert(name.to_string(), id);
        id
    }

    pub fn on_control(&mut self, event: ControlEvent) {
        match event {
            ControlEvent::Snapshot { nodes, routes } => {
                let live: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
                let gone: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.live && !live.contains(&n.name))
                    .map(|n| n.name.clone())
                    .collect();
                for node in gone {
                    self.node_down(&node);
                }
                for (node, addr) in nodes {
                    self.node_up(&node, addr);
                }
                let known: Vec<(TopicFilter, NodeId)> =
                    self.remote.iter().map(|(f, n, _)| (f.clone(), *n)).collect();
                for (filter, node) in known {
                    let name = self.nodes[node as usize].name.clone();
                    if !routes.iter().any(|(n, f)| *n == name && *f == filter) {
                        self.remote_route(&name, filter, false);
                    }
                }
                for (node, filter) in routes {
                    self.remote_route(&node, filter, true);
                }
                self.loaded = true;
            }
            ControlEvent::NodeUp { node, addr } => self.node_up(&node, addr),
            ControlEvent::NodeDown { node } => self.node_down(&node),
            ControlEvent::Route { node, filter, add } => self.remote_route(&node, filter, add),
            ControlEvent::Fenced(fenced) => {
                if fenced {
                    for shard in 0..self.shards {
                        self.send(shard, CrossMsg::Fence);
                    }
                }
            }
            ControlEvent::Committed(filter) => self.route_committed(filter),
        }
    }

    fn node_up(&mut self, name: &str, addr: SocketAddr) {
        if name == self.node {
            return;
        }
        let id = self.node_id(name);
        let node = &mut self.nodes[id as usize];
        node.live = true;
        node.addr = Some(addr);
    }

    /// A node's lease is gone: its routes go, and what waited for its confirmation is
    /// answered as if it had no subscriber (it serves nobody now; its persistent sessions
    /// are not replicated, see docs/CLUSTER.md).
    fn node_down(&mut self, name: &str) {
        let Some(&id) = self.by_name.get(name) else { return };
        let routes: Vec<TopicFilter> =
            self.remote.iter().filter(|(_, n, _)| **n == id).map(|(f, _, _)| f.clone()).collect();
        for filter in routes {
            self.remote_route(name, filter, false);
        }
        let node = &mut self.nodes[id as usize];
        node.live = false;
        let frames = std::mem::take(&mut node.out.frames);
        node.out.bytes = 0;
        let waiting: Vec<u64> = frames.values().filter_map(|o| o.origin).collect();
        if !waiting.is_empty() {
            tracing::warn!(
                node = name,
                messages = waiting.len(),
                "node gone before confirming: not waited for"
            );
        }
        for origin in waiting {
            self.origin_answered(origin, true);
        }
        self.in_links.retain(|(n, _), _| n != name);
    }

    fn remote_route(&mut self, name: &str, filter: TopicFilter, add: bool) {
        if name == self.node {
            return;
        }
        let id = self.node_id(name);
        let changed = if add {
            self.remote.insert(&filter, id, ()).is_none()
        } else {
            self.remote.remove(&filter, &id).is_some()
        };
        if !changed {
            return;
        }
        let count = self.remote_count.entry(filter.clone()).or_insert(0);
        let announce = if add {
            *count += 1;
            *count == 1
        } else {
            *count -= 1;
            *count == 0
        };
        if *count == 0 {
            self.remote_count.remove(&filter);
        }
        if announce {
            for shard in 0..self.shards {
                let msg = CrossMsg::Interest { from: self.index, filter: filter.clone(), add, token: 0 };
                self.send(shard, msg);
            }
        }
    }

    /// Said once at start: every shard knows the other nodes' routes and that publishes
    /// forwarded here wait for confirmation, then that the bridge is ready.
    pub fn announce_ready(&mut self) {
        for shard in 0..self.shards {
            self.send(shard, CrossMsg::Durable { from: self.index, present: true, token: 0 });
            self.send(shard, CrossMsg::Ready);
        }
    }
}

fn needs_confirm(frame: &Frame) -> bool {
    match frame {
        Frame::Retain { .. } | Frame::Route { .. } => true,
        Frame::Publish { message, .. } => message.qos != QoS::AtMostOnce,
        _ => false,
    }
}

fn frame_size(frame: &Frame) -> usize {
    match frame {
        Frame::Publish { message, .. } | Frame::Retain { message, .. } => message.size(),
        _ => 0,
    }
}
