//! The bridge's view of the cluster from the control plane: nodes coming and going, their
//! routes and shared groups, and this node's route commits.

use std::net::SocketAddr;
use std::sync::Arc;

use super::*;

impl Bridge {
    // ---- the control plane ----

    fn node_id(&mut self, name: &str) -> NodeId {
        if let Some(id) = self.by_name.get(name) {
            return *id;
        }
        let id = self.nodes.len() as NodeId;
        self.nodes.push(Node { name: name.to_string(), addr: None, live: false, out: OutLink::default() });
        self.by_name.insert(name.to_string(), id);
        id
    }

    pub fn on_control(&mut self, event: ControlEvent) {
        match event {
            ControlEvent::Snapshot { nodes, routes } => {
                let live: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
                let gone: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.live && !live.contains(&n.name))
                    .map(|n| n.name.clone())
                    .collect();
                for node in gone {
                    self.node_down(&node);
                }
                for (node, addr) in nodes {
                    self.node_up(&node, addr);
                }
                for (node, filter) in self.remote_routes() {
                    let name = self.nodes[node as usize].name.clone();
                    if !routes.iter().any(|(n, f)| *n == name && *f == filter) {
                        self.remote_route(&name, filter, false);
                    }
                }
                for (node, filter) in routes {
                    self.remote_route(&node, filter, true);
                }
                // The first node of a cluster has nobody to get a retained set from.
                if !self.loaded && !self.nodes.iter().any(|n| n.live) {
                    self.sync_done = true;
                }
                self.loaded = true;
            }
            ControlEvent::NodeUp { node, addr } => self.node_up(&node, addr),
            ControlEvent::NodeDown { node } => self.node_down(&node),
            ControlEvent::Route { node, filter, add } => self.remote_route(&node, filter, add),
            ControlEvent::Fenced(fenced) => {
                if fenced {
                    for shard in 0..self.shards {
                        self.send(shard, CrossMsg::Fence);
                    }
                }
            }
            ControlEvent::Committed(filter) => self.route_committed(filter),
            ControlEvent::Secret(secret) => self.secret = Some(secret),
            ControlEvent::Claimed { id, outcome } => self.claimed(id, outcome),
            ControlEvent::Denied { id } => self.denied(id),
            ControlEvent::Owner { client_id, node, revision } => {
                self.owner_changed(client_id, &node, revision)
            }
            ControlEvent::Records { records, next } => self.records_found(records, next),
        }
    }

    fn node_up(&mut self, name: &str, addr: SocketAddr) {
        if name == self.node {
            return;
        }
        let id = self.node_id(name);
        let node = &mut self.nodes[id as usize];
        self.sys_dirty |= !node.live;
        node.live = true;
        node.addr = Some(addr);
    }

    /// A node's lease is gone: its routes go, and what waited for its confirmation is
    /// answered as if it had no subscriber (it serves nobody now; its persistent sessions
    /// are not replicated, see docs/CLUSTER.md).
    fn node_down(&mut self, name: &str) {
        let Some(&id) = self.by_name.get(name) else { return };
        let routes: Vec<TopicFilter> =
            self.remote_routes().into_iter().filter(|(n, _)| *n == id).map(|(_, f)| f).collect();
        for filter in routes {
            self.remote_route(name, filter, false);
        }
        self.forget_takeovers(id);
        self.syncing.remove(&id);
        self.sync_paused.retain(|(n, _, _)| *n != id);
        self.sys_dirty = true;
        let node = &mut self.nodes[id as usize];
        node.live = false;
        let frames = std::mem::take(&mut node.out.frames);
        node.out.bytes = 0;
        let waiting: Vec<Answers> =
            frames.into_values().map(|o| o.origin).filter(|a| !matches!(a, Answers::Nothing)).collect();
        if !waiting.is_empty() {
            tracing::warn!(
                node = name,
                messages = waiting.len(),
                "node gone before confirming: not waited for"
            );
        }
        for answers in waiting {
            self.frame_answered(answers, true);
        }
        // Its incoming link's state stays: a node that only lost its lease goes on with the
        // same numbering (a restarted one is recognised by its new incarnation).
    }

    pub(super) fn remote_route(&mut self, name: &str, filter: TopicFilter, add: bool) {
        if name == self.node {
            return;
        }
        let id = self.node_id(name);
        if let Some(key) = shared::parse(&filter).and_then(Result::ok) {
            return self.remote_group(id, Arc::new(key), add);
        }
        let changed = if add {
            self.remote.insert(&filter, id, ()).is_none()
        } else {
            self.remote.remove(&filter, &id).is_some()
        };
        if !changed {
            return;
        }
        let count = self.remote_count.entry(filter.clone()).or_insert(0);
        let announce = if add {
            *count += 1;
            *count == 1
        } else {
            *count -= 1;
            *count == 0
        };
        if *count == 0 {
            self.remote_count.remove(&filter);
        }
        if announce {
            for shard in 0..self.shards {
                let msg = CrossMsg::Interest { from: self.index, filter: filter.clone(), add, token: 0 };
                self.send(shard, msg);
            }
        }
    }

    /// Another node has (or no longer has) members of a shared group: the shards learn that
    /// this peer has members while any other node has.
    fn remote_group(&mut self, node: NodeId, key: Arc<GroupKey>, add: bool) {
        let (nodes, _) = self.remote_groups.entry(key.clone()).or_default();
        let before = !nodes.is_empty();
        if add && !nodes.contains(&node) {
            nodes.push(node);
        } else if !add {
            nodes.retain(|n| *n != node);
        }
        let after = !nodes.is_empty();
        if !after {
            self.remote_groups.remove(&key);
        }
        if before != after {
            let presence = if after { Presence::Online } else { Presence::None };
            for shard in 0..self.shards {
                let msg = CrossMsg::SharedInterest { from: self.index, key: key.clone(), presence, token: 0 };
                self.send(shard, msg);
            }
        }
    }

    /// Every route of another node this bridge holds, as (node, filter).
    fn remote_routes(&self) -> Vec<(NodeId, TopicFilter)> {
        let mut all: Vec<(NodeId, TopicFilter)> =
            self.remote.iter().map(|(f, n, _)| (*n, f.clone())).collect();
        for (key, (nodes, _)) in &self.remote_groups {
            all.extend(nodes.iter().map(|n| (*n, group_filter(key))));
        }
        all
    }

    /// `$SYS/cluster/...` on this node (retained, QoS 0): the node's name, how many nodes
    /// are live, and each other node's state as this node sees it (`up`: live and linked,
    /// `unlinked`: live in etcd but its link is down, `down`: its lease is gone).
    pub fn publish_cluster_sys(&mut self) {
        self.sys_dirty = false;
        let live = 1 + self.nodes.iter().filter(|n| n.live).count();
        let mut values = vec![("$SYS/cluster/node".to_string(), self.node.clone())];
        values.push(("$SYS/cluster/nodes".to_string(), live.to_string()));
        for n in &self.nodes {
            let state = match (n.live, n.out.connected) {
                (true, true) => "up",
                (true, false) => "unlinked",
                (false, _) => "down",
            };
            values.push((format!("$SYS/cluster/nodes/{}", n.name), state.to_string()));
        }
        for (topic, value) in values {
            let Ok(topic) = crate::topic::TopicName::new(topic) else { continue };
            let message = Message::new(topic, value.into(), QoS::AtMostOnce, true, &Default::default());
            let owner = placement::owner(message.topic.as_str(), self.shards);
            self.send(owner, CrossMsg::RetainSet(message.clone(), None));
            for shard in each_shard(self.local_shards(&message.topic)) {
                self.send(shard, CrossMsg::Publish(message.clone()));
            }
        }
    }

    /// Said once at start: every shard knows the other nodes' routes and that publishes
    /// forwarded here wait for confirmation, then that the bridge is ready.
    pub fn announce_ready(&mut self) {
        for shard in 0..self.shards {
            self.send(shard, CrossMsg::Durable { from: self.index, present: true, token: 0 });
            self.send(shard, CrossMsg::Ready);
        }
    }
}
