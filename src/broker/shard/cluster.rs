//! A shard's part in client ownership across a cluster: before a CONNECT is served, the
//! node claims the client in etcd and, when another node had it, takes its session over
//! (that node closes the connection with 0x8E and hands the session over: its
//! subscriptions, what it owes the client, in flight with its packet identifiers). The
//! old node keeps the session, receiving, until the new one has it in place (its routes
//! committed); then what arrived there in between follows, and it ends there. Messages
//! published meanwhile may reach both copies: each carries an id, so the new copy takes
//! the old one's only where it lacks them, in the order the publisher sent them (the old
//! node's first), before the CONNACK.

use super::*;
use std::collections::VecDeque;

use ahash::AHashSet;

use crate::broker::cross::HandedSession;
use crate::broker::session::OwedMessage;

/// How long a CONNECT waits for its claim (etcd, and the old node's hand-over).
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// Claims waiting for the bridge, and sessions handed to another node but not yet released.
#[derive(Default)]
pub struct Claims {
    pending: AHashMap<u64, Rc<ClaimWait>>,
    /// Claims whose CONNECT is not served yet (answered or not).
    active: Vec<Rc<ClaimWait>>,
    moving: AHashMap<Arc<str>, Moving>,
    /// Sessions handed over here whose CONNECT waits for what their old copy got since.
    arriving: AHashMap<u64, Rc<Arrival>>,
    /// Sessions that skip copies of what their old copy got, until when (oldest first).
    arrived: VecDeque<(SessionId, Instant)>,
}

/// A session put in place from another node's hand-over: the ids of the messages handed
/// over, and (once it came) what the old copy received after.
struct Arrival {
    handed: AHashSet<u64>,
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
}

/// A session handed over to another node, still receiving here.
struct Moving {
    sid: SessionId,
    /// The messages handed over (ids; sequence numbers up to `last_seq` for those read
    /// back from an older log without ids): the others follow at `Release`.
    handed: AHashSet<u64>,
    last_seq: u64,
}

impl Moving {
    fn was_handed(&self, m: &OwedMessage) -> bool {
        match m.message.id.is_known() {
            true => self.handed.contains(&m.message.id.0),
            false => m.seq != 0 && m.seq <= self.last_seq,
        }
    }
}

impl Shard {
    /// Asks the bridge to claim `client_id` for this node.
    pub fn start_claim(&mut self, client_id: &str, want_session: bool) -> Option<Rc<ClaimWait>> {
        let bridge = self.bridge()?;
        let token = self.next_id();
        let client_id: Arc<str> = client_id.into();
        let wait = Rc::new(ClaimWait {
            token,
            client_id: client_id.clone(),
            outcome: RefCell::default(),
            done: Event::default(),
            overtaken: std::cell::Cell::new(false),
        });
        self.claims.pending.insert(token, wait.clone());
        self.claims.active.push(wait.clone());
        let msg = CrossMsg::Claim { shard: self.id, token, client_id, want_session };
        self.send_to(bridge, msg);
        Some(wait)
    }

    pub(super) fn claimed(
        &mut self,
        token: u64,
        client_id: &str,
        ok: bool,
        session: Option<Box<HandedSession>>,
    ) {
        if let Some(wait) = self.claims.pending.remove(&token) {
            *wait.outcome.borrow_mut() = Some((ok, session));
            wait.done.notify_all();
            return;
        }
        // The CONNECT gave up waiting, but the old node handed the session over and ended
        // its copy: kept here, offline, rather than lost (its client finds it on its next
        // CONNECT to this node).
        if let Some(session) = session {
            tracing::warn!(
                client_id,
                "cluster: a session handed over after its CONNECT gave up: kept offline"
            );
            self.adopt_session(client_id, *session, None);
            if let Some(bridge) = self.bridge() {
                self.send_to(bridge, CrossMsg::Adopted { token });
            }
        }
    }

    /// Puts a session handed over by another node in place, offline, as the CONNECT about
    /// to be served will find it: its subscriptions (returns what their announcements wait
    /// for), what it had in flight (same packet identifiers) and the messages it owes,
    /// appended to this node's log when it keeps one. `handed` collects their ids.
    pub fn adopt_session(
        &mut self,
        client_id: &str,
        handed: HandedSession,
        ids: Option<&mut AHashSet<u64>>,
    ) -> Vec<Rc<PendingAcks>> {
        if let Some(old) = self.sessions.of_client(client_id) {
            self.end_session(old);
        }
        let now = Instant::now();
        let sid = self.next_id();
        let mut session = Session::new(sid, client_id.into(), handed.version, now);
        session.expiry_interval = handed.expiry.min(self.config.max_session_expiry);
        session.expires_at = Some(now + Duration::from_secs(u64::from(session.expiry_interval)));
        let persistent = session.is_persistent();
        self.insert_session(session);
        if let (Some(log), true) = (self.sessions.log.clone(), persistent) {
            let id = log.borrow_mut().session_opened(client_id, handed.version, handed.expiry, None, None);
            log.borrow_mut().offline(id, handed.expiry, false);
            if let Some(entry) = self.sessions.entry_mut(&sid) {
                entry.journal = Some(id);
            }
        }
        let mut waits = Vec::new();
        for (filter, sub) in handed.subscriptions {
            let sub = Subscription { acl: crate::auth::AclMark::OPEN, ..sub };
            let (pending, _) = match shared::parse(&filter) {
                Some(Ok(key)) => self.join_group(sid, filter, key, sub),
                Some(Err(_)) => continue,
                None => self.subscribe(sid, filter, sub),
            };
            waits.extend(pending);
        }
        if let Some(ids) = ids {
            ids.extend(handed.messages.iter().map(|m| m.message.id.0).filter(|id| *id != 0));
        }
        self.sessions.with_journal(&sid, |session, journal| {
            for packet_id in handed.qos2_inbound {
                session.receive_qos2(packet_id, journal);
            }
        });
        self.take_messages(sid, handed.messages);
        waits
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

    /// Another node takes `client_id` over: its connection here closes; with a token, the
    /// session is handed over and kept until `Release`.
    pub(super) fn take_over(&mut self, client_id: Arc<str>, token: u64, want_session: bool) {
        // A CONNECT here still waiting to be served lost its client to the newer claim.
        if token != 0 {
            for wait in self.claims.active.iter().filter(|w| w.client_id == client_id) {
                wait.overtaken.set(true);
            }
        }
        let sid = self.sessions.of_client(&client_id);
        if let Some(sid) = sid {
            if let Some(conn) = self.sessions.entry(&sid).and_then(|e| e.conn.clone()) {
                tracing::info!(client_id = %client_id, "session taken over by another node");
                self.end_connection(sid, &conn, ReasonCode::SessionTakenOver);
            }
        }
        let Some(bridge) = self.bridge().filter(|_| token != 0) else { return };
        let handed = match sid {
            Some(sid) if want_session => self.hand_over(sid, |_| false),
            Some(sid) => {
                self.end_session(sid);
                None
            }
            None => None,
        };
        if let (Some(sid), Some(handed)) = (sid, &handed) {
            let ids = handed.messages.iter().map(|m| m.message.id.0).filter(|id| *id != 0).collect();
            let last_seq = handed.messages.iter().map(|m| m.seq).max().unwrap_or(0);
            self.claims.moving.insert(client_id, Moving { sid, handed: ids, last_seq });
        }
        self.send_to(bridge, CrossMsg::HandedOver { token, session: handed.map(Box::new), last: false });
    }

    /// What `sid` is and owes, but the messages `skip` picks.
    fn hand_over(&mut self, sid: SessionId, skip: impl Fn(&OwedMessage) -> bool) -> Option<HandedSession> {
        let session = self.sessions.get(&sid)?;
        let (version, expiry) = (session.version, session.expiry_interval);
        let subscriptions = session.subscriptions.iter().map(|(f, s)| (f.clone(), *s)).collect();
        let qos2_inbound = session.qos2_inbound();
        let messages =
            self.sessions.with_journal(&sid, |s, journal| s.owed(journal, skip)).unwrap_or_default();
        Some(HandedSession { version, expiry, subscriptions, messages, qos2_inbound })
    }

    /// The new node has the session in place: what arrived here since follows it, and it
    /// ends here (its will went with its client, not with this copy).
    pub(super) fn release(&mut self, client_id: &str, token: u64) {
        let Some(moving) = self.claims.moving.remove(client_id) else { return };
        let rest = self.hand_over(moving.sid, |m| moving.was_handed(m));
        if let Some(session) = self.sessions.get_mut(&moving.sid) {
            session.will = None;
            session.will_at = None;
        }
        self.end_session(moving.sid);
        if let Some(bridge) = self.bridge() {
            self.send_to(bridge, CrossMsg::HandedOver { token, session: rest.map(Box::new), last: true });
        }
    }

    /// What a session's old copy received after its hand-over: to the CONNECT waiting for
    /// it, or (it went on without) to the session, but those it has already.
    pub(super) fn leftovers(&mut self, client_id: &str, token: u64, messages: Vec<OwedMessage>) {
        if let Some(arrival) = self.claims.arriving.remove(&token) {
            *arrival.rest.borrow_mut() = Some(messages);
            arrival.done.notify_all();
            return;
        }
        let Some(sid) = self.sessions.of_client(client_id) else { return };
        let owed = self.sessions.with_journal(&sid, |s, journal| s.owed(journal, |_| false));
        let has: AHashSet<u64> =
            owed.iter().flatten().map(|m| m.message.id.0).filter(|id| *id != 0).collect();
        let fresh: Vec<_> = messages.into_iter().filter(|m| !has.contains(&m.message.id.0)).collect();
        let ids = arrival_ids(&fresh);
        self.take_messages(sid, fresh);
        self.remember_arrival(sid, ids);
    }

    /// A session handed over here before its CONNECT is served: its queue holds what was
    /// handed over, then what reached it here since; `rest` is what reached its old copy
    /// since. Each publisher's messages reached the old copy first (until its node knew
    /// this one's routes), then both: the queue becomes the hand-over, then `rest` but
    /// those it has, then the messages of its own.
    fn settle_arrival(&mut self, client_id: &str, handed: &AHashSet<u64>, rest: Vec<OwedMessage>) {
        let Some(sid) = self.sessions.of_client(client_id) else { return };
        let queued =
            self.sessions.with_journal(&sid, |s, journal| s.take_queued(journal)).unwrap_or_default();
        let old: Vec<u64> = queued.iter().map(|m| m.seq).filter(|seq| *seq != 0).collect();
        let (mine, here): (Vec<_>, Vec<_>) =
            queued.into_iter().partition(|m| handed.contains(&m.message.id.0));
        let has: AHashSet<u64> = here.iter().map(|m| m.message.id.0).filter(|id| *id != 0).collect();
        let fresh: Vec<_> = rest.into_iter().filter(|m| !has.contains(&m.message.id.0)).collect();
        let ids = arrival_ids(&fresh);
        self.take_messages(sid, mine.into_iter().chain(fresh).chain(here).collect());
        self.remember_arrival(sid, ids);
        // Their new records are written: the old ones can go.
        self.sessions.with_journal(&sid, |_, journal| old.into_iter().for_each(|seq| journal.done(seq)));
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
/// session handed over from another node in place. `Err`: refuse it with this reason.
pub async fn claim(shard: &ShardRef, client_id: &str, clean_start: bool) -> Result<(), ReasonCode> {
    if shard.borrow().global.fenced.load(std::sync::atomic::Ordering::Acquire) {
        // No claim while fenced.
        return Err(ReasonCode::ServerUnavailable);
    }
    let Some(wait) = shard.borrow_mut().start_claim(client_id, !clean_start) else { return Ok(()) };
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
    if !ok {
        done(shard);
        tracing::warn!(client_id, "connection refused: the cluster could not give this node the client");
        return Err(ReasonCode::ServerUnavailable);
    }
    if let Some(session) = session {
        let mut handed = AHashSet::new();
        let waits = shard.borrow_mut().adopt_session(client_id, *session, Some(&mut handed));
        for pending in waits {
            pending.wait().await;
        }
        let arrival = Rc::new(Arrival { handed, rest: RefCell::default(), done: Event::default() });
        let bridge = shard.borrow().bridge();
        if let Some(bridge) = bridge {
            shard.borrow_mut().claims.arriving.insert(wait.token, arrival.clone());
            shard.borrow_mut().send_to(bridge, CrossMsg::Adopted { token: wait.token });
        }
        within(CLAIM_TIMEOUT, async {
            while arrival.rest.borrow().is_none() {
                arrival.done.wait().await;
            }
        })
        .await;
        shard.borrow_mut().claims.arriving.remove(&wait.token);
        let rest = arrival.rest.borrow_mut().take();
        match rest {
            Some(rest) => shard.borrow_mut().settle_arrival(client_id, &arrival.handed, rest),
            None => tracing::warn!(
                client_id,
                "cluster: the old node's last messages did not come in time: they follow when they do"
            ),
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
