//! The control thread: this node's conversation with etcd, blocking, off every shard.
//!
//! It registers the node (`nodes/<name>` → link address, under a lease it keeps alive),
//! writes and deletes the node's routes as the bridge asks (in order; while etcd is
//! unreachable they wait, and so do the SUBACKs behind them), and fences the node when the
//! lease cannot be renewed: `Fenced(true)` goes out before the lease can have expired, so
//! the node closes its clients while no other node may yet take them. A watcher thread
//! follows the nodes and routes prefixes and hands every change to the bridge.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::bridge::{ControlEvent, ControlRequest};
use crate::cluster::etcd::{EtcdStore, EtcdWatch};
use crate::cluster::ownership::{claim_all_new, claim_as, owner_of, records_of, release_all, Claim};
use crate::cluster::routes::{Keys, LocalRoutes};
use crate::cluster::store::{ClusterStore, Compare, Event, LeaseId, Op, StoreError};
use crate::config::ClusterSettings;
use crate::topic::TopicFilter;

/// How long one etcd request may take before etcd counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Owner records read per request at start-up (each is a client's: there may be millions).
const SWEEP_PAGE: usize = 512;
/// Pause before retrying what etcd refused or did not answer.
const RETRY: Duration = Duration::from_millis(250);

/// What the control thread and its watcher send the bridge: events, and a byte on a socket
/// that wakes the bridge's executor.
#[derive(Clone)]
pub struct ToBridge {
    pub events: Sender<ControlEvent>,
    pub wake: Arc<UnixStream>,
}

impl ToBridge {
    pub fn send(&self, event: ControlEvent) {
        if self.events.send(event).is_ok() {
            // Non-blocking: a full socket already holds a wake-up.
            let _ = std::io::Write::write(&mut &*self.wake, &[1]);
        }
    }
}

/// Runs the control plane until `requests` is closed (the broker stops): then the lease
/// is revoked, so the node's routes go at once.
pub fn run(
    settings: ClusterSettings,
    requests: Receiver<ControlRequest>,
    bridge: ToBridge,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let keys = Keys::new(&settings.name);
    let mut store = EtcdStore::new(settings.etcd.clone(), REQUEST_TIMEOUT);
    let ttl = settings.lease_ttl;
    let stopped = || stop.load(std::sync::atomic::Ordering::Acquire);
    let mut control = Control {
        keys: keys.clone(),
        settings: settings.clone(),
        routes: LocalRoutes::new(keys.clone(), &settings.node, 0),
        lease: None,
        renewed: Instant::now(),
        fenced: false,
        pending: VecDeque::new(),
        bridge: bridge.clone(),
        watching: Arc::default(),
        has_secret: false,
        next_keep_alive: Instant::now() + ttl / 4,
    };
    while control.lease.is_none() && !stopped() {
        if let Err(err) = control.register(&mut store) {
            tracing::warn!(%err, "cluster: etcd not reachable yet, retrying");
            std::thread::sleep(RETRY * 4);
        }
    }
    // Control plane only: a lock taken twice per watch.
    let watching = control.watching.clone();
    let watcher = {
        let (settings, bridge, stop, watching) =
            (settings.clone(), bridge.clone(), stop.clone(), watching.clone());
        std::thread::Builder::new()
            .name("ringmq-watch".into())
            .spawn(move || watch(settings, bridge, stop, watching))
            .ok()
    };
    let keep_alive_every = ttl / 4;
    // Fenced before the lease can have run out, with time to close the clients.
    let fence_after = ttl.saturating_sub((ttl / 4).max(Duration::from_secs(1)));
    let mut last_register = Instant::now();
    loop {
        let wait = control.next_keep_alive.saturating_duration_since(Instant::now()).min(RETRY);
        match requests.recv_timeout(wait) {
            Ok(request) => control.take(request),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if stopped() {
            break;
        }
        while let Ok(request) = requests.try_recv() {
            control.take(request);
        }
        // The lease first: renewal and fencing never wait behind routes or claims (each
        // of those stops when a renewal falls due).
        if control.lease.is_none() && last_register.elapsed() >= RETRY * 4 {
            last_register = Instant::now();
            if let Err(err) = control.register(&mut store) {
                tracing::warn!(%err, "cluster: cannot register again yet");
            }
        }
        if Instant::now() >= control.next_keep_alive {
            control.next_keep_alive = Instant::now() + keep_alive_every;
            control.keep_alive(&mut store);
        }
        control.fence_if_late(fence_after);
        control.apply_pending(&mut store);
        control.fence_if_late(fence_after);
    }
    if let Some(lease) = control.lease {
        let _ = store.revoke(lease);
    }
    if let Some(stream) = watching.lock().ok().and_then(|mut s| s.take()) {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    if let Some(watcher) = watcher {
        let _ = watcher.join();
    }
}

struct Control {
    keys: Keys,
    settings: ClusterSettings,
    routes: LocalRoutes,
    lease: Option<LeaseId>,
    /// When the last successful renewal was asked for: the lease lasts at least its TTL
    /// from then.
    renewed: Instant,
    fenced: bool,
    pending: VecDeque<ControlRequest>,
    bridge: ToBridge,
    /// The watch's socket, for ending its blocked read (at stop, and to start it over).
    watching: Arc<Mutex<Option<TcpStream>>>,
    /// The link secret was read (once: it never changes).
    has_secret: bool,
    /// When the lease is renewed next: work on routes and claims yields to it.
    next_keep_alive: Instant,
}

impl Control {
    /// Queues a request; a cancellation removes the claim it names if still queued (and
    /// answers it: every claim is answered once, made or not).
    fn take(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::Cancel { id } => {
                let queued = self.pending.len();
                self.pending
                    .retain(|r| !matches!(r, ControlRequest::Claim { id: claim, .. } if *claim == id));
                if self.pending.len() < queued {
                    self.bridge.send(ControlEvent::Claimed { id, outcome: Err("withdrawn".into()) });
                }
            }
            request => self.pending.push_back(request),
        }
    }

    /// No renewal for `fence_after`: the lease may run out soon, and another node then take
    /// this node's clients without asking it. Every client is closed now.
    fn fence_if_late(&mut self, fence_after: Duration) {
        if self.fenced || self.renewed.elapsed() < fence_after {
            return;
        }
        tracing::error!(
            ttl_s = self.settings.lease_ttl.as_secs(),
            "cluster: the lease could not be renewed: closing every client and refusing new ones until it is"
        );
        self.fenced = true;
        self.bridge.send(ControlEvent::Fenced(true));
    }

    /// The lease holds again: clients are served again, and the watch starts over from a
    /// fresh read (its connection may have died silently while etcd was out of reach).
    fn unfence(&mut self) {
        if !self.fenced {
            return;
        }
        self.fenced = false;
        tracing::info!("cluster: lease renewed: accepting clients again");
        self.bridge.send(ControlEvent::Fenced(false));
        if let Some(stream) = self.watching.lock().ok().and_then(|mut s| s.take()) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The cluster's link secret: created by the first node (a transaction that writes it
    /// only if it is missing), read by every other one.
    fn secret(&mut self, store: &mut dyn ClusterStore) -> Result<Vec<u8>, StoreError> {
        let key = self.keys.secret();
        if let Some(kv) = store.get(&key)? {
            return Ok(kv.value);
        }
        let fresh: [u8; 32] =
            super::handshake::random().ok_or_else(|| StoreError::Unavailable("no randomness".into()))?;
        let fresh = fresh.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes();
        let put = Op::Put { key: key.clone(), value: fresh, lease: None };
        store.txn(&[Compare::CreateRevision(key.clone(), 0)], &[put], &[])?;
        store
            .get(&key)?
            .map(|kv| kv.value)
            .ok_or_else(|| StoreError::Unavailable("the secret vanished".into()))
    }

    /// A new lease, the node's key and every route the node holds, under it.
    fn register(&mut self, store: &mut dyn ClusterStore) -> Result<(), StoreError> {
        if self.lease.is_none() && !self.has_secret {
            let secret = self.secret(store)?;
            self.bridge.send(ControlEvent::Secret(secret));
            self.has_secret = true;
        }
        let asked = Instant::now();
        let lease = store.grant_lease(self.settings.lease_ttl.as_millis() as u64)?;
        let routes = self.routes.announce_all(lease);
        // etcd takes 128 operations per transaction by default: the routes first, in
        // batches, then the node's key (the others see it once its routes are there).
        for batch in routes.chunks(TXN_OPS) {
            store.txn(&[], batch, &[])?;
        }
        let node = Op::Put {
            key: self.keys.node(&self.settings.node),
            value: self.settings.advertise.to_string().into_bytes(),
            lease: Some(lease),
        };
        store.txn(&[], &[node], &[])?;
        tracing::info!(node = %self.settings.node, lease, routes = routes.len(), "cluster: node registered in etcd");
        self.lease = Some(lease);
        self.renewed = asked;
        self.unfence();
        Ok(())
    }

    fn keep_alive(&mut self, store: &mut dyn ClusterStore) {
        let Some(lease) = self.lease else { return };
        let asked = Instant::now();
        match store.keep_alive(lease) {
            Ok(()) => {
                self.renewed = asked;
                self.unfence();
            }
            Err(StoreError::LeaseNotFound(_)) => {
                tracing::warn!(lease, "cluster: the lease expired: registering again");
                self.lease = None;
                if !self.fenced {
                    self.fenced = true;
                    self.bridge.send(ControlEvent::Fenced(true));
                }
                if let Err(err) = self.register(store) {
                    tracing::warn!(%err, "cluster: cannot register again yet");
                }
            }
            Err(err) => tracing::warn!(%err, "cluster: lease renewal failed"),
        }
    }

    /// Writes the routes and claims asked for, in order; stops at the first failure
    /// (retried later: while etcd is unreachable, SUBACKs and CONNECTs wait).
    fn apply_pending(&mut self, store: &mut dyn ClusterStore) {
        while let Some(request) = self.pending.front().cloned() {
            let Some(lease) = self.lease else { return };
            if Instant::now() >= self.next_keep_alive {
                return;
            }
            if matches!(request, ControlRequest::Claim { .. }) && self.claim_fresh_batch(store) {
                continue;
            }
            if let ControlRequest::Unclaim { .. } = request {
                if let Err(err) = self.release_batch(store) {
                    tracing::warn!(%err, "cluster: deleting owner records waits for etcd");
                    return;
                }
                continue;
            }
            if let ControlRequest::Sweep { from } = &request {
                let found = records_of(store, &self.keys, &self.settings.node, from, SWEEP_PAGE);
                match found {
                    Ok((records, next)) => self.bridge.send(ControlEvent::Records { records, next }),
                    Err(err) => {
                        tracing::warn!(%err, "cluster: reading the owner records waits for etcd");
                        return;
                    }
                }
                self.pending.pop_front();
                continue;
            }
            if let ControlRequest::Claim { client_id, id, user } = &request {
                match self.claim(store, client_id, user.as_deref()) {
                    Ok(None) => self.bridge.send(ControlEvent::Denied { id: *id }),
                    Ok(Some(outcome)) => self.bridge.send(ControlEvent::Claimed { id: *id, outcome }),
                    Err(err) => {
                        tracing::warn!(%err, client_id, "cluster: a claim waits for etcd");
                        return;
                    }
                }
                self.pending.pop_front();
                continue;
            }
            let (op, committed) = match &request {
                ControlRequest::AddRoute(filter) => {
                    (self.routes.subscribed(filter.as_str()), Some(filter.clone()))
                }
                ControlRequest::RemoveRoute(filter) => (self.routes.unsubscribed(filter.as_str()), None),
                ControlRequest::Claim { .. }
                | ControlRequest::Cancel { .. }
                | ControlRequest::Unclaim { .. }
                | ControlRequest::Sweep { .. } => (None, None),
            };
            let op = op.map(|op| match op {
                Op::Put { key, value, .. } => Op::Put { key, value, lease: Some(lease) },
                other => other,
            });
            if let Some(op) = op {
                if let Err(err) = store.txn(&[], std::slice::from_ref(&op), &[]) {
                    // Undo the count: the same request is applied again later.
                    match &request {
                        ControlRequest::AddRoute(filter) => {
                            self.routes.unsubscribed(filter.as_str());
                        }
                        ControlRequest::RemoveRoute(filter) => {
                            self.routes.subscribed(filter.as_str());
                        }
                        ControlRequest::Claim { .. }
                        | ControlRequest::Cancel { .. }
                        | ControlRequest::Unclaim { .. }
                        | ControlRequest::Sweep { .. } => {}
                    }
                    tracing::warn!(%err, "cluster: a route waits for etcd");
                    if matches!(err, StoreError::LeaseNotFound(_)) {
                        self.lease = None;
                        let _ = self.register(store);
                    }
                    return;
                }
            }
            self.pending.pop_front();
            if let Some(filter) = committed {
                self.bridge.send(ControlEvent::Committed(filter));
            }
        }
    }
}

/// Operations per transaction at most (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 100;
/// Claims taken in one transaction at most.
const CLAIM_BATCH: usize = 64;

impl Control {
    /// Claims the clients of the consecutive claims at the front of the queue in one
    /// transaction, if none of them has an owner record yet (a connection storm of new
    /// clients costs one round trip per batch, not two per client). False when they do not
    /// all qualify (the claims are then made one by one) or etcd did not answer.
    fn claim_fresh_batch(&mut self, store: &mut dyn ClusterStore) -> bool {
        let mut batch: Vec<(&str, u64, Option<&str>)> = Vec::new();
        for request in self.pending.iter().take(CLAIM_BATCH) {
            match request {
                ControlRequest::Claim { client_id, id, user }
                    if !batch.iter().any(|(c, ..)| c == client_id) =>
                {
                    batch.push((client_id, *id, user.as_deref()))
                }
                _ => break,
            }
        }
        if batch.len() < 2 {
            return false;
        }
        let clients: Vec<(&str, Option<&str>)> =
            batch.iter().map(|(c, _, user)| (*c, user.filter(|u| !u.is_empty()))).collect();
        let ids: Vec<u64> = batch.iter().map(|(_, id, _)| *id).collect();
        match claim_all_new(store, &self.keys, &clients, &self.settings.node) {
            Ok(Some(revision)) => {
                for id in &ids {
                    self.pending.pop_front();
                    self.bridge.send(ControlEvent::Claimed { id: *id, outcome: Ok((None, revision)) });
                }
                true
            }
            _ => false,
        }
    }

    /// Deletes the owner records of the consecutive `Unclaim`s at the front of the queue,
    /// each if it is still this node's claim: in one transaction, or one by one when some
    /// record changed (another node claimed the client since: its record stays).
    fn release_batch(&mut self, store: &mut dyn ClusterStore) -> Result<(), StoreError> {
        let batch: Vec<(String, u64)> = self
            .pending
            .iter()
            .take(TXN_OPS / 2)
            .map_while(|r| match r {
                ControlRequest::Unclaim { client_id, revision } => Some((client_id.clone(), *revision)),
                _ => None,
            })
            .collect();
        let clients: Vec<(&str, u64)> = batch.iter().map(|(c, r)| (c.as_str(), *r)).collect();
        if !release_all(store, &self.keys, &clients)? {
            for client in &clients {
                release_all(store, &self.keys, std::slice::from_ref(client))?;
            }
        }
        self.pending.drain(..batch.len());
        Ok(())
    }

    /// Claims `client_id` for this node: read the owner record, write this node over it
    /// if it is unchanged (its revision is the fencing token); a racing claim makes it read
    /// again. Returns the previous owner node. Lost to racing claims five times: refused.
    /// `user` (under `--takeover same-user`): the name the client proved, empty when it
    /// proved none. `None`: the record keeps the session to another user.
    #[allow(clippy::type_complexity)]
    fn claim(
        &mut self,
        store: &mut dyn ClusterStore,
        client_id: &str,
        user: Option<&str>,
    ) -> Result<Option<Result<(Option<String>, u64), String>>, StoreError> {
        let proved = user.filter(|u| !u.is_empty());
        for _ in 0..5 {
            let seen = owner_of(store, &self.keys, client_id)?;
            if seen.as_ref().is_some_and(|owner| user.is_some() && !owner.may_be_taken_by(proved)) {
                return Ok(None);
            }
            match claim_as(store, &self.keys, client_id, (&self.settings.node, proved), seen.as_ref())? {
                Claim::Won { owner, previous } => {
                    tracing::debug!(client_id, epoch = owner.epoch, "cluster: client claimed");
                    return Ok(Some(Ok((previous.map(|p| p.node), owner.revision))));
                }
                Claim::Lost => continue,
            }
        }
        Ok(Some(Err("lost to racing claims five times".to_string())))
    }
}

/// Follows `nodes/` and `routes/`: a snapshot first (and again whenever the watch lost its
/// place), then every change.
fn watch(
    settings: ClusterSettings,
    bridge: ToBridge,
    stop: Arc<std::sync::atomic::AtomicBool>,
    watching: Arc<Mutex<Option<TcpStream>>>,
) {
    let keys = Keys::new(&settings.name);
    let mut store = EtcdStore::new(settings.etcd.clone(), REQUEST_TIMEOUT);
    let root = keys.root().to_string();
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let revision = match snapshot(&mut store, &keys) {
            Ok((event, revision)) => {
                bridge.send(event);
                revision
            }
            Err(err) => {
                tracing::warn!(%err, "cluster: cannot read the cluster's state from etcd");
                std::thread::sleep(RETRY * 4);
                continue;
            }
        };
        let mut watch = match EtcdWatch::open(&settings.etcd, &root, revision, REQUEST_TIMEOUT) {
            Ok(watch) => {
                if let Ok(mut slot) = watching.lock() {
                    *slot = watch.closer();
                }
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                watch
            }
            Err(err) => {
                tracing::warn!(%err, "cluster: cannot watch etcd");
                std::thread::sleep(RETRY * 4);
                continue;
            }
        };
        loop {
            match watch.next_changes() {
                Ok(events) => {
                    for event in events {
                        if let Some(event) = control_event(&keys, &event) {
                            bridge.send(event);
                        }
                    }
                }
                Err(_) if stop.load(std::sync::atomic::Ordering::Acquire) => return,
                Err(err) => {
                    tracing::warn!(%err, "cluster: the etcd watch ended: reading the state again");
                    break;
                }
            }
        }
    }
}

/// Every node and route now, as one event, and the revision to watch from (the owner
/// records are not read: one per client, and only their changes matter here). Changes
/// between the two reads are seen again by the watch, which applies them idempotently.
fn snapshot(store: &mut dyn ClusterStore, keys: &Keys) -> Result<(ControlEvent, u64), StoreError> {
    let (mut kvs, revision) = store.range(&keys.nodes())?;
    kvs.extend(store.range(&keys.routes())?.0);
    let mut nodes = Vec::new();
    let mut routes = Vec::new();
    for kv in &kvs {
        match control_event(keys, &Event::Put(kv.clone())) {
            Some(ControlEvent::NodeUp { node, addr }) => nodes.push((node, addr)),
            Some(ControlEvent::Route { node, filter, .. }) => routes.push((node, filter)),
            _ => {}
        }
    }
    Ok((ControlEvent::Snapshot { nodes, routes }, revision))
}

/// What a change of a key under the root means to the bridge (`None`: nothing, or a key
/// it cannot read, which is logged and skipped).
fn control_event(keys: &Keys, event: &Event) -> Option<ControlEvent> {
    let key = event.key();
    if let Some((filter, node)) = keys.parse_route(key) {
        let Ok(filter) = TopicFilter::new(filter.into_bytes()) else {
            tracing::warn!(key, "cluster: a route key with an invalid filter, skipped");
            return None;
        };
        return Some(ControlEvent::Route { node, filter, add: matches!(event, Event::Put(_)) });
    }
    if let Some(client_id) = keys.parse_session(key) {
        let Event::Put(kv) = event else { return None };
        let node = std::str::from_utf8(&kv.value).ok()?.split('\n').next()?.to_string();
        return Some(ControlEvent::Owner { client_id, node, revision: kv.mod_revision });
    }
    let node = keys.parse_node(key)?;
    match event {
        Event::Put(kv) => {
            let addr = std::str::from_utf8(&kv.value).ok().and_then(|a| a.parse().ok());
            match addr {
                Some(addr) => Some(ControlEvent::NodeUp { node, addr }),
                None => {
                    tracing::warn!(key, "cluster: a node key without an address, skipped");
                    None
                }
            }
        }
        Event::Delete(_) => Some(ControlEvent::NodeDown { node }),
    }
}
