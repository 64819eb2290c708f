//! The shard's components, tested without sockets or an executor: a `Shard` built as it
//! is, connections that are only their outboxes ([`conn`]), and only synchronous calls.
//! What a client would read is decoded from its connection's outbox ([`packets`]); what a
//! peer would receive is what waits in `peers.outbox`.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use crate::broker::conn_handle::ConnHandle;
use crate::broker::cross::CrossMsg;
use crate::broker::message::Message;
use crate::broker::session::{SessionId, Subscription};
use crate::broker::Global;
use crate::codec::{
    self, Connect, Packet, Properties, Property, ProtocolVersion, Publish, QoS, SubscriptionOptions, Will,
};
use crate::config::Config;
use crate::topic::{TopicFilter, TopicName};

use super::{Shard, ShardRef};

mod admin;
mod durability;
mod groups;
mod peers;
mod pressure;
mod router;
mod sessions;

/// A shard `id` of `shards`, with the default configuration changed by `configure`.
fn shard_with(id: usize, shards: usize, configure: impl FnOnce(&mut Config)) -> Shard {
    let mut config = Config::new("127.0.0.1:0".parse().unwrap());
    configure(&mut config);
    let global = Arc::new(Global::new(shards, config.max_retained_messages, config.max_retained_bytes));
    Shard::new(id, shards, Rc::new(config), global)
}

/// The only shard of a broker, with the default configuration.
fn shard() -> Shard {
    shard_with(0, 1, |_| {})
}

/// A connection's shard-facing part, as the connection task builds it: no socket behind
/// it (`abort` must not be called), no keep-alive, no topic aliases.
fn conn(shard: &mut Shard, client_id: &str, version: ProtocolVersion) -> Rc<ConnHandle> {
    let id = shard.next_id();
    Rc::new(ConnHandle::new(id, client_id, version, shard.config.write_buffer, -1))
}

/// A CONNECT; `expiry` is the v5 Session Expiry Interval (ignored for 3.1.1).
fn connect_packet(
    client_id: &str,
    version: ProtocolVersion,
    clean_start: bool,
    expiry: u32,
    will: Option<Will>,
) -> Connect {
    let mut properties = Properties::default();
    if version.is_v5() && expiry > 0 {
        properties.push(Property::SessionExpiryInterval(expiry));
    }
    Connect {
        protocol: version,
        clean_start,
        keep_alive: 0,
        client_id: client_id.to_string(),
        will,
        username: None,
        password: None,
        properties,
    }
}

/// A client as the shard sees one after CONNECT.
struct Client {
    conn: Rc<ConnHandle>,
    sid: SessionId,
    present: bool,
}

/// Connects a v5 client: clean start, and a session that outlives the connection by
/// `expiry` seconds.
fn connect(shard: &mut Shard, client_id: &str, clean_start: bool, expiry: u32) -> Client {
    connect_with(shard, connect_packet(client_id, ProtocolVersion::V5, clean_start, expiry, None))
}

fn connect_with(shard: &mut Shard, connect: Connect) -> Client {
    let conn = conn(shard, &connect.client_id, connect.protocol);
    let (sid, present) = shard.connect(conn.clone(), &connect, None);
    Client { conn, sid, present }
}

fn topic(name: &str) -> TopicName {
    TopicName::new(name.to_string()).unwrap()
}

fn filter(text: &str) -> TopicFilter {
    TopicFilter::new(text.to_string()).unwrap()
}

fn sub(qos: QoS) -> Subscription {
    Subscription {
        options: SubscriptionOptions { qos, no_local: false, retain_as_published: false, retain_handling: 0 },
        identifier: None,
        acl: crate::auth::AclMark::OPEN,
    }
}

fn message(name: &str, qos: QoS, payload: &str) -> Message {
    Message::new(topic(name), Bytes::from(payload.to_string()), qos, false, &Properties::default())
}

fn will(name: &str, payload: &str) -> Will {
    Will {
        topic: topic(name),
        payload: Bytes::from(payload.to_string()),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    }
}

/// Joins `sid` to a shared subscription group by its full `$share/...` filter.
fn join(shard: &mut Shard, sid: SessionId, full: &str, qos: QoS) {
    let full = filter(full);
    let key = crate::broker::shared::parse(&full).unwrap().unwrap();
    shard.join_group(sid, full, key, sub(qos));
}

/// Every packet written to the connection so far (its outbox is left as it is).
fn packets(conn: &ConnHandle) -> Vec<Packet> {
    let mut buf = conn.outbox.borrow().clone();
    let mut out = Vec::new();
    while let Some(packet) = codec::decode(&mut buf, conn.version, usize::MAX).unwrap() {
        out.push(packet);
    }
    assert!(buf.is_empty(), "a partial packet in the outbox");
    out
}

/// The PUBLISH packets written to the connection so far.
fn publishes(conn: &ConnHandle) -> Vec<Publish> {
    packets(conn)
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(publish) => Some(publish),
            _ => None,
        })
        .collect()
}

/// The payloads of the PUBLISH packets written to the connection so far.
fn payloads(conn: &ConnHandle) -> Vec<String> {
    publishes(conn).iter().map(|p| String::from_utf8_lossy(&p.payload).into_owned()).collect()
}

/// Takes what waits for `peer`, keeping `peers.bytes` true.
fn take_outbox(shard: &mut Shard, peer: usize) -> Vec<CrossMsg> {
    shard.peers.bytes[peer] = 0;
    shard.peers.outbox[peer].take_all()
}

fn shard_ref(shard: Shard) -> ShardRef {
    Rc::new(RefCell::new(shard))
}

fn relaxed(counter: &std::sync::atomic::AtomicUsize) -> usize {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}
