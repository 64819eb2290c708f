//! Routes between nodes, pure: which filters this node announces (`routes/<filter>/<node>`
//! keys, written when the node as a whole goes 0→1 subscribers for a filter and deleted on
//! 1→0, attached to the node's lease), and the node-level interest tree built from the
//! other nodes' keys: which nodes a publish must reach (once each). The same idea as the
//! per-core interest between shards, one level up.

use ahash::{AHashMap, AHashSet};

use super::store::{Event, KeyValue, LeaseId, Op};
use crate::topic::{SubscriptionTree, TopicFilter, TopicName};

/// The cluster's key layout under `/ringmq/<cluster>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys { root: format!("/ringmq/{}/", escape(cluster)) }
    }

    /// `/ringmq/<cluster>/`: everything the cluster keeps.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The node a membership key names.
    pub fn parse_node(&self, key: &str) -> Option<String> {
        unescape(key.strip_prefix(&self.root)?.strip_prefix("nodes/")?)
    }

    /// A node's membership key (its value: the node link's address).
    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{}", self.root, escape(node))
    }

    /// A client identifier's owner record (see `ownership`).
    pub fn session(&self, client_id: &str) -> String {
        format!("{}sessions/{}", self.root, escape(client_id))
    }

    /// `sessions/`: every owner record.
    pub fn sessions(&self) -> String {
        format!("{}sessions/", self.root)
    }

    /// The client a `sessions/` key names.
    pub fn parse_session(&self, key: &str) -> Option<String> {
        unescape(key.strip_prefix(&self.root)?.strip_prefix("sessions/")?)
    }

    /// The secret node links are authenticated with.
    pub fn secret(&self) -> String {
        format!("{}secret", self.root)
    }

    /// `nodes/`: every node's membership key.
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }

    pub fn routes(&self) -> String {
        format!("{}routes/", self.root)
    }

    /// `routes/<filter>/<node>`, each part escaped (a filter has `/` in it).
    pub fn route(&self, filter: &str, node: &str) -> String {
        format!("{}{}/{}", self.routes(), escape(filter), escape(node))
    }

    /// The filter and node of a route key.
    pub fn parse_route(&self, key: &str) -> Option<(String, String)> {
        let rest = key.strip_prefix(&self.routes())?;
        let (filter, node) = rest.split_once('/')?;
        Some((unescape(filter)?, unescape(node)?))
    }
}

/// Percent-escapes `%` and `/`, so a filter or name is one key segment.
fn escape(text: &str) -> String {
    text.replace('%', "%25").replace('/', "%2F")
}

fn unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3)? {
            "%25" => out.push('%'),
            "%2F" => out.push('/'),
            _ => return None,
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// The filters this node announces, with how many of its sessions (all cores) hold each.
#[derive(Debug)]
pub struct LocalRoutes {
    keys: Keys,
    node: String,
    lease: LeaseId,
    counts: AHashMap<String, usize>,
}

impl LocalRoutes {
    pub fn new(keys: Keys, node: &str, lease: LeaseId) -> LocalRoutes {
        LocalRoutes { keys, node: node.to_string(), lease, counts: AHashMap::new() }
    }

    /// A subscriber on `filter` appeared on this node: the key to write when it is the
    /// first (a SUBACK waits until it is committed).
    pub fn subscribed(&mut self, filter: &str) -> Option<Op> {
        let count = self.counts.entry(filter.to_string()).or_insert(0);
        *count += 1;
        (*count == 1).then(|| Op::Put {
            key: self.keys.route(filter, &self.node),
            value: Vec::new(),
            lease: Some(self.lease),
        })
    }

    /// A subscriber on `filter` left: the key to delete when it was the last.
    pub fn unsubscribed(&mut self, filter: &str) -> Option<Op> {
        let count = self.counts.get_mut(filter)?;
        *count -= 1;
        if *count > 0 {
            return None;
        }
        self.counts.remove(filter);
        Some(Op::Delete { key: self.keys.route(filter, &self.node) })
    }

    /// Every key this node should have, after a new lease (its old keys went with the old
    /// one).
    pub fn announce_all(&mut self, lease: LeaseId) -> Vec<Op> {
        self.lease = lease;
        let mut filters: Vec<&String> = self.counts.keys().collect();
        filters.sort();
        filters
            .into_iter()
            .map(|f| Op::Put { key: self.keys.route(f, &self.node), value: Vec::new(), lease: Some(lease) })
            .collect()
    }
}

/// The other nodes' routes, as a tree: which nodes have subscribers matching a topic.
#[derive(Debug)]
pub struct RemoteRoutes {
    keys: Keys,
    node: String,
    tree: SubscriptionTree<String, ()>,
}

impl RemoteRoutes {
    pub fn new(keys: Keys, node: &str) -> RemoteRoutes {
        RemoteRoutes { keys, node: node.to_string(), tree: SubscriptionTree::new() }
    }

    /// Starts from a range read of the routes prefix.
    pub fn load(&mut self, routes: &[KeyValue]) {
        self.tree = SubscriptionTree::new();
        for kv in routes {
            self.add(&kv.key);
        }
    }

    /// Applies a change of the routes prefix (from the watch).
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Put(kv) => self.add(&kv.key),
            Event::Delete(kv) => {
                if let Some((filter, node)) = self.parse(&kv.key) {
                    self.tree.remove(&filter, &node);
                }
            }
        }
    }

    fn parse(&self, key: &str) -> Option<(TopicFilter, String)> {
        let (filter, node) = self.keys.parse_route(key)?;
        // Its own routes are known locally; a key it cannot read is skipped (logged by
        // the caller), never trusted.
        let filter = TopicFilter::new(filter.into_bytes()).ok()?;
        (node != self.node).then_some((filter, node))
    }

    fn add(&mut self, key: &str) {
        if let Some((filter, node)) = self.parse(key) {
            self.tree.insert(&filter, node, ());
        }
    }

    /// The other nodes a publish on `topic` goes to, each once, in name order.
    pub fn nodes_for(&self, topic: &TopicName) -> Vec<String> {
        let mut nodes = AHashSet::new();
        self.tree.for_each_match(topic, |_, node, _| {
            nodes.insert(node.clone());
        });
        let mut nodes: Vec<String> = nodes.into_iter().collect();
        nodes.sort();
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::{ClusterStore, MemoryStore};
    use super::*;

    fn topic(name: &str) -> TopicName {
        TopicName::new(name.to_string()).unwrap()
    }

    #[test]
    fn keys_escape_filters_and_read_back() {
        let keys = Keys::new("prod");
        let key = keys.route("a/+/b%c/#", "node/1");
        assert_eq!(key, "/ringmq/prod/routes/a%2F+%2Fb%25c%2F#/node%2F1");
        assert_eq!(keys.parse_route(&key), Some(("a/+/b%c/#".to_string(), "node/1".to_string())));
        assert_eq!(keys.parse_route("/ringmq/prod/routes/a%2Xb/n"), None);
        assert_eq!(keys.parse_route("/ringmq/other/routes/a/n"), None);
        assert_eq!(keys.parse_node(&keys.node("n/1")), Some("n/1".to_string()));
        assert_eq!(keys.parse_node(&key), None);
        assert_eq!(keys.parse_session(&keys.session("a/b")), Some("a/b".to_string()));
        assert_eq!(keys.parse_session(&keys.node("n")), None);
    }

    #[test]
    fn a_node_writes_a_route_on_its_first_subscriber_and_deletes_it_on_its_last() {
        let mut local = LocalRoutes::new(Keys::new("c"), "a", 7);
        assert!(matches!(local.subscribed("x/+"), Some(Op::Put { lease: Some(7), .. })));
        assert_eq!(local.subscribed("x/+"), None, "the second subscriber writes nothing");
        assert_eq!(local.unsubscribed("x/+"), None);
        assert!(matches!(local.unsubscribed("x/+"), Some(Op::Delete { .. })));
        assert_eq!(local.unsubscribed("x/+"), None, "nothing left to delete");
        local.subscribed("b");
        local.subscribed("a");
        let again = local.announce_all(9);
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|op| matches!(op, Op::Put { lease: Some(9), .. })));
    }

    #[test]
    fn remote_routes_follow_the_store_through_a_lease_expiry() {
        let keys = Keys::new("c");
        let mut store = MemoryStore::new(1000);
        let lease_a = store.grant_lease(10_000).unwrap();
        let (lease_b, lease_c) = (store.grant_lease(1000).unwrap(), store.grant_lease(1000).unwrap());
        let mut b = LocalRoutes::new(keys.clone(), "b", lease_b);
        let mut c = LocalRoutes::new(keys.clone(), "c", lease_c);
        let mut a = LocalRoutes::new(keys.clone(), "a", lease_a);
        for op in [b.subscribed("s/+"), c.subscribed("s/#"), c.subscribed("other"), a.subscribed("s/1")]
            .into_iter()
            .flatten()
        {
            store.txn(&[], &[op], &[]).unwrap();
        }
        let mut remote = RemoteRoutes::new(keys.clone(), "a");
        let (routes, at) = store.range(&keys.routes()).unwrap();
        remote.load(&routes);
        assert_eq!(remote.nodes_for(&topic("s/1")), ["b", "c"], "a's own route is not remote");
        assert_eq!(remote.nodes_for(&topic("nothing")), Vec::<String>::new());

        store.advance(500);
        store.keep_alive(lease_c).unwrap();
        store.advance(1200);
        for event in store.changes(&keys.routes(), at).unwrap() {
            remote.apply(&event);
        }
        assert_eq!(remote.nodes_for(&topic("s/1")), ["c"], "b's lease expired with its routes");
        if let Some(op) = c.unsubscribed("s/#") {
            store.txn(&[], &[op], &[]).unwrap();
        }
        let (routes, _) = store.range(&keys.routes()).unwrap();
        remote.load(&routes);
        assert!(remote.nodes_for(&topic("s/1")).is_empty());
        assert_eq!(remote.nodes_for(&topic("other")), ["c"]);
    }
}
