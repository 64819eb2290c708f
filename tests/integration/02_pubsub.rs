//! QoS 0 publish/subscribe across shards, wildcards, the `$` rule and unsubscribe.

use rumqttc::QoS;

use crate::common::{client_id_on, TestBroker, V4Client, V5Client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_a_subscriber_on_the_other_shard() {
    let broker = TestBroker::start();
    for (sub_shard, pub_shard) in [(0, 1), (1, 0), (0, 0)] {
        let mut sub = V4Client::connect(broker.addr, &client_id_on(sub_shard, "sub")).await;
        let publisher = V4Client::connect(broker.addr, &client_id_on(pub_shard, "pub")).await;
        let topic = format!("cross/{sub_shard}/{pub_shard}");
        sub.subscribe(&topic, QoS::AtMostOnce).await;
        for i in 0..100u32 {
            publisher.client.publish(&topic, QoS::AtMostOnce, false, i.to_be_bytes().to_vec()).await.unwrap();
        }
        for i in 0..100u32 {
            let publish = sub.next_publish().await;
            assert_eq!(publish.topic, topic);
            assert_eq!(&publish.payload[..], &i.to_be_bytes(), "in order from one publisher");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_match_and_dollar_topics_are_not_matched_by_leading_wildcards() {
    let broker = TestBroker::start();
    let mut plus = V4Client::connect(broker.addr, &client_id_on(0, "plus")).await;
    let mut hash = V4Client::connect(broker.addr, &client_id_on(1, "hash")).await;
    let mut all = V4Client::connect(broker.addr, &client_id_on(0, "all")).await;
    let mut dollar = V4Client::connect(broker.addr, &client_id_on(1, "dollar")).await;
    let publisher = V4Client::connect(broker.addr, &client_id_on(1, "pub")).await;
    plus.subscribe("sensors/+/temp", QoS::AtMostOnce).await;
    hash.subscribe("sensors/#", QoS::AtMostOnce).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    dollar.subscribe("$internal/#", QoS::AtMostOnce).await;

    for topic in ["$internal/x", "sensors/a/humidity", "sensors/a/temp", "sensors", "other"] {
        publisher.client.publish(topic, QoS::AtMostOnce, false, topic.as_bytes().to_vec()).await.unwrap();
    }
    // Each subscriber sees, in publish order, exactly the topics its filter matches:
    // the last topic each expects proves nothing else was in between.
    let expect = |client: &'static str| -> Vec<&'static str> {
        match client {
            "plus" => vec!["sensors/a/temp"],
            "hash" => vec!["sensors/a/humidity", "sensors/a/temp", "sensors"],
            "all" => vec!["sensors/a/humidity", "sensors/a/temp", "sensors", "other"],
            _ => vec!["$internal/x"],
        }
    };
    // A final marker every subscriber matches proves nothing else was queued before it.
    publisher.client.publish("sensors/z/temp", QoS::AtMostOnce, false, "end").await.unwrap();
    publisher.client.publish("$internal/end", QoS::AtMostOnce, false, "end").await.unwrap();
    for (name, client, marker) in [
        ("plus", &mut plus, "sensors/z/temp"),
        ("hash", &mut hash, "sensors/z/temp"),
        ("all", &mut all, "sensors/z/temp"),
        ("dollar", &mut dollar, "$internal/end"),
    ] {
        let mut seen = Vec::new();
        loop {
            let publish = client.next_publish().await;
            if publish.topic == marker {
                break;
            }
            seen.push(publish.topic);
        }
        assert_eq!(seen, expect(name), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let broker = TestBroker::start();
    let mut sub = V4Client::connect(broker.addr, &client_id_on(0, "sub")).await;
    let publisher = V4Client::connect(broker.addr, &client_id_on(1, "pub")).await;
    sub.subscribe("a/b", QoS::AtMostOnce).await;
    sub.subscribe("marker", QoS::AtMostOnce).await;
    publisher.client.publish("a/b", QoS::AtMostOnce, false, "1").await.unwrap();
    assert_eq!(sub.next_publish().await.topic, "a/b");
    sub.client.unsubscribe("a/b").await.unwrap();
    loop {
        if let rumqttc::Packet::UnsubAck(_) = sub.next().await {
            break;
        }
    }
    publisher.client.publish("a/b", QoS::AtMostOnce, false, "2").await.unwrap();
    publisher.client.publish("marker", QoS::AtMostOnce, false, "3").await.unwrap();
    assert_eq!(sub.next_publish().await.topic, "marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_clients_exchange_messages_with_v4_clients_across_shards() {
    let broker = TestBroker::start();
    let (mut sub, ack) = V5Client::connect(broker.addr, &client_id_on(1, "v5sub")).await;
    assert_eq!(ack.code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success);
    let publisher = V4Client::connect(broker.addr, &client_id_on(0, "v4pub")).await;
    sub.subscribe("mixed/+", rumqttc::v5::mqttbytes::QoS::AtMostOnce).await;
    publisher.client.publish("mixed/1", QoS::AtMostOnce, false, "hello").await.unwrap();
    let publish = sub.next_publish().await;
    assert_eq!(&publish.topic[..], b"mixed/1");
    assert_eq!(&publish.payload[..], b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos2_publishes_are_acknowledged_and_delivered_once() {
    let broker = TestBroker::start();
    let mut sub = V4Client::connect(broker.addr, &client_id_on(0, "sub")).await;
    let mut publisher = V4Client::connect(broker.addr, &client_id_on(1, "pub")).await;
    sub.subscribe("q/#", QoS::AtMostOnce).await;
    publisher.client.publish("q/1", QoS::AtLeastOnce, false, "one").await.unwrap();
    publisher.client.publish("q/2", QoS::ExactlyOnce, false, "two").await.unwrap();
    let (mut puback, mut pubcomp) = (false, false);
    while !(puback && pubcomp) {
        match publisher.next().await {
            rumqttc::Packet::PubAck(_) => puback = true,
            rumqttc::Packet::PubComp(_) => pubcomp = true,
            _ => {}
        }
    }
    assert_eq!(sub.next_publish().await.topic, "q/1");
    assert_eq!(sub.next_publish().await.topic, "q/2");
}
