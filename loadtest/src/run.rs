//! The coordinator: plans the run, starts the workers, moves them through the phases
//! (set-up → load → drain → done), prints the live line and gathers the results.
//!
//! It is a plain thread that polls the workers' counters every [`POLL`]: phase changes
//! go out on a `watch` channel, latencies of the last second come in on a crossbeam
//! channel. Every wait is bounded, so a run ends at the latest after the set-up bound,
//! `--duration` and `--drain-timeout`.

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cli::Command;
use crate::conn::Settings;
use crate::payload::now_ns;
use crate::plan::{self, Accounting, Role};
use crate::procstat::{self, Broker};
use crate::report::{BrokerFigures, Results};
use crate::stats::{new_histogram, total, Counters, SeenSet};
use crate::worker::{self, Local, Phase};

/// How often the coordinator looks at the counters.
const POLL: Duration = Duration::from_millis(10);
const LIVE_EVERY: Duration = Duration::from_secs(1);

struct Live<'a> {
    counters: &'a [Arc<Counters>],
    rx: crossbeam_channel::Receiver<Histogram<u64>>,
    quiet: bool,
    t0: Instant,
    last: Instant,
    last_sent: u64,
    last_recv: u64,
    planned: usize,
    broker: Option<&'a Broker>,
    peak_rss_kib: u64,
}

impl Live<'_> {
    /// Prints the live line if a second has passed since the last one.
    fn maybe_print(&mut self, label: &str) {
        let now = Instant::now();
        if now - self.last < LIVE_EVERY {
            return;
        }
        let secs = (now - self.last).as_secs_f64();
        self.last = now;
        let c = self.counters;
        let sent = total(c, |c| &c.sent);
        let recv = total(c, |c| &c.recv_load) + total(c, |c| &c.recv_drain);
        let mut hist = new_histogram();
        for h in self.rx.try_iter() {
            let _ = hist.add(h);
        }
        let mut rss = String::new();
        if let Some(sample) = self.broker.and_then(Broker::sample) {
            self.peak_rss_kib = self.peak_rss_kib.max(sample.rss_kib);
            rss = format!("  broker rss {:.1} MiB", sample.rss_kib as f64 / 1024.0);
        }
        if !self.quiet {
            let p99 = if hist.is_empty() {
                "-".to_string()
            } else {
                format!("{:.3} ms", hist.value_at_quantile(0.99) as f64 / 1e6)
            };
            eprintln!(
                "[{:>6.1}s] {label:<8} pub {:>9.0}/s  recv {:>9.0}/s  p99 {p99:>10}  conns {}/{}  inflight {}{rss}",
                (now - self.t0).as_secs_f64(),
                (sent - self.last_sent) as f64 / secs,
                (recv - self.last_recv) as f64 / secs,
                total(c, |c| &c.up),
                self.planned,
                total(c, |c| &c.inflight),
            );
        }
        self.last_sent = sent;
        self.last_recv = recv;
    }
}

pub fn run(command: &Command) -> Result<Results, String> {
    let o = command.opts();
    let plan = plan::build(command)?;
    if plan.conns.is_empty() {
        return Err("nothing to do: no connections planned (check --clients / --subscribers)".into());
    }
    let nofile = procstat::raise_nofile_limit();
    if nofile < plan.conns.len() as u64 + 64 {
        eprintln!("warning: open-file limit {nofile} is below {} connections", plan.conns.len());
    }
    let addrs = plan
        .endpoints
        .iter()
        .map(|e| {
            (e.host.as_str(), e.port)
                .to_socket_addrs()
                .map_err(|err| format!("resolving {e}: {err}"))?
                .next()
                .ok_or_else(|| format!("{} resolves to no address", e.host))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let tls = match (&o.ca, o.tls) {
        (Some(ca), true) => Some(crate::tls::TlsSettings::new(ca, &o.tls_server_name)?),
        _ => None,
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = o.workers.unwrap_or(cpus).clamp(1, plan.conns.len());
    let broker = o.broker_pid.map(Broker::new);
    let broker_before = match &broker {
        Some(b) => {
            Some(b.sample().ok_or_else(|| format!("cannot read /proc/{}", o.broker_pid.unwrap_or(0)))?)
        }
        None => None,
    };
    let cpu_before = procstat::self_cpu_s();

    let t0 = Instant::now();
    let settings = Arc::new(Settings {
        addrs,
        version: plan.version,
        qos: plan.qos,
        size: o.size as usize,
        rate: o.rate,
        inflight: o.inflight,
        keepalive: o.keepalive,
        session_expiry: o.session_expiry,
        connect_timeout: Duration::from_secs(o.connect_timeout.max(1)),
        t0,
        t0_ns: now_ns(),
        publishers: if matches!(command, Command::Sub(_)) { 0 } else { plan.publishers },
        tls,
        ws_path: o.ws.then(|| o.ws_path.clone()),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let (live_tx, live_rx) = crossbeam_channel::unbounded();
    let planned = plan.conns.len();
    let last_connect_at = plan.conns.iter().map(|c| c.connect_at).max().unwrap_or_default();
    let group =
        plan.conns.iter().any(|c| matches!(c.role, Role::Subscriber { accounting: Accounting::Group, .. }));
    let mut buckets: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, spec) in plan.conns.iter().cloned().enumerate() {
        buckets[i % workers].push(spec);
    }
    let counters: Vec<Arc<Counters>> = (0..workers).map(|_| Arc::new(Counters::new())).collect();
    let mut handles = Vec::with_capacity(workers);
    for (i, conns) in buckets.into_iter().enumerate() {
        let h =
            worker::spawn(i, conns, settings.clone(), counters[i].clone(), phase_rx.clone(), live_tx.clone())
                .map_err(|e| format!("starting worker thread: {e}"))?;
        handles.push(h);
    }
    drop(live_tx);
    drop(phase_rx);

    let mut live = Live {
        counters: &counters,
        rx: live_rx,
        quiet: o.quiet,
        t0,
        last: t0,
        last_sent: 0,
        last_recv: 0,
        planned,
        broker: broker.as_ref(),
        peak_rss_kib: broker_before.map_or(0, |s| s.rss_kib),
    };

    // Set-up: every connection connected (and subscribed) or failed.
    let setup_bound = t0 + last_connect_at + settings.connect_timeout * 2 + Duration::from_secs(1);
    while total(&counters, |c| &c.settled) < planned as u64 && Instant::now() < setup_bound {
        std::thread::sleep(POLL);
        live.maybe_print("connect");
    }
    let setup_s = t0.elapsed().as_secs_f64();
    let setup_complete = total(&counters, |c| &c.settled) >= planned as u64;
    let broker_connected = broker.as_ref().and_then(Broker::sample);
    let up_after_setup = total(&counters, |c| &c.up);

    // Load: skipped when every subscription failed, since nothing could be measured.
    let no_receivers = plan.subscribers > 0 && total(&counters, |c| &c.subscribed) == 0;
    if no_receivers {
        eprintln!("no subscription was granted: skipping the load (see the errors below)");
    }
    if !no_receivers {
        let _ = phase_tx.send(Phase::Running);
    }
    let t_run = Instant::now();
    let run_until = if no_receivers { t_run } else { t_run + Duration::from_secs(o.duration) };
    while Instant::now() < run_until {
        std::thread::sleep(POLL.min(run_until.saturating_duration_since(Instant::now())));
        live.maybe_print(if matches!(command, Command::Conn(_)) { "hold" } else { "load" });
    }
    let load_s = t_run.elapsed().as_secs_f64();

    // Drain: publishers stop; wait for what is in flight.
    let _ = phase_tx.send(Phase::Draining);
    let t_stop = Instant::now();
    let drain_bound = if no_receivers { t_stop } else { t_stop + Duration::from_secs(o.drain_timeout) };
    let drained = || {
        let sent = total(&counters, |c| &c.sent);
        // With every connection gone nothing more can arrive.
        let all_down = total(&counters, |c| &c.up) == 0;
        all_down
            || total(&counters, |c| &c.publishing) == 0
                && total(&counters, |c| &c.inflight) == 0
                && total(&counters, |c| &c.recv_unique) >= sent * plan.fan
    };
    let mut drain_complete = drained();
    while !drain_complete && Instant::now() < drain_bound {
        std::thread::sleep(POLL);
        live.maybe_print("drain");
        drain_complete = drained();
    }
    let drain_s = t_stop.elapsed().as_secs_f64();
    let stop_ns = (t_stop - t0).as_nanos() as u64;
    let last_activity_ns =
        counters.iter().map(|c| c.last_delivery_ns.load(std::sync::atomic::Ordering::Relaxed)).max();
    let last_activity_after_stop_s = last_activity_ns.unwrap_or(0).saturating_sub(stop_ns) as f64 / 1e9;

    let _ = phase_tx.send(Phase::Done);
    let broker_after = broker.as_ref().and_then(Broker::sample);
    let locals: Vec<Local> = handles
        .into_iter()
        .map(|h| h.join().map_err(|_| "a worker thread panicked".to_string()))
        .collect::<Result<_, _>>()?;
    let wall_s = t0.elapsed().as_secs_f64();
    let self_cpu_s = procstat::self_cpu_s() - cpu_before;

    // Merge.
    let mut latency = new_histogram();
    let mut connect = new_histogram();
    let mut r = Results::new(command, o, &plan, workers);
    let mut group_sets: Vec<SeenSet> = Vec::new();
    let mut group_dup = 0;
    let mut errors: Vec<(String, u64)> = Vec::new();
    for l in &locals {
        let _ = latency.add(&l.latency);
        let _ = connect.add(&l.connect);
        r.unique += l.unique;
        r.dup += l.dup;
        r.out_of_order += l.out_of_order;
        r.gaps += l.gaps;
        r.foreign += l.foreign;
        r.refused += l.refused;
        r.unacked += l.unacked;
        for q in 0..3 {
            r.granted[q] += l.granted[q];
        }
        group_dup += l.group_dup;
        for (i, set) in l.group.iter().enumerate() {
            if i >= group_sets.len() {
                group_sets.resize_with(i + 1, SeenSet::default);
            }
            group_dup += group_sets[i].merge(set);
        }
        for (text, n) in &l.errors {
            match errors.iter_mut().find(|(t, _)| t == text) {
                Some(e) => e.1 += n,
                None => errors.push((text.clone(), *n)),
            }
        }
    }
    if group {
        r.unique += group_sets.iter().map(SeenSet::count).sum::<u64>();
        r.dup += group_dup;
    }
    let c = &counters;
    r.connect_attempts = total(c, |c| &c.connect_attempts);
    r.connected = total(c, |c| &c.connected);
    r.connect_failed = total(c, |c| &c.connect_failed);
    r.connect_refused = total(c, |c| &c.connect_refused);
    r.subscribed = total(c, |c| &c.subscribed);
    r.subscribe_failed = total(c, |c| &c.subscribe_failed);
    r.closed_by_broker = total(c, |c| &c.closed_by_broker);
    r.protocol_errors = total(c, |c| &c.protocol_errors);
    r.up_after_setup = up_after_setup;
    r.sent = total(c, |c| &c.sent);
    r.acked = total(c, |c| &c.acked);
    r.recv_load = total(c, |c| &c.recv_load);
    r.recv_drain = total(c, |c| &c.recv_drain);
    r.expected = r.sent * plan.fan;
    r.lost = if plan.fan > 0 { r.expected.saturating_sub(r.unique) } else { r.gaps };
    r.setup_s = setup_s;
    r.setup_complete = setup_complete;
    let first = c.iter().map(|c| c.first_attempt_ns.load(std::sync::atomic::Ordering::Relaxed)).min();
    let last = c.iter().map(|c| c.last_connack_ns.load(std::sync::atomic::Ordering::Relaxed)).max();
    if let (Some(first), Some(last)) = (first, last) {
        if last > first && r.connected > 0 {
            r.connect_rate = r.connected as f64 / ((last - first) as f64 / 1e9);
        }
    }
    r.load_s = load_s;
    r.drain_s = drain_s;
    r.drain_complete = drain_complete;
    r.last_activity_after_stop_s = last_activity_after_stop_s;
    r.wall_s = wall_s;
    r.self_cpu_s = self_cpu_s;
    r.latency = latency;
    r.connect_latency = connect;
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    r.errors = errors;
    if let (Some(before), Some(after)) = (broker_before, broker_after) {
        let connected = broker_connected.unwrap_or(after);
        let delivered = r.recv_load + r.recv_drain;
        let cpu_s = after.cpu_s - before.cpu_s;
        r.broker = Some(BrokerFigures {
            pid: o.broker_pid.unwrap_or(0),
            cpu_s,
            cpu_s_per_million: if delivered > 0 { cpu_s / (delivered as f64 / 1e6) } else { 0.0 },
            rss_before_kib: before.rss_kib,
            rss_connected_kib: connected.rss_kib,
            rss_after_kib: after.rss_kib,
            peak_rss_kib: live.peak_rss_kib.max(connected.rss_kib).max(after.rss_kib),
            rss_per_conn_bytes: if up_after_setup > 0 {
                (connected.rss_kib as f64 - before.rss_kib as f64) * 1024.0 / up_after_setup as f64
            } else {
                0.0
            },
        });
    }
    Ok(r)
}
