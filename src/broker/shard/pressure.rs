//! Back-pressure: sessions whose queues passed half their bound hold back the publishers
//! that feed them, until they drain or stop acknowledging.

use super::*;

/// Connected sessions whose queues passed half their bound: the publishers that fed them
/// wait until every one drained (see `Session::congested`), or until one that makes no
/// progress for `--slow-consumer-timeout` is made to pay.
#[derive(Default)]
pub struct Pressure {
    pub(super) congested: ahash::AHashSet<SessionId>,
    /// Congested sessions and slow consumers as the tick last saw them: their progress
    /// (acknowledgements and queued messages sent), and since when it has not moved.
    pub(super) watch: ahash::AHashMap<SessionId, (u32, Instant)>,
    /// `--slow-consumer-timeout`; zero: never.
    pub(super) slow_timeout: Duration,
    /// Sessions deliveries left congested since the last `take_pressure_hit`: whom the
    /// publisher (or peer's receiver) that made them waits for.
    pub(super) hit: Vec<SessionId>,
    /// Fired whenever a congested session drained (waiters check again).
    pub released: Rc<Event>,
}

impl Shard {
    /// Notes a session a delivery left congested.
    pub(super) fn note_congestion(&mut self, sid: SessionId) {
        if self
            .sessions
            .get(&sid)
            .is_some_and(|s| s.congested(&self.sessions.limits) || self.spill_blocked(s))
        {
            self.pressure.congested.insert(sid);
            // A publish delivers to each session once: no repeats to remove.
            self.pressure.hit.push(sid);
        }
    }

    /// Releases the publishers a session held back once it drained, stopped acknowledging
    /// or went away.
    pub(super) fn relieve(&mut self, sid: SessionId) {
        let limits = &self.sessions.limits;
        if !self.pressure.congested.contains(&sid)
            || self.sessions.get(&sid).is_some_and(|s| !s.relieved(limits) || self.spill_blocked(s))
        {
            return;
        }
        self.pressure.congested.remove(&sid);
        // Every removal: a publisher waits for every congested session but its own, so
        // the last other one draining must wake it (each waiter checks again).
        self.pressure.released.notify_all();
    }

    /// Whether routing `message` now would push a congested session's queue past its bound
    /// (then its publisher, or a peer's receiver, waits for room before routing it: no
    /// message acknowledged is cut from a connected subscriber's queue). Matches the topic
    /// only while a session on the shard is congested. The publisher's own session (`from`)
    /// does not count: it cannot drain while its own client waits.
    pub fn would_overflow(&self, from: Option<SessionId>, message: &Message) -> bool {
        let congested = &self.pressure.congested;
        let qos0 = self.sessions.limits.holds_qos0();
        if (message.qos == QoS::AtMostOnce && !qos0) || congested.iter().all(|sid| Some(*sid) == from) {
            return false;
        }
        let mut full = false;
        self.router.subscriptions.for_each_match(&message.topic, |_, sid, sub| {
            let qos = message.qos.min(sub.options.qos);
            full = full
                || ((qos != QoS::AtMostOnce || (qos0 && !self.qos0_lossy(*sid)))
                    && Some(*sid) != from
                    && self.lacks_room(*sid, qos, message));
        });
        if !full && !self.shared.tree.is_empty() {
            self.shared.tree.for_each_match(&message.topic, |_, id, _| {
                full = full || self.shared.groups.get(*id).is_some_and(|g| self.group_full(g, from, message));
            });
        }
        full
    }

    fn qos0_lossy(&self, sid: SessionId) -> bool {
        self.sessions.get(&sid).is_some_and(|s| s.qos0_lossy)
    }

    /// The sessions a QoS 0 wait is for, with their progress now (acknowledgements, queued
    /// messages taken, writes): those of `congested` still congested, and those `message`
    /// would not fit (a publisher's own, `from`, never); none a QoS 0 publisher gave up on.
    pub fn qos0_blockers(
        &self,
        from: Option<SessionId>,
        congested: &[SessionId],
        message: Option<&Message>,
    ) -> Vec<(SessionId, u32)> {
        let mut sids: Vec<SessionId> =
            congested.iter().copied().filter(|sid| self.pressure.congested.contains(sid)).collect();
        if let Some(message) = message {
            self.router.subscriptions.for_each_match(&message.topic, |_, sid, _| {
                if self.lacks_room(*sid, QoS::AtMostOnce, message) {
                    sids.push(*sid);
                }
            });
            self.shared.tree.for_each_match(&message.topic, |_, id, _| {
                let Some(group) = self.shared.groups.get(*id) else { return };
                for (sid, _) in &group.local.members {
                    if self.lacks_room(*sid, QoS::AtMostOnce, message) {
                        sids.push(*sid);
                    }
                }
            });
        }
        // Progress here counts writes too: a large outbox takes long to drain before the
        // queue moves, while its client reads all along.
        sids.into_iter()
            .filter(|sid| Some(*sid) != from)
            .filter_map(|sid| {
                let entry = self.sessions.entry(&sid).filter(|e| !e.session.qos0_lossy)?;
                let writes = entry.conn.as_ref().map_or(0, |c| c.writes.get() as u32);
                Some((sid, entry.session.progress().wrapping_add(writes)))
            })
            .collect()
    }

    /// Subscribers that made no progress for `--qos0-max-wait-ms` while a QoS 0 publisher
    /// (or a peer's receiver) waited for them pay: QoS 0 their outboxes cannot take is
    /// dropped for them, not queued, until they take a queued message again. So one that
    /// does not read stalls QoS 0 publishers once, and one that drains, however slowly,
    /// loses nothing.
    pub fn give_up_qos0(&mut self, lagging: &[SessionId]) {
        for sid in lagging {
            let Some(session) = self.sessions.get_mut(sid).filter(|s| !s.qos0_lossy) else { continue };
            session.qos0_lossy = true;
            // Its QoS 0 backlog goes too: it would hold QoS 1/2 publishers for it.
            let dropped = session.drop_queued_qos0();
            tracing::info!(
                client_id = %session.client_id, dropped,
                "QoS 0 publishers no longer wait for this subscriber (no progress for --qos0-max-wait-ms): its QoS 0 is dropped until it reads again"
            );
            self.stats.messages_dropped += dropped as u64;
            self.relieve(*sid);
        }
        // Those waiting for them look again.
        self.pressure.released.notify_all();
    }

    /// Whether a shared group's message could go to no connected member here without
    /// overflowing its queue: each one is congested and out of room (a congested member is
    /// passed over while another has room). Conservative when other cores have members
    /// too: the message may be routed here. The publisher's own session (`from`) never
    /// counts as full.
    pub(super) fn group_full(
        &self,
        group: &crate::broker::shared::Group,
        from: Option<SessionId>,
        message: &Message,
    ) -> bool {
        let qos0 = self.sessions.limits.holds_qos0();
        let mut online = group.local.members.iter().filter(|(sid, sub)| {
            ((qos0 && !self.qos0_lossy(*sid)) || message.qos.min(sub.options.qos) != QoS::AtMostOnce)
                && self.sessions.get(sid).is_some_and(Session::takes_work)
        });
        online.next().is_some_and(|first| {
            std::iter::once(first).chain(online).all(|(sid, sub)| {
                Some(*sid) != from && self.lacks_room(*sid, message.qos.min(sub.options.qos), message)
            })
        })
    }

    /// A connected session that spilled, while the log is at its share of
    /// `--max-disk-bytes`: it may not spill more, so it holds publishers until its spilled
    /// messages were read back (or the log compacted below the bound).
    fn spill_blocked(&self, s: &Session) -> bool {
        s.has_spill() && s.holds_publishers() && !self.log_has_room()
    }

    /// Whether the session log (if any) is below its share of `--max-disk-bytes`.
    pub(super) fn log_has_room(&self) -> bool {
        self.sessions.log.as_ref().is_none_or(|log| log.borrow().has_room())
    }

    /// A congested session whose queue (or log, for one that spills) has no room for
    /// `message` delivered at `qos`.
    fn lacks_room(&self, sid: SessionId, qos: QoS, message: &Message) -> bool {
        self.pressure.congested.contains(&sid)
            && self.sessions.entry(&sid).is_some_and(|e| {
                // QoS 0 is never journaled: it waits in memory only.
                let spills = qos != QoS::AtMostOnce
                    && e.journal.is_some()
                    && self.sessions.log.is_some()
                    && self.log_has_room();
                !e.session.has_room_for(message, &self.sessions.limits, spills)
            })
    }

    /// Whether a message from a peer core must wait before it is applied: a publish that
    /// would not fit a congested subscriber's queue, or a shared one whose group here has
    /// no member with room.
    pub fn holds_back(&self, msg: &CrossMsg) -> bool {
        match msg {
            CrossMsg::Publish(message) | CrossMsg::DurablePublish { message, .. } => {
                self.would_overflow(None, message)
            }
            CrossMsg::SharedPublish { key, message, .. } => {
                (message.qos != QoS::AtMostOnce || self.sessions.limits.holds_qos0())
                    && !self.pressure.congested.is_empty()
                    && self.shared.groups.by_key(key).is_some_and(|g| self.group_full(g, None, message))
            }
            _ => false,
        }
    }

    /// The sessions deliveries since the last call left congested; the caller (the
    /// publisher's reader, or a peer's receiver) then waits until they drained
    /// (`wait_for_sessions`). Only those: a publisher that waited for every congested
    /// session of its core stalled behind subscribers it does not feed (p2p QoS 1 p99).
    pub fn take_pressure_hit(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut self.pressure.hit)
    }

    /// Forgets congestions left by someone else's deliveries (a peer's receiver, a will):
    /// not the next publisher's to wait for.
    pub fn clear_pressure_hit(&mut self) {
        self.pressure.hit.clear();
    }

    /// Whether a session other than `except` (the waiting publisher's own: a client that
    /// subscribes to what it publishes must keep reading its acknowledgements) is congested.
    pub fn under_pressure(&self, except: Option<SessionId>) -> bool {
        self.pressure.congested.iter().any(|sid| Some(*sid) != except)
    }

    /// Makes slow consumers pay: a congested session that made no progress (acknowledged
    /// nothing and took no queued message) for `--slow-consumer-timeout` is disconnected
    /// (v5: DISCONNECT 0x97 Quota exceeded) when its session is clean, or stops holding
    /// publishers back when it is persistent; one that makes progress again holds them
    /// once more.
    pub(super) fn check_slow_consumers(&mut self, now: Instant) {
        let timeout = self.pressure.slow_timeout;
        if timeout.is_zero() || (self.pressure.congested.is_empty() && self.pressure.watch.is_empty()) {
            return;
        }
        let mut watch = std::mem::take(&mut self.pressure.watch);
        let mut watched: Vec<SessionId> = self.pressure.congested.iter().copied().collect();
        watched.extend(watch.keys().filter(|sid| !self.pressure.congested.contains(sid)));
        let mut slow = Vec::new();
        for sid in watched {
            let Some(session) = self.sessions.get_mut(&sid) else {
                watch.remove(&sid);
                continue;
            };
            if !session.is_attached() || !(session.slow || self.pressure.congested.contains(&sid)) {
                watch.remove(&sid);
                continue;
            }
            let progress = session.progress();
            let seen = watch.entry(sid).or_insert((progress, now));
            if seen.0 != progress {
                *seen = (progress, now);
                if session.slow {
                    session.slow = false;
                    tracing::info!(client_id = %session.client_id, "slow consumer makes progress again");
                }
            } else if !session.slow && now.duration_since(seen.1) >= timeout {
                slow.push(sid);
            }
        }
        self.pressure.watch = watch;
        for sid in slow {
            let Some(entry) = self.sessions.entry_mut(&sid) else { continue };
            let (queued, in_flight) = entry.session.backlog();
            self.stats.slow_consumers += 1;
            if entry.session.is_persistent() {
                entry.session.slow = true;
                tracing::warn!(
                    client_id = %entry.session.client_id, queued, in_flight,
                    "slow consumer: no progress for --slow-consumer-timeout; its persistent session no longer holds publishers back"
                );
            } else if let Some(conn) = &entry.conn {
                tracing::warn!(
                    client_id = %entry.session.client_id, queued, in_flight,
                    "slow consumer: no progress for --slow-consumer-timeout; disconnecting it (0x97)"
                );
                conn.close_because(Some(ReasonCode::QuotaExceeded), Some("slow consumer"));
                // Until its connection has ended, it holds no one back.
                entry.session.slow = true;
            }
            self.relieve(sid);
        }
    }

    /// Marks connected sessions that stopped acknowledging for `--shared-ack-timeout`
    /// (and those that started again). A shared-group member that
    /// stalls gives its queued shared messages and its unacknowledged QoS 1 ones to the
    /// rest of its groups; while stalled, new messages pass it over and what still reaches
    /// its queue moves on each tick.
    pub(super) fn check_stalled_sessions(&mut self, now: Instant) {
        if self.shared.ack_timeout.is_zero() {
            return;
        }
        let timeout = self.shared.ack_timeout;
        let mut changed = Vec::new();
        let mut still = Vec::new();
        for session in self.sessions.values_mut() {
            let stalled = session.check_stalled(now, timeout);
            if stalled != session.stalled {
                session.stalled = stalled;
                changed.push((session.id, stalled));
            } else if stalled {
                still.push(session.id);
            }
        }
        for (sid, stalled) in changed {
            self.relieve(sid);
            if let Some(session) = self.sessions.get(&sid).filter(|_| stalled) {
                tracing::info!(
                    client_id = %session.client_id,
                    "client stopped acknowledging: it no longer holds publishers back; its shared-subscription messages go to other members"
                );
            }
            self.advertise_groups_of(sid);
            if stalled {
                self.hand_over_stalled(sid, true);
            }
        }
        for sid in still {
            self.hand_over_stalled(sid, false);
        }
    }
}

/// Waits until none of `sessions` is congested: each drained to a quarter, went away, or
/// was made to pay. A wait that never ends (clients publishing to each other, both
/// congested) is broken by `--slow-consumer-timeout`: a client that makes no progress that
/// long pays.
pub async fn wait_for_sessions(shard: &ShardRef, mut sessions: Vec<SessionId>) {
    loop {
        let released = {
            let s = shard.borrow();
            // Those relieved are not looked at again (a fan-out publish congests many).
            sessions.retain(|sid| s.pressure.congested.contains(sid));
            if sessions.is_empty() {
                return;
            }
            s.pressure.released.clone()
        };
        released.wait().await;
    }
}

/// Waits for room for a message that would not fit a congested subscriber's queue: a QoS 0
/// one while its blockers make progress (`wait_qos0`), any other until the next release.
pub async fn wait_to_fit(shard: &ShardRef, from: Option<SessionId>, message: &Message) {
    let patience = shard.borrow().config.qos0_max_wait;
    if message.qos == QoS::AtMostOnce && wait_qos0(shard, from, &[], Some(message), patience).await {
        return;
    }
    wait_for_release(shard).await;
}

/// Waits for the sessions a delivery of a publisher's (or a peer's receiver's) congested:
/// until they drained, or for a QoS 0 message until they stop making progress.
pub async fn wait_for_congested(
    shard: &ShardRef,
    from: Option<SessionId>,
    sessions: Vec<SessionId>,
    qos0: bool,
) {
    if qos0 {
        let patience = shard.borrow().config.qos0_max_wait;
        wait_qos0(shard, from, &sessions, None, patience).await;
    } else {
        wait_for_sessions(shard, sessions).await;
    }
}

/// Waits, for a QoS 0 message, until nothing blocks it (`Shard::qos0_blockers`): each
/// blocking session drained, or made no progress for `patience` and was given up on.
/// Returns false when nothing blocked it to begin with.
pub async fn wait_qos0(
    shard: &ShardRef,
    from: Option<SessionId>,
    congested: &[SessionId],
    message: Option<&Message>,
    patience: Duration,
) -> bool {
    // Each blocker's progress, and since when it has not moved.
    let mut seen: ahash::AHashMap<SessionId, (u32, Instant)> = ahash::AHashMap::new();
    let mut first = true;
    loop {
        let blockers = shard.borrow().qos0_blockers(from, congested, message);
        if blockers.is_empty() {
            return !first;
        }
        first = false;
        let now = Instant::now();
        let mut lagging = Vec::new();
        let mut next = patience;
        let mut fresh = ahash::AHashMap::with_capacity(blockers.len());
        for (sid, progress) in blockers {
            let since = match seen.get(&sid) {
                Some((seen_progress, since)) if *seen_progress == progress => *since,
                _ => now,
            };
            let waited = now.duration_since(since);
            if waited >= patience {
                lagging.push(sid);
            } else {
                next = next.min(patience - waited);
            }
            fresh.insert(sid, (progress, since));
        }
        seen = fresh;
        if !lagging.is_empty() {
            shard.borrow_mut().give_up_qos0(&lagging);
            continue;
        }
        let released = shard.borrow().pressure.released.clone();
        futures_lite::future::or(released.wait(), glommio::timer::sleep(next)).await;
    }
}

/// Waits for the next time a congested session drained (or went away, or paid): a message
/// held for room is then tried again.
pub async fn wait_for_release(shard: &ShardRef) {
    let released = shard.borrow().pressure.released.clone();
    released.wait().await;
}
