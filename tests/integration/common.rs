//! Shared harness: an in-process broker, raw MQTT sockets and rumqttc clients.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ringmq::codec::{self, Packet, ProtocolVersion};
use ringmq::{Broker, Config, Shutdown};

/// Upper bound on any single wait in these tests; they wait on conditions, not time.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestBroker {
    broker: Option<Broker>,
    pub addr: SocketAddr,
    /// Every listener's address (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
}

impl TestBroker {
    pub fn start() -> TestBroker {
        Self::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap());
        config.cores = 2;
        config.io_memory = 512 * 1024;
        tweak(&mut config);
        let broker = ringmq::start(config, Shutdown::new()).expect("broker starts");
        let addr = broker.local_addr();
        let addrs = broker.listener_addrs().to_vec();
        TestBroker { broker: Some(broker), addr, addrs }
    }
}

impl TestBroker {
    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("running")
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.stop();
        }
    }
}

/// A clean MQTT 3.1.1 CONNECT with keep-alive 60.
pub fn connect_v311(client_id: &str) -> Packet {
    Packet::Connect(codec::Connect {
        protocol: ProtocolVersion::V311,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: codec::Properties::default(),
    })
}

/// A client identifier with `prefix` that shard `shard` of a 2-shard broker owns, so tests
/// can put publisher and subscriber on different cores.
pub fn client_id_on(shard: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| ringmq::broker::placement::owner(id, 2) == shard)
        .unwrap()
}

/// A blocking raw MQTT connection that speaks through the project's codec.
pub struct RawClient {
    pub stream: TcpStream,
    pub version: ProtocolVersion,
    buf: BytesMut,
}

impl RawClient {
    pub fn connect(addr: SocketAddr, version: ProtocolVersion) -> RawClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient { stream, version, buf: BytesMut::new() }
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        codec::encode(packet, self.version, &mut out).unwrap();
        self.send_bytes(&out);
    }

    /// The next packet, or `None` when the server closed the connection.
    pub fn recv(&mut self) -> Option<Packet> {
        let mut scratch = [0u8; 4096];
        loop {
            if let Some(packet) = codec::decode(&mut self.buf, self.version, usize::MAX).unwrap() {
                return Some(packet);
            }
            match self.stream.read(&mut scratch) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read failed (timeout?): {e}"),
            }
        }
    }

    /// Waits until the server closes the connection, returning what it sent before.
    pub fn recv_until_closed(&mut self) -> Vec<Packet> {
        let mut packets = Vec::new();
        while let Some(packet) = self.recv() {
            packets.push(packet);
        }
        packets
    }
}

/// A rumqttc MQTT 3.1.1 client whose event loop runs in a task; incoming packets are
/// forwarded to `incoming`.
pub struct V4Client {
    pub client: rumqttc::AsyncClient,
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
}

impl V4Client {
    pub async fn connect(addr: SocketAddr, id: &str) -> V4Client {
        let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        Self::connect_with(options).await
    }

    pub async fn connect_with(options: rumqttc::MqttOptions) -> V4Client {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::Event::Incoming(packet) = event {
                    if tx.send(packet).is_err() {
                        break;
                    }
                }
            }
        });
        let mut this = V4Client { client, incoming: rx };
        match this.next().await {
            rumqttc::Packet::ConnAck(ack) => assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        this
    }

    /// A client whose event loop another task runs, forwarding packets to `incoming`.
    pub fn from_parts(
        client: rumqttc::AsyncClient,
        incoming: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
    ) -> V4Client {
        V4Client { client, incoming }
    }

    pub async fn next(&mut self) -> rumqttc::Packet {
        tokio::time::timeout(WAIT, self.incoming.recv())
            .await
            .expect("packet within the wait limit")
            .expect("event loop alive")
    }

    /// Whether the connection has ended (the event loop stopped).
    pub async fn closed(&mut self) -> bool {
        loop {
            match tokio::time::timeout(WAIT, self.incoming.recv()).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        loop {
            if let rumqttc::Packet::SubAck(_) = self.next().await {
                return;
            }
        }
    }

    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        loop {
            if let rumqttc::Packet::Publish(publish) = self.next().await {
                return publish;
            }
        }
    }
}

/// The same for MQTT 5.
pub struct V5Client {
    pub client: rumqttc::v5::AsyncClient,
    incoming: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
}

impl V5Client {
    pub async fn connect(addr: SocketAddr, id: &str) -> (V5Client, rumqttc::v5::mqttbytes::v5::ConnAck) {
        let mut options = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 1000);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            use rumqttc::v5::{ConnectionError, StateError};
            loop {
                let packet = match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(packet)) => packet,
                    Ok(_) => continue,
                    // rumqttc reports a server's DISCONNECT as an error: hand it on as the packet.
                    Err(ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. })) => {
                        rumqttc::v5::mqttbytes::v5::Packet::Disconnect(
                            rumqttc::v5::mqttbytes::v5::Disconnect::new(reason_code),
                        )
                    }
                    Err(err) => {
                        eprintln!("v5 event loop ended: {err:?}");
                        break;
                    }
                };
                if tx.send(packet).is_err() {
                    break;
                }
            }
        });
        let mut this = V5Client { client, incoming: rx };
        match this.next().await {
            rumqttc::v5::mqttbytes::v5::Packet::ConnAck(ack) => (this, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn next(&mut self) -> rumqttc::v5::mqttbytes::v5::Packet {
        tokio::time::timeout(WAIT, self.incoming.recv())
            .await
            .expect("packet within the wait limit")
            .expect("event loop alive")
    }

    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::v5::mqttbytes::QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        loop {
            if let rumqttc::v5::mqttbytes::v5::Packet::SubAck(_) = self.next().await {
                return;
            }
        }
    }

    pub async fn next_publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        loop {
            if let rumqttc::v5::mqttbytes::v5::Packet::Publish(publish) = self.next().await {
                return publish;
            }
        }
    }
}

/// The release or debug `ringmq` binary of this build, run as its own process.
pub struct BinaryBroker {
    pub child: Child,
    pub addr: SocketAddr,
}

impl BinaryBroker {
    /// Starts the binary on `addr` without waiting for it to listen.
    pub fn spawn(dir: &Path, cores: usize, addr: SocketAddr) -> BinaryBroker {
        let child = Command::new(env!("CARGO_BIN_EXE_ringmq"))
            .args(["--bind", &addr.to_string(), "--cores", &cores.to_string(), "--io-memory", "524288"])
            .args(["--max-queued-messages", "100000", "--segment-size", "1048576"])
            .args(["--log-level", "warn", "--data-dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ringmq binary runs");
        BinaryBroker { child, addr }
    }

    pub fn start(dir: &Path, cores: usize) -> BinaryBroker {
        // A port nothing listens on now; another test may take it first, in which case the
        // broker refuses it and exits, and a new port is tried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut broker = BinaryBroker::spawn(dir, cores, addr);
            let deadline = Instant::now() + WAIT * 3;
            loop {
                if let Ok(Some(status)) = broker.child.try_wait() {
                    eprintln!("broker on {addr} exited during start-up ({status}); trying another port");
                    break;
                }
                if TcpStream::connect(addr).is_ok() {
                    return broker;
                }
                assert!(Instant::now() < deadline, "broker did not listen on {addr}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("no broker started on five ports");
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain syscall on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("the broker exits")
    }

    pub fn kill9(mut self) {
        // SAFETY: plain syscall on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for BinaryBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestBroker {
    /// What the broker holds against its bounds, as of each shard's last tick.
    pub fn accounting(&self) -> ringmq::broker::Accounting {
        self.broker.as_ref().expect("the broker runs").accounting()
    }

    /// [`TestBroker::accounting`] as measured entirely after this call: waits until every
    /// shard has ticked twice more (a tick in progress may have measured before the call).
    pub fn fresh_accounting(&self) -> ringmq::broker::Accounting {
        let start = self.accounting().ticks;
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.accounting();
            if now.ticks >= start + 2 {
                return now;
            }
            assert!(Instant::now() < deadline, "the shards stopped ticking");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
