//! A session's subscriptions: a map allocated on the first one, so a session that
//! subscribes to nothing (most idle devices publish only) costs a pointer.

use ahash::AHashMap;

use super::Subscription;
use crate::topic::TopicFilter;

#[derive(Debug, Default)]
pub struct Subscriptions(Option<Box<AHashMap<TopicFilter, Subscription>>>);

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains_key(&self, filter: &TopicFilter) -> bool {
        self.0.as_ref().is_some_and(|m| m.contains_key(filter))
    }

    /// Adds or replaces a subscription; returns the one it replaced.
    pub fn insert(&mut self, filter: TopicFilter, subscription: Subscription) -> Option<Subscription> {
        self.0.get_or_insert_with(Box::default).insert(filter, subscription)
    }

    pub fn remove(&mut self, filter: &TopicFilter) -> Option<Subscription> {
        let map = self.0.as_mut()?;
        let removed = map.remove(filter);
        if map.is_empty() {
            self.0 = None;
        }
        removed
    }

    pub fn keys(&self) -> impl Iterator<Item = &TopicFilter> {
        self.0.iter().flat_map(|m| m.keys())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&TopicFilter, &mut Subscription)> {
        self.0.iter_mut().flat_map(|m| m.iter_mut())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TopicFilter, &Subscription)> {
        self.0.iter().flat_map(|m| m.iter())
    }
}
