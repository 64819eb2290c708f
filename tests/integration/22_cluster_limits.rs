//! Nodes with different limits (`--max-packet-size`, `--max-queued-bytes`): each reads a
//! link with what the dialling node declared in its hello, so a message one node accepts
//! crosses to a node that would not accept it from its own clients.

use std::time::Duration;

use rumqttc::QoS;

use super::cluster::node_with;
use super::common::{V4Client, WAIT};
use super::etcd::Etcd;

/// A client that sends and receives packets of up to 4 MiB (rumqttc's default is 10 KiB).
async fn large(addr: std::net::SocketAddr, id: &str) -> V4Client {
    let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(4 << 20, 4 << 20);
    V4Client::connect_with(options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_receiving_nodes_packet_limit_crosses_the_link() {
    let etcd = Etcd::start();
    let a = node_with(&etcd, "limits", "a", 10, |c| c.max_packet_size = 2 << 20);
    let b = node_with(&etcd, "limits", "b", 10, |c| c.max_packet_size = 256 << 10);
    let mut sub = large(b.addr, "sub-b").await;
    sub.subscribe("big/#", QoS::AtLeastOnce).await;
    let mut publisher = large(a.addr, "pub-a").await;
    // 1 MiB: four times what b takes from its own clients.
    let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    publisher.client.publish("big/1", QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
    publisher.client.publish("big/end", QoS::AtLeastOnce, false, b"end".to_vec()).await.unwrap();
    let first = sub.next_publish().await;
    assert_eq!((first.topic.as_str(), first.payload.len()), ("big/1", payload.len()));
    assert!(first.payload[..] == payload[..], "the payload as published");
    let second = sub.next_publish().await;
    assert_eq!(second.topic, "big/end", "the link carries on after it");
    // b confirmed both: the publisher is acknowledged for each.
    let mut acks = 0;
    while acks < 2 {
        if let rumqttc::Packet::PubAck(_) = publisher.next().await {
            acks += 1;
        }
    }
    drop((sub, publisher));
    drop((a, b));
}

/// A frame larger than the receiving node reads even after the exchange (a retained message
/// b took from a, which b relays to c, both with a smaller limit): b refuses it rather than
/// write it, have the link closed on it and write it again forever; the rest goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_receiving_nodes_bound_is_refused_by_the_sender_and_the_link_goes_on() {
    let etcd = Etcd::start();
    let small = |c: &mut ringmq::Config| c.max_packet_size = 256 << 10;
    let a = node_with(&etcd, "relay", "a", 10, |c| c.max_packet_size = 2 << 20);
    let b = node_with(&etcd, "relay", "b", 10, small);
    let publisher = large(a.addr, "pub-a").await;
    publisher.client.publish("r/big", QoS::AtLeastOnce, true, vec![7u8; 1 << 20]).await.unwrap();
    let on_b = large(b.addr, "pub-b").await;
    on_b.client.publish("r/small", QoS::AtLeastOnce, true, b"small".to_vec()).await.unwrap();
    // Both retained messages are on b.
    let mut check = large(b.addr, "check-b").await;
    check.subscribe("r/#", QoS::AtLeastOnce).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let p = check.next_publish().await;
        seen.push((p.topic.clone(), p.payload.len()));
    }
    seen.sort();
    assert_eq!(seen, [("r/big".to_string(), 1 << 20), ("r/small".to_string(), 5)]);
    drop((publisher, check));
    drop(a);

    // c joins with b its only peer: b sends it its retained set, all but r/big.
    let c = node_with(&etcd, "relay", "c", 10, small);
    let mut sub = large(c.addr, "sub-c").await;
    sub.subscribe("r/#", QoS::AtLeastOnce).await;
    let retained = sub.next_publish().await;
    assert_eq!((retained.topic.as_str(), &retained.payload[..]), ("r/small", &b"small"[..]));
    // The link from b to c carries on.
    on_b.client.publish("r/live", QoS::AtLeastOnce, false, b"live".to_vec()).await.unwrap();
    let live = tokio::time::timeout(WAIT, sub.next_publish()).await.expect("r/live");
    assert_eq!((live.topic.as_str(), &live.payload[..]), ("r/live", &b"live"[..]));
    drop((sub, on_b));
    drop((b, c));
}
