//! TLS listeners: a round trip with rustls' client and certificates made by rcgen, client
//! certificates required or optional, a connection handed to its owner shard with its TLS
//! state.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::BytesMut;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use ringmq::codec::{
    self, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions,
};
use ringmq::config::{Listener, ListenerKind, TlsFiles};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::common::{client_id_on, connect_v311, RawClient, TestBroker, WAIT};

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM
/// files in a fresh directory, and the DER the client side uses.
struct Pki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    server: CertificateDer<'static>,
    client_cert: CertificateDer<'static>,
    client_key: Vec<u8>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("ringmq-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "ringmq test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params.distinguished_name.push(DnType::CommonName, "device-1");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
        Pki {
            dir,
            ca: ca.der().clone(),
            server: server.der().clone(),
            ca_cert: ca,
            ca_key,
            client_cert: client.der().clone(),
            client_key: client_key.serialize_der(),
        }
    }

    /// Writes a new server certificate and key over the old files; returns the certificate.
    fn renew_server(&mut self) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "renewed");
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        std::fs::write(self.dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(self.dir.join("server.key"), key.serialize_pem()).unwrap();
        self.server = cert.der().clone();
        self.server.clone()
    }

    fn files(&self, ca: bool, require: bool) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join("server.pem"),
            key: self.dir.join("server.key"),
            ca: ca.then(|| self.dir.join("ca.pem")),
            require_client_cert: require,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_broker(files: TlsFiles) -> TestBroker {
    TestBroker::start_with(move |c| {
        c.listeners.push(Listener {
            kind: ListenerKind::Tls,
            tls: Some(files),
            ..Listener::tcp("127.0.0.1:0".parse().unwrap())
        })
    })
}

/// A blocking MQTT 3.1.1 client over rustls.
struct TlsClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: BytesMut,
}

impl TlsClient {
    fn connect(addr: SocketAddr, pki: &Pki, with_cert: bool) -> TlsClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = if with_cert {
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.client_key.clone()));
            builder.with_client_auth_cert(vec![pki.client_cert.clone()], key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        let name = ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        TlsClient { tls: rustls::StreamOwned::new(conn, sock), buf: BytesMut::new() }
    }

    /// The certificate the server presented.
    fn server_cert(&self) -> CertificateDer<'static> {
        self.tls.conn.peer_certificates().expect("handshake done")[0].clone().into_owned()
    }

    /// Sends a packet; false when the connection failed (e.g. the handshake was refused).
    fn send(&mut self, packet: &Packet) -> bool {
        let mut out = BytesMut::new();
        codec::encode(packet, ProtocolVersion::V311, &mut out).unwrap();
        self.tls.write_all(&out).and_then(|_| self.tls.flush()).is_ok()
    }

    /// The next packet; `None` when the connection ended or failed.
    fn recv(&mut self) -> Option<Packet> {
        let mut scratch = [0u8; 4096];
        loop {
            if let Some(packet) = codec::decode(&mut self.buf, ProtocolVersion::V311, usize::MAX).unwrap() {
                return Some(packet);
            }
            match self.tls.read(&mut scratch) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&scratch[..n]),
            }
        }
    }
}

fn connected(client: &mut TlsClient, client_id: &str) -> bool {
    client.send(&connect_v311(client_id))
        && matches!(client.recv(), Some(Packet::ConnAck(ack)) if ack.reason == ReasonCode::Success)
}

#[test]
fn a_tls_client_subscribes_and_receives_from_a_plain_one_on_either_shard() {
    let pki = Pki::new("roundtrip");
    let broker = tls_broker(pki.files(false, false));
    let tls_addr = broker.addrs[1];
    for shard in 0..2 {
        // One of the two is handed to its owner shard, TLS state and all.
        let id = client_id_on(shard, "tls-sub-");
        let mut sub = TlsClient::connect(tls_addr, &pki, false);
        assert!(connected(&mut sub, &id), "TLS client on shard {shard}");
        let topic = format!("tls/{shard}");
        assert!(sub.send(&Packet::Subscribe(Subscribe {
            packet_id: 1.try_into().unwrap(),
            filters: vec![(
                ringmq::topic::TopicFilter::new(topic.clone()).unwrap(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0
                },
            )],
            properties: Properties::default(),
        })));
        assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));

        let mut publisher = RawClient::connect(broker.addrs[0], ProtocolVersion::V311);
        publisher.send(&connect_v311(&client_id_on(1 - shard, "plain-pub-")));
        assert!(matches!(publisher.recv(), Some(Packet::ConnAck(_))));
        let payload = vec![b'x'; 100_000]; // several TLS records
        publisher.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: ringmq::topic::TopicName::new(topic.clone()).unwrap(),
            packet_id: None,
            properties: Properties::default(),
            payload: payload.clone().into(),
        }));
        match sub.recv() {
            Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], &payload[..]),
            other => panic!("expected the PUBLISH over TLS, got {other:?}"),
        }
        assert!(sub.send(&Packet::PingReq));
        assert_eq!(sub.recv(), Some(Packet::PingResp));
    }
}

#[test]
fn a_required_client_certificate_refuses_clients_without_one() {
    let pki = Pki::new("required");
    let broker = tls_broker(pki.files(true, true));
    let mut with = TlsClient::connect(broker.addrs[1], &pki, true);
    assert!(connected(&mut with, "with-cert"));
    let mut without = TlsClient::connect(broker.addrs[1], &pki, false);
    assert!(!connected(&mut without, "without-cert"), "no certificate, no CONNACK");
}

#[test]
fn an_optional_client_certificate_lets_both_in() {
    let pki = Pki::new("optional");
    let broker = tls_broker(pki.files(true, false));
    let mut with = TlsClient::connect(broker.addrs[1], &pki, true);
    assert!(connected(&mut with, "with-cert"));
    let mut without = TlsClient::connect(broker.addrs[1], &pki, false);
    assert!(connected(&mut without, "without-cert"));
}

#[test]
fn plain_mqtt_on_a_tls_listener_is_closed_and_a_bad_key_file_stops_start_up() {
    let pki = Pki::new("plain");
    let broker = tls_broker(pki.files(false, false));
    let mut plain = RawClient::connect(broker.addrs[1], ProtocolVersion::V311);
    plain.send(&connect_v311("plain-on-tls"));
    // What comes back is a TLS alert, if anything, and then the end: never a CONNACK.
    let mut reply = Vec::new();
    let _ = plain.stream.read_to_end(&mut reply);
    assert_ne!(reply.first(), Some(&0x20), "{reply:?}");

    std::fs::write(pki.dir.join("server.key"), "not a key").unwrap();
    let mut config = ringmq::Config::new("127.0.0.1:0".parse().unwrap());
    config.cores = 2;
    config.io_memory = 512 * 1024;
    config.listeners.push(Listener {
        kind: ListenerKind::Tls,
        tls: Some(pki.files(false, false)),
        ..Listener::tcp("127.0.0.1:0".parse().unwrap())
    });
    match ringmq::start(config, ringmq::Shutdown::new()) {
        Err(err) => assert!(err.to_string().contains("server.key"), "{err}"),
        Ok(_) => panic!("a broker started with a bad key file"),
    }
}

#[test]
fn a_reload_gives_new_connections_the_new_certificate_and_keeps_old_ones() {
    let mut pki = Pki::new("reload");
    let broker = tls_broker(pki.files(false, false));
    let first_cert = pki.server.clone();
    let mut old = TlsClient::connect(broker.addrs[1], &pki, false);
    assert!(connected(&mut old, "before-reload"));
    assert_eq!(old.server_cert(), first_cert);

    let renewed = pki.renew_server();
    assert_ne!(renewed, first_cert);
    assert_eq!(broker.broker().reload_tls(), (1, 0));
    let mut new = TlsClient::connect(broker.addrs[1], &pki, false);
    assert!(connected(&mut new, "after-reload"));
    assert_eq!(new.server_cert(), renewed, "a new connection sees the new certificate");
    assert!(old.send(&Packet::PingReq));
    assert_eq!(old.recv(), Some(Packet::PingResp), "the old connection keeps working");

    // A file that does not load keeps the certificate in use.
    std::fs::write(pki.dir.join("server.pem"), "garbage").unwrap();
    assert_eq!(broker.broker().reload_tls(), (0, 1));
    let mut after_bad = TlsClient::connect(broker.addrs[1], &pki, false);
    assert!(connected(&mut after_bad, "after-bad-reload"));
    assert_eq!(after_bad.server_cert(), renewed);
}

#[test]
fn a_client_certificates_cn_and_san_are_read() {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["sensor-17.example".to_string()]).unwrap();
    params.distinguished_name.push(DnType::OrganizationName, "ringmq");
    params.distinguished_name.push(DnType::CommonName, "device-17");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let identity = ringmq::tls::cert_identity(cert.der()).expect("a certificate");
    assert_eq!(identity.common_name.as_deref(), Some("device-17"));
    assert_eq!(identity.alt_names, ["sensor-17.example"]);

    let mut no_san = CertificateParams::new(Vec::<String>::new()).unwrap();
    no_san.distinguished_name.push(DnType::CommonName, "plain");
    let plain = no_san.signed_by(&key, &ca, &ca_key).unwrap();
    let identity = ringmq::tls::cert_identity(plain.der()).unwrap();
    assert_eq!((identity.common_name.as_deref(), identity.alt_names.len()), (Some("plain"), 0));
    // Not a certificate: no identity, no panic, whatever the bytes.
    assert_eq!(ringmq::tls::cert_identity(&[0x30, 0x82, 0xff]), None);
    for cut in 0..cert.der().len() {
        let _ = ringmq::tls::cert_identity(&cert.der()[..cut]);
    }
}

#[test]
fn a_verified_certificates_cn_is_the_username_the_acl_and_password_checks_see() {
    let pki = Pki::new("identity");
    std::fs::write(pki.dir.join("acl"), "user device-1\ntopic write devices/device-1/#\n").unwrap();
    // A password file too: a certificate user needs no password, a plain client does.
    std::fs::write(pki.dir.join("passwords"), "").unwrap();
    let (acl, passwords) = (pki.dir.join("acl"), pki.dir.join("passwords"));
    let files = pki.files(true, false);
    let broker = TestBroker::start_with(move |c| {
        c.listeners.push(Listener {
            kind: ListenerKind::Tls,
            tls: Some(files),
            auth: ringmq::config::AuthSettings {
                identity: Some(ringmq::config::CertIdentityKind::Cn),
                acl_file: Some(acl),
                password_file: Some(passwords),
                ..Default::default()
            },
            ..Listener::tcp("127.0.0.1:0".parse().unwrap())
        })
    });
    let tls_addr = broker.addrs[1];
    let publish = |client: &mut TlsClient, topic: &str| {
        assert!(client.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: ringmq::topic::TopicName::new(topic.to_string()).unwrap(),
            packet_id: Some(1.try_into().unwrap()),
            properties: Properties::default(),
            payload: b"x".to_vec().into(),
        })));
        match client.recv() {
            Some(Packet::PubAck(_)) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
    };
    // A watcher on the plain listener (no authentication there) sees what is delivered.
    let mut watcher = RawClient::connect(broker.addr, ProtocolVersion::V311);
    watcher.send(&connect_v311("watcher"));
    assert!(matches!(watcher.recv(), Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success));
    watcher.send(&Packet::Subscribe(Subscribe {
        packet_id: 1.try_into().unwrap(),
        properties: Properties::default(),
        filters: vec![(
            ringmq::topic::TopicFilter::new("devices/#".to_string()).unwrap(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
        )],
    }));
    assert!(matches!(watcher.recv(), Some(Packet::SubAck(_))));
    // With its certificate: in, as device-1 (3.1.1 acknowledges a refused publish too: the
    // watcher tells them apart).
    let mut device = TlsClient::connect(tls_addr, &pki, true);
    assert!(connected(&mut device, "d1"));
    publish(&mut device, "devices/device-2/temp");
    publish(&mut device, "devices/device-1/temp");
    match watcher.recv() {
        Some(Packet::Publish(p)) => assert_eq!(p.topic.as_str(), "devices/device-1/temp"),
        other => panic!("expected the allowed publish, got {other:?}"),
    }
    // Without a certificate, without credentials: refused (a password file is set).
    let mut anonymous = TlsClient::connect(tls_addr, &pki, false);
    assert!(anonymous.send(&connect_v311("anon")));
    assert!(matches!(anonymous.recv(), Some(Packet::ConnAck(a)) if a.reason == ReasonCode::NotAuthorized));
}
