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

use std::mem::MaybeUninit;
use std::ops::ControlFlow;

use ahash::AHashMap;

use super::{TopicFilter, TopicName};

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

/// The first level of `text` and the rest after its `/`, or `None` if it was the last.
#[inline]
fn split_level(text: &str) -> (&str, Option<&str>) {
    match text.split_once('/') {
        Some((level, rest)) => (level, Some(rest)),
        None => (text, None),
    }
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

/// A branch of a match walk: a node, and the topic's levels it has to match (`None` once
/// all are consumed).
type Branch<'a, 't, K, V> = (&'a Node<K, V>, Option<&'t str>);

/// Branches in the worklist before it spills to the heap. Most topics meet a few forks, so
/// a publish allocates nothing; 16 entries take 384 bytes of stack.
const INLINE_BRANCHES: usize = 16;

/// Uninitialised room for the first branches of a [`Worklist`].
type InlineBranches<'a, 't, K, V> = [MaybeUninit<Branch<'a, 't, K, V>>; INLINE_BRANCHES];

/// The branches a match walk has still to take, last in first out. Local to one walk, so
/// a visitor that matches against the same tree again gets a worklist of its own.
struct Worklist<'w, 'a, 't, K, V> {
    /// The first [`INLINE_BRANCHES`]; `inline[..len]` are initialised. Borrowed rather
    /// than owned: built with `len` in one struct, the array got zeroed with it, a
    /// 392-byte memset that cost 3 ns on every publish.
    inline: &'w mut InlineBranches<'a, 't, K, V>,
    len: usize,
    /// Branches pushed while `inline` is full; only then non-empty, so it holds the most
    /// recent ones. Allocates on its first push only.
    spill: Vec<Branch<'a, 't, K, V>>,
}

impl<'w, 'a, 't, K, V> Worklist<'w, 'a, 't, K, V> {
    #[inline]
    fn new(inline: &'w mut InlineBranches<'a, 't, K, V>) -> Self {
        Worklist { inline, len: 0, spill: Vec::new() }
    }

    #[inline]
    fn push(&mut self, branch: Branch<'a, 't, K, V>) {
        if self.len < INLINE_BRANCHES {
            self.inline[self.len].write(branch);
            self.len += 1;
        } else {
            self.spill.push(branch);
        }
    }

    #[inline]
    fn pop(&mut self) -> Option<Branch<'a, 't, K, V>> {
        if let Some(branch) = self.spill.pop() {
            return Some(branch);
        }
        self.len = self.len.checked_sub(1)?;
        // SAFETY: `push` wrote every slot below the old `len` (the array is only reachable
        // through this worklist, which starts at 0), and a `Branch` is `Copy`.
        Some(unsafe { self.inline[self.len].assume_init() })
    }
}

/// Visits the subscriber sets whose filters match, from `start` and then from each branch
/// of `pending` until none is left. Loops down a single path; where both an exact and a
/// `+` child match, it goes on with the exact one and leaves the `+` one in `pending`.
/// That visits in the order a recursion on the exact child first would, with none of its
/// stack.
fn walk<'a, 't, K, V, B>(
    start: Option<Branch<'a, 't, K, V>>,
    pending: &mut Worklist<'_, 'a, 't, K, V>,
    visit: &mut impl FnMut(&'a Subscribers<K, V>) -> ControlFlow<B>,
) -> ControlFlow<B> {
    let Some((mut node, mut rest)) = start.or_else(|| pending.pop()) else {
        return ControlFlow::Continue(());
    };
    loop {
        // `a/#` matches `a` as well as everything below it.
        if let Some(hash) = &node.hash {
            visit(hash)?;
        }
        if let Some(text) = rest {
            let (level, next) = split_level(text);
            rest = next;
            match (node.children.get(level), node.plus.as_deref()) {
                (Some(exact), Some(plus)) => {
                    pending.push((plus, next));
                    node = exact;
                    continue;
                }
                (Some(child), None) | (None, Some(child)) => {
                    node = child;
                    continue;
                }
                (None, None) => {}
            }
        } else if let Some(subs) = &node.subs {
            visit(subs)?;
        }
        // A dead end or a full match: on with the latest branch left behind.
        let Some(branch) = pending.pop() else {
            return ControlFlow::Continue(());
        };
        (node, rest) = branch;
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

    /// Visits the subscriber sets whose filters match `topic`, with the `$` rule.
    fn walk_matches<'a, B>(
        &'a self,
        topic: &TopicName,
        visit: &mut impl FnMut(&'a Subscribers<K, V>) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        let root = &self.root;
        // A filter starting with a wildcard does not match a topic starting with `$`
        // (MQTT-4.7.2-1): skip the root's `#` and `+`. Deeper wildcards are not affected.
        let wildcards = !topic.is_dollar();
        if wildcards {
            if let Some(hash) = &root.hash {
                visit(hash)?;
            }
        }
        let (level, next) = split_level(topic.as_str());
        let mut inline = [MaybeUninit::uninit(); INLINE_BRANCHES];
        let mut pending = Worklist::new(&mut inline);
        if wildcards {
            if let Some(plus) = &root.plus {
                pending.push((plus, next));
            }
        }
        walk(root.children.get(level).map(|exact| (exact, next)), &mut pending, visit)
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

    /// Calls `f` with every (filter, key, value) whose filter matches `topic`. A key
    /// subscribed with several matching filters is visited once for each: the caller
    /// deduplicates. Allocates nothing unless the topic leaves more than 16 forks of the
    /// tree pending at once.
    pub fn for_each_match<'a>(&'a self, topic: &TopicName, mut f: impl FnMut(&'a TopicFilter, &'a K, &'a V)) {
        let flow = self.walk_matches(topic, &mut |subs: &'a Subscribers<K, V>| {
            for (key, value) in subs.entries.iter() {
                f(&subs.filter, key, value);
            }
            ControlFlow::<std::convert::Infallible>::Continue(())
        });
        debug_assert!(flow.is_continue());
    }

    /// Whether any subscription matches `topic`; stops at the first.
    pub fn has_match(&self, topic: &TopicName) -> bool {
        // Subscriber sets are never empty (invariant), so reaching one is a match.
        self.walk_matches(topic, &mut |_| ControlFlow::Break(())).is_break()
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    fn filter(text: &str) -> TopicFilter {
        TopicFilter::new(text.to_owned()).expect("valid filter")
    }

    /// Also takes `""`, as the codec makes for a v5 PUBLISH that names its topic by alias.
    fn topic(text: &str) -> TopicName {
        TopicName::new_allow_empty(text.to_owned()).expect("valid topic")
    }

    impl<K, V> SubscriptionTree<K, V> {
        /// Nodes below the root.
        fn node_count(&self) -> usize {
            let mut count = 0;
            let mut stack = vec![&self.root];
            while let Some(node) = stack.pop() {
                stack.extend(node.children.values());
                stack.extend(node.plus.as_deref());
                count += 1;
            }
            count - 1
        }
    }

    impl<K: Eq + std::hash::Hash + Clone + std::fmt::Debug, V> SubscriptionTree<K, V> {
        /// Checks every invariant of the module doc.
        fn check_invariants(&self) {
            let (mut sets, mut subscriptions) = (0, 0);
            let mut stack = vec![(&self.root, String::new())];
            while let Some((node, path)) = stack.pop() {
                let is_root = std::ptr::eq(node, &self.root);
                assert!(is_root || !node.is_empty(), "empty node at {path:?}");
                if is_root {
                    assert!(node.subs.is_none(), "root has subscribers");
                }
                let join = |level: &str| {
                    if is_root {
                        level.to_owned()
                    } else {
                        format!("{path}/{level}")
                    }
                };
                for (slot, spelled) in [(&node.subs, path.clone()), (&node.hash, join("#"))] {
                    if let Some(subs) = slot {
                        assert!(subs.entries.len() > 0, "empty set at {spelled:?}");
                        assert_eq!(subs.filter.as_str(), spelled);
                        if let Entries::Few(few) = &subs.entries {
                            assert!(few.len() <= FEW_MAX);
                        }
                        sets += 1;
                        subscriptions += subs.entries.len();
                    }
                }
                for (level, child) in node.children.iter() {
                    assert_ne!(&**level, "+");
                    stack.push((child, join(level)));
                }
                if let Some(plus) = &node.plus {
                    stack.push((plus, join("+")));
                }
            }
            assert_eq!(sets, self.filters);
            assert_eq!(subscriptions, self.len);
            assert_eq!(self.iter().count(), self.len);
        }
    }

    fn matches(tree: &SubscriptionTree<u32, u32>, name: &str) -> BTreeSet<(String, u32)> {
        let mut seen = BTreeSet::new();
        tree.for_each_match(&topic(name), |f, k, _| {
            assert!(seen.insert((f.as_str().to_owned(), *k)), "visited twice: {f} {k}");
        });
        assert_eq!(tree.has_match(&topic(name)), !seen.is_empty());
        seen
    }

    /// A tree with key 1 on each filter, and the filters of it that match `name`.
    fn matching_filters(filters: &[&str], name: &str) -> Vec<String> {
        let mut tree = SubscriptionTree::new();
        for f in filters {
            tree.insert(&filter(f), 1, 0);
        }
        tree.check_invariants();
        matches(&tree, name).into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn exact() {
        let filters = ["a/b", "a", "a/b/c", "b/a"];
        assert_eq!(matching_filters(&filters, "a/b"), ["a/b"]);
        assert_eq!(matching_filters(&filters, "a"), ["a"]);
        assert!(matching_filters(&filters, "a/c").is_empty());
        assert!(matching_filters(&filters, "a/b/c/d").is_empty());
    }

    #[test]
    fn single_level_wildcard() {
        let filters = ["a/+", "+/b", "+", "a/+/c", "+/+"];
        assert_eq!(matching_filters(&filters, "a/b"), ["+/+", "+/b", "a/+"]);
        assert_eq!(matching_filters(&filters, "a"), ["+"]);
        assert_eq!(matching_filters(&filters, "a/x/c"), ["a/+/c"]);
        assert!(matching_filters(&filters, "a/x/y").is_empty());
    }

    #[test]
    fn multi_level_wildcard() {
        let filters = ["a/#", "a/b/#", "+/#"];
        assert_eq!(matching_filters(&filters, "a/b/c"), ["+/#", "a/#", "a/b/#"]);
        // `#` also matches the parent level.
        assert_eq!(matching_filters(&filters, "a"), ["+/#", "a/#"]);
        assert_eq!(matching_filters(&filters, "a/b"), ["+/#", "a/#", "a/b/#"]);
        assert_eq!(matching_filters(&filters, "b"), ["+/#"]);
    }

    #[test]
    fn hash_alone_matches_everything_but_dollar() {
        let filters = ["#"];
        for name in ["a", "a/b/c", "/", "/a", "a/", "x/$y"] {
            assert_eq!(matching_filters(&filters, name), ["#"], "{name}");
        }
        assert!(matching_filters(&filters, "$SYS").is_empty());
    }

    #[test]
    fn empty_levels() {
        let filters = ["+/+", "/+", "+", "/finance", "+/finance/#", "a/"];
        assert_eq!(matching_filters(&filters, "/finance"), ["+/+", "+/finance/#", "/+", "/finance"]);
        assert_eq!(matching_filters(&filters, "/"), ["+/+", "/+"]);
        assert_eq!(matching_filters(&filters, "a/"), ["+/+", "a/"]);
        assert!(matching_filters(&["/a"], "a").is_empty());
    }

    #[test]
    fn dollar_topics() {
        let filters = ["#", "+/x", "+", "$SYS/#", "$SYS/+", "$SYS/x", "+/#"];
        assert_eq!(matching_filters(&filters, "$SYS/x"), ["$SYS/#", "$SYS/+", "$SYS/x"]);
        assert_eq!(matching_filters(&filters, "$SYS"), ["$SYS/#"]);
        // Only a wildcard in the first level is held back.
        assert_eq!(matching_filters(&["a/+", "a/#"], "a/$SYS"), ["a/#", "a/+"]);
    }

    #[test]
    fn empty_topic_from_an_alias_placeholder() {
        // Agrees with the reference matcher, which sees one empty level.
        let filters = ["+", "#", "a", "/"];
        assert_eq!(matching_filters(&filters, ""), ["#", "+"]);
    }

    #[test]
    fn insert_replaces_and_get() {
        let mut tree = SubscriptionTree::new();
        let f = filter("a/+/c");
        assert_eq!(tree.insert(&f, 7u64, "qos0"), None);
        assert_eq!(tree.insert(&f, 8, "qos0"), None);
        assert_eq!(tree.insert(&f, 7, "qos1"), Some("qos0"));
        assert_eq!(tree.get(&f, &7), Some(&"qos1"));
        assert_eq!(tree.get(&f, &9), None);
        assert_eq!(tree.get(&filter("a/+"), &7), None);
        assert_eq!(tree.get(&filter("a/+/c/#"), &7), None);
        assert_eq!((tree.len(), tree.filter_count()), (2, 1));
        tree.check_invariants();
    }

    #[test]
    fn one_key_on_several_filters_is_visited_once_per_filter() {
        let mut tree = SubscriptionTree::new();
        for f in ["a/b", "a/+", "#"] {
            tree.insert(&filter(f), 1u32, 0u32);
        }
        assert_eq!(matches(&tree, "a/b").len(), 3);
    }

    #[test]
    fn subscriber_count_transitions() {
        let mut tree = SubscriptionTree::new();
        let f = filter("a/#");
        assert_eq!(tree.subscriber_count(&f), 0);
        tree.insert(&f, 1u32, ());
        assert_eq!(tree.subscriber_count(&f), 1);
        tree.insert(&f, 1, ());
        assert_eq!(tree.subscriber_count(&f), 1);
        tree.insert(&f, 2, ());
        assert_eq!(tree.subscriber_count(&f), 2);
        assert_eq!(tree.subscriber_count(&filter("a")), 0);
        assert_eq!(tree.subscriber_count(&filter("a/+")), 0);
        assert_eq!(tree.remove(&f, &1), Some(()));
        assert_eq!(tree.remove(&f, &1), None);
        assert_eq!(tree.subscriber_count(&f), 1);
        assert_eq!(tree.remove(&f, &2), Some(()));
        assert_eq!(tree.subscriber_count(&f), 0);
        assert_eq!(tree.filter_count(), 0);
    }

    #[test]
    fn remove_prunes_to_nothing() {
        let filters = ["a/b/c", "a/b", "a/+/c", "a/#", "#", "+", "+/+/#", "/", "//", "$SYS/+", "a/b/c/d/e"];
        let mut tree = SubscriptionTree::new();
        for (i, f) in filters.iter().enumerate() {
            for key in 0..3u32 {
                tree.insert(&filter(f), key, i);
            }
        }
        assert_eq!((tree.len(), tree.filter_count()), (filters.len() * 3, filters.len()));
        tree.check_invariants();
        // Remove in an order that leaves shared prefixes behind for a while.
        for f in filters.iter().rev().chain(filters.iter()) {
            for key in 0..3u32 {
                tree.remove(&filter(f), &key);
                tree.check_invariants();
            }
        }
        assert!(tree.is_empty());
        assert_eq!(tree.filter_count(), 0);
        assert_eq!(tree.node_count(), 0);
        assert!(tree.root.is_empty());
    }

    #[test]
    fn remove_of_absent_subscription_changes_nothing() {
        let mut tree = SubscriptionTree::new();
        tree.insert(&filter("a/b"), 1u32, ());
        assert_eq!(tree.remove(&filter("a/b"), &2), None);
        assert_eq!(tree.remove(&filter("a"), &1), None);
        assert_eq!(tree.remove(&filter("a/b/c"), &1), None);
        assert_eq!(tree.remove(&filter("a/#"), &1), None);
        assert_eq!(tree.node_count(), 2);
        tree.check_invariants();
    }

    #[test]
    fn many_subscribers_on_one_filter() {
        let mut tree = SubscriptionTree::new();
        let f = filter("big/+");
        for key in 0..10_000u32 {
            assert_eq!(tree.insert(&f, key, key), None);
        }
        assert!(matches!(tree.subscribers(&f).map(|s| &s.entries), Some(Entries::Many(_))));
        assert_eq!(tree.get(&f, &4242), Some(&4242));
        assert_eq!(matches(&tree, "big/x").len(), 10_000);
        tree.check_invariants();
        for key in 0..9_998u32 {
            assert_eq!(tree.remove(&f, &key), Some(key));
        }
        // Shrunk back to the small form.
        assert!(matches!(tree.subscribers(&f).map(|s| &s.entries), Some(Entries::Few(_))));
        assert_eq!(tree.subscriber_count(&f), 2);
        tree.check_invariants();
    }

    #[test]
    fn iter_yields_every_subscription() {
        let mut tree = SubscriptionTree::new();
        let mut expected = BTreeSet::new();
        for (i, f) in ["a", "a/#", "#", "+/b", "a/b"].iter().enumerate() {
            for key in 0..(i as u32 + 1) * 10 {
                tree.insert(&filter(f), key, ());
                expected.insert((f.to_string(), key));
            }
        }
        let iter = tree.iter();
        assert_eq!(iter.len(), expected.len());
        let got: BTreeSet<_> = iter.map(|(f, k, _)| (f.as_str().to_owned(), *k)).collect();
        assert_eq!(got, expected);
        assert_eq!(SubscriptionTree::<u32, ()>::new().iter().next(), None);
    }

    #[test]
    fn stored_filter_does_not_keep_the_read_buffer() {
        let frame = bytes::Bytes::from(b"a/b and the rest of a 64 KiB read".to_vec());
        let f = TopicFilter::new(frame.slice(..3)).expect("valid");
        let mut tree = SubscriptionTree::new();
        tree.insert(&f, 1u32, ());
        let stored = tree.iter().next().map(|(f, _, _)| f.as_bytes().clone());
        assert_eq!(stored.as_deref(), Some(&b"a/b"[..]));
        // A slice of `frame` would point into it.
        let stored = stored.unwrap_or_default();
        assert!(!frame.as_ptr_range().contains(&stored.as_ptr()));
    }

    /// The worst case a valid filter allows: 32768 levels. Runs on a thread with a small
    /// stack, since a core's executor thread is no bigger than the default.
    #[test]
    fn deepest_filter_does_not_overflow_the_stack() {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let deep = "a/".repeat(32_767) + "a";
                assert_eq!(deep.len(), 65_535);
                let (f, t) = (filter(&deep), topic(&deep));
                let plus = filter(&"+/".repeat(32_767).to_owned().add("#"));
                let mut tree = SubscriptionTree::new();
                tree.insert(&f, 1u32, ());
                tree.insert(&plus, 2, ());
                assert_eq!(tree.node_count(), 32_767 * 2 + 1);
                let mut seen = Vec::new();
                tree.for_each_match(&t, |_, k, _| seen.push(*k));
                seen.sort_unstable();
                assert_eq!(seen, [1, 2]);
                assert_eq!(tree.remove(&f, &1), Some(()));
                assert_eq!(tree.node_count(), 32_767);
                // Dropping the `+` chain must not recurse either.
                drop(tree);
            })
            .expect("spawn")
            .join()
            .expect("no stack overflow");
    }

    /// Runs `f` on a thread with a 256 KiB stack, no bigger than a core's executor thread.
    fn on_small_stack(f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(f)
            .expect("spawn")
            .join()
            .expect("no stack overflow");
    }

    /// The hostile pattern: filters `"/"×d + "+"` for d below `depth`, key d on each, and
    /// `"/"×d + "#"` with key `depth + d` if `hash`. Every node on the path of empty levels
    /// has both an exact child and a `+` child, so a topic of empty levels forks at each.
    ///
    /// Built by hand in linear time: through [`SubscriptionTree::insert`] the filters'
    /// 72 million levels take half a minute in a debug build. `built_by_hand_as_insert_would`
    /// checks the result against `insert`.
    fn forking_tree(depth: usize, hash: bool) -> (SubscriptionTree<u32, ()>, Vec<(TopicFilter, u32)>) {
        let set = |text: String, key: u32| {
            let filter = filter(&text);
            Some(Box::new(Subscribers { filter, entries: Entries::Few(vec![(key, ())]) }))
        };
        let mut filters = Vec::new();
        let mut below: Option<Node<u32, ()>> = None;
        for d in (0..depth).rev() {
            let mut node = Node::default();
            if let Some(child) = below.take() {
                node.children.insert(Box::from(""), child);
            }
            let plus = set("/".repeat(d) + "+", d as u32);
            filters.extend(plus.as_ref().map(|s| (s.filter.clone(), d as u32)));
            let mut leaf = Node::default();
            leaf.subs = plus;
            node.plus = Some(Box::new(leaf));
            if hash {
                node.hash = set("/".repeat(d) + "#", (depth + d) as u32);
                filters.extend(node.hash.as_ref().map(|s| (s.filter.clone(), (depth + d) as u32)));
            }
            below = Some(node);
        }
        let root = below.unwrap_or_default();
        let tree = SubscriptionTree { root, len: filters.len(), filters: filters.len() };
        (tree, filters)
    }

    #[test]
    fn built_by_hand_as_insert_would() {
        for hash in [false, true] {
            let (by_hand, filters) = forking_tree(40, hash);
            by_hand.check_invariants();
            let mut inserted = SubscriptionTree::new();
            for (f, k) in &filters {
                inserted.insert(f, *k, ());
            }
            let set = |tree: &SubscriptionTree<u32, ()>| -> BTreeSet<(String, u32)> {
                tree.iter().map(|(f, k, _)| (f.as_str().to_owned(), *k)).collect()
            };
            assert_eq!(set(&by_hand), set(&inserted));
            assert_eq!(by_hand.node_count(), inserted.node_count());
            assert_eq!((by_hand.len(), by_hand.filter_count()), (inserted.len(), inserted.filter_count()));
        }
    }

    /// Matching used to recurse once per fork, so this overflowed the stack and aborted
    /// the broker. Every fork is explored to its end: nothing matches.
    #[test]
    fn forking_filters_do_not_overflow_the_stack() {
        on_small_stack(|| {
            const DEPTH: usize = 12_000;
            let (tree, filters) = forking_tree(DEPTH, false);
            let t = topic(&"/".repeat(DEPTH));
            let expected = filters.iter().filter(|(f, _)| f.matches(&t)).count();
            let mut count = 0;
            tree.for_each_match(&t, |_, _, _| count += 1);
            assert_eq!(count, expected);
            assert_eq!(tree.has_match(&t), expected > 0);
        });
    }

    /// The same forks with a `#` set on every node of the path, against a topic one level
    /// shorter: every `#` filter matches, and the deepest `+` one.
    #[test]
    fn forking_filters_with_many_matches_do_not_overflow_the_stack() {
        on_small_stack(|| {
            const DEPTH: usize = 12_000;
            let (tree, filters) = forking_tree(DEPTH, true);
            let t = topic(&"/".repeat(DEPTH - 1));
            let mut seen = BTreeSet::new();
            tree.for_each_match(&t, |_, k, _| assert!(seen.insert(*k), "visited twice: {k}"));
            let expected: BTreeSet<u32> = (DEPTH as u32 - 1..2 * DEPTH as u32).collect();
            assert_eq!(seen, expected);
            // The reference matcher is quadratic on all of them: a spread sample, and the
            // matching `+` filter.
            for (f, k) in
                filters.iter().step_by(97).chain(filters.iter().filter(|(_, k)| *k == DEPTH as u32 - 1))
            {
                assert_eq!(f.matches(&t), seen.contains(k), "{k}");
            }
            assert!(tree.has_match(&t));
        });
    }

    trait Add {
        fn add(self, tail: &str) -> String;
    }

    impl Add for String {
        fn add(mut self, tail: &str) -> String {
            self.push_str(tail);
            self
        }
    }

    // ---- property test against the reference matcher ----

    const NAME_LEVELS: [&str; 4] = ["a", "b", "", "$x"];

    fn name_level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(&NAME_LEVELS[..])
    }

    fn arb_topic() -> impl Strategy<Value = String> {
        prop::collection::vec(name_level(), 1..=4).prop_map(|levels| levels.join("/"))
    }

    fn arb_filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![3 => name_level(), 1 => Just("+")];
        (prop::collection::vec(level, 0..=4), any::<bool>()).prop_filter_map(
            "a filter is not empty",
            |(mut levels, hash)| {
                if hash {
                    levels.push("#");
                }
                let text = levels.join("/");
                (!text.is_empty()).then_some(text)
            },
        )
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(String, u32, u32),
        Remove(String, u32),
    }

    fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
        // Few filters and keys, so removes often hit and sets grow past FEW_MAX sometimes.
        let filters = prop::collection::vec(arb_filter(), 1..12);
        filters.prop_flat_map(|filters| {
            let filter = prop::sample::select(filters);
            let op = prop_oneof![
                3 => (filter.clone(), 0..24u32, any::<u32>()).prop_map(|(f, k, v)| Op::Insert(f, k, v)),
                2 => (filter, 0..24u32).prop_map(|(f, k)| Op::Remove(f, k)),
            ];
            prop::collection::vec(op, 0..200)
        })
    }

    proptest! {
        /// The worklist is a plain stack, across the inline slots and the spill.
        #[test]
        fn worklist_is_a_stack(ops in prop::collection::vec(prop::option::weighted(0.6, 0..8usize), 0..200)) {
            // Pushes win 3 to 2, so the stack crosses the inline limit back and forth.
            let nodes: Vec<Node<u32, ()>> = (0..8).map(|_| Node::default()).collect();
            let index = |(node, rest): Branch<'_, 'static, u32, ()>| {
                (nodes.iter().position(|n| std::ptr::eq(n, node)), rest)
            };
            // Index 4 and up has no text: a branch with all levels consumed.
            let texts = ["a", "b/c", "", "+"];
            let mut inline = [MaybeUninit::uninit(); INLINE_BRANCHES];
            let mut worklist = Worklist::new(&mut inline);
            let mut model = Vec::new();
            for op in ops.into_iter().map(Some).chain(std::iter::repeat_n(None, 201)) {
                match op {
                    Some(Some(i)) => {
                        worklist.push((&nodes[i], texts.get(i).copied()));
                        model.push((Some(i), texts.get(i).copied()));
                    }
                    // A pop, then popping all that is left at the end.
                    Some(None) | None => prop_assert_eq!(worklist.pop().map(index), model.pop()),
                }
                prop_assert_eq!(worklist.len + worklist.spill.len(), model.len());
            }
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference_matcher(
            ops in arb_ops(),
            topics in prop::collection::vec(arb_topic(), 1..16),
        ) {
            let mut tree = SubscriptionTree::new();
            let mut model: BTreeMap<(String, u32), u32> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(f, k, v) => {
                        let expected = model.insert((f.clone(), k), v);
                        prop_assert_eq!(tree.insert(&filter(&f), k, v), expected);
                    }
                    Op::Remove(f, k) => {
                        let expected = model.remove(&(f.clone(), k));
                        prop_assert_eq!(tree.remove(&filter(&f), &k), expected);
                    }
                }
                prop_assert_eq!(tree.len(), model.len());
            }
            tree.check_invariants();
            let distinct: BTreeSet<&String> = model.keys().map(|(f, _)| f).collect();
            prop_assert_eq!(tree.filter_count(), distinct.len());
            for f in &distinct {
                let count = model.keys().filter(|(g, _)| g == *f).count();
                prop_assert_eq!(tree.subscriber_count(&filter(f)), count);
            }
            for ((f, k), v) in &model {
                prop_assert_eq!(tree.get(&filter(f), k), Some(v));
            }
            for name in &topics {
                let t = topic(name);
                let expected: BTreeSet<(String, u32)> = model
                    .keys()
                    .filter(|(f, _)| filter(f).matches(&t))
                    .cloned()
                    .collect();
                prop_assert_eq!(matches(&tree, name), expected, "topic {:?}", name);
            }
            // Removing everything leaves no node behind.
            for (f, k) in model.keys() {
                prop_assert!(tree.remove(&filter(f), k).is_some());
            }
            prop_assert_eq!(tree.node_count(), 0);
            prop_assert!(tree.is_empty());
        }
    }
}
