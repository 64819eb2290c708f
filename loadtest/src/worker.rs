//! A worker thread: one tokio current-thread runtime and `LocalSet` running its share of
//! the connections, one task each, sharing thread-local state through `Rc`.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::task::LocalSet;

use crate::conn::{self, Settings, Worker};
use crate::plan::ConnSpec;
use crate::stats::{new_histogram, Counters, SeenSet};

/// Where the run is; set by the coordinator, watched by every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and subscribing.
    Setup,
    /// Publishing (or holding connections).
    Running,
    /// Publishing stopped; in-flight deliveries and acks still count.
    Draining,
    /// Close everything.
    Done,
}

/// Publisher ids above this are not tracked by group accounting (not ours).
const MAX_GROUP_PUBLISHERS: u32 = 1 << 20;
/// How long before the coordinator's live line a worker hands over its latencies.
const LIVE_LEAD_MS: u64 = 30;
/// Distinct error messages kept for the report.
const MAX_ERROR_KINDS: usize = 16;

/// A worker's thread-local figures, merged by the coordinator at the end.
pub struct Local {
    /// End-to-end latency, ns.
    pub latency: Histogram<u64>,
    /// Latency since the last live line, ns.
    pub interval: Histogram<u64>,
    /// CONNECT → CONNACK, ns.
    pub connect: Histogram<u64>,
    /// Stream accounting: distinct, duplicate, late deliveries, and gaps inside streams.
    pub unique: u64,
    pub dup: u64,
    pub out_of_order: u64,
    pub gaps: u64,
    /// Deliveries without a stamp of this run's publishers.
    pub foreign: u64,
    /// PUBACK/PUBREC/PUBCOMP with a failure reason.
    pub refused: u64,
    /// QoS 1/2 messages never acknowledged.
    pub unacked: u64,
    /// Subscriptions granted at QoS 0, 1, 2.
    pub granted: [u64; 3],
    /// Group accounting: per publisher, the sequence numbers this worker's members got.
    pub group: Vec<SeenSet>,
    pub group_dup: u64,
    pub errors: Vec<(String, u64)>,
}

impl Local {
    fn new() -> Local {
        Local {
            latency: new_histogram(),
            interval: new_histogram(),
            connect: new_histogram(),
            unique: 0,
            dup: 0,
            out_of_order: 0,
            gaps: 0,
            foreign: 0,
            refused: 0,
            unacked: 0,
            granted: [0; 3],
            group: Vec::new(),
            group_dup: 0,
            errors: Vec::new(),
        }
    }

    pub fn note_error(&mut self, what: String) {
        if let Some(e) = self.errors.iter_mut().find(|(text, _)| *text == what) {
            e.1 += 1;
        } else if self.errors.len() < MAX_ERROR_KINDS {
            self.errors.push((what, 1));
        }
    }

    /// Group accounting; `true` when new in this worker.
    #[inline]
    pub fn group_insert(&mut self, publisher: u32, seq: u32) -> bool {
        if publisher >= MAX_GROUP_PUBLISHERS {
            self.foreign += 1;
            return false;
        }
        let i = publisher as usize;
        if i >= self.group.len() {
            self.group.resize_with(i + 1, SeenSet::default);
        }
        self.group[i].insert(seq)
    }
}

pub fn spawn(
    index: usize,
    conns: Vec<ConnSpec>,
    settings: Arc<Settings>,
    counters: Arc<Counters>,
    phase: watch::Receiver<Phase>,
    live: Sender<Histogram<u64>>,
) -> std::io::Result<JoinHandle<Local>> {
    std::thread::Builder::new().name(format!("lt-worker-{index}")).spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread tokio runtime");
        let worker = Rc::new(Worker { settings, counters, phase, local: RefCell::new(Local::new()) });
        let tasks = LocalSet::new();
        tasks.block_on(&runtime, async {
            let handles: Vec<_> = conns
                .into_iter()
                .map(|spec| tokio::task::spawn_local(conn::run(spec, worker.clone())))
                .collect();
            tokio::task::spawn_local(live_ticker(worker.clone(), live));
            for h in handles {
                // A panicking connection task is a bug; the rest of the run still counts.
                if h.await.is_err() {
                    worker.local.borrow_mut().note_error("connection task panicked".into());
                }
            }
        });
        drop(tasks);
        match Rc::try_unwrap(worker) {
            Ok(w) => w.local.into_inner(),
            Err(w) => std::mem::replace(&mut *w.local.borrow_mut(), Local::new()),
        }
    })
}

/// Every second, hands the latencies of the last second to the coordinator.
async fn live_ticker(worker: Rc<Worker>, live: Sender<Histogram<u64>>) {
    let mut phase = worker.phase.clone();
    // Just before each whole second of the run, so the coordinator's live line (printed
    // on the second) has the latencies of the second it reports.
    let every = Duration::from_secs(1);
    let first = worker.settings.t0 + every - Duration::from_millis(LIVE_LEAD_MS);
    let mut tick = tokio::time::interval_at(first, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let mut local = worker.local.borrow_mut();
                if !local.interval.is_empty() {
                    let h = local.interval.clone();
                    local.interval.reset();
                    let _ = live.send(h);
                }
            }
            r = phase.changed() => {
                if r.is_err() || *phase.borrow_and_update() == Phase::Done {
                    return;
                }
            }
        }
    }
}
