//! Which node serves a client identifier: `sessions/<client id>` holds the owner node and
//! an epoch, and changes only through a transaction that compares the key's revision with
//! the one its writer read (the fencing token). Two nodes racing for one client: one
//! transaction wins, the other reads the winner and retries or refuses; a node whose
//! claim was overtaken can never write its stale one back.

use super::routes::Keys;
use super::store::{ClusterStore, Compare, Op, Revision, StoreError};

/// The owner record's value: `<node>\n<epoch>`, then `\n<username>` when the client
/// proved one and the nodes keep a session to its user (`--takeover same-user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    /// Incremented by every claim: a takeover's number, logged by both nodes.
    pub epoch: u64,
    /// The revision the record was written at: what the next claim compares against.
    pub revision: Revision,
    /// The username the client proved, whose session only it may take over.
    pub user: Option<String>,
}

impl Owner {
    fn encode(node: &str, epoch: u64, user: Option<&str>) -> Vec<u8> {
        match user {
            Some(user) => format!("{node}\n{epoch}\n{user}").into_bytes(),
            None => format!("{node}\n{epoch}").into_bytes(),
        }
    }

    fn decode(value: &[u8], revision: Revision) -> Option<Owner> {
        let text = std::str::from_utf8(value).ok()?;
        let (node, rest) = text.split_once('\n')?;
        let (epoch, user) = match rest.split_once('\n') {
            Some((epoch, user)) => (epoch, Some(user.to_string())),
            None => (rest, None),
        };
        Some(Owner { node: node.to_string(), epoch: epoch.parse().ok()?, revision, user })
    }

    /// Whether a client that proved `user` (or nothing) may take this one's session over.
    pub fn may_be_taken_by(&self, user: Option<&str>) -> bool {
        self.user.is_none() || self.user.as_deref() == user
    }
}

/// What a claim found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node owns the client now; `previous` served it before (another node then hands
    /// the session over before the CONNACK).
    Won { owner: Owner, previous: Option<Owner> },
    /// Another claim committed between the read and the write: read again.
    Lost,
}

/// The current owner of `client_id`, if any (an unreadable record counts as none: the
/// next claim overwrites it, fenced by its revision like any other).
pub fn owner_of(
    store: &mut dyn ClusterStore,
    keys: &Keys,
    client_id: &str,
) -> Result<Option<Owner>, StoreError> {
    Ok(store.get(&keys.session(client_id))?.and_then(|kv| Owner::decode(&kv.value, kv.mod_revision)))
}

/// Claims `client_id` for `node`, if the record is still what `seen` says (`None`: no
/// record). One transaction: compare the revision, write the new owner.
pub fn claim(
    store: &mut dyn ClusterStore,
    keys: &Keys,
    client_id: &str,
    node: &str,
    seen: Option<&Owner>,
) -> Result<Claim, StoreError> {
    claim_as(store, keys, client_id, (node, None), seen)
}

/// [`claim`] for a client that proved `user`, kept in the record.
pub fn claim_as(
    store: &mut dyn ClusterStore,
    keys: &Keys,
    client_id: &str,
    (node, user): (&str, Option<&str>),
    seen: Option<&Owner>,
) -> Result<Claim, StoreError> {
    let key = keys.session(client_id);
    let revision = seen.map_or(0, |o| o.revision);
    let epoch = seen.map_or(0, |o| o.epoch) + 1;
    let compare = [match seen {
        Some(_) => Compare::ModRevision(key.clone(), revision),
        None => Compare::CreateRevision(key.clone(), 0),
    }];
    let put = [Op::Put { key, value: Owner::encode(node, epoch, user), lease: None }];
    let result = store.txn(&compare, &put, &[])?;
    if !result.succeeded {
        return Ok(Claim::Lost);
    }
    let owner =
        Owner { node: node.to_string(), epoch, revision: result.revision, user: user.map(String::from) };
    Ok(Claim::Won { owner, previous: seen.cloned() })
}

/// Claims every client of `clients` for `node` in one transaction, if none of them has an
/// owner record (new clients: a connection storm costs one round trip per batch). Returns
/// the transaction's revision, or `None` when some record exists (nothing was written:
/// claim those one by one).
pub fn claim_all_new(
    store: &mut dyn ClusterStore,
    keys: &Keys,
    clients: &[(&str, Option<&str>)],
    node: &str,
) -> Result<Option<Revision>, StoreError> {
    let compare: Vec<Compare> =
        clients.iter().map(|(c, _)| Compare::CreateRevision(keys.session(c), 0)).collect();
    let put: Vec<Op> = clients
        .iter()
        .map(|(c, user)| Op::Put { key: keys.session(c), value: Owner::encode(node, 1, *user), lease: None })
        .collect();
    let result = store.txn(&compare, &put, &[])?;
    Ok(result.succeeded.then_some(result.revision))
}

/// Deletes the owner records of `clients`, each if it is still at the given revision (a
/// claim of this node that nobody overtook), in one transaction. False when one of them
/// changed: nothing was deleted (delete them one by one).
pub fn release_all(
    store: &mut dyn ClusterStore,
    keys: &Keys,
    clients: &[(&str, Revision)],
) -> Result<bool, StoreError> {
    let compare: Vec<Compare> =
        clients.iter().map(|(c, revision)| Compare::ModRevision(keys.session(c), *revision)).collect();
    let delete: Vec<Op> = clients.iter().map(|(c, _)| Op::Delete { key: keys.session(c) }).collect();
    Ok(store.txn(&compare, &delete, &[])?.succeeded)
}

/// A page of owner records: (client id, revision) each, and the key the next page starts
/// at, if any.
pub type RecordPage = (Vec<(String, Revision)>, Option<String>);

/// A page of the owner records that name `node`: of at most `limit` records read from key
/// `from` on (the whole prefix: `from` empty).
pub fn records_of(
    store: &mut dyn ClusterStore,
    keys: &Keys,
    node: &str,
    from: &str,
    limit: usize,
) -> Result<RecordPage, StoreError> {
    let (page, more) = store.range_page(&keys.sessions(), from, limit)?;
    // The key right after the last one read.
    let next = page.last().filter(|_| more).map(|kv| format!("{}\0", kv.key));
    let mine = page
        .into_iter()
        .filter_map(|kv| {
            let owner = Owner::decode(&kv.value, kv.mod_revision)?;
            let client_id = keys.parse_session(&kv.key)?;
            (owner.node == node).then_some((client_id, owner.revision))
        })
        .collect();
    Ok((mine, next))
}

#[cfg(test)]
mod tests {
    use super::super::store::MemoryStore;
    use super::*;

    #[test]
    fn the_records_of_a_node_are_read_in_pages() {
        let keys = Keys::new("c");
        let mut store = MemoryStore::new(100);
        for i in 0..7 {
            let node = if i % 2 == 0 { "A" } else { "B" };
            assert!(matches!(
                claim(&mut store, &keys, &format!("dev/{i}"), node, None).unwrap(),
                Claim::Won { .. }
            ));
        }
        store.put("/ringmq/c/secret", b"s", None).unwrap();
        store.put("/ringmq/c/nodes/A", b"127.0.0.1:1", None).unwrap();
        let (mut found, mut from, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let (records, next) = records_of(&mut store, &keys, "A", &from, 2).unwrap();
            pages += 1;
            found.extend(records.into_iter().map(|(client, revision)| {
                let owner = owner_of(&mut store, &keys, &client).unwrap().unwrap();
                assert_eq!(owner.revision, revision, "{client}: the record's revision");
                client
            }));
            match next {
                Some(next) => from = next,
                None => break,
            }
        }
        assert_eq!(found, ["dev/0", "dev/2", "dev/4", "dev/6"], "A's records, each once, no other key");
        assert_eq!(pages, 4, "7 records, 2 a page");
    }

    #[test]
    fn the_first_claim_wins_and_a_stale_one_is_fenced_off() {
        let keys = Keys::new("c");
        let mut store = MemoryStore::new(100);
        assert_eq!(keys.session("dev/1"), "/ringmq/c/sessions/dev%2F1");
        assert_eq!(owner_of(&mut store, &keys, "dev/1").unwrap(), None);
        // A and B both read "no owner"; A commits first.
        let Claim::Won { owner: a, previous } = claim(&mut store, &keys, "dev/1", "A", None).unwrap() else {
            panic!("A's claim")
        };
        assert_eq!((a.epoch, previous), (1, None));
        assert_eq!(claim(&mut store, &keys, "dev/1", "B", None).unwrap(), Claim::Lost);
        // B reads again and takes over: epoch 2, and it learns whom to ask for the session.
        let seen = owner_of(&mut store, &keys, "dev/1").unwrap().unwrap();
        assert_eq!(seen, a);
        let Claim::Won { owner: b, previous } = claim(&mut store, &keys, "dev/1", "B", Some(&seen)).unwrap()
        else {
            panic!("B's takeover")
        };
        assert_eq!((b.epoch, previous.map(|p| p.node)), (2, Some("A".to_string())));
        // A, still holding its old view, cannot write itself back.
        assert_eq!(claim(&mut store, &keys, "dev/1", "A", Some(&a)).unwrap(), Claim::Lost);
        assert_eq!(owner_of(&mut store, &keys, "dev/1").unwrap().unwrap().node, "B");
    }

    #[test]
    fn without_the_store_no_claim_is_made() {
        let keys = Keys::new("c");
        let mut store = MemoryStore::new(100);
        store.unavailable = true;
        assert!(matches!(claim(&mut store, &keys, "x", "A", None), Err(StoreError::Unavailable(_))));
    }

    #[test]
    fn new_clients_are_claimed_together_unless_one_has_a_record() {
        let keys = Keys::new("c");
        let mut store = MemoryStore::new(100);
        let at = claim_all_new(&mut store, &keys, &[("x", Some("alice")), ("y", None)], "a")
            .unwrap()
            .expect("both new");
        let x = owner_of(&mut store, &keys, "x").unwrap().unwrap();
        assert_eq!((x.node.as_str(), x.epoch, x.revision, x.user.as_deref()), ("a", 1, at, Some("alice")));
        assert!(
            x.may_be_taken_by(Some("alice")) && !x.may_be_taken_by(Some("bob")) && !x.may_be_taken_by(None)
        );
        let y = owner_of(&mut store, &keys, "y").unwrap().unwrap();
        assert!(y.user.is_none() && y.may_be_taken_by(Some("bob")));
        assert_eq!(
            claim_all_new(&mut store, &keys, &[("z", None), ("y", None)], "b").unwrap(),
            None,
            "y has a record"
        );
        assert_eq!(owner_of(&mut store, &keys, "z").unwrap(), None, "nothing written");
        assert_eq!(owner_of(&mut store, &keys, "y").unwrap().unwrap().node, "a");
    }

    #[test]
    fn a_record_is_released_only_while_it_is_still_the_claim_that_wrote_it() {
        let keys = Keys::new("c");
        let mut store = MemoryStore::new(100);
        let won = |store: &mut MemoryStore, client, node| match claim(store, &keys, client, node, None) {
            Ok(Claim::Won { owner, .. }) => owner,
            other => panic!("{other:?}"),
        };
        let x = won(&mut store, "x", "A");
        let y = won(&mut store, "y", "A");
        // B took y over since: A's release of both deletes neither.
        let Claim::Won { .. } = claim(&mut store, &keys, "y", "B", Some(&y)).unwrap() else { panic!() };
        assert!(!release_all(&mut store, &keys, &[("x", x.revision), ("y", y.revision)]).unwrap());
        assert!(owner_of(&mut store, &keys, "x").unwrap().is_some());
        // One by one: x goes, B's y stays.
        assert!(release_all(&mut store, &keys, &[("x", x.revision)]).unwrap());
        assert!(!release_all(&mut store, &keys, &[("y", y.revision)]).unwrap());
        assert_eq!(owner_of(&mut store, &keys, "x").unwrap(), None);
        assert_eq!(owner_of(&mut store, &keys, "y").unwrap().map(|o| o.node), Some("B".to_string()));
    }
}
