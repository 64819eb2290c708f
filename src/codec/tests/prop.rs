//! Property tests: every valid packet round-trips, and no input makes the decoder panic.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use super::super::reason_sets;
use super::goldens::GOLDENS;
use super::*;

fn arb_string() -> impl Strategy<Value = String> {
    "[a-z0-9 é/]{0,6}"
}

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..8).prop_map(Bytes::from)
}

fn arb_topic() -> impl Strategy<Value = TopicName> {
    "[a-z$][a-z]{0,3}(/[a-z]{0,3}){0,3}".prop_map(|s| TopicName::new(s).unwrap())
}

fn arb_filter() -> impl Strategy<Value = TopicFilter> {
    (vec(select(vec!["a", "bc", "+", ""]), 1..4), any::<bool>()).prop_map(|(mut levels, hash)| {
        if hash {
            levels.push("#");
        }
        let mut text = levels.join("/");
        if text.is_empty() {
            text.push('e');
        }
        TopicFilter::new(text).unwrap()
    })
}

fn arb_qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn arb_property(id: PropertyId) -> BoxedStrategy<Property> {
    use Property as P;
    use PropertyId as I;
    let flag = || 0u8..=1;
    match id {
        I::PayloadFormatIndicator => flag().prop_map(P::PayloadFormatIndicator).boxed(),
        I::MessageExpiryInterval => any::<u32>().prop_map(P::MessageExpiryInterval).boxed(),
        I::ContentType => arb_string().prop_map(P::ContentType).boxed(),
        I::ResponseTopic => arb_string().prop_map(P::ResponseTopic).boxed(),
        I::CorrelationData => arb_bytes().prop_map(P::CorrelationData).boxed(),
        I::SubscriptionIdentifier => (1u32..=268_435_455).prop_map(P::SubscriptionIdentifier).boxed(),
        I::SessionExpiryInterval => any::<u32>().prop_map(P::SessionExpiryInterval).boxed(),
        I::AssignedClientIdentifier => arb_string().prop_map(P::AssignedClientIdentifier).boxed(),
        I::ServerKeepAlive => any::<u16>().prop_map(P::ServerKeepAlive).boxed(),
        I::AuthenticationMethod => arb_string().prop_map(P::AuthenticationMethod).boxed(),
        I::AuthenticationData => arb_bytes().prop_map(P::AuthenticationData).boxed(),
        I::RequestProblemInformation => flag().prop_map(P::RequestProblemInformation).boxed(),
        I::WillDelayInterval => any::<u32>().prop_map(P::WillDelayInterval).boxed(),
        I::RequestResponseInformation => flag().prop_map(P::RequestResponseInformation).boxed(),
        I::ResponseInformation => arb_string().prop_map(P::ResponseInformation).boxed(),
        I::ServerReference => arb_string().prop_map(P::ServerReference).boxed(),
        I::ReasonString => arb_string().prop_map(P::ReasonString).boxed(),
        I::ReceiveMaximum => (1u16..).prop_map(P::ReceiveMaximum).boxed(),
        I::TopicAliasMaximum => any::<u16>().prop_map(P::TopicAliasMaximum).boxed(),
        I::TopicAlias => (1u16..).prop_map(P::TopicAlias).boxed(),
        I::MaximumQoS => flag().prop_map(P::MaximumQoS).boxed(),
        I::RetainAvailable => flag().prop_map(P::RetainAvailable).boxed(),
        I::UserProperty => (arb_string(), arb_string()).prop_map(|(k, v)| P::UserProperty(k, v)).boxed(),
        I::MaximumPacketSize => (1u32..).prop_map(P::MaximumPacketSize).boxed(),
        I::WildcardSubscriptionAvailable => flag().prop_map(P::WildcardSubscriptionAvailable).boxed(),
        I::SubscriptionIdentifierAvailable => flag().prop_map(P::SubscriptionIdentifierAvailable).boxed(),
        I::SharedSubscriptionAvailable => flag().prop_map(P::SharedSubscriptionAvailable).boxed(),
    }
}

/// Properties valid in `ctx` (allowed there, repeated only where they may be);
/// always empty before v5.
fn arb_props(ctx: PropertyContext, v5: bool) -> BoxedStrategy<Properties> {
    if !v5 {
        return Just(Properties::new()).boxed();
    }
    let ids: Vec<PropertyId> = PropertyId::ALL.into_iter().filter(|id| id.allowed_in(ctx)).collect();
    vec(select(ids).prop_flat_map(arb_property), 0..5)
        .prop_map(move |list| {
            let mut seen = Vec::new();
            let list = list
                .into_iter()
                .filter(|p| {
                    let id = p.id();
                    let keep = id.may_repeat(ctx) || !seen.contains(&id);
                    seen.push(id);
                    keep
                })
                .collect();
            Properties(list)
        })
        .boxed()
}

fn arb_reason(set: &'static [ReasonCode]) -> impl Strategy<Value = ReasonCode> {
    select(set.to_vec())
}

fn arb_pid() -> impl Strategy<Value = PacketId> {
    (1u16..).prop_map(pid)
}

fn arb_connect(protocol: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = protocol.is_v5();
    let will =
        (arb_topic(), arb_bytes(), arb_qos(), any::<bool>(), arb_props(PropertyContext::Will, v5)).prop_map(
            |(topic, payload, qos, retain, properties)| Will { topic, payload, qos, retain, properties },
        );
    (
        any::<bool>(),
        any::<u16>(),
        arb_string(),
        proptest::option::of(will),
        proptest::option::of(arb_string()),
        proptest::option::of(arb_bytes()),
        arb_props(PropertyContext::Connect, v5),
    )
        .prop_map(move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
            // 3.1/3.1.1 send a password only with a user name [MQTT-3.1.2-22].
            let password = if v5 || username.is_some() { password } else { None };
            // Authentication Data needs an Authentication Method (§3.1.2.11.10).
            let mut properties = properties;
            if properties.authentication_method().is_none() {
                properties.0.retain(|p| p.id() != PropertyId::AuthenticationData);
            }
            Packet::Connect(Connect {
                protocol,
                clean_start,
                keep_alive,
                client_id,
                will,
                username,
                password,
                properties,
            })
        })
        .boxed()
}

fn arb_publish(v5: bool) -> BoxedStrategy<Packet> {
    (
        arb_qos(),
        any::<bool>(),
        any::<bool>(),
        arb_topic(),
        arb_pid(),
        arb_props(PropertyContext::Publish, v5),
        vec(any::<u8>(), 0..64),
    )
        .prop_map(|(qos, dup, retain, topic, id, properties, payload)| {
            let qos0 = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !qos0,
                qos,
                retain,
                topic,
                packet_id: (!qos0).then_some(id),
                properties,
                payload: Bytes::from(payload),
            })
        })
        .boxed()
}

fn arb_ack(v5: bool, ctx: PropertyContext) -> BoxedStrategy<PubAck> {
    let set = match ctx {
        PropertyContext::PubAck | PropertyContext::PubRec => reason_sets::PUBACK,
        _ => reason_sets::PUBREL,
    };
    let reason = if v5 { arb_reason(set).boxed() } else { Just(ReasonCode::Success).boxed() };
    (arb_pid(), reason, arb_props(ctx, v5))
        .prop_map(|(packet_id, reason, properties)| PubAck { packet_id, reason, properties })
        .boxed()
}

fn arb_options(v5: bool) -> impl Strategy<Value = SubscriptionOptions> {
    (arb_qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(qos, nl, rap, rh)| {
        SubscriptionOptions {
            qos,
            no_local: nl && v5,
            retain_as_published: rap && v5,
            retain_handling: if v5 { rh } else { 0 },
        }
    })
}

fn arb_packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    use PropertyContext as C;
    let v5 = version.is_v5();
    let connack_reason = if v5 {
        arb_reason(reason_sets::CONNACK).boxed()
    } else {
        select(vec![
            ReasonCode::Success,
            ReasonCode::UnsupportedProtocolVersion,
            ReasonCode::ClientIdentifierNotValid,
            ReasonCode::ServerUnavailable,
            ReasonCode::BadUserNameOrPassword,
            ReasonCode::NotAuthorized,
        ])
        .boxed()
    };
    let suback_set = if v5 { reason_sets::SUBACK } else { reason_sets::SUBACK_V3 };
    let mut choices = vec![
        arb_publish(v5),
        (any::<bool>(), connack_reason, arb_props(C::ConnAck, v5))
            .prop_map(|(session_present, reason, properties)| {
                Packet::ConnAck(ConnAck { session_present, reason, properties })
            })
            .boxed(),
        arb_ack(v5, C::PubAck).prop_map(Packet::PubAck).boxed(),
        arb_ack(v5, C::PubRec).prop_map(Packet::PubRec).boxed(),
        arb_ack(v5, C::PubRel).prop_map(Packet::PubRel).boxed(),
        arb_ack(v5, C::PubComp).prop_map(Packet::PubComp).boxed(),
        (arb_pid(), arb_props(C::Subscribe, v5), vec((arb_filter(), arb_options(v5)), 1..4))
            .prop_map(|(packet_id, properties, filters)| {
                Packet::Subscribe(Subscribe { packet_id, properties, filters })
            })
            .boxed(),
        (arb_pid(), arb_props(C::SubAck, v5), vec(arb_reason(suback_set), 1..4))
            .prop_map(|(packet_id, properties, reasons)| {
                Packet::SubAck(SubAck { packet_id, properties, reasons })
            })
            .boxed(),
        (arb_pid(), arb_props(C::Unsubscribe, v5), vec(arb_filter(), 1..4))
            .prop_map(|(packet_id, properties, filters)| {
                Packet::Unsubscribe(Unsubscribe { packet_id, properties, filters })
            })
            .boxed(),
        (
            arb_pid(),
            arb_props(C::UnsubAck, v5),
            vec(arb_reason(reason_sets::UNSUBACK), if v5 { 1..4 } else { 0..1 }),
        )
            .prop_map(|(packet_id, properties, reasons)| {
                Packet::UnsubAck(UnsubAck { packet_id, properties, reasons })
            })
            .boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
    ];
    if v5 {
        choices.push(arb_connect(ProtocolVersion::V5));
        choices.push(
            (arb_reason(reason_sets::DISCONNECT), arb_props(C::Disconnect, true))
                .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
                .boxed(),
        );
        choices.push(
            (arb_reason(reason_sets::AUTH), arb_props(C::Auth, true))
                .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
                .boxed(),
        );
    } else {
        choices.push(arb_connect(ProtocolVersion::V31));
        choices.push(arb_connect(ProtocolVersion::V311));
        choices.push(
            Just(Packet::Disconnect(Disconnect {
                reason: ReasonCode::Success,
                properties: Properties::new(),
            }))
            .boxed(),
        );
    }
    proptest::strategy::Union::new(choices).boxed()
}

fn round_trip(packet: &Packet, version: ProtocolVersion) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(buf.len(), encoded_size(packet, version));
    let decoded = decode(&mut buf, version, MAX);
    prop_assert_eq!(decoded, Ok(Some(packet.clone())));
    prop_assert!(buf.is_empty());
    Ok(())
}

/// Decodes until the buffer runs dry or an error: must not panic.
fn decode_everything(bytes: &[u8]) {
    for version in [V31, V311, V5] {
        for max in [MAX, 16] {
            let mut buf = BytesMut::from(bytes);
            while let Ok(Some(_)) = decode(&mut buf, version, max) {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip_v3(packet in arb_packet(V311)) {
        round_trip(&packet, V311)?;
        // 3.1 shares 3.1.1's layout for everything but CONNECT's name and level.
        if !matches!(packet, Packet::Connect(_)) {
            round_trip(&packet, V31)?;
        }
    }

    #[test]
    fn round_trip_v5(packet in arb_packet(V5)) {
        round_trip(&packet, V5)?;
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        decode_everything(&bytes);
    }

    #[test]
    fn mutated_goldens_never_panic(
        frame in select(GOLDENS.to_vec()),
        edits in vec((any::<proptest::sample::Index>(), 0u8..3, any::<u8>()), 1..4),
    ) {
        let mut bytes = frame.to_vec();
        for (at, op, byte) in edits {
            let i = at.index(bytes.len() + 1);
            match op {
                0 if i < bytes.len() => bytes[i] ^= byte | 1,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => bytes.push(byte),
            }
        }
        decode_everything(&bytes);
    }

    #[test]
    fn varint_round_trip(value in 0usize..=268_435_455) {
        let mut buf = BytesMut::new();
        super::super::primitives::put_varint(&mut buf, value);
        prop_assert_eq!(buf.len(), super::super::primitives::varint_len(value));
        let parsed = super::super::primitives::parse_varint(&buf);
        prop_assert_eq!(parsed, Ok(Some((value as u32, buf.len()))));
    }
}
