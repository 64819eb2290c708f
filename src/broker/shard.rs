//! A `Shard` owns one core's share of the broker: the sessions whose client identifiers
//! hash to it, their subscriptions, its partition of the retained messages, and what it
//! knows of the other shards' interests. It is mutated only by tasks of its own executor;
//! other cores reach it only through [`CrossMsg`]s.
//!
//! Invariants:
//! - `by_client[id]` names an entry of `sessions` whose `client_id` is `id`.
//! - A (filter, session) pair is in `subscriptions` iff that session lists the filter.
//! - Every peer has been told (`Interest { add: true }`) of exactly the filters with at
//!   least one local subscriber; `interest` holds, per peer, the filters it told us of.
//! - `conns` holds every live connection; a session's `conn` is one of them.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::{Bytes, BytesMut};

use super::connection::{self, ConnHandle, ConnId};
use super::mesh::{CrossMsg, MAX_BACKLOG};
use super::message::Message;
use super::notify::{Event, Notify};
use super::placement;
use super::retained::{MemoryRetained, RetainedCursor, RetainedStore, RETAINED_PAGE};
use super::session::{Delivery, Session, SessionId, SessionLimits, Subscription};
use super::store::{MemoryStore, SessionStore};
use super::Global;
use crate::codec::{self, Connect, Packet, PacketId, Property, ProtocolVersion, QoS, ReasonCode};
use crate::config::Config;
use crate::topic::{SubscriptionTree, TopicFilter, TopicName};

pub type ShardRef = Rc<RefCell<Shard>>;

/// Counters of one shard, summed across shards for `$SYS` and logs.
#[derive(Debug, Default, Clone)]
pub struct ShardStats {
    pub messages_received: u64,
    pub messages_sent: u64,
    pub messages_queued: u64,
    pub messages_dropped: u64,
    pub bytes_received: u64,
    pub forwarded: u64,
    pub retained_refused: u64,
}

/// What happens to a will when its connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillAction {
    /// Normal DISCONNECT: the will is discarded (MQTT-3.1.2-10).
    Discard,
    /// Any other end: the will is published, after its delay (MQTT-3.1.2-8).
    Publish,
}

pub struct Shard {
    pub id: usize,
    pub shard_count: usize,
    pub config: Rc<Config>,
    pub global: Arc<Global>,
    pub conns: AHashMap<ConnId, Rc<ConnHandle>>,
    pub sessions: AHashMap<SessionId, Session>,
    by_client: AHashMap<String, SessionId>,
    subscriptions: SubscriptionTree<SessionId, Subscription>,
    /// Filters other shards have subscribers on; the key is the peer's shard index.
    interest: SubscriptionTree<usize, ()>,
    retained: Box<dyn RetainedStore>,
    store: Box<dyn SessionStore>,
    limits: SessionLimits,
    /// Per peer: messages waiting for the sender task.
    pub mesh_outbox: Vec<Vec<CrossMsg>>,
    pub mesh_wake: Vec<Rc<Notify>>,
    /// Fired whenever a sender task moved a batch: publishers paused on backlog retry.
    pub mesh_drained: Rc<Event>,
    pending_interest: AHashMap<u64, Rc<PendingAcks>>,
    next_id: u64,
    /// Reused per publish to gather matching subscribers without allocating.
    scratch: Vec<(SessionId, Subscription)>,
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
        let limits = SessionLimits {
            max_inflight: config.max_inflight,
            max_queued_messages: config.max_queued_messages,
            max_queued_bytes: config.max_queued_bytes,
            queue_qos0: config.queue_qos0,
            policy: config.queue_full_policy,
        };
        // Each shard holds its share of the retained bound.
        let retained_max = config.max_retained_messages.div_ceil(shard_count).max(1);
        Shard {
            id,
            shard_count,
            config,
            global,
            conns: AHashMap::new(),
            sessions: AHashMap::new(),
            by_client: AHashMap::new(),
            subscriptions: SubscriptionTree::new(),
            interest: SubscriptionTree::new(),
            retained: Box::new(MemoryRetained::new(retained_max)),
            store: Box::new(MemoryStore),
            limits,
            mesh_outbox: (0..shard_count).map(|_| Vec::new()).collect(),
            mesh_wake: (0..shard_count).map(|_| Rc::new(Notify::default())).collect(),
            mesh_drained: Rc::new(Event::default()),
            pending_interest: AHashMap::new(),
            next_id: 1,
            scratch: Vec::new(),
            stats: ShardStats::default(),
        }
    }

    /// A fresh identifier for connections, sessions and tokens.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
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

    /// Whether CONNECT resumes an existing session (CONNACK's session-present flag).
    pub fn session_present(&self, connect: &Connect) -> bool {
        !connect.clean_start && self.by_client.contains_key(&connect.client_id)
    }

    /// Attaches a new connection to its session, creating, resuming or replacing it.
    /// Returns the session and whether it was present (CONNACK's session-present flag).
    pub fn connect(&mut self, conn: Rc<ConnHandle>, connect: &Connect) -> (SessionId, bool) {
        let now = Instant::now();
        let existing = self.by_client.get(&connect.client_id).copied();
        if let Some(sid) = existing {
            let old_conn = self.sessions.get(&sid).and_then(|s| s.conn.clone());
            if let Some(old) = old_conn {
                tracing::info!(client_id = %old.client_id, "session taken over by a new connection");
                old.close(Some(ReasonCode::SessionTakenOver));
                self.conns.remove(&old.id);
                self.connection_ended(sid, WillAction::Publish, now);
            }
        }
        let resumed = match existing {
            Some(sid) if !connect.clean_start && self.sessions.contains_key(&sid) => Some(sid),
            Some(sid) => {
                self.end_session(sid);
                None
            }
            None => None,
        };
        let sid = match resumed {
            Some(sid) => sid,
            None => {
                let sid = self.next_id();
                let session = Session::new(sid, connect.client_id.clone(), connect.protocol, self.limits);
                self.sessions.insert(sid, session);
                self.by_client.insert(connect.client_id.clone(), sid);
                sid
            }
        };
        let receive_maximum = connect.properties.receive_maximum().map_or(usize::from(u16::MAX), usize::from);
        let expiry = match connect.protocol {
            ProtocolVersion::V5 => connect.properties.session_expiry_interval().unwrap_or(0),
            // 3.1.1 persistent sessions last until a clean session replaces them.
            _ if connect.clean_start => 0,
            _ => u32::MAX,
        };
        conn.session.set(sid);
        self.conns.insert(conn.id, conn.clone());
        if let Some(session) = self.sessions.get_mut(&sid) {
            session.expiry_interval = expiry;
            session.will = connect.will.clone();
            if session.is_persistent() {
                self.store.session_opened(&session.client_id, expiry, session.will.as_ref());
            }
            session.attach(conn, receive_maximum);
        }
        self.continue_retained(sid);
        (sid, resumed.is_some())
    }

    /// A connection ended (any cause). Applies its will and its session's expiry, unless
    /// the connection had already been replaced.
    pub fn disconnected(&mut self, conn: &ConnHandle, will: WillAction) {
        if self.conns.remove(&conn.id).is_none() {
            return;
        }
        self.connection_ended(conn.session.get(), will, Instant::now());
    }

    fn connection_ended(&mut self, sid: SessionId, will: WillAction, now: Instant) {
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        session.detach();
        if will == WillAction::Discard {
            session.will = None;
        }
        if let Some(w) = &session.will {
            let delay = w.properties.will_delay_interval().unwrap_or(0);
            session.will_at = Some(now + Duration::from_secs(u64::from(delay)));
        }
        match session.expiry_interval {
            0 => {
                self.end_session(sid);
                return;
            }
            u32::MAX => session.expires_at = None,
            secs => session.expires_at = Some(now + Duration::from_secs(u64::from(secs))),
        }
        self.fire_due(sid, now);
    }

    /// Publishes a will that is due and ends a session that expired.
    fn fire_due(&mut self, sid: SessionId, now: Instant) {
        let Some(session) = self.sessions.get(&sid) else { return };
        if session.conn.is_none() && session.expires_at.is_some_and(|at| at <= now) {
            self.end_session(sid);
            return;
        }
        if session.will_at.is_some_and(|at| at <= now) {
            self.publish_will(sid);
        }
    }

    fn publish_will(&mut self, sid: SessionId) {
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        session.will_at = None;
        let Some(will) = session.will.take() else { return };
        let properties = codec::Properties(
            will.properties.0.into_iter().filter(|p| !matches!(p, Property::WillDelayInterval(_))).collect(),
        );
        let message = Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties,
        };
        tracing::debug!(client_id = %session.client_id, topic = %message.topic, "publishing will");
        self.publish(None, message);
    }

    /// Ends a session: its pending will is published, its subscriptions removed.
    pub fn end_session(&mut self, sid: SessionId) {
        if self.sessions.get(&sid).is_some_and(|s| s.will_at.is_some()) {
            self.publish_will(sid);
        }
        let Some(session) = self.sessions.remove(&sid) else { return };
        if session.is_persistent() {
            self.store.session_ended(&session.client_id);
        }
        if self.by_client.get(&session.client_id) == Some(&sid) {
            self.by_client.remove(&session.client_id);
        }
        for filter in session.subscriptions.keys() {
            self.remove_subscription(sid, filter);
        }
    }

    /// Adds or replaces a subscription. Returns the acknowledgements to wait for before
    /// SUBACK (when this shard had no subscriber on the filter) and whether it existed.
    pub fn subscribe(
        &mut self,
        sid: SessionId,
        filter: TopicFilter,
        subscription: Subscription,
    ) -> (Option<Rc<PendingAcks>>, bool) {
        let existed = match self.sessions.get_mut(&sid) {
            Some(session) => {
                if session.is_persistent() {
                    self.store.subscribed(&session.client_id, &filter, &subscription);
                }
                session.subscriptions.insert(filter.clone(), subscription).is_some()
            }
            None => return (None, false),
        };
        let first = self.subscriptions.subscriber_count(&filter) == 0;
        self.subscriptions.insert(&filter, sid, subscription);
        if !first || self.shard_count == 1 {
            return (None, existed);
        }
        let token = self.next_id();
        let pending = Rc::new(PendingAcks::default());
        pending.remaining.set(self.shard_count - 1);
        self.pending_interest.insert(token, pending.clone());
        for peer in self.peers() {
            let msg = CrossMsg::Interest { from: self.id, filter: filter.clone(), add: true, token };
            self.send_to(peer, msg);
        }
        (Some(pending), existed)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&mut self, sid: SessionId, filter: &TopicFilter) -> bool {
        let Some(session) = self.sessions.get_mut(&sid) else { return false };
        let existed = session.subscriptions.remove(filter).is_some();
        if existed && session.is_persistent() {
            self.store.unsubscribed(&session.client_id, filter);
        }
        if existed {
            self.remove_subscription(sid, filter);
        }
        existed
    }

    fn remove_subscription(&mut self, sid: SessionId, filter: &TopicFilter) {
        if self.subscriptions.remove(filter, &sid).is_none() {
            return;
        }
        if self.subscriptions.subscriber_count(filter) == 0 {
            for peer in self.peers() {
                let msg = CrossMsg::Interest { from: self.id, filter: filter.clone(), add: false, token: 0 };
                self.send_to(peer, msg);
            }
        }
    }

    /// Routes a message published on this shard (by a client, or a will): stored if
    /// retained, delivered to local subscribers, and sent once to every peer shard with a
    /// matching subscriber.
    pub fn publish(&mut self, from: Option<SessionId>, message: Message) {
        self.stats.messages_received += 1;
        self.stats.bytes_received += message.payload.len() as u64;
        if message.retain {
            let owner = placement::owner(message.topic.as_str(), self.shard_count);
            if owner == self.id {
                self.store_retained(message.clone());
            } else {
                self.send_to(owner, CrossMsg::RetainSet(message.clone()));
            }
        }
        let mut peers: u128 = 0;
        self.interest.for_each_match(&message.topic, |_, peer, _| {
            peers |= 1 << *peer;
        });
        while peers != 0 {
            let peer = peers.trailing_zeros() as usize;
            peers &= peers - 1;
            self.stats.forwarded += 1;
            self.send_to(peer, CrossMsg::Publish(message.clone()));
        }
        self.deliver_local(from, &message);
    }

    fn store_retained(&mut self, message: Message) {
        if let Err(err) = self.retained.set(message) {
            self.stats.retained_refused += 1;
            tracing::warn!(%err, "retained message not stored (--max-retained-messages)");
        }
    }

    /// Delivers to this shard's subscribers; each session gets one copy, at the highest
    /// QoS of its matching subscriptions (MQTT-3.3.4-2).
    fn deliver_local(&mut self, from: Option<SessionId>, message: &Message) {
        let mut matches = std::mem::take(&mut self.scratch);
        self.subscriptions.for_each_match(&message.topic, |_, sid, sub| {
            matches.push((*sid, *sub));
        });
        if matches.len() > 1 {
            matches.sort_unstable_by_key(|(sid, sub)| (*sid, std::cmp::Reverse(sub.options.qos)));
            matches.dedup_by_key(|(sid, _)| *sid);
        }
        let mut encoded = EncodedCache::default();
        for (sid, sub) in matches.drain(..) {
            if sub.options.no_local && from == Some(sid) {
                continue;
            }
            let Some(session) = self.sessions.get_mut(&sid) else { continue };
            let qos = message.qos.min(sub.options.qos);
            let retain = sub.options.retain_as_published && message.retain;
            let delivery = match (&session.conn, qos) {
                (Some(conn), QoS::AtMostOnce) => {
                    match encoded.get(conn.version, retain, message, conn.max_packet_size) {
                        Some(bytes) => session.deliver_encoded_qos0(bytes),
                        None => Delivery::Dropped,
                    }
                }
                _ => {
                    let delivery = session.deliver(message, qos, retain);
                    if qos != QoS::AtMostOnce && delivery != Delivery::Dropped && session.is_persistent() {
                        self.store.message_accepted(&session.client_id, message, qos);
                    }
                    delivery
                }
            };
            match delivery {
                Delivery::Sent => self.stats.messages_sent += 1,
                Delivery::Queued => self.stats.messages_queued += 1,
                Delivery::Dropped => self.stats.messages_dropped += 1,
            }
        }
        self.scratch = matches;
    }

    /// Starts sending the retained messages matching a new subscription, from every shard.
    pub fn request_retained(&mut self, sid: SessionId, filter: TopicFilter, qos: QoS) {
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        for shard in 0..self.shard_count {
            session.retained_cursors.push(RetainedCursor { shard, filter: filter.clone(), qos, after: None });
        }
        self.continue_retained(sid);
    }

    /// Asks for the next page of each pending retained query while the session has room.
    pub fn continue_retained(&mut self, sid: SessionId) {
        loop {
            let Some(session) = self.sessions.get_mut(&sid) else { return };
            if session.retained_cursors.is_empty() || session.conn.is_none() || !session.has_room() {
                return;
            }
            let Some(cursor) = session.retained_cursors.pop() else { return };
            if cursor.shard == self.id {
                let mut messages = Vec::new();
                let next = self.retained.matching(
                    &cursor.filter,
                    cursor.after.as_ref(),
                    RETAINED_PAGE,
                    &mut messages,
                );
                self.deliver_retained(sid, cursor, messages, next);
            } else {
                let msg = CrossMsg::RetainQuery { from: self.id, session: sid, cursor: cursor.clone() };
                self.send_to(cursor.shard, msg);
                // The reply continues the query; one page in flight per cursor.
            }
        }
    }

    fn deliver_retained(
        &mut self,
        sid: SessionId,
        mut cursor: RetainedCursor,
        messages: Vec<Message>,
        next: Option<TopicName>,
    ) {
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        for message in &messages {
            let qos = message.qos.min(cursor.qos);
            let delivery = session.deliver(message, qos, true);
            if qos != QoS::AtMostOnce && delivery != Delivery::Dropped && session.is_persistent() {
                self.store.message_accepted(&session.client_id, message, qos);
            }
            match delivery {
                Delivery::Sent => self.stats.messages_sent += 1,
                Delivery::Queued => self.stats.messages_queued += 1,
                Delivery::Dropped => self.stats.messages_dropped += 1,
            }
        }
        if next.is_some() {
            cursor.after = next;
            session.retained_cursors.push(cursor);
        }
    }

    pub fn on_puback(&mut self, sid: SessionId, packet_id: PacketId) {
        if let Some(session) = self.sessions.get_mut(&sid) {
            if session.on_puback(packet_id) && session.is_persistent() {
                self.store.message_completed(&session.client_id, packet_id);
            }
        }
        self.continue_retained(sid);
    }

    pub fn on_pubrec(&mut self, sid: SessionId, packet_id: PacketId, reason: ReasonCode) {
        if let Some(session) = self.sessions.get_mut(&sid) {
            session.on_pubrec(packet_id, reason);
        }
    }

    pub fn on_pubcomp(&mut self, sid: SessionId, packet_id: PacketId) {
        if let Some(session) = self.sessions.get_mut(&sid) {
            if session.on_pubcomp(packet_id) && session.is_persistent() {
                self.store.message_completed(&session.client_id, packet_id);
            }
        }
        self.continue_retained(sid);
    }

    /// Keep-alive, delayed wills and session expiry. Called about once a second.
    pub fn tick(&mut self, now: Instant) {
        for conn in self.conns.values() {
            if conn.keep_alive_expired(now) {
                tracing::info!(client_id = %conn.client_id, "keep-alive timeout");
                conn.close(Some(ReasonCode::KeepAliveTimeout));
            }
        }
        let due: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| {
                s.conn.is_none()
                    && (s.will_at.is_some_and(|at| at <= now) || s.expires_at.is_some_and(|at| at <= now))
            })
            .map(|s| s.id)
            .collect();
        for sid in due {
            self.fire_due(sid, now);
        }
        // Retained pages wait for room; room appears as connections drain.
        let waiting: Vec<SessionId> =
            self.sessions.values().filter(|s| !s.retained_cursors.is_empty()).map(|s| s.id).collect();
        for sid in waiting {
            self.continue_retained(sid);
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

/// One encoding of a QoS 0 publish per (protocol family, retain flag), reused for every
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
        message: &Message,
        max: usize,
    ) -> Option<Bytes> {
        let slot = (version.is_v5() as usize) * 2 + retain as usize;
        let bytes = match &self.entries[slot] {
            Some(bytes) => bytes.clone(),
            None => {
                let packet = Packet::Publish(message.to_publish(QoS::AtMostOnce, retain, false, None));
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

/// Applies one message from a peer shard.
pub fn handle_cross(shard: &ShardRef, msg: CrossMsg) {
    match msg {
        CrossMsg::Publish(message) => shard.borrow_mut().deliver_local(None, &message),
        CrossMsg::RetainSet(message) => shard.borrow_mut().store_retained(message),
        CrossMsg::RetainQuery { from, session, cursor } => {
            let mut s = shard.borrow_mut();
            let mut messages = Vec::new();
            let next =
                s.retained.matching(&cursor.filter, cursor.after.as_ref(), RETAINED_PAGE, &mut messages);
            s.send_to(from, CrossMsg::RetainReply { session, cursor, messages, next });
        }
        CrossMsg::RetainReply { session, cursor, messages, next } => {
            let mut s = shard.borrow_mut();
            s.deliver_retained(session, cursor, messages, next);
            s.continue_retained(session);
        }
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
