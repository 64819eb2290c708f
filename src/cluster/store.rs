//! The control plane's store, as etcd models it: keys with values, a revision counting
//! every change, leases that take their keys with them when they expire, transactions that
//! compare before they write (the fencing of client ownership), and a change history a
//! watcher reads from a revision on. [`ClusterStore`] is that contract; [`MemoryStore`]
//! implements it in memory, pure (time is passed in), so what is built on it is tested
//! without a server. The etcd implementation runs on the control thread.

use std::collections::{BTreeMap, VecDeque};

/// A lease: keys attached to it are deleted when it expires or is revoked.
pub type LeaseId = i64;
/// The store's revision: every successful write transaction increments it once.
pub type Revision = u64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("revision {requested} is compacted: the history starts at {oldest}")]
    Compacted { requested: Revision, oldest: Revision },
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// A key and what the store knows of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created it (since its last deletion).
    pub create_revision: Revision,
    /// The revision of its last change.
    pub mod_revision: Revision,
    /// Writes since it was created (1 after the first).
    pub version: u64,
    pub lease: Option<LeaseId>,
}

/// A write within a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8>, lease: Option<LeaseId> },
    Delete { key: String },
}

/// What a transaction checks before it writes; a missing key has revisions and version 0
/// (etcd's rule: `create_revision == 0` means "does not exist").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    ModRevision(String, Revision),
    CreateRevision(String, Revision),
    Value(String, Vec<u8>),
}

/// A change, as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// The key as it was, with the revision of its deletion as `mod_revision`.
    Delete(KeyValue),
}

impl Event {
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) | Event::Delete(kv) => kv.mod_revision,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) | Event::Delete(kv) => &kv.key,
        }
    }
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Every comparison held: the success branch ran (else the failure branch).
    pub succeeded: bool,
    /// The store's revision after it.
    pub revision: Revision,
}

/// The control plane's store. Blocking calls: it is used from the control thread only,
/// never from a shard.
pub trait ClusterStore {
    fn grant_lease(&mut self, ttl_ms: u64) -> Result<LeaseId, StoreError>;
    /// Renews a lease for its whole TTL.
    fn keep_alive(&mut self, lease: LeaseId) -> Result<(), StoreError>;
    /// Ends a lease at once, deleting its keys.
    fn revoke(&mut self, lease: LeaseId) -> Result<(), StoreError>;
    /// Runs `success` if every comparison holds, else `failure`, atomically.
    fn txn(&mut self, compare: &[Compare], success: &[Op], failure: &[Op]) -> Result<TxnResult, StoreError>;
    /// Every key starting with `prefix`, in key order, and the revision they are as of.
    fn range(&mut self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// A page of [`range`](ClusterStore::range): at most `limit` keys starting with `prefix`
    /// from `from` on (`from` itself included), in key order; and whether more follow.
    fn range_page(
        &mut self,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<(Vec<KeyValue>, bool), StoreError>;

    fn put(&mut self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        let op = Op::Put { key: key.to_string(), value: value.to_vec(), lease };
        Ok(self.txn(&[], &[op], &[])?.revision)
    }

    fn delete(&mut self, key: &str) -> Result<Revision, StoreError> {
        Ok(self.txn(&[], &[Op::Delete { key: key.to_string() }], &[])?.revision)
    }

    fn get(&mut self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let (found, _) = self.range(key)?;
        Ok(found.into_iter().find(|kv| kv.key == key))
    }
}

struct Lease {
    ttl_ms: u64,
    expires_at_ms: u64,
}

/// [`ClusterStore`] in memory, with etcd's semantics. Time is the `now_ms` last given to
/// [`MemoryStore::advance`]; leases expire there. The history keeps the last
/// `history_limit` events (older revisions answer [`StoreError::Compacted`], as a
/// compacted etcd does).
pub struct MemoryStore {
    keys: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, Lease>,
    history: VecDeque<Event>,
    history_limit: usize,
    /// The oldest revision `changes` can answer from.
    oldest: Revision,
    revision: Revision,
    next_lease: LeaseId,
    now_ms: u64,
    /// Set by a test: every call fails (etcd lost quorum, or the node is cut from it).
    pub unavailable: bool,
}

impl MemoryStore {
    pub fn new(history_limit: usize) -> MemoryStore {
        MemoryStore {
            keys: BTreeMap::new(),
            leases: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            oldest: 0,
            revision: 1,
            next_lease: 1,
            now_ms: 0,
            unavailable: false,
        }
    }

    /// Moves time to `now_ms` (never backwards): leases past their TTL expire, each in a
    /// revision of its own that deletes its keys.
    pub fn advance(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let expired: Vec<LeaseId> =
            self.leases.iter().filter(|(_, l)| l.expires_at_ms <= self.now_ms).map(|(id, _)| *id).collect();
        for lease in expired {
            self.end_lease(lease);
        }
    }

    /// Changes to keys starting with `prefix` after revision `after`, in order (what an
    /// etcd watch from `after + 1` streams; see `etcd::EtcdWatch`).
    pub fn changes(&mut self, prefix: &str, after: Revision) -> Result<Vec<Event>, StoreError> {
        self.check()?;
        if after < self.oldest {
            return Err(StoreError::Compacted { requested: after, oldest: self.oldest });
        }
        Ok(self
            .history
            .iter()
            .filter(|e| e.revision() > after && e.key().starts_with(prefix))
            .cloned()
            .collect())
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.unavailable {
            return Err(StoreError::Unavailable("no quorum".into()));
        }
        Ok(())
    }

    fn end_lease(&mut self, lease: LeaseId) {
        self.leases.remove(&lease);
        let keys: Vec<String> =
            self.keys.values().filter(|kv| kv.lease == Some(lease)).map(|kv| kv.key.clone()).collect();
        if keys.is_empty() {
            return;
        }
        self.revision += 1;
        for key in keys {
            self.apply_delete(&key);
        }
    }

    fn record(&mut self, event: Event) {
        self.history.push_back(event);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.oldest = old.revision();
            }
        }
    }

    fn apply_delete(&mut self, key: &str) {
        if let Some(mut kv) = self.keys.remove(key) {
            kv.mod_revision = self.revision;
            self.record(Event::Delete(kv));
        }
    }

    fn holds(&self, compare: &Compare) -> bool {
        let kv = |key: &str| self.keys.get(key);
        match compare {
            Compare::ModRevision(key, rev) => kv(key).map_or(0, |kv| kv.mod_revision) == *rev,
            Compare::CreateRevision(key, rev) => kv(key).map_or(0, |kv| kv.create_revision) == *rev,
            Compare::Value(key, value) => kv(key).is_some_and(|kv| &kv.value == value),
        }
    }
}

impl ClusterStore for MemoryStore {
    fn grant_lease(&mut self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        self.check()?;
        let id = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(id, Lease { ttl_ms, expires_at_ms: self.now_ms + ttl_ms });
        Ok(id)
    }

    fn keep_alive(&mut self, lease: LeaseId) -> Result<(), StoreError> {
        self.check()?;
        let now = self.now_ms;
        let l = self.leases.get_mut(&lease).ok_or(StoreError::LeaseNotFound(lease))?;
        l.expires_at_ms = now + l.ttl_ms;
        Ok(())
    }

    fn revoke(&mut self, lease: LeaseId) -> Result<(), StoreError> {
        self.check()?;
        if !self.leases.contains_key(&lease) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        self.end_lease(lease);
        Ok(())
    }

    fn txn(&mut self, compare: &[Compare], success: &[Op], failure: &[Op]) -> Result<TxnResult, StoreError> {
        self.check()?;
        let succeeded = compare.iter().all(|c| self.holds(c));
        let ops = if succeeded { success } else { failure };
        // A put on a lease that is gone fails the whole transaction, as in etcd.
        for op in ops {
            if let Op::Put { lease: Some(lease), .. } = op {
                if !self.leases.contains_key(lease) {
                    return Err(StoreError::LeaseNotFound(*lease));
                }
            }
        }
        let writes = ops.iter().any(|op| match op {
            Op::Put { .. } => true,
            Op::Delete { key } => self.keys.contains_key(key),
        });
        if writes {
            self.revision += 1;
        }
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let revision = self.revision;
                    let kv = match self.keys.get(key) {
                        Some(old) => KeyValue {
                            value: value.clone(),
                            mod_revision: revision,
                            version: old.version + 1,
                            lease: *lease,
                            ..old.clone()
                        },
                        None => KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: revision,
                            mod_revision: revision,
                            version: 1,
                            lease: *lease,
                        },
                    };
                    self.keys.insert(key.clone(), kv.clone());
                    self.record(Event::Put(kv));
                }
                Op::Delete { key } => self.apply_delete(key),
            }
        }
        Ok(TxnResult { succeeded, revision: self.revision })
    }

    fn range(&mut self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.check()?;
        let found = self.keys.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix));
        Ok((found.map(|(_, kv)| kv.clone()).collect(), self.revision))
    }

    fn range_page(
        &mut self,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<(Vec<KeyValue>, bool), StoreError> {
        self.check()?;
        let start = from.max(prefix).to_string();
        let mut found = self.keys.range(start..).take_while(|(k, _)| k.starts_with(prefix));
        let page: Vec<KeyValue> = found.by_ref().take(limit).map(|(_, kv)| kv.clone()).collect();
        Ok((page, found.next().is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_write_transaction_is_one_revision_and_versions_count_writes() {
        let mut store = MemoryStore::new(100);
        let r1 = store.put("/a", b"1", None).unwrap();
        let r2 = store.put("/a", b"2", None).unwrap();
        assert_eq!(r2, r1 + 1);
        let kv = store.get("/a").unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (r1, r2, 2));
        let both = [
            Op::Put { key: "/b".into(), value: b"x".to_vec(), lease: None },
            Op::Put { key: "/c".into(), value: b"y".to_vec(), lease: None },
        ];
        let t = store.txn(&[], &both, &[]).unwrap();
        assert_eq!(t.revision, r2 + 1, "two puts, one revision");
        assert_eq!(store.delete("/missing").unwrap(), t.revision, "deleting nothing writes nothing");
    }

    #[test]
    fn a_transaction_compares_before_it_writes_and_fences_a_stale_owner() {
        let mut store = MemoryStore::new(100);
        let claim = |node: &str, seen: Revision| {
            (
                vec![Compare::ModRevision("/sessions/c1".into(), seen)],
                vec![Op::Put { key: "/sessions/c1".into(), value: node.as_bytes().to_vec(), lease: None }],
            )
        };
        // Both nodes saw the key missing (revision 0); only the first claim succeeds.
        let (cmp, ops) = claim("A", 0);
        assert!(store.txn(&cmp, &ops, &[]).unwrap().succeeded);
        let (cmp, ops) = claim("B", 0);
        let t = store.txn(&cmp, &ops, &[]).unwrap();
        assert!(!t.succeeded);
        assert_eq!(store.get("/sessions/c1").unwrap().unwrap().value, b"A");
        // B reads the current revision and takes it over; A's later write with its old
        // revision is refused.
        let seen = store.get("/sessions/c1").unwrap().unwrap().mod_revision;
        let (cmp, ops) = claim("B", seen);
        assert!(store.txn(&cmp, &ops, &[]).unwrap().succeeded);
        let (cmp, ops) = claim("A", seen);
        assert!(!store.txn(&cmp, &ops, &[]).unwrap().succeeded);
        assert_eq!(store.get("/sessions/c1").unwrap().unwrap().value, b"B");
        let absent = [Compare::CreateRevision("/nope".into(), 0)];
        assert!(store.txn(&absent, &[], &[]).unwrap().succeeded);
    }

    #[test]
    fn an_expired_lease_takes_its_keys_and_a_renewed_one_keeps_them() {
        let mut store = MemoryStore::new(100);
        let a = store.grant_lease(1000).unwrap();
        let b = store.grant_lease(1000).unwrap();
        store.put("/nodes/a", b"addr-a", Some(a)).unwrap();
        store.put("/routes/x/a", b"", Some(a)).unwrap();
        store.put("/nodes/b", b"addr-b", Some(b)).unwrap();
        let before = store.range("/").unwrap().1;
        store.advance(900);
        store.keep_alive(b).unwrap();
        store.advance(1500);
        let (left, revision) = store.range("/").unwrap();
        assert_eq!(left.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["/nodes/b"]);
        assert_eq!(revision, before + 1, "the expiry is one revision");
        let events = store.changes("/", before).unwrap();
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| matches!(e, Event::Delete(_)) && e.revision() == revision));
        assert_eq!(store.keep_alive(a), Err(StoreError::LeaseNotFound(a)));
        assert_eq!(store.put("/late", b"", Some(a)), Err(StoreError::LeaseNotFound(a)));
        store.revoke(b).unwrap();
        assert!(store.get("/nodes/b").unwrap().is_none());
    }

    #[test]
    fn a_watcher_reads_changes_in_order_from_a_revision_until_they_are_compacted() {
        let mut store = MemoryStore::new(3);
        let start = store.range("/r/").unwrap().1;
        store.put("/r/1", b"a", None).unwrap();
        store.put("/other", b"b", None).unwrap();
        store.put("/r/2", b"c", None).unwrap();
        let seen = store.changes("/r/", start).unwrap();
        assert_eq!(seen.iter().map(Event::key).collect::<Vec<_>>(), ["/r/1", "/r/2"]);
        let last = seen[1].revision();
        assert!(store.changes("/r/", last).unwrap().is_empty());
        for i in 0..5 {
            store.put(&format!("/r/{i}"), b"", None).unwrap();
        }
        assert!(matches!(store.changes("/r/", start), Err(StoreError::Compacted { .. })));
    }

    #[test]
    fn an_unavailable_store_refuses_everything_and_keeps_its_state() {
        let mut store = MemoryStore::new(10);
        store.put("/k", b"v", None).unwrap();
        store.unavailable = true;
        assert!(matches!(store.put("/k", b"w", None), Err(StoreError::Unavailable(_))));
        assert!(matches!(store.grant_lease(10), Err(StoreError::Unavailable(_))));
        store.unavailable = false;
        assert_eq!(store.get("/k").unwrap().unwrap().value, b"v");
    }
}
