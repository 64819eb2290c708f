//! Codec throughput: decode and encode of the packets a broker handles most.
//!
//! `cargo bench --bench codec`. PUBLISH is the hot path (64 B and 1 KiB payloads, v3 and
//! v5); PUBACK, SUBSCRIBE and CONNECT are there for scale.

use std::hint::black_box;
use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringmq::codec::{
    decode, encode, encoded_size, Connect, Packet, Properties, Property, ProtocolVersion, PubAck, Publish,
    QoS, ReasonCode, Subscribe, SubscriptionOptions,
};
use ringmq::topic::{TopicFilter, TopicName};

const MAX_PACKET: usize = 1 << 20;

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap_or(NonZeroU16::MIN)
}

fn publish(payload_len: usize, version: ProtocolVersion) -> Packet {
    let properties = if version.is_v5() {
        Properties(vec![Property::MessageExpiryInterval(3600), Property::SubscriptionIdentifier(42)])
    } else {
        Properties::new()
    };
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: TopicName::from_static("sensors/building-7/floor-3/temperature"),
        packet_id: Some(pid(4242)),
        properties,
        payload: Bytes::from(vec![0xA5; payload_len]),
    })
}

fn puback() -> Packet {
    Packet::PubAck(PubAck {
        packet_id: pid(4242),
        reason: ReasonCode::Success,
        properties: Properties::new(),
    })
}

fn subscribe(version: ProtocolVersion) -> Packet {
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    };
    let filters = ["sensors/+/floor-3/#", "alerts/#", "$SYS/broker/load"]
        .into_iter()
        .filter_map(|f| TopicFilter::from_static(f).ok())
        .map(|f| (f, options))
        .collect();
    let properties = if version.is_v5() {
        Properties(vec![Property::SubscriptionIdentifier(7)])
    } else {
        Properties::new()
    };
    Packet::Subscribe(Subscribe { packet_id: pid(7), properties, filters })
}

fn connect(version: ProtocolVersion) -> Packet {
    let properties = if version.is_v5() {
        Properties(vec![
            Property::SessionExpiryInterval(300),
            Property::ReceiveMaximum(100),
            Property::MaximumPacketSize(MAX_PACKET as u32),
        ])
    } else {
        Properties::new()
    };
    Packet::Connect(Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: "loadgen-000123".into(),
        will: None,
        username: Some("bench".into()),
        password: Some(Bytes::from_static(b"secret")),
        properties,
    })
}

fn cases() -> Vec<(String, Packet, ProtocolVersion)> {
    let mut cases = Vec::new();
    for (version, tag) in [(ProtocolVersion::V311, "v3"), (ProtocolVersion::V5, "v5")] {
        cases.push((format!("publish_64B_{tag}"), publish(64, version), version));
        cases.push((format!("publish_1KiB_{tag}"), publish(1024, version), version));
        cases.push((format!("puback_{tag}"), puback(), version));
        cases.push((format!("subscribe_{tag}"), subscribe(version), version));
        cases.push((format!("connect_{tag}"), connect(version), version));
    }
    cases
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, packet, version) in cases() {
        group.throughput(Throughput::Bytes(encoded_size(&packet, version) as u64));
        let mut buf = BytesMut::with_capacity(4096);
        group.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                let result = encode(black_box(&packet), version, &mut buf);
                black_box((result, buf.len()))
            })
        });
    }
    group.finish();
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, packet, version) in cases() {
        let mut wire = BytesMut::new();
        if encode(&packet, version, &mut wire).is_err() {
            continue;
        }
        let wire = wire.freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                // The copy stands in for the socket read that fills the buffer.
                let mut buf = BytesMut::from(&wire[..]);
                black_box(decode(black_box(&mut buf), version, MAX_PACKET))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_encode, bench_decode);
criterion_main!(benches);
