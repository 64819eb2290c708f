//! ringmq-loadtest: an MQTT 3.1.1/5.0 load generator for ringmq and any other broker.
//!
//! - [`cli`]: the flags (clap derive); `--help` documents each one.
//! - [`plan`]: a command (conn, pub, sub, fanin, fanout, p2p, sharedsub) becomes a list
//!   of connections, each idle, a publisher or a subscriber.
//! - [`run`]: the coordinator thread: starts the workers, moves them through the phases
//!   (set-up → load → drain → done), prints the live line, merges the results.
//! - [`worker`]: one thread, one runtime, its share of the connections.
//! - [`conn`]: one connection's task and state machine (MQTT client side, QoS 0/1/2).
//! - [`payload`]: the stamp in every payload and the pre-encoded PUBLISH template.
//! - [`stats`]: stream, group and live counters; latency histograms.
//! - [`procstat`]: broker CPU/RSS from /proc, our own CPU from getrusage.
//! - [`report`]: the summary table, `--json`, `--hdr-out`.
//!
//! # Runtime: one tokio current-thread runtime per worker thread
//!
//! Each of `--workers` threads runs its own current-thread tokio runtime with a
//! `LocalSet`; connections are spread round-robin over the workers and never move. This
//! is thread-per-core like the broker it measures, without work stealing, locks or
//! `Send` bounds: a worker's connections share its histograms and counters through
//! `Rc<RefCell<_>>`, and the only cross-thread traffic is a relaxed atomic add per
//! batch, a latency histogram per second, and the phase broadcast.
//!
//! Why tokio rather than glommio (which ringmq uses): a load generator must work on any
//! Linux box and against any broker, and must never be the bottleneck or the failure.
//! glommio needs io_uring and locked memory per executor (RLIMIT_MEMLOCK is 8 MiB here,
//! glommio reserves 10 MiB by default), so every worker would need tuning or fail to
//! start; tokio's epoll reactor has no such limits, and its readiness API
//! (`readable`/`writable` + `try_read`/`try_write`) lets one task per connection read in
//! large chunks and write coalesced batches without ever awaiting per message. At the
//! message sizes of MQTT benchmarks the cost is syscalls per batch, which both runtimes
//! amortise the same way.
//!
//! # The hot path
//!
//! A publisher copies a PUBLISH encoded once by `ringmq::codec` into its write buffer and
//! patches the packet id and payload stamp (no allocation per message); it writes
//! whatever accumulated in one `write`. A subscriber reads up to 64 KiB at once, decodes
//! every packet with `ringmq::codec::decode` (payloads are slices of the read buffer),
//! records latency into a per-worker histogram, and sends all its acks in one write.

#![recursion_limit = "256"]

mod cli;
mod conn;
mod payload;
mod plan;
mod procstat;
mod report;
mod run;
mod stats;
mod tls;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let opts = cli.command.opts();
    let results = match run::run(&cli.command) {
        Ok(results) => results,
        Err(e) => {
            eprintln!("ringmq-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", results.table());
    if let Some(path) = &opts.json {
        let text = results.json().to_string();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("ringmq-loadtest: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = &opts.hdr_out {
        if let Err(e) = report::write_hgrm(&results.latency, path) {
            eprintln!("ringmq-loadtest: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
