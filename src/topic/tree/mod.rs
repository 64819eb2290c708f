//! The subscription tree: which subscriptions match a published topic.
//!
//! A trie over topic levels, owned by one shard and used on its publish hot path, so it
//! has no locks and no shared ownership. Each node has its exact-level children in a hash
//! map and its `+` child in a field of its own; a filter's last level `#` needs no node
//! (nothing can follow it), so its subscribers hang off the parent node in `hash`.
//! The node where a filter ends keeps the [`TopicFilter`] itself beside its subscribers,
//! so a match can hand out the filter without rebuilding it.
//!
//! Matching walks the topic's levels lazily (no `Vec` of levels) and branches only where a
//! node has both an exact child and a `+` child; elsewhere it loops. The branches not taken
//! yet wait in a worklist, inline for the first few and on the heap past them, so matching
//! uses a constant amount of the thread's stack whatever the topic and filters: hostile
//! filters `+`, `/+`, `//+`, ... make a topic of empty levels fork at every level, and
//! recursing per fork overflowed a core's stack. Insert, remove, get and the node teardown
//! are iterative too, so a 65535-byte filter of 32768 levels cannot overflow it either.
//!
//! # Invariants
//! - Every subscriber set in the tree is non-empty: removing the last key of a filter
//!   drops its set, and [`SubscriptionTree::filter_count`] equals the number of sets.
//! - No node but the root is empty: after a remove, every node on the removed filter's
//!   path that has no subscribers, no children, no `+` child and no `#` set is pruned, so
//!   memory follows the live subscriptions and not the churn behind them.
//! - [`SubscriptionTree::len`] equals the sum of the sizes of all subscriber sets.
//! - A subscriber set stores the filter spelled by its path from the root.
//! - The root never has subscribers of its own: every filter has at least one level.

use ahash::AHashMap;

use super::{TopicFilter, TopicName};

mod matching;
#[cfg(test)]
mod tests;

/// Past this many keys on one filter, subscribers move from a `Vec` to a hash map.
/// A linear scan of a few keys beats hashing them, and most filters have one subscriber.
const FEW_MAX: usize = 16;
/// A map shrinks back to a `Vec` at this many keys. Lower than [`FEW_MAX`] so a filter
/// whose count hovers around the threshold does not convert on every change.
const MANY_MIN: usize = 4;

/// The subscriptions of one shard, indexed for matching topics against their filters.
///
/// `K` identifies a subscriber (a session id, a shard index), `V` is what the subscriber
/// asked for with this filter (its subscription options).
pub struct SubscriptionTree<K, V> {
    root: Node<K, V>,
    /// Number of (filter, key) subscriptions.
    len: usize,
    /// Number of distinct filters, i.e. of subscriber sets.
    filters: usize,
}

struct Node<K, V> {
    children: AHashMap<Box<str>, Node<K, V>>,
    /// The `+` child; boxed so a leaf stays small.
    plus: Option<Box<Node<K, V>>>,
    /// Subscribers of the filter that ends at this node.
    subs: Option<Box<Subscribers<K, V>>>,
    /// Subscribers of the filter that is this node's path followed by `#`.
    hash: Option<Box<Subscribers<K, V>>>,
}

struct Subscribers<K, V> {
    filter: TopicFilter,
    entries: Entries<K, V>,
}

enum Entries<K, V> {
    Few(Vec<(K, V)>),
    Many(AHashMap<K, V>),
}

/// Which subscriber set of a node a filter ends in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Exact,
    Hash,
}

/// The filter's levels that are edges in the trie (all but a final `#`), and its slot.
fn path(filter: &TopicFilter) -> (impl Iterator<Item = &str> + Clone, Slot) {
    let text = filter.as_str();
    // `#` is only ever a whole last level (TopicFilter's invariant).
    let (prefix, slot) = if text == "#" {
        (None, Slot::Hash)
    } else if let Some(prefix) = text.strip_suffix("/#") {
        (Some(prefix), Slot::Hash)
    } else {
        (Some(text), Slot::Exact)
    };
    (prefix.into_iter().flat_map(|p| p.split('/')), slot)
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node { children: AHashMap::new(), plus: None, subs: None, hash: None }
    }
}

impl<K, V> Node<K, V> {
    fn child(&self, level: &str) -> Option<&Node<K, V>> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node<K, V> {
        if level == "+" {
            self.plus.get_or_insert_with(Default::default)
        } else {
            // Allocates the key even when the child exists; subscribing is not hot.
            self.children.entry(Box::from(level)).or_default()
        }
    }

    fn remove_child(&mut self, level: &str) -> Option<Node<K, V>> {
        if level == "+" {
            self.plus.take().map(|b| *b)
        } else {
            self.children.remove(level)
        }
    }

    fn slot(&self, slot: Slot) -> &Option<Box<Subscribers<K, V>>> {
        match slot {
            Slot::Exact => &self.subs,
            Slot::Hash => &self.hash,
        }
    }

    fn slot_mut(&mut self, slot: Slot) -> &mut Option<Box<Subscribers<K, V>>> {
        match slot {
            Slot::Exact => &mut self.subs,
            Slot::Hash => &mut self.hash,
        }
    }

    /// Number of edges to child nodes.
    fn edges(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some())
    }

    fn is_empty(&self) -> bool {
        self.subs.is_none() && self.hash.is_none() && self.edges() == 0
    }

    /// Moves this node's children out, so dropping it recurses no further.
    fn take_children(&mut self, into: &mut Vec<Node<K, V>>) {
        into.extend(self.children.drain().map(|(_, child)| child));
        if let Some(plus) = self.plus.take() {
            into.push(*plus);
        }
    }
}

impl<K, V> Drop for Node<K, V> {
    /// Tears the subtree down with a heap stack: the default drop recurses once per level,
    /// and a filter may have 32768 levels.
    fn drop(&mut self) {
        if self.edges() == 0 {
            return;
        }
        let mut stack = Vec::new();
        self.take_children(&mut stack);
        while let Some(mut node) = stack.pop() {
            node.take_children(&mut stack);
        }
    }
}

impl<K: Eq, V> Entries<K, V> {
    fn len(&self) -> usize {
        match self {
            Entries::Few(few) => few.len(),
            Entries::Many(many) => many.len(),
        }
    }

    fn iter(&self) -> EntriesIter<'_, K, V> {
        match self {
            Entries::Few(few) => EntriesIter::Few(few.iter()),
            Entries::Many(many) => EntriesIter::Many(many.iter()),
        }
    }
}

impl<K: Eq + std::hash::Hash, V> Entries<K, V> {
    fn get(&self, key: &K) -> Option<&V> {
        match self {
            Entries::Few(few) => few.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            Entries::Many(many) => many.get(key),
        }
    }

    fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self {
            Entries::Few(few) => {
                if let Some((_, v)) = few.iter_mut().find(|(k, _)| *k == key) {
                    return Some(std::mem::replace(v, value));
                }
                if few.len() < FEW_MAX {
                    few.push((key, value));
                } else {
                    let mut many: AHashMap<K, V> = few.drain(..).collect();
                    many.insert(key, value);
                    *self = Entries::Many(many);
                }
                None
            }
            Entries::Many(many) => many.insert(key, value),
        }
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        match self {
            Entries::Few(few) => {
                let at = few.iter().position(|(k, _)| k == key)?;
                Some(few.swap_remove(at).1)
            }
            Entries::Many(many) => {
                let removed = many.remove(key);
                if many.len() <= MANY_MIN {
                    // Also gives back the table, which a hash map never shrinks by itself.
                    *self = Entries::Few(many.drain().collect());
                }
                removed
            }
        }
    }
}

enum EntriesIter<'a, K, V> {
    Few(std::slice::Iter<'a, (K, V)>),
    Many(std::collections::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for EntriesIter<'a, K, V> {
    type Item = (&'a K, &'a V);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            EntriesIter::Few(it) => it.next().map(|(k, v)| (k, v)),
            EntriesIter::Many(it) => it.next(),
        }
    }
}

impl<K, V> Default for SubscriptionTree<K, V> {
    fn default() -> Self {
        SubscriptionTree { root: Node::default(), len: 0, filters: 0 }
    }
}

impl<K, V> std::fmt::Debug for SubscriptionTree<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionTree")
            .field("len", &self.len)
            .field("filters", &self.filters)
            .finish_non_exhaustive()
    }
}

impl<K, V> SubscriptionTree<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (filter, key) subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of distinct filters with at least one subscriber.
    pub fn filter_count(&self) -> usize {
        self.filters
    }

    /// Every subscription, in no particular order: for tearing a session down or telling
    /// another core which filters this one has interest in.
    pub fn iter(&self) -> SubscriptionIter<'_, K, V> {
        SubscriptionIter { stack: vec![Pending::Node(&self.root)], current: None, remaining: self.len }
    }
}

impl<K: Eq + std::hash::Hash + Clone, V> SubscriptionTree<K, V> {
    /// Subscribes `key` with `filter`. Returns the previous value if `key` already had
    /// exactly this filter, which is then replaced.
    pub fn insert(&mut self, filter: &TopicFilter, key: K, value: V) -> Option<V> {
        let (levels, slot) = path(filter);
        let mut node = &mut self.root;
        for level in levels {
            node = node.child_or_insert(level);
        }
        let subs = node.slot_mut(slot).get_or_insert_with(|| {
            self.filters += 1;
            Box::new(Subscribers {
                // A copy, not a clone: a filter decoded from a packet is a slice of the
                // read buffer, which it would keep alive for as long as it is subscribed.
                filter: filter.to_compact(),
                entries: Entries::Few(Vec::with_capacity(1)),
            })
        });
        let previous = subs.entries.insert(key, value);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    /// Unsubscribes `key` from `filter`, returning its value, and prunes the nodes the
    /// filter leaves empty.
    pub fn remove(&mut self, filter: &TopicFilter, key: &K) -> Option<V> {
        let (levels, slot) = path(filter);
        let mut node = &mut self.root;
        for level in levels.clone() {
            node = node.child_mut(level)?;
        }
        let set = node.slot_mut(slot);
        let subs = set.as_mut()?;
        let removed = subs.entries.remove(key)?;
        self.len -= 1;
        if subs.entries.len() == 0 {
            *set = None;
            self.filters -= 1;
            let last_is_empty = node.is_empty();
            if last_is_empty {
                self.prune(levels);
            }
        }
        Some(removed)
    }

    /// Cuts the chain of empty nodes at the end of `levels`, whose last node is empty.
    /// Done in two iterative walks rather than by recursion, to bound the stack.
    fn prune<'f>(&mut self, levels: impl Iterator<Item = &'f str> + Clone) {
        // Find the deepest node on the path that stays: the root, or one with subscribers
        // or an edge besides the path's own. Everything below its path edge goes.
        let mut keep_depth = 0;
        let mut node = &self.root;
        for (depth, level) in levels.clone().enumerate() {
            if depth > 0 && (node.subs.is_some() || node.hash.is_some() || node.edges() > 1) {
                keep_depth = depth;
            }
            match node.child(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let mut levels = levels;
        let mut node = &mut self.root;
        for _ in 0..keep_depth {
            let Some(level) = levels.next() else { return };
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if let Some(level) = levels.next() {
            // The removed chain drops iteratively (Node's Drop).
            node.remove_child(level);
        }
    }

    /// The value `key` subscribed with under exactly `filter`.
    pub fn get(&self, filter: &TopicFilter, key: &K) -> Option<&V> {
        self.subscribers(filter)?.entries.get(key)
    }

    /// Number of keys subscribed with exactly `filter`.
    pub fn subscriber_count(&self, filter: &TopicFilter) -> usize {
        self.subscribers(filter).map_or(0, |s| s.entries.len())
    }

    fn subscribers(&self, filter: &TopicFilter) -> Option<&Subscribers<K, V>> {
        let (levels, slot) = path(filter);
        let mut node = &self.root;
        for level in levels {
            node = node.child(level)?;
        }
        node.slot(slot).as_deref()
    }
}

enum Pending<'a, K, V> {
    Node(&'a Node<K, V>),
    Subscribers(&'a Subscribers<K, V>),
}

/// Iterator over every subscription of a [`SubscriptionTree`], from [`SubscriptionTree::iter`].
pub struct SubscriptionIter<'a, K, V> {
    stack: Vec<Pending<'a, K, V>>,
    current: Option<(&'a TopicFilter, EntriesIter<'a, K, V>)>,
    remaining: usize,
}

impl<'a, K: Eq, V> Iterator for SubscriptionIter<'a, K, V> {
    type Item = (&'a TopicFilter, &'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((filter, entries)) = &mut self.current {
                if let Some((key, value)) = entries.next() {
                    self.remaining -= 1;
                    return Some((*filter, key, value));
                }
                self.current = None;
            }
            match self.stack.pop()? {
                Pending::Node(node) => {
                    self.stack.extend(node.children.values().map(Pending::Node));
                    if let Some(plus) = &node.plus {
                        self.stack.push(Pending::Node(plus));
                    }
                    if let Some(subs) = &node.subs {
                        self.stack.push(Pending::Subscribers(subs));
                    }
                    if let Some(hash) = &node.hash {
                        self.stack.push(Pending::Subscribers(hash));
                    }
                }
                Pending::Subscribers(subs) => {
                    self.current = Some((&subs.filter, subs.entries.iter()));
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<K: Eq, V> ExactSizeIterator for SubscriptionIter<'_, K, V> {}

impl<'a, K: Eq, V> IntoIterator for &'a SubscriptionTree<K, V> {
    type Item = (&'a TopicFilter, &'a K, &'a V);
    type IntoIter = SubscriptionIter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}
