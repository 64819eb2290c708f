//! Routing: the shard's subscriptions and what its peers subscribe to, a publish
//! delivered to local subscribers (encoded once per protocol for QoS 0) and sent once to
//! every peer with a match.

use super::*;

/// Who subscribes to what: this shard's sessions, and which filters each peer has
/// subscribers on.
#[derive(Default)]
pub struct Router {
    pub(super) subscriptions: SubscriptionTree<SessionId, Subscription>,
    /// Filters other shards have subscribers on; the key is the peer's shard index.
    pub(super) interest: SubscriptionTree<usize, ()>,
    /// The announcement of each filter whose first local subscription peers have not all
    /// acknowledged yet: a second subscriber's SUBACK waits for it too.
    pub(super) announcing: AHashMap<TopicFilter, Rc<PendingAcks>>,
    /// Reused per publish to gather matching subscribers without allocating.
    pub(super) scratch: Vec<(SessionId, Subscription)>,
}

impl Shard {
    /// Whether `sid` may subscribe to `filter`: replacing one of its subscriptions always,
    /// a new one within `--max-subscriptions-per-client`, `--max-subscriptions` and their
    /// bounds in bytes (`--max-subscription-bytes-per-client`, `--max-subscription-bytes`:
    /// a client sending long or deep filters pays, not the broker's memory).
    pub fn subscription_room(&self, sid: SessionId, filter: &TopicFilter) -> Result<(), &'static str> {
        let Some(session) = self.sessions.get(&sid) else { return Ok(()) };
        if session.subscriptions.contains_key(filter) {
            return Ok(());
        }
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
        let cost = crate::broker::session::subscription_cost(filter);
        if session.subscriptions.len() >= self.config.max_subscriptions_per_client {
            return Err("--max-subscriptions-per-client reached");
        }
        if session.subscriptions.bytes() + cost > self.config.max_subscription_bytes_per_client {
            return Err("--max-subscription-bytes-per-client reached");
        }
        if load(&self.global.subscriptions) >= self.config.max_subscriptions {
            return Err("--max-subscriptions reached");
        }
        if load(&self.global.subscription_bytes) + cost > self.config.max_subscription_bytes {
            return Err("--max-subscription-bytes reached");
        }
        Ok(())
    }

    /// Lists a subscription in its session (and its store, when persistent). Returns
    /// whether it replaced one, or `None` without such a session.
    pub(super) fn record_subscription(
        &mut self,
        sid: SessionId,
        filter: TopicFilter,
        subscription: Subscription,
    ) -> Option<bool> {
        self.sessions.journal(&sid, |log, id| log.subscribe(id, &filter, &subscription));
        let entry = self.sessions.entry_mut(&sid)?;
        let journaled = entry.journal.is_some();
        let before = entry.session.subscriptions.bytes();
        let replaced = entry.session.subscriptions.insert(filter, subscription).is_some();
        if !replaced {
            crate::broker::adjust(&self.global.subscriptions, 1);
            let added = entry.session.subscriptions.bytes() - before;
            crate::broker::adjust(&self.global.subscription_bytes, added as isize);
            if journaled {
                self.durable_subscriptions_changed(1);
            }
        }
        Some(replaced)
    }

    /// Adds or replaces a subscription. Returns the acknowledgements to wait for before
    /// SUBACK (when this shard had no subscriber on the filter) and whether it existed.
    pub fn subscribe(
        &mut self,
        sid: SessionId,
        filter: TopicFilter,
        subscription: Subscription,
    ) -> (Option<Rc<PendingAcks>>, bool) {
        let Some(existed) = self.record_subscription(sid, filter.clone(), subscription) else {
            return (None, false);
        };
        let first = self.router.subscriptions.subscriber_count(&filter) == 0;
        self.router.subscriptions.insert(&filter, sid, subscription);
        if self.peer_count == 1 {
            return (None, existed);
        }
        if !first {
            // Peers may not have acknowledged the first subscriber's announcement yet.
            let pending = self.router.announcing.get(&filter).filter(|p| p.remaining.get() > 0).cloned();
            return (pending, existed);
        }
        let token = self.next_id();
        let pending = Rc::new(PendingAcks::default());
        pending.remaining.set(self.peer_count - 1);
        self.peers.pending_acks.insert(token, pending.clone());
        self.router.announcing.insert(filter.clone(), pending.clone());
        for peer in self.peers() {
            let msg = CrossMsg::Interest { from: self.id, filter: filter.clone(), add: true, token };
            self.send_to(peer, msg);
        }
        (Some(pending), existed)
    }

    /// Judges a session's subscriptions again under its current rules (a resumed session's
    /// new client, or none): each keeps its mark in the session and in the tree.
    pub(super) fn remark_subscriptions(&mut self, sid: SessionId) {
        let Some(entry) = self.sessions.entry_mut(&sid) else { return };
        let auth = entry.auth.clone();
        if let Some(auth) = &auth {
            auth.remarked.set(crate::auth::generation());
        }
        let mut changed = Vec::new();
        for (filter, sub) in entry.session.subscriptions.iter_mut() {
            let mark = match &auth {
                None => crate::auth::AclMark::OPEN,
                Some(auth) => auth.subscribe(crate::broker::shared::topics_of(filter.as_str())).1,
            };
            if sub.acl != mark {
                sub.acl = mark;
                changed.push((filter.clone(), *sub));
            }
        }
        for (filter, sub) in changed {
            if self.router.subscriptions.get(&filter, &sid).is_some() {
                self.router.subscriptions.insert(&filter, sid, sub);
            }
        }
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&mut self, sid: SessionId, filter: &TopicFilter) -> bool {
        let Some(session) = self.sessions.get_mut(&sid) else { return false };
        let before = session.subscriptions.bytes();
        let existed = session.subscriptions.remove(filter).is_some();
        session.retained.cancel(filter);
        if existed {
            crate::broker::adjust(&self.global.subscriptions, -1);
            let removed = before - session.subscriptions.bytes();
            crate::broker::adjust(&self.global.subscription_bytes, -(removed as isize));
        }
        if !existed {
            return false;
        }
        if self.sessions.entry(&sid).is_some_and(|e| e.journal.is_some()) {
            self.sessions.journal(&sid, |log, id| log.unsubscribe(id, filter));
            self.durable_subscriptions_changed(-1);
        }
        self.remove_subscription(sid, filter);
        true
    }

    pub(super) fn remove_subscription(&mut self, sid: SessionId, filter: &TopicFilter) {
        if let Some(Ok(key)) = shared::parse(filter) {
            self.leave_group(sid, &key);
            return;
        }
        if self.router.subscriptions.remove(filter, &sid).is_none() {
            return;
        }
        if self.router.subscriptions.subscriber_count(filter) == 0 {
            self.router.announcing.remove(filter);
            for peer in self.peers() {
                let msg = CrossMsg::Interest { from: self.id, filter: filter.clone(), add: false, token: 0 };
                self.send_to(peer, msg);
            }
        }
    }

    /// Routes a message published on this shard (by a client, or a will): stored if
    /// retained, delivered to local subscribers, and sent once to every peer shard with a
    /// matching subscriber.
    /// Routes a message from a client or a will. With a data directory and `confirm`
    /// (QoS 1/2), every shard that may write it to a log confirms, and the returned
    /// `waits` says how many confirmations the acknowledgement waits for.
    pub fn publish(
        &mut self,
        from: Option<SessionId>,
        message: Message,
        confirm: Option<Confirm>,
    ) -> Published {
        // Only an acknowledgement compares log positions; skip the reads else.
        let before = if confirm.is_some() && self.sessions.log.is_some() {
            self.log_position()
        } else {
            LogMark::default()
        };
        self.publish_after(from, message, confirm, before)
    }

    /// [`Shard::publish`] when what the acknowledgement covers began to be logged at log
    /// position `before` (a QoS 2 PUBLISH records its packet identifier first). When an
    /// append failed on the way, `confirm` is refused (`failed`: no acknowledgement).
    pub fn publish_after(
        &mut self,
        from: Option<SessionId>,
        message: Message,
        confirm: Option<Confirm>,
        before: LogMark,
    ) -> Published {
        self.stats.messages_received += 1;
        self.stats.received_by_qos[message.qos as usize] += 1;
        // A retained message nobody subscribes to is kept, not dropped.
        let unheard = !message.retain;
        // In a cluster a QoS 1/2 publish may wait for other nodes even without logs here.
        let confirm = confirm.filter(|_| {
            (self.sessions.log.is_some() || self.bridge().is_some()) && message.qos != QoS::AtMostOnce
        });
        let (matched, mut waits) = self.route(from, message, confirm);
        self.stats.no_subscribers += u64::from(!matched && unheard);
        let mut failed = false;
        if let Some(confirm) = confirm {
            failed = self.log_position().failed_since(before);
            if failed {
                self.refuse_confirm(confirm);
            } else {
                waits += self.flush_wait(confirm, before);
            }
        }
        Published { matched, waits, failed }
    }

    /// Stores a retained message with its topic's owner and delivers everywhere. Returns
    /// whether any subscription matched and the confirmations asked of peers.
    pub(super) fn route(
        &mut self,
        from: Option<SessionId>,
        message: Message,
        confirm: Option<Confirm>,
    ) -> (bool, u32) {
        let mut waits = 0;
        if message.retain {
            let owner = placement::owner(message.topic.as_str(), self.shard_count);
            if owner == self.id {
                self.store_retained(message.clone());
            } else {
                waits += u32::from(confirm.is_some());
                self.send_to(owner, CrossMsg::RetainSet(message.clone(), confirm));
            }
            // Every node keeps every retained message.
            if let Some(bridge) = self.bridge() {
                waits += u32::from(confirm.is_some());
                self.send_to(bridge, CrossMsg::RetainSet(message.clone(), confirm));
            }
        }
        let mut peers: u128 = 0;
        self.router.interest.for_each_match(&message.topic, |_, peer, _| {
            peers |= 1 << *peer;
        });
        let mut matched = peers != 0;
        while peers != 0 {
            let peer = peers.trailing_zeros() as usize;
            peers &= peers - 1;
            self.stats.forwarded += 1;
            let msg = match confirm {
                Some(confirm) if self.durability.peers[peer] => {
                    waits += 1;
                    CrossMsg::DurablePublish { message: message.clone(), confirm }
                }
                _ => CrossMsg::Publish(message.clone()),
            };
            self.send_to(peer, msg);
        }
        if !self.shared.tree.is_empty() {
            let mut groups = std::mem::take(&mut self.shared.scratch);
            self.shared.tree.for_each_match(&message.topic, |_, id, _| groups.push(*id));
            matched |= !groups.is_empty();
            for id in &groups {
                waits += self.route_shared(*id, &message, confirm);
            }
            groups.clear();
            self.shared.scratch = groups;
        }
        (self.deliver_local(from, &message) || matched, waits)
    }

    /// Delivers to this shard's subscribers; each session gets one copy, at the highest
    /// QoS of its matching subscriptions (MQTT-3.3.4-2), with every matching subscription's
    /// identifier (MQTT-3.3.4-3).
    /// Returns whether a subscription here matched.
    pub(super) fn deliver_local(&mut self, from: Option<SessionId>, message: &Message) -> bool {
        if message.is_expired_now() {
            return false;
        }
        let mut matches = std::mem::take(&mut self.router.scratch);
        self.router.subscriptions.for_each_match(&message.topic, |_, sid, sub| {
            matches.push((*sid, *sub));
        });
        // Several subscribers may each keep a copy: a message that would pin its read
        // buffer is copied out once here, not once per subscriber.
        let own;
        let message = if matches.len() > 1 && message.qos != QoS::AtMostOnce && message.pins() {
            own = message.held();
            &own
        } else {
            message
        };
        if matches.len() > 1 {
            matches.sort_unstable_by_key(|(sid, _)| *sid);
        }
        let mut encoded = EncodedCache::default();
        // Subscriptions judged whole under the rules in force need no check per message.
        let generation = crate::auth::generation();
        let mut stale = Vec::new();
        let mut identifiers: Vec<u32> = Vec::new();
        let mut start = 0;
        while start < matches.len() {
            let sid = matches[start].0;
            let end = start + matches[start..].iter().take_while(|(s, _)| *s == sid).count();
            let mut best: Option<QoS> = None;
            let mut retain_as_published = false;
            identifiers.clear();
            let mut readable = None;
            for (_, sub) in &matches[start..end] {
                // No Local applies per subscription (MQTT-3.8.3-3).
                if sub.options.no_local && from == Some(sid) {
                    continue;
                }
                // A subscription the ACL allowed whole needs no check; others ask the
                // session's read rules (once per message and session).
                if !sub.acl.passes(generation)
                    && !*readable.get_or_insert_with(|| self.sessions.readable(&sid, message.topic.as_str()))
                {
                    continue;
                }
                best = best.max(Some(sub.options.qos));
                retain_as_published |= sub.options.retain_as_published;
                identifiers.extend(sub.identifier);
            }
            start = end;
            if readable.is_some() && self.sessions.remark_due(&sid, generation) {
                // Marked before a reload: judged again once, not checked per message forever.
                stale.push(sid);
            }
            if readable == Some(false) && best.is_none() {
                self.stats.acl_denied += 1;
            }
            let Some(sub_qos) = best else { continue };
            let Some((entry, log, limits)) = self.sessions.split(&sid) else { continue };
            let qos = message.qos.min(sub_qos);
            let retain = retain_as_published && message.retain;
            let delivery = match (&entry.conn, qos) {
                // Unless it has to wait in the session's queue (a full outbox, or QoS 0
                // messages waiting before it, under back-pressure).
                (Some(conn), QoS::AtMostOnce)
                    if identifiers.is_empty()
                        && conn.takes_shared_encoding()
                        && !entry.session.queues_qos0(limits, conn.can_send()) =>
                {
                    match encoded.get(conn.version, retain, message, conn.max_packet_size) {
                        Some(bytes) => entry.session.deliver_encoded_qos0(conn.enqueue(bytes)),
                        None => {
                            // Over the client's Maximum Packet Size (MQTT-3.1.2-25).
                            crate::broker::core_counters::dropped(crate::broker::admin::DropReason::TooLarge);
                            Delivery::Dropped
                        }
                    }
                }
                _ => {
                    let delivery = with_io(entry, log, limits, |session, io| {
                        session.deliver(message, qos, retain, &identifiers, None, io)
                    });
                    if delivery == Delivery::Queued {
                        self.note_congestion(sid);
                    }
                    delivery
                }
            };
            self.stats.count(delivery);
            if message.retain && matches!(delivery, Delivery::Sent | Delivery::Queued) {
                // A retained fetch under way for a new subscription does not send it again.
                if let Some(session) = self.sessions.get_mut(&sid).filter(|s| !s.retained.is_empty()) {
                    session.retained.delivered_live(&message.topic, message.id);
                }
            }
        }
        let matched = !matches.is_empty();
        matches.clear();
        self.router.scratch = matches;
        for sid in stale {
            self.remark_subscriptions(sid);
        }
        matched
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
                let publish = message.outgoing(QoS::AtMostOnce, retain, false, None, &[]);
                let mut buf = BytesMut::with_capacity(publish.encoded_size(version));
                if let Err(err) = publish.encode(version, usize::MAX, &mut buf) {
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
