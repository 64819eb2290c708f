//! Shared subscriptions on this shard: its members of each group, which shard a message
//! goes to, and messages a member gave up.

use super::*;

/// The shared subscription groups this shard has members of or peers told it of.
pub struct SharedGroups {
    pub(super) groups: Groups,
    /// Every group with members anywhere, by its inner filter: what a publish matches.
    pub(super) tree: SubscriptionTree<GroupId, ()>,
    /// Reused per publish to gather the matching groups without allocating.
    pub(super) scratch: Vec<GroupId>,
    pub(super) strategy: SharedStrategy,
    pub(super) ack_timeout: Duration,
    /// xorshift state for the random strategy.
    pub(super) random: u64,
}

impl SharedGroups {
    pub(super) fn new(shard: usize, strategy: SharedStrategy, ack_timeout: Duration) -> SharedGroups {
        SharedGroups {
            groups: Groups::default(),
            tree: SubscriptionTree::new(),
            scratch: Vec::new(),
            strategy,
            ack_timeout,
            random: 0x9E37_79B9_7F4A_7C15 ^ (shard as u64 + 1),
        }
    }
}

impl Shard {
    /// Adds a member to a shared subscription group. Returns what SUBACK waits for (peers
    /// learning of the group) and whether the session was already a member.
    pub fn join_group(
        &mut self,
        sid: SessionId,
        full_filter: TopicFilter,
        key: GroupKey,
        subscription: Subscription,
    ) -> (Option<Rc<PendingAcks>>, bool) {
        let Some(existed) = self.record_subscription(sid, full_filter, subscription) else {
            return (None, false);
        };
        let id = self.group_entry(&Arc::new(key));
        if let Some(group) = self.shared.groups.get_mut(id) {
            group.local.insert(sid, subscription);
        }
        (self.advertise_group(id, true), existed)
    }

    /// The group's number, creating it (and its place in the tree of shared filters).
    pub(super) fn group_entry(&mut self, key: &Arc<GroupKey>) -> GroupId {
        let (id, new) = self.shared.groups.entry(key, self.peer_count);
        if new {
            self.shared.tree.insert(&key.filter, id, ());
        }
        id
    }

    /// Forgets a group nobody has any more.
    pub(super) fn forget_group_if_unused(&mut self, id: GroupId) {
        if let Some(group) = self.shared.groups.remove_if_unused(id) {
            self.shared.tree.remove(&group.key.filter, &id);
        }
    }

    pub(super) fn leave_group(&mut self, sid: SessionId, key: &GroupKey) {
        let Some(id) = self.shared.groups.id(key) else { return };
        if let Some(group) = self.shared.groups.get_mut(id) {
            group.local.remove(sid);
        }
        self.advertise_group(id, false);
    }

    /// What this shard has of a group: connected members, offline ones, or none.
    pub(super) fn local_presence(&self, id: GroupId) -> Presence {
        let Some(group) = self.shared.groups.get(id) else { return Presence::None };
        let members = &group.local.members;
        let online = members.iter().any(|(sid, _)| self.sessions.get(sid).is_some_and(Session::takes_work));
        match (online, members.is_empty()) {
            (true, _) => Presence::Online,
            (false, false) => Presence::Offline,
            (false, true) => Presence::None,
        }
    }

    /// The groups a session is a member of.
    pub(super) fn groups_of(&self, sid: SessionId) -> Vec<GroupId> {
        let Some(session) = self.sessions.get(&sid) else { return Vec::new() };
        let keys = session.subscriptions.keys().filter_map(|f| shared::parse(f)?.ok());
        keys.filter_map(|key| self.shared.groups.id(&key)).collect()
    }

    /// Called whenever a session's membership or readiness changed (it connected, left,
    /// stalled): each of its groups re-computes and advertises this shard's presence.
    pub(super) fn advertise_groups_of(&mut self, sid: SessionId) {
        for id in self.groups_of(sid) {
            self.advertise_group(id, false);
        }
    }

    /// Records this shard's presence in a group (`LocalGroup::advertised`, which publishes
    /// read instead of counting members) and tells peers when it changed; forgets a group
    /// nobody has. With `ack`, returns the acknowledgements a SUBACK waits for.
    pub(super) fn advertise_group(&mut self, id: GroupId, ack: bool) -> Option<Rc<PendingAcks>> {
        let presence = self.local_presence(id);
        let group = self.shared.groups.get_mut(id)?;
        let advertised = std::mem::replace(&mut group.local.advertised, presence);
        let key = group.key.clone();
        if presence == Presence::None {
            self.forget_group_if_unused(id);
        }
        if presence == advertised || self.peer_count == 1 {
            return None;
        }
        let pending = ack.then(|| {
            let pending = Rc::new(PendingAcks::default());
            pending.remaining.set(self.peer_count - 1);
            pending
        });
        let token = match &pending {
            Some(pending) => {
                let token = self.next_id();
                self.peers.pending_acks.insert(token, pending.clone());
                token
            }
            None => 0,
        };
        for peer in self.peers() {
            let msg = CrossMsg::SharedInterest { from: self.id, key: key.clone(), presence, token };
            self.send_to(peer, msg);
        }
        pending
    }

    pub(super) fn next_random(&mut self) -> u64 {
        self.shared.random ^= self.shared.random << 13;
        self.shared.random ^= self.shared.random >> 7;
        self.shared.random ^= self.shared.random << 17;
        self.shared.random
    }

    /// Sends a message matching a shared group to one shard with a member. Returns the
    /// confirmations asked of peers (0 or 1). Constant work and no allocation per group.
    pub(super) fn route_shared(&mut self, id: GroupId, message: &Message, confirm: Option<Confirm>) -> u32 {
        let random = self.next_random();
        let (me, strategy) = (self.id, self.shared.strategy);
        let Some(group) = self.shared.groups.get_mut(id) else { return 0 };
        let local = group.local.advertised;
        match group.pick_shard(me, local, strategy, random) {
            Some(shard) if shard == me => {
                if !self.deliver_shared_local(id, message, None) {
                    self.stats.messages_dropped += 1;
                }
            }
            Some(shard) => {
                let key = group.key.clone();
                self.stats.forwarded += 1;
                let confirm = confirm.filter(|_| self.durability.peers[shard]);
                let msg = CrossMsg::SharedPublish { key, message: message.clone(), confirm };
                self.send_to(shard, msg);
                return u32::from(confirm.is_some());
            }
            None => self.stats.messages_dropped += 1,
        }
        0
    }

    /// Gives a message to one local member of a group: connected ones whose queues are not
    /// congested first (a slow member is passed over while another has room), then any
    /// connected one, then offline ones; false when the group has no member here (other
    /// than `exclude`).
    pub(super) fn deliver_shared_local(
        &mut self,
        id: GroupId,
        message: &Message,
        exclude: Option<SessionId>,
    ) -> bool {
        let random = self.next_random();
        let strategy = self.shared.strategy;
        let sessions = &self.sessions;
        let congested = &self.pressure.congested;
        let Some(group) = self.shared.groups.get_mut(id) else { return false };
        let topic = message.topic.as_str();
        let candidate = |online: bool, uncongested: bool| {
            move |sid: SessionId| {
                Some(sid) != exclude
                    && !(uncongested && congested.contains(&sid))
                    && sessions.get(&sid).is_some_and(|s| s.takes_work() || !online)
                    // A member the ACL does not let read this topic is passed over.
                    && sessions.readable(&sid, topic)
            }
        };
        let Some((sid, sub)) = group
            .local
            .pick(strategy, random, candidate(true, !congested.is_empty()))
            .or_else(|| group.local.pick(strategy, random, candidate(true, false)))
            .or_else(|| group.local.pick(strategy, random, candidate(false, false)))
        else {
            return false;
        };
        let key = group.key.clone();
        let qos = message.qos.min(sub.options.qos);
        let retain = sub.options.retain_as_published && message.retain;
        let identifiers = sub.identifier.as_slice();
        let delivery = self
            .sessions
            .with(&sid, |session, io| session.deliver(message, qos, retain, identifiers, Some(key), io));
        let Some(delivery) = delivery else { return false };
        self.stats.count(delivery);
        if delivery == Delivery::Queued {
            self.note_congestion(sid);
        }
        true
    }

    /// A shared message a member gave up (its connection ended, or it stopped
    /// acknowledging): to another member taking work here or on another shard, else back
    /// to the same session's queue.
    pub(super) fn redispatch_shared(&mut self, sid: SessionId, key: Arc<GroupKey>, message: Message) {
        // A session that ends now keeps nothing: offline persistent members get it before it
        // is lost (MQTT 5.0 §4.8.2: SHOULD go to another subscriber).
        let ending = self.sessions.get(&sid).is_none_or(|s| s.expiry_interval == 0);
        if let Some(id) = self.shared.groups.id(&key) {
            if self.other_local_member(id, sid) && self.deliver_shared_local(id, &message, Some(sid)) {
                return;
            }
            let random = self.next_random();
            let (me, strategy) = (self.id, self.shared.strategy);
            let remote = self.shared.groups.get_mut(id).and_then(|group| {
                let shard = group.pick_shard(me, Presence::None, strategy, random)?;
                let presence = group.remote.get(shard).copied().unwrap_or_default();
                let takes = presence == Presence::Online || (ending && presence == Presence::Offline);
                (shard != me && takes).then_some(shard)
            });
            if let Some(shard) = remote {
                self.send_to(shard, CrossMsg::SharedPublish { key, message, confirm: None });
                return;
            }
            if ending && self.deliver_shared_local(id, &message, Some(sid)) {
                return;
            }
            let offline_remote = self.shared.groups.get(id).and_then(|group| {
                (0..self.shard_count).find(|p| *p != me && group.remote.get(*p) == Some(&Presence::Offline))
            });
            if let (true, Some(shard)) = (ending, offline_remote) {
                self.send_to(shard, CrossMsg::SharedPublish { key, message, confirm: None });
                return;
            }
        }
        if ending {
            self.stats.messages_dropped += 1;
            return;
        }
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        let qos = session
            .subscriptions
            .iter()
            .find(|(f, _)| shared::parse(f).and_then(Result::ok).as_ref() == Some(key.as_ref()))
            .map_or(message.qos, |(_, sub)| message.qos.min(sub.options.qos));
        self.sessions.with(&sid, |session, io| session.deliver(&message, qos, false, &[], Some(key), io));
    }

    /// Whether a member of the group other than `sid` here takes work.
    pub(super) fn other_local_member(&self, id: GroupId, sid: SessionId) -> bool {
        self.shared.groups.get(id).is_some_and(|g| {
            g.local
                .members
                .iter()
                .any(|(s, _)| *s != sid && self.sessions.get(s).is_some_and(Session::takes_work))
        })
    }

    /// Whether a message of the group given up by `sid` has somewhere else to go.
    pub(super) fn group_has_other_taker(&self, id: GroupId, sid: SessionId) -> bool {
        self.other_local_member(id, sid)
            || self.shared.groups.get(id).is_some_and(|g| g.online_elsewhere(self.id))
    }

    pub(super) fn hand_over_stalled(&mut self, sid: SessionId, in_flight: bool) {
        let keys: ahash::AHashSet<Arc<GroupKey>> = self
            .groups_of(sid)
            .into_iter()
            .filter(|id| self.group_has_other_taker(*id, sid))
            .filter_map(|id| Some(self.shared.groups.get(id)?.key.clone()))
            .collect();
        if keys.is_empty() {
            return;
        }
        let taken = self.sessions.with_journal(&sid, |session, journal| {
            session.take_shared_stalled(in_flight, |key| keys.contains(key), journal)
        });
        let Some(taken) = taken else { return };
        for (key, message) in taken {
            self.redispatch_shared(sid, key, message);
        }
    }
}
