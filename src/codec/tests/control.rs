//! PINGREQ, PINGRESP, DISCONNECT and AUTH.

use super::goldens::*;
use super::*;

#[test]
fn ping_and_disconnect() {
    for version in [V31, V311, V5] {
        golden(PINGREQ, Packet::PingReq, version);
        golden(PINGRESP, Packet::PingResp, version);
        golden(
            DISCONNECT_SHORT,
            Packet::Disconnect(Disconnect {
                reason: ReasonCode::NORMAL_DISCONNECTION,
                properties: Properties::new(),
            }),
            version,
        );
    }
    let with_will = Packet::Disconnect(Disconnect {
        reason: ReasonCode::DisconnectWithWillMessage,
        properties: Properties::new(),
    });
    check_decode(DISCONNECT_V5_REASON, &with_will, V5);
    golden(DISCONNECT_V5_REASON_ENCODED, with_will, V5);
    golden(
        DISCONNECT_V5_LONG,
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::ServerShuttingDown,
            properties: props(vec![
                Property::SessionExpiryInterval(0),
                Property::ServerReference("s".into()),
            ]),
        }),
        V5,
    );
    // v3 has no reason code: a v5 reason is dropped, the packet stays 2 bytes.
    let mut out = BytesMut::new();
    let d = Packet::Disconnect(Disconnect {
        reason: ReasonCode::ServerShuttingDown,
        properties: Properties::new(),
    });
    encode(&d, V311, &mut out).unwrap();
    assert_eq!(&out[..], DISCONNECT_SHORT);
}

#[test]
fn auth() {
    golden(AUTH_SHORT, Packet::Auth(Auth { reason: ReasonCode::Success, properties: Properties::new() }), V5);
    let packet = Packet::Auth(Auth {
        reason: ReasonCode::ContinueAuthentication,
        properties: props(vec![
            Property::AuthenticationMethod("SCRA".into()),
            Property::AuthenticationData(Bytes::from_static(&[1, 2])),
        ]),
    });
    golden(AUTH_LONG, packet.clone(), V5);
    let mut out = BytesMut::new();
    assert_eq!(encode(&packet, V311, &mut out), Err(EncodeError::NotInVersion("AUTH")));
    assert!(out.is_empty());
    assert!(matches!(decode_err(AUTH_SHORT, V311), DecodeError::Malformed { .. }));
}
