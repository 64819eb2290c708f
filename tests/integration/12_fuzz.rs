//! Whole-broker fuzzing: hostile, mixed-version raw clients against a broker with small
//! bounds.
//!
//! Each proptest case starts a fresh two-shard broker (the bounds below, its logs in a
//! temporary data directory, small segments), opens a few raw sockets and plays a generated
//! sequence of operations on them: CONNECTs of every kind (3.1, 3.1.1 and 5; clean or
//! persistent; wills; v5 properties; two sockets taking over one identifier), SUBSCRIBE and
//! UNSUBSCRIBE of filters from a small alphabet (wildcards, shared, too deep, repeated, many at
//! once), PUBLISH at every QoS with properties (user properties, expiry, topic aliases, response
//! topics, ...), acknowledgements with random identifiers, PINGREQ, DISCONNECT, packets only a
//! server sends, abrupt closes, bursts that fill queues, outboxes and the retained store,
//! clients that stop reading or acknowledging for a while, and damaged bytes (garbage,
//! truncated, bit-flipped, shifted packets). Valid packets come from the project's codec.
//!
//! After the operations every client is held as it is (a client that stopped reading still
//! does not read) until each shard has measured its gauges twice more; then the case checks:
//! - no broker thread panicked; once the clients closed their sockets every connection
//!   ends; and both shards still serve: a client owned by each shard connects, subscribes
//!   and gets its own PUBLISH and the other's back;
//! - the accounted bytes stayed within the bounds in every sample taken during the case
//!   (`Broker::accounting`, sampled between operations and while holding);
//! - what the broker sent decodes in the client's protocol version, and respects the
//!   client's Maximum Packet Size and Topic Alias Maximum.
//!
//! Cases: `RINGMQ_FUZZ_CASES` (default [`DEFAULT_CASES`]); `RINGMQ_FUZZ_VERBOSE=1` prints each
//! case's statistics. proptest's own variables apply as well: `PROPTEST_RNG_SEED` replays a
//! run, `PROPTEST_MAX_SHRINK_ITERS` bounds the shrinking of a failure (default 24 here: each
//! case takes seconds). A failing case is printed in its minimal form and persisted in
//! proptest's regression file (`tests/proptest-regressions/12_fuzz.txt`), which later runs
//! replay first. Some failures depend on timing: replay one a few times.
//!
//! Problems the fuzzing found have a test of their own at the end of this file. (One more, a
//! `--queue-full-policy backpressure` pause that outlasts its clients, is issue 12's: see the
//! test `closed_congested_clients_release_the_broker_at_once` in commit 29631b9.)

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use ringmq::broker::Accounting;
use ringmq::codec::{
    self, Auth, ConnAck, Connect, Disconnect, Packet, PacketId, Properties, Property, ProtocolVersion,
    PubAck, Publish, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
use ringmq::config::{FsyncMode, QueueFullPolicy};
use ringmq::topic::{TopicFilter, TopicName};
use ringmq::{Broker, Config, Shutdown};

use crate::common::client_id_on;

/// Cases of the default run; each takes about two seconds (most of it waiting for the
/// shards' once-a-second gauges).
const DEFAULT_CASES: u32 = 16;

// The broker's bounds: small, so that a few clients reach every one of them.
const WRITE_BUFFER: usize = 64 * 1024;
const MAX_PACKET_SIZE: usize = 64 * 1024;
const MAX_QUEUED_MESSAGES: usize = 50;
const MAX_QUEUED_BYTES: usize = 256 * 1024;
const MAX_INFLIGHT: usize = 8;
const MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 50;
/// Above what the case's sessions can hold (the probes must still subscribe afterwards).
const MAX_SUBSCRIPTIONS: usize = 1000;
const MAX_RETAINED_MESSAGES: usize = 200;
const MAX_RETAINED_BYTES: usize = 256 * 1024;
const MAX_TOPIC_LEVELS: usize = 8;
const RECEIVE_MAXIMUM: u16 = 8;

/// Raw client sockets a case uses at most.
const SLOTS: usize = 5;
/// Bytes a client keeps unsent (the broker stopped reading it) before it gives up a burst.
const MAX_UNSENT: usize = 2 << 20;
/// SO_RCVBUF of the clients' sockets.
const CLIENT_RECV_BUFFER: usize = 8 * 1024;
/// Pause between two operations (pumping the sockets meanwhile).
const OP_PAUSE: Duration = Duration::from_millis(5);
/// Silence after which a subscriber to `#` has received every retained message.
const CENSUS_QUIET: Duration = Duration::from_millis(300);
/// Longest wait for anything the checks need from the broker.
const CHECK_WAIT: Duration = Duration::from_secs(8);

// ------------------------------------------------------------------ what a case is made of

/// Levels topic names are made of ("" makes `a//b`).
const LEVELS: [&str; 7] = ["a", "b", "c", "$SYS", "x y", "é", ""];
/// Levels topic filters are made of.
const FILTER_LEVELS: [&str; 6] = ["a", "b", "c", "+", "$SYS", ""];

/// A topic name: indices into [`LEVELS`].
#[derive(Debug, Clone)]
struct TopicSpec(Vec<u8>);

impl TopicSpec {
    fn text(&self) -> String {
        self.0.iter().map(|l| LEVELS[usize::from(*l) % LEVELS.len()]).collect::<Vec<_>>().join("/")
    }
}

/// A topic filter: an optional `$share/...` prefix, levels from [`FILTER_LEVELS`], an
/// optional trailing `#`.
#[derive(Debug, Clone)]
struct FilterSpec {
    /// 0 none, 1 `$share/g/`, 2 `$share/h/`, 3 `$share/g` alone (no filter after it).
    share: u8,
    levels: Vec<u8>,
    hash: bool,
}

impl FilterSpec {
    fn text(&self) -> String {
        let mut levels: Vec<&str> =
            self.levels.iter().map(|l| FILTER_LEVELS[usize::from(*l) % FILTER_LEVELS.len()]).collect();
        if self.hash {
            levels.push("#");
        }
        let filter = levels.join("/");
        match self.share {
            0 => filter,
            1 => format!("$share/g/{filter}"),
            2 => format!("$share/h/{filter}"),
            _ => "$share/g".to_string(),
        }
    }

    fn filter(&self) -> Option<TopicFilter> {
        TopicFilter::new(Bytes::from(self.text())).ok()
    }
}

/// PUBLISH properties (v5 only; dropped by the 3.1.1 encoder).
#[derive(Debug, Clone, Default)]
struct PubProps {
    expiry: Option<u32>,
    alias: Option<u16>,
    /// Send the alias with an empty topic (the alias must be known to the broker).
    alias_only: bool,
    response_topic: Option<TopicSpec>,
    correlation: bool,
    /// User properties: how many, and whether one of them is large.
    user: u8,
    big_user: bool,
    content_type: bool,
    payload_format: Option<u8>,
    /// A Subscription Identifier, which a client must not send (MQTT-3.3.4-6).
    subscription_id: bool,
}

impl PubProps {
    fn properties(&self) -> Properties {
        let mut p = Properties::new();
        if let Some(format) = self.payload_format {
            p.push(Property::PayloadFormatIndicator(format));
        }
        if let Some(expiry) = self.expiry {
            p.push(Property::MessageExpiryInterval(expiry));
        }
        if self.content_type {
            p.push(Property::ContentType("text/plain".into()));
        }
        if let Some(topic) = &self.response_topic {
            p.push(Property::ResponseTopic(topic.text()));
        }
        if self.correlation {
            p.push(Property::CorrelationData(Bytes::from_static(b"\x00corr\xff")));
        }
        if self.subscription_id {
            p.push(Property::SubscriptionIdentifier(7));
        }
        if let Some(alias) = self.alias {
            p.push(Property::TopicAlias(alias));
        }
        for i in 0..self.user {
            p.push(Property::UserProperty(format!("k{i}"), "v".into()));
        }
        if self.big_user {
            p.push(Property::UserProperty("big".into(), "u".repeat(3000)));
        }
        p
    }
}

#[derive(Debug, Clone)]
struct WillSpec {
    topic: TopicSpec,
    qos: u8,
    retain: bool,
    payload: usize,
    delay: Option<u32>,
    expiry: Option<u32>,
    user: bool,
}

#[derive(Debug, Clone)]
struct ConnectSpec {
    /// Index into the case's client identifiers; the last one is the empty identifier.
    id: u8,
    /// 0: 3.1, 1: 3.1.1, 2: 5.
    version: u8,
    clean: bool,
    keep_alive: u16,
    will: Option<WillSpec>,
    session_expiry: Option<u32>,
    receive_maximum: Option<u16>,
    max_packet_size: Option<u32>,
    topic_alias_maximum: Option<u16>,
    request_problem: Option<u8>,
    request_response: Option<u8>,
    user: bool,
    auth_method: bool,
    /// 0 none, 1 user name, 2 user name and password, 3 password alone.
    login: u8,
}

/// Whether and how a client answers what the broker sends it.
#[derive(Debug, Clone, Copy)]
struct Manner {
    /// It reads what the broker sends (otherwise its socket fills up).
    reading: bool,
    /// It acknowledges PUBLISH, PUBREC and PUBREL.
    acking: bool,
}

#[derive(Debug, Clone)]
enum PacketSpec {
    /// A second CONNECT on a connected socket.
    Connect(Box<ConnectSpec>),
    Subscribe {
        id: u16,
        filters: Vec<(FilterSpec, u8, bool, bool, u8)>,
        twice: bool,
        identifier: Option<u32>,
        user: bool,
    },
    Unsubscribe {
        id: u16,
        filters: Vec<FilterSpec>,
    },
    Publish {
        topic: TopicSpec,
        qos: u8,
        retain: bool,
        dup: bool,
        id: u16,
        props: PubProps,
        payload: usize,
        fill: u8,
    },
    /// PUBACK, PUBREC, PUBREL or PUBCOMP (`kind` 0..4) with a random identifier and reason.
    Ack {
        kind: u8,
        id: u16,
        reason: u8,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    /// A packet only a server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP) or AUTH.
    ServerOnly(u8),
}

/// How a packet is damaged before it is sent.
#[derive(Debug, Clone)]
enum Damage {
    Intact,
    /// Only a prefix is sent.
    Truncate(Index),
    /// Bytes XORed with a non-zero mask.
    Flip(Vec<(Index, u8)>),
    Insert(Index, u8),
    Remove(Index),
}

#[derive(Debug, Clone)]
enum Op {
    /// Closes the slot's socket (if open) without a word and connects anew.
    Connect {
        slot: u8,
        connect: Box<ConnectSpec>,
        manner: Manner,
    },
    Send {
        slot: u8,
        packet: PacketSpec,
        damage: Damage,
    },
    /// `count` PUBLISHes back to back; `vary` gives each its own topic (`topic/i`).
    Burst {
        slot: u8,
        topic: TopicSpec,
        vary: bool,
        qos: u8,
        retain: bool,
        count: u16,
        size: usize,
    },
    /// One SUBSCRIBE of `count` distinct filters, to reach the subscription bounds.
    SubscribeMany {
        slot: u8,
        count: u8,
        qos: u8,
        shared: bool,
    },
    /// Random bytes: on a fresh socket when the slot has none.
    Garbage {
        slot: u8,
        bytes: Vec<u8>,
    },
    Manner {
        slot: u8,
        manner: Manner,
    },
    /// Closes the socket without DISCONNECT.
    Close {
        slot: u8,
    },
    Sleep {
        ms: u16,
    },
}

#[derive(Debug, Clone)]
struct Setup {
    fsync: u8,
    policy: u8,
    queue_qos0: bool,
}

#[derive(Debug, Clone)]
struct Case {
    setup: Setup,
    /// The clients in use, one per slot, connected (and subscribed) first.
    clients: Vec<Client>,
    ops: Vec<Op>,
    /// Bursts (of a few messages each) played over and over while the clients are held:
    /// the flow that keeps queues and outboxes full when the gauges are measured.
    load: Vec<Op>,
}

#[derive(Debug, Clone)]
struct Client {
    connect: ConnectSpec,
    manner: Manner,
    /// Subscribed to right after each CONNECT, each at its QoS.
    subscriptions: Vec<(FilterSpec, u8)>,
    /// Connected again (if its connection ended) before the clients are held.
    revive: bool,
}

// ------------------------------------------------------------------ strategies

fn arb_topic() -> BoxedStrategy<TopicSpec> {
    prop_oneof![
        12 => vec(prop_oneof![6 => 0u8..3, 1 => 3u8..7], 1..4),
        1 => vec(0u8..3, 7..11),
    ]
    .prop_map(TopicSpec)
    .boxed()
}

fn arb_filter() -> BoxedStrategy<FilterSpec> {
    (
        prop_oneof![10 => Just(0u8), 3 => 1u8..3, 1 => Just(3u8)],
        prop_oneof![
            12 => vec(prop_oneof![6 => 0u8..3, 3 => Just(3u8), 1 => 4u8..6], 0..4),
            1 => vec(0u8..4, 7..11),
        ],
        prop::bool::weighted(0.3),
    )
        .prop_map(|(share, levels, hash)| FilterSpec { share, levels, hash })
        .boxed()
}

fn arb_qos() -> impl Strategy<Value = u8> {
    prop_oneof![4 => 0u8..3, 1 => Just(3u8)].prop_map(|q| q.min(2))
}

fn arb_payload() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 0usize..64,
        4 => 64usize..2048,
        2 => 2048usize..16384,
        1 => (MAX_PACKET_SIZE - 600)..(MAX_PACKET_SIZE + 200),
    ]
}

fn arb_pub_props() -> BoxedStrategy<PubProps> {
    (
        prop::option::weighted(0.3, prop_oneof![Just(0u32), Just(1), Just(2), Just(3600)]),
        prop::option::weighted(0.25, prop_oneof![8 => 1u16..4, 1 => Just(0u16), 1 => 60u16..70]),
        prop::bool::weighted(0.5),
        prop::option::weighted(0.15, arb_topic()),
        prop::bool::weighted(0.15),
        prop_oneof![6 => Just(0u8), 2 => 1u8..3, 1 => 3u8..40],
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.1),
        prop::option::weighted(0.15, 0u8..3),
        prop::bool::weighted(0.03),
    )
        .prop_map(
            |(
                expiry,
                alias,
                alias_only,
                response_topic,
                correlation,
                user,
                big_user,
                content_type,
                payload_format,
                subscription_id,
            )| PubProps {
                expiry,
                alias,
                alias_only,
                response_topic,
                correlation,
                user,
                big_user,
                content_type,
                payload_format,
                subscription_id,
            },
        )
        .boxed()
}

fn arb_will() -> BoxedStrategy<WillSpec> {
    (
        arb_topic(),
        0u8..3,
        any::<bool>(),
        prop_oneof![0usize..64, 1000usize..5000],
        prop::option::of(prop_oneof![Just(0u32), Just(1), Just(3)]),
        prop::option::weighted(0.2, prop_oneof![Just(1u32), Just(60)]),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(topic, qos, retain, payload, delay, expiry, user)| WillSpec {
            topic,
            qos,
            retain,
            payload,
            delay,
            expiry,
            user,
        })
        .boxed()
}

fn arb_connect() -> BoxedStrategy<ConnectSpec> {
    (
        (
            0u8..5,
            prop_oneof![1 => Just(0u8), 6 => Just(1u8), 8 => Just(2u8)],
            any::<bool>(),
            prop_oneof![6 => Just(0u16), 1 => Just(1u16), 3 => Just(60u16)],
            prop::option::weighted(0.3, arb_will()),
            prop::option::weighted(0.6, prop_oneof![Just(0u32), Just(2), Just(3600), Just(u32::MAX)]),
            prop::option::weighted(
                0.4,
                prop_oneof![1 => Just(0u16), 4 => 1u16..4, 3 => Just(8u16), 2 => Just(100u16)],
            ),
        ),
        (
            prop::option::weighted(
                0.3,
                prop_oneof![1 => Just(0u32), 1 => Just(16u32), 4 => 100u32..2000, 3 => Just(70_000u32)],
            ),
            prop::option::weighted(0.4, prop_oneof![Just(0u16), Just(2), Just(10)]),
            prop::option::weighted(0.2, 0u8..3),
            prop::option::weighted(0.2, 0u8..3),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.03),
            prop_oneof![8 => Just(0u8), 1 => 1u8..4],
        ),
    )
        .prop_map(
            |(
                (id, version, clean, keep_alive, will, session_expiry, receive_maximum),
                (
                    max_packet_size,
                    topic_alias_maximum,
                    request_problem,
                    request_response,
                    user,
                    auth_method,
                    login,
                ),
            )| ConnectSpec {
                id,
                version,
                clean,
                keep_alive,
                will,
                session_expiry,
                receive_maximum,
                max_packet_size,
                topic_alias_maximum,
                request_problem,
                request_response,
                user,
                auth_method,
                login,
            },
        )
        .boxed()
}

fn arb_manner() -> impl Strategy<Value = Manner> {
    (prop::bool::weighted(0.8), prop::bool::weighted(0.75))
        .prop_map(|(reading, acking)| Manner { reading, acking })
}

fn arb_packet_id() -> impl Strategy<Value = u16> {
    prop_oneof![8 => 1u16..12, 1 => any::<u16>().prop_map(|id| id.max(1))]
}

fn arb_packet() -> BoxedStrategy<PacketSpec> {
    prop_oneof![
        10 => (arb_topic(), arb_qos(), prop::bool::weighted(0.3), prop::bool::weighted(0.1), arb_packet_id(),
               arb_pub_props(), arb_payload(), prop_oneof![Just(b'x'), Just(0xffu8)])
            .prop_map(|(topic, qos, retain, dup, id, props, payload, fill)| PacketSpec::Publish {
                topic, qos, retain, dup, id, props, payload, fill
            }),
        5 => (arb_packet_id(), vec((arb_filter(), arb_qos(), prop::bool::weighted(0.15),
                                    prop::bool::weighted(0.2), prop_oneof![4 => Just(0u8), 1 => 1u8..4]), 1..5),
              prop::bool::weighted(0.1), prop::option::weighted(0.2, prop_oneof![1u32..5, Just(268_435_455)]),
              prop::bool::weighted(0.1))
            .prop_map(|(id, filters, twice, identifier, user)| PacketSpec::Subscribe {
                id, filters, twice, identifier, user
            }),
        2 => (arb_packet_id(), vec(arb_filter(), 1..4))
            .prop_map(|(id, filters)| PacketSpec::Unsubscribe { id, filters }),
        4 => (0u8..4, arb_packet_id(), 0u8..4).prop_map(|(kind, id, reason)| PacketSpec::Ack { kind, id, reason }),
        2 => Just(PacketSpec::PingReq),
        1 => (0u8..4, prop::option::weighted(0.3, prop_oneof![Just(0u32), Just(5)]))
            .prop_map(|(reason, session_expiry)| PacketSpec::Disconnect { reason, session_expiry }),
        1 => arb_connect().prop_map(|c| PacketSpec::Connect(Box::new(c))),
        1 => (0u8..5).prop_map(PacketSpec::ServerOnly),
    ]
        .boxed()
}

fn arb_damage() -> BoxedStrategy<Damage> {
    prop_oneof![
        24 => Just(Damage::Intact),
        2 => any::<Index>().prop_map(Damage::Truncate),
        2 => vec((any::<Index>(), 1u8..=255), 1..4).prop_map(Damage::Flip),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Damage::Insert(at, byte)),
        1 => any::<Index>().prop_map(Damage::Remove),
    ]
    .boxed()
}

fn arb_op() -> BoxedStrategy<Op> {
    let slot = || 0u8..SLOTS as u8;
    prop_oneof![
        3 => (slot(), arb_connect(), arb_manner())
            .prop_map(|(slot, connect, manner)| Op::Connect { slot, connect: Box::new(connect), manner }),
        24 => (slot(), arb_packet(), arb_damage()).prop_map(|(slot, packet, damage)| Op::Send { slot, packet, damage }),
        4 => (slot(), arb_topic(), prop::bool::weighted(0.3), 0u8..3, prop::bool::weighted(0.3), 1u16..150,
              prop_oneof![3 => 0usize..200, 2 => 200usize..4000, 1 => 4000usize..12000])
            .prop_map(|(slot, topic, vary, qos, retain, count, size)| Op::Burst {
                slot, topic, vary, qos, retain, count, size
            }),
        1 => (slot(), 20u8..80, 0u8..3, prop::bool::weighted(0.3))
            .prop_map(|(slot, count, qos, shared)| Op::SubscribeMany { slot, count, qos, shared }),
        1 => (slot(), vec(any::<u8>(), 1..64)).prop_map(|(slot, bytes)| Op::Garbage { slot, bytes }),
        2 => (slot(), arb_manner()).prop_map(|(slot, manner)| Op::Manner { slot, manner }),
        1 => slot().prop_map(|slot| Op::Close { slot }),
        1 => (0u16..250).prop_map(|ms| Op::Sleep { ms }),
    ]
        .boxed()
}

fn arb_load() -> BoxedStrategy<Op> {
    (
        0u8..SLOTS as u8,
        arb_topic(),
        prop::bool::weighted(0.2),
        0u8..3,
        prop::bool::weighted(0.2),
        1u16..6,
        prop_oneof![1 => 0usize..200, 2 => 200usize..4000, 2 => 4000usize..16000, 1 => 60_000usize..65_000],
    )
        .prop_map(|(slot, topic, vary, qos, retain, count, size)| Op::Burst {
            slot,
            topic,
            vary,
            qos,
            retain,
            count,
            size,
        })
        .boxed()
}

fn arb_case() -> BoxedStrategy<Case> {
    (
        (0u8..3, 0u8..3, any::<bool>()).prop_map(|(fsync, policy, queue_qos0)| Setup {
            fsync,
            policy,
            queue_qos0,
        }),
        vec(
            (
                arb_connect(),
                arb_manner(),
                vec((prop_oneof![1 => Just(None), 1 => arb_filter().prop_map(Some)], 0u8..3), 0..3),
                prop::bool::weighted(0.7),
            )
                .prop_map(|(connect, manner, subscriptions, revive)| Client {
                    connect,
                    manner,
                    revive,
                    // None: `#`, which every publish to a topic not starting with `$` matches.
                    subscriptions: subscriptions
                        .into_iter()
                        .map(|(f, q)| (f.unwrap_or(FilterSpec { share: 0, levels: vec![], hash: true }), q))
                        .collect(),
                }),
            2..=SLOTS,
        ),
        vec(arb_op(), 8..48),
        vec(arb_load(), 0..3),
    )
        .prop_map(|(setup, clients, ops, load)| Case { setup, clients, ops, load })
        .boxed()
}

// ------------------------------------------------------------------ packets from specs

/// The client identifiers a case uses: two owned by each shard, then the empty one.
fn client_ids() -> &'static [String] {
    static IDS: OnceLock<Vec<String>> = OnceLock::new();
    IDS.get_or_init(|| {
        vec![
            client_id_on(0, "fz-a"),
            client_id_on(1, "fz-b"),
            client_id_on(0, "fz-c"),
            client_id_on(1, "fz-d"),
            String::new(),
        ]
    })
}

fn version_of(spec: &ConnectSpec) -> ProtocolVersion {
    match spec.version {
        0 => ProtocolVersion::V31,
        1 => ProtocolVersion::V311,
        _ => ProtocolVersion::V5,
    }
}

fn qos(q: u8) -> QoS {
    QoS::from_u8(q.min(2)).unwrap_or(QoS::AtMostOnce)
}

fn packet_id(id: u16) -> PacketId {
    PacketId::new(id.max(1)).unwrap_or(PacketId::MIN)
}

fn topic_name(text: String) -> Option<TopicName> {
    TopicName::new_allow_empty(Bytes::from(text)).ok()
}

fn connect_packet(spec: &ConnectSpec) -> Packet {
    let version = version_of(spec);
    let mut properties = Properties::new();
    if let Some(expiry) = spec.session_expiry {
        properties.push(Property::SessionExpiryInterval(expiry));
    }
    if let Some(max) = spec.receive_maximum {
        properties.push(Property::ReceiveMaximum(max));
    }
    if let Some(max) = spec.max_packet_size {
        properties.push(Property::MaximumPacketSize(max));
    }
    if let Some(max) = spec.topic_alias_maximum {
        properties.push(Property::TopicAliasMaximum(max));
    }
    if let Some(flag) = spec.request_problem {
        properties.push(Property::RequestProblemInformation(flag));
    }
    if let Some(flag) = spec.request_response {
        properties.push(Property::RequestResponseInformation(flag));
    }
    if spec.user {
        properties.push(Property::UserProperty("client".into(), "fuzz".into()));
    }
    if spec.auth_method {
        properties.push(Property::AuthenticationMethod("SCRAM-SHA-1".into()));
    }
    let will = spec.will.as_ref().and_then(|w| {
        let mut properties = Properties::new();
        if let Some(delay) = w.delay {
            properties.push(Property::WillDelayInterval(delay));
        }
        if let Some(expiry) = w.expiry {
            properties.push(Property::MessageExpiryInterval(expiry));
        }
        if w.user {
            properties.push(Property::UserProperty("will".into(), "x".into()));
        }
        Some(Will {
            topic: TopicName::new(Bytes::from(w.topic.text())).ok()?,
            payload: Bytes::from(vec![b'w'; w.payload]),
            qos: qos(w.qos),
            retain: w.retain,
            properties,
        })
    });
    let (username, password) = match spec.login {
        1 => (Some("user".to_string()), None),
        2 => (Some("user".to_string()), Some(Bytes::from_static(b"secret"))),
        3 => (None, Some(Bytes::from_static(b"secret"))),
        _ => (None, None),
    };
    let ids = client_ids();
    Packet::Connect(Connect {
        protocol: version,
        clean_start: spec.clean,
        keep_alive: spec.keep_alive,
        client_id: ids[usize::from(spec.id) % ids.len()].clone(),
        will,
        username,
        password,
        properties,
    })
}

/// The packet, or `None` when the spec makes nothing encodable (an invalid topic, say).
fn build_packet(spec: &PacketSpec) -> Option<Packet> {
    Some(match spec {
        PacketSpec::Connect(connect) => connect_packet(connect),
        PacketSpec::Subscribe { id, filters, twice, identifier, user } => {
            let mut list: Vec<(TopicFilter, SubscriptionOptions)> = filters
                .iter()
                .filter_map(|(f, q, no_local, rap, rh)| {
                    let options = SubscriptionOptions {
                        qos: qos(*q),
                        no_local: *no_local,
                        retain_as_published: *rap,
                        retain_handling: *rh,
                    };
                    Some((f.filter()?, options))
                })
                .collect();
            if *twice {
                list.extend(list.clone());
            }
            let mut properties = Properties::new();
            if let Some(identifier) = identifier {
                properties.push(Property::SubscriptionIdentifier(*identifier));
            }
            if *user {
                properties.push(Property::UserProperty("sub".into(), "x".into()));
            }
            Packet::Subscribe(Subscribe { packet_id: packet_id(*id), properties, filters: list })
        }
        PacketSpec::Unsubscribe { id, filters } => Packet::Unsubscribe(Unsubscribe {
            packet_id: packet_id(*id),
            properties: Properties::new(),
            filters: filters.iter().filter_map(FilterSpec::filter).collect(),
        }),
        PacketSpec::Publish { topic, qos: q, retain, dup, id, props, payload, fill } => {
            let q = qos(*q);
            let text = if props.alias_only && props.alias.is_some() { String::new() } else { topic.text() };
            Packet::Publish(Publish {
                dup: *dup && q != QoS::AtMostOnce,
                qos: q,
                retain: *retain,
                topic: topic_name(text)?,
                packet_id: (q != QoS::AtMostOnce).then(|| packet_id(*id)),
                properties: props.properties(),
                payload: Bytes::from(vec![*fill; *payload]),
            })
        }
        PacketSpec::Ack { kind, id, reason } => {
            let reason = match (kind, reason) {
                (_, 0) => ReasonCode::Success,
                (0 | 1, 1) => ReasonCode::NoMatchingSubscribers,
                (0 | 1, 2) => ReasonCode::UnspecifiedError,
                (0 | 1, _) => ReasonCode::QuotaExceeded,
                _ => ReasonCode::PacketIdentifierNotFound,
            };
            let mut properties = Properties::new();
            if reason != ReasonCode::Success {
                properties.push(Property::ReasonString("fuzz".into()));
            }
            let ack = PubAck { packet_id: packet_id(*id), reason, properties };
            match kind {
                0 => Packet::PubAck(ack),
                1 => Packet::PubRec(ack),
                2 => Packet::PubRel(ack),
                _ => Packet::PubComp(ack),
            }
        }
        PacketSpec::PingReq => Packet::PingReq,
        PacketSpec::Disconnect { reason, session_expiry } => {
            let reason = match reason {
                0 => ReasonCode::NORMAL_DISCONNECTION,
                1 => ReasonCode::DisconnectWithWillMessage,
                2 => ReasonCode::UnspecifiedError,
                _ => ReasonCode::MessageRateTooHigh,
            };
            let mut properties = Properties::new();
            if let Some(expiry) = session_expiry {
                properties.push(Property::SessionExpiryInterval(*expiry));
            }
            Packet::Disconnect(Disconnect { reason, properties })
        }
        PacketSpec::ServerOnly(kind) => match kind {
            0 => Packet::ConnAck(ConnAck {
                session_present: false,
                reason: ReasonCode::Success,
                properties: Properties::new(),
            }),
            1 => Packet::SubAck(SubAck {
                packet_id: packet_id(1),
                properties: Properties::new(),
                reasons: vec![ReasonCode::GrantedQoS1],
            }),
            2 => Packet::UnsubAck(UnsubAck {
                packet_id: packet_id(1),
                properties: Properties::new(),
                reasons: vec![ReasonCode::Success],
            }),
            3 => Packet::PingResp,
            _ => Packet::Auth(Auth { reason: ReasonCode::ReAuthenticate, properties: Properties::new() }),
        },
    })
}

fn encode(packet: &Packet, version: ProtocolVersion) -> Option<Vec<u8>> {
    let mut out = BytesMut::new();
    codec::encode(packet, version, &mut out).ok()?;
    Some(out.to_vec())
}

fn damage(mut bytes: Vec<u8>, how: &Damage) -> Vec<u8> {
    match how {
        Damage::Intact => {}
        Damage::Truncate(at) => bytes.truncate(at.index(bytes.len().max(1))),
        Damage::Flip(flips) => {
            for (at, mask) in flips {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] ^= mask;
                }
            }
        }
        Damage::Insert(at, byte) => bytes.insert(at.index(bytes.len() + 1), *byte),
        Damage::Remove(at) => {
            if !bytes.is_empty() {
                bytes.remove(at.index(bytes.len()));
            }
        }
    }
    bytes
}

// ------------------------------------------------------------------ the raw clients

/// What a client socket may receive, from the CONNECT it sent.
#[derive(Debug, Clone, Copy)]
struct Expect {
    max_packet_size: usize,
    topic_alias_maximum: u16,
}

struct Slot {
    stream: Option<TcpStream>,
    version: ProtocolVersion,
    manner: Manner,
    /// Set when the socket began with a valid CONNECT of ours: what the broker sends must
    /// then decode in `version` and respect these limits.
    expect: Option<Expect>,
    inbuf: BytesMut,
    unsent: Vec<u8>,
    next_id: u16,
    /// How this slot's client last connected.
    last: Option<(ConnectSpec, Manner)>,
    /// What it subscribes to after each CONNECT.
    subscriptions: Vec<(FilterSpec, u8)>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            stream: None,
            version: ProtocolVersion::V311,
            manner: Manner { reading: true, acking: true },
            expect: None,
            inbuf: BytesMut::new(),
            unsent: Vec::new(),
            next_id: 0,
            last: None,
            subscriptions: Vec::new(),
        }
    }

    fn open(&mut self, addr: SocketAddr) -> bool {
        self.close();
        // A small receive buffer: a client that stops reading fills it (and the broker's
        // outbox) after kilobytes, not after the megabytes loopback autotuning allows.
        let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
            return false;
        };
        let _ = socket.set_recv_buffer_size(CLIENT_RECV_BUFFER);
        if socket.connect_timeout(&addr.into(), Duration::from_secs(2)).is_err() {
            return false;
        }
        let stream: TcpStream = socket.into();
        let _ = stream.set_nodelay(true);
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        self.stream = Some(stream);
        true
    }

    /// Drops the socket as it is: no DISCONNECT, whatever was unsent is lost.
    fn close(&mut self) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.shutdown(NetShutdown::Both);
        }
        self.inbuf.clear();
        self.unsent.clear();
        self.expect = None;
    }

    fn queue(&mut self, bytes: &[u8]) {
        if self.stream.is_some() && self.unsent.len() < MAX_UNSENT {
            self.unsent.extend_from_slice(bytes);
        }
    }

    fn next_packet_id(&mut self) -> PacketId {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        packet_id(self.next_id)
    }

    /// Writes what the socket takes now.
    fn flush(&mut self) {
        let Some(stream) = self.stream.as_mut() else { return };
        while !self.unsent.is_empty() {
            match stream.write(&self.unsent) {
                Ok(0) => {
                    self.close();
                    return;
                }
                Ok(n) => {
                    self.unsent.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close();
                    return;
                }
            }
        }
    }

    /// Reads what has arrived, checks it, and answers it if the client acknowledges.
    fn read(&mut self, slot: usize, problems: &mut Vec<String>) {
        if !self.manner.reading {
            return;
        }
        let mut scratch = [0u8; 16 * 1024];
        let mut budget = 1 << 20;
        loop {
            let Some(stream) = self.stream.as_mut() else { return };
            match stream.read(&mut scratch) {
                Ok(0) => {
                    self.decode_all(slot, problems);
                    self.close();
                    return;
                }
                Ok(n) => {
                    self.inbuf.extend_from_slice(&scratch[..n]);
                    self.decode_all(slot, problems);
                    budget -= n.min(budget);
                    if budget == 0 {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close();
                    return;
                }
            }
        }
    }

    fn decode_all(&mut self, slot: usize, problems: &mut Vec<String>) {
        loop {
            let before = self.inbuf.len();
            let packet = match codec::decode(&mut self.inbuf, self.version, usize::MAX) {
                Ok(Some(packet)) => packet,
                Ok(None) => return,
                Err(err) => {
                    if self.expect.is_some() {
                        problems.push(format!(
                            "slot {slot} ({:?}): the broker sent bytes that do not decode: {err}; next bytes {:02x?}",
                            self.version,
                            &self.inbuf[..self.inbuf.len().min(32)]
                        ));
                    }
                    self.inbuf.clear();
                    self.expect = None;
                    return;
                }
            };
            let size = before - self.inbuf.len();
            if let Some(expect) = self.expect {
                if size > expect.max_packet_size {
                    problems.push(format!(
                        "slot {slot}: a {size}-byte {} over the client's Maximum Packet Size {} [MQTT-3.1.2-24]",
                        kind_name(&packet),
                        expect.max_packet_size
                    ));
                }
                if let Packet::Publish(p) = &packet {
                    if let Some(alias) = p.properties.topic_alias() {
                        if alias == 0 || alias > expect.topic_alias_maximum {
                            problems.push(format!(
                                "slot {slot}: Topic Alias {alias} over the client's Topic Alias Maximum {} [MQTT-3.3.2-9]",
                                expect.topic_alias_maximum
                            ));
                        }
                    }
                }
            }
            if self.manner.acking {
                let answer = match &packet {
                    Packet::Publish(p) => match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(ack(id))),
                        (QoS::ExactlyOnce, Some(id)) => Some(Packet::PubRec(ack(id))),
                        _ => None,
                    },
                    Packet::PubRec(a) => Some(Packet::PubRel(ack(a.packet_id))),
                    Packet::PubRel(a) => Some(Packet::PubComp(ack(a.packet_id))),
                    _ => None,
                };
                if let Some(bytes) = answer.and_then(|a| encode(&a, self.version)) {
                    self.queue(&bytes);
                }
            }
        }
    }
}

fn ack(packet_id: PacketId) -> PubAck {
    PubAck { packet_id, reason: ReasonCode::Success, properties: Properties::new() }
}

fn kind_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}

// ------------------------------------------------------------------ panics of broker threads

fn broker_panics() -> &'static Mutex<Vec<String>> {
    static PANICS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    PANICS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Records every panic of a broker thread (`ringmq-N`, or an unnamed helper thread), on
/// top of the usual report. Other tests of this binary run brokers too: a panic in one of
/// theirs is counted here as well, which only ever makes this test stricter.
fn watch_broker_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("<unnamed>");
            if name.starts_with("ringmq") || name == "<unnamed>" {
                let what = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                if let Ok(mut panics) = broker_panics().lock() {
                    panics.push(format!("thread {name} panicked at {at}: {what}"));
                }
            }
            previous(info);
        }));
    });
}

fn panics_since(mark: usize) -> Vec<String> {
    broker_panics().lock().map(|p| p.get(mark..).unwrap_or_default().to_vec()).unwrap_or_default()
}

// ------------------------------------------------------------------ one case

struct Run {
    broker: Option<Broker>,
    addr: SocketAddr,
    dir: PathBuf,
    slots: Vec<Slot>,
    problems: Vec<String>,
    /// Identifiers that may hold a session (the empty one counts once per use).
    identities: BTreeSet<String>,
    anonymous: usize,
    /// Sockets that began with random bytes (which might, by chance, form a CONNECT).
    strangers: usize,
    reconnects: usize,
    /// The largest value of each gauge sampled, and the first sample out of bounds.
    worst: Accounting,
    violation: Option<String>,
    started: Instant,
    sent_bytes: usize,
}

fn config(setup: &Setup, dir: &std::path::Path) -> Config {
    let mut config = Config::new("127.0.0.1:0".parse().unwrap());
    config.cores = 2;
    config.io_memory = 512 * 1024;
    config.write_buffer = WRITE_BUFFER;
    config.max_packet_size = MAX_PACKET_SIZE;
    config.max_queued_messages = MAX_QUEUED_MESSAGES;
    config.max_queued_bytes = MAX_QUEUED_BYTES;
    config.max_inflight = MAX_INFLIGHT;
    config.max_subscriptions_per_client = MAX_SUBSCRIPTIONS_PER_CLIENT;
    config.max_subscriptions = MAX_SUBSCRIPTIONS;
    config.max_retained_messages = MAX_RETAINED_MESSAGES;
    config.max_retained_bytes = MAX_RETAINED_BYTES;
    config.max_topic_levels = MAX_TOPIC_LEVELS;
    config.receive_maximum = RECEIVE_MAXIMUM;
    config.sys_interval = Duration::from_secs(1);
    config.write_timeout = Duration::from_secs(2);
    config.connect_timeout = Duration::from_secs(2);
    config.max_session_expiry = 60;
    config.data_dir = Some(dir.to_path_buf());
    config.segment_size = 64 * 1024;
    config.fsync = match setup.fsync {
        0 => FsyncMode::Never,
        1 => FsyncMode::Always,
        _ => FsyncMode::Interval(Duration::from_millis(50)),
    };
    config.queue_full_policy = match setup.policy {
        0 => QueueFullPolicy::DropOldest,
        1 => QueueFullPolicy::DropNew,
        _ => QueueFullPolicy::Backpressure,
    };
    config.queue_qos0 = setup.queue_qos0;
    // Short: a congestion that outlives its clients (see
    // `closed_congested_clients_release_the_broker_at_once`) clears within the checks' wait.
    config.shared_ack_timeout = Duration::from_secs(2);
    config.slow_consumer_timeout = Duration::from_secs(2);
    config
}

impl Run {
    fn start(setup: &Setup) -> Result<Run, TestCaseError> {
        static CASE: AtomicUsize = AtomicUsize::new(0);
        let n = CASE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ringmq-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let broker = ringmq::start(config(setup, &dir), Shutdown::new())
            .map_err(|e| TestCaseError::fail(format!("the broker did not start: {e}")))?;
        Ok(Run {
            addr: broker.local_addr(),
            broker: Some(broker),
            dir,
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
            problems: Vec::new(),
            identities: BTreeSet::new(),
            anonymous: 0,
            strangers: 0,
            reconnects: 0,
            worst: Accounting::default(),
            violation: None,
            started: Instant::now(),
            sent_bytes: 0,
        })
    }

    fn accounting(&self) -> Accounting {
        self.broker.as_ref().map(Broker::accounting).unwrap_or_default()
    }

    /// Sessions that may exist: what the subscription and session counts are bounded by.
    fn clients(&self) -> usize {
        self.identities.len() + self.anonymous + self.strangers
    }

    fn sample(&mut self) {
        let a = self.accounting();
        let w = &mut self.worst;
        w.sessions = w.sessions.max(a.sessions);
        w.subscriptions = w.subscriptions.max(a.subscriptions);
        w.retained_messages = w.retained_messages.max(a.retained_messages);
        w.retained_bytes = w.retained_bytes.max(a.retained_bytes);
        w.queued_bytes = w.queued_bytes.max(a.queued_bytes);
        w.largest_queue_bytes = w.largest_queue_bytes.max(a.largest_queue_bytes);
        w.outbox_bytes = w.outbox_bytes.max(a.outbox_bytes);
        w.largest_outbox_bytes = w.largest_outbox_bytes.max(a.largest_outbox_bytes);
        w.mesh_bytes = w.mesh_bytes.max(a.mesh_bytes);
        w.connections = w.connections.max(a.connections);
        w.ticks = a.ticks;
        if self.violation.is_none() {
            if let Some(what) = out_of_bounds(&a, self.clients()) {
                let at = self.started.elapsed();
                self.violation = Some(format!("{what} (after {at:?}, accounting {a:?})"));
            }
        }
    }

    /// Writes, reads and answers on every socket, then samples the gauges.
    fn pump(&mut self) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.flush();
            slot.read(i, &mut self.problems);
            slot.flush();
        }
        self.sample();
    }

    /// Pumps for `time`.
    fn pump_for(&mut self, time: Duration) {
        let until = Instant::now() + time;
        loop {
            self.pump();
            if Instant::now() >= until {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reconnects a slot whose connection ended, as its client last connected: clients
    /// come back, as real ones do.
    fn reconnect(&mut self, index: usize) -> bool {
        if self.slots[index].stream.is_none() {
            if let Some((spec, manner)) = self.slots[index].last.clone() {
                self.connect(index, &spec, manner);
                self.reconnects += 1;
            }
        }
        self.slots[index].stream.is_some()
    }

    fn connect(&mut self, index: usize, spec: &ConnectSpec, manner: Manner) {
        let addr = self.addr;
        let slot = &mut self.slots[index];
        slot.last = Some((spec.clone(), manner));
        if !slot.open(addr) {
            self.problems.push(format!("slot {index}: cannot connect to the broker"));
            return;
        }
        let packet = connect_packet(spec);
        let version = version_of(spec);
        let Some(bytes) = encode(&packet, version) else { return };
        self.count_identity(&packet);
        let slot = &mut self.slots[index];
        slot.version = version;
        slot.manner = manner;
        slot.expect = Some(Expect {
            max_packet_size: spec
                .max_packet_size
                .filter(|m| version.is_v5() && *m > 0)
                .map_or(usize::MAX, |m| m as usize),
            topic_alias_maximum: spec.topic_alias_maximum.filter(|_| version.is_v5()).unwrap_or(0),
        });
        slot.queue(&bytes);
        self.sent_bytes += bytes.len();
        let filters = slot.subscriptions.iter().map(|(f, q)| (f.clone(), *q, false, false, 0)).collect();
        let subscribe = PacketSpec::Subscribe { id: 1, filters, twice: false, identifier: None, user: false };
        if let Some(bytes) = build_packet(&subscribe).and_then(|p| encode(&p, version)) {
            self.send(index, &bytes);
        }
    }

    /// A CONNECT is sent: its client may get a session.
    fn count_identity(&mut self, packet: &Packet) {
        if let Packet::Connect(c) = packet {
            if c.client_id.is_empty() {
                self.anonymous += 1;
            } else {
                self.identities.insert(c.client_id.clone());
            }
        }
    }

    fn send(&mut self, index: usize, bytes: &[u8]) {
        self.sent_bytes += bytes.len();
        self.slots[index].queue(bytes);
    }

    fn play(&mut self, op: &Op, slots_in_use: usize) {
        let slot_of = |slot: &u8| usize::from(*slot) % slots_in_use;
        match op {
            Op::Connect { slot, connect, manner } => self.connect(slot_of(slot), connect, *manner),
            Op::Send { slot, packet, damage: how } => {
                let index = slot_of(slot);
                if !self.reconnect(index) {
                    return;
                }
                let version = self.slots[index].version;
                let Some(packet) = build_packet(packet) else { return };
                let Some(bytes) = encode(&packet, version) else { return };
                if matches!(packet, Packet::Connect(_)) {
                    // Refused on a connected socket, but it may be the first packet of one
                    // whose own CONNECT did not encode.
                    if matches!(how, Damage::Intact) {
                        self.count_identity(&packet);
                    } else {
                        self.strangers += 1;
                    }
                }
                self.send(index, &damage(bytes, how));
            }
            Op::Burst { slot, topic, vary, qos: q, retain, count, size } => {
                let index = slot_of(slot);
                if !self.reconnect(index) {
                    return;
                }
                let version = self.slots[index].version;
                let text = topic.text();
                for i in 0..*count {
                    if self.slots[index].stream.is_none() {
                        return;
                    }
                    let q = qos(*q);
                    let name = if *vary { format!("{text}/{i}") } else { text.clone() };
                    let Some(name) = topic_name(name) else { return };
                    let packet = Packet::Publish(Publish {
                        dup: false,
                        qos: q,
                        retain: *retain,
                        topic: name,
                        packet_id: (q != QoS::AtMostOnce).then(|| self.slots[index].next_packet_id()),
                        properties: Properties::new(),
                        payload: Bytes::from(vec![b'p'; *size]),
                    });
                    let Some(bytes) = encode(&packet, version) else { return };
                    self.send(index, &bytes);
                    if i % 8 == 7 {
                        self.pump();
                    }
                    if self.slots[index].unsent.len() >= MAX_UNSENT / 2 {
                        // The broker holds this publisher back: give it a moment, then go on.
                        self.pump_for(Duration::from_millis(50));
                        if self.slots[index].unsent.len() >= MAX_UNSENT / 2 {
                            return;
                        }
                    }
                }
            }
            Op::SubscribeMany { slot, count, qos: q, shared } => {
                let index = slot_of(slot);
                if !self.reconnect(index) {
                    return;
                }
                let version = self.slots[index].version;
                let filters = (0..*count)
                    .filter_map(|i| {
                        let text = if *shared { format!("$share/m/m/{i}") } else { format!("m/{i}") };
                        let options = SubscriptionOptions {
                            qos: qos(*q),
                            no_local: false,
                            retain_as_published: false,
                            retain_handling: 0,
                        };
                        Some((TopicFilter::new(Bytes::from(text)).ok()?, options))
                    })
                    .collect();
                let packet_id = self.slots[index].next_packet_id();
                let packet =
                    Packet::Subscribe(Subscribe { packet_id, properties: Properties::new(), filters });
                if let Some(bytes) = encode(&packet, version) {
                    self.send(index, &bytes);
                }
            }
            Op::Garbage { slot, bytes } => {
                let index = slot_of(slot);
                if self.slots[index].stream.is_none() {
                    let addr = self.addr;
                    if !self.slots[index].open(addr) {
                        return;
                    }
                    self.strangers += 1;
                }
                self.slots[index].expect = None;
                self.send(index, bytes);
            }
            Op::Manner { slot, manner } => self.slots[slot_of(slot)].manner = *manner,
            Op::Close { slot } => self.slots[slot_of(slot)].close(),
            Op::Sleep { ms } => self.pump_for(Duration::from_millis(u64::from(*ms))),
        }
    }

    /// Keeps every client as it is, playing `load` meanwhile, until each shard measured its
    /// gauges twice more.
    fn hold(&mut self, load: &[Op], slots_in_use: usize) -> Result<(), String> {
        let from = self.accounting().ticks;
        let deadline = Instant::now() + CHECK_WAIT;
        while self.accounting().ticks < from + 2 {
            if Instant::now() > deadline {
                return Err(format!(
                    "the gauges were not refreshed within {CHECK_WAIT:?} (ticks stayed at {}): a shard stopped ticking",
                    self.accounting().ticks
                ));
            }
            for op in load {
                self.play(op, slots_in_use);
            }
            self.pump();
            std::thread::sleep(Duration::from_millis(10));
        }
        self.pump();
        Ok(())
    }

    /// Every connection ends once its client closed its socket.
    fn all_closed(&self) -> Result<(), String> {
        let deadline = Instant::now() + CHECK_WAIT;
        loop {
            let open = self.accounting().connections;
            if open == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{open} connections still open {CHECK_WAIT:?} after every client closed its socket"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(&mut self) -> Result<(), String> {
        for slot in &mut self.slots {
            slot.close();
        }
        let Some(broker) = self.broker.take() else { return Ok(()) };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            broker.stop();
            let _ = tx.send(());
        });
        let stopped = rx.recv_timeout(CHECK_WAIT * 2).is_ok();
        if stopped {
            let _ = std::fs::remove_dir_all(&self.dir);
            Ok(())
        } else {
            Err(format!(
                "the broker did not stop within {:?} (its data stays in {})",
                CHECK_WAIT * 2,
                self.dir.display()
            ))
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The first bound `a` breaks, if any.
fn out_of_bounds(a: &Accounting, clients: usize) -> Option<String> {
    let outbox_bound = WRITE_BUFFER + MAX_PACKET_SIZE;
    let subscription_bound = MAX_SUBSCRIPTIONS.min(clients * MAX_SUBSCRIPTIONS_PER_CLIENT);
    if a.largest_queue_bytes > MAX_QUEUED_BYTES {
        Some(format!(
            "a session queue holds {} bytes > max_queued_bytes {MAX_QUEUED_BYTES}",
            a.largest_queue_bytes
        ))
    } else if a.largest_outbox_bytes > outbox_bound {
        Some(format!(
            "an outbox holds {} bytes > write_buffer + max_packet_size {outbox_bound}",
            a.largest_outbox_bytes
        ))
    } else if a.retained_bytes > MAX_RETAINED_BYTES {
        Some(format!("{} retained bytes > max_retained_bytes {MAX_RETAINED_BYTES}", a.retained_bytes))
    } else if a.retained_messages > MAX_RETAINED_MESSAGES {
        Some(format!(
            "{} retained messages > max_retained_messages {MAX_RETAINED_MESSAGES}",
            a.retained_messages
        ))
    } else if a.subscriptions > subscription_bound {
        Some(format!(
            "{} subscriptions > min(max_subscriptions, {clients} clients × {MAX_SUBSCRIPTIONS_PER_CLIENT}) = {subscription_bound}",
            a.subscriptions
        ))
    } else if a.sessions > clients {
        Some(format!("{} sessions, but only {clients} clients connected", a.sessions))
    } else {
        None
    }
}

// ------------------------------------------------------------------ liveness probes

/// A blocking probe client.
struct Probe {
    stream: TcpStream,
    version: ProtocolVersion,
    buf: BytesMut,
}

impl Probe {
    fn connect(addr: SocketAddr, version: ProtocolVersion, id: &str) -> Result<Probe, String> {
        let stream = TcpStream::connect_timeout(&addr, CHECK_WAIT).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(CHECK_WAIT)).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut probe = Probe { stream, version, buf: BytesMut::new() };
        probe.send(&Packet::Connect(Connect {
            protocol: version,
            clean_start: true,
            keep_alive: 0,
            client_id: id.to_string(),
            will: None,
            username: None,
            password: None,
            properties: Properties::new(),
        }))?;
        match probe.recv()? {
            Packet::ConnAck(ack) if ack.reason == ReasonCode::Success => Ok(probe),
            other => Err(format!("expected a successful CONNACK, got {other:?}")),
        }
    }

    fn send(&mut self, packet: &Packet) -> Result<(), String> {
        let bytes = encode(packet, self.version).ok_or("probe packet does not encode")?;
        self.stream.write_all(&bytes).map_err(|e| format!("write: {e}"))
    }

    fn recv(&mut self) -> Result<Packet, String> {
        let mut scratch = [0u8; 4096];
        loop {
            match codec::decode(&mut self.buf, self.version, usize::MAX) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => {}
                Err(e) => return Err(format!("undecodable answer: {e}")),
            }
            match self.stream.read(&mut scratch) {
                Ok(0) => return Err("the broker closed the connection".into()),
                Ok(n) => self.buf.extend_from_slice(&scratch[..n]),
                Err(e) => return Err(format!("no answer in time: {e}")),
            }
        }
    }

    fn subscribe(&mut self, filter: &str) -> Result<(), String> {
        self.subscribe_with(filter, QoS::AtLeastOnce)
    }

    fn subscribe_with(&mut self, filter: &str, qos: QoS) -> Result<(), String> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: packet_id(1),
            properties: Properties::new(),
            filters: vec![(
                TopicFilter::new(Bytes::from(filter.to_string())).map_err(|e| format!("{e:?}"))?,
                SubscriptionOptions { qos, no_local: false, retain_as_published: false, retain_handling: 0 },
            )],
        }))?;
        let granted = match qos {
            QoS::AtMostOnce => ReasonCode::GRANTED_QOS0,
            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
        };
        match self.recv()? {
            Packet::SubAck(ack) if ack.reasons == [granted] => Ok(()),
            other => Err(format!("expected SUBACK granting {qos:?}, got {other:?}")),
        }
    }

    fn publish(&mut self, topic: &str, id: u16, payload: &str) -> Result<(), String> {
        self.publish_with(topic, id, payload.as_bytes().to_vec(), false)
    }

    fn publish_with(&mut self, topic: &str, id: u16, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain,
            topic: TopicName::new(Bytes::from(topic.to_string())).map_err(|e| format!("{e:?}"))?,
            packet_id: Some(packet_id(id)),
            properties: Properties::new(),
            payload: Bytes::from(payload),
        }))
    }

    /// Reads until `wanted` payloads arrived (acknowledging them) and `acks` PUBACKs.
    fn expect(&mut self, mut wanted: Vec<String>, mut acks: usize) -> Result<(), String> {
        while !wanted.is_empty() || acks > 0 {
            match self.recv().map_err(|e| format!("{e}; still waiting for {wanted:?} and {acks} PUBACKs"))? {
                Packet::Publish(p) => {
                    if let Some(id) = p.packet_id {
                        self.send(&Packet::PubAck(ack(id)))?;
                    }
                    let text = String::from_utf8_lossy(&p.payload).to_string();
                    wanted.retain(|w| *w != text);
                }
                Packet::PubAck(_) => acks = acks.saturating_sub(1),
                other => return Err(format!("unexpected {other:?}")),
            }
        }
        Ok(())
    }
}

/// The retained messages a fresh subscriber to `#` receives: how many, and a lower bound
/// of the bytes the store counts for them (topic, payload and the per-message overhead;
/// their properties come on top). The store's own gauges (`retained_messages`,
/// `retained_bytes`) may not be kept yet: this checks the bounds from outside. It counts
/// what arrives, a lower bound of what is stored: a retained page larger than the new
/// subscription's room loses messages (see
/// `a_new_subscription_gets_every_retained_message`), and a page that waits for room may
/// come after the census stopped listening.
fn retained_census(addr: SocketAddr) -> Result<(usize, usize), String> {
    let mut census = Probe::connect(addr, ProtocolVersion::V5, &client_id_on(1, "fz-census"))?;
    census.send(&Packet::Subscribe(Subscribe {
        packet_id: packet_id(1),
        properties: Properties::new(),
        filters: vec![(
            TopicFilter::new(Bytes::from_static(b"#")).map_err(|e| format!("{e:?}"))?,
            SubscriptionOptions {
                qos: QoS::AtMostOnce,
                no_local: false,
                retain_as_published: true,
                retain_handling: 0,
            },
        )],
    }))?;
    census.stream.set_read_timeout(Some(CENSUS_QUIET)).map_err(|e| e.to_string())?;
    let (mut count, mut bytes, mut topics) = (0, 0, BTreeSet::new());
    let deadline = Instant::now() + CHECK_WAIT;
    while Instant::now() < deadline {
        match census.recv() {
            Ok(Packet::Publish(p)) if p.retain => {
                // A retained message is sent once per subscription: count topics, not copies.
                if topics.insert(p.topic.as_str().to_string()) {
                    count += 1;
                    bytes += p.topic.len() + p.payload.len() + ringmq::broker::message::MESSAGE_OVERHEAD;
                }
            }
            Ok(_) => {}
            // Quiet for CENSUS_QUIET: every retained message has been sent.
            Err(_) => return Ok((count, bytes)),
        }
    }
    Err(format!("retained messages still arriving {CHECK_WAIT:?} after subscribing to #"))
}

/// Both shards serve: a client owned by each connects, subscribes, and receives its own
/// PUBLISH and the other's.
fn probe_shards(addr: SocketAddr) -> Result<(), String> {
    let ids = [client_id_on(0, "fz-probe"), client_id_on(1, "fz-probe")];
    let topics = ["probe/0".to_string(), "probe/1".to_string()];
    let versions = [ProtocolVersion::V5, ProtocolVersion::V311];
    let mut probes = Vec::new();
    for shard in 0..2 {
        let mut probe = Probe::connect(addr, versions[shard], &ids[shard])
            .map_err(|e| format!("shard {shard}: a probe client could not connect: {e}"))?;
        probe.subscribe(&topics[shard]).map_err(|e| format!("shard {shard}: SUBSCRIBE: {e}"))?;
        probes.push(probe);
    }
    for (shard, probe) in probes.iter_mut().enumerate() {
        probe.publish(&topics[shard], 1, &format!("own {shard}"))?;
        probe.publish(&topics[1 - shard], 2, &format!("other {shard}"))?;
    }
    for (shard, probe) in probes.iter_mut().enumerate() {
        probe
            .expect(vec![format!("own {shard}"), format!("other {}", 1 - shard)], 2)
            .map_err(|e| format!("shard {shard}: {e}"))?;
    }
    Ok(())
}

// ------------------------------------------------------------------ the property

/// Plays one case and checks it; returns the largest gauges seen.
fn run_case(case: &Case) -> Result<Accounting, TestCaseError> {
    watch_broker_panics();
    let panic_mark = broker_panics().lock().map(|p| p.len()).unwrap_or(0);
    let mut run = Run::start(&case.setup)?;
    let slots_in_use = case.clients.len().clamp(1, SLOTS);
    for (index, client) in case.clients.iter().enumerate().take(slots_in_use) {
        run.slots[index].subscriptions = client.subscriptions.clone();
        run.connect(index, &client.connect, client.manner);
    }
    run.pump();
    for op in &case.ops {
        run.play(op, slots_in_use);
        // Time for the broker to act on it before the next one.
        run.pump_for(OP_PAUSE);
    }
    let played = run.started.elapsed();
    for (index, client) in case.clients.iter().enumerate().take(slots_in_use) {
        if client.revive {
            run.reconnect(index);
        }
    }
    let held = run.hold(&case.load, slots_in_use);
    let at_hold = run.accounting();
    for slot in &mut run.slots {
        slot.close();
    }
    let closed = run.all_closed();
    let alive = probe_shards(run.addr);
    let census = retained_census(run.addr);
    let panics = panics_since(panic_mark);
    let stopped = run.stop();
    if std::env::var_os("RINGMQ_FUZZ_VERBOSE").is_some() {
        eprintln!(
            "fuzz case: {} ops on {slots_in_use} clients ({} reconnects), {} bytes sent, played in {played:?}, {:?} in all; \
             worst {:?}; at hold {at_hold:?}; retained (messages, bytes at least) {census:?}",
            case.ops.len(),
            run.reconnects,
            run.sent_bytes,
            run.started.elapsed(),
            run.worst,
        );
    }
    let mut failures = Vec::new();
    if !panics.is_empty() {
        failures.push(format!("broker threads panicked: {panics:#?}"));
    }
    if let Err(e) = alive {
        failures.push(format!("the broker stopped serving: {e}"));
    }
    match census {
        Ok((count, bytes)) if count > MAX_RETAINED_MESSAGES || bytes > MAX_RETAINED_BYTES => {
            failures.push(format!(
            "bound exceeded: a subscriber to # received {count} retained messages of at least {bytes} bytes \
             (max_retained_messages {MAX_RETAINED_MESSAGES}, max_retained_bytes {MAX_RETAINED_BYTES})"
        ))
        }
        Ok(_) => {}
        Err(e) => failures.push(format!("the retained census failed: {e}")),
    }
    if let Err(e) = held {
        failures.push(e);
    }
    if let Err(e) = closed {
        failures.push(e);
    }
    if let Some(v) = &run.violation {
        failures.push(format!("bound exceeded: {v}"));
    }
    if !run.problems.is_empty() {
        failures.push(format!("protocol violations: {:#?}", run.problems));
    }
    if let Err(e) = stopped {
        failures.push(e);
    }
    if failures.is_empty() {
        Ok(run.worst)
    } else {
        Err(TestCaseError::fail(failures.join("\n")))
    }
}

fn fuzz_config() -> ProptestConfig {
    let cases = std::env::var("RINGMQ_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(DEFAULT_CASES);
    let mut config = ProptestConfig::with_cases(cases);
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 24;
    }
    config
}

proptest! {
    #![proptest_config(fuzz_config())]

    #[test]
    fn hostile_clients_neither_crash_the_broker_nor_break_its_bounds(case in arb_case()) {
        run_case(&case)?;
    }
}

/// The harness is not vacuous: a subscriber that stops acknowledging and one that stops
/// reading, fed by a publisher that keeps publishing, fill a session queue and an outbox to
/// their bounds while the gauges are measured; more retained topics and bytes are published
/// than the store keeps.
#[test]
fn the_harness_fills_queues_and_outboxes_to_their_bounds() {
    let connect = |id: u8| ConnectSpec {
        id,
        version: 2,
        clean: false,
        keep_alive: 0,
        will: None,
        session_expiry: Some(3600),
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_maximum: None,
        request_problem: None,
        request_response: None,
        user: false,
        auth_method: false,
        login: 0,
    };
    let everything = FilterSpec { share: 0, levels: vec![], hash: true };
    let client = |id, manner, qos| Client {
        connect: connect(id),
        manner,
        subscriptions: if qos < 3 { vec![(everything.clone(), qos)] } else { vec![] },
        revive: true,
    };
    let burst = |count, size| Op::Burst {
        slot: 2,
        topic: TopicSpec(vec![0]),
        vary: false,
        qos: 1,
        retain: false,
        count,
        size,
    };
    let case = Case {
        setup: Setup { fsync: 0, policy: 0, queue_qos0: false },
        clients: vec![
            client(0, Manner { reading: true, acking: false }, 1),
            client(1, Manner { reading: false, acking: false }, 0),
            client(2, Manner { reading: true, acking: true }, 3),
        ],
        ops: vec![
            Op::Sleep { ms: 50 },
            burst(100, 4000),
            // More retained topics than the store keeps (in fewer bytes than it may keep).
            Op::Burst {
                slot: 2,
                topic: TopicSpec(vec![1]),
                vary: true,
                qos: 1,
                retain: true,
                count: 300,
                size: 300,
            },
        ],
        load: vec![burst(5, 16000)],
    };
    let worst = run_case(&case).unwrap_or_else(|e| panic!("{e}"));
    assert!(worst.largest_queue_bytes > MAX_QUEUED_BYTES / 2, "{worst:?}");
    assert!(worst.largest_outbox_bytes > WRITE_BUFFER / 2, "{worst:?}");
}

// ------------------------------------------------------------------ problems found

/// Publishes `count` retained QoS 1 messages of `size` bytes to `b/1`, `b/2`, ..., each
/// acknowledged before the next.
fn publish_retained(addr: SocketAddr, count: u16, size: usize) {
    let mut publisher = Probe::connect(addr, ProtocolVersion::V5, "fz-retainer").unwrap();
    for i in 1..=count {
        publisher.publish_with(&format!("b/{i}"), i, vec![b'r'; size], true).unwrap();
        match publisher.recv().unwrap() {
            Packet::PubAck(_) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

/// Of the topics `b/1` ... `b/{count}`, those with a retained message, each asked by a
/// subscription of its own (so that no page of retained messages is larger than one
/// message): their count, and the bytes the store holds for them (topic, payload and
/// per-message overhead).
fn retained_one_by_one(addr: SocketAddr, count: u16) -> (usize, usize) {
    let mut topics = BTreeSet::new();
    let mut bytes = 0;
    let all: Vec<u16> = (1..=count).collect();
    // Within --max-subscriptions-per-client.
    for (n, chunk) in all.chunks(MAX_SUBSCRIPTIONS_PER_CLIENT - 5).enumerate() {
        let mut client = Probe::connect(addr, ProtocolVersion::V5, &format!("fz-one-by-one-{n}")).unwrap();
        let options = SubscriptionOptions {
            qos: QoS::AtMostOnce,
            no_local: false,
            retain_as_published: true,
            retain_handling: 0,
        };
        let filters = chunk
            .iter()
            .map(|i| (TopicFilter::new(Bytes::from(format!("b/{i}"))).unwrap(), options))
            .collect();
        client
            .send(&Packet::Subscribe(Subscribe {
                packet_id: packet_id(1),
                properties: Properties::new(),
                filters,
            }))
            .unwrap();
        client.stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        while let Ok(packet) = client.recv() {
            if let Packet::Publish(p) = packet {
                if p.retain && topics.insert(p.topic.as_str().to_string()) {
                    bytes += p.topic.len() + p.payload.len() + ringmq::broker::message::MESSAGE_OVERHEAD;
                }
            }
        }
    }
    (topics.len(), bytes)
}

fn small_broker() -> Broker {
    let mut config = config(&Setup { fsync: 0, policy: 0, queue_qos0: false }, std::path::Path::new("."));
    config.data_dir = None;
    ringmq::start(config, Shutdown::new()).expect("broker starts")
}

/// Found by the fuzz test (fixed: a page is delivered only while the session has room,
/// the rest goes on later): a new subscription's retained messages come in pages
/// of `RETAINED_PAGE` (128) per shard, and a page is delivered whole once the session has
/// room for more (`Shard::continue_retained` checks `Session::has_room` before a page, not
/// during it). What does not fit is lost: a QoS 0 delivery to a full outbox is dropped, a
/// QoS 1/2 delivery past `--max-queued-messages` is dropped by the queue's policy. Here a
/// subscriber to `#` that reads as fast as it can gets 88 of the 150 retained messages of
/// 1500 bytes (64 KiB write buffer), although MQTT-3.3.1-9 says every one is sent.
#[test]
fn a_new_subscription_gets_every_retained_message() {
    let broker = small_broker();
    let addr = broker.local_addr();
    // 150 topics: about 75 a shard, under the 100 each may keep; 240 KiB held, under the
    // 256 KiB the store may hold.
    publish_retained(addr, 150, 1500);
    let stored = retained_one_by_one(addr, 150).0;
    let mut census = Probe::connect(addr, ProtocolVersion::V5, "fz-everything").unwrap();
    census.subscribe_with("#", QoS::AtMostOnce).unwrap();
    census.stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut received = 0;
    while let Ok(packet) = census.recv() {
        if matches!(packet, Packet::Publish(p) if p.retain) {
            received += 1;
        }
    }
    broker.stop();
    assert_eq!(stored, 150, "every retained message is stored");
    assert_eq!(received, stored, "a subscriber to # receives every retained message");
}

/// Found by the fuzz test (fixed by `RetainedBudget`): `--max-retained-bytes` was not
/// enforced: 150
/// retained messages of 4000 bytes are all kept, about 610 KB against a bound of 256 KiB.
#[test]
fn max_retained_bytes_bounds_the_retained_store() {
    let broker = small_broker();
    let addr = broker.local_addr();
    publish_retained(addr, 150, 4000);
    let (stored, bytes) = retained_one_by_one(addr, 150);
    let counted = broker.accounting().retained_bytes;
    broker.stop();
    assert!(
        bytes <= MAX_RETAINED_BYTES,
        "{stored} retained messages hold at least {bytes} bytes > max_retained_bytes {MAX_RETAINED_BYTES} \
         (the broker counts {counted})"
    );
}
