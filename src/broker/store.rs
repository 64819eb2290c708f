//! Where a shard's sessions are kept beyond its memory.
//!
//! The shard reports every change to a persistent session through [`SessionStore`]; the
//! session logic itself stays in memory and does not know what is beneath. Today the store
//! is [`MemoryStore`], which keeps nothing more (state lives only in the shard); the
//! durability work puts per-core logs beneath the same calls and replays them at start.
//! Only sessions that outlive their connection are reported.

use super::message::Message;
use super::session::Subscription;
use crate::codec::{PacketId, QoS, Will};
use crate::topic::TopicFilter;

pub trait SessionStore {
    /// A persistent session was created or resumed with these settings.
    fn session_opened(&mut self, client_id: &str, expiry_interval: u32, will: Option<&Will>);
    fn subscribed(&mut self, client_id: &str, filter: &TopicFilter, subscription: &Subscription);
    fn unsubscribed(&mut self, client_id: &str, filter: &TopicFilter);
    /// A QoS 1/2 message was accepted for the session (sent or queued).
    fn message_accepted(&mut self, client_id: &str, message: &Message, qos: QoS);
    /// The client completed a delivery (PUBACK, or PUBCOMP for QoS 2).
    fn message_completed(&mut self, client_id: &str, packet_id: PacketId);
    fn session_ended(&mut self, client_id: &str);
}

/// Keeps nothing beyond the shard's own memory: state is lost with the process.
#[derive(Debug, Default)]
pub struct MemoryStore;

impl SessionStore for MemoryStore {
    fn session_opened(&mut self, _: &str, _: u32, _: Option<&Will>) {}
    fn subscribed(&mut self, _: &str, _: &TopicFilter, _: &Subscription) {}
    fn unsubscribed(&mut self, _: &str, _: &TopicFilter) {}
    fn message_accepted(&mut self, _: &str, _: &Message, _: QoS) {}
    fn message_completed(&mut self, _: &str, _: PacketId) {}
    fn session_ended(&mut self, _: &str) {}
}
