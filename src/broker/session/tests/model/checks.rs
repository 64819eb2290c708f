//! What is compared after each step and at the end of a case.

use super::*;

impl Harness {
    /// The session's state is the model's, and keeps its invariants.
    pub(super) fn check_state(&self) -> Check {
        let s = &self.session;
        let model = &self.model;
        type Entry = (u16, u32, QoS, bool, Vec<u32>, Option<usize>, u64, bool, bool);
        let inflight: Vec<Entry> = s
            .inflight
            .iter()
            .map(|e| {
                let n = number(e.message.topic.as_bytes());
                let shared = self.group_of(&e.shared);
                (
                    e.packet_id.get(),
                    n,
                    e.qos,
                    e.retain,
                    e.identifiers.to_vec(),
                    shared,
                    e.seq,
                    e.released,
                    e.resend,
                )
            })
            .collect();
        let want: Vec<Entry> = model
            .inflight
            .iter()
            .map(|e| {
                let m = &e.m;
                (
                    e.packet_id,
                    m.n,
                    m.qos,
                    m.retain,
                    m.identifiers.clone(),
                    m.shared,
                    m.seq,
                    e.released,
                    e.resend,
                )
            })
            .collect();
        check!(inflight == want, "in flight:\n  session {inflight:?}\n  model   {want:?}");
        let queue: Vec<_> = s
            .queue
            .iter()
            .map(|q| {
                let n = number(q.message.topic.as_bytes());
                (n, q.qos, q.retain, q.identifiers.to_vec(), self.group_of(&q.shared), q.seq)
            })
            .collect();
        let want: Vec<_> = model
            .queue
            .iter()
            .map(|m| (m.n, m.qos, m.retain, m.identifiers.clone(), m.shared, m.seq))
            .collect();
        check!(queue == want, "queue:\n  session {queue:?}\n  model   {want:?}");
        check!(s.backlog() == (model.queue.len(), model.inflight.len()), "backlog {:?}", s.backlog());
        check!(s.dropped == model.dropped, "dropped: session {}, model {}", s.dropped, model.dropped);
        check!(s.is_attached() == model.attached, "attached");
        check!(s.qos2_pending(0).0 == model.qos2_in.len(), "inbound QoS 2: {:?}", model.qos2_in);
        check!(self.link.room.get() == model.room || !model.attached, "outbox room");

        // The bounds.
        let bytes: usize = model.queue.iter().map(MMsg::cost).sum();
        check!(s.queued_bytes() == bytes, "queued_bytes {} for a queue of {bytes}", s.queued_bytes());
        check!(bytes <= self.limits.max_queued_bytes, "{bytes} bytes queued");
        check!(s.queue.len() <= self.limits.max_queued_messages, "{} messages queued", s.queue.len());
        if model.attached {
            check!(s.window as usize == model.window, "window {}", s.window);
            // Sent on this connection and not acknowledged: at most the window
            // (MQTT-3.3.4-9); the session may hold more from an earlier connection.
            let sent = self.sent_in_flight();
            let carried = if MIRROR_RESEND_PAST_WINDOW { self.carried } else { 0 };
            check!(
                sent <= model.window.max(carried),
                "{sent} in flight, past min(Receive Maximum, max_inflight) = {}",
                model.window
            );
        }
        let ids: BTreeSet<u16> = s.inflight.iter().map(|e| e.packet_id.get()).collect();
        check!(ids.len() == s.inflight.len(), "packet identifiers in flight repeat");

        // The counts the session keeps beside its collections.
        let marked = s.inflight.iter().filter(|e| e.resend).count();
        check!(s.resends as usize == marked, "resends {} for {marked} marked", s.resends);
        let qos0 = s.queue.iter().filter(|q| q.qos == QoS::AtMostOnce).count();
        check!(s.queued_qos0 as usize == qos0, "queued_qos0 {} for {qos0}", s.queued_qos0);
        if !self.limits.policy.is_lossless() || !s.holds_publishers() {
            check!(!s.congested(&self.limits), "congested without back-pressure");
        }
        check!(
            s.holds_publishers() || s.relieved(&self.limits),
            "not relieved though it holds no publishers"
        );
        Ok(())
    }

    /// Every journaled message gets exactly one `done`, once nothing more is owed for it,
    /// and the journal replays into what the session owes.
    pub(super) fn check_journal(&self) -> Check {
        let mut open = BTreeSet::new();
        let mut done = BTreeSet::new();
        for (i, record) in self.journal.records.iter().enumerate() {
            let named = match record {
                Record::Message { seq, .. } => {
                    check!(*seq != 0 && open.insert(*seq) && !done.contains(seq), "record {i}: {record:?}");
                    continue;
                }
                Record::Sent { seq, .. } | Record::Released { seq, .. } => *seq,
                Record::Done { seq } => {
                    check!(done.insert(*seq), "record {i}: a second done for {seq}");
                    check!(open.remove(seq), "record {i}: done for unknown message {seq}");
                    continue;
                }
                Record::Qos2In(_) | Record::Qos2InDone(_) => continue,
            };
            check!(open.contains(&named), "record {i}: {record:?} names no open message");
        }
        let owed: BTreeSet<u64> = self
            .model
            .inflight
            .iter()
            .map(|e| e.m.seq)
            .chain(self.model.queue.iter().map(|m| m.seq))
            .filter(|seq| *seq != 0)
            .collect();
        check!(open == owed, "journal: open {open:?}, the model owes {owed:?}");
        let (messages, qos2_in) = self.journal.replay();
        let replayed: Vec<_> = messages
            .iter()
            .map(|m| (m.seq, number(m.message.topic.as_bytes()), m.qos, m.packet_id, m.released))
            .collect();
        let mut want: Vec<_> = self
            .model
            .inflight
            .iter()
            .filter(|e| e.m.seq != 0)
            .map(|e| (e.m.seq, e.m.n, e.m.qos, Some(e.packet_id), e.released))
            .chain(self.model.queue.iter().filter(|m| m.seq != 0).map(|m| (m.seq, m.n, m.qos, None, false)))
            .collect();
        want.sort_by_key(|w| w.0);
        check!(replayed == want, "replay:\n  journal {replayed:?}\n  model   {want:?}");
        if self.persistent {
            let want: Vec<u16> = self.model.qos2_in.iter().copied().collect();
            check!(qos2_in == want, "inbound QoS 2 replayed {qos2_in:?}, model {want:?}");
        }
        Ok(())
    }

    /// A client connects and acknowledges everything until nothing is owed.
    pub(super) fn drain(&mut self) -> Check {
        self.step(&Op::Detach { take_shared: false })?;
        self.step(&Op::Attach { receive_maximum: 65_535, room: 1_000, max_payload: None })?;
        for _ in 0..1_000 {
            if self.model.inflight.is_empty() && self.model.queue.is_empty() {
                return Ok(());
            }
            self.step(&Op::Room { room: 0, wake: false })?;
            self.step(&Op::Room { room: 1_000, wake: true })?;
            for e in self.model.inflight.clone() {
                let id = Ack::Id(e.packet_id);
                match (e.m.qos, e.released) {
                    (QoS::AtLeastOnce, _) => self.step(&Op::PubAck(id))?,
                    (_, false) => {
                        self.step(&Op::PubRec(id, false))?;
                        self.step(&Op::PubComp(id))?;
                    }
                    (_, true) => self.step(&Op::PubComp(id))?,
                }
            }
        }
        Err(TestCaseError::fail("the session does not drain"))
    }

    /// Over the whole case: every QoS 1/2 message delivered was sent as new exactly once, in
    /// delivery order (MQTT-4.6.0), unless dropped by a bound or taken back while queued;
    /// the drop counters add up.
    pub(super) fn check_fates(&self) -> Check {
        let mut last = None;
        let mut new_sends: BTreeMap<u32, usize> = BTreeMap::new();
        for out in self.link.sent.borrow().iter() {
            if let Out::Publish { dup: false, qos: QoS::AtLeastOnce | QoS::ExactlyOnce, n, .. } = out {
                check!(last < Some(*n), "message {n} sent after {last:?}");
                last = Some(*n);
                *new_sends.entry(*n).or_default() += 1;
            }
        }
        for (n, fate) in &self.fates {
            let sends = new_sends.get(n).copied().unwrap_or(0);
            if !fate.qos1_2 {
                continue;
            }
            let want = usize::from(!(fate.dropped || fate.taken_queued || fate.sent_before));
            check!(sends == want, "message {n} ({fate:?}) sent as new {sends} times");
        }
        let dropped = self.fates.values().filter(|f| f.dropped || f.discarded).count() as u64;
        check!(
            self.dropped_before + self.session.dropped == dropped,
            "drop counters {} + {} for {dropped} dropped",
            self.dropped_before,
            self.session.dropped
        );
        Ok(())
    }
}
