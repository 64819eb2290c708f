//! The other shards: this shard's outboxes to them and what it does with their messages.

use super::*;

/// This shard's side of the mesh.
pub struct Peers {
    /// Per peer: messages waiting for the sender task.
    pub outbox: Vec<std::collections::VecDeque<CrossMsg>>,
    /// Bytes held by each per-peer outbox (`CrossMsg::size`).
    pub bytes: Vec<usize>,
    pub wake: Vec<Rc<Notify>>,
    /// Fired whenever a sender task moved a batch: publishers paused on backlog retry.
    pub drained: Rc<Event>,
    /// Announcements waiting for every peer's acknowledgement, by token.
    pub(super) pending_acks: AHashMap<u64, Rc<PendingAcks>>,
    /// Peers that said `Ready` at start-up, and the event that wakes the wait for them.
    pub ready: usize,
    pub ready_event: Rc<Event>,
}

impl Peers {
    pub(super) fn new(shards: usize) -> Peers {
        Peers {
            outbox: (0..shards).map(|_| std::collections::VecDeque::new()).collect(),
            bytes: vec![0; shards],
            wake: (0..shards).map(|_| Rc::new(Notify::default())).collect(),
            drained: Rc::new(Event::default()),
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
        (0..self.shard_count).filter(move |p| *p != me)
    }

    pub fn send_to(&mut self, peer: usize, msg: CrossMsg) {
        self.peers.bytes[peer] += msg.size();
        self.peers.outbox[peer].push_back(msg);
        self.peers.wake[peer].notify();
    }

    /// Whether publishers on this shard should pause until a peer drains.
    pub fn mesh_backlogged(&self) -> bool {
        self.peers
            .outbox
            .iter()
            .zip(&self.peers.bytes)
            .any(|(q, b)| q.len() >= self.config.mesh_backlog || *b >= MAX_BACKLOG_BYTES)
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
        CrossMsg::RetainSet(message, confirm) => {
            let mut s = shard.borrow_mut();
            let before = s.log_position();
            s.store_retained(message);
            if let Some(confirm) = confirm {
                s.confirm_written(confirm, before);
            }
        }
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
                sys.record(snapshot);
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
    }
    None
}
