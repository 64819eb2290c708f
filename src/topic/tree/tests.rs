//! Tests of the subscription tree: matching by example and against the reference matcher,
//! the invariants after every change, and the stack bounds of hostile filters.

use std::collections::{BTreeMap, BTreeSet};
use std::mem::MaybeUninit;

use proptest::prelude::*;

use super::matching::{Branch, Worklist, INLINE_BRANCHES};
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
        for (f, k) in filters.iter().step_by(97).chain(filters.iter().filter(|(_, k)| *k == DEPTH as u32 - 1))
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
