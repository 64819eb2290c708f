//! MQTT 5 properties: refused repeats, misplaced ones and out-of-range values; accessors.

use super::*;

#[test]
fn duplicated_property_is_a_protocol_error() {
    // Two reason strings in a PUBACK.
    let bytes = [0x40, 0x0C, 0x00, 0x01, 0x00, 0x08, 0x1F, 0x00, 0x01, b'a', 0x1F, 0x00, 0x01, b'b'];
    assert!(is_protocol(&decode_err(&bytes, V5)));
    // Two subscription identifiers: fine in PUBLISH (golden in publish.rs), not in SUBSCRIBE.
    let bytes = [0x82, 0x0A, 0x00, 0x01, 0x04, 0x0B, 0x01, 0x0B, 0x02, 0x00, 0x01, b'a', 0x00];
    let bytes = {
        let mut b = bytes.to_vec();
        b[1] = (b.len() - 2) as u8;
        b
    };
    assert!(is_protocol(&decode_err(&bytes, V5)));
}

#[test]
fn property_not_allowed_in_packet() {
    // Topic Alias in a PUBACK.
    let bytes = [0x40, 0x07, 0x00, 0x01, 0x00, 0x03, 0x23, 0x00, 0x01];
    assert!(is_protocol(&decode_err(&bytes, V5)));
    // Will Delay Interval among CONNECT's own properties.
    let mut connect = vec![0x10, 0x00, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00];
    connect.extend_from_slice(&[0x05, 0x18, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]);
    connect[1] = (connect.len() - 2) as u8;
    assert!(is_protocol(&decode_err(&connect, V5)));
    // Unknown property identifier.
    let bytes = [0x40, 0x06, 0x00, 0x01, 0x00, 0x02, 0x7F, 0x00];
    assert!(is_malformed(&decode_err(&bytes, V5)));
}

#[test]
fn property_values_out_of_range() {
    // PUBLISH v5 with one property [id, value...].
    let publish_with = |prop: &[u8]| {
        let mut b = vec![0x30, 0x00, 0x00, 0x01, b't', prop.len() as u8];
        b.extend_from_slice(prop);
        b[1] = (b.len() - 2) as u8;
        b
    };
    // Topic Alias 0 is its own error: DISCONNECT 0x94 (MQTT-3.3.2-8).
    assert_eq!(decode_err(&publish_with(&[0x23, 0x00, 0x00]), V5), DecodeError::TopicAliasInvalid);
    assert!(is_protocol(&decode_err(&publish_with(&[0x01, 0x02]), V5)));
    assert!(is_protocol(&decode_err(&publish_with(&[0x0B, 0x00]), V5)));
    // Property value cut short inside the property list.
    assert!(is_malformed(&decode_err(&publish_with(&[0x02, 0x00, 0x00]), V5)));
    let connack_with = |prop: &[u8]| {
        let mut b = vec![0x20, 0x00, 0x00, 0x00, prop.len() as u8];
        b.extend_from_slice(prop);
        b[1] = (b.len() - 2) as u8;
        b
    };
    assert!(is_protocol(&decode_err(&connack_with(&[0x21, 0x00, 0x00]), V5)));
    assert!(is_protocol(&decode_err(&connack_with(&[0x27, 0, 0, 0, 0]), V5)));
    assert!(is_protocol(&decode_err(&connack_with(&[0x24, 0x02]), V5)));
    assert!(is_protocol(&decode_err(&connack_with(&[0x2A, 0x05]), V5)));
}

#[test]
fn property_accessors() {
    let p = props(vec![
        Property::RequestProblemInformation(0),
        Property::RequestResponseInformation(1),
        Property::AuthenticationMethod("SCRAM".into()),
        Property::MaximumPacketSize(4096),
        Property::TopicAliasMaximum(10),
        Property::WillDelayInterval(3),
        Property::ReasonString("why".into()),
    ]);
    assert_eq!(p.request_problem_information(), Some(false));
    assert_eq!(p.request_response_information(), Some(true));
    assert_eq!(p.authentication_method(), Some("SCRAM"));
    assert_eq!(p.maximum_packet_size(), Some(4096));
    assert_eq!(p.topic_alias_maximum(), Some(10));
    assert_eq!(p.will_delay_interval(), Some(3));
    assert_eq!(p.reason_string(), Some("why"));
    assert_eq!(p.session_expiry_interval(), None);
    assert_eq!(p.subscription_identifiers().count(), 0);
    for property in &p {
        assert_eq!(PropertyId::from_u8(property.id().as_u8()), Some(property.id()));
    }
    assert_eq!(p.len(), 7);
    assert_eq!(p.encoded_len(), 1 + p.iter().map(Property::encoded_len).sum::<usize>());
}
