//! The other shards: this shard's outboxes to them and what it does with their messages.

use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::broker::cross::{HELD, MAX_BATCH};

/// Messages sent to a peer per time stamp kept (see `Peers::stamps`).
const STAMP_EVERY: u64 = 64;

/// This shard's side of the mesh.
pub struct Peers {
    /// Per peer: messages waiting for the sender task.
    pub outbox: Vec<crate::broker::outbox::Outbox>,
    /// Bytes held by each per-peer outbox (`CrossMsg::size`).
    pub bytes: Vec<usize>,
    pub wake: Vec<Rc<Notify>>,
    /// Fired whenever a sender task moved a batch: publishers paused on backlog retry.
    pub drained: Rc<Event>,
    /// Per peer: messages sent to it so far, and how many its receiver has applied
    /// (written by the peer's core, read here): what is between them waits in the outbox
    /// or the channel.
    pub sent: Vec<u64>,
    pub applied: Vec<Arc<AtomicU64>>,
    /// Per peer: bytes of messages its sender task moved from the outbox into the channel,
    /// in all (counted per batch).
    pub moved: Vec<u64>,
    /// In a cluster: bytes of messages the node bridge took from this shard's channel, in
    /// all (written on the bridge's core), and this shard's share of `--node-link-buffer`:
    /// what it handed the bridge and the bridge has not taken (outbox and channel) pauses
    /// its forwarding publishers past it.
    pub bridge_taken: Arc<AtomicU64>,
    pub bridge_share: usize,
    /// Per peer: when some messages still unapplied were sent, one stamp per
    /// `STAMP_EVERY` messages (index of the first of them, time): the front one tells how
    /// long the oldest message in flight to that peer has waited.
    stamps: Vec<std::collections::VecDeque<(u64, Instant)>>,
    /// Announcements waiting for every peer's acknowledgement, by token.
    pub(super) pending_acks: AHashMap<u64, Rc<PendingAcks>>,
    /// Peers that said `Ready` at start-up, and the event that wakes the wait for them.
    pub ready: usize,
    pub ready_event: Rc<Event>,
}

impl Peers {
    /// `bridge_share`: in a cluster, this shard's share of `--node-link-buffer`.
    pub(super) fn new(shards: usize, bridge_share: Option<usize>) -> Peers {
        Peers {
            outbox: (0..shards).map(|_| Default::default()).collect(),
            bytes: vec![0; shards],
            wake: (0..shards).map(|_| Rc::new(Notify::default())).collect(),
            drained: Rc::new(Event::default()),
            sent: vec![0; shards],
            applied: (0..shards).map(|_| Arc::new(AtomicU64::new(0))).collect(),
            moved: vec![0; shards],
            bridge_taken: Arc::new(AtomicU64::new(0)),
            bridge_share: bridge_share.unwrap_or(usize::MAX),
            stamps: (0..shards).map(|_| std::collections::VecDeque::new()).collect(),
            pending_acks: AHashMap::new(),
            ready: 0,
            ready_event: Rc::new(Event::default()),
        }
    }
}

impl Shard {
    /// Every other shard's index.
    pub(super) fn peers(&self) -> impl Iterator<Item = usize> {
        let me = self.id;
        (0..self.peer_count).filter(move |p| *p != me)
    }

    pub fn send_to(&mut self, peer: usize, msg: CrossMsg) {
        let peers = &mut self.peers;
        let size = msg.size();
        peers.bytes[peer] += size;
        peers.outbox[peer].push_back(msg, size);
        peers.wake[peer].notify();
        let sent = peers.sent[peer];
        peers.sent[peer] += 1;
        if self.config.mesh_max_wait.is_zero() {
            return;
        }
        // Only the time bound needs stamps: one clock read, and one look at the peer's
        // count (a cache line its core writes), per `STAMP_EVERY` messages.
        let stamps = &mut peers.stamps[peer];
        if stamps.back().is_none_or(|(first, _)| sent - first >= STAMP_EVERY) {
            let applied = peers.applied[peer].load(Ordering::Acquire) & !HELD;
            while stamps.front().is_some_and(|(first, _)| *first < applied) {
                stamps.pop_front();
            }
            stamps.push_back((sent, Instant::now()));
        }
    }

    /// Whether publishers on this shard should pause until a peer drains: its outbox is
    /// over `--mesh-backlog` (or 64 MiB); or its receiver waits for a congested subscriber
    /// and holds unapplied messages from here worth one subscriber's queue
    /// (`--max-queued-messages`), or whose oldest waited `--mesh-max-wait-ms`. Behind a held
    /// receiver nothing moves, so what waits there is latency with nothing to show for it;
    /// one message may fan out to many deliveries, so the outbox's count alone let it grow
    /// to seconds. A peer that is merely busy is not held: its backlog is throughput.
    pub fn mesh_backlogged(&self) -> bool {
        let max_wait = self.config.mesh_max_wait;
        let mut now = None;
        if self.cluster_backlogged() {
            return true;
        }
        (0..self.peer_count).any(|peer| {
            let peers = &self.peers;
            if peers.outbox[peer].len() >= self.config.mesh_backlog || peers.bytes[peer] >= MAX_BACKLOG_BYTES
            {
                return true;
            }
            let raw = peers.applied[peer].load(Ordering::Acquire);
            if raw & HELD == 0 {
                return false;
            }
            let applied = raw & !HELD;
            if peers.sent[peer] - applied >= self.sessions.limits.max_queued_messages.max(MAX_BATCH) as u64 {
                return true;
            }
            if max_wait.is_zero() {
                return false;
            }
            // Stamps are in order: the first one past `applied` is the oldest in flight.
            peers.stamps[peer].iter().find(|(first, _)| *first >= applied).is_some_and(|(_, at)| {
                now.get_or_insert_with(Instant::now).saturating_duration_since(*at) >= max_wait
            })
        })
    }

    /// Whether the links to other nodes hold their half of `--node-link-buffer` (set by the
    /// node bridge), or this shard handed the bridge its share of the other half and the
    /// bridge has not taken it yet: publishers that forwarded something pause, as for a
    /// peer core's backlog. (The bridge sets the flag before it counts what it took as
    /// taken, so the bytes are never out of both counts.)
    fn cluster_backlogged(&self) -> bool {
        if self.bridge().is_none() {
            return false;
        }
        self.global.cluster_backlogged.load(Ordering::Relaxed)
            || self.handed_to_bridge() >= self.peers.bridge_share
    }

    /// Bytes of messages handed to the node bridge that it has not taken yet: in the outbox
    /// to it and in the channel.
    pub fn handed_to_bridge(&self) -> usize {
        let Some(bridge) = self.bridge() else { return 0 };
        let taken = self.peers.bridge_taken.load(Ordering::Acquire);
        let in_channel = self.peers.moved[bridge].saturating_sub(taken);
        self.peers.bytes[bridge] + in_channel as usize
    }

    /// Whether a peer holds messages from this shard it has not applied yet.
    #[cfg(test)]
    pub fn mesh_in_flight(&self) -> bool {
        (0..self.peer_count)
            .any(|p| self.peers.sent[p] > self.peers.applied[p].load(Ordering::Acquire) & !HELD)
    }

    /// Whether a peer's receiver is held with messages from this shard unapplied: the
    /// only pause its progress ends without waking anything here (an outbox over its
    /// bound is released by the sender task's `drained`), so the only one polled.
    pub fn mesh_held(&self) -> bool {
        self.cluster_backlogged()
            || (0..self.peer_count).any(|p| {
                let raw = self.peers.applied[p].load(Ordering::Acquire);
                raw & HELD != 0 && self.peers.sent[p] > raw & !HELD
            })
    }
}

/// Applies one message from a peer shard; a connection handed over is returned, for the
/// caller to serve.
pub fn handle_cross(shard: &ShardRef, msg: CrossMsg) -> Option<Box<Handoff>> {
    match msg {
        CrossMsg::Publish(message) => {
            shard.borrow_mut().deliver_local(None, &message);
        }
        CrossMsg::DurablePublish { message, confirm } => {
            let mut s = shard.borrow_mut();
            let before = s.log_position();
            s.deliver_local(None, &message);
            s.confirm_written(confirm, before);
        }
        CrossMsg::Confirmed(confirm) => shard.borrow_mut().confirmed(confirm),
        CrossMsg::Refused(confirm) => shard.borrow_mut().refuse_confirm(confirm),
        CrossMsg::Durable { from, present, token } => {
            let mut s = shard.borrow_mut();
            if let Some(slot) = s.durability.peers.get_mut(from) {
                *slot = present;
            }
            if token != 0 {
                s.send_to(from, CrossMsg::InterestAck { token });
            }
        }
        CrossMsg::RetainSet(message, confirm) => retain(shard, message, confirm, false),
        CrossMsg::RetainSynced(message, confirm) => retain(shard, message, confirm, true),
        CrossMsg::RetainSyncDone => shard.borrow_mut().retained.written = None,
        CrossMsg::RetainQuery { from, session, cursor } => {
            let mut s = shard.borrow_mut();
            let mut messages = Vec::new();
            let next = s.retained.store.matching(
                &cursor.filter,
                cursor.after.as_ref(),
                RETAINED_PAGE,
                &mut messages,
            );
            s.send_to(from, CrossMsg::RetainReply { session, cursor, messages, next });
        }
        CrossMsg::RetainReply { session, cursor, messages, next } => {
            let mut s = shard.borrow_mut();
            if let Some(waiting) = s.sessions.get_mut(&session) {
                waiting.retained.asked = false;
            }
            s.deliver_retained(session, cursor, messages, next);
            s.continue_retained(session);
        }
        CrossMsg::Interest { from, filter, add, token } => {
            let mut s = shard.borrow_mut();
            if add {
                s.router.interest.insert(&filter, from, ());
            } else {
                s.router.interest.remove(&filter, &from);
            }
            if token != 0 {
                s.send_to(from, CrossMsg::InterestAck { token });
            }
        }
        CrossMsg::SharedInterest { from, key, presence, token } => {
            let mut s = shard.borrow_mut();
            let id = match s.shared.groups.id(&key) {
                Some(id) => Some(id),
                None if presence != Presence::None => Some(s.group_entry(&key)),
                None => None,
            };
            if let Some(id) = id {
                if let Some(slot) = s.shared.groups.get_mut(id).and_then(|g| g.remote.get_mut(from)) {
                    *slot = presence;
                }
                if presence == Presence::None {
                    s.forget_group_if_unused(id);
                }
            }
            if token != 0 {
                s.send_to(from, CrossMsg::InterestAck { token });
            }
        }
        CrossMsg::SharedPublish { key, message, confirm } => {
            let mut s = shard.borrow_mut();
            let before = s.log_position();
            let id = s.shared.groups.id(&key);
            if !id.is_some_and(|id| s.deliver_shared_local(id, &message, None)) {
                s.stats.messages_dropped += 1;
            }
            if let Some(confirm) = confirm {
                s.confirm_written(confirm, before);
            }
        }
        CrossMsg::Sys(snapshot) => {
            if let Some(sys) = shard.borrow_mut().sys.aggregator.as_mut() {
                sys.record(*snapshot);
            }
        }
        CrossMsg::InterestAck { token } => {
            let mut s = shard.borrow_mut();
            if let Some(pending) = s.peers.pending_acks.get(&token).cloned() {
                let left = pending.remaining.get().saturating_sub(1);
                pending.remaining.set(left);
                if left == 0 {
                    s.peers.pending_acks.remove(&token);
                    pending.done.notify_all();
                }
            }
        }
        CrossMsg::Ready => {
            let mut s = shard.borrow_mut();
            s.peers.ready += 1;
            s.peers.ready_event.notify_all();
        }
        CrossMsg::Handoff(handoff) => return Some(handoff),
        CrossMsg::Fence => shard.borrow_mut().close_all(ReasonCode::UseAnotherServer),
        CrossMsg::Claimed { token, client_id, ok, denied, session } => {
            let late = shard.borrow_mut().claimed(token, &client_id, (ok, denied), session);
            if let Some(session) = late {
                super::cluster::arrive_offline(shard, token, client_id, *session);
            }
        }
        CrossMsg::TakeOver { client_id, token, want_session } => {
            shard.borrow_mut().take_over(client_id, token, want_session)
        }
        CrossMsg::Release { client_id, token } => shard.borrow_mut().release(&client_id, token),
        CrossMsg::Leftovers { token, messages, more, .. } => {
            shard.borrow_mut().leftovers(token, messages, more)
        }
        CrossMsg::Part { token, messages, more, .. } => shard.borrow_mut().part(token, messages, more),
        CrossMsg::NextPart { client_id, token } => shard.borrow_mut().next_part(&client_id, token),
        CrossMsg::Stay { client_id } => shard.borrow_mut().stay(&client_id),
        CrossMsg::Unserved { client_id } => shard.borrow_mut().session_ended(&client_id),
        CrossMsg::SendMarker { to, token } => shard.borrow_mut().send_to(to, CrossMsg::Marker { token }),
        CrossMsg::Marker { token } => shard.borrow_mut().marker(token),
        // For the node bridge: a shard never gets these.
        CrossMsg::Claim { .. }
        | CrossMsg::AskPart { .. }
        | CrossMsg::Unclaim { .. }
        | CrossMsg::CancelClaim { .. }
        | CrossMsg::Adopted { .. }
        | CrossMsg::HandedOver { .. } => {}
    }
    None
}

/// Stores a retained message for its owner shard (`synced`: an entry of the set this node
/// joined with) and confirms it once what it wrote to the log is there.
fn retain(shard: &ShardRef, message: Message, confirm: Option<Confirm>, synced: bool) {
    let mut s = shard.borrow_mut();
    let before = s.log_position();
    match synced {
        true => s.store_synced(message),
        false => s.store_retained(message),
    }
    if let Some(confirm) = confirm {
        s.confirm_written(confirm, before);
    }
}
