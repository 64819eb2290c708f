//! The tasks that carry [`CrossMsg`]s between shards.
//!
//! Every ordered pair of shards has one bounded lock-free channel (glommio's
//! `shared_channel`, which wakes the receiving executor). A shard never awaits a send
//! while handling what it received: receivers only mutate local state and queue replies
//! in the shard's per-peer outbox, which a dedicated sender task drains in batches of at
//! most [`MAX_BATCH`]. So no cycle of full channels can deadlock two cores.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};

use super::connection::Parker;
pub use super::cross::{
    Batch, Confirm, CrossMsg, Handoff, CHANNEL_CAPACITY, HELD, MAX_BACKLOG, MAX_BACKLOG_BYTES, MAX_BATCH,
    MAX_BATCH_BYTES,
};
use super::notify::Notify;
use super::shard::{wait_for_congested, wait_to_fit, ShardRef};

/// How often a shard waiting for its peers at start-up looks at the stop flag.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// One end of a channel to a peer, with the count of messages its receiver applied.
pub type PeerEnd<T> = Option<(T, Arc<AtomicU64>)>;

/// Starts the shard's sender and receiver task for every peer it has a channel with.
/// Connecting a channel end waits for its peer executor, so each connects in its own
/// task: shards (and the node bridge) start in any order without waiting on each other.
pub fn spawn_tasks(
    shard: &ShardRef,
    parker: &Rc<Parker>,
    senders: Vec<PeerEnd<SharedSender<Batch>>>,
    receivers: Vec<PeerEnd<SharedReceiver<Batch>>>,
) {
    for (peer, tx) in senders.into_iter().enumerate() {
        if let Some((tx, applied)) = tx {
            shard.borrow_mut().peers.applied[peer] = applied;
            let wake = shard.borrow().peers.wake[peer].clone();
            let shard = shard.clone();
            glommio::spawn_local(async move { run_sender(shard, peer, wake, tx.connect().await).await })
                .detach();
        }
    }
    for (rx, applied) in receivers.into_iter().flatten() {
        let (shard, parker) = (shard.clone(), parker.clone());
        glommio::spawn_local(async move { run_receiver(shard, parker, rx.connect().await, applied).await })
            .detach();
    }
}

/// Tells every peer this shard is ready (its logs replayed, its subscriptions announced and
/// acknowledged) and waits until every peer said the same. A peer's `Ready` arrives after
/// everything it announced before it (one channel per pair keeps order), so once all have
/// arrived this shard knows every subscription in the broker. False when the broker stops
/// first (a peer failed to start).
pub async fn all_peers_ready(shard: &ShardRef, stopped: impl Fn() -> bool) -> bool {
    let (me, peers) = {
        let s = shard.borrow();
        (s.id, s.peer_count)
    };
    for peer in (0..peers).filter(|p| *p != me) {
        shard.borrow_mut().send_to(peer, CrossMsg::Ready);
    }
    loop {
        let event = {
            let s = shard.borrow();
            if s.peers.ready >= peers - 1 {
                return true;
            }
            s.peers.ready_event.clone()
        };
        if stopped() {
            return false;
        }
        // The stop flag is polled; a peer's Ready wakes at once.
        futures_lite::future::or(event.wait(), glommio::timer::sleep(READY_POLL)).await;
    }
}

/// Drains the shard's outbox for `peer` into its channel, a batch at a time.
pub async fn run_sender(shard: ShardRef, peer: usize, wake: Rc<Notify>, tx: ConnectedSender<Batch>) {
    loop {
        wake.notified().await;
        loop {
            let batch = {
                let mut shard = shard.borrow_mut();
                let Some((batch, bytes)) = shard.peers.outbox[peer].take_batch() else { break };
                shard.peers.bytes[peer] -= bytes;
                shard.peers.moved[peer] += bytes as u64;
                batch
            };
            if tx.send(batch).await.is_err() {
                return;
            }
            shard.borrow().peers.drained.notify_all();
        }
    }
}

/// Handles every batch a peer sends, one message at a time, yielding between batches.
/// When a message left a local subscriber congested, the rest waits until it drained: the
/// channel fills, the peer's outbox grows past `MAX_BACKLOG`, and the peer's publishers
/// pause (back-pressure across cores).
/// `applied` counts the messages applied, with [`HELD`] set while one waits for a congested
/// subscriber, for the peer's `mesh_backlogged`: then the peer's publishers pause once
/// its oldest message in flight here waited `--mesh-max-wait-ms`.
pub async fn run_receiver(
    shard: ShardRef,
    parker: Rc<Parker>,
    rx: ConnectedReceiver<Batch>,
    applied: Arc<AtomicU64>,
) {
    let mut count = applied.load(Ordering::Relaxed);
    while let Some(batch) = rx.recv().await {
        let dropped = shard.borrow().stats.messages_dropped;
        for msg in batch {
            // A message that would not fit a congested subscriber's queue waits for room; a
            // QoS 0 one only while that subscriber makes progress (`--qos0-max-wait-ms`).
            let qos0 = is_qos0(&msg);
            while let Some(message) = message_of(&msg).filter(|_| shard.borrow().holds_back(&msg)) {
                // The peer sees what came before applied, and that this one waits.
                applied.store(count | HELD, Ordering::Release);
                wait_to_fit(&shard, None, message).await;
            }
            count += 1;
            // Only a congestion this message's delivery left holds the rest back.
            shard.borrow_mut().clear_pressure_hit();
            // A connection handed over is served here: the shard only passes it on.
            if let Some(handoff) = super::shard::handle_cross(&shard, msg) {
                glommio::spawn_local(super::connection::adopt(shard.clone(), parker.clone(), *handoff))
                    .detach();
            }
            let congested = shard.borrow_mut().take_pressure_hit();
            if !congested.is_empty() {
                applied.store(count | HELD, Ordering::Release);
                wait_for_congested(&shard, None, congested, qos0).await;
            }
        }
        applied.store(count, Ordering::Release);
        if shard.borrow().stats.messages_dropped != dropped {
            // A subscriber's outbox was full: its writer goes first (see `read_loop`).
            futures_lite::future::yield_now().await;
        } else {
            glommio::yield_if_needed().await;
        }
    }
}

/// A QoS 0 publish from a peer: it waits for a congested subscriber at most
/// `--qos0-max-wait-ms`.
fn is_qos0(msg: &CrossMsg) -> bool {
    message_of(msg).is_some_and(|m| m.qos == crate::codec::QoS::AtMostOnce)
}

fn message_of(msg: &CrossMsg) -> Option<&super::message::Message> {
    match msg {
        CrossMsg::Publish(message)
        | CrossMsg::DurablePublish { message, .. }
        | CrossMsg::SharedPublish { message, .. } => Some(message),
        _ => None,
    }
}
