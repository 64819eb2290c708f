//! Matching a topic against the tree: the walk behind [`SubscriptionTree::for_each_match`]
//! and [`SubscriptionTree::has_match`], with its worklist of branches not taken yet.

use std::mem::MaybeUninit;
use std::ops::ControlFlow;

use super::{Node, Subscribers, SubscriptionTree, TopicFilter, TopicName};

/// The first level of `text` and the rest after its `/`, or `None` if it was the last.
#[inline]
fn split_level(text: &str) -> (&str, Option<&str>) {
    match text.split_once('/') {
        Some((level, rest)) => (level, Some(rest)),
        None => (text, None),
    }
}

/// A branch of a match walk: a node, and the topic's levels it has to match (`None` once
/// all are consumed).
pub(super) type Branch<'a, 't, K, V> = (&'a Node<K, V>, Option<&'t str>);

/// Branches in the worklist before it spills to the heap. Most topics meet a few forks, so
/// a publish allocates nothing; 16 entries take 384 bytes of stack.
pub(super) const INLINE_BRANCHES: usize = 16;

/// Uninitialised room for the first branches of a [`Worklist`].
type InlineBranches<'a, 't, K, V> = [MaybeUninit<Branch<'a, 't, K, V>>; INLINE_BRANCHES];

// `pub(super)`, with its fields and methods, for the worklist test in `tests.rs`.
/// The branches a match walk has still to take, last in first out. Local to one walk, so
/// a visitor that matches against the same tree again gets a worklist of its own.
pub(super) struct Worklist<'w, 'a, 't, K, V> {
    /// The first [`INLINE_BRANCHES`]; `inline[..len]` are initialised. Borrowed rather
    /// than owned: built with `len` in one struct, the array got zeroed with it, a
    /// 392-byte memset that cost 3 ns on every publish.
    inline: &'w mut InlineBranches<'a, 't, K, V>,
    pub(super) len: usize,
    /// Branches pushed while `inline` is full; only then non-empty, so it holds the most
    /// recent ones. Allocates on its first push only.
    pub(super) spill: Vec<Branch<'a, 't, K, V>>,
}

impl<'w, 'a, 't, K, V> Worklist<'w, 'a, 't, K, V> {
    #[inline]
    pub(super) fn new(inline: &'w mut InlineBranches<'a, 't, K, V>) -> Self {
        Worklist { inline, len: 0, spill: Vec::new() }
    }

    #[inline]
    pub(super) fn push(&mut self, branch: Branch<'a, 't, K, V>) {
        if self.len < INLINE_BRANCHES {
            self.inline[self.len].write(branch);
            self.len += 1;
        } else {
            self.spill.push(branch);
        }
    }

    #[inline]
    pub(super) fn pop(&mut self) -> Option<Branch<'a, 't, K, V>> {
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

impl<K, V> SubscriptionTree<K, V> {
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
