//! Authentication and authorization: a password file as Debian's `mosquitto_passwd`
//! wrote it, anonymous clients, an ACL enforced on SUBSCRIBE, PUBLISH, wills, every
//! delivery and retained messages, takeover by another user, and rules reloaded under a
//! live connection.

use std::path::PathBuf;

use ringmq::codec::{
    self, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe,
    SubscriptionOptions,
};
use ringmq::config::{AuthSettings, Config};
use ringmq::topic::{TopicFilter, TopicName};

use crate::common::{client_id_on, RawClient, TestBroker};

/// Written by `mosquitto_passwd -c -b F alice s3cret; mosquitto_passwd -b F bob hunter2`
/// (Mosquitto 2.0.11, PBKDF2-SHA512, 101 iterations).
pub(crate) const MOSQUITTO_PASSWORDS: &str = "\
alice:$7$101$dIuAI2whoFkHidpe$YCIZbBLrrsaMR6Docz2u/dkjkb8nTQiWEj+LhGv0Jr5VJkSpcgbBgJ1qlh6nwVKKNU9sWp9Fcg8WK7HqqpiKXw==
bob:$7$101$LgimuHT+XZdO1YZt$lxFBvpOx5WkDMJePgUUEQMcpJO4WjFBKSSvrwKxsugeX1i6RpU2kRMKNDZSIyfc3hYMck2mJP6rIIPK1H4c/iQ==
";

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringmq-auth-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A broker whose listener has `settings`, and the files in `files` written first.
fn broker(
    name: &str,
    files: &[(&str, &str)],
    settings: impl Fn(&PathBuf) -> AuthSettings,
) -> (TestBroker, PathBuf) {
    let dir = dir(name);
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    let auth = settings(&dir);
    let broker = TestBroker::start_with(|c: &mut Config| c.listeners[0].auth = auth);
    (broker, dir)
}

fn connect(id: &str, version: ProtocolVersion, user: Option<&str>, password: Option<&str>) -> Packet {
    Packet::Connect(Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: user.map(str::to_string),
        password: password.map(|p| p.as_bytes().to_vec().into()),
        properties: Properties::default(),
    })
}

/// `connect` (a CONNECT) with a will on `topic`.
fn with_will(connect: Packet, topic: &str, payload: &str, qos: QoS, retain: bool) -> Packet {
    let Packet::Connect(mut c) = connect else { unreachable!("not a CONNECT") };
    c.will = Some(codec::Will {
        topic: TopicName::new(topic.to_string()).unwrap(),
        payload: payload.as_bytes().to_vec().into(),
        qos,
        retain,
        properties: Properties::default(),
    });
    Packet::Connect(c)
}

/// Waits for the server to close `client` and checks it said DISCONNECT `reason` first.
fn assert_closed_with(client: &mut RawClient, reason: ReasonCode) {
    let packets = client.recv_until_closed();
    assert!(matches!(packets.as_slice(), [Packet::Disconnect(d)] if d.reason == reason), "{packets:?}");
}

/// Connects and returns the CONNACK's reason.
fn connect_as(
    broker: &TestBroker,
    id: &str,
    version: ProtocolVersion,
    user: Option<&str>,
    password: Option<&str>,
) -> (RawClient, ReasonCode) {
    let mut client = RawClient::connect(broker.addr, version);
    client.send(&connect(id, version, user, password));
    match client.recv() {
        Some(Packet::ConnAck(ack)) => (client, ack.reason),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn subscribe(client: &mut RawClient, filter: &str, qos: QoS) -> ReasonCode {
    client.send(&Packet::Subscribe(Subscribe {
        packet_id: 1.try_into().unwrap(),
        properties: Properties::default(),
        filters: vec![(
            TopicFilter::new(filter.to_string()).unwrap(),
            SubscriptionOptions { qos, no_local: false, retain_as_published: false, retain_handling: 0 },
        )],
    }));
    match client.recv() {
        Some(Packet::SubAck(ack)) => ack.reasons[0],
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn publish(client: &mut RawClient, topic: &str, qos: QoS, retain: bool, payload: &str) {
    client.send(&Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: TopicName::new(topic.to_string()).unwrap(),
        packet_id: (qos != QoS::AtMostOnce).then(|| 7.try_into().unwrap()),
        properties: Properties::default(),
        payload: payload.as_bytes().to_vec().into(),
    }));
}

/// Publishes QoS 1 and returns the PUBACK's reason.
fn publish_acked(client: &mut RawClient, topic: &str, payload: &str) -> ReasonCode {
    publish(client, topic, QoS::AtLeastOnce, false, payload);
    match client.recv() {
        Some(Packet::PubAck(ack)) => ack.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// A PUBACK that accepted the message (v5 says 0x10 when nobody subscribed).
fn ok(reason: ReasonCode) -> bool {
    matches!(reason, ReasonCode::Success | ReasonCode::NoMatchingSubscribers)
}

/// The payloads of the next publishes, up to and including one with payload `last`.
fn payloads_until(client: &mut RawClient, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match client.recv() {
            Some(Packet::Publish(p)) => {
                let text = String::from_utf8_lossy(&p.payload).to_string();
                let done = text == last;
                seen.push(text);
                if done {
                    return seen;
                }
            }
            Some(_) => {}
            None => panic!("closed before {last:?}; saw {seen:?}"),
        }
    }
}

#[test]
fn a_mosquitto_password_file_authenticates_and_refuses_wrong_passwords_and_anonymous_clients() {
    let (broker, _dir) = broker("passwords", &[("passwords", MOSQUITTO_PASSWORDS)], |d| AuthSettings {
        password_file: Some(d.join("passwords")),
        ..AuthSettings::default()
    });
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let (_alice, reason) = connect_as(&broker, "a", version, Some("alice"), Some("s3cret"));
        assert_eq!(reason, ReasonCode::Success, "{version:?}");
        let (_bob, reason) = connect_as(&broker, "b", version, Some("bob"), Some("hunter2"));
        assert_eq!(reason, ReasonCode::Success);
        // 3.1.1 return code 4 and v5 0x86 are both "bad user name or password".
        let (_, reason) = connect_as(&broker, "c", version, Some("alice"), Some("wrong"));
        assert_eq!(reason, ReasonCode::BadUserNameOrPassword);
        let (_, reason) = connect_as(&broker, "d", version, Some("mallory"), Some("s3cret"));
        assert_eq!(reason, ReasonCode::BadUserNameOrPassword);
        // A password file is set: anonymous clients are refused (Mosquitto 2's default).
        let (_, reason) = connect_as(&broker, "e", version, None, None);
        assert_eq!(reason, ReasonCode::NotAuthorized);
    }
}

#[test]
fn anonymous_clients_are_let_in_when_allowed_explicitly_and_by_default_without_any_source() {
    let (open, _d) = broker("open", &[], |_| AuthSettings::default());
    assert_eq!(connect_as(&open, "a", ProtocolVersion::V5, None, None).1, ReasonCode::Success);
    let (allowed, _d) = broker("allowed", &[("passwords", MOSQUITTO_PASSWORDS)], |d| AuthSettings {
        password_file: Some(d.join("passwords")),
        allow_anonymous: Some(true),
        ..AuthSettings::default()
    });
    assert_eq!(connect_as(&allowed, "a", ProtocolVersion::V5, None, None).1, ReasonCode::Success);
    // ... but a wrong password is still wrong.
    assert_eq!(
        connect_as(&allowed, "b", ProtocolVersion::V5, Some("bob"), Some("x")).1,
        ReasonCode::BadUserNameOrPassword
    );
    let (closed, _d) =
        broker("closed", &[], |_| AuthSettings { allow_anonymous: Some(false), ..AuthSettings::default() });
    assert_eq!(connect_as(&closed, "a", ProtocolVersion::V311, None, None).1, ReasonCode::NotAuthorized);
}

const ACL: &str = "\
# anonymous clients: nothing
user alice
topic readwrite sensors/#
topic deny sensors/secret
topic read $SYS/#
topic write cmd/alice/+
user bob
topic read sensors/public/#
topic write sensors/#
pattern readwrite clients/%c/#
pattern read users/%u/inbox
";

fn acl_broker(name: &str) -> (TestBroker, PathBuf) {
    broker(name, &[("passwords", MOSQUITTO_PASSWORDS), ("acl", ACL)], |d| AuthSettings {
        password_file: Some(d.join("passwords")),
        acl_file: Some(d.join("acl")),
        ..AuthSettings::default()
    })
}

#[test]
fn subscribe_is_refused_where_nothing_may_be_read_in_the_version_the_client_speaks() {
    let (broker, _d) = acl_broker("acl-subscribe");
    let (mut v5, _) = connect_as(&broker, "s5", ProtocolVersion::V5, Some("bob"), Some("hunter2"));
    assert_eq!(subscribe(&mut v5, "cmd/#", QoS::AtLeastOnce), ReasonCode::NotAuthorized);
    assert_eq!(subscribe(&mut v5, "sensors/public/+", QoS::AtLeastOnce), ReasonCode::GrantedQoS1);
    // %c as a whole level: its own client id, not another's.
    assert_eq!(subscribe(&mut v5, "clients/s5/x", QoS::AtLeastOnce), ReasonCode::GrantedQoS1);
    assert_eq!(subscribe(&mut v5, "clients/other/x", QoS::AtLeastOnce), ReasonCode::NotAuthorized);
    assert_eq!(subscribe(&mut v5, "users/bob/inbox", QoS::AtMostOnce), ReasonCode::GRANTED_QOS0);
    // `#` reaches no `$` topic: `$SYS` needs its own rule (bob has none, alice has one).
    assert_eq!(subscribe(&mut v5, "$SYS/#", QoS::AtMostOnce), ReasonCode::NotAuthorized);
    let (mut v3, _) = connect_as(&broker, "s3", ProtocolVersion::V311, Some("alice"), Some("s3cret"));
    assert_eq!(subscribe(&mut v3, "$SYS/broker/uptime", QoS::AtMostOnce), ReasonCode::GRANTED_QOS0);
    // 3.1.1 has one failure code.
    assert_eq!(subscribe(&mut v3, "users/bob/inbox", QoS::AtMostOnce), ReasonCode::UnspecifiedError);
}

#[test]
fn publish_refused_by_the_acl_is_answered_0x87_to_v5_acknowledged_to_v3_and_never_delivered() {
    let (broker, _d) = acl_broker("acl-publish");
    let (mut sub, _) =
        connect_as(&broker, &client_id_on(0, "sub"), ProtocolVersion::V5, Some("alice"), Some("s3cret"));
    assert_eq!(subscribe(&mut sub, "cmd/#", QoS::AtLeastOnce), ReasonCode::NotAuthorized);
    assert_eq!(subscribe(&mut sub, "sensors/#", QoS::AtLeastOnce), ReasonCode::GrantedQoS1);
    let (mut v5, _) =
        connect_as(&broker, &client_id_on(1, "pub5"), ProtocolVersion::V5, Some("alice"), Some("s3cret"));
    assert_eq!(publish_acked(&mut v5, "sensors/secret", "denied-v5"), ReasonCode::NotAuthorized);
    assert_eq!(publish_acked(&mut v5, "other/topic", "denied-v5b"), ReasonCode::NotAuthorized);
    // 3.1.1 cannot be told: its PUBACK is the usual one, and the message goes nowhere.
    let (mut v3, _) =
        connect_as(&broker, &client_id_on(1, "pub3"), ProtocolVersion::V311, Some("bob"), Some("hunter2"));
    assert!(ok(publish_acked(&mut v3, "cmd/alice/x", "denied-v3")));
    assert!(ok(publish_acked(&mut v3, "sensors/a", "allowed")));
    assert_eq!(payloads_until(&mut sub, "allowed"), ["allowed"]);
}

#[test]
fn a_wildcard_subscription_over_denied_topics_gets_only_what_it_may_read_retained_included() {
    let (broker, _d) = acl_broker("acl-deliveries");
    // bob may write everything under sensors/; alice reads sensors/# except sensors/secret.
    let (mut bob, _) =
        connect_as(&broker, &client_id_on(1, "bob"), ProtocolVersion::V5, Some("bob"), Some("hunter2"));
    publish(&mut bob, "sensors/secret", QoS::AtLeastOnce, true, "retained-secret");
    assert!(matches!(bob.recv(), Some(Packet::PubAck(a)) if ok(a.reason)));
    publish(&mut bob, "sensors/open", QoS::AtLeastOnce, true, "retained-open");
    assert!(matches!(bob.recv(), Some(Packet::PubAck(a)) if ok(a.reason)));
    let (mut alice, _) =
        connect_as(&broker, &client_id_on(0, "alice"), ProtocolVersion::V5, Some("alice"), Some("s3cret"));
    assert_eq!(subscribe(&mut alice, "sensors/+", QoS::AtLeastOnce), ReasonCode::GrantedQoS1);
    // Retained: only the readable one.
    assert_eq!(payloads_until(&mut alice, "retained-open"), ["retained-open"]);
    for (topic, payload) in
        [("sensors/secret", "live-secret"), ("sensors/a", "live-a"), ("sensors/b", "live-b")]
    {
        publish(&mut bob, topic, QoS::AtLeastOnce, false, payload);
        assert!(matches!(bob.recv(), Some(Packet::PubAck(_))));
    }
    assert_eq!(payloads_until(&mut alice, "live-b"), ["live-a", "live-b"]);
}

#[test]
fn a_will_the_acl_refuses_is_refused_at_connect() {
    let (broker, _d) = acl_broker("acl-will");
    for (version, expected) in
        [(ProtocolVersion::V5, ReasonCode::NotAuthorized), (ProtocolVersion::V311, ReasonCode::NotAuthorized)]
    {
        let mut client = RawClient::connect(broker.addr, version);
        let c = connect("w", version, Some("bob"), Some("hunter2"));
        client.send(&with_will(c, "cmd/alice/x", "gone", QoS::AtMostOnce, false));
        assert!(matches!(client.recv(), Some(Packet::ConnAck(a)) if a.reason == expected), "{version:?}");
    }
}

#[test]
fn a_session_is_taken_over_only_by_its_own_user() {
    let (broker, _d) = acl_broker("acl-takeover");
    let (mut first, _) = connect_as(&broker, "device", ProtocolVersion::V5, Some("alice"), Some("s3cret"));
    let (_, reason) = connect_as(&broker, "device", ProtocolVersion::V5, Some("bob"), Some("hunter2"));
    assert_eq!(reason, ReasonCode::NotAuthorized);
    // The first connection is untouched...
    assert_eq!(subscribe(&mut first, "sensors/x", QoS::AtMostOnce), ReasonCode::GRANTED_QOS0);
    // ... and its own user may take it over.
    let (_, reason) = connect_as(&broker, "device", ProtocolVersion::V5, Some("alice"), Some("s3cret"));
    assert_eq!(reason, ReasonCode::Success);
    assert!(matches!(first.recv(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::SessionTakenOver));
}

#[test]
fn a_rule_added_by_a_reload_applies_to_a_live_connection_and_a_broken_file_keeps_the_old_rules() {
    let (broker, dir) = acl_broker("acl-reload");
    let (mut bob, _) =
        connect_as(&broker, &client_id_on(0, "bob"), ProtocolVersion::V5, Some("bob"), Some("hunter2"));
    assert_eq!(publish_acked(&mut bob, "alerts/fire", "before"), ReasonCode::NotAuthorized);
    std::fs::write(dir.join("acl"), format!("{ACL}user bob\ntopic write alerts/#\n")).unwrap();
    assert_eq!(broker.broker().reload_auth(), (1, 0));
    assert!(ok(publish_acked(&mut bob, "alerts/fire", "after")));
    // A file that does not parse: the rules in force stay.
    std::fs::write(dir.join("acl"), "topic sometimes alerts/#\n").unwrap();
    assert_eq!(broker.broker().reload_auth(), (0, 1));
    assert!(ok(publish_acked(&mut bob, "alerts/fire", "still")));
    // A rule taken away: a subscription allowed whole before is checked per delivery now.
    let (mut alice, _) =
        connect_as(&broker, &client_id_on(1, "alice"), ProtocolVersion::V5, Some("alice"), Some("s3cret"));
    assert_eq!(subscribe(&mut alice, "sensors/public/+", QoS::AtLeastOnce), ReasonCode::GrantedQoS1);
    std::fs::write(dir.join("acl"), format!("{ACL}user alice\ntopic deny sensors/public/hidden\n")).unwrap();
    assert_eq!(broker.broker().reload_auth(), (1, 0));
    for (topic, payload) in [("sensors/public/hidden", "hidden"), ("sensors/public/shown", "shown")] {
        assert!(ok(publish_acked(&mut bob, topic, payload)));
    }
    assert_eq!(payloads_until(&mut alice, "shown"), ["shown"]);
}

fn token(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn a_token_authenticates_its_acl_claim_authorizes_and_its_expiry_closes_the_connection() {
    let (broker, _d) = broker("jwt", &[], |_| AuthSettings {
        jwt: Some(ringmq::config::JwtKeySource::Secret("s3cret-key".into())),
        ..AuthSettings::default()
    });
    let claims = |exp: u64| serde_json::json!({"sub": "dev-1", "exp": exp, "acl": {"pub": ["dev/1/#"], "sub": ["cmd/1"]}});
    let forged = token("another-key", serde_json::json!({"sub": "dev-1", "exp": unix_now() + 60}));
    let expired = token("s3cret-key", serde_json::json!({"sub": "dev-1", "exp": unix_now() - 1}));
    for bad in [&forged, &expired] {
        let (_, reason) = connect_as(&broker, "x", ProtocolVersion::V5, None, Some(bad));
        assert_eq!(reason, ReasonCode::BadUserNameOrPassword);
    }
    // A username that is not the token's is refused too.
    assert_eq!(
        connect_as(
            &broker,
            "x",
            ProtocolVersion::V5,
            Some("dev-2"),
            Some(&token("s3cret-key", claims(unix_now() + 60)))
        )
        .1,
        ReasonCode::BadUserNameOrPassword
    );
    // (Each refusal above took a second: the token that expires soon is made now.)
    let good = token("s3cret-key", claims(unix_now() + 3));
    let (mut client, reason) = connect_as(&broker, "dev-1", ProtocolVersion::V5, Some("dev-1"), Some(&good));
    assert_eq!(reason, ReasonCode::Success);
    // The claim is the whole ACL here (no file): what it grants, nothing more.
    assert_eq!(subscribe(&mut client, "cmd/1", QoS::AtLeastOnce), ReasonCode::GrantedQoS1);
    assert_eq!(subscribe(&mut client, "cmd/2", QoS::AtLeastOnce), ReasonCode::NotAuthorized);
    assert!(ok(publish_acked(&mut client, "dev/1/temp", "ok")));
    assert_eq!(publish_acked(&mut client, "dev/2/temp", "no"), ReasonCode::NotAuthorized);
    // The token expires within 3 s: the broker closes the connection (v5: 0x87).
    let deadline = std::time::Instant::now() + crate::common::WAIT;
    loop {
        match client.recv() {
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.reason, ReasonCode::NotAuthorized);
                break;
            }
            Some(_) => assert!(std::time::Instant::now() < deadline),
            None => panic!("closed without DISCONNECT"),
        }
    }
}

#[test]
fn with_deny_action_disconnect_a_refused_publish_closes_the_connection() {
    let dir = dir("acl-disconnect");
    std::fs::write(dir.join("acl"), ACL).unwrap();
    std::fs::write(dir.join("passwords"), MOSQUITTO_PASSWORDS).unwrap();
    let auth = AuthSettings {
        password_file: Some(dir.join("passwords")),
        acl_file: Some(dir.join("acl")),
        ..AuthSettings::default()
    };
    let broker = TestBroker::start_with(|c: &mut Config| {
        c.listeners[0].auth = auth;
        c.acl_deny_action = ringmq::config::AclDenyAction::Disconnect;
    });
    let (mut bob, _) = connect_as(&broker, "bob", ProtocolVersion::V5, Some("bob"), Some("hunter2"));
    publish(&mut bob, "cmd/alice/x", QoS::AtLeastOnce, false, "no");
    assert_closed_with(&mut bob, ReasonCode::NotAuthorized);
}

#[test]
fn each_listener_has_its_own_rules() {
    let dir = dir("per-listener");
    std::fs::write(dir.join("passwords"), MOSQUITTO_PASSWORDS).unwrap();
    let passwords = dir.join("passwords");
    // The first listener lets anyone in; the second wants a password.
    let broker = TestBroker::start_with(|c: &mut Config| {
        let mut second = ringmq::config::Listener::tcp("127.0.0.1:0".parse().unwrap());
        second.auth.password_file = Some(passwords);
        c.listeners.push(second);
    });
    let anonymous = |addr| {
        let mut client = RawClient::connect(addr, ProtocolVersion::V5);
        client.send(&connect("anon", ProtocolVersion::V5, None, None));
        match client.recv() {
            Some(Packet::ConnAck(ack)) => ack.reason,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    };
    assert_eq!(anonymous(broker.addrs[0]), ReasonCode::Success);
    assert_eq!(anonymous(broker.addrs[1]), ReasonCode::NotAuthorized);
    let mut alice = RawClient::connect(broker.addrs[1], ProtocolVersion::V5);
    alice.send(&connect("alice", ProtocolVersion::V5, Some("alice"), Some("s3cret")));
    assert!(matches!(alice.recv(), Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success));
    // Her session is not taken over from the open listener.
    let mut thief = RawClient::connect(broker.addrs[0], ProtocolVersion::V5);
    thief.send(&connect("alice", ProtocolVersion::V5, None, None));
    assert!(matches!(thief.recv(), Some(Packet::ConnAck(a)) if a.reason == ReasonCode::NotAuthorized));
}

#[test]
fn a_will_is_checked_again_when_it_is_published() {
    let (broker, dir) = acl_broker("acl-will-late");
    let (mut alice, _) =
        connect_as(&broker, &client_id_on(0, "watch"), ProtocolVersion::V5, Some("alice"), Some("s3cret"));
    assert_eq!(subscribe(&mut alice, "sensors/+", QoS::AtLeastOnce), ReasonCode::GrantedQoS1);
    let will_client = |id: &str, payload: &str| {
        let mut client = RawClient::connect(broker.addr, ProtocolVersion::V5);
        let c = connect(id, ProtocolVersion::V5, Some("bob"), Some("hunter2"));
        client.send(&with_will(c, "sensors/will", payload, QoS::AtLeastOnce, false));
        assert!(matches!(client.recv(), Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success));
        client
    };
    // Allowed at CONNECT, then the rule goes: the will is not published.
    let first = will_client(&client_id_on(1, "will-a"), "will-refused");
    std::fs::write(
        dir.join("acl"),
        ACL.replace("user bob\ntopic read sensors/public/#\ntopic write sensors/#\n", "user bob\n"),
    )
    .unwrap();
    assert_eq!(broker.broker().reload_auth(), (1, 0));
    drop(first);
    // Its connection ended (and its will was judged) before the rules change back.
    while broker.fresh_accounting().connections > 1 {}
    // Allowed again: this one is published (and shows the first was not).
    std::fs::write(dir.join("acl"), ACL).unwrap();
    assert_eq!(broker.broker().reload_auth(), (1, 0));
    let second = will_client(&client_id_on(1, "will-b"), "will-published");
    drop(second);
    assert_eq!(payloads_until(&mut alice, "will-published"), ["will-published"]);
}

#[test]
fn a_persistent_session_keeps_its_owner_and_rules_across_a_restart() {
    let dir = dir("restart");
    std::fs::write(dir.join("acl"), ACL).unwrap();
    std::fs::write(dir.join("passwords"), MOSQUITTO_PASSWORDS).unwrap();
    let start = || {
        let (acl, passwords, data) = (dir.join("acl"), dir.join("passwords"), dir.join("data"));
        TestBroker::start_with(move |c: &mut Config| {
            c.listeners[0].auth = AuthSettings {
                password_file: Some(passwords),
                acl_file: Some(acl),
                ..AuthSettings::default()
            };
            c.data_dir = Some(data);
            c.segment_size = 1 << 20;
        })
    };
    let alice_id = client_id_on(0, "alice-durable");
    let resume = |broker: &TestBroker, user: &str, password: &str| {
        let mut client = RawClient::connect(broker.addr, ProtocolVersion::V5);
        let Packet::Connect(mut c) = connect(&alice_id, ProtocolVersion::V5, Some(user), Some(password))
        else {
            unreachable!()
        };
        c.clean_start = false;
        c.properties.push(codec::Property::SessionExpiryInterval(3600));
        client.send(&Packet::Connect(c));
        match client.recv() {
            Some(Packet::ConnAck(ack)) => (client, ack.reason, ack.session_present),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    };
    {
        let broker = start();
        let (mut alice, reason, _) = resume(&broker, "alice", "s3cret");
        assert_eq!(reason, ReasonCode::Success);
        assert_eq!(subscribe(&mut alice, "sensors/+", QoS::AtLeastOnce), ReasonCode::GrantedQoS1);
    }
    let broker = start();
    let (mut bob, _) =
        connect_as(&broker, &client_id_on(1, "bob"), ProtocolVersion::V5, Some("bob"), Some("hunter2"));
    for (topic, payload) in [("sensors/secret", "secret"), ("sensors/ok", "ok")] {
        assert!(ok(publish_acked(&mut bob, topic, payload)));
    }
    // Still alice's: bob may not take it over...
    assert_eq!(resume(&broker, "bob", "hunter2").1, ReasonCode::NotAuthorized);
    // ... and what was queued for it while it was offline followed alice's rules.
    let (mut alice, reason, present) = resume(&broker, "alice", "s3cret");
    assert_eq!((reason, present), (ReasonCode::Success, true));
    assert_eq!(payloads_until(&mut alice, "ok"), ["ok"]);
}

#[test]
fn a_will_to_sys_is_refused_even_without_authentication() {
    let (broker, _d) = broker("sys-will", &[], |_| AuthSettings::default());
    let mut client = RawClient::connect(broker.addr, ProtocolVersion::V5);
    let c = connect("w", ProtocolVersion::V5, None, None);
    client.send(&with_will(c, "$SYS/broker/version", "forged", QoS::AtMostOnce, true));
    assert!(matches!(client.recv(), Some(Packet::ConnAck(a)) if a.reason == ReasonCode::NotAuthorized));
}

#[test]
fn a_password_that_looks_like_a_token_still_logs_in_and_a_removed_user_is_cut_off_at_reload() {
    let token_like = "eyJhbGciOi.x.y";
    let line =
        format!("carol:{}\n", ringmq::auth::passwd::PasswordHash::argon2id(token_like.as_bytes()).encode());
    let (broker, dir) =
        broker("token-like", &[("passwords", &format!("{MOSQUITTO_PASSWORDS}{line}"))], |d| AuthSettings {
            password_file: Some(d.join("passwords")),
            jwt: Some(ringmq::config::JwtKeySource::Secret("k".into())),
            ..AuthSettings::default()
        });
    let (mut carol, reason) =
        connect_as(&broker, "carol", ProtocolVersion::V5, Some("carol"), Some(token_like));
    assert_eq!(reason, ReasonCode::Success);
    assert!(ok(publish_acked(&mut carol, "any/topic", "before")));
    // carol leaves the password file: her connection can do nothing more.
    std::fs::write(dir.join("passwords"), MOSQUITTO_PASSWORDS).unwrap();
    assert_eq!(broker.broker().reload_auth(), (1, 0));
    publish(&mut carol, "any/topic", QoS::AtLeastOnce, false, "after");
    assert_closed_with(&mut carol, ReasonCode::NotAuthorized);
}

#[test]
fn a_malformed_shared_filter_is_refused_as_invalid_not_as_unauthorized() {
    let (broker, _d) = acl_broker("acl-share");
    let (mut alice, _) =
        connect_as(&broker, "alice-share", ProtocolVersion::V5, Some("alice"), Some("s3cret"));
    assert_eq!(subscribe(&mut alice, "$share/g", QoS::AtLeastOnce), ReasonCode::TopicFilterInvalid);
    assert_eq!(subscribe(&mut alice, "$share/g/cmd/x", QoS::AtLeastOnce), ReasonCode::NotAuthorized);
    assert_eq!(subscribe(&mut alice, "$share/g/sensors/x", QoS::AtLeastOnce), ReasonCode::GrantedQoS1);
}
