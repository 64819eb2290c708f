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

use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};

use super::connection::Parker;
pub use super::cross::{
    Batch, Confirm, CrossMsg, Handoff, CHANNEL_CAPACITY, HELD, MAX_BACKLOG, MAX_BACKLOG_BYTES, MAX_BATCH,
    MAX_BATCH_BYTES,
};
use super::notify::Notify;
use super::shard::{wait_for_congested, wait_to_fit, ShardRef};

/// Capacity an emptied per-peer outbox keeps.
const SHRINK_ABOVE: usize = 4 * MAX_BATCH;

/// Drains the shard's outbox for `peer` into its channel, a batch at a time.
pub async fn run_sender(shard: ShardRef, peer: usize, wake: Rc<Notify>, tx: ConnectedSender<Batch>) {
    loop {
        wake.notified().await;
        loop {
            let batch = {
                let mut shard = shard.borrow_mut();
                let queue = &mut shard.peers.outbox[peer];
                if queue.is_empty() {
                    break;
                }
                // From the front of a ring buffer: O(batch), however long the backlog.
                let mut batch = Vec::with_capacity(queue.len().min(MAX_BATCH));
                let mut bytes = 0;
                while batch.len() < MAX_BATCH && (batch.is_empty() || bytes < MAX_BATCH_BYTES) {
                    let Some(msg) = queue.pop_front() else { break };
                    bytes += msg.size();
                    batch.push(msg);
                }
                // A burst (a SUBSCRIBE of 100,000 filters announces each) must not leave
                // its capacity behind for good.
                if queue.is_empty() && queue.capacity() > SHRINK_ABOVE {
                    queue.shrink_to(SHRINK_ABOVE);
                }
                shard.peers.bytes[peer] -= bytes;
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
