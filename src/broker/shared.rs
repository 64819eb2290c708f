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

use ahash::AHashMap;

use super::session::{SessionId, Subscription};
use crate::topic::TopicFilter;

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

/// A group and the filter its members share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub group: String,
    pub filter: TopicFilter,
}

/// Why a `$share/` filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SharedFilterError {
    #[error("shared subscription without a share name or filter [MQTT-4.8.2-1]")]
    Incomplete,
    #[error("share name contains a wildcard [MQTT-4.8.2-2]")]
    WildcardInGroup,
}

/// The group and inner filter of a `$share/{group}/{filter}` filter; `None` when the filter
/// is not shared.
pub fn parse(filter: &TopicFilter) -> Option<Result<GroupKey, SharedFilterError>> {
    let rest = filter.as_str().strip_prefix("$share/")?;
    let Some((group, inner)) = rest.split_once('/') else {
        return Some(Err(SharedFilterError::Incomplete));
    };
    if group.is_empty() || inner.is_empty() {
        return Some(Err(SharedFilterError::Incomplete));
    }
    if group.contains(['+', '#']) {
        return Some(Err(SharedFilterError::WildcardInGroup));
    }
    let inner = bytes::Bytes::copy_from_slice(inner.as_bytes());
    Some(
        TopicFilter::new(inner)
            .map(|filter| GroupKey { group: group.to_string(), filter })
            .map_err(|_| SharedFilterError::Incomplete),
    )
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

/// Which shards have members of each group, as their last `SharedInterest` said.
#[derive(Debug, Default)]
pub struct RemoteGroups {
    pub presence: AHashMap<GroupKey, Vec<Presence>>,
    cursors: AHashMap<GroupKey, usize>,
}

impl RemoteGroups {
    pub fn set(&mut self, key: GroupKey, shard: usize, shards: usize, presence: Presence) {
        let entry = self.presence.entry(key.clone()).or_insert_with(|| vec![Presence::None; shards]);
        if let Some(slot) = entry.get_mut(shard) {
            *slot = presence;
        }
        if entry.iter().all(|p| *p == Presence::None) {
            self.presence.remove(&key);
            self.cursors.remove(&key);
        }
    }

    /// The shard to send a message for `key` to: one with a connected member, else one
    /// with an offline member. `local` is this shard's own presence.
    pub fn pick_shard(
        &mut self,
        key: &GroupKey,
        me: usize,
        local: Presence,
        strategy: SharedStrategy,
        random: u64,
    ) -> Option<usize> {
        let remote = self.presence.get(key);
        let presence_of = |shard: usize| {
            if shard == me {
                local
            } else {
                remote.and_then(|r| r.get(shard).copied()).unwrap_or_default()
            }
        };
        let shards = remote.map_or(me + 1, |r| r.len().max(me + 1));
        let best = (0..shards).map(presence_of).max().unwrap_or_default();
        if best == Presence::None {
            return None;
        }
        if strategy == SharedStrategy::LocalFirst && local == best {
            return Some(me);
        }
        let candidates: Vec<usize> = (0..shards).filter(|s| presence_of(*s) == best).collect();
        let cursor = self.cursors.entry(key.clone()).or_insert(0);
        let index = match strategy {
            SharedStrategy::Random => (random % candidates.len() as u64) as usize,
            SharedStrategy::Sticky => *cursor % candidates.len(),
            SharedStrategy::RoundRobin | SharedStrategy::LocalFirst => {
                *cursor = cursor.wrapping_add(1);
                *cursor % candidates.len()
            }
        };
        candidates.get(index).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let key = GroupKey { group: "g".into(), filter: filter("t") };
        let mut remote = RemoteGroups::default();
        remote.set(key.clone(), 1, 3, Presence::Offline);
        remote.set(key.clone(), 2, 3, Presence::Online);
        for _ in 0..5 {
            assert_eq!(remote.pick_shard(&key, 0, Presence::Offline, SharedStrategy::RoundRobin, 0), Some(2));
        }
        let mut seen = [0; 3];
        for _ in 0..6 {
            let shard = remote.pick_shard(&key, 0, Presence::Online, SharedStrategy::RoundRobin, 0).unwrap();
            seen[shard] += 1;
        }
        assert_eq!(seen, [3, 0, 3]);
        assert_eq!(remote.pick_shard(&key, 0, Presence::Online, SharedStrategy::LocalFirst, 0), Some(0));
        remote.set(key.clone(), 1, 3, Presence::None);
        remote.set(key.clone(), 2, 3, Presence::None);
        assert_eq!(remote.pick_shard(&key, 0, Presence::None, SharedStrategy::RoundRobin, 0), None);
    }
}
