use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct Counts {
    started: usize,
    allowed: usize,
    completed: usize,
}

/// Flush jobs of logs under a directory run one by one as the test allows them.
#[derive(Default)]
pub struct FlushGate {
    counts: Mutex<Counts>,
    changed: Condvar,
}

static GATES: Mutex<Vec<(PathBuf, Arc<FlushGate>)>> = Mutex::new(Vec::new());

impl FlushGate {
    /// Holds every flush job of the logs under `dir` until `allow`ed.
    pub fn install(dir: &Path) -> Arc<FlushGate> {
        let gate = Arc::new(FlushGate::default());
        GATES.lock().unwrap().push((dir.to_path_buf(), gate.clone()));
        gate
    }

    /// Lets `n` more jobs through, in the order they arrived.
    pub fn allow(&self, n: usize) {
        self.counts.lock().unwrap().allowed += n;
        self.changed.notify_all();
    }

    pub fn started(&self) -> usize {
        self.counts.lock().unwrap().started
    }

    /// Jobs that finished (written, deleted, synced).
    pub fn completed(&self) -> usize {
        self.counts.lock().unwrap().completed
    }
}

/// Marks its job completed when dropped.
pub struct Pass(Arc<FlushGate>);

impl Drop for Pass {
    fn drop(&mut self) {
        self.0.counts.lock().unwrap().completed += 1;
        self.0.changed.notify_all();
    }
}

pub fn enter(dir: &Path) -> Option<Pass> {
    let gate = GATES.lock().unwrap().iter().find(|(d, _)| dir.starts_with(d)).map(|(_, g)| g.clone())?;
    let mut counts = gate.counts.lock().unwrap();
    let ticket = counts.started;
    counts.started += 1;
    while counts.allowed <= ticket {
        counts = gate.changed.wait(counts).unwrap();
    }
    drop(counts);
    Some(Pass(gate))
}
