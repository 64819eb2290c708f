//! Client ownership across nodes, as the bridge carries it: a shard's CONNECT claims its
//! client through the control thread; when the claim names a previous node that is live,
//! that node is asked over the link to close the client's connection and hand its session
//! over (`TakeOver` → `Handover`); once the session is in place here (`Adopted`), the old
//! node sends what the session received meanwhile (`Handover` with `last`) and ends it.

use std::sync::Arc;

use super::*;
use crate::broker::cross::HandedSession;
use crate::broker::session::OwedMessage;

/// A CONNECT's claim, waiting for etcd and then for the previous node.
pub(super) struct PendingClaim {
    shard: usize,
    token: u64,
    client_id: Arc<str>,
    want_session: bool,
    user: Option<Arc<str>>,
}

/// The bridge's takeovers in both directions.
#[derive(Default)]
pub(super) struct Takeovers {
    /// This node's claims by id.
    claims: AHashMap<u64, PendingClaim>,
    /// Clients with a claim in progress, and the claims waiting behind it.
    busy: AHashMap<Arc<str>, VecDeque<PendingClaim>>,
    /// Claims asked of a previous node: id → the node and the claim.
    asked: AHashMap<u64, (NodeId, PendingClaim)>,
    /// Sessions put in place from a node's hand-over: the shard's token → (node, id).
    adopting: AHashMap<u64, (NodeId, u64)>,
    /// Hand-overs whose remainder is still to come: (node, id) → the claim.
    awaiting_last: AHashMap<(NodeId, u64), PendingClaim>,
    /// Other nodes' takeovers of clients here: the local token → (node, id, client).
    theirs: AHashMap<u64, (NodeId, u64, Arc<str>)>,
    /// Takeovers whose session may leave once these nodes answered their `Flush`: the
    /// local token → the nodes.
    flushing: AHashMap<u64, Vec<NodeId>>,
    /// Clients this node claimed and still serves: client → the claim's revision (an older
    /// record the watch shows later must not close the client; the record is deleted,
    /// compared on it, once the client's session ended here).
    owned: AHashMap<Arc<str>, u64>,
}

impl Bridge {
    /// A shard wants to serve `client_id`: etcd first.
    /// One claim per client at a time: a second CONNECT for it waits until the first one's
    /// claim is answered (else it would find this node owner already while the previous
    /// node still serves the client).
    pub(super) fn claim(
        &mut self,
        shard: usize,
        token: u64,
        client_id: Arc<str>,
        want_session: bool,
        user: Option<Arc<str>>,
    ) {
        let claim = PendingClaim { shard, token, client_id: client_id.clone(), want_session, user };
        match self.takeovers.busy.get_mut(&client_id) {
            Some(waiting) => waiting.push_back(claim),
            None => {
                self.takeovers.busy.insert(client_id, VecDeque::new());
                self.start_claim(claim);
            }
        }
    }

    fn start_claim(&mut self, claim: PendingClaim) {
        let id = self.token();
        let user = claim.user.as_deref().map(String::from);
        self.control.push(ControlRequest::Claim { client_id: claim.client_id.to_string(), id, user });
        self.takeovers.claims.insert(id, claim);
    }

    /// A shard's CONNECT gave up on its claim: dropped while it waits behind another claim
    /// of the client; withdrawn from etcd's queue while it waits for etcd (which answers
    /// either way: once etcd made it, it stands, and goes on as any claim, the shard keeping
    /// a session it brings offline and letting the record go when nothing serves it).
    pub(super) fn cancel_claim(&mut self, shard: usize, token: u64) {
        for waiting in self.takeovers.busy.values_mut() {
            waiting.retain(|c| !(c.shard == shard && c.token == token));
        }
        let found = self
            .takeovers
            .claims
            .iter()
            .find(|(_, c)| c.shard == shard && c.token == token)
            .map(|(id, _)| *id);
        if let Some(id) = found {
            self.control.push(ControlRequest::Cancel { id });
        }
    }

    /// etcd's answer to claim `id`: refused, won from nobody (or from this node, or from a
    /// node whose lease is gone: it closed its clients before), or won from a live node,
    /// which is asked for the session.
    pub(super) fn claimed(&mut self, id: u64, outcome: Result<(Option<String>, u64), String>) {
        let Some(claim) = self.takeovers.claims.remove(&id) else { return };
        let previous = match outcome {
            Err(err) => {
                tracing::warn!(client_id = %claim.client_id, %err, "cluster: claim failed");
                return self.answer(&claim, (false, false), None);
            }
            Ok((previous, revision)) => {
                self.takeovers.owned.insert(claim.client_id.clone(), revision);
                previous.filter(|node| *node != self.node)
            }
        };
        let node = previous
            .and_then(|name| self.by_name.get(&name).copied())
            .filter(|n| self.nodes[*n as usize].live);
        let Some(node) = node else {
            return self.answer(&claim, (true, false), None);
        };
        let out = &mut self.nodes[node as usize].out;
        out.next_seq += 1;
        let seq = out.next_seq;
        let frame = Frame::TakeOver {
            seq,
            id,
            client_id: claim.client_id.to_string(),
            want_session: claim.want_session,
        };
        out.frames.insert(seq, Outgoing { frame, origin: Answers::Nothing });
        self.takeovers.asked.insert(id, (node, claim));
    }

    /// etcd's record of claim `id`'s client names another user: the CONNECT is refused.
    pub(super) fn denied(&mut self, id: u64) {
        if let Some(claim) = self.takeovers.claims.remove(&id) {
            self.answer(&claim, (false, true), None);
        }
    }

    /// Tells the claiming shard how its claim ended; the client's next claim may start
    /// (with a session handed over: once all of it came, see `leftovers`).
    fn answer(
        &mut self,
        claim: &PendingClaim,
        (ok, denied): (bool, bool),
        session: Option<Box<HandedSession>>,
    ) {
        let (token, client_id) = (claim.token, claim.client_id.clone());
        let handed = session.is_some();
        self.send(claim.shard, CrossMsg::Claimed { token, client_id, ok, denied, session });
        if !handed {
            self.finish(claim);
        }
    }

    /// `claim` is over: the client's next claim may start.
    fn finish(&mut self, claim: &PendingClaim) {
        let next = self.takeovers.busy.get_mut(&claim.client_id).and_then(VecDeque::pop_front);
        match next {
            Some(next) => self.start_claim(next),
            None => {
                self.takeovers.busy.remove(&claim.client_id);
            }
        }
    }

    /// The session of a claim, handed over by `node` (or, `last`, what it received since).
    pub(super) fn handed_over(
        &mut self,
        node: NodeId,
        id: u64,
        last: bool,
        session: Option<Box<HandedSession>>,
    ) {
        if last {
            let (messages, more) = session.map(|s| (s.messages, s.more)).unwrap_or_default();
            if more {
                // A part of the remainder: the shard asks for the next one.
                let Some(claim) = self.takeovers.awaiting_last.get(&(node, id)) else { return };
                let (shard, token, client_id) = (claim.shard, claim.token, claim.client_id.clone());
                return self.send(shard, CrossMsg::Leftovers { client_id, token, messages, more });
            }
            let Some(claim) = self.takeovers.awaiting_last.remove(&(node, id)) else { return };
            return self.leftovers(claim, messages);
        }
        let Some((_, claim)) = self.takeovers.asked.remove(&id) else {
            // A further part of a session handed over before.
            let Some(claim) = self.takeovers.awaiting_last.get(&(node, id)) else { return };
            let (shard, token, client_id) = (claim.shard, claim.token, claim.client_id.clone());
            let (messages, more) = session.map(|s| (s.messages, s.more)).unwrap_or_default();
            return self.send(shard, CrossMsg::Part { client_id, token, messages, more });
        };
        let handed = session.is_some();
        if handed {
            self.takeovers.adopting.insert(claim.token, (node, id));
        }
        self.answer(&claim, (true, false), session);
        // Only a session handed over has a remainder to come.
        if handed {
            self.takeovers.awaiting_last.insert((node, id), claim);
        }
    }

    /// What a session's old node received after its hand-over, to the claiming shard (whose
    /// CONNECT waits for it).
    fn leftovers(&mut self, claim: PendingClaim, messages: Vec<OwedMessage>) {
        let (client_id, token) = (claim.client_id.clone(), claim.token);
        self.send(claim.shard, CrossMsg::Leftovers { client_id, token, messages, more: false });
        // All of the session is here now: the client's next claim may start.
        self.finish(&claim);
    }

    /// The shard put a handed-over session in place: its old node may let it go.
    pub(super) fn adopted(&mut self, token: u64) {
        let Some((node, id)) = self.takeovers.adopting.remove(&token) else { return };
        let out = &mut self.nodes[node as usize].out;
        out.next_seq += 1;
        let seq = out.next_seq;
        out.frames.insert(seq, Outgoing { frame: Frame::Adopted { seq, id }, origin: Answers::Nothing });
    }

    /// The shard has the session handed over for its claim `token` so far (or, once it is
    /// in place, the remainder so far): the next part.
    pub(super) fn ask_part(&mut self, token: u64) {
        let remainder =
            || self.takeovers.awaiting_last.iter().find(|(_, c)| c.token == token).map(|(k, _)| *k);
        let Some((node, id)) = self.takeovers.adopting.get(&token).copied().or_else(remainder) else {
            return;
        };
        let out = &mut self.nodes[node as usize].out;
        out.next_seq += 1;
        let seq = out.next_seq;
        out.frames.insert(seq, Outgoing { frame: Frame::NextPart { seq, id }, origin: Answers::Nothing });
    }

    /// `node`, taking a client over, asks for the next part of its session.
    pub(super) fn their_next_part(&mut self, node: NodeId, id: u64) {
        let Some(token) = self.their_token(node, id) else { return };
        let Some((_, _, client_id)) = self.takeovers.theirs.get(&token) else { return };
        let shard = placement::owner(client_id, self.shards);
        let client_id = client_id.clone();
        self.send(shard, CrossMsg::NextPart { client_id, token });
    }

    fn their_token(&self, node: NodeId, id: u64) -> Option<u64> {
        self.takeovers.theirs.iter().find(|(_, (n, i, _))| *n == node && *i == id).map(|(t, _)| *t)
    }

    /// `node` claimed a client this node had: its owner shard closes it and hands it over.
    pub(super) fn their_take_over(&mut self, node: NodeId, id: u64, client_id: String, want_session: bool) {
        let token = self.token();
        let client_id: Arc<str> = client_id.into();
        let shard = placement::owner(&client_id, self.shards);
        self.takeovers.theirs.insert(token, (node, id, client_id.clone()));
        self.send(shard, CrossMsg::TakeOver { client_id, token, want_session });
    }

    /// `node` has the session of takeover `id` in place.
    /// Before the session's copy here ends, a barrier: a message some node (or another
    /// core here) sent towards it before it knew `node`'s routes must have arrived. Each
    /// other live node answers a `Flush` on its own link here, after its earlier frames;
    /// each other core passes a marker to the session's core after its earlier messages.
    pub(super) fn their_adopted(&mut self, node: NodeId, id: u64) {
        let Some(token) = self.their_token(node, id) else { return };
        let Some((_, _, client_id)) = self.takeovers.theirs.get(&token) else { return };
        let shard = placement::owner(client_id, self.shards);
        for other in (0..self.shards).filter(|s| *s != shard) {
            self.send(other, CrossMsg::SendMarker { to: shard, token });
        }
        let others: Vec<NodeId> =
            (0..self.nodes.len() as NodeId).filter(|n| *n != node && self.nodes[*n as usize].live).collect();
        for other in &others {
            let out = &mut self.nodes[*other as usize].out;
            out.next_seq += 1;
            let seq = out.next_seq;
            out.frames
                .insert(seq, Outgoing { frame: Frame::Flush { seq, id: token }, origin: Answers::Nothing });
        }
        self.takeovers.flushing.insert(token, others);
        self.flushed_by(None, token);
    }

    /// `node` answered `Flush` `token`; or (`None`) nothing more came. With every node's
    /// answer in, the session's core may let it go (once its markers are in too).
    fn flushed_by(&mut self, node: Option<NodeId>, token: u64) {
        let Some(waiting) = self.takeovers.flushing.get_mut(&token) else { return };
        waiting.retain(|n| Some(*n) != node);
        if !waiting.is_empty() {
            return;
        }
        self.takeovers.flushing.remove(&token);
        let Some((_, _, client_id)) = self.takeovers.theirs.get(&token) else { return };
        let shard = placement::owner(client_id, self.shards);
        let client_id = client_id.clone();
        self.send(shard, CrossMsg::Release { client_id, token });
    }

    /// `node` answered our `Flush` `id`.
    pub(super) fn flushed(&mut self, node: NodeId, id: u64) {
        self.flushed_by(Some(node), id);
    }

    /// `node` asks for a barrier: answered on this node's link to it, after every frame
    /// written there before.
    pub(super) fn answer_flush(&mut self, node: NodeId, id: u64) {
        let out = &mut self.nodes[node as usize].out;
        out.next_seq += 1;
        let seq = out.next_seq;
        out.frames.insert(seq, Outgoing { frame: Frame::Flushed { seq, id }, origin: Answers::Nothing });
    }

    /// A shard's answer to `TakeOver` or `Release`: to the node that asked.
    pub(super) fn shard_handed_over(&mut self, token: u64, session: Option<Box<HandedSession>>, last: bool) {
        let Some(&(node, id, _)) = self.takeovers.theirs.get(&token) else { return };
        // Each part fits the node's bound on a hand-over by construction (`Session::owed`
        // keeps its messages to `--node-handover-part`, and the bound has room for that, one
        // message and the session's other fields: see `FrameLimits::for_node`); nothing is
        // cut here.
        // The remainder may come in parts too: the takeover is over with its last.
        let more = session.as_ref().is_some_and(|s| s.more);
        if session.is_none() || (last && !more) {
            self.takeovers.theirs.remove(&token);
        }
        let out = &mut self.nodes[node as usize].out;
        out.next_seq += 1;
        let seq = out.next_seq;
        out.frames.insert(
            seq,
            Outgoing { frame: Frame::Handover { seq, id, last, session }, origin: Answers::Nothing },
        );
    }

    /// The watch shows `client_id` claimed by `node`: when that is another node, and the
    /// claim is newer than this node's own, its connection here (if any) is closed. The
    /// claiming node asks for the session over the link; this covers a link that is down.
    pub(super) fn owner_changed(&mut self, client_id: String, node: &str, revision: u64) {
        let client_id: Arc<str> = client_id.into();
        let ours = self.takeovers.owned.get(&client_id).copied();
        if node == self.node || ours.is_some_and(|r| r > revision) {
            return;
        }
        self.takeovers.owned.remove(&client_id);
        let shard = placement::owner(&client_id, self.shards);
        self.send(shard, CrossMsg::TakeOver { client_id, token: 0, want_session: false });
    }

    /// The client's session ended on this node (nothing here serves it): its owner record
    /// goes, if it is still this node's claim.
    pub(super) fn unclaim(&mut self, client_id: Arc<str>) {
        if self.takeovers.busy.contains_key(&client_id) {
            // Claimed again meanwhile: the record is the new claim's.
            return;
        }
        if let Some(revision) = self.takeovers.owned.remove(&client_id) {
            self.control.push(ControlRequest::Unclaim { client_id: client_id.to_string(), revision });
        }
    }

    /// Owner records naming this node, read at start-up: one that no claim of this run
    /// made is an earlier run's (the node was killed, or stopped before its clients'
    /// sessions ended); the client's shard lets it go unless it serves the client (a
    /// session recovered from its log). Then the next page.
    pub(super) fn records_found(&mut self, records: Vec<(String, u64)>, next: Option<String>) {
        for (client_id, revision) in records {
            let client_id: Arc<str> = client_id.into();
            if self.takeovers.owned.contains_key(&client_id) || self.takeovers.busy.contains_key(&client_id) {
                continue;
            }
            self.takeovers.owned.insert(client_id.clone(), revision);
            let shard = placement::owner(&client_id, self.shards);
            self.send(shard, CrossMsg::Unserved { client_id });
        }
        if let Some(from) = next {
            self.control.push(ControlRequest::Sweep { from });
        }
    }

    /// A node went away: claims waiting on it go on without its session (it closed its
    /// clients before its lease ran out), and its takeovers here are forgotten.
    pub(super) fn forget_takeovers(&mut self, node: NodeId) {
        let name = self.nodes[node as usize].name.clone();
        let asked: Vec<u64> =
            self.takeovers.asked.iter().filter(|(_, (n, _))| *n == node).map(|(id, _)| *id).collect();
        for id in asked {
            if let Some((_, claim)) = self.takeovers.asked.remove(&id) {
                tracing::warn!(client_id = %claim.client_id, node = %name, "cluster: the previous node is gone: its session is not handed over");
                self.answer(&claim, (true, false), None);
            }
        }
        let theirs: Vec<u64> =
            self.takeovers.theirs.iter().filter(|(_, t)| t.0 == node).map(|(k, _)| *k).collect();
        for token in &theirs {
            self.takeovers.flushing.remove(token);
        }
        // Barriers waiting for it: nothing more comes from it.
        let barriers: Vec<u64> = self.takeovers.flushing.keys().copied().collect();
        for token in barriers {
            self.flushed_by(Some(node), token);
        }
        for token in theirs {
            // The node taking the client over is gone: the session stays here.
            if let Some((_, _, client_id)) = self.takeovers.theirs.remove(&token) {
                let shard = placement::owner(&client_id, self.shards);
                self.send(shard, CrossMsg::Stay { client_id });
            }
        }
        let gone: Vec<_> = self.takeovers.awaiting_last.keys().filter(|(n, _)| *n == node).copied().collect();
        for key in gone {
            // Its copy is gone with it: the session goes on with what was handed over (no
            // more parts, nothing after them).
            if let Some(claim) = self.takeovers.awaiting_last.remove(&key) {
                let (shard, token, client_id) = (claim.shard, claim.token, claim.client_id.clone());
                self.send(shard, CrossMsg::Part { client_id, token, messages: Vec::new(), more: false });
                self.leftovers(claim, Vec::new());
            }
        }
        self.takeovers.adopting.retain(|_, (n, _)| *n != node);
    }
}
