//! A shard's part in client ownership across a cluster: before a CONNECT is served, the
//! node claims the client in etcd and, when another node had it, takes its session over
//! (that node closes the connection with 0x8E and hands the session over: its
//! subscriptions and what it owes the client). The old node keeps the session, receiving,
//! until the new one has it in place (its routes committed); then what arrived in between
//! follows, and it ends there.

use super::*;
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
    /// Messages it owed when handed over: those after them follow at `Release`.
    handed: usize,
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
            self.adopt_session(client_id, *session);
            if let Some(bridge) = self.bridge() {
                self.send_to(bridge, CrossMsg::Adopted { token });
            }
        }
    }

    /// Puts a session handed over by another node in place, offline, as the CONNECT about
    /// to be served will find it: its subscriptions (returns what their announcements wait
    /// for) and the messages it owes, appended to this node's log when it keeps one.
    pub fn adopt_session(&mut self, client_id: &str, handed: HandedSession) -> Vec<Rc<PendingAcks>> {
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
        self.take_messages(sid, handed.messages);
        waits
    }

    fn take_messages(&mut self, sid: SessionId, messages: Vec<OwedMessage>) {
        for m in messages {
            self.sessions.with(&sid, |session, io| {
                session.deliver(&m.message, m.qos, m.retain, &m.identifiers, None, io);
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
            Some(sid) if want_session => self.hand_over(sid, 0),
            Some(sid) => {
                self.end_session(sid);
                None
            }
            None => None,
        };
        if let (Some(sid), Some(handed)) = (sid, &handed) {
            self.claims.moving.insert(client_id, Moving { sid, handed: handed.messages.len() });
        }
        self.send_to(bridge, CrossMsg::HandedOver { token, session: handed.map(Box::new), last: false });
    }

    /// What `sid` is and owes, past the first `skip` messages.
    fn hand_over(&mut self, sid: SessionId, skip: usize) -> Option<HandedSession> {
        let session = self.sessions.get(&sid)?;
        let (version, expiry) = (session.version, session.expiry_interval);
        let subscriptions = session.subscriptions.iter().map(|(f, s)| (f.clone(), *s)).collect();
        let messages =
            self.sessions.with_journal(&sid, |s, journal| s.owed(journal, skip)).unwrap_or_default();
        Some(HandedSession { version, expiry, subscriptions, messages })
    }

    /// The new node has the session in place: what arrived here since follows it, and it
    /// ends here (its will went with its client, not with this copy).
    pub(super) fn release(&mut self, client_id: &str, token: u64) {
        let Some(moving) = self.claims.moving.remove(client_id) else { return };
        let rest = self.hand_over(moving.sid, moving.handed);
        if let Some(session) = self.sessions.get_mut(&moving.sid) {
            session.will = None;
            session.will_at = None;
        }
        self.end_session(moving.sid);
        if let Some(bridge) = self.bridge() {
            self.send_to(bridge, CrossMsg::HandedOver { token, session: rest.map(Box::new), last: true });
        }
    }

    pub(super) fn leftovers(&mut self, client_id: &str, messages: Vec<OwedMessage>) {
        if let Some(sid) = self.sessions.of_client(client_id) {
            self.take_messages(sid, messages);
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
    let timed_out = futures_lite::future::or(
        async {
            answered.await;
            false
        },
        async {
            glommio::timer::sleep(CLAIM_TIMEOUT).await;
            true
        },
    )
    .await;
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
        let waits = shard.borrow_mut().adopt_session(client_id, *session);
        for pending in waits {
            pending.wait().await;
        }
        let bridge = shard.borrow().bridge();
        if let Some(bridge) = bridge {
            shard.borrow_mut().send_to(bridge, CrossMsg::Adopted { token: wait.token });
        }
    }
    done(shard);
    if wait.overtaken.get() {
        tracing::info!(client_id, "connection refused: another node claimed the client meanwhile");
        return Err(ReasonCode::UseAnotherServer);
    }
    Ok(())
}
