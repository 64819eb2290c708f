//! Cross-core messaging between two glommio executors pinned to CPUs 0 and 1: the
//! mechanism for the broker's cross-shard publish path.
//!
//! Compared: glommio `shared_channel::new_bounded(1024)` (with and without
//! `spin_before_park`), glommio `channel_mesh` (`MeshBuilder::full`), and
//! crossbeam-channel `bounded(1024)` drained by a polling receiver (either
//! `yield_if_needed` spinning or a 50 µs glommio timer sleep between empty polls).
//!
//! Each item sent is a `Vec<Msg>` batch (`Msg` = two `Bytes`, 64 bytes). Reported:
//! messages/s for batches of 1, 16 and 256 (median of 3 runs of a fixed message
//! count), one-way latency of a single-message batch (ping-pong round trip / 2;
//! mean, p50 and p99 per round trip, median of 3 runs), and the receiver thread's CPU
//! use while idle (waiting one second for a message that does not come).
//!
//! Set `MESH_SCALE` (default 1.0) to multiply every message / round-trip count.

use std::hint::black_box;
use std::rc::Rc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender};
use glommio::channels::shared_channel::{SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};

/// One routed publish: topic and payload, as the broker's shards exchange them.
#[derive(Clone, Debug)]
struct Msg {
    topic: Bytes,
    payload: Bytes,
}

const _: () = assert!(std::mem::size_of::<Msg>() == 64);

type Batch = Vec<Msg>;

const CAPACITY: usize = 1024;
const IO_MEMORY: usize = 512 * 1024;
const RUNS: usize = 3;
const POLL_SLEEP: Duration = Duration::from_micros(50);
const PARK_SPIN: Duration = Duration::from_micros(100);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mech {
    Shared,
    SharedSpin,
    Mesh,
    CbYield,
    CbSleep,
}

impl Mech {
    const ALL: [Mech; 5] = [Mech::Shared, Mech::SharedSpin, Mech::Mesh, Mech::CbYield, Mech::CbSleep];

    fn name(self) -> &'static str {
        match self {
            Mech::Shared => "glommio shared_channel",
            Mech::SharedSpin => "shared_channel + spin_before_park 100us",
            Mech::Mesh => "glommio channel_mesh (full)",
            Mech::CbYield => "crossbeam + yield_if_needed (spin)",
            Mech::CbSleep => "crossbeam + sleep 50us poll",
        }
    }
}

#[derive(Clone, Copy)]
enum Idle {
    Yield,
    Sleep,
}

/// The not-yet-connected half of a link, movable into an executor.
enum Seed {
    Shared {
        tx: Option<SharedSender<Batch>>,
        rx: Option<SharedReceiver<Batch>>,
    },
    Cb {
        tx: Option<crossbeam_channel::Sender<Batch>>,
        rx: Option<crossbeam_channel::Receiver<Batch>>,
        idle: Idle,
        barrier: Arc<Barrier>,
    },
    Mesh(MeshBuilder<Batch, Full>),
}

enum Tx {
    Shared(ConnectedSender<Batch>),
    Cb(crossbeam_channel::Sender<Batch>),
    Mesh(Rc<Senders<Batch>>, usize),
}

enum Rx {
    Shared(ConnectedReceiver<Batch>),
    Cb(crossbeam_channel::Receiver<Batch>, Idle),
    Mesh(Receivers<Batch>, usize),
}

impl Seed {
    /// Connects whichever halves this side holds; returns once the peer has too.
    async fn connect(self) -> (Option<Tx>, Option<Rx>) {
        match self {
            Seed::Shared { tx, rx } => {
                let tx = async {
                    match tx {
                        Some(tx) => Some(Tx::Shared(tx.connect().await)),
                        None => None,
                    }
                };
                let rx = async {
                    match rx {
                        Some(rx) => Some(Rx::Shared(rx.connect().await)),
                        None => None,
                    }
                };
                futures_lite::future::zip(tx, rx).await
            }
            Seed::Cb { tx, rx, idle, barrier } => {
                barrier.wait();
                (tx.map(Tx::Cb), rx.map(|rx| Rx::Cb(rx, idle)))
            }
            Seed::Mesh(builder) => {
                let (senders, receivers) = builder.join().await.expect("mesh join");
                let peer = 1 - senders.peer_id();
                (Some(Tx::Mesh(Rc::new(senders), peer)), Some(Rx::Mesh(receivers, peer)))
            }
        }
    }
}

impl Tx {
    async fn send(&self, batch: Batch) {
        match self {
            Tx::Shared(tx) => tx.send(batch).await.expect("shared send"),
            Tx::Mesh(tx, peer) => tx.send_to(*peer, batch).await.expect("mesh send"),
            Tx::Cb(tx) => {
                let mut batch = batch;
                loop {
                    match tx.try_send(batch) {
                        Ok(()) => return,
                        Err(crossbeam_channel::TrySendError::Full(back)) => {
                            batch = back;
                            futures_lite::future::yield_now().await;
                        }
                        Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                            panic!("crossbeam receiver gone")
                        }
                    }
                }
            }
        }
    }
}

impl Rx {
    async fn recv(&self) -> Batch {
        match self {
            Rx::Shared(rx) => rx.recv().await.expect("shared recv"),
            Rx::Mesh(rx, peer) => rx.recv_from(*peer).await.expect("mesh recv").expect("mesh peer gone"),
            Rx::Cb(rx, idle) => loop {
                match rx.try_recv() {
                    Ok(batch) => return batch,
                    Err(crossbeam_channel::TryRecvError::Empty) => match idle {
                        Idle::Yield => glommio::yield_if_needed().await,
                        Idle::Sleep => glommio::timer::sleep(POLL_SLEEP).await,
                    },
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        panic!("crossbeam sender gone")
                    }
                }
            },
        }
    }
}

/// Seeds for side A (cpu 0) and side B (cpu 1). `duplex` gives both sides a sender
/// and a receiver; otherwise A only sends and B only receives.
fn seeds(mech: Mech, duplex: bool) -> (Seed, Seed) {
    match mech {
        Mech::Shared | Mech::SharedSpin => {
            let (ab_tx, ab_rx) = shared_channel::new_bounded(CAPACITY);
            let (ba_tx, ba_rx) = if duplex {
                let (t, r) = shared_channel::new_bounded(CAPACITY);
                (Some(t), Some(r))
            } else {
                (None, None)
            };
            (Seed::Shared { tx: Some(ab_tx), rx: ba_rx }, Seed::Shared { tx: ba_tx, rx: Some(ab_rx) })
        }
        Mech::CbYield | Mech::CbSleep => {
            let idle = if mech == Mech::CbYield { Idle::Yield } else { Idle::Sleep };
            let barrier = Arc::new(Barrier::new(2));
            let (ab_tx, ab_rx) = crossbeam_channel::bounded(CAPACITY);
            let (ba_tx, ba_rx) = if duplex {
                let (t, r) = crossbeam_channel::bounded(CAPACITY);
                (Some(t), Some(r))
            } else {
                (None, None)
            };
            (
                Seed::Cb { tx: Some(ab_tx), rx: ba_rx, idle, barrier: barrier.clone() },
                Seed::Cb { tx: ba_tx, rx: Some(ab_rx), idle, barrier },
            )
        }
        Mech::Mesh => {
            let builder = MeshBuilder::full(2, CAPACITY);
            (Seed::Mesh(builder.clone()), Seed::Mesh(builder))
        }
    }
}

fn builder(mech: Mech, cpu: usize) -> LocalExecutorBuilder {
    let b = LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name(&format!("mesh-bench-{cpu}"))
        .io_memory(IO_MEMORY);
    if mech == Mech::SharedSpin {
        b.spin_before_park(PARK_SPIN)
    } else {
        b
    }
}

fn msg() -> Msg {
    Msg {
        topic: Bytes::from_static(b"site/42/device/1234/temperature"),
        payload: Bytes::from_static(b"{\"t\":21.5,\"h\":40,\"ts\":1700000000}"),
    }
}

fn make_batch(size: usize) -> Batch {
    let mut batch = Vec::with_capacity(size);
    batch.extend(std::iter::repeat_with(msg).take(size));
    batch
}

fn consume(batch: Batch) -> usize {
    let mut bytes = 0;
    for m in &batch {
        bytes += m.topic.len() + m.payload.len();
    }
    black_box(bytes);
    batch.len()
}

/// Sends `total` messages in batches of `batch` from cpu 0 to cpu 1; returns msgs/s.
fn throughput(mech: Mech, batch: usize, total: usize) -> f64 {
    let (a, b) = seeds(mech, false);
    let batches = total / batch;
    let total = batches * batch;
    let sender = builder(mech, 0)
        .spawn(move || async move {
            let (tx, _rx) = a.connect().await;
            let tx = tx.expect("sender half");
            let start = Instant::now();
            for _ in 0..batches {
                tx.send(make_batch(batch)).await;
            }
            start
        })
        .expect("spawn sender");
    let receiver = builder(mech, 1)
        .spawn(move || async move {
            let (_tx, rx) = b.connect().await;
            let rx = rx.expect("receiver half");
            let mut got = 0;
            while got < total {
                got += consume(rx.recv().await);
            }
            Instant::now()
        })
        .expect("spawn receiver");
    let start = sender.join().expect("sender");
    let end = receiver.join().expect("receiver");
    total as f64 / (end - start).as_secs_f64()
}

struct Latency {
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

/// Ping-pong of single-message batches; returns one-way (round trip / 2) figures.
fn latency(mech: Mech, rounds: usize) -> Latency {
    const WARMUP: usize = 1000;
    let (a, b) = seeds(mech, true);
    let pinger = builder(mech, 0)
        .spawn(move || async move {
            let (tx, rx) = a.connect().await;
            let (tx, rx) = (tx.expect("ping tx"), rx.expect("ping rx"));
            let mut samples = Vec::with_capacity(rounds);
            for i in 0..WARMUP + rounds {
                let t = Instant::now();
                tx.send(make_batch(1)).await;
                consume(rx.recv().await);
                if i >= WARMUP {
                    samples.push(t.elapsed());
                }
            }
            samples
        })
        .expect("spawn pinger");
    let ponger = builder(mech, 1)
        .spawn(move || async move {
            let (tx, rx) = b.connect().await;
            let (tx, rx) = (tx.expect("pong tx"), rx.expect("pong rx"));
            for _ in 0..WARMUP + rounds {
                let batch = rx.recv().await;
                tx.send(batch).await;
            }
        })
        .expect("spawn ponger");
    let mut samples = pinger.join().expect("pinger");
    ponger.join().expect("ponger");
    samples.sort_unstable();
    let sum: Duration = samples.iter().sum();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize] / 2;
    Latency { mean: sum / samples.len() as u32 / 2, p50: pct(0.50), p99: pct(0.99) }
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Receiver thread CPU use (percent of one core) while waiting `idle` for a message.
fn idle_cpu(mech: Mech, idle: Duration) -> f64 {
    let (a, b) = seeds(mech, false);
    let sender = builder(mech, 0)
        .spawn(move || async move {
            let (tx, _rx) = a.connect().await;
            let tx = tx.expect("sender half");
            glommio::timer::sleep(idle).await;
            tx.send(make_batch(1)).await;
        })
        .expect("spawn sender");
    let receiver = builder(mech, 1)
        .spawn(move || async move {
            let (_tx, rx) = b.connect().await;
            let rx = rx.expect("receiver half");
            let (cpu0, wall0) = (thread_cpu_time(), Instant::now());
            consume(rx.recv().await);
            let (cpu, wall) = (thread_cpu_time() - cpu0, wall0.elapsed());
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
        })
        .expect("spawn receiver");
    sender.join().expect("sender");
    receiver.join().expect("receiver")
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

fn mps(v: f64) -> String {
    format!("{:.2}M", v / 1e6)
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore any arguments.
    let scale: f64 = std::env::var("MESH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let count = |n: usize| ((n as f64 * scale) as usize).max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("mesh bench needs 2 CPUs, found {cpus}; skipping");
        return;
    }
    println!(
        "cross-core messaging, cpu0 -> cpu1, Vec<Msg> batches ({}-byte Msg), capacity {CAPACITY}",
        std::mem::size_of::<Msg>()
    );
    println!(
        "throughput: median of {RUNS} runs, messages/s; latency: one-way = RTT/2, us, median of {RUNS} runs; idle cpu: receiver thread, % of a core"
    );
    println!();
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9}",
        "mechanism", "batch 1", "batch 16", "batch 256", "lat mean", "lat p50", "lat p99", "idle cpu"
    );
    for mech in Mech::ALL {
        let mut cols = Vec::new();
        for (batch, total) in [(1, 1_000_000), (16, 4_000_000), (256, 10_000_000)] {
            let runs = (0..RUNS).map(|_| throughput(mech, batch, count(total))).collect();
            cols.push(mps(median(runs)));
        }
        let rounds = count(if mech == Mech::CbSleep { 5_000 } else { 10_000 });
        let lats: Vec<Latency> = (0..RUNS).map(|_| latency(mech, rounds)).collect();
        let mean = median(lats.iter().map(|l| l.mean).collect());
        let p50 = median(lats.iter().map(|l| l.p50).collect());
        let p99 = median(lats.iter().map(|l| l.p99).collect());
        let idle = idle_cpu(mech, Duration::from_secs(1));
        println!(
            "{:<40} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8.1}%",
            mech.name(),
            cols[0],
            cols[1],
            cols[2],
            us(mean),
            us(p50),
            us(p99),
            idle
        );
    }
}
