//! One input of a case, applied to the session and to the model alike.

use super::*;

impl Harness {
    /// One input, to the session and to the model.
    pub(super) fn step(&mut self, op: &Op) -> Check {
        let attached = self.model.attached;
        match *op {
            Op::Deliver { qos, shared, retain, .. } => {
                let (message, m) = self.new_message(op);
                let key = shared.map(|g| self.groups[g].clone());
                let identifiers = m.identifiers.clone();
                let got = self.with_io(|s, io| s.deliver(&message, qos, retain, &identifiers, key, io));
                let want = self.model_deliver(m)?;
                check!(got == want, "deliver: {got:?}, the model says {want:?}");
            }
            Op::PubAck(ack) if attached => {
                let id = self.resolve(ack, |e| e.m.qos == QoS::AtLeastOnce);
                let got = self.with_io(|s, io| s.on_puback(id, io));
                let want = self.model_remove(id.get(), |e| e.m.qos == QoS::AtLeastOnce);
                self.model_pump()?;
                check!(got == want, "PUBACK {id}: {got}, the model says {want}");
            }
            Op::PubRec(ack, error) if attached => {
                let id = self.resolve(ack, |e| e.m.qos == QoS::ExactlyOnce && !e.released);
                let reason = if error { ReasonCode::QuotaExceeded } else { ReasonCode::Success };
                self.with_io(|s, io| s.on_pubrec(id, reason, io));
                let index = self
                    .model
                    .inflight
                    .iter()
                    .position(|e| e.packet_id == id.get() && e.m.qos == QoS::ExactlyOnce);
                match index {
                    None => {
                        let reason = ReasonCode::PacketIdentifierNotFound;
                        self.expect(Out::PubRel { packet_id: id.get(), reason })?;
                    }
                    Some(index) if error => {
                        // Refused (v5): the exchange ends here (MQTT-4.3.3).
                        self.model.inflight.remove(index);
                        self.model.acks = self.model.acks.wrapping_add(1);
                        self.model_pump()?;
                    }
                    Some(index) => {
                        let entry = &mut self.model.inflight[index];
                        entry.released = true;
                        entry.resend = false;
                        self.model.acks = self.model.acks.wrapping_add(1);
                        self.expect(Out::PubRel { packet_id: id.get(), reason: ReasonCode::Success })?;
                    }
                }
            }
            Op::PubComp(ack) if attached => {
                let id = self.resolve(ack, |e| e.released);
                let got = self.with_io(|s, io| s.on_pubcomp(id, io));
                let want = self.model_remove(id.get(), |e| e.released);
                self.model_pump()?;
                check!(got == want, "PUBCOMP {id}: {got}, the model says {want}");
            }
            Op::PubAck(_) | Op::PubRec(..) | Op::PubComp(_) => {}
            Op::Attach { receive_maximum, room, max_payload } => {
                if attached {
                    // A new connection takes the session over: the old one ends first.
                    self.step(&Op::Detach { take_shared: false })?;
                }
                // A new connection, with an outbox of its own.
                self.link.room.set(room);
                self.link.wants_room.set(false);
                self.link.max_payload.set(max_payload);
                self.model.attached = true;
                self.model.room = room;
                self.model.max_payload = max_payload;
                self.model.window = receive_maximum.min(self.limits.max_inflight).max(1);
                self.with_io(|s, io| s.attach(ProtocolVersion::V5, receive_maximum, io));
                for entry in &mut self.model.inflight {
                    entry.resend = true;
                    entry.sent_here = false;
                }
                self.carried = self.model.inflight.len();
                self.model_pump()?;
            }
            Op::Detach { take_shared } if attached => {
                self.session.detach();
                self.model.attached = false;
                for entry in &mut self.model.inflight {
                    entry.resend = false;
                }
                if take_shared {
                    self.step(&Op::TakeShared)?;
                }
            }
            Op::Detach { .. } => {}
            Op::TakeShared if !attached => {
                let got = self.session.take_shared_pending(&mut self.journal);
                let got: Vec<_> = got
                    .iter()
                    .map(|(key, m)| (self.group_of(&Some(key.clone())).unwrap(), number(m.topic.as_bytes())))
                    .collect();
                let want = self.model_take_shared(|_| true, true);
                check!(got == want, "take_shared_pending: {got:?}, the model says {want:?}");
            }
            Op::TakeShared => {}
            Op::Room { room, wake } if attached => {
                self.link.room.set(room);
                self.model.room = room;
                let wake = wake && room > 0;
                // The writer wakes the shard once the outbox drained, if the session asked.
                if wake && self.link.wants_room.replace(false) {
                    self.with_io(|s, io| s.pump(io));
                }
                // Whether the session asked or not, anything that waited for room must go
                // out now: the model pumps.
                if wake {
                    self.model_pump()?;
                }
            }
            Op::Room { .. } => {}
            Op::Tick(secs) => {
                self.clock += secs;
                let now = self.base + Duration::from_secs(self.clock);
                self.link.now.set(now);
                let got = self.session.check_stalled(now, Duration::from_secs(STALL_TIMEOUT));
                self.session.stalled = got;
                let model = &mut self.model;
                let want = if !model.attached || model.inflight.is_empty() || model.acks != model.watch.0 {
                    model.watch = (model.acks, self.clock);
                    false
                } else {
                    self.clock - model.watch.1 >= STALL_TIMEOUT
                };
                check!(got == want, "check_stalled at {}s: {got}, the model says {want}", self.clock);
            }
            Op::TakeStalled { in_flight, group, both } if attached => {
                let keys: Vec<_> = self
                    .groups
                    .iter()
                    .enumerate()
                    .filter(|(g, _)| both || *g == group)
                    .map(|(_, k)| k.clone())
                    .collect();
                let got = self.session.take_shared_stalled(
                    in_flight,
                    |key| keys.iter().any(|k| **k == *key),
                    &mut self.journal,
                );
                let got: Vec<_> = got
                    .iter()
                    .map(|(key, m)| (self.group_of(&Some(key.clone())).unwrap(), number(m.topic.as_bytes())))
                    .collect();
                let take = |g: usize| both || g == group;
                // QoS 1 in flight is handed over as a copy and stays in flight, no longer
                // tied to its group; QoS 2 in flight stays with this client (MQTT-4.8.2-4).
                let mut want = Vec::new();
                if in_flight {
                    for e in &mut self.model.inflight {
                        if e.m.qos == QoS::AtLeastOnce && e.m.shared.is_some_and(take) {
                            want.push((e.m.shared.take().unwrap(), e.m.n));
                        }
                    }
                }
                want.extend(self.model_take_shared(take, false));
                check!(got == want, "take_shared_stalled: {got:?}, the model says {want:?}");
            }
            Op::TakeStalled { .. } => {}
            Op::ReceiveQos2(id) => {
                let got = self.session.receive_qos2(id, &mut self.journal);
                let want = self.model.qos2_in.insert(id);
                check!(got == want, "receive_qos2({id}): {got}, the model says {want}");
            }
            Op::ReleaseQos2(id) => {
                let got = self.session.release_qos2(id, &mut self.journal);
                let want = self.model.qos2_in.remove(&id);
                check!(got == want, "release_qos2({id}): {got}, the model says {want}");
            }
            Op::Restart if self.persistent => {
                self.restart();
                // What is owed survives; what tied it to a connection or a group does not.
                let model = &mut self.model;
                model.attached = false;
                for entry in &mut model.inflight {
                    entry.resend = false;
                    entry.m.shared = None;
                }
                for m in &mut model.queue {
                    m.shared = None;
                }
                // Queued QoS 0 messages are not journaled.
                let lost: Vec<_> = model.queue.iter().filter(|m| m.seq == 0).map(|m| m.n).collect();
                model.queue.retain(|m| m.seq != 0);
                for n in lost {
                    self.fates.entry(n).or_default().dropped = true;
                    self.dropped_before += 1;
                }
                self.model.acks = 0;
                self.model.watch = (0, self.clock);
            }
            Op::Restart => {}
        }
        check!(
            self.seen == self.link.sent.borrow().len(),
            "packets the model did not expect: {:?}",
            &self.link.sent.borrow()[self.seen..]
        );
        self.check_state()?;
        self.check_journal()
    }

    /// A new session from what the journal recovers, as the shard restores one.
    pub(super) fn restart(&mut self) {
        self.dropped_before += self.session.dropped;
        let now = self.base + Duration::from_secs(self.clock);
        let mut session = Session::new(1, "c".into(), ProtocolVersion::V5, now);
        session.expiry_interval = 60;
        let (messages, qos2_in) = self.journal.replay();
        session.restore_qos2(qos2_in);
        for m in messages {
            session.restore(m, None);
        }
        self.session = session;
        self.model.dropped = 0;
    }

    /// Starts from a restored session: the prelude's journal, replayed.
    pub(super) fn prelude(&mut self, prelude: &Prelude) {
        let mut packet_ids = Vec::new();
        let mut next = prelude.start;
        for _ in 0..prelude.sent.len() + usize::from(prelude.straggler) {
            packet_ids.push(next);
            next = next.wrapping_add(1).max(1);
        }
        if prelude.straggler {
            // Sent first, and left unacknowledged a whole turn: the others came after it
            // and it is the next in the sequence again.
            packet_ids.rotate_right(1);
        }
        let qos_of = |i: usize| prelude.sent.get(i).copied().unwrap_or((QoS::AtLeastOnce, false));
        for (i, packet_id) in packet_ids.into_iter().enumerate() {
            let (qos, released) = qos_of(i);
            let released = released && qos == QoS::ExactlyOnce;
            let m = self.prelude_message(i as u32, qos);
            self.journal.records.push(Record::Sent { seq: m.seq, packet_id });
            if released {
                self.journal.records.push(Record::Released { seq: m.seq, packet_id });
            }
            self.fates.entry(m.n).or_default().sent_before = true;
            self.model.inflight.push(MInflight { m, packet_id, released, resend: false, sent_here: false });
        }
        for i in 0..prelude.queued {
            let m = self.prelude_message(50 + i as u32, QoS::AtLeastOnce);
            self.model.queue.push_back(m);
        }
        self.restart();
    }

    pub(super) fn prelude_message(&mut self, n: u32, qos: QoS) -> MMsg {
        let seq = self.journal.message(qos, false, &[], &message_of(n, 0));
        self.model.last_seq = seq;
        self.fates.insert(n, Fate { qos1_2: true, ..Fate::default() });
        MMsg { n, qos, retain: false, identifiers: Vec::new(), shared: None, seq, payload: 0, expires: None }
    }
}
