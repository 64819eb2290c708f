//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5.0 §4.8.2, also offered to 3.1.1
//! clients): each matching message goes to one member of the group, wherever its members
//! live.
//!
//! A shard knows its own members of each group and, from `SharedInterest` messages, which
//! other shards have members and whether any of those are connected. The shard a message
//! is published on picks one shard with a connected member (by `--shared-strategy`), or,
//! when no member is connected anywhere, one with an offline persistent member, which
//! queues it. The chosen shard picks one of its members. When a member's connection ends,
//! the shared messages it had not acknowledged go to another connected member.

use std::sync::Arc;

use ahash::AHashMap;

use super::session::{SessionId, Subscription};
pub use crate::topic::{parse_shared as parse, GroupKey, SharedFilterError};

/// How a group's next member is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SharedStrategy {
    /// In turn, across shards and then across a shard's members.
    RoundRobin,
    /// At random.
    Random,
    /// The same member until it goes away.
    Sticky,
    /// A member on the publishing shard when there is one, else round robin.
    LocalFirst,
}

/// What a shard tells its peers about its members of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Presence {
    #[default]
    None,
    /// Only members whose sessions wait offline.
    Offline,
    /// At least one connected member.
    Online,
}

/// This shard's members of one group.
#[derive(Debug, Default)]
pub struct LocalGroup {
    pub members: Vec<(SessionId, Subscription)>,
    cursor: usize,
    /// What peers were last told.
    pub advertised: Presence,
}

impl LocalGroup {
    pub fn insert(&mut self, sid: SessionId, subscription: Subscription) {
        match self.members.iter_mut().find(|(s, _)| *s == sid) {
            Some(member) => member.1 = subscription,
            None => self.members.push((sid, subscription)),
        }
    }

    pub fn remove(&mut self, sid: SessionId) -> bool {
        let before = self.members.len();
        self.members.retain(|(s, _)| *s != sid);
        before != self.members.len()
    }

    /// The next member among those `eligible`, by the strategy.
    pub fn pick(
        &mut self,
        strategy: SharedStrategy,
        random: u64,
        eligible: impl Fn(SessionId) -> bool,
    ) -> Option<(SessionId, Subscription)> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = match strategy {
            SharedStrategy::Random => (random % n as u64) as usize,
            SharedStrategy::Sticky => self.cursor % n,
            SharedStrategy::RoundRobin | SharedStrategy::LocalFirst => (self.cursor + 1) % n,
        };
        for offset in 0..n {
            let index = (start + offset) % n;
            let (sid, sub) = self.members[index];
            if eligible(sid) {
                self.cursor = index;
                return Some((sid, sub));
            }
        }
        None
    }
}

/// A group as one shard knows it: its own members and what each peer said of its own.
#[derive(Debug)]
pub struct Group {
    pub key: Arc<GroupKey>,
    pub local: LocalGroup,
    /// Per shard (this one's slot unused): its presence, as its last `SharedInterest` said.
    pub remote: Vec<Presence>,
    cursor: usize,
}

impl Group {
    /// Whether a shard other than `me` has a connected member.
    pub fn online_elsewhere(&self, me: usize) -> bool {
        self.remote.iter().enumerate().any(|(shard, p)| shard != me && *p == Presence::Online)
    }

    /// The shard to send a message of this group to: one with a connected member, else one
    /// with only offline members; `me`'s presence is `local`. Constant work per
    /// shard, no allocation: it runs for every matching group of every publish.
    pub fn pick_shard(
        &mut self,
        me: usize,
        local: Presence,
        strategy: SharedStrategy,
        random: u64,
    ) -> Option<usize> {
        let remote = &self.remote;
        let presence_of =
            |shard: usize| if shard == me { local } else { remote.get(shard).copied().unwrap_or_default() };
        let shards = remote.len().max(me + 1);
        let best = (0..shards).map(presence_of).max().unwrap_or_default();
        if best == Presence::None {
            return None;
        }
        if strategy == SharedStrategy::LocalFirst && local == best {
            return Some(me);
        }
        let candidates = (0..shards).filter(|s| presence_of(*s) == best).count();
        let index = match strategy {
            SharedStrategy::Random => (random % candidates as u64) as usize,
            SharedStrategy::Sticky => self.cursor % candidates,
            SharedStrategy::RoundRobin | SharedStrategy::LocalFirst => {
                self.cursor = self.cursor.wrapping_add(1);
                self.cursor % candidates
            }
        };
        (0..shards).filter(|s| presence_of(*s) == best).nth(index)
    }
}

/// A shard's groups, each under a small local number (what its subscription tree of
/// shared filters holds), so a publish matching a group costs a slot lookup, not a hash
/// of its name.
///
/// Invariants: `by_key[slots[id].key] == id` for every occupied slot; a group is kept while
/// it has local members or a peer reports presence.
#[derive(Debug, Default)]
pub struct Groups {
    slots: Vec<Option<Group>>,
    free: Vec<GroupId>,
    by_key: AHashMap<Arc<GroupKey>, GroupId>,
}

pub type GroupId = u32;

impl Groups {
    pub fn id(&self, key: &GroupKey) -> Option<GroupId> {
        self.by_key.get(key).copied()
    }

    pub fn get(&self, id: GroupId) -> Option<&Group> {
        self.slots.get(id as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, id: GroupId) -> Option<&mut Group> {
        self.slots.get_mut(id as usize)?.as_mut()
    }

    pub fn by_key(&self, key: &GroupKey) -> Option<&Group> {
        self.get(self.id(key)?)
    }

    /// The group's number, creating it (and returning `true`) when new.
    pub fn entry(&mut self, key: &Arc<GroupKey>, shards: usize) -> (GroupId, bool) {
        if let Some(id) = self.id(key) {
            return (id, false);
        }
        let key = key.clone();
        let group = Group {
            key: key.clone(),
            local: LocalGroup::default(),
            remote: vec![Presence::None; shards],
            cursor: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(group);
                id
            }
            None => {
                self.slots.push(Some(group));
                (self.slots.len() - 1) as GroupId
            }
        };
        self.by_key.insert(key, id);
        (id, true)
    }

    /// Forgets a group nobody has any more (no local member, no peer's presence); returns
    /// it when it went, for its filter to leave the subscription tree.
    pub fn remove_if_unused(&mut self, id: GroupId) -> Option<Group> {
        let group = self.get(id)?;
        if !group.local.members.is_empty() || group.remote.iter().any(|p| *p != Presence::None) {
            return None;
        }
        let group = self.slots.get_mut(id as usize)?.take()?;
        self.by_key.remove(&group.key);
        self.free.push(id);
        Some(group)
    }
}

/// The part of a filter that matches topics: a shared filter without `$share/{group}/`.
pub fn topics_of(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or("", |(_, topics)| topics),
        None => filter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicFilter;

    fn filter(text: &str) -> TopicFilter {
        TopicFilter::new(bytes::Bytes::copy_from_slice(text.as_bytes())).unwrap()
    }

    #[test]
    fn parses_share_names() {
        assert_eq!(parse(&filter("a/b")), None);
        let key = parse(&filter("$share/g/a/+")).unwrap().unwrap();
        assert_eq!(key.group, "g");
        assert_eq!(key.filter.as_str(), "a/+");
        assert_eq!(parse(&filter("$share/g")), Some(Err(SharedFilterError::Incomplete)));
        assert_eq!(parse(&filter("$share//a")), Some(Err(SharedFilterError::Incomplete)));
    }

    #[test]
    fn round_robin_spreads_over_eligible_members() {
        let sub = Subscription {
            options: crate::codec::SubscriptionOptions {
                qos: crate::codec::QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
            identifier: None,
            acl: crate::auth::AclMark::OPEN,
        };
        let mut group = LocalGroup::default();
        for sid in 1..=3 {
            group.insert(sid, sub);
        }
        let picks: Vec<SessionId> = (0..6)
            .filter_map(|_| group.pick(SharedStrategy::RoundRobin, 0, |_| true))
            .map(|(s, _)| s)
            .collect();
        for sid in 1..=3 {
            assert_eq!(picks.iter().filter(|p| **p == sid).count(), 2, "{picks:?}");
        }
        let only_two: Vec<SessionId> = (0..4)
            .filter_map(|_| group.pick(SharedStrategy::RoundRobin, 0, |s| s == 2))
            .map(|(s, _)| s)
            .collect();
        assert_eq!(only_two, vec![2, 2, 2, 2]);
    }

    #[test]
    fn shards_with_connected_members_come_first() {
        let mut groups = Groups::default();
        let (id, new) = groups.entry(&Arc::new(GroupKey { group: "g".into(), filter: filter("t") }), 3);
        assert!(new);
        let group = groups.get_mut(id).unwrap();
        group.remote[1] = Presence::Offline;
        group.remote[2] = Presence::Online;
        group.local.advertised = Presence::Offline;
        for _ in 0..5 {
            assert_eq!(group.pick_shard(0, group.local.advertised, SharedStrategy::RoundRobin, 0), Some(2));
        }
        group.local.advertised = Presence::Online;
        let mut seen = [0; 3];
        for _ in 0..6 {
            seen[group.pick_shard(0, group.local.advertised, SharedStrategy::RoundRobin, 0).unwrap()] += 1;
        }
        assert_eq!(seen, [3, 0, 3]);
        assert_eq!(group.pick_shard(0, group.local.advertised, SharedStrategy::LocalFirst, 0), Some(0));
        group.remote = vec![Presence::None; 3];
        group.local.advertised = Presence::None;
        assert_eq!(group.pick_shard(0, group.local.advertised, SharedStrategy::RoundRobin, 0), None);
        let gone = groups.remove_if_unused(id).map(|g| g.key.group.clone());
        assert_eq!(gone.as_deref(), Some("g"));
        assert!(groups.id(&GroupKey { group: "g".into(), filter: filter("t") }).is_none());
        // The slot is reused.
        assert_eq!(
            groups.entry(&Arc::new(GroupKey { group: "h".into(), filter: filter("t") }), 3),
            (id, true)
        );
    }
}
