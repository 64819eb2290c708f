//! A shard's part in client ownership across a cluster: before a CONNECT is served, the
//! node claims the client in etcd and, when another node had it, takes its session over
//! (`moving.rs` is the other node's side): the session comes in parts (its first with its
//! subscriptions and what it had in flight, with their packet identifiers), its routes
//! are committed, then what its old copy received meanwhile follows and ends it there.
//! Messages published meanwhile may reach both copies: each carries an id, so the new
//! copy takes the old one's only where it lacks them, in the order the publisher sent
//! them (the old node's first), before the CONNACK.

use super::*;
use std::collections::VecDeque;

use ahash::AHashSet;

use crate::broker::cross::HandedSession;
use crate::broker::session::OwedMessage;

/// How long a CONNECT waits for its claim (etcd, and the old node's first answer).
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// The ids of a hand-over remembered for copies still on their way (8 bytes and a hash
/// slot each, for `ARRIVAL_MEMORY`): a larger hand-over's are not.
const HANDED_REMEMBERED: usize = 100_000;

/// Claims waiting for the bridge, and sessions arriving from other nodes.
#[derive(Default)]
pub struct Claims {
    pending: AHashMap<u64, Rc<ClaimWait>>,
    /// Claims whose CONNECT is not served yet (answered or not).
    active: Vec<Rc<ClaimWait>>,
    /// Sessions handed over here whose CONNECT waits for their next part or for what
    /// their old copy got since.
    arriving: AHashMap<u64, Rc<Arrival>>,
    /// Sessions that skip copies of what their old copy got, until when (oldest first).
    arrived: VecDeque<(SessionId, Instant)>,
    /// Clients whose session ended since the last tick.
    ended: Vec<Arc<str>>,
}

/// A session coming from another node's hand-over: the ids of the messages handed over so
/// far, and what came last (a part, or what the old copy received after).
#[derive(Default)]
struct Arrival {
    client_id: Arc<str>,
    /// Another node's takeovers of the client that came meanwhile (token, want_session):
    /// served once it is in place.
    deferred: RefCell<Vec<(u64, bool)>>,
    handed: RefCell<AHashSet<u64>>,
    part: RefCell<Option<(Vec<OwedMessage>, bool)>>,
    /// What the old copy received since, as its parts come; then all of it.
    rest_parts: RefCell<Vec<OwedMessage>>,
    rest: RefCell<Option<Vec<OwedMessage>>>,
    done: Event,
}

/// A CONNECT's claim: its outcome when the bridge answered.
pub struct ClaimWait {
    pub token: u64,
    client_id: Arc<str>,
    outcome: RefCell<Option<(bool, Option<Box<HandedSession>>)>>,
    done: Event,
    /// Another node claimed the client after this claim, before its CONNECT was served.
    overtaken: std::cell::Cell<bool>,
    /// Refused: the client's session is another user's.
    denied: std::cell::Cell<bool>,
}

impl Shard {
    /// Asks the bridge to claim `client_id` for this node.
    pub fn start_claim(
        &mut self,
        client_id: &str,
        want_session: bool,
        user: Option<Arc<str>>,
    ) -> Option<Rc<ClaimWait>> {
        let bridge = self.bridge()?;
        let token = self.next_id();
        let client_id: Arc<str> = client_id.into();
        let wait = Rc::new(ClaimWait {
            token,
            client_id: client_id.clone(),
            outcome: RefCell::default(),
            done: Event::default(),
            overtaken: std::cell::Cell::new(false),
            denied: std::cell::Cell::new(false),
        });
        self.claims.pending.insert(token, wait.clone());
        self.claims.active.push(wait.clone());
        let msg = CrossMsg::Claim { shard: self.id, token, client_id, want_session, user };
        self.send_to(bridge, msg);
        Some(wait)
    }

    /// The bridge's answer to claim `token`. Returns a session handed over after its
    /// CONNECT gave up waiting: the caller puts it in place all the same, offline
    /// ([`arrive_offline`]), rather than lose it (its client finds it on its next CONNECT
    /// to this node).
    pub(super) fn claimed(
        &mut self,
        token: u64,
        client_id: &str,
        (ok, denied): (bool, bool),
        session: Option<Box<HandedSession>>,
    ) -> Option<Box<HandedSession>> {
        if let Some(wait) = self.claims.pending.remove(&token) {
            wait.denied.set(denied);
            *wait.outcome.borrow_mut() = Some((ok, session));
            wait.done.notify_all();
            return None;
        }
        if ok && session.is_none() {
            // Made for a CONNECT that gave up: the record goes unless something here
            // serves the client (a tick later, see `unclaim_ended`).
            self.session_ended(client_id);
        }
        session
    }

    /// Puts a session handed over by another node in place, offline, as the CONNECT about
    /// to be served will find it: what it had in flight (same packet identifiers) and the
    /// messages it owes, appended to this node's log when it keeps one (`ids` collects
    /// theirs). Returns it and its subscriptions, taken once all of it is here.
    pub fn adopt_session(
        &mut self,
        client_id: &str,
        handed: HandedSession,
        ids: &mut AHashSet<u64>,
    ) -> (SessionId, Vec<(TopicFilter, Subscription)>) {
        if let Some(old) = self.sessions.of_client(client_id) {
            self.end_session(old);
        }
        let now = Instant::now();
        let sid = self.next_id();
        let mut session = Session::new(sid, client_id.into(), handed.version, now);
        session.expiry_interval = handed.expiry.min(self.config.max_session_expiry);
        // It does not expire while it arrives (`settle_arrival` starts its clock).
        session.expires_at = None;
        let persistent = session.is_persistent();
        self.insert_session(session);
        if let (Some(log), true) = (self.sessions.log.clone(), persistent) {
            let id = log.borrow_mut().session_opened(client_id, handed.version, handed.expiry, None, None);
            log.borrow_mut().offline(id, handed.expiry, false);
            if let Some(entry) = self.sessions.entry_mut(&sid) {
                entry.journal = Some(id);
            }
        }
        self.sessions.with_journal(&sid, |session, journal| {
            for packet_id in handed.qos2_inbound {
                session.receive_qos2(packet_id, journal);
            }
        });
        self.take_part(sid, handed.messages, ids);
        (sid, handed.subscriptions)
    }

    /// A part of a session's messages, in order (`ids` collects theirs).
    fn take_part(&mut self, sid: SessionId, mut messages: Vec<OwedMessage>, ids: &mut AHashSet<u64>) {
        // One read back from a log written before messages had ids gets one here: the next
        // takeover tells it from the others (and this one keeps it where it came).
        for m in messages.iter_mut().filter(|m| !m.message.id.is_known()) {
            m.message.id = crate::broker::message::MessageId::next();
        }
        ids.extend(arrival_ids(&messages));
        self.take_messages(sid, messages);
    }

    /// Subscribes a session handed over here; returns what the announcements wait for.
    pub(super) fn subscribe_adopted(
        &mut self,
        sid: SessionId,
        subscriptions: Vec<(TopicFilter, Subscription)>,
    ) -> Vec<Rc<PendingAcks>> {
        let mut waits = Vec::new();
        for (filter, sub) in subscriptions {
            let sub = Subscription { acl: crate::auth::AclMark::OPEN, ..sub };
            let (pending, _) = match shared::parse(&filter) {
                Some(Ok(key)) => self.join_group(sid, filter, key, sub),
                Some(Err(_)) => continue,
                None => self.subscribe(sid, filter, sub),
            };
            waits.extend(pending);
        }
        waits
    }

    /// Whether `client_id`'s session is arriving here: a takeover of it waits until it is
    /// in place (then `arrive` serves it), so what is still on its way is not lost.
    pub(super) fn defer_take_over(&mut self, client_id: &str, token: u64, want_session: bool) -> bool {
        let Some(arrival) = self.claims.arriving.values().find(|a| &*a.client_id == client_id) else {
            return false;
        };
        arrival.deferred.borrow_mut().push((token, want_session));
        true
    }

    /// CONNECTs here waiting for `client_id` lost it to another node's newer claim.
    pub(super) fn overtake_claims(&mut self, client_id: &str) {
        for wait in self.claims.active.iter().filter(|w| &*w.client_id == client_id) {
            wait.overtaken.set(true);
        }
    }

    /// The next part of the session handed over for claim `token`: to its arrival.
    pub(super) fn part(&mut self, token: u64, messages: Vec<OwedMessage>, more: bool) {
        if let Some(arrival) = self.claims.arriving.get(&token) {
            *arrival.part.borrow_mut() = Some((messages, more));
            arrival.done.notify_all();
        }
    }

    /// Delivers `messages` to `sid` in order; those its old copy had in flight go in
    /// flight here with the same packet identifiers.
    fn take_messages(&mut self, sid: SessionId, messages: Vec<OwedMessage>) {
        for m in messages {
            self.sessions.with(&sid, |session, io| {
                if !session.take_in_flight(&m, io.journal) {
                    session.deliver(&m.message, m.qos, m.retain, &m.identifiers, None, io);
                }
            });
        }
    }

    /// What a session's old copy received after its hand-over: to its arrival (which
    /// waits for all of it). `more`: a part, the next one asked for.
    pub(super) fn leftovers(&mut self, token: u64, messages: Vec<OwedMessage>, more: bool) {
        let Some(arrival) = self.claims.arriving.get(&token) else { return };
        arrival.rest_parts.borrow_mut().extend(messages);
        if more {
            if let Some(bridge) = self.bridge() {
                self.send_to(bridge, CrossMsg::AskPart { token });
            }
            return;
        }
        if let Some(arrival) = self.claims.arriving.remove(&token) {
            *arrival.rest.borrow_mut() = Some(arrival.rest_parts.take());
            arrival.done.notify_all();
        }
    }

    /// A session handed over here before its CONNECT is served: it holds what was handed
    /// over (`handed`: past them, the first `spilled` of its messages in its log), then
    /// what reached it here since; `rest` is what reached its old copy since. Each
    /// publisher's messages reached the old copy first (until its node knew this one's
    /// routes), then both: the session gets `rest` but those it has, then its own again.
    fn settle_arrival(
        &mut self,
        sid: SessionId,
        handed: &AHashSet<u64>,
        spilled: usize,
        rest: Vec<OwedMessage>,
    ) {
        let kept = |m: &Message| handed.contains(&m.id.0);
        let here = self
            .sessions
            .with_journal(&sid, |s, journal| s.take_queued(journal, kept, spilled))
            .unwrap_or_default();
        let old: Vec<u64> = here.iter().map(|m| m.seq).filter(|seq| *seq != 0).collect();
        let has: AHashSet<u64> = arrival_ids(&here);
        let fresh: Vec<_> = rest.into_iter().filter(|m| !has.contains(&m.message.id.0)).collect();
        // Copies still on their way here directly of what came from the old copy are not
        // delivered again: the rest's, and the hand-over's unless it was a log's worth.
        let mut ids = arrival_ids(&fresh);
        if handed.len() <= HANDED_REMEMBERED {
            ids.extend(handed.iter().copied());
        }
        self.take_messages(sid, fresh.into_iter().chain(here).collect());
        self.remember_arrival(sid, ids);
        // Their new records are written: the old ones can go.
        self.sessions.with_journal(&sid, |_, journal| old.into_iter().for_each(|seq| journal.done(seq)));
    }

    /// A session that arrived for no CONNECT (it gave up): its expiry runs from now (unless
    /// it is moving on to another node already).
    fn start_expiry(&mut self, sid: SessionId) {
        let moving = &self.moving;
        let session =
            self.sessions.get_mut(&sid).filter(|s| !s.is_attached() && !moving.contains_key(&*s.client_id));
        if let Some(session) = session {
            let expiry = Duration::from_secs(u64::from(session.expiry_interval));
            session.expires_at = Some(Instant::now() + expiry);
        }
    }

    /// Copies of the messages `ids` (delivered from the old copy) still on their way here
    /// directly are not delivered again.
    fn remember_arrival(&mut self, sid: SessionId, ids: AHashSet<u64>) {
        if let Some(session) = self.sessions.get_mut(&sid) {
            session.arrived_with(ids);
            let until = Instant::now() + crate::broker::session::ARRIVAL_MEMORY;
            self.claims.arrived.push_back((sid, until));
        }
    }

    /// A session ended: its client's owner record may go (see `unclaim_ended`).
    pub(super) fn session_ended(&mut self, client_id: &str) {
        if self.bridge().is_some() {
            self.claims.ended.push(client_id.into());
        }
    }

    /// Clients whose session ended since the last tick and that nothing here serves now
    /// (no session, no CONNECT claiming them): the bridge deletes their owner records, so
    /// etcd holds one per client served, not per client ever seen. Looked at a tick later,
    /// not at once: a CONNECT that takes over a session on this node ends the old one
    /// before it opens its own.
    pub(super) fn unclaim_ended(&mut self) {
        let Some(bridge) = self.bridge() else { return };
        for client_id in std::mem::take(&mut self.claims.ended) {
            let claimed = self.claims.active.iter().any(|w| w.client_id == client_id);
            if !claimed
                && self.sessions.of_client(&client_id).is_none()
                && !self.moving.contains_key(&client_id)
            {
                self.send_to(bridge, CrossMsg::Unclaim { client_id });
            }
        }
    }

    /// Sessions that moved here long enough ago stop looking for copies.
    pub(super) fn forget_arrivals(&mut self, now: Instant) {
        while let Some(&(sid, _)) = self.claims.arrived.front().filter(|(_, until)| *until <= now) {
            self.claims.arrived.pop_front();
            if let Some(session) = self.sessions.get_mut(&sid) {
                session.forget_arrival();
            }
        }
    }
}

/// Before a CONNECT is served in a cluster: claims its client for this node and puts a
/// session handed over from another node in place. `user`: under `--takeover same-user`,
/// the name the client proved (empty: none). `Err`: refuse it with this reason.
pub async fn claim(
    shard: &ShardRef,
    client_id: &str,
    clean_start: bool,
    user: Option<&str>,
) -> Result<(), ReasonCode> {
    if shard.borrow().global.fenced.load(std::sync::atomic::Ordering::Acquire) {
        // No claim while fenced.
        return Err(ReasonCode::ServerUnavailable);
    }
    let user = user.map(Arc::from);
    let Some(wait) = shard.borrow_mut().start_claim(client_id, !clean_start, user) else { return Ok(()) };
    let answered = async {
        while wait.outcome.borrow().is_none() {
            wait.done.wait().await;
        }
    };
    let timed_out = !within(CLAIM_TIMEOUT, answered).await;
    let outcome = wait.outcome.borrow_mut().take();
    shard.borrow_mut().claims.pending.remove(&wait.token);
    // Whatever happens next, this claim's CONNECT is served or refused without waiting
    // again, except for the routes of a session handed over (checked after).
    let done = |shard: &ShardRef| shard.borrow_mut().claims.active.retain(|w| !Rc::ptr_eq(w, &wait));
    let (ok, session) = match (timed_out, outcome) {
        (false, Some(outcome)) => outcome,
        (_, Some(outcome)) => outcome,
        (_, None) => {
            // Given up: the claim is withdrawn where it still waits (for etcd, or behind
            // another CONNECT of the client), so it does not take the client later.
            let bridge = shard.borrow().bridge();
            if let Some(bridge) = bridge {
                shard.borrow_mut().send_to(bridge, CrossMsg::CancelClaim { token: wait.token });
            }
            (false, None)
        }
    };
    if !ok && wait.denied.get() {
        done(shard);
        tracing::info!(client_id, "connection refused: the session is another user's (on another node)");
        return Err(ReasonCode::NotAuthorized);
    }
    if !ok {
        done(shard);
        tracing::warn!(client_id, "connection refused: the cluster could not give this node the client");
        return Err(ReasonCode::ServerUnavailable);
    }
    if let Some(session) = session {
        let arrived = arrive(shard, wait.token, client_id, *session).await;
        if let (Some(sid), true) = (arrived, wait.overtaken.get()) {
            // Refused below: its expiry runs from now.
            shard.borrow_mut().start_expiry(sid);
        }
    }
    done(shard);
    if wait.overtaken.get() {
        tracing::info!(client_id, "connection refused: another node claimed the client meanwhile");
        return Err(ReasonCode::UseAnotherServer);
    }
    Ok(())
}

/// Whether `done` finished within `limit`.
async fn within(limit: Duration, done: impl std::future::Future<Output = ()>) -> bool {
    let done = async {
        done.await;
        true
    };
    futures_lite::future::or(done, async {
        glommio::timer::sleep(limit).await;
        false
    })
    .await
}

fn arrival_ids(messages: &[OwedMessage]) -> AHashSet<u64> {
    messages.iter().map(|m| m.message.id.0).filter(|id| *id != 0).collect()
}

/// [`arrive`] for a session whose CONNECT gave up waiting, in a task of its own.
pub(super) fn arrive_offline(shard: &ShardRef, token: u64, client_id: Arc<str>, session: HandedSession) {
    tracing::warn!(client_id = %client_id, "cluster: a session handed over after its CONNECT gave up: kept offline");
    let shard = shard.clone();
    glommio::spawn_local(async move {
        if let Some(sid) = arrive(&shard, token, &client_id, session).await {
            shard.borrow_mut().start_expiry(sid);
        }
    })
    .detach();
}

/// Puts a session handed over from another node in place (before its CONNECT is served,
/// or offline when that CONNECT gave up): each part as it comes (asked for one by one),
/// then its subscriptions (their routes committed), then what its old copy received
/// meanwhile. No step gives up on the old node while it lives: its copy holds what has
/// not come yet; if it goes, the bridge says so (an empty last part, an empty rest).
/// Returns the session (`None`: it went meanwhile). It does not expire while it arrives:
/// a CONNECT waiting for it attaches to it next (resumed even with an expiry of 0, as a
/// takeover on one node is).
async fn arrive(shard: &ShardRef, token: u64, client_id: &str, session: HandedSession) -> Option<SessionId> {
    let arrival = Rc::new(Arrival { client_id: client_id.into(), ..Arrival::default() });
    shard.borrow_mut().claims.arriving.insert(token, arrival.clone());
    let mut more = session.more;
    let (sid, subscriptions) =
        shard.borrow_mut().adopt_session(client_id, session, &mut arrival.handed.borrow_mut());
    let bridge = shard.borrow().bridge();
    while let (true, Some(bridge)) = (more, bridge) {
        shard.borrow_mut().send_to(bridge, CrossMsg::AskPart { token });
        while arrival.part.borrow().is_none() {
            arrival.done.wait().await;
        }
        let part = arrival.part.borrow_mut().take();
        let Some((messages, next)) = part else { break };
        shard.borrow_mut().take_part(sid, messages, &mut arrival.handed.borrow_mut());
        more = next;
    }
    let spilled = shard.borrow().sessions.get(&sid).map_or(0, |s| s.spilled_count());
    let waits = shard.borrow_mut().subscribe_adopted(sid, subscriptions);
    for pending in waits {
        pending.wait().await;
    }
    if let Some(bridge) = bridge {
        shard.borrow_mut().send_to(bridge, CrossMsg::Adopted { token });
        while arrival.rest.borrow().is_none() {
            arrival.done.wait().await;
        }
    }
    shard.borrow_mut().claims.arriving.remove(&token);
    let rest = arrival.rest.borrow_mut().take().unwrap_or_default();
    shard.borrow_mut().settle_arrival(sid, &arrival.handed.borrow(), spilled, rest);
    for (token, want_session) in arrival.deferred.take() {
        shard.borrow_mut().take_over(arrival.client_id.clone(), token, want_session);
    }
    shard.borrow().sessions.get(&sid).is_some().then_some(sid)
}
