//! One client's rules, compiled into a level trie: [`ClientAcl`] and its [`Builder`].
//!
//! The trie is frozen once built and kept in three flat vectors (the filters' text, the
//! nodes, the edges between them), so compiling a client's handful of rules makes a
//! handful of allocations, and checking a topic follows one path of nodes, forking only
//! where a node has both a matching exact child and a `+` child.
//!
//! # Invariants
//! - Nodes are numbered breadth first from the root, 0; an edge or a `+` child never
//!   points at the root, so 0 also means "no `+` child".
//! - A node's exact children are the edges `edges[first..end]`, sorted by their level's
//!   bytes (for a binary search), never `+` or `#`.
//! - A node's `exact` bits are the access of the rules that end at it, its `hash` bits
//!   those of the rules that are its path followed by `/#` (or `#` alone, at the root).

use super::relation::{covers, overlaps};
use super::{SubscribeVerdict, DENY, READ, WRITE};
use crate::topic::TopicFilter;

/// The root's index; no edge leads to it (see the invariants).
const ROOT: usize = 0;

/// A rule: its filter, `text[start..end]`, and its access bits.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    /// While building, where the next level to place starts; `end + 1` once all are.
    cursor: usize,
    access: u8,
}

#[derive(Debug, Default, Clone, Copy)]
struct Node {
    /// This node's exact children: `edges[first_edge..end_edge]`.
    first_edge: usize,
    end_edge: usize,
    /// The `+` child; [`ROOT`] when there is none.
    plus: usize,
    exact: u8,
    hash: u8,
}

/// An exact child: its level, `text[start..end]`, and its node.
#[derive(Debug, Clone, Copy)]
struct Edge {
    start: usize,
    end: usize,
    child: usize,
}

#[derive(Debug, Clone)]
struct Compiled {
    /// The filters of all the rules, one after the other.
    text: String,
    rules: Vec<Span>,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    /// Without deny rules, a match walk can stop at the first grant it meets.
    has_deny: bool,
}

/// The access rules of one client, compiled for matching; owned by its connection.
#[derive(Debug, Clone)]
pub struct ClientAcl {
    /// `None` when no ACL is configured: everything is allowed but publishing to `$SYS`.
    compiled: Option<Compiled>,
}

/// Collects a client's rules, then compiles them with [`Builder::finish`].
pub(super) struct Builder {
    text: String,
    rules: Vec<Span>,
}

/// The level of `text` starting at `cursor` (in a filter ending at `end`) and where the
/// next one starts, or `None` once the filter's levels are all consumed.
fn level_at(text: &str, cursor: usize, end: usize) -> Option<(&str, usize)> {
    let rest = text.get(cursor..end)?;
    Some(match rest.split_once('/') {
        Some((level, _)) => (level, cursor + level.len() + 1),
        None => (rest, end + 1),
    })
}

impl Builder {
    /// Room for `rules` rules of `bytes` bytes of filters in all, so building reallocates
    /// nothing.
    pub(super) fn with_capacity(rules: usize, bytes: usize) -> Builder {
        Builder { text: String::with_capacity(bytes), rules: Vec::with_capacity(rules) }
    }

    /// Adds a rule; `filter` must be a valid topic filter.
    pub(super) fn push(&mut self, filter: &str, access: u8) {
        let start = self.text.len();
        self.text.push_str(filter);
        self.close(start, access);
    }

    /// Adds a `pattern` rule with its whole `%c` and `%u` levels substituted. The caller has
    /// checked that the names substituted hold no `/`, `+` or `#`.
    pub(super) fn push_pattern(&mut self, filter: &str, access: u8, client_id: &str, username: &str) {
        let start = self.text.len();
        for (index, level) in filter.split('/').enumerate() {
            if index > 0 {
                self.text.push('/');
            }
            self.text.push_str(match level {
                "%c" => client_id,
                "%u" => username,
                literal => literal,
            });
        }
        self.close(start, access);
    }

    fn close(&mut self, start: usize, access: u8) {
        let end = self.text.len();
        // Only a pattern `%c` or `%u` for an empty name gets here, and no topic is empty.
        if end > start {
            self.rules.push(Span { start, end, cursor: start, access });
        }
    }

    /// Builds the trie breadth first over the rules sorted by levels: the rules below a
    /// node are then one run of the sorted list, and the rules that share its next level
    /// one run within it.
    pub(super) fn finish(self) -> ClientAcl {
        let Builder { text, mut rules } = self;
        let levels = |span: &Span| text.get(span.start..span.end).unwrap_or_default().split('/');
        rules.sort_unstable_by(|a, b| levels(a).cmp(levels(b)));
        let has_deny = rules.iter().any(|rule| rule.access & DENY != 0);

        // One node per level of every rule at most, and the root: reserved at once.
        let most = 1 + rules.len() + text.bytes().filter(|b| *b == b'/').count();
        let mut nodes = Vec::with_capacity(most);
        nodes.push(Node::default());
        // The rules below each node, `rules[first..end]`, in the order of `nodes`.
        let mut below = Vec::with_capacity(most);
        below.push((0, rules.len()));
        let mut edges = Vec::with_capacity(most);
        let mut at = 0;
        while let Some(&(first, end)) = below.get(at) {
            let mut node = Node { first_edge: edges.len(), ..Node::default() };
            let mut offset = first;
            let run = rules.get_mut(first..end).unwrap_or_default();
            let next_level = |span: &Span| level_at(&text, span.cursor, span.end);
            for group in run.chunk_by_mut(|a, b| next_level(a).map(|l| l.0) == next_level(b).map(|l| l.0)) {
                let group_start = offset;
                offset += group.len();
                let access = group.iter().fold(0, |bits, rule| bits | rule.access);
                let Some(&Span { cursor, end: filter_end, .. }) = group.first() else { continue };
                let Some((level, _)) = level_at(&text, cursor, filter_end) else {
                    node.exact |= access;
                    continue;
                };
                if level == "#" {
                    node.hash |= access;
                    continue;
                }
                let child = nodes.len();
                nodes.push(Node::default());
                below.push((group_start, offset));
                if level == "+" {
                    node.plus = child;
                } else {
                    edges.push(Edge { start: cursor, end: cursor + level.len(), child });
                }
                for rule in group.iter_mut() {
                    rule.cursor = next_level(rule).map_or(rule.end + 1, |l| l.1);
                }
            }
            node.end_edge = edges.len();
            if let Some(slot) = nodes.get_mut(at) {
                *slot = node;
            }
            at += 1;
        }
        ClientAcl { compiled: Some(Compiled { text, rules, nodes, edges, has_deny }) }
    }
}

/// Branches kept on the stack before [`Worklist`] spills to the heap: enough for the forks
/// of ordinary ACLs, and 128 bytes to clear per check.
const INLINE_BRANCHES: usize = 8;

/// The branches of a match walk not taken yet: a node, and where the topic's next level
/// starts (past its end once all are consumed).
struct Worklist {
    inline: [(usize, usize); INLINE_BRANCHES],
    len: usize,
    /// Used only while `inline` is full; allocates on its first push.
    spill: Vec<(usize, usize)>,
}

impl Worklist {
    fn new() -> Worklist {
        Worklist { inline: [(0, 0); INLINE_BRANCHES], len: 0, spill: Vec::new() }
    }

    fn push(&mut self, branch: (usize, usize)) {
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = branch;
                self.len += 1;
            }
            None => self.spill.push(branch),
        }
    }

    fn pop(&mut self) -> Option<(usize, usize)> {
        if let Some(branch) = self.spill.pop() {
            return Some(branch);
        }
        self.len = self.len.checked_sub(1)?;
        self.inline.get(self.len).copied()
    }
}

impl Compiled {
    fn child(&self, node: &Node, level: &str) -> Option<usize> {
        let edges = self.edges.get(node.first_edge..node.end_edge)?;
        let text = self.text.as_bytes();
        let found = edges.binary_search_by(|edge| {
            text.get(edge.start..edge.end).unwrap_or_default().cmp(level.as_bytes())
        });
        edges.get(found.ok()?).map(|edge| edge.child)
    }

    /// Whether the rules matching `topic` grant `need` and none of them denies.
    fn allows(&self, topic: &str, need: u8) -> bool {
        let dollar = topic.starts_with('$');
        let mut found = 0;
        let mut pending = Worklist::new();
        let mut next = Some((ROOT, 0));
        while let Some((at, pos)) = next.take().or_else(|| pending.pop()) {
            let Some(node) = self.nodes.get(at) else { continue };
            // MQTT-4.7.2-1: a filter starting with a wildcard matches no `$` topic.
            let wildcards = !(dollar && at == ROOT);
            if wildcards {
                found |= node.hash;
            }
            match topic.get(pos..) {
                Some(rest) => {
                    let (level, after) = match rest.split_once('/') {
                        Some((level, _)) => (level, pos + level.len() + 1),
                        None => (rest, topic.len() + 1),
                    };
                    if wildcards && node.plus != ROOT {
                        next = Some((node.plus, after));
                    }
                    if let Some(child) = self.child(node, level) {
                        if let Some(plus) = next.replace((child, after)) {
                            pending.push(plus);
                        }
                    }
                }
                // Past the end: every level matched.
                None => found |= node.exact,
            }
            if found & DENY != 0 {
                return false;
            }
            if !self.has_deny && found & need != 0 {
                return true;
            }
        }
        found & need != 0
    }

    fn filters(&self, access: u8) -> impl Iterator<Item = &str> {
        self.rules
            .iter()
            .filter(move |rule| rule.access & access != 0)
            .map(|rule| self.text.get(rule.start..rule.end).unwrap_or_default())
    }
}

/// `$SYS` topics are the broker's to publish.
fn is_sys(topic: &str) -> bool {
    topic.split('/').next() == Some("$SYS")
}

impl ClientAcl {
    /// For a broker without an ACL: everything is allowed but publishing to `$SYS`.
    pub fn allow_all() -> ClientAcl {
        ClientAcl { compiled: None }
    }

    /// Nothing allowed: the start for a client whose only grants come from
    /// [`ClientAcl::with_extra`].
    pub fn deny_all() -> ClientAcl {
        Builder::with_capacity(0, 0).finish()
    }

    /// Whether the client may publish to `topic` (a topic name, no wildcards).
    pub fn can_publish(&self, topic: &str) -> bool {
        if is_sys(topic) {
            return false;
        }
        self.compiled.as_ref().is_none_or(|compiled| compiled.allows(topic, WRITE))
    }

    /// Whether a message published to `topic` may be delivered to the client.
    pub fn can_read(&self, topic: &str) -> bool {
        self.compiled.as_ref().is_none_or(|compiled| compiled.allows(topic, READ))
    }

    /// What a subscription with `filter` may receive. A shared subscription is judged on
    /// its topic filter: the caller strips `$share/GROUP/` first.
    ///
    /// `Allowed` needs one read rule that covers the whole filter; a filter covered only by
    /// several rules together is `Filtered` (still right, one check per delivery dearer).
    /// Likewise `Denied` needs one deny rule to cover it, or no read rule to overlap it.
    /// An invalid filter is `Denied`.
    pub fn subscribe(&self, filter: &str) -> SubscribeVerdict {
        let Some(compiled) = &self.compiled else { return SubscribeVerdict::Allowed };
        if TopicFilter::new(filter.to_owned()).is_err() {
            return SubscribeVerdict::Denied;
        }
        let mut denies_some = false;
        for rule in compiled.filters(DENY) {
            if covers(rule, filter) {
                return SubscribeVerdict::Denied;
            }
            denies_some |= overlaps(rule, filter);
        }
        let (mut reads_some, mut reads_all) = (false, false);
        for rule in compiled.filters(READ) {
            if covers(rule, filter) {
                reads_all = true;
                break;
            }
            reads_some = reads_some || overlaps(rule, filter);
        }
        match (reads_all, reads_some, denies_some) {
            (true, _, false) => SubscribeVerdict::Allowed,
            (false, false, _) => SubscribeVerdict::Denied,
            _ => SubscribeVerdict::Filtered,
        }
    }

    /// This client's rules with grants added: `publish` filters allowed for writing and
    /// `subscribe` filters for reading (a JWT's `acl` claim, EMQX format). Deny rules still
    /// win over them. Invalid filters are skipped; on [`ClientAcl::allow_all`] this
    /// changes nothing.
    pub fn with_extra(self, publish: &[String], subscribe: &[String]) -> ClientAcl {
        let Some(compiled) = self.compiled else { return ClientAcl::allow_all() };
        let Compiled { mut text, mut rules, .. } = compiled;
        rules.reserve(publish.len() + subscribe.len());
        text.reserve(publish.iter().chain(subscribe).map(String::len).sum());
        let mut builder = Builder { text, rules };
        let extra = publish.iter().map(|f| (f, WRITE)).chain(subscribe.iter().map(|f| (f, READ)));
        for (filter, access) in extra {
            if TopicFilter::new(filter.clone()).is_ok() {
                builder.push(filter, access);
            }
        }
        for rule in &mut builder.rules {
            rule.cursor = rule.start;
        }
        builder.finish()
    }
}
