//! A `Shard` owns one core's share of the broker: the connections hashed to it, their
//! subscriptions, and what it knows of the other shards' interests. It is mutated only by
//! tasks of its own executor; other cores reach it only through [`CrossMsg`]s.
//!
//! Invariants:
//! - `clients[id]` names a live entry of `conns` whose `client_id` is `id`.
//! - A filter is in `subscriptions` iff some connection in `conns` lists it in its
//!   `filters`; every peer has been told (`Interest { add: true }`) of exactly the
//!   filters with at least one local subscriber.
//! - `interest` holds, per peer shard, the filters that peer has subscribers on.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use ahash::AHashMap;
use bytes::{Bytes, BytesMut};

use super::connection::{self, ConnHandle, ConnId};
use super::mesh::{CrossMsg, MAX_BACKLOG};
use super::notify::{Event, Notify};
use super::Global;
use crate::codec::{self, Packet, ProtocolVersion, Publish, QoS, ReasonCode, SubscriptionOptions};
use crate::config::Config;
use crate::topic::{SubscriptionTree, TopicFilter};

pub type ShardRef = Rc<RefCell<Shard>>;

/// Counters of one shard, summed across shards for `$SYS` and logs.
#[derive(Debug, Default, Clone)]
pub struct ShardStats {
    pub messages_received: u64,
    pub messages_sent: u64,
    pub messages_dropped: u64,
    pub bytes_received: u64,
    pub forwarded: u64,
}

pub struct Shard {
    pub id: usize,
    pub shard_count: usize,
    pub config: Rc<Config>,
    pub global: Arc<Global>,
    pub conns: AHashMap<ConnId, Rc<ConnHandle>>,
    pub clients: AHashMap<String, ConnId>,
    subscriptions: SubscriptionTree<ConnId, SubscriptionOptions>,
    /// Filters other shards have subscribers on; the key is the peer's shard index.
    interest: SubscriptionTree<usize, ()>,
    /// Per peer: messages waiting for the sender task.
    pub mesh_outbox: Vec<Vec<CrossMsg>>,
    pub mesh_wake: Vec<Rc<Notify>>,
    /// Fired whenever a sender task moved a batch: publishers paused on backlog retry.
    pub mesh_drained: Rc<Event>,
    pending_interest: AHashMap<u64, Rc<PendingAcks>>,
    next_conn: ConnId,
    next_token: u64,
    /// Reused per publish to gather matching subscribers without allocating.
    scratch: Vec<(ConnId, SubscriptionOptions)>,
    pub stats: ShardStats,
}

/// Interest acknowledgements a SUBSCRIBE waits for.
#[derive(Default)]
pub struct PendingAcks {
    remaining: std::cell::Cell<usize>,
    done: Notify,
}

impl PendingAcks {
    pub async fn wait(&self) {
        while self.remaining.get() > 0 {
            self.done.notified().await;
        }
    }
}

impl Shard {
    pub fn new(id: usize, shard_count: usize, config: Rc<Config>, global: Arc<Global>) -> Shard {
        Shard {
            id,
            shard_count,
            config,
            global,
            conns: AHashMap::new(),
            clients: AHashMap::new(),
            subscriptions: SubscriptionTree::new(),
            interest: SubscriptionTree::new(),
            mesh_outbox: (0..shard_count).map(|_| Vec::new()).collect(),
            mesh_wake: (0..shard_count).map(|_| Rc::new(Notify::default())).collect(),
            mesh_drained: Rc::new(Event::default()),
            pending_interest: AHashMap::new(),
            next_conn: 1,
            next_token: 1,
            scratch: Vec::new(),
            stats: ShardStats::default(),
        }
    }

    pub fn next_conn_id(&mut self) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        id
    }

    /// Every other shard's index.
    fn peers(&self) -> impl Iterator<Item = usize> {
        let me = self.id;
        (0..self.shard_count).filter(move |p| *p != me)
    }

    fn send_to(&mut self, peer: usize, msg: CrossMsg) {
        self.mesh_outbox[peer].push(msg);
        self.mesh_wake[peer].notify();
    }

    /// Whether publishers on this shard should pause until a peer drains.
    pub fn mesh_backlogged(&self) -> bool {
        self.mesh_outbox.iter().any(|q| q.len() >= MAX_BACKLOG)
    }

    /// Registers a connection, taking over (closing) any live one with its client id.
    pub fn register(&mut self, conn: Rc<ConnHandle>) {
        if let Some(old) = self.clients.insert(conn.client_id.clone(), conn.id) {
            if let Some(old) = self.conns.get(&old).cloned() {
                tracing::info!(client_id = %old.client_id, "session taken over by a new connection");
                old.close(Some(ReasonCode::SessionTakenOver));
                self.drop_subscriptions(&old);
            }
        }
        self.conns.insert(conn.id, conn);
    }

    /// Forgets a connection that ended. Safe to call for one already taken over.
    pub fn deregister(&mut self, conn: &ConnHandle) {
        self.drop_subscriptions(conn);
        self.conns.remove(&conn.id);
        if self.clients.get(&conn.client_id) == Some(&conn.id) {
            self.clients.remove(&conn.client_id);
        }
    }

    fn drop_subscriptions(&mut self, conn: &ConnHandle) {
        let filters: Vec<TopicFilter> = conn.filters.borrow_mut().drain().map(|(f, _)| f).collect();
        for filter in filters {
            self.unsubscribe(conn.id, &filter);
        }
    }

    /// Adds a subscription. Returns the acknowledgements to wait for before SUBACK when
    /// this is the shard's first subscriber on the filter.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        filter: TopicFilter,
        options: SubscriptionOptions,
    ) -> Option<Rc<PendingAcks>> {
        let first = self.subscriptions.subscriber_count(&filter) == 0;
        self.subscriptions.insert(&filter, conn, options);
        if !first || self.shard_count == 1 {
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        let pending = Rc::new(PendingAcks::default());
        pending.remaining.set(self.shard_count - 1);
        self.pending_interest.insert(token, pending.clone());
        for peer in self.peers() {
            let msg = CrossMsg::Interest { from: self.id, filter: filter.clone(), add: true, token };
            self.send_to(peer, msg);
        }
        Some(pending)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&mut self, conn: ConnId, filter: &TopicFilter) -> bool {
        if self.subscriptions.remove(filter, &conn).is_none() {
            return false;
        }
        if self.subscriptions.subscriber_count(filter) == 0 {
            for peer in self.peers() {
                let msg = CrossMsg::Interest { from: self.id, filter: filter.clone(), add: false, token: 0 };
                self.send_to(peer, msg);
            }
        }
        true
    }

    /// Routes a publish received from a client of this shard: to local subscribers, and
    /// once to every peer shard with a matching subscriber.
    pub fn publish(&mut self, from: ConnId, publish: &Publish) {
        self.stats.messages_received += 1;
        self.stats.bytes_received += publish.payload.len() as u64;
        let mut peers: u128 = 0;
        self.interest.for_each_match(&publish.topic, |_, peer, _| {
            peers |= 1 << *peer;
        });
        while peers != 0 {
            let peer = peers.trailing_zeros() as usize;
            peers &= peers - 1;
            self.stats.forwarded += 1;
            self.send_to(peer, CrossMsg::Publish(publish.clone()));
        }
        self.deliver_local(Some(from), publish);
    }

    /// Delivers to this shard's subscribers; each client gets one copy, at the highest
    /// QoS of its matching subscriptions.
    fn deliver_local(&mut self, from: Option<ConnId>, publish: &Publish) {
        let mut matches = std::mem::take(&mut self.scratch);
        self.subscriptions.for_each_match(&publish.topic, |_, conn, options| {
            matches.push((*conn, *options));
        });
        if matches.len() > 1 {
            matches.sort_unstable_by_key(|(conn, options)| (*conn, std::cmp::Reverse(options.qos)));
            matches.dedup_by_key(|(conn, _)| *conn);
        }
        let mut encoded = EncodedCache::default();
        for (conn_id, options) in matches.drain(..) {
            if options.no_local && from == Some(conn_id) {
                continue;
            }
            let Some(conn) = self.conns.get(&conn_id) else {
                continue;
            };
            // QoS 1/2 delivery arrives with sessions; until then subscriptions are granted QoS 0.
            let retain = options.retain_as_published && publish.retain;
            let bytes = encoded.get(conn.version, retain, publish, conn.max_packet_size);
            if bytes.is_some_and(|bytes| conn.enqueue(bytes)) {
                self.stats.messages_sent += 1;
            } else {
                self.stats.messages_dropped += 1;
            }
        }
        self.scratch = matches;
    }

    pub fn next_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Closes keep-alive offenders. Called about once a second.
    pub fn check_keep_alive(&mut self, now: Instant) {
        for conn in self.conns.values() {
            if conn.keep_alive_expired(now) {
                tracing::info!(client_id = %conn.client_id, "keep-alive timeout");
                conn.close(Some(ReasonCode::KeepAliveTimeout));
            }
        }
    }

    pub fn close_all(&mut self, reason: ReasonCode) {
        for conn in self.conns.values() {
            conn.close(Some(reason));
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

/// One encoding of a publish per (protocol family, retain flag), reused for every
/// subscriber that wants the same bytes: fan-out encodes once.
#[derive(Default)]
struct EncodedCache {
    entries: [Option<Bytes>; 4],
}

impl EncodedCache {
    fn get(
        &mut self,
        version: ProtocolVersion,
        retain: bool,
        publish: &Publish,
        max: usize,
    ) -> Option<Bytes> {
        let slot = (version.is_v5() as usize) * 2 + retain as usize;
        let bytes = match &self.entries[slot] {
            Some(bytes) => bytes.clone(),
            None => {
                let packet = Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtMostOnce,
                    retain,
                    topic: publish.topic.clone(),
                    packet_id: None,
                    properties: outgoing_properties(publish, version),
                    payload: publish.payload.clone(),
                });
                let mut buf = BytesMut::with_capacity(codec::encoded_size(&packet, version));
                if let Err(err) = codec::encode(&packet, version, &mut buf) {
                    tracing::debug!(%err, "publish not encodable");
                    return None;
                }
                let bytes = buf.freeze();
                self.entries[slot] = Some(bytes.clone());
                bytes
            }
        };
        // A v5 client's Maximum Packet Size: the message is skipped for it (MQTT-3.1.2-25).
        (bytes.len() <= max).then_some(bytes)
    }
}

/// Properties forwarded to subscribers: everything the publisher sent except the topic
/// alias, which is per connection (MQTT-3.3.2-7... aliases are not forwarded).
fn outgoing_properties(publish: &Publish, version: ProtocolVersion) -> codec::Properties {
    if !version.is_v5() || publish.properties.is_empty() {
        return codec::Properties::default();
    }
    codec::Properties(
        publish
            .properties
            .0
            .iter()
            .filter(|p| {
                !matches!(p, codec::Property::TopicAlias(_) | codec::Property::SubscriptionIdentifier(_))
            })
            .cloned()
            .collect(),
    )
}

/// Applies one message from a peer shard.
pub fn handle_cross(shard: &ShardRef, msg: CrossMsg) {
    match msg {
        CrossMsg::Publish(publish) => shard.borrow_mut().deliver_local(None, &publish),
        CrossMsg::Interest { from, filter, add, token } => {
            let mut s = shard.borrow_mut();
            if add {
                s.interest.insert(&filter, from, ());
            } else {
                s.interest.remove(&filter, &from);
            }
            if token != 0 {
                s.send_to(from, CrossMsg::InterestAck { token });
            }
        }
        CrossMsg::InterestAck { token } => {
            let mut s = shard.borrow_mut();
            if let Some(pending) = s.pending_interest.get(&token).cloned() {
                let left = pending.remaining.get().saturating_sub(1);
                pending.remaining.set(left);
                if left == 0 {
                    s.pending_interest.remove(&token);
                    pending.done.notify();
                }
            }
        }
        CrossMsg::Handoff(handoff) => {
            let shard = shard.clone();
            glommio::spawn_local(connection::adopt(shard, handoff)).detach();
        }
    }
}
