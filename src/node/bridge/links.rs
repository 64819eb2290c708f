//! The bridge's links: frames this node writes to others and their confirmations, and
//! frames other nodes write here.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use super::*;

/// What a message from another node's link is, for the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carried {
    Publish,
    Retained,
    /// An entry of the retained set this node asked for when it joined.
    Synced,
}

/// Bytes a retained-set sync may keep in a link's window before it waits for confirmations.
const SYNC_WINDOW: usize = 8 << 20;

impl Bridge {
    // ---- the links ----

    /// Encodes up to `max` of `node`'s frames not written yet (each once per connection),
    /// in order, into `buf` for its link, whose node reads frames up to `accepts`; QoS 0
    /// ones leave the window as they are taken. Encoded from the window, not copied out
    /// of it. One larger than the node reads is not written but refused (`unwritable`).
    /// Returns how many were taken, and whether some were refused.
    pub fn write_frames(
        &mut self,
        node: NodeId,
        max: usize,
        buf: &mut BytesMut,
        now: Instant,
        accepts: &FrameLimits,
    ) -> (usize, bool) {
        let link = &mut self.nodes[node as usize].out;
        let from = link.written + 1;
        let (mut done, mut too_large, mut taken) = (Vec::new(), Vec::new(), 0);
        for (seq, outgoing) in link.frames.range(from..).take(max) {
            taken += 1;
            let start = buf.len();
            outgoing.frame.encode(buf, now);
            let (size, limit) = (buf.len() - start - 4, accepts.bound_of(&outgoing.frame));
            if size > limit {
                buf.truncate(start);
                too_large.push((*seq, size, limit));
            }
            link.written = *seq;
            if !needs_confirm(&outgoing.frame) {
                done.push(*seq);
            }
        }
        let refused = !too_large.is_empty();
        for (seq, size, limit) in too_large {
            self.unwritable(node, seq, size, limit);
        }
        let link = &mut self.nodes[node as usize].out;
        for seq in done {
            if let Some(gone) = link.frames.remove(&seq) {
                link.bytes -= frame_size(&gone.frame);
            }
        }
        (taken, refused)
    }

    /// Asks every shard for its first page of retained messages for `node`, which joined.
    fn start_sync(&mut self, node: NodeId) {
        tracing::info!(node = %self.nodes[node as usize].name, "cluster: sending the retained set to a joining node");
        self.syncing.insert(node, self.shards);
        for shard in 0..self.shards {
            self.sync_query(node, shard, None);
        }
    }

    fn sync_query(&mut self, node: NodeId, shard: usize, after: Option<crate::topic::TopicName>) {
        let Ok(filter) = TopicFilter::new("#".to_string()) else { return };
        // The joining node's id rides in the cursor's request number.
        let cursor =
            crate::broker::session::RetainedCursor { shard, filter, generation: u64::from(node), after };
        self.send(shard, CrossMsg::RetainQuery { from: self.index, session: 0, cursor });
    }

    /// A page of a shard's retained messages for a joining node: to it, then the next page.
    pub(super) fn sync_page(
        &mut self,
        cursor: crate::broker::session::RetainedCursor,
        messages: Vec<Message>,
        next: Option<crate::topic::TopicName>,
    ) {
        let node = cursor.generation as NodeId;
        let Some(target) = self.nodes.get_mut(node as usize).filter(|n| n.live) else { return };
        let out = &mut target.out;
        for message in messages {
            out.next_seq += 1;
            let seq = out.next_seq;
            out.bytes += window_cost(&message);
            out.frames
                .insert(seq, Outgoing { frame: Frame::SyncEntry { seq, message }, origin: Answers::Nothing });
        }
        if next.is_some() {
            // Paced: the next page is asked for once the link's window has room, so a
            // joining node does not fill it (and pause this node's forwarding publishers).
            if self.nodes[node as usize].out.bytes >= SYNC_WINDOW {
                self.sync_paused.push((node, cursor.shard, next));
                return;
            }
            return self.sync_query(node, cursor.shard, next);
        }
        let Some(left) = self.syncing.get_mut(&node) else { return };
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.syncing.remove(&node);
            let out = &mut self.nodes[node as usize].out;
            out.next_seq += 1;
            let seq = out.next_seq;
            out.frames.insert(seq, Outgoing { frame: Frame::SyncDone { seq }, origin: Answers::Nothing });
        }
    }

    /// `node`'s link connected (`true`) or was lost: after a loss, whatever was not
    /// confirmed is written again on the next connection, in order.
    pub fn link_state(&mut self, node: NodeId, connected: bool) {
        // A node that joins asks its first peer for the retained messages it missed.
        if connected && !self.synced {
            self.synced = true;
            let out = &mut self.nodes[node as usize].out;
            out.next_seq += 1;
            let seq = out.next_seq;
            out.frames.insert(seq, Outgoing { frame: Frame::SyncRetained { seq }, origin: Answers::Nothing });
        }
        let link = &mut self.nodes[node as usize].out;
        self.sys_dirty |= link.connected != connected;
        link.connected = connected;
        link.written = 0;
        if !connected {
            // QoS 0 frames not written yet are dropped with the connection.
            let dropped: Vec<u64> =
                link.frames.iter().filter(|(_, o)| !needs_confirm(&o.frame)).map(|(s, _)| *s).collect();
            for seq in dropped {
                if let Some(gone) = link.frames.remove(&seq) {
                    link.bytes -= frame_size(&gone.frame);
                }
            }
            // SUBACKs do not wait for a node that cannot be reached: its route frames are
            // still written when the link is back, and its watch shows the route anyway.
            let mut routes = Vec::new();
            for outgoing in link.frames.values_mut() {
                if matches!(outgoing.frame, Frame::Route { .. }) {
                    routes.push(std::mem::replace(&mut outgoing.origin, Answers::Nothing));
                }
            }
            for answers in routes {
                self.frame_answered(answers, true);
            }
        }
    }

    /// A confirmation (or refusal) from `node` for one of this node's frames.
    pub fn on_link_reply(&mut self, node: NodeId, frame: Frame) {
        let (seq, ok) = match frame {
            Frame::Confirmed { seq } => (seq, true),
            Frame::Refused { seq } => (seq, false),
            other => {
                tracing::debug!(node, ?other, "unexpected frame on an outgoing link");
                return;
            }
        };
        let link = &mut self.nodes[node as usize].out;
        let Some(outgoing) = link.frames.remove(&seq) else { return };
        link.bytes -= frame_size(&outgoing.frame);
        let room = link.bytes < SYNC_WINDOW / 2;
        self.frame_answered(outgoing.origin, ok);
        if room && self.sync_paused.iter().any(|(n, _, _)| *n == node) {
            let (resume, keep): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.sync_paused).into_iter().partition(|(n, _, _)| *n == node);
            self.sync_paused = keep;
            for (node, shard, after) in resume {
                self.sync_query(node, shard, after);
            }
        }
    }

    /// Frame `seq`, taken for `node`'s link, is larger than the node reads (`size` bytes,
    /// its bound `limit`, as its `Welcome` said): it is not written (the link would close
    /// on it and write it again forever) but refused here — a QoS 1/2 publisher is not
    /// acknowledged, as when the node refuses a frame; QoS 0 is dropped.
    fn unwritable(&mut self, node: NodeId, seq: u64, size: usize, limit: usize) {
        let out = &self.nodes[node as usize].out;
        let Some(frame) = out.frames.get(&seq).map(|o| &o.frame) else { return };
        let (kind, topic) = match frame {
            Frame::Publish { message, .. } => ("publish", Some(message)),
            Frame::Shared { message, .. } => ("shared publish", Some(message)),
            Frame::Retain { message, .. } | Frame::SyncEntry { message, .. } => {
                ("retained message", Some(message))
            }
            Frame::Handover { .. } => ("session hand-over", None),
            _ => ("frame", None),
        };
        let topic = topic.map(|m| m.topic.as_str());
        tracing::warn!(
            node = %self.nodes[node as usize].name,
            size,
            limit,
            topic,
            "cluster: a {kind} is larger than the node reads on its link: refused, not sent"
        );
        match needs_confirm(frame) {
            true => self.on_link_reply(node, Frame::Refused { seq }),
            false => crate::broker::core_counters::dropped(crate::broker::admin::DropReason::TooLarge),
        }
    }

    /// A frame was confirmed (`ok`) or refused: what it answers learns of it.
    pub(super) fn frame_answered(&mut self, answers: Answers, ok: bool) {
        match answers {
            Answers::Nothing => {}
            Answers::Publisher(confirm) => {
                let msg = if ok { CrossMsg::Confirmed(confirm) } else { CrossMsg::Refused(confirm) };
                self.send(confirm.shard, msg);
            }
            Answers::Origin(id) => self.origin_answered(id, ok),
        }
    }

    fn origin_answered(&mut self, id: u64, ok: bool) {
        let Some(origin) = self.origins.get_mut(&id) else { return };
        origin.remaining = origin.remaining.saturating_sub(1);
        if ok && origin.remaining > 0 {
            return;
        }
        let Some(origin) = self.origins.remove(&id) else { return };
        match origin.waiter {
            Waiter::Publish(confirm) => {
                let msg = if ok { CrossMsg::Confirmed(confirm) } else { CrossMsg::Refused(confirm) };
                self.send(confirm.shard, msg);
            }
            Waiter::Route(acks) => self.release_acks(acks),
        }
    }

    fn release_acks(&mut self, acks: Vec<(usize, u64)>) {
        for (shard, token) in acks {
            self.send(shard, CrossMsg::InterestAck { token });
        }
    }

    /// A route of this node is in etcd: every node linked now is told over its link, and
    /// the SUBACKs wait until each routes matching publishes here. (A node not linked now
    /// learns it from etcd's watch.)
    pub(super) fn route_committed(&mut self, filter: TopicFilter) {
        let (acks, done) = match self.committing.get_mut(&filter) {
            Some(writes) => (writes.pop_front().unwrap_or_default(), writes.is_empty()),
            None => (Vec::new(), false),
        };
        if done {
            self.committing.remove(&filter);
        }
        let linked: Vec<NodeId> = (0..self.nodes.len() as NodeId)
            .filter(|n| self.nodes[*n as usize].live && self.nodes[*n as usize].out.connected)
            .collect();
        if linked.is_empty() {
            self.release_acks(acks);
            return;
        }
        let id = self.token();
        self.origins.insert(id, Origin { waiter: Waiter::Route(acks), remaining: linked.len() });
        for node in linked {
            let out = &mut self.nodes[node as usize].out;
            out.next_seq += 1;
            let seq = out.next_seq;
            let frame = Frame::Route { seq, filter: filter.as_str().to_string() };
            out.frames.insert(seq, Outgoing { frame, origin: Answers::Origin(id) });
        }
    }

    /// A frame from a dialling node `(name, incarnation)`. A sequence number seen before
    /// (resent after a reconnection) is not applied again: it is confirmed once its first
    /// application is (or at once, if it was).
    pub fn on_link_frame(&mut self, link: &(String, u64), frame: Frame) {
        let Some(seq) = frame.seq() else {
            tracing::debug!(node = %link.0, ?frame, "unexpected frame on an incoming link");
            return;
        };
        let confirmed = needs_confirm(&frame);
        let state = self.in_links.entry(link.clone()).or_default();
        if seq < state.next_expected {
            if confirmed && !state.waiting.contains_key(&seq) {
                state.replies.push_back(Frame::Confirmed { seq });
            }
            return;
        }
        state.next_expected = seq.saturating_add(1);
        match frame {
            Frame::Publish { message, .. } => self.link_publish(link, seq, message, Carried::Publish),
            Frame::Retain { message, .. } => self.link_publish(link, seq, message, Carried::Retained),
            Frame::SyncEntry { message, .. } => self.link_publish(link, seq, message, Carried::Synced),
            Frame::Route { filter, .. } => self.link_route(link, seq, &filter),
            Frame::Shared { group, message, .. } => self.link_shared(link, seq, &group, message),
            Frame::TakeOver { id, client_id, want_session, .. } => {
                self.await_shards(link, seq, 0, true);
                if let Some(&node) = self.by_name.get(&link.0) {
                    self.their_take_over(node, id, client_id, want_session);
                }
            }
            Frame::Handover { id, last, session, .. } => {
                self.await_shards(link, seq, 0, true);
                if let Some(&node) = self.by_name.get(&link.0) {
                    self.handed_over(node, id, last, session);
                }
            }
            Frame::SyncDone { .. } => {
                self.await_shards(link, seq, 0, true);
                tracing::info!(node = %link.0, "cluster: the retained set is here");
                self.sync_done = true;
                // Behind every entry of the set (one channel per shard keeps order).
                for shard in 0..self.shards {
                    self.send(shard, CrossMsg::RetainSyncDone);
                }
            }
            Frame::SyncRetained { .. } => {
                self.await_shards(link, seq, 0, true);
                if let Some(&node) = self.by_name.get(&link.0) {
                    self.start_sync(node);
                }
            }
            Frame::Adopted { id, .. } => {
                self.await_shards(link, seq, 0, true);
                if let Some(&node) = self.by_name.get(&link.0) {
                    self.their_adopted(node, id);
                }
            }
            Frame::NextPart { id, .. } => {
                self.await_shards(link, seq, 0, true);
                if let Some(&node) = self.by_name.get(&link.0) {
                    self.their_next_part(node, id);
                }
            }
            Frame::Flush { id, .. } => {
                self.await_shards(link, seq, 0, true);
                if let Some(&node) = self.by_name.get(&link.0) {
                    self.answer_flush(node, id);
                }
            }
            Frame::Flushed { id, .. } => {
                self.await_shards(link, seq, 0, true);
                if let Some(&node) = self.by_name.get(&link.0) {
                    self.flushed(node, id);
                }
            }
            Frame::Hello { .. }
            | Frame::Challenge { .. }
            | Frame::Welcome { .. }
            | Frame::Confirmed { .. }
            | Frame::Refused { .. } => {}
        }
    }

    /// Waits for `count` shards' confirmations of frame `seq` (a token to confirm with), or
    /// confirms it now when there is nothing to wait for.
    fn await_shards(
        &mut self,
        link: &(String, u64),
        seq: u64,
        count: usize,
        confirmed: bool,
    ) -> Option<Confirm> {
        if !confirmed {
            return None;
        }
        if count == 0 {
            self.in_links.entry(link.clone()).or_default().replies.push_back(Frame::Confirmed { seq });
            return None;
        }
        let token = self.token();
        self.in_links.entry(link.clone()).or_default().waiting.insert(seq, token);
        self.inbound.insert(token, Inbound { link: link.clone(), seq, remaining: count });
        Some(Confirm { shard: self.index, conn: 0, seq: token, session: 0, qos2_packet_id: None })
    }

    /// A message (`retained`: a retained set) for this node's matching shards.
    fn link_publish(&mut self, link: &(String, u64), seq: u64, message: Message, carried: Carried) {
        let retained = carried != Carried::Publish;
        let shards = match retained {
            true => 1 << placement::owner(message.topic.as_str(), self.shards),
            false => self.local_shards(&message.topic),
        };
        let confirmed = retained || message.qos != QoS::AtMostOnce;
        let confirm = self.await_shards(link, seq, shards.count_ones() as usize, confirmed);
        for shard in each_shard(shards) {
            let msg = match (carried, confirm) {
                (Carried::Retained, confirm) => CrossMsg::RetainSet(message.clone(), confirm),
                (Carried::Synced, confirm) => CrossMsg::RetainSynced(message.clone(), confirm),
                (Carried::Publish, Some(confirm)) => {
                    CrossMsg::DurablePublish { message: message.clone(), confirm }
                }
                (Carried::Publish, None) => CrossMsg::Publish(message.clone()),
            };
            self.send(shard, msg);
        }
    }

    /// A dialling node's new route, ahead of etcd's watch: every shard is told, and the
    /// frame is confirmed once all acknowledged.
    fn link_route(&mut self, link: &(String, u64), seq: u64, filter: &str) {
        let Ok(filter) = TopicFilter::new(filter.to_string().into_bytes()) else {
            tracing::warn!(node = %link.0, filter, "cluster: a route with an invalid filter, refused");
            self.in_links.entry(link.clone()).or_default().replies.push_back(Frame::Refused { seq });
            return;
        };
        self.remote_route(&link.0, filter.clone(), true);
        let Some(Confirm { seq: token, .. }) = self.await_shards(link, seq, self.shards, true) else {
            return;
        };
        let group = shared::parse(&filter).and_then(Result::ok).map(Arc::new);
        for shard in 0..self.shards {
            let (from, filter) = (self.index, filter.clone());
            let msg = match &group {
                Some(key) => {
                    CrossMsg::SharedInterest { from, key: key.clone(), presence: Presence::Online, token }
                }
                None => CrossMsg::Interest { from, filter, add: true, token },
            };
            self.send(shard, msg);
        }
    }

    /// A message another node chose this node for, for one member of a shared group: to
    /// one shard with a connected member (else one with an offline one), in turn.
    fn link_shared(&mut self, link: &(String, u64), seq: u64, group: &str, message: Message) {
        let key = TopicFilter::new(group.to_string().into_bytes())
            .ok()
            .and_then(|f| shared::parse(&f).and_then(Result::ok))
            .map(Arc::new);
        self.group_cursor = self.group_cursor.wrapping_add(1);
        let cursor = self.group_cursor;
        let shard = key.as_ref().and_then(|key| {
            let slots = self.local_groups.get(key)?;
            let best = slots.iter().copied().max().filter(|p| *p != Presence::None)?;
            let candidates: Vec<usize> = (0..slots.len()).filter(|s| slots[*s] == best).collect();
            Some(candidates[cursor % candidates.len()])
        });
        let (Some(key), Some(shard)) = (key, shard) else {
            // Its members here left meanwhile: a QoS 1/2 message is refused, not confirmed
            // (the publisher resends and its node picks again); QoS 0 is dropped.
            crate::broker::core_counters::dropped(crate::broker::admin::DropReason::NoSubscribers);
            if message.qos != QoS::AtMostOnce {
                self.in_links.entry(link.clone()).or_default().replies.push_back(Frame::Refused { seq });
            }
            return;
        };
        let confirm = self.await_shards(link, seq, 1, message.qos != QoS::AtMostOnce);
        self.send(shard, CrossMsg::SharedPublish { key, message, confirm });
    }
}
