//! Back-pressure: sessions whose queues passed half their bound hold back the publishers
//! that feed them, until they drain or stop acknowledging.

use super::*;

/// Connected, acknowledging sessions whose queues passed half their bound: the publishers
/// that fed them wait until every one drained (see `Session::congested`).
#[derive(Default)]
pub struct Pressure {
    pub(super) congested: ahash::AHashSet<SessionId>,
    /// A delivery since the last `take_pressure_hit` left its session congested.
    pub(super) hit: bool,
    /// Fired when the last congested session drained.
    pub released: Rc<Event>,
}

impl Shard {
    /// Notes a session a QoS 1/2 delivery left congested.
    pub(super) fn note_congestion(&mut self, sid: SessionId) {
        if self.sessions.get(&sid).is_some_and(|s| s.congested(&self.sessions.limits)) {
            self.pressure.congested.insert(sid);
            self.pressure.hit = true;
        }
    }

    /// Releases the publishers a session held back once it drained, stopped acknowledging
    /// or went away.
    pub(super) fn relieve(&mut self, sid: SessionId) {
        let limits = &self.sessions.limits;
        if !self.pressure.congested.contains(&sid)
            || self.sessions.get(&sid).is_some_and(|s| !s.relieved(limits))
        {
            return;
        }
        self.pressure.congested.remove(&sid);
        if self.pressure.congested.is_empty() {
            self.pressure.released.notify_all();
        }
    }

    /// Whether a delivery since the last call left a session congested; the caller (the
    /// publisher's reader, or a peer's receiver) then waits while `under_pressure`.
    pub fn take_pressure_hit(&mut self) -> bool {
        std::mem::take(&mut self.pressure.hit)
    }

    /// Whether a session other than `except` (the waiting publisher's own: a client that
    /// subscribes to what it publishes must keep reading its acknowledgements) is congested.
    pub fn under_pressure(&self, except: Option<SessionId>) -> bool {
        self.pressure.congested.iter().any(|sid| Some(*sid) != except)
    }

    /// Marks connected sessions that stopped acknowledging for `--shared-ack-timeout`
    /// (and those that started again). A stalled session no longer holds publishers back
    /// (its queue overflows by `--queue-full-policy` instead). A shared-group member that
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

/// Waits until no local subscriber (other than `except`) is congested. A wait that never
/// ends (clients publishing to each other, both congested) is broken by
/// `--shared-ack-timeout`: a client that acknowledges nothing that long stops counting.
pub async fn wait_for_pressure(shard: &ShardRef, except: Option<SessionId>) {
    loop {
        let released = {
            let s = shard.borrow();
            if !s.under_pressure(except) {
                return;
            }
            s.pressure.released.clone()
        };
        released.wait().await;
    }
}
