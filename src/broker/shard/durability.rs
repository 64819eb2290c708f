//! Acknowledge after append: what the shard's logs wrote, the confirmations a publisher's
//! acknowledgement waits for, flushing and compaction.

use super::*;

/// What the shard needs to acknowledge after append.
pub struct Durability {
    /// Subscriptions held by sessions this shard logs (persistent ones): while there are
    /// any, peers forward QoS 1/2 publishes here as `DurablePublish` and wait for the append.
    pub(super) subs: usize,
    pub(super) announced: bool,
    /// The announcement that this shard has durable subscriptions, until every peer acked.
    pub(super) pending: Option<Rc<PendingAcks>>,
    /// Which peers have durable subscriptions.
    pub(super) peers: Vec<bool>,
    /// `--fsync always`: confirmations that wait for the next flush of the logs.
    pub awaiting_flush: Vec<Confirm>,
    /// Wakes the flusher (`--fsync always`).
    pub flush_wake: Rc<Notify>,
    pub(super) fsync_always: bool,
}

impl Durability {
    pub(super) fn new(shards: usize, fsync_always: bool) -> Durability {
        Durability {
            subs: 0,
            announced: false,
            pending: None,
            peers: vec![false; shards],
            awaiting_flush: Vec::new(),
            flush_wake: Rc::new(Notify::default()),
            fsync_always,
        }
    }
}

impl Shard {
    /// Compacts the logs for at most `budget` (at least one segment each when there is
    /// work): called every tick, so a sustained stream's consumed segments go as fast as
    /// they fill, without long stalls of the executor.
    pub fn compact_logs(&mut self, budget: Duration) {
        // What was logged since the last tick leaves the process's resident memory: the
        // broker's RSS follows what it holds, not what it wrote.
        self.retained.store.release_pages();
        if let Some(log) = &self.sessions.log {
            log.borrow_mut().release_pages();
        }
        let started = Instant::now();
        let mut retained_done = false;
        let mut sessions_done = self.sessions.log.is_none();
        while !(retained_done && sessions_done) {
            if !retained_done {
                retained_done = !self.retained.store.compact().unwrap_or_else(|err| {
                    tracing::error!(shard = self.id, %err, "retained log compaction failed");
                    false
                });
                self.stats.compactions += u64::from(!retained_done);
            }
            if let (false, Some(log)) = (sessions_done, &self.sessions.log) {
                sessions_done = !log.borrow_mut().compact().unwrap_or_else(|err| {
                    tracing::error!(shard = self.id, %err, "session log compaction failed");
                    false
                });
                self.stats.compactions += u64::from(!sessions_done);
            }
            if started.elapsed() >= budget {
                break;
            }
        }
        // Room made under `--max-disk-bytes`: publishers held only by the disk bound may go
        // on (`Shard::relieve` checks each again).
        if !self.pressure.congested.is_empty() && self.log_has_room() {
            let congested: Vec<SessionId> = self.pressure.congested.iter().copied().collect();
            for sid in congested {
                self.relieve(sid);
            }
        }
    }

    /// What the logs wrote and did not flush yet.
    pub fn take_flush(&mut self) -> Vec<(LogKind, crate::storage::FlushJob)> {
        let mut jobs: Vec<_> =
            self.retained.store.take_flush().map(|j| (LogKind::Retained, j)).into_iter().collect();
        if let Some(log) = &self.sessions.log {
            jobs.extend(log.borrow_mut().take_flush().map(|j| (LogKind::Sessions, j)));
        }
        jobs
    }

    /// A flush job of `kind`'s log finished and deleted these retired segments.
    pub fn flush_done(&mut self, kind: LogKind, deleted: &[u64]) {
        match kind {
            LogKind::Retained => self.retained.store.flushed(deleted),
            LogKind::Sessions => {
                if let Some(log) = &self.sessions.log {
                    log.borrow_mut().flushed(deleted);
                }
            }
        }
    }

    /// Compacted segments wait for a flush to be deleted.
    pub fn has_retired(&self) -> bool {
        self.retained.store.has_retired()
            || self.sessions.log.as_ref().is_some_and(|l| l.borrow().has_retired())
    }

    /// Subscriptions of logged (persistent) sessions changed by `delta`. Peers learn when
    /// this shard starts or stops having any: a QoS 1/2 publish they forward here waits
    /// for its append only then, so clean-session traffic never waits on another core.
    pub(super) fn durable_subscriptions_changed(&mut self, delta: isize) {
        self.durability.subs = self.durability.subs.saturating_add_signed(delta);
        let present = self.durability.subs > 0;
        if present == self.durability.announced {
            return;
        }
        self.durability.announced = present;
        if self.peer_count == 1 {
            return;
        }
        let token = if present {
            let token = self.next_id();
            let pending = Rc::new(PendingAcks::default());
            pending.remaining.set(self.peer_count - 1);
            self.peers.pending_acks.insert(token, pending.clone());
            self.durability.pending = Some(pending);
            token
        } else {
            0
        };
        for peer in self.peers() {
            self.send_to(peer, CrossMsg::Durable { from: self.id, present, token });
        }
    }

    /// While peers have not all acknowledged that this shard has durable subscriptions, what
    /// a SUBACK (or start-up) waits for.
    pub fn durable_announcement(&self) -> Option<Rc<PendingAcks>> {
        self.durability.pending.as_ref().filter(|p| p.remaining.get() > 0).cloned()
    }

    /// With `--fsync always`, when this shard's logs grew since `before`: the
    /// acknowledgement `confirm` waits for the next flush (1 returned), else 0.
    pub fn flush_wait(&mut self, confirm: Confirm, before: LogMark) -> u32 {
        if !self.durability.fsync_always || !self.log_position().wrote_since(before) {
            return 0;
        }
        self.durability.awaiting_flush.push(confirm);
        self.durability.flush_wake.notify();
        1
    }

    /// Records appended to this shard's logs so far, and appends that failed.
    pub fn log_position(&self) -> LogMark {
        let sessions = self.sessions.log.as_ref().map(|log| {
            let log = log.borrow();
            (log.appended(), log.failures())
        });
        let (appended, failures) = sessions.unwrap_or_default();
        LogMark {
            appended: appended + self.retained.store.appended(),
            failures: failures + self.retained.store.failures(),
        }
    }

    /// A peer asked to know when what it sent is written: now, or after the next flush
    /// when `--fsync always` and this shard wrote something for it since `before`; refused
    /// when an append failed since.
    pub(super) fn confirm_written(&mut self, confirm: Confirm, before: LogMark) {
        if self.log_position().failed_since(before) {
            self.refuse_confirm(confirm);
        } else if self.flush_wait(confirm, before) == 0 {
            self.reply_confirm(confirm);
        }
    }

    /// What an acknowledgement waited for could not be appended or flushed: it is not
    /// sent, and the publisher's connection is closed (the client resends). A peer's
    /// confirmation is refused to its shard, which does that.
    pub fn refuse_confirm(&mut self, confirm: Confirm) {
        if confirm.shard != self.id {
            self.send_to(confirm.shard, CrossMsg::Refused(confirm));
            return;
        }
        if let Some(packet_id) = confirm.qos2_packet_id {
            self.sessions.with_journal(&confirm.session, |s, journal| s.release_qos2(packet_id, journal));
        }
        let Some(conn) = self.conns.get(&confirm.conn).cloned() else { return };
        tracing::warn!(client_id = %conn.client_id, "closing: a log could not be written or flushed");
        conn.close(Some(ReasonCode::UnspecifiedError));
    }

    pub fn reply_confirm(&mut self, confirm: Confirm) {
        if confirm.shard == self.id {
            self.confirmed(confirm);
        } else {
            self.send_to(confirm.shard, CrossMsg::Confirmed(confirm));
        }
    }

    /// One of the confirmations an acknowledgement waits for arrived.
    pub(super) fn confirmed(&mut self, confirm: Confirm) {
        if let Some(conn) = self.conns.get(&confirm.conn) {
            conn.confirm(confirm.seq);
        }
    }
}

/// Which of a shard's logs a flush job belongs to.
#[derive(Debug, Clone, Copy)]
pub enum LogKind {
    Retained,
    Sessions,
}
