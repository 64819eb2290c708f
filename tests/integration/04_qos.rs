//! QoS 1 and 2 delivery: grants, downgrades, overlapping subscriptions, exactly-once
//! inbound, redelivery with DUP, the in-flight window, the session queue bound and order
//! across a dropped connection (MQTT 3.1.1 §4.3–4.6, MQTT 5.0 §4.3–4.9).
//!
//! Also holds `helpers`, the raw-socket harness the 05–07 files share.

use std::time::{Duration, Instant};

use ringmq::codec::{Packet, ProtocolVersion, QoS, ReasonCode};

use self::helpers::Peer;
use crate::common::{client_id_on, TestBroker, V4Client, V5Client, WAIT};

/// Raw clients and the broker settings these tests change, shared by 04–07.
pub(crate) mod helpers {
    #![allow(dead_code)]

    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::num::NonZeroU16;

    use bytes::Bytes;
    use ringmq::codec::{
        ConnAck, Connect, Disconnect, Packet, PacketId, Properties, Property, ProtocolVersion, PubAck,
        Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions, Will,
    };
    use ringmq::topic::{TopicFilter, TopicName};

    use crate::common::RawClient;

    /// Every `Config` field these tests set, in one place: if a field is renamed when the
    /// session work lands, only this module changes.
    pub mod config {
        use ringmq::Config;

        /// QoS 1/2 messages in flight to one client.
        pub fn inflight(n: usize) -> impl FnOnce(&mut Config) {
            move |c| c.max_inflight = n
        }

        /// A window of `inflight` and at most `queued` messages queued behind it.
        pub fn window_and_queue(inflight: usize, queued: usize) -> impl FnOnce(&mut Config) {
            move |c| {
                c.max_inflight = inflight;
                c.max_queued_messages = queued;
            }
        }

        /// A queue deep enough that nothing is dropped while a subscriber reconnects.
        pub fn deep_queue(c: &mut Config) {
            c.max_queued_messages = 100_000;
            c.max_queued_bytes = 64 * 1024 * 1024;
        }

        /// Retained topics stored, all shards together.
        pub fn retained_max(n: usize) -> impl FnOnce(&mut Config) {
            move |c| c.max_retained_messages = n
        }
    }

    pub fn pid(id: u16) -> PacketId {
        NonZeroU16::new(id).expect("non-zero packet id")
    }

    pub fn opts(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions { qos, no_local: false, retain_as_published: false, retain_handling: 0 }
    }

    pub fn topic(name: &str) -> TopicName {
        TopicName::new(name.to_string()).expect("valid topic name")
    }

    /// A topic `{prefix}/{i}` whose retained message shard `shard` of a 2-shard broker
    /// stores (topics are placed by the same hash as client identifiers). Retained tests
    /// publish from a client on that shard, so the store is updated before the PUBACK,
    /// and use markers on the same shard, so they follow what they vouch for.
    pub fn topic_on(shard: usize, prefix: &str) -> String {
        (0..)
            .map(|i| format!("{prefix}/{i}"))
            .find(|t| ringmq::broker::placement::owner(t, 2) == shard)
            .unwrap()
    }

    /// CONNECT with keep-alive 0 (no pings needed), no will, no properties.
    pub fn connect_packet(version: ProtocolVersion, client_id: &str, clean: bool) -> Connect {
        Connect {
            protocol: version,
            clean_start: clean,
            keep_alive: 0,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }
    }

    pub fn will(topic_name: &str, payload: &str, qos: QoS, retain: bool) -> Will {
        Will {
            topic: topic(topic_name),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos,
            retain,
            properties: Properties::default(),
        }
    }

    pub fn properties(list: Vec<Property>) -> Properties {
        Properties(list)
    }

    /// A raw connection with a little client state: packets that arrived while waiting
    /// for something else, and the next packet identifier.
    pub struct Peer {
        pub raw: RawClient,
        pending: VecDeque<Packet>,
        next_id: u16,
    }

    impl Peer {
        /// Connects and returns the CONNACK, whatever its reason code.
        pub fn try_connect(addr: SocketAddr, connect: Connect) -> (Peer, ConnAck) {
            let mut raw = RawClient::connect(addr, connect.protocol);
            raw.send(&Packet::Connect(connect));
            let ack = match raw.recv() {
                Some(Packet::ConnAck(ack)) => ack,
                other => panic!("expected CONNACK, got {other:?}"),
            };
            (Peer { raw, pending: VecDeque::new(), next_id: 0 }, ack)
        }

        /// Connects, asserts success, returns the peer and `session_present`.
        pub fn connect_with(addr: SocketAddr, connect: Connect) -> (Peer, bool) {
            let (peer, ack) = Self::try_connect(addr, connect);
            assert_eq!(ack.reason, ReasonCode::Success, "CONNACK {ack:?}");
            (peer, ack.session_present)
        }

        /// A clean 3.1.1 connection.
        pub fn v3(addr: SocketAddr, client_id: &str) -> Peer {
            Self::connect_with(addr, connect_packet(ProtocolVersion::V311, client_id, true)).0
        }

        /// A clean 5.0 connection.
        pub fn v5(addr: SocketAddr, client_id: &str) -> Peer {
            Self::connect_with(addr, connect_packet(ProtocolVersion::V5, client_id, true)).0
        }

        pub fn next_packet_id(&mut self) -> PacketId {
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            pid(self.next_id)
        }

        pub fn send(&mut self, packet: &Packet) {
            self.raw.send(packet);
        }

        /// The next packet (buffered ones first), or `None` once the server closed.
        pub fn recv(&mut self) -> Option<Packet> {
            self.pending.pop_front().or_else(|| self.raw.recv())
        }

        pub fn expect(&mut self) -> Packet {
            self.recv().expect("connection open")
        }

        /// Receives until `pick` accepts a packet; the others are kept for later `recv`s.
        pub fn wait_for<T>(&mut self, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
            let mut skipped = Vec::new();
            // Buffered packets first, then the socket.
            let mut buffered = std::mem::take(&mut self.pending);
            let found = loop {
                let packet = match buffered.pop_front() {
                    Some(p) => p,
                    None => self.raw.recv().expect("connection closed while waiting"),
                };
                if let Some(found) = pick(&packet) {
                    break found;
                }
                skipped.push(packet);
            };
            skipped.extend(buffered);
            self.pending = skipped.into();
            found
        }

        /// SUBSCRIBE with these filters; returns the SUBACK's reason codes.
        pub fn subscribe_with(
            &mut self,
            filters: &[(&str, SubscriptionOptions)],
            properties: Properties,
        ) -> Vec<ReasonCode> {
            let id = self.next_packet_id();
            let filters = filters
                .iter()
                .map(|(f, o)| (TopicFilter::new(f.to_string()).expect("valid filter"), *o))
                .collect();
            self.send(&Packet::Subscribe(Subscribe { packet_id: id, properties, filters }));
            self.wait_for(|p| match p {
                Packet::SubAck(ack) if ack.packet_id == id => Some(ack.reasons.clone()),
                _ => None,
            })
        }

        pub fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<ReasonCode> {
            self.subscribe_with(&[(filter, opts(qos))], Properties::default())
        }

        /// Subscribes and asserts the grant equals the request.
        pub fn subscribe_granted(&mut self, filter: &str, qos: QoS) {
            let reasons = self.subscribe(filter, qos);
            assert_eq!(reasons, vec![granted(qos)], "SUBACK for {filter} at {qos:?}");
        }

        pub fn publish_packet(
            topic_name: &str,
            payload: &[u8],
            qos: QoS,
            retain: bool,
            id: Option<PacketId>,
        ) -> Publish {
            Publish {
                dup: false,
                qos,
                retain,
                topic: topic(topic_name),
                packet_id: id,
                properties: Properties::default(),
                payload: Bytes::copy_from_slice(payload),
            }
        }

        /// Publishes and completes the handshake for its QoS; returns the reason code of
        /// the PUBACK / PUBREC (`Success` for QoS 0 and for v3).
        pub fn publish(
            &mut self,
            topic_name: &str,
            payload: impl AsRef<[u8]>,
            qos: QoS,
            retain: bool,
        ) -> ReasonCode {
            let id = (qos != QoS::AtMostOnce).then(|| self.next_packet_id());
            self.send(&Packet::Publish(Self::publish_packet(topic_name, payload.as_ref(), qos, retain, id)));
            match qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => self.wait_for(|p| match p {
                    Packet::PubAck(ack) if Some(ack.packet_id) == id => Some(ack.reason),
                    _ => None,
                }),
                QoS::ExactlyOnce => {
                    let reason = self.wait_for(|p| match p {
                        Packet::PubRec(ack) if Some(ack.packet_id) == id => Some(ack.reason),
                        _ => None,
                    });
                    if !reason.is_error() {
                        self.send(&Packet::PubRel(ack(id.unwrap())));
                        self.wait_for(|p| match p {
                            Packet::PubComp(ack) if Some(ack.packet_id) == id => Some(()),
                            _ => None,
                        });
                    }
                    reason
                }
            }
        }

        /// Sends `count` QoS 1 publishes with payloads "0".."count-1" back to back, then
        /// waits for all their PUBACKs: a publisher that is never blocked gets them all.
        pub fn publish_burst(&mut self, topic_name: &str, count: usize) {
            let mut ids = Vec::with_capacity(count);
            for i in 0..count {
                let id = self.next_packet_id();
                ids.push(id);
                let packet = Self::publish_packet(
                    topic_name,
                    i.to_string().as_bytes(),
                    QoS::AtLeastOnce,
                    false,
                    Some(id),
                );
                self.send(&Packet::Publish(packet));
            }
            for id in ids {
                self.wait_for(|p| match p {
                    Packet::PubAck(ack) if ack.packet_id == id => Some(()),
                    _ => None,
                });
            }
        }

        /// The next packet, which must be a PUBLISH.
        pub fn next_publish(&mut self) -> Publish {
            match self.expect() {
                Packet::Publish(p) => p,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }

        /// Acknowledges a received PUBLISH as its QoS requires (QoS 2: PUBREC, PUBREL, PUBCOMP).
        pub fn ack(&mut self, publish: &Publish) {
            match (publish.qos, publish.packet_id) {
                (QoS::AtMostOnce, _) => {}
                (QoS::AtLeastOnce, Some(id)) => self.send(&Packet::PubAck(ack(id))),
                (QoS::ExactlyOnce, Some(id)) => {
                    self.send(&Packet::PubRec(ack(id)));
                    self.wait_for(|p| match p {
                        Packet::PubRel(rel) if rel.packet_id == id => Some(()),
                        _ => None,
                    });
                    self.send(&Packet::PubComp(ack(id)));
                }
                _ => panic!("QoS > 0 without a packet id: {publish:?}"),
            }
        }

        /// PUBLISHes received (each acknowledged) until one on `marker`, which is returned last.
        pub fn until(&mut self, marker: &str) -> Vec<Publish> {
            let mut seen = Vec::new();
            loop {
                let p = self.next_publish();
                self.ack(&p);
                let done = p.topic.as_str() == marker;
                seen.push(p);
                if done {
                    return seen;
                }
            }
        }

        /// Waits for a PUBLISH on `marker`, asserting none other arrives before it.
        pub fn expect_marker_first(&mut self, marker: &str, what: &str) {
            let seen = self.until(marker);
            assert_eq!(seen.len(), 1, "{what}: expected only the marker, got {seen:?}");
        }

        /// PINGREQ, and every packet that arrives before the PINGRESP: the server writes
        /// in order, so an empty result proves nothing was queued to be sent before it.
        pub fn ping(&mut self) -> Vec<Packet> {
            assert!(self.pending.is_empty(), "ping with buffered packets: {:?}", self.pending);
            self.send(&Packet::PingReq);
            let mut before = Vec::new();
            loop {
                match self.raw.recv().expect("connection open") {
                    Packet::PingResp => return before,
                    other => before.push(other),
                }
            }
        }

        /// DISCONNECT (normal), then waits for the server to close the socket.
        pub fn disconnect(self) {
            self.disconnect_with(ReasonCode::Success, Properties::default());
        }

        pub fn disconnect_with(mut self, reason: ReasonCode, properties: Properties) -> Vec<Packet> {
            self.send(&Packet::Disconnect(Disconnect { reason, properties }));
            let mut rest: Vec<Packet> = self.pending.drain(..).collect();
            rest.extend(self.raw.recv_until_closed());
            rest
        }

        /// Waits for the server to close the connection; returns what it sent first.
        pub fn until_closed(mut self) -> Vec<Packet> {
            let mut rest: Vec<Packet> = self.pending.drain(..).collect();
            rest.extend(self.raw.recv_until_closed());
            rest
        }
    }

    pub fn ack(id: PacketId) -> PubAck {
        PubAck { packet_id: id, reason: ReasonCode::Success, properties: Properties::default() }
    }

    pub fn granted(qos: QoS) -> ReasonCode {
        match qos {
            QoS::AtMostOnce => ReasonCode::GRANTED_QOS0,
            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
        }
    }

    /// A QoS 0 subscriber on the subscriber's shard: when it has seen a message, that
    /// shard has routed the message to every local session, so a later check on the
    /// subscriber does not race the cross-shard channel.
    pub fn observer(addr: SocketAddr, shard: usize, filter: &str) -> Peer {
        let mut peer = Peer::v3(addr, &crate::common::client_id_on(shard, "observer"));
        peer.subscribe_granted(filter, QoS::AtMostOnce);
        peer
    }

    impl Peer {
        /// For observers: receives until a PUBLISH with `payload` arrives.
        pub fn saw(&mut self, payload: &str) {
            loop {
                let p = self.next_publish();
                if &p.payload[..] == payload.as_bytes() {
                    return;
                }
            }
        }
    }

    pub fn text(p: &Publish) -> String {
        String::from_utf8_lossy(&p.payload).into_owned()
    }
}

/// Subscribes and returns the SUBACK's return codes (the common helper discards them).
async fn subscribe_v4(
    client: &mut V4Client,
    filter: &str,
    qos: rumqttc::QoS,
) -> Vec<rumqttc::SubscribeReasonCode> {
    client.client.subscribe(filter, qos).await.unwrap();
    loop {
        if let rumqttc::Packet::SubAck(ack) = client.next().await {
            return ack.return_codes;
        }
    }
}

async fn subscribe_v5(
    client: &mut V5Client,
    filter: &str,
    qos: rumqttc::v5::mqttbytes::QoS,
) -> Vec<rumqttc::v5::mqttbytes::v5::SubscribeReasonCode> {
    client.client.subscribe(filter, qos).await.unwrap();
    loop {
        if let rumqttc::v5::mqttbytes::v5::Packet::SubAck(ack) = client.next().await {
            return ack.return_codes;
        }
    }
}

/// More messages than the default in-flight window (32): they only all arrive if the
/// subscriber's automatic acknowledgements free the window.
const ROUND_TRIP_MESSAGES: u32 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos2_round_trips_with_rumqttc_v4() {
    let broker = TestBroker::start();
    let mut sub = V4Client::connect(broker.addr, &client_id_on(0, "sub")).await;
    let mut publisher = V4Client::connect(broker.addr, &client_id_on(1, "pub")).await;
    for qos in [rumqttc::QoS::AtLeastOnce, rumqttc::QoS::ExactlyOnce] {
        let topic = format!("rt4/{}", qos as u8);
        assert_eq!(
            subscribe_v4(&mut sub, &topic, qos).await,
            vec![rumqttc::SubscribeReasonCode::Success(qos)],
            "granted as requested"
        );
        for i in 0..ROUND_TRIP_MESSAGES {
            publisher.client.publish(&topic, qos, false, i.to_be_bytes().to_vec()).await.unwrap();
        }
        for i in 0..ROUND_TRIP_MESSAGES {
            let p = sub.next_publish().await;
            assert_eq!(
                (p.topic.as_str(), p.qos, &p.payload[..]),
                (topic.as_str(), qos, &i.to_be_bytes()[..])
            );
            assert!(!p.dup);
            assert_ne!(p.pkid, 0);
        }
        // Every publish was acknowledged to the publisher (PUBACK, or PUBREC..PUBCOMP).
        let mut done = 0;
        while done < ROUND_TRIP_MESSAGES {
            match (qos, publisher.next().await) {
                (rumqttc::QoS::AtLeastOnce, rumqttc::Packet::PubAck(_))
                | (rumqttc::QoS::ExactlyOnce, rumqttc::Packet::PubComp(_)) => done += 1,
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos2_round_trips_with_rumqttc_v5() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, SubscribeReasonCode};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let broker = TestBroker::start();
    let (mut sub, _) = V5Client::connect(broker.addr, &client_id_on(1, "sub5")).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, &client_id_on(0, "pub5")).await;
    for qos in [Q5::AtLeastOnce, Q5::ExactlyOnce] {
        let topic = format!("rt5/{}", qos as u8);
        assert_eq!(subscribe_v5(&mut sub, &topic, qos).await, vec![SubscribeReasonCode::Success(qos)]);
        for i in 0..ROUND_TRIP_MESSAGES {
            publisher.client.publish(topic.clone(), qos, false, i.to_be_bytes().to_vec()).await.unwrap();
        }
        for i in 0..ROUND_TRIP_MESSAGES {
            let p = sub.next_publish().await;
            assert_eq!((&p.topic[..], p.qos, &p.payload[..]), (topic.as_bytes(), qos, &i.to_be_bytes()[..]));
            assert!(!p.dup);
            assert_ne!(p.pkid, 0);
        }
        let mut done = 0;
        while done < ROUND_TRIP_MESSAGES {
            match (qos, publisher.next().await) {
                (Q5::AtLeastOnce, P5::PubAck(_)) | (Q5::ExactlyOnce, P5::PubComp(_)) => done += 1,
                _ => {}
            }
        }
    }
}

#[test]
fn delivery_qos_is_the_lower_of_publish_and_subscription() {
    let broker = TestBroker::start();
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "sub"));
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "pub"));
    // (topic, subscription QoS, publish QoS, expected delivery QoS)
    let cases = [
        ("down/2to1", QoS::AtLeastOnce, QoS::ExactlyOnce, QoS::AtLeastOnce),
        ("down/1to0", QoS::AtMostOnce, QoS::AtLeastOnce, QoS::AtMostOnce),
        ("down/0on2", QoS::ExactlyOnce, QoS::AtMostOnce, QoS::AtMostOnce),
    ];
    for (topic, sub_qos, _, _) in cases {
        sub.subscribe_granted(topic, sub_qos);
    }
    for (topic, _, pub_qos, want) in cases {
        publisher.publish(topic, topic, pub_qos, false);
        let p = sub.next_publish();
        assert_eq!((p.topic.as_str(), p.qos), (topic, want), "{p:?}");
        assert_eq!(p.packet_id.is_some(), want != QoS::AtMostOnce, "a packet id exactly when QoS > 0");
        sub.ack(&p);
    }
}

#[test]
fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let broker = TestBroker::start();
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "sub"));
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "pub"));
    sub.subscribe_granted("a/#", QoS::AtMostOnce);
    sub.subscribe_granted("a/b", QoS::ExactlyOnce);
    publisher.publish("a/b", "both", QoS::ExactlyOnce, false);
    publisher.publish("a/marker", "end", QoS::AtMostOnce, false);
    let seen = sub.until("a/marker");
    // [MQTT-3.3.5-1]: the maximum QoS of the matching subscriptions; and one copy only.
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!((seen[0].topic.as_str(), seen[0].qos), ("a/b", QoS::ExactlyOnce));
}

#[test]
fn resent_qos2_publish_before_pubrel_is_delivered_once() {
    let broker = TestBroker::start();
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "sub"));
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "pub"));
    // A QoS 0 subscription isolates the inbound side: what is under test is the broker's
    // receipt of a QoS 2 message (MQTT 3.1.1 §4.3.3, method B).
    sub.subscribe_granted("once/#", QoS::AtMostOnce);
    let id = helpers::pid(7);
    let mut packet = Peer::publish_packet("once/x", b"first", QoS::ExactlyOnce, false, Some(id));
    publisher.send(&Packet::Publish(packet.clone()));
    assert_eq!(publisher.expect(), Packet::PubRec(helpers::ack(id)));
    packet.dup = true;
    publisher.send(&Packet::Publish(packet.clone()));
    assert_eq!(publisher.expect(), Packet::PubRec(helpers::ack(id)), "PUBREC again for the resent PUBLISH");
    publisher.send(&Packet::PubRel(helpers::ack(id)));
    assert_eq!(publisher.expect(), Packet::PubComp(helpers::ack(id)));
    // After PUBCOMP the identifier is free: a new message with id 7 is a new message.
    let again = Peer::publish_packet("once/x", b"second", QoS::ExactlyOnce, false, Some(id));
    publisher.send(&Packet::Publish(again));
    assert_eq!(publisher.expect(), Packet::PubRec(helpers::ack(id)));
    publisher.send(&Packet::PubRel(helpers::ack(id)));
    assert_eq!(publisher.expect(), Packet::PubComp(helpers::ack(id)));
    publisher.publish("once/marker", "end", QoS::AtMostOnce, false);
    let payloads: Vec<String> = sub.until("once/marker").iter().map(helpers::text).collect();
    assert_eq!(payloads, ["first", "second", "end"]);
}

#[test]
fn unacknowledged_qos1_is_redelivered_with_dup_on_reconnect() {
    let broker = TestBroker::start();
    let sub_id = client_id_on(0, "sub");
    let persistent = || helpers::connect_packet(ProtocolVersion::V311, &sub_id, false);
    let (mut sub, present) = Peer::connect_with(broker.addr, persistent());
    assert!(!present);
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "pub"));
    sub.subscribe_granted("redo/t", QoS::AtLeastOnce);
    publisher.publish("redo/t", "m", QoS::AtLeastOnce, false);
    let first = sub.next_publish();
    assert_eq!((first.qos, first.dup, &first.payload[..]), (QoS::AtLeastOnce, false, &b"m"[..]));
    let id = first.packet_id.expect("QoS 1 carries a packet id");
    // No PUBACK: leave, and come back to the same session.
    sub.disconnect();
    let (mut sub, present) = Peer::connect_with(broker.addr, persistent());
    assert!(present);
    // [MQTT-4.4.0-1]: re-sent with its original packet identifier, and DUP set [MQTT-3.3.1-1].
    let again = sub.next_publish();
    assert_eq!(
        (again.qos, again.dup, again.packet_id, &again.payload[..]),
        (QoS::AtLeastOnce, true, Some(id), &b"m"[..])
    );
    sub.ack(&again);
    publisher.publish("redo/t", "marker", QoS::AtLeastOnce, false);
    let next = sub.next_publish();
    assert_eq!((&next.payload[..], next.dup), (&b"marker"[..], false), "acknowledged: not sent a third time");
}

// ---- Tests that change broker limits (see `helpers::config`) ----

#[test]
fn inflight_window_holds_back_unacknowledged_messages() {
    let broker = TestBroker::start_with(helpers::config::inflight(5));
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "sub"));
    sub.subscribe_granted("win/t", QoS::AtLeastOnce);
    let mut watch = helpers::observer(broker.addr, 0, "win/t");
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "pub"));
    publisher.publish_burst("win/t", 20);
    watch.saw("19");
    let first: Vec<_> = (0..5).map(|_| sub.next_publish()).collect();
    let payloads: Vec<String> = first.iter().map(helpers::text).collect();
    assert_eq!(payloads, ["0", "1", "2", "3", "4"]);
    assert!(first.iter().all(|p| p.qos == QoS::AtLeastOnce));
    assert_eq!(sub.ping(), vec![], "no sixth PUBLISH while five are unacknowledged");
    sub.ack(&first[0]);
    let more = sub.ping();
    assert!(
        matches!(more.as_slice(), [Packet::Publish(p)] if &p.payload[..] == b"5"),
        "one ack frees one slot: {more:?}"
    );
}

#[test]
fn full_queue_drops_the_oldest_and_never_blocks_the_publisher() {
    // The lossy policy, opted in (the default pauses the publisher instead).
    let broker = TestBroker::start_with(|c| {
        helpers::config::window_and_queue(1, 10)(c);
        c.queue_full_policy = ringmq::config::QueueFullPolicy::DropOldest;
    });
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "sub"));
    sub.subscribe_granted("full/t", QoS::AtLeastOnce);
    let mut watch = helpers::observer(broker.addr, 0, "full/t");
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "pub"));
    // All 100 PUBACKs arrive although the subscriber acknowledges nothing meanwhile.
    publisher.publish_burst("full/t", 100);
    watch.saw("99");
    let mut received = vec![sub.next_publish()];
    loop {
        sub.ack(received.last().unwrap());
        let next = sub.ping();
        match next.as_slice() {
            [] => break,
            [Packet::Publish(p)] => received.push(p.clone()),
            other => panic!("window of 1: {other:?}"),
        }
        assert!(received.len() <= 11, "more than 1 in flight + 10 queued");
    }
    let payloads: Vec<String> = received.iter().map(helpers::text).collect();
    let want: Vec<String> = std::iter::once(0).chain(90..100).map(|i| i.to_string()).collect();
    assert_eq!(payloads, want, "drop-oldest: the first in flight, then the last 10 published");
}

const ORDER_MESSAGES: u32 = 10_000;
const ORDER_DROP_AFTER: usize = 3_000;

enum SubEvent {
    ConnAck { session_present: bool },
    SubAck,
    Message(u32),
}

/// A persistent rumqttc subscriber whose event loop can be aborted. Acknowledgements are
/// manual and sent only after the message has been handed to the test, so every message
/// the broker considers delivered has been recorded.
fn persistent_subscriber(
    addr: std::net::SocketAddr,
    id: &str,
    subscribe: Option<&str>,
    events: tokio::sync::mpsc::UnboundedSender<SubEvent>,
) -> tokio::task::JoinHandle<()> {
    let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(false);
    options.set_manual_acks(true);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
    let filter = subscribe.map(str::to_string);
    tokio::spawn(async move {
        if let Some(filter) = filter {
            client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.unwrap();
        }
        while let Ok(event) = eventloop.poll().await {
            let rumqttc::Event::Incoming(packet) = event else { continue };
            let event = match &packet {
                rumqttc::Packet::ConnAck(ack) => SubEvent::ConnAck { session_present: ack.session_present },
                rumqttc::Packet::SubAck(_) => SubEvent::SubAck,
                rumqttc::Packet::Publish(p) => {
                    SubEvent::Message(u32::from_be_bytes(p.payload[..4].try_into().unwrap()))
                }
                _ => continue,
            };
            if events.send(event).is_err() {
                break;
            }
            if let rumqttc::Packet::Publish(p) = &packet {
                client.ack(p).await.unwrap();
            }
        }
    })
}

async fn next_event(rx: &mut tokio::sync::mpsc::UnboundedReceiver<SubEvent>) -> SubEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("event within the wait limit")
        .expect("subscriber alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_order_holds_across_a_dropped_persistent_subscriber() {
    let started = Instant::now();
    let broker = TestBroker::start_with(helpers::config::deep_queue);
    let sub_id = client_id_on(0, "order-sub");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = persistent_subscriber(broker.addr, &sub_id, Some("order/t"), tx.clone());
    assert!(matches!(next_event(&mut rx).await, SubEvent::ConnAck { session_present: false }));
    assert!(matches!(next_event(&mut rx).await, SubEvent::SubAck));

    let publisher = V4Client::connect(broker.addr, &client_id_on(1, "order-pub")).await;
    let publishing = tokio::spawn(async move {
        // The publisher's own in-flight window (rumqttc: 100) paces it.
        for i in 0..ORDER_MESSAGES {
            publisher
                .client
                .publish("order/t", rumqttc::QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
                .await
                .unwrap();
        }
        publisher
    });

    // Before the drop: exactly 0, 1, 2, ... with no duplicates.
    let mut received = Vec::new();
    while received.len() < ORDER_DROP_AFTER {
        match next_event(&mut rx).await {
            SubEvent::Message(i) => received.push(i),
            _ => panic!("unexpected event"),
        }
    }
    assert!(received.iter().copied().eq(0..ORDER_DROP_AFTER as u32), "in order before the drop");
    // The socket goes away without DISCONNECT.
    task.abort();
    let _ = task.await;
    // Messages the aborted loop recorded but had not yet been read.
    while let Ok(SubEvent::Message(i)) = rx.try_recv() {
        received.push(i);
    }

    let task = persistent_subscriber(broker.addr, &sub_id, None, tx);
    match next_event(&mut rx).await {
        SubEvent::ConnAck { session_present } => {
            assert!(session_present, "the session outlived its connection")
        }
        _ => panic!("expected CONNACK first"),
    }
    let mut next = 0u32;
    for &i in &received {
        assert!(i <= next, "gap before {i}");
        next = next.max(i + 1);
    }
    while next < ORDER_MESSAGES {
        let SubEvent::Message(i) = next_event(&mut rx).await else { panic!("unexpected event") };
        // At least once, and the first occurrences in publish order: a message may repeat
        // (redelivered with DUP), but none may appear before every earlier one has.
        assert!(i <= next, "message {i} arrived before {next} ever did");
        next = next.max(i + 1);
    }
    let _publisher = publishing.await.unwrap();
    task.abort();
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}

/// A subscriber that acknowledges every message, slowly: `n` payloads in arrival order.
fn slow_acking_subscriber(mut sub: Peer, n: usize) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        (0..n)
            .map(|i| {
                let p = sub.next_publish();
                if i % 50 == 0 {
                    // Slower than the publisher: the queue fills unless the publisher waits.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                sub.ack(&p);
                helpers::text(&p)
            })
            .collect()
    })
}

#[test]
fn backpressure_pauses_publishers_instead_of_dropping_for_an_acking_subscriber() {
    for (sub_shard, pub_shard) in [(0, 0), (0, 1)] {
        let broker = TestBroker::start_with(|c| {
            c.max_inflight = 4;
            c.max_queued_messages = 40;
            c.queue_full_policy = ringmq::config::QueueFullPolicy::Backpressure;
        });
        let mut sub = Peer::v3(broker.addr, &client_id_on(sub_shard, "slow"));
        sub.subscribe_granted("bp/t", QoS::AtLeastOnce);
        const N: usize = 1_000;
        let received = slow_acking_subscriber(sub, N);
        let mut publisher = Peer::v3(broker.addr, &client_id_on(pub_shard, "fast"));
        publisher.publish_burst("bp/t", N);
        let payloads = received.join().expect("subscriber thread");
        let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
        assert_eq!(payloads, want, "publisher on shard {pub_shard}, subscriber on {sub_shard}: none dropped");
    }
}

#[test]
fn a_slow_consumer_is_disconnected_and_its_publishers_released() {
    // Default policy (back-pressure); a short --slow-consumer-timeout.
    let broker = TestBroker::start_with(|c| {
        c.max_inflight = 2;
        c.max_queued_messages = 10;
        c.slow_consumer_timeout = std::time::Duration::from_secs(1);
    });
    let mut sub = Peer::v5(broker.addr, &client_id_on(0, "mute"));
    sub.subscribe_granted("mute/t", QoS::AtLeastOnce);
    let mut publisher = Peer::v3(broker.addr, &client_id_on(1, "talker"));
    // The subscriber never acknowledges: the publisher waits until the timeout makes the
    // subscriber pay, then all 200 PUBACKs arrive.
    publisher.publish_burst("mute/t", 200);
    // What the subscriber was sent, then DISCONNECT 0x97 Quota exceeded, then the end.
    let rest = sub.until_closed();
    let publishes = rest.iter().filter(|p| matches!(p, Packet::Publish(_))).count();
    assert_eq!(publishes, 2, "its window: {rest:?}");
    assert!(
        matches!(rest.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::QuotaExceeded),
        "last: {:?}",
        rest.last()
    );
}

#[test]
fn a_publisher_held_back_is_not_closed_for_keep_alive() {
    let broker = TestBroker::start_with(|c| {
        c.max_inflight = 1;
        c.max_queued_messages = 4;
        c.slow_consumer_timeout = std::time::Duration::from_secs(600);
    });
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "late-acker"));
    sub.subscribe_granted("held/t", QoS::AtLeastOnce);
    let addr = broker.addr;
    let publisher = std::thread::spawn(move || {
        // Keep-alive 1 s: silent for 1.5 s, a client is closed, unless the broker itself
        // stopped reading it. On the subscriber's core: a publisher on another core is not
        // held itself (the receiving core holds its messages).
        let mut connect = helpers::connect_packet(ProtocolVersion::V311, &client_id_on(0, "held"), true);
        connect.keep_alive = 1;
        let (mut publisher, _) = Peer::connect_with(addr, connect);
        publisher.publish_burst("held/t", 20);
    });
    // The subscriber holds the publisher back for longer than its keep-alive allows.
    let first = sub.next_publish();
    std::thread::sleep(Duration::from_secs(3));
    sub.ack(&first);
    for _ in 1..20 {
        let p = sub.next_publish();
        sub.ack(&p);
    }
    publisher.join().expect("every PUBACK arrives: the held publisher was not closed");
}

#[test]
fn a_held_publisher_goes_on_once_every_other_congested_queue_drained() {
    // One core. P is both a subscriber (congested by Q, never acknowledging) and a
    // publisher (to S, which congests, then drains). P waits for every congested queue
    // but its own: it must be woken when S drains, although P's own queue stays congested.
    let broker = TestBroker::start_with(|c| {
        c.max_inflight = 1;
        c.max_queued_messages = 4;
        c.slow_consumer_timeout = std::time::Duration::from_secs(600);
    });
    let addr = broker.addr;
    let (mut p, mut s) =
        (Peer::v3(addr, &client_id_on(0, "both")), Peer::v3(addr, &client_id_on(0, "drains")));
    p.subscribe_granted("to-p", QoS::AtLeastOnce);
    s.subscribe_granted("to-s", QoS::AtLeastOnce);
    // Q congests P's queue, and is held for good (P never acknowledges).
    let q = std::thread::spawn(move || {
        let mut q = Peer::v3(addr, &client_id_on(0, "congester"));
        for i in 0..4 {
            let id = q.next_packet_id();
            let publish =
                Peer::publish_packet("to-p", i.to_string().as_bytes(), QoS::AtLeastOnce, false, Some(id));
            q.send(&Packet::Publish(publish));
        }
        q
    });
    let _q = q.join().expect("q");
    let publisher = std::thread::spawn(move || {
        p.publish_burst("to-s", 20);
        p
    });
    // S acknowledges everything it gets: its queue congests and drains, again and again.
    for _ in 0..20 {
        let m = s.next_publish();
        s.ack(&m);
    }
    publisher.join().expect("P gets every PUBACK once S drained");
}

#[test]
fn backpressure_never_holds_a_client_back_for_its_own_queue() {
    let broker = TestBroker::start_with(|c| {
        c.max_inflight = 4;
        c.max_queued_messages = 40;
        c.queue_full_policy = ringmq::config::QueueFullPolicy::Backpressure;
        // Longer than the test's waits: only not pausing at all passes.
        c.shared_ack_timeout = std::time::Duration::from_secs(60);
    });
    // It subscribes to what it publishes and reads its acknowledgements only after the
    // burst: pausing its reader for its own queue would stall it until the ack timeout.
    let mut both = Peer::v3(broker.addr, &client_id_on(0, "echo"));
    both.subscribe_granted("echo/t", QoS::AtLeastOnce);
    both.publish_burst("echo/t", 300);
}

/// Packet identifiers after a full turn (issue 10): two messages left unacknowledged while
/// 65,535 others go through; no new PUBLISH may take either identifier while it is in
/// flight [MQTT-2.2.1-3]. (Checking only the oldest in flight let the second be reused.)
#[test]
fn identifiers_left_in_flight_are_not_reused_after_a_full_turn() {
    let broker = TestBroker::start_with(|c| c.max_queued_messages = 100_000);
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "wrap-sub"));
    sub.subscribe_granted("wrap/t", QoS::AtLeastOnce);
    const TOTAL: usize = 65_600;
    let addr = broker.addr;
    let publisher = std::thread::spawn(move || {
        let mut publisher = Peer::v3(addr, &client_id_on(0, "wrap-pub"));
        for _ in 0..TOTAL / 800 {
            publisher.publish_burst("wrap/t", 800);
        }
    });
    let mut held = Vec::new();
    for _ in 0..TOTAL {
        let p = sub.next_publish();
        let id = p.packet_id.expect("QoS 1");
        if held.len() < 2 {
            held.push(id);
            continue;
        }
        assert!(!held.contains(&id), "identifier {id} reused while still in flight (DUP {})", p.dup);
        sub.ack(&p);
    }
    publisher.join().expect("publisher");
}

/// `--queue-full-policy refuse`: an MQTT 5 publisher is not held by a subscriber that cannot
/// keep up: what would not fit its queue is answered 0x97 Quota exceeded and not delivered,
/// and everything acknowledged with success arrives. (Under the default the same
/// publisher waits: see the slow-consumer tests.)
#[test]
fn under_refuse_a_v5_publisher_gets_quota_exceeded_instead_of_waiting() {
    let broker = TestBroker::start_with(|c| {
        c.queue_full_policy = ringmq::config::QueueFullPolicy::Refuse;
        c.max_inflight = 1;
        c.max_queued_messages = 4;
        c.slow_consumer_timeout = std::time::Duration::from_secs(600);
    });
    let mut sub = Peer::v3(broker.addr, &client_id_on(0, "refuse-sub"));
    sub.subscribe_granted("refuse/t", QoS::AtLeastOnce);
    let mut publisher = Peer::v5(broker.addr, &client_id_on(0, "refuse-pub"));
    let reasons: Vec<ReasonCode> =
        (0..8).map(|i| publisher.publish("refuse/t", i.to_string(), QoS::AtLeastOnce, false)).collect();
    // One in flight and four queued fit; the rest are refused, and nothing waited.
    let mut want = vec![ReasonCode::Success; 5];
    want.resize(8, ReasonCode::QuotaExceeded);
    assert_eq!(reasons, want);
    assert_eq!(publisher.publish("refuse/t", "qos2", QoS::ExactlyOnce, false), ReasonCode::QuotaExceeded);
    // The subscriber gets exactly the accepted ones, in order; drained, the topic takes
    // messages again.
    for i in 0..5 {
        let p = sub.next_publish();
        assert_eq!(helpers::text(&p), i.to_string());
        sub.ack(&p);
    }
    assert_eq!(publisher.publish("refuse/t", "again", QoS::AtLeastOnce, false), ReasonCode::Success);
    assert_eq!(helpers::text(&sub.next_publish()), "again");
}

/// A publisher waits for the subscribers its messages congested, not for every congested
/// subscriber of its core: with one subscriber stuck (never acknowledging, the slow-consumer
/// timeout far away), a publisher feeding another one that drains goes on. (When every
/// waiter waited for the whole core, it stalled until the stuck one was made to pay.)
#[test]
fn a_publisher_is_not_held_by_a_congested_subscriber_it_does_not_feed() {
    let broker = TestBroker::start_with(|c| {
        c.max_inflight = 1;
        c.max_queued_messages = 4;
        c.slow_consumer_timeout = std::time::Duration::from_secs(600);
    });
    let addr = broker.addr;
    let mut stuck = Peer::v3(addr, &client_id_on(0, "stuck"));
    stuck.subscribe_granted("to-stuck", QoS::AtLeastOnce);
    let mut drains = Peer::v3(addr, &client_id_on(0, "drains-alone"));
    drains.subscribe_granted("to-drains", QoS::AtLeastOnce);
    // Another publisher congests the stuck subscriber's queue for good (and is held).
    let mut congester = Peer::v3(addr, &client_id_on(0, "congester-alone"));
    let ids: Vec<_> = (0..4).map(|_| congester.next_packet_id()).collect();
    for (i, id) in ids.iter().enumerate() {
        let publish =
            Peer::publish_packet("to-stuck", i.to_string().as_bytes(), QoS::AtLeastOnce, false, Some(*id));
        congester.send(&Packet::Publish(publish));
    }
    // The third one's PUBACK: it was routed, one in flight and two queued, half the bound.
    while !matches!(congester.expect(), Packet::PubAck(a) if a.packet_id == ids[2]) {}
    // Everything on the one core: this publisher's subscriber congests and drains again
    // and again while the stuck one stays congested.
    let publisher = std::thread::spawn(move || {
        let mut p = Peer::v3(addr, &client_id_on(0, "independent"));
        p.publish_burst("to-drains", 40);
    });
    for i in 0..40 {
        let m = drains.next_publish();
        assert_eq!(helpers::text(&m), i.to_string());
        drains.ack(&m);
    }
    publisher.join().expect("every PUBACK arrives while the stuck subscriber stays congested");
    drop(stuck);
}
