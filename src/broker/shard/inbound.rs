//! What a client's packets do, once its connection decoded them: the shard layer's side
//! of a connection. The connection's reader (I/O only) hands every packet to
//! [`Inbound::handle`]; this turns it into calls on the shard and answers on the
//! connection's outbox.

use std::net::SocketAddr;
use std::rc::Rc;

use ahash::AHashMap;
use bytes::Bytes;

use super::{Published, ShardRef, WillAction};
use crate::broker::conn_handle::ConnHandle;
use crate::broker::cross::Confirm;
use crate::broker::message::Message;
use crate::broker::session::{SessionId, Subscription};
use crate::codec::{
    Disconnect, Packet, PacketId, Properties, PubAck, QoS, ReasonCode, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};
use crate::topic::{TopicFilter, TopicName};

/// How often a publisher paused for a peer that has not applied its messages looks again.
const MESH_RECHECK: std::time::Duration = std::time::Duration::from_millis(1);

/// Per-connection protocol state: what the shard layer keeps for a client between its
/// packets.
pub struct Inbound {
    pub shard: ShardRef,
    pub conn: Rc<ConnHandle>,
    pub session: SessionId,
    pub max_packet_size: usize,
    pub peer: SocketAddr,
    /// What happens to the will when the reader stops.
    pub will: WillAction,
    /// Topic aliases the client set (v5), at most `max_topic_alias`; allocated with the
    /// first.
    pub aliases: Option<Box<AHashMap<u16, TopicName>>>,
    pub max_topic_alias: u16,
    /// The Receive Maximum advertised to the client: QoS 2 publishes awaiting PUBREL.
    pub receive_maximum: usize,
    pub max_topic_levels: usize,
    pub max_session_expiry: u32,
    /// Size of the allocation `buf` is a view of: what a PUBLISH decoded from it pins.
    pub alloc: usize,
    /// A PUBLISH handled since the last read went to a peer shard: before reading more,
    /// the reader waits while a peer's queue is over its bound. Only such a reader: a
    /// subscriber whose acknowledgements went unread because a peer was backlogged would
    /// keep its own queue full, and that peer's backlog with it.
    pub forwarded: bool,
    /// Who the client is and the rules it is held to, on a listener with authentication.
    pub auth: Option<Rc<crate::auth::SessionAuth>>,
    /// PUBLISHes the ACL refused on this connection (the first is logged at info).
    pub denials: u64,
}

/// What the connection's reader does after a packet.
pub enum Flow {
    Continue,
    Stop,
    /// The PUBLISH just handled left these subscribers' queues over half their bound: the
    /// reader waits until they drained (back-pressure instead of drops), a QoS 0 one at
    /// most `--qos0-max-wait-ms`.
    Pressure {
        congested: Vec<SessionId>,
        qos0: bool,
    },
    /// A SUBSCRIBE, whose answer waits for the peers to know the subscription.
    Subscribe(Subscribe),
    /// A PUBLISH that would not fit a congested subscriber's queue: the reader waits until
    /// the congestion clears, then hands it to `publish` again.
    Full(Box<HeldPublish>),
}

/// A decoded PUBLISH waiting for room before it is routed.
pub struct HeldPublish {
    message: Message,
    qos: QoS,
    packet_id: Option<PacketId>,
}

impl HeldPublish {
    pub fn message(&self) -> &Message {
        &self.message
    }
}

impl Inbound {
    /// Pauses this publisher while a peer shard's queue is over its bound (in messages,
    /// bytes or time).
    pub async fn wait_for_mesh(&self) {
        loop {
            let (drained, held) = {
                let s = self.shard.borrow();
                if !s.mesh_backlogged() {
                    return;
                }
                (s.peers.drained.clone(), s.mesh_held())
            };
            if held {
                // Applied on the peer's core, which wakes nothing here: look again shortly.
                futures_lite::future::or(drained.wait(), glommio::timer::sleep(MESH_RECHECK)).await;
            } else {
                drained.wait().await;
            }
        }
    }

    /// Routes a client's PUBLISH and queues its acknowledgement. Returns whether a
    /// subscriber's queue is now over half its bound (the caller pauses), or the flow that
    /// ends the connection.
    fn route_publish(
        &mut self,
        message: Message,
        qos: QoS,
        packet_id: Option<PacketId>,
    ) -> Result<Vec<SessionId>, Flow> {
        let mut shard = self.shard.borrow_mut();
        // A congestion left by someone else's delivery (a peer's receiver, a will) is not
        // this publisher's to wait for.
        shard.clear_pressure_hit();
        let confirm = self.confirm(shard.id);
        match (qos, packet_id) {
            (QoS::AtMostOnce, _) => {
                shard.publish(Some(self.session), message, None);
            }
            (QoS::AtLeastOnce, Some(id)) => {
                // Acknowledged once every log it went to has it (acknowledge after append).
                let published = shard.publish(Some(self.session), message, Some(confirm));
                if published.failed {
                    // Not in the logs: no PUBACK, the connection is closing (refused).
                    return Err(Flow::Stop);
                }
                let puback = ack(id, self.delivery_reason(published.matched));
                self.conn.queue_ack(Packet::PubAck(puback), published.waits);
            }
            (QoS::ExactlyOnce, Some(id)) => {
                let (pending, duplicate) =
                    shard.sessions.get(&self.session).map_or((0, false), |s| s.qos2_pending(id.get()));
                // A resent duplicate takes no new slot of the Receive Maximum.
                if self.conn.version.is_v5() && !duplicate && pending >= self.receive_maximum {
                    drop(shard);
                    return Err(self.close_with(
                        ReasonCode::ReceiveMaximumExceeded,
                        "more QoS 2 publishes unacknowledged than the Receive Maximum",
                    ));
                }
                // Delivered once even if the client resends before PUBREL (method B).
                let before = shard.log_position();
                let first = shard
                    .sessions
                    .with_journal(&self.session, |s, journal| s.receive_qos2(id.get(), journal))
                    .unwrap_or(false);
                // A resent duplicate was accepted before: Success.
                let confirm = Confirm { qos2_packet_id: Some(id.get()), ..confirm };
                let published = match first {
                    true => shard.publish_after(Some(self.session), message, Some(confirm), before),
                    false => Published { matched: true, waits: 0, failed: false },
                };
                if published.failed {
                    // Not in the logs: no PUBREC, the identifier is released, the
                    // connection is closing (refused).
                    return Err(Flow::Stop);
                }
                let pubrec = ack(id, self.delivery_reason(published.matched));
                self.conn.queue_ack(Packet::PubRec(pubrec), published.waits);
            }
            _ => {
                drop(shard);
                return Err(self.protocol_error("QoS > 0 without a packet identifier"));
            }
        }
        let mut hit = shard.take_pressure_hit();
        // Its own session cannot drain while its client waits.
        hit.retain(|sid| *sid != self.session);
        Ok(hit)
    }

    /// Under `--queue-full-policy refuse`, a PUBLISH that would not fit a congested
    /// subscriber's queue is turned down instead of held: an MQTT 5 client's QoS 1/2 gets
    /// PUBACK/PUBREC 0x97 Quota exceeded, a QoS 0 one is dropped (counted). `None`: held
    /// (another policy, or an MQTT 3.1.1 QoS 1/2 publisher, which has no way to be told).
    fn refuse(&mut self, held: &HeldPublish) -> Option<Flow> {
        if !self.refused_when_full(held.qos) {
            return None;
        }
        let mut shard = self.shard.borrow_mut();
        let answer = match (held.qos, held.packet_id) {
            (QoS::AtMostOnce, _) => {
                shard.stats.messages_dropped += 1;
                return Some(Flow::Continue);
            }
            (qos, Some(id)) => {
                let mut answer = ack(id, ReasonCode::QuotaExceeded);
                answer.properties = self.conn.problem("a subscriber's queue is full");
                if qos == QoS::AtLeastOnce {
                    Packet::PubAck(answer)
                } else {
                    Packet::PubRec(answer)
                }
            }
            (_, None) => return None,
        };
        drop(shard);
        tracing::debug!(client_id = %self.conn.client_id, "PUBLISH refused: a subscriber's queue is full");
        // Behind the acknowledgements still waiting for the logs (MQTT-4.6.0-2 order).
        self.conn.queue_ack(answer, 0);
        Some(Flow::Continue)
    }

    /// A resent QoS 2 PUBLISH accepted before (awaiting PUBREL): it is answered, not routed
    /// again, so it neither waits for room nor is refused.
    fn resent_qos2(&self, held: &HeldPublish) -> bool {
        match (held.qos, held.packet_id) {
            (QoS::ExactlyOnce, Some(id)) => {
                self.shard.borrow().sessions.get(&self.session).is_some_and(|s| s.qos2_pending(id.get()).1)
            }
            _ => false,
        }
    }

    /// Whether this client's PUBLISH at `qos` is turned down rather than held when it would
    /// not fit (`--queue-full-policy refuse`: QoS 0, and QoS 1/2 from an MQTT 5 client); such
    /// a publisher is never paused for a congested queue either.
    fn refused_when_full(&self, qos: QoS) -> bool {
        self.shard.borrow().sessions.limits.policy == crate::config::QueueFullPolicy::Refuse
            && (qos == QoS::AtMostOnce || self.conn.version.is_v5())
    }

    /// A PUBLISH the ACL refuses: counted and logged (the first on a connection at info),
    /// then dropped like one to `$SYS`, or the connection closed with
    /// `--acl-deny-action disconnect`.
    fn refuse_unauthorized(&mut self, topic: &TopicName, qos: QoS, packet_id: Option<PacketId>) -> Flow {
        self.shard.borrow_mut().stats.acl_denied += 1;
        self.denials += 1;
        let username = self.auth.as_ref().and_then(|a| a.username.as_deref());
        if self.denials == 1 {
            tracing::info!(client_id = %self.conn.client_id, username, %topic, "PUBLISH refused by the ACL");
        } else {
            tracing::debug!(client_id = %self.conn.client_id, username, %topic, "PUBLISH refused by the ACL");
        }
        if self.shard.borrow().config.acl_deny_action == crate::config::AclDenyAction::Disconnect {
            return self.close_with(ReasonCode::NotAuthorized, "PUBLISH refused by the ACL");
        }
        self.refuse_publish(qos, packet_id, "not authorized to publish to this topic")
    }

    /// `$SYS/...` is the broker's own: a client's PUBLISH there is not delivered.
    fn refuse_sys_publish(&mut self, qos: QoS, packet_id: Option<PacketId>) -> Flow {
        tracing::debug!(client_id = %self.conn.client_id, "PUBLISH to $SYS refused");
        self.refuse_publish(qos, packet_id, "$SYS topics are the broker's own")
    }

    /// Drops a PUBLISH the client may not make. v5 clients are told (0x87 Not authorized);
    /// 3.1.1 has no way to say it, so the flow is completed as usual (Mosquitto does the
    /// same).
    fn refuse_publish(&mut self, qos: QoS, packet_id: Option<PacketId>, why: &str) -> Flow {
        let reason = if self.conn.version.is_v5() { ReasonCode::NotAuthorized } else { ReasonCode::Success };
        let mut answer = ack_with(packet_id, reason);
        if reason.is_error() {
            if let Some(answer) = answer.as_mut() {
                answer.properties = self.conn.problem(why);
            }
        }
        match (qos, answer) {
            (QoS::AtLeastOnce, Some(puback)) => self.conn.queue_ack(Packet::PubAck(puback), 0),
            (QoS::ExactlyOnce, Some(pubrec)) => self.conn.queue_ack(Packet::PubRec(pubrec), 0),
            _ => {}
        }
        Flow::Continue
    }

    /// What the next acknowledgement queued on this connection waits for, asked of the
    /// shards that log what it acknowledges.
    fn confirm(&self, shard: usize) -> Confirm {
        Confirm {
            shard,
            conn: self.conn.id,
            seq: self.conn.next_ack_seq(),
            session: self.session,
            qos2_packet_id: None,
        }
    }

    fn protocol_error(&self, what: &str) -> Flow {
        self.close_with(ReasonCode::ProtocolError, what)
    }

    /// The reason code acknowledging an accepted PUBLISH: v5 clients learn when no
    /// subscription matched it (0x10, a success code).
    fn delivery_reason(&self, matched: bool) -> ReasonCode {
        if matched || !self.conn.version.is_v5() {
            ReasonCode::Success
        } else {
            ReasonCode::NoMatchingSubscribers
        }
    }

    fn close_with(&self, reason: ReasonCode, what: &str) -> Flow {
        tracing::info!(peer = %self.peer, client_id = %self.conn.client_id, "closing: {what}");
        self.conn.close_because(Some(reason), Some(what));
        Flow::Stop
    }

    /// Routes a PUBLISH, unless it would not fit a congested subscriber's queue: then it is
    /// handed back (`Flow::Full`) for the reader to wait for room and try again.
    pub fn publish(&mut self, held: HeldPublish) -> Flow {
        if !self.resent_qos2(&held) && self.shard.borrow().would_overflow(Some(self.session), &held.message) {
            if let Some(flow) = self.refuse(&held) {
                return flow;
            }
            // Boxed only here: the publish path allocates nothing for it.
            return Flow::Full(Box::new(held));
        }
        self.route(held)
    }

    fn route(&mut self, held: HeldPublish) -> Flow {
        let HeldPublish { message, qos, packet_id } = held;
        let refused_when_full = self.refused_when_full(qos);
        let forwarded = self.shard.borrow().stats.forwarded;
        let hit = match self.route_publish(message, qos, packet_id) {
            Ok(hit) => hit,
            Err(flow) => return flow,
        };
        self.forwarded |= self.shard.borrow().stats.forwarded != forwarded;
        if !hit.is_empty() && !refused_when_full {
            // This publisher's message left subscribers' queues over half their bound: wait
            // until they drained (back-pressure instead of drops).
            return Flow::Pressure { congested: hit, qos0: qos == QoS::AtMostOnce };
        }
        Flow::Continue
    }

    /// Handles one packet. What has to wait (a SUBSCRIBE's answer, back-pressure) is
    /// returned for the caller to await.
    pub fn handle(&mut self, packet: Packet) -> Flow {
        match packet {
            Packet::Publish(mut publish) => {
                if let Some(alias) = publish.properties.topic_alias() {
                    if alias > self.max_topic_alias {
                        return self
                            .close_with(ReasonCode::TopicAliasInvalid, "topic alias above the maximum");
                    }
                    if publish.topic.is_empty() {
                        match self.aliases.as_ref().and_then(|a| a.get(&alias)) {
                            Some(topic) => publish.topic = topic.clone(),
                            None => {
                                return self.close_with(ReasonCode::TopicAliasInvalid, "unknown topic alias")
                            }
                        }
                    } else {
                        // Kept as its own copy: an alias outlives the read buffer it came in.
                        let topic = TopicName::new(Bytes::copy_from_slice(publish.topic.as_bytes()));
                        if let Ok(topic) = topic {
                            self.aliases.get_or_insert_with(Box::default).insert(alias, topic);
                        }
                    }
                } else if publish.topic.is_empty() {
                    return self.protocol_error("empty topic without a topic alias [MQTT-3.3.2-1]");
                }
                if publish.properties.subscription_identifiers().next().is_some() {
                    return self.protocol_error(
                        "PUBLISH from a client with a Subscription Identifier [MQTT-3.3.4-6]",
                    );
                }
                if publish.topic.len() >= self.max_topic_levels
                    && publish.topic.levels().count() > self.max_topic_levels
                {
                    return self.close_with(
                        ReasonCode::TopicNameInvalid,
                        "topic has more levels than --max-topic-levels",
                    );
                }
                let (qos, packet_id) = (publish.qos, publish.packet_id);
                if publish.topic.as_str() == "$SYS" || publish.topic.as_str().starts_with("$SYS/") {
                    return self.refuse_sys_publish(qos, packet_id);
                }
                if self.auth.as_ref().is_some_and(|auth| auth.revoked()) {
                    return self.close_with(ReasonCode::NotAuthorized, "the user was removed");
                }
                if self.auth.as_ref().is_some_and(|auth| !auth.can_publish(publish.topic.as_str())) {
                    return self.refuse_unauthorized(&publish.topic, qos, packet_id);
                }
                let message = Message::from_publish(publish, self.alloc);
                self.publish(HeldPublish { message, qos, packet_id })
            }
            Packet::PubRel(rel) => {
                let mut shard = self.shard.borrow_mut();
                let before = shard.log_position();
                let known = shard
                    .sessions
                    .with_journal(&self.session, |s, journal| s.release_qos2(rel.packet_id.get(), journal))
                    .unwrap_or(false);
                let mut comp = ack(rel.packet_id, ReasonCode::Success);
                if !known {
                    comp.reason = ReasonCode::PacketIdentifierNotFound;
                    comp.properties =
                        self.conn.problem("no QoS 2 publish awaits PUBREL with this identifier");
                }
                // With --fsync always, PUBCOMP waits until the released identifier is on the
                // device: the client may reuse it at once.
                let confirm = self.confirm(shard.id);
                if shard.log_position().failed_since(before) {
                    // The release is not in the log: no PUBCOMP. Kept pending, so that the
                    // PUBREL the client resends is logged again.
                    if let (true, Some(session)) = (known, shard.sessions.get_mut(&self.session)) {
                        session.restore_qos2([rel.packet_id.get()]);
                    }
                    shard.refuse_confirm(confirm);
                    return Flow::Stop;
                }
                let waits = shard.flush_wait(confirm, before);
                self.conn.queue_ack(Packet::PubComp(comp), waits);
                Flow::Continue
            }
            Packet::PubAck(a) => {
                self.shard.borrow_mut().on_puback(self.session, a.packet_id);
                Flow::Continue
            }
            Packet::PubRec(a) => {
                self.shard.borrow_mut().on_pubrec(self.session, a.packet_id, a.reason);
                Flow::Continue
            }
            Packet::PubComp(a) => {
                self.shard.borrow_mut().on_pubcomp(self.session, a.packet_id);
                Flow::Continue
            }
            Packet::Subscribe(subscribe) => Flow::Subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => {
                self.unsubscribe(unsubscribe);
                Flow::Continue
            }
            Packet::PingReq => {
                self.conn.send(&Packet::PingResp);
                Flow::Continue
            }
            Packet::Disconnect(disconnect) => self.disconnect(disconnect),
            Packet::Connect(_) => self.protocol_error("second CONNECT [MQTT-3.1.0-2]"),
            Packet::Auth(_) => self.protocol_error("AUTH without an authentication method"),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.protocol_error("server-to-client packet sent by a client")
            }
        }
    }

    fn disconnect(&mut self, disconnect: Disconnect) -> Flow {
        self.conn.client_disconnected(disconnect.reason);
        if let Some(expiry) = disconnect.properties.session_expiry_interval() {
            let mut shard = self.shard.borrow_mut();
            if let Some(session) = shard.sessions.get_mut(&self.session) {
                if session.expiry_interval == 0 && expiry != 0 {
                    drop(shard);
                    return self.protocol_error("session expiry set at DISCONNECT after 0 [MQTT-3.14.2-2]");
                }
                session.expiry_interval = expiry.min(self.max_session_expiry);
            }
        }
        self.will = if disconnect.reason == ReasonCode::DisconnectWithWillMessage {
            WillAction::Publish
        } else {
            WillAction::Discard
        };
        Flow::Stop
    }

    pub async fn subscribe(&mut self, subscribe: Subscribe) -> Flow {
        let v5 = self.conn.version.is_v5();
        let identifier = subscribe.properties.subscription_identifiers().next();
        let filters = subscribe.filters;
        // A filter repeated in one SUBSCRIBE is applied once, with its last options (each
        // replaces the one before, MQTT-3.8.4-3), and answered alike at every place.
        let mut last: AHashMap<&TopicFilter, usize> = AHashMap::with_capacity(filters.len());
        for (index, (filter, _)) in filters.iter().enumerate() {
            last.insert(filter, index);
        }
        let mut reasons = vec![ReasonCode::UnspecifiedError; filters.len()];
        let mut refused: Option<String> = None;
        let mut waits = Vec::new();
        let mut retained = Vec::new();
        for (index, (filter, options)) in filters.iter().enumerate() {
            if last.get(filter) != Some(&index) {
                continue;
            }
            let options = *options;
            let failure = |code: ReasonCode| if v5 { code } else { ReasonCode::UnspecifiedError };
            // A shared filter's `$share/{group}/` is not part of the topic it matches.
            let prefix = if filter.as_str().starts_with("$share/") { 2 } else { 0 };
            // A malformed shared filter is refused as such below (0x8F), not as unauthorized.
            let malformed = matches!(crate::broker::shared::parse(filter), Some(Err(_)));
            let acl = match &self.auth {
                None => crate::auth::AclMark::OPEN,
                Some(_) if malformed => crate::auth::AclMark::OPEN,
                Some(auth) => match auth.subscribe(crate::broker::shared::topics_of(filter.as_str())) {
                    (crate::auth::acl::SubscribeVerdict::Denied, _) => {
                        let mut shard = self.shard.borrow_mut();
                        shard.stats.acl_denied += 1;
                        shard.stats.subscriptions_denied += 1;
                        drop(shard);
                        tracing::info!(client_id = %self.conn.client_id, username = auth.username.as_deref(), %filter, "SUBSCRIBE refused by the ACL");
                        refused = Some(format!("{filter}: not authorized"));
                        reasons[index] = failure(ReasonCode::NotAuthorized);
                        continue;
                    }
                    (_, mark) => mark,
                },
            };
            let subscription = Subscription { options, identifier, acl };
            if filter.levels().count().saturating_sub(prefix) > self.max_topic_levels {
                refused = Some(format!("{filter}: more levels than --max-topic-levels"));
                reasons[index] = failure(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if let Err(why) = self.shard.borrow().subscription_room(self.session, filter) {
                refused = Some(format!("{filter}: {why}"));
                reasons[index] = failure(ReasonCode::QuotaExceeded);
                continue;
            }
            // Its own copy: a subscription outlives the buffer the SUBSCRIBE was read into.
            let filter = filter.to_compact();
            match crate::broker::shared::parse(&filter) {
                Some(Ok(key)) => {
                    // No retained messages for a shared subscription (MQTT 5.0 §4.8.2).
                    let (pending, _) =
                        self.shard.borrow_mut().join_group(self.session, filter, key, subscription);
                    waits.extend(pending);
                    reasons[index] = granted(options.qos);
                    continue;
                }
                Some(Err(err)) => {
                    tracing::info!(client_id = %self.conn.client_id, %err, "shared subscription refused");
                    refused = Some(format!("{filter}: {err}"));
                    reasons[index] = failure(ReasonCode::TopicFilterInvalid);
                    continue;
                }
                None => {}
            }
            let (pending, existed) =
                self.shard.borrow_mut().subscribe(self.session, filter.clone(), subscription);
            waits.extend(pending);
            // Retain Handling (MQTT-3.3.1-9..11); v3 subscriptions always use 0.
            if options.retain_handling == 0 || (options.retain_handling == 1 && !existed) {
                retained.push((filter, options.qos, identifier));
            }
            reasons[index] = granted(options.qos);
        }
        for (index, (filter, _)) in filters.iter().enumerate() {
            if let Some(&at) = last.get(filter).filter(|at| **at != index) {
                reasons[index] = reasons[at];
            }
        }
        drop(last);
        // A persistent session's new subscription: peers must know to wait for appends here.
        waits.extend(self.shard.borrow().durable_announcement());
        for pending in waits {
            pending.wait().await;
        }
        let properties = refused.map_or_else(Properties::default, |why| self.conn.problem(&why));
        self.conn.send(&Packet::SubAck(SubAck { packet_id: subscribe.packet_id, properties, reasons }));
        let mut shard = self.shard.borrow_mut();
        for (filter, qos, identifier) in retained {
            shard.request_retained(self.session, filter, qos, identifier);
        }
        Flow::Continue
    }

    fn unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for filter in unsubscribe.filters {
            let existed = self.shard.borrow_mut().unsubscribe(self.session, &filter);
            reasons.push(if existed { ReasonCode::Success } else { ReasonCode::NoSubscriptionExisted });
        }
        if !self.conn.version.is_v5() {
            reasons.clear();
        }
        self.conn.send(&Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            properties: Properties::default(),
            reasons,
        }));
    }
}

fn granted(qos: QoS) -> ReasonCode {
    match qos {
        QoS::AtMostOnce => ReasonCode::GRANTED_QOS0,
        QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
        QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
    }
}

fn ack_with(packet_id: Option<PacketId>, reason: ReasonCode) -> Option<PubAck> {
    packet_id.map(|id| ack(id, reason))
}

fn ack(packet_id: PacketId, reason: ReasonCode) -> PubAck {
    PubAck { packet_id, reason, properties: Properties::default() }
}
