//! Retained messages: this shard's partition of them, and the paged fetches that
//! deliver them to new subscriptions.

use super::*;

/// This shard's partition of the retained messages, and the sessions whose fetches go on
/// in the retained task.
pub struct RetainedPartition {
    pub store: Box<dyn RetainedStore>,
    /// Sessions whose retained fetch goes on in the retained task (see `continue_retained`).
    pub ready: std::collections::VecDeque<SessionId>,
    pub wake: Rc<Notify>,
    /// In a cluster, until the retained set this node joined with has come: the topics
    /// written here meanwhile (set or cleared), whose values are newer than the set's.
    /// Bounded by `WRITTEN_BYTES`; past it, a topic written is not recorded (the set's
    /// older value may then replace it, as before there was a record).
    pub written: Option<Written>,
}

/// Topics written while a retained set is streamed in, and what they hold.
#[derive(Default)]
pub struct Written {
    topics: ahash::AHashSet<crate::topic::TopicName>,
    bytes: usize,
}

impl Written {
    /// The recorded copy of `topic`.
    #[cfg(test)]
    pub fn topic(&self, topic: &crate::topic::TopicName) -> Option<&crate::topic::TopicName> {
        self.topics.get(topic)
    }
}

/// Bytes of topics one shard records while its node's retained set comes (a topic's bytes
/// plus its entry: the set's slot, and the copy's allocation). If no set ever comes (the
/// peer asked died first, or none answered in time) the record stays, at most this.
const WRITTEN_BYTES: usize = 16 << 20;
const WRITTEN_ENTRY: usize = 96;

impl RetainedPartition {
    /// `clustered`: topics written are recorded until the retained set this node joins
    /// with has come (`written`).
    pub(super) fn new(store: Box<dyn RetainedStore>, clustered: bool) -> RetainedPartition {
        RetainedPartition {
            store,
            ready: std::collections::VecDeque::new(),
            wake: Rc::new(Notify::default()),
            written: clustered.then(Written::default),
        }
    }
}

impl Shard {
    pub(super) fn store_retained(&mut self, message: Message) {
        if let Some(written) = &mut self.retained.written {
            let (topic, cost) = (&message.topic, message.topic.len() + WRITTEN_ENTRY);
            if written.bytes + cost <= WRITTEN_BYTES && !written.topics.contains(topic) {
                // A copy: the message's topic is a slice of the buffer it arrived in, which
                // the record would keep alive whole.
                written.topics.insert(topic.with_bytes(bytes::Bytes::copy_from_slice(topic.as_bytes())));
                written.bytes += cost;
            }
        }
        self.set_retained(message);
    }

    /// An entry of the retained set another node sent when this one joined: a topic
    /// written here since the node started keeps its value (it is newer: the set was read
    /// after this node asked for it, but it may arrive after what was written since).
    pub(super) fn store_synced(&mut self, message: Message) {
        if self.retained.written.as_ref().is_some_and(|w| w.topics.contains(&message.topic)) {
            return;
        }
        self.set_retained(message);
    }

    fn set_retained(&mut self, mut message: Message) {
        // Delivered later to new subscribers: not a publish→deliver time to sample.
        message.born = crate::broker::message::Stamp::default();
        if let Err(err) = self.retained.store.set(message) {
            self.stats.retained_refused += 1;
            // Every refusal counts; the log says so at 1, 2, 4, 8… (a flood stays quiet).
            if self.stats.retained_refused.is_power_of_two() {
                tracing::warn!(%err, refused = self.stats.retained_refused, "retained message not stored");
            }
        }
    }

    /// Starts sending the retained messages matching a new subscription, from every shard.
    pub fn request_retained(
        &mut self,
        sid: SessionId,
        filter: TopicFilter,
        qos: QoS,
        identifier: Option<u32>,
    ) {
        let Some(session) = self.sessions.get_mut(&sid) else { return };
        session.retained.request(filter, qos, identifier, self.shard_count);
        self.continue_retained(sid);
    }

    /// Fetches the next pages of the session's retained queries while it has room: a page
    /// asked of another shard is awaited before the next, and after `RETAINED_SLICE` of
    /// local pages the shard's retained task goes on later, so neither one subscription nor
    /// many keep the core from other work.
    pub fn continue_retained(&mut self, sid: SessionId) {
        // Called on every acknowledgement: nothing (not even a clock read) when there is
        // nothing to fetch.
        if self.sessions.get(&sid).is_none_or(|s| s.retained.is_empty()) {
            return;
        }
        let started = Instant::now();
        loop {
            let Some(ready) = self.sessions.with(&sid, |session, io| {
                let pending = &session.retained;
                !pending.asked && !pending.scheduled && io.link.is_some() && session.has_room(io)
            }) else {
                return;
            };
            let Some(session) = self.sessions.get_mut(&sid).filter(|_| ready) else { return };
            let Some(cursor) = session.retained.next_cursor() else { return };
            if cursor.shard != self.id {
                session.retained.asked = true;
                let peer = cursor.shard;
                self.send_to(peer, CrossMsg::RetainQuery { from: self.id, session: sid, cursor });
                return;
            }
            let mut messages = Vec::new();
            let next = self.retained.store.matching(
                &cursor.filter,
                cursor.after.as_ref(),
                RETAINED_PAGE,
                &mut messages,
            );
            self.deliver_retained(sid, cursor, messages, next);
            if started.elapsed() >= RETAINED_SLICE {
                if let Some(session) = self.sessions.get_mut(&sid) {
                    session.retained.scheduled = true;
                    self.retained.ready.push_back(sid);
                    self.retained.wake.notify();
                }
                return;
            }
        }
    }

    /// Delivers a page of retained messages while the session has room; where it stops
    /// (or the page ends) its cursor goes on later. A page is not forced into a session
    /// that has no room for it: what did not fit would be dropped (MQTT-3.3.1-9 wants
    /// every one).
    pub(super) fn deliver_retained(
        &mut self,
        sid: SessionId,
        mut cursor: RetainedCursor,
        messages: Vec<Message>,
        next: Option<TopicName>,
    ) {
        let stats = &mut self.stats;
        let auth = self.sessions.entry(&sid).and_then(|e| e.auth.clone());
        self.sessions.with(&sid, |session, io| {
            let Some((qos, identifier)) = session.retained.options(&cursor) else { return };
            for message in messages {
                if !session.has_room(io) {
                    session.retained.resume(cursor);
                    return;
                }
                // Retained messages a wildcard reaches are checked one by one.
                if auth.as_ref().is_some_and(|a| !a.can_read(message.topic.as_str())) {
                    stats.acl_denied += 1;
                    cursor.after = Some(message.topic);
                    continue;
                }
                if session.retained.came_live(&cursor, message.id) {
                    // Published since the SUBSCRIBE: delivered live already.
                    cursor.after = Some(message.topic);
                    continue;
                }
                let qos = message.qos.min(qos);
                stats.count(session.deliver(&message, qos, true, identifier.as_slice(), None, io));
                cursor.after = Some(message.topic);
            }
            match next {
                Some(after) => {
                    cursor.after = Some(after);
                    session.retained.resume(cursor);
                }
                None => session.retained.finish(&cursor),
            }
        });
    }
}

/// Goes on with the retained fetches whose time slice ran out (`continue_retained`), one
/// session at a time, yielding the core between them.
pub async fn run_retained(shard: ShardRef) {
    let wake = shard.borrow().retained.wake.clone();
    loop {
        wake.notified().await;
        loop {
            let next = shard.borrow_mut().retained.ready.pop_front();
            let Some(sid) = next else { break };
            {
                let mut s = shard.borrow_mut();
                if let Some(session) = s.sessions.get_mut(&sid) {
                    session.retained.scheduled = false;
                }
                s.continue_retained(sid);
            }
            glommio::yield_if_needed().await;
        }
    }
}
