//! The retained messages a session still has to fetch for its new subscriptions.

use std::collections::VecDeque;

use ahash::{AHashMap, AHashSet};

use crate::broker::message::MessageId;

use crate::codec::QoS;
use crate::topic::{TopicFilter, TopicName};

/// Where the next page of retained messages for a new subscription comes from.
#[derive(Debug, Clone)]
pub struct RetainedCursor {
    pub shard: usize,
    pub filter: TopicFilter,
    /// The request it belongs to (see `PendingRetained`).
    pub generation: u64,
    pub after: Option<TopicName>,
}

/// The retained messages a session still has to fetch for its new subscriptions: one
/// request per filter, with a cursor per shard, fetched one page at a time.
///
/// Bounded by the session's subscriptions: subscribing again to a filter whose messages
/// are still being fetched updates that request (its QoS and identifier) instead of adding
/// cursors, and unsubscribing drops it. A dropped request's cursors are skipped when met,
/// and swept once they outnumber the live ones.
///
/// Allocated only while a fetch is under way: most sessions are idle, and this is the
/// size of a pointer then.
#[derive(Debug, Default)]
pub struct PendingRetained {
    fetch: Option<Box<Fetch>>,
    /// Outlives a finished fetch: a page of a dropped request still on its way from
    /// another shard must not be taken for a later request of the same filter.
    next_generation: u64,
    /// A page was asked of another shard and has not arrived yet.
    pub asked: bool,
    /// Waiting for the shard's retained task to go on (its time slice ran out).
    pub scheduled: bool,
}

#[derive(Debug, Default)]
struct Fetch {
    requests: AHashMap<TopicFilter, Request>,
    cursors: VecDeque<RetainedCursor>,
}

/// The retained messages a request remembers having had delivered live (a message past
/// them may come twice: live, and fetched).
const LIVE_REMEMBERED: usize = 4096;

#[derive(Debug)]
struct Request {
    generation: u64,
    qos: QoS,
    identifier: Option<u32>,
    /// Cursors not finished.
    cursors: usize,
    /// Retained messages matching the filter delivered live since the request started: a
    /// message published (and stored) after the SUBSCRIBE reaches the session live, and
    /// its fetched copy is not sent again.
    live: AHashSet<u64>,
}

impl PendingRetained {
    pub fn is_empty(&self) -> bool {
        self.fetch.is_none()
    }

    /// Starts fetching `filter`'s retained messages from `shards` shards, or updates the
    /// fetch already under way.
    pub fn request(&mut self, filter: TopicFilter, qos: QoS, identifier: Option<u32>, shards: usize) {
        let fetch = self.fetch.get_or_insert_with(Box::default);
        if let Some(request) = fetch.requests.get_mut(&filter) {
            request.qos = qos;
            request.identifier = identifier;
            return;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let request = Request { generation, qos, identifier, cursors: shards, live: AHashSet::new() };
        fetch.requests.insert(filter.clone(), request);
        for shard in 0..shards {
            fetch.cursors.push_back(RetainedCursor {
                shard,
                filter: filter.clone(),
                generation,
                after: None,
            });
        }
        if fetch.cursors.len() > 2 * shards * fetch.requests.len() + 64 {
            let requests = &fetch.requests;
            fetch.cursors.retain(|c| requests.get(&c.filter).is_some_and(|r| r.generation == c.generation));
        }
    }

    /// A retained message (published with RETAIN) on `topic` was delivered live: the
    /// requests whose filter it matches do not send their fetched copy of it.
    pub fn delivered_live(&mut self, topic: &TopicName, id: MessageId) {
        let Some(fetch) = self.fetch.as_mut().filter(|_| id.is_known()) else { return };
        for (filter, request) in fetch.requests.iter_mut() {
            if request.live.len() < LIVE_REMEMBERED && filter.matches(topic) {
                request.live.insert(id.0);
            }
        }
    }

    /// Whether the fetched retained message `id` of `cursor`'s request reached the session
    /// live already.
    pub fn came_live(&self, cursor: &RetainedCursor, id: MessageId) -> bool {
        let request = self.fetch.as_ref().and_then(|f| f.requests.get(&cursor.filter));
        request.is_some_and(|r| r.generation == cursor.generation && r.live.contains(&id.0))
    }

    /// Stops fetching for `filter` (unsubscribed).
    pub fn cancel(&mut self, filter: &TopicFilter) {
        if let Some(fetch) = &mut self.fetch {
            fetch.requests.remove(filter);
            if fetch.requests.is_empty() {
                self.fetch = None;
            }
        }
    }

    /// The QoS and identifier a live cursor's messages are delivered with; `None` once its
    /// request was dropped.
    pub fn options(&self, cursor: &RetainedCursor) -> Option<(QoS, Option<u32>)> {
        let fetch = self.fetch.as_ref()?;
        let request = fetch.requests.get(&cursor.filter).filter(|r| r.generation == cursor.generation)?;
        Some((request.qos, request.identifier))
    }

    /// The next cursor of a live request.
    pub fn next_cursor(&mut self) -> Option<RetainedCursor> {
        loop {
            let cursor = self.fetch.as_mut()?.cursors.pop_front()?;
            if self.options(&cursor).is_some() {
                return Some(cursor);
            }
        }
    }

    /// A cursor goes on from where it stopped: first, so its messages keep their order.
    pub fn resume(&mut self, cursor: RetainedCursor) {
        if self.options(&cursor).is_some() {
            if let Some(fetch) = &mut self.fetch {
                fetch.cursors.push_front(cursor);
            }
        }
    }

    /// A cursor reached the end of its shard's messages.
    pub fn finish(&mut self, cursor: &RetainedCursor) {
        let Some(fetch) = &mut self.fetch else { return };
        let Some(request) =
            fetch.requests.get_mut(&cursor.filter).filter(|r| r.generation == cursor.generation)
        else {
            return;
        };
        request.cursors = request.cursors.saturating_sub(1);
        if request.cursors == 0 {
            fetch.requests.remove(&cursor.filter);
            if fetch.requests.is_empty() {
                self.fetch = None;
            }
        }
    }

    #[cfg(test)]
    fn cursor_count(&self) -> usize {
        self.fetch.as_ref().map_or(0, |f| f.cursors.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_requests_for_a_filter_do_not_pile_up() {
        let mut pending = PendingRetained::default();
        let f = TopicFilter::from_static("x/#").unwrap();
        // A client looping on SUBSCRIBE (and UNSUBSCRIBE) of one filter while it has no room.
        for i in 0..10_000 {
            pending.request(f.clone(), QoS::AtLeastOnce, Some(i), 2);
            if i % 2 == 0 {
                pending.cancel(&f);
            }
        }
        assert!(pending.cursor_count() <= 2 * 2 + 64, "{} cursors kept", pending.cursor_count());
        // The live request has the latest options and one cursor per shard.
        let first = pending.next_cursor().unwrap();
        assert_eq!(pending.options(&first), Some((QoS::AtLeastOnce, Some(9_999))));
        let second = pending.next_cursor().unwrap();
        assert_eq!((first.shard, second.shard), (0, 1));
        assert!(pending.next_cursor().is_none());
        pending.finish(&first);
        assert!(!pending.is_empty());
        pending.finish(&second);
        assert!(pending.is_empty());
    }
}
