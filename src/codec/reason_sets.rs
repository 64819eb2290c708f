//! Which reason codes each packet may carry (MQTT 5.0 §2.4 and each packet's section).
//! The decoder refuses others as malformed; the encoder refuses to write them.

use super::ReasonCode::{self, *};

pub(crate) type ReasonSet = &'static [ReasonCode];

pub(crate) fn contains(set: ReasonSet, code: ReasonCode) -> bool {
    set.contains(&code)
}

/// §3.2.2.2
pub(crate) const CONNACK: ReasonSet = &[
    Success,
    UnspecifiedError,
    MalformedPacket,
    ProtocolError,
    ImplementationSpecificError,
    UnsupportedProtocolVersion,
    ClientIdentifierNotValid,
    BadUserNameOrPassword,
    NotAuthorized,
    ServerUnavailable,
    ServerBusy,
    Banned,
    BadAuthenticationMethod,
    TopicNameInvalid,
    PacketTooLarge,
    QuotaExceeded,
    PayloadFormatInvalid,
    RetainNotSupported,
    QoSNotSupported,
    UseAnotherServer,
    ServerMoved,
    ConnectionRateExceeded,
];

/// PUBACK §3.4.2.1 and PUBREC §3.5.2.1.
pub(crate) const PUBACK: ReasonSet = &[
    Success,
    NoMatchingSubscribers,
    UnspecifiedError,
    ImplementationSpecificError,
    NotAuthorized,
    TopicNameInvalid,
    PacketIdentifierInUse,
    QuotaExceeded,
    PayloadFormatInvalid,
];

/// PUBREL §3.6.2.1 and PUBCOMP §3.7.2.1.
pub(crate) const PUBREL: ReasonSet = &[Success, PacketIdentifierNotFound];

/// §3.9.3
pub(crate) const SUBACK: ReasonSet = &[
    Success,
    GrantedQoS1,
    GrantedQoS2,
    UnspecifiedError,
    ImplementationSpecificError,
    NotAuthorized,
    TopicFilterInvalid,
    PacketIdentifierInUse,
    QuotaExceeded,
    SharedSubscriptionsNotSupported,
    SubscriptionIdentifiersNotSupported,
    WildcardSubscriptionsNotSupported,
];

/// 3.1.1 §3.9.3: granted QoS or 0x80 Failure.
pub(crate) const SUBACK_V3: ReasonSet = &[Success, GrantedQoS1, GrantedQoS2, UnspecifiedError];

/// §3.11.3
pub(crate) const UNSUBACK: ReasonSet = &[
    Success,
    NoSubscriptionExisted,
    UnspecifiedError,
    ImplementationSpecificError,
    NotAuthorized,
    TopicFilterInvalid,
    PacketIdentifierInUse,
];

/// §3.14.2.1
pub(crate) const DISCONNECT: ReasonSet = &[
    Success,
    DisconnectWithWillMessage,
    UnspecifiedError,
    MalformedPacket,
    ProtocolError,
    ImplementationSpecificError,
    NotAuthorized,
    ServerBusy,
    ServerShuttingDown,
    KeepAliveTimeout,
    SessionTakenOver,
    TopicFilterInvalid,
    TopicNameInvalid,
    ReceiveMaximumExceeded,
    TopicAliasInvalid,
    PacketTooLarge,
    MessageRateTooHigh,
    QuotaExceeded,
    AdministrativeAction,
    PayloadFormatInvalid,
    RetainNotSupported,
    QoSNotSupported,
    UseAnotherServer,
    ServerMoved,
    SharedSubscriptionsNotSupported,
    ConnectionRateExceeded,
    MaximumConnectTime,
    SubscriptionIdentifiersNotSupported,
    WildcardSubscriptionsNotSupported,
];

/// §3.15.2.1
pub(crate) const AUTH: ReasonSet = &[Success, ContinueAuthentication, ReAuthenticate];
