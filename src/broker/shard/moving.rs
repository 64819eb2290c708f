//! A session leaving this node for another one (a takeover across the cluster): its client's
//! connection here closes (0x8E), the session goes over in parts — what it has in flight,
//! its queue, then what it spilled to its log, in that order, `--node-handover-part` bytes
//! at a time (the first with its subscriptions) as the new node asks, so a session bigger
//! than a frame or than memory moves whole. It keeps receiving here until the new node has it in place (`Release`);
//! then it stops receiving (the new copy gets everything from there on), what it received
//! but did not hand over yet follows, in parts the same way, and it ends here.

use ahash::AHashSet;

use super::*;
use crate::broker::cross::HandedSession;
use crate::broker::session::OwedMessage;

/// How long a session without expiry is kept for a takeover the watch announced before
/// its request came over the link.
const ANNOUNCED_FOR: Duration = Duration::from_secs(20);

/// The barriers before sessions leave: markers counted per takeover, and `Release`s that
/// wait for theirs.
#[derive(Default)]
pub(super) struct Barriers {
    pub(super) markers: AHashMap<u64, usize>,
    pub(super) released: AHashMap<u64, Arc<str>>,
}

/// A session handed over to another node, still receiving here.
pub(super) struct Moving {
    sid: SessionId,
    /// The takeover's token (0: announced by the watch, not asked for yet).
    token: u64,
    /// The messages handed over (ids; sequence numbers up to `last_seq` for those read
    /// back from an older log without ids): the others follow at `Release`.
    handed: AHashSet<u64>,
    last_seq: u64,
    /// The last spilled message handed over (by sequence number).
    spilled_upto: u64,
    /// Kept for a takeover the watch announced before its request came over the link (a
    /// session without expiry would end with its connection): since when.
    announced: Option<Instant>,
    /// Past `Release`: no longer receiving, its remainder going in parts.
    released: bool,
}

impl Moving {
    fn new(sid: SessionId, token: u64, announced: Option<Instant>) -> Moving {
        Moving {
            sid,
            token,
            handed: AHashSet::new(),
            last_seq: 0,
            spilled_upto: 0,
            announced,
            released: false,
        }
    }

    fn was_handed(&self, m: &OwedMessage) -> bool {
        match m.message.id.is_known() {
            true => self.handed.contains(&m.message.id.0),
            false => m.seq != 0 && m.seq <= self.last_seq,
        }
    }

    fn count(&mut self, part: &HandedSession, spilled_upto: u64) {
        self.handed.extend(part.messages.iter().map(|m| m.message.id.0).filter(|id| *id != 0));
        self.last_seq = part.messages.iter().map(|m| m.seq).fold(self.last_seq, u64::max);
        self.spilled_upto = spilled_upto;
    }
}

impl Shard {
    /// Bytes of messages a part of a hand-over carries at most (or one larger message),
    /// `--node-handover-part` (within the hand-over frame's bound: `FrameLimits::for_node`).
    fn part_bytes(&self) -> usize {
        self.config.cluster.as_ref().map_or(crate::config::DEFAULT_HANDOVER_PART, |c| c.handover_part)
    }

    /// Another node takes `client_id` over: its connection here closes; with a token, the
    /// session is handed over (its first part) and kept until `Release`.
    pub(super) fn take_over(&mut self, client_id: Arc<str>, token: u64, want_session: bool) {
        if self.defer_take_over(&client_id, token, want_session) {
            return;
        }
        // A CONNECT here still waiting to be served lost its client to the newer claim.
        if token != 0 {
            self.overtake_claims(&client_id);
        }
        let sid = self.sessions.of_client(&client_id);
        if let (Some(sid), 0) = (sid, token) {
            self.keep_for_announced_takeover(&client_id, sid);
        }
        let bridge = self.bridge().filter(|_| token != 0);
        // A session that goes to the other node is moving from here on: ending its
        // connection does not end it, even with no expiry.
        let moves = match (sid, bridge) {
            (Some(sid), Some(_)) if want_session => {
                let moving = Moving::new(sid, token, None);
                self.moving.insert(client_id.clone(), moving);
                if let Some(session) = self.sessions.get_mut(&sid) {
                    session.expires_at = None;
                }
                true
            }
            _ => false,
        };
        if let Some(sid) = sid {
            if let Some(conn) = self.sessions.entry(&sid).and_then(|e| e.conn.clone()) {
                tracing::info!(client_id = %client_id, "session taken over by another node");
                self.end_connection(sid, &conn, ReasonCode::SessionTakenOver);
            }
        }
        let Some(bridge) = bridge else { return };
        let handed = match sid {
            Some(sid) if moves => self.hand_over(sid, 0, self.part_bytes(), |_| false),
            Some(sid) => {
                self.end_session(sid);
                None
            }
            None => None,
        };
        let session = match (handed, self.moving.get_mut(&client_id)) {
            (Some((part, spilled_upto)), Some(moving)) => {
                moving.count(&part, spilled_upto);
                Some(Box::new(part))
            }
            _ => {
                self.moving.remove(&client_id);
                None
            }
        };
        self.send_to(bridge, CrossMsg::HandedOver { token, session, last: false });
    }

    /// The watch says another node claimed `client_id` (its request comes over the link,
    /// unless the link is down): a session that would end with its connection (no expiry)
    /// is kept until the request comes, for `ANNOUNCED_FOR` at most.
    fn keep_for_announced_takeover(&mut self, client_id: &Arc<str>, sid: SessionId) {
        let no_expiry = self.sessions.get(&sid).is_some_and(|s| s.expiry_interval == 0 && s.is_attached());
        if no_expiry && !self.moving.contains_key(client_id) {
            let kept = Moving::new(sid, 0, Some(Instant::now()));
            self.moving.insert(client_id.clone(), kept);
        }
    }

    /// Sessions kept for a takeover announced long ago whose request never came: they
    /// stay (and a session without expiry ends).
    pub(super) fn forget_announced_takeovers(&mut self, now: Instant) {
        let stale: Vec<Arc<str>> = self
            .moving
            .iter()
            .filter(|(_, m)| m.announced.is_some_and(|at| now.duration_since(at) >= ANNOUNCED_FOR))
            .map(|(c, _)| c.clone())
            .collect();
        for client_id in stale {
            self.stay(&client_id);
        }
    }

    /// The node taking `client_id` over asks for the next part of its session.
    pub(super) fn next_part(&mut self, client_id: &str, token: u64) {
        // A request of another takeover of the client than the one it moves for: not it.
        if self.moving.get(client_id).is_some_and(|m| m.token != token) {
            return;
        }
        if self.moving.get(client_id).is_some_and(|m| m.released) {
            return self.send_remainder(client_id, token);
        }
        let Some(bridge) = self.bridge() else { return };
        let mut moving = self.moving.remove(client_id);
        let part = moving.as_ref().and_then(|m| {
            self.hand_over(m.sid, m.spilled_upto, self.part_bytes(), |owed| m.was_handed(owed))
        });
        let part = match (part, moving.as_mut()) {
            (Some((mut part, spilled_upto)), Some(moving)) => {
                moving.count(&part, spilled_upto);
                part.subscriptions.clear();
                part
            }
            // Gone meanwhile (expired): nothing more to come.
            _ => HandedSession {
                version: crate::codec::ProtocolVersion::V311,
                expiry: 0,
                subscriptions: Vec::new(),
                messages: Vec::new(),
                qos2_inbound: Vec::new(),
                more: false,
            },
        };
        if let Some(moving) = moving {
            self.moving.insert(client_id.into(), moving);
        }
        self.send_to(bridge, CrossMsg::HandedOver { token, session: Some(Box::new(part)), last: false });
    }

    /// What `sid` is and owes but the messages `skip` picks (those handed over before): in
    /// flight, queued, then spilled after `spill_after`, within `budget` bytes. Also the
    /// last spilled one's sequence number.
    fn hand_over(
        &mut self,
        sid: SessionId,
        spill_after: u64,
        budget: usize,
        skip: impl Fn(&OwedMessage) -> bool,
    ) -> Option<(HandedSession, u64)> {
        let session = self.sessions.get(&sid)?;
        let (version, expiry) = (session.version, session.expiry_interval);
        let subscriptions = session.subscriptions.iter().map(|(f, s)| (f.clone(), *s)).collect();
        let qos2_inbound = session.qos2_inbound();
        let (messages, spilled_upto, more) = self
            .sessions
            .with_journal(&sid, |s, journal| s.owed(journal, spill_after, budget, skip))
            .unwrap_or((Vec::new(), spill_after, false));
        let part = HandedSession { version, expiry, subscriptions, messages, qos2_inbound, more };
        Some((part, spilled_upto))
    }

    /// The takeover of `client_id` did not complete (the node taking it went away before it
    /// had the session in place, or a takeover the watch announced never asked): it stays
    /// here, offline, for its client's next CONNECT to this node.
    pub(super) fn stay(&mut self, client_id: &str) {
        if let Some(moving) = self.moving.remove(client_id) {
            tracing::warn!(client_id, "cluster: the takeover did not complete (its node went, or its request never came): the session stays here");
            // Its barrier will not be passed: what it counted goes.
            self.barriers.markers.remove(&moving.token);
            self.barriers.released.remove(&moving.token);
            if moving.released {
                // It stopped receiving at `Release`: it receives again.
                let subscriptions = self
                    .sessions
                    .get(&moving.sid)
                    .map(|s| s.subscriptions.iter().map(|(f, sub)| (f.clone(), *sub)).collect::<Vec<_>>());
                self.subscribe_adopted(moving.sid, subscriptions.unwrap_or_default());
            }
            if let Some(session) = self.sessions.get_mut(&moving.sid).filter(|s| !s.is_attached()) {
                let expiry = Duration::from_secs(u64::from(session.expiry_interval));
                session.expires_at = Some(Instant::now() + expiry);
            }
        }
    }

    /// A marker of the barrier before the session of takeover `token` leaves (the bridge
    /// had every other shard send one): with all in, and `Release` come, it leaves.
    pub(super) fn marker(&mut self, token: u64) {
        if !self.moving.values().any(|m| m.token == token) {
            // Its takeover was given up (the session stayed): nothing waits for it.
            return;
        }
        *self.barriers.markers.entry(token).or_default() += 1;
        if let Some(client_id) = self.barriers.released.remove(&token) {
            self.release(&client_id, token);
        }
    }

    /// The new node has the session in place and every node and core passed the barrier:
    /// what arrived here since follows it, and it ends here (its will went with its
    /// client, not with this copy). Waits for the other cores' markers first.
    pub(super) fn release(&mut self, client_id: &str, token: u64) {
        let markers = self.barriers.markers.get(&token).copied().unwrap_or(0);
        if markers + 1 < self.shard_count {
            self.barriers.released.insert(token, client_id.into());
            return;
        }
        self.barriers.markers.remove(&token);
        let Some(moving) = self.moving.get_mut(client_id) else { return };
        moving.released = true;
        let sid = moving.sid;
        // Past the barrier every message for it reaches its new copy directly: this one
        // stops receiving, so its remainder ends.
        let filters: Vec<TopicFilter> =
            self.sessions.get(&sid).map(|s| s.subscriptions.keys().cloned().collect()).unwrap_or_default();
        for filter in &filters {
            self.remove_subscription(sid, filter);
        }
        self.send_remainder(client_id, token);
    }

    /// The next part of what a released session owes but did not hand over; with the last,
    /// it ends here.
    fn send_remainder(&mut self, client_id: &str, token: u64) {
        let Some(mut moving) = self.moving.remove(client_id) else { return };
        let sid = moving.sid;
        let rest = self.hand_over(sid, moving.spilled_upto, self.part_bytes(), |m| moving.was_handed(m));
        let more = rest.as_ref().is_some_and(|(part, _)| part.more);
        let count = rest.as_ref().map_or(0, |(part, _)| part.messages.len());
        tracing::debug!(
            client_id,
            messages = count,
            more,
            "cluster: a part of a released session's remainder"
        );
        if let (true, Some((part, upto))) = (more, rest.as_ref()) {
            moving.count(part, *upto);
            self.moving.insert(client_id.into(), moving);
        } else {
            if let Some(session) = self.sessions.get_mut(&sid) {
                session.will = None;
                session.will_at = None;
            }
            // Its shared groups' messages went with the rest: not to another member too.
            self.sessions.with_journal(&sid, |s, journal| drop(s.take_shared_pending(journal)));
            self.end_session(sid);
        }
        if let Some(bridge) = self.bridge() {
            let session = rest.map(|(mut part, _)| {
                part.subscriptions.clear();
                Box::new(part)
            });
            self.send_to(bridge, CrossMsg::HandedOver { token, session, last: true });
        }
    }
}
