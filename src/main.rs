//! The `ringmq` binary: parses flags, starts the broker, stops it on SIGINT or SIGTERM,
//! reloads TLS certificates and authentication files on SIGHUP. `ringmq passwd` manages
//! password files.

use ringmq::config::Cli;

fn main() {
    // Buffers of 128 KiB and more (a large packet's read buffer) are mapped and unmapped on
    // their own: glibc would otherwise raise this threshold after the first such free and
    // keep later ones in its heap, holding memory the broker no longer uses.
    // SAFETY: a plain call before any other thread exists.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "passwd") {
        std::process::exit(ringmq::auth::passwd_cli::run(&args[2..]));
    }
    let loaded = match Cli::load(args) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("ringmq: {err}");
            std::process::exit(1);
        }
    };
    let cli = &loaded.cli;
    if cli.example_config {
        print!("{}", ringmq::config::file::example(&<Cli as clap::CommandFactory>::command()));
        return;
    }
    if cli.check_config {
        // TLS listeners' files are read too: a certificate that will not load is an error now.
        for listener in &loaded.listeners {
            if let Some(files) = &listener.tls {
                if let Err(err) = ringmq::tls::server_config(files) {
                    eprintln!("ringmq: TLS listener {}: {err}", listener.name());
                    std::process::exit(1);
                }
            }
            // And its password file, ACL and JWT key.
            if let Err(err) = ringmq::auth::load_slot(&listener.auth) {
                eprintln!("ringmq: listener {}: {err}", listener.name());
                std::process::exit(1);
            }
        }
        print!("{}", loaded.effective);
        return;
    }
    if !cli.owner_of.is_empty() {
        let shards = cli.cores.unwrap_or_else(|| ringmq::config::available_cpus().len());
        for id in &cli.owner_of {
            println!("{}", ringmq::broker::placement::owner(id, shards));
        }
        return;
    }
    if let Err(err) = cli.check_http().and_then(|_| cli.cluster_settings().map(|_| ())) {
        eprintln!("ringmq: {err}");
        std::process::exit(1);
    }
    init_logs(&cli.log_level, cli.log_format);

    // Block the stop signals before any other thread starts, so they all inherit the mask
    // and the signal thread alone receives them through sigwait.
    let signals = stop_signals();
    // SAFETY: plain signal-mask syscalls on a local set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };

    let shutdown = ringmq::Shutdown::new();
    // Signals are taken from the start: a stop asked for while the broker is still
    // starting (a cluster node waiting for etcd, a long log recovery) ends the start-up.
    let (signals_tx, signals_rx) = std::sync::mpsc::channel();
    let stopper = shutdown.clone();
    let waiter = std::thread::Builder::new().name("ringmq-signals".into()).spawn(move || loop {
        let mut signal = 0;
        // SAFETY: waits on the blocked set above.
        unsafe { libc::sigwait(&signals, &mut signal) };
        if signal != libc::SIGHUP {
            stopper.trigger();
        }
        if signals_tx.send(signal).is_err() {
            return;
        }
    });
    if let Err(err) = waiter {
        eprintln!("ringmq: cannot start the signal thread: {err}");
        std::process::exit(1);
    }
    let broker = match ringmq::start(loaded.into_config(), shutdown.clone()) {
        Ok(broker) => broker,
        Err(_) if shutdown.is_triggered() => {
            tracing::info!("stopped before start-up finished");
            return;
        }
        Err(err) => {
            eprintln!("ringmq: {err}");
            std::process::exit(1);
        }
    };
    let signal = loop {
        match signals_rx.recv() {
            // SIGHUP: certificates, password files, ACLs and JWT keys are read again;
            // connections stay.
            Ok(libc::SIGHUP) => {
                broker.reload_tls();
                broker.reload_auth();
            }
            Ok(signal) => break signal,
            Err(_) => break 0,
        }
    };
    tracing::info!(signal, "stopping");
    broker.stop();
}

/// Log lines go to stderr (stdout is for what a command prints, e.g. `--check-config`),
/// coloured only on a terminal: a file or journald gets plain text.
fn init_logs(level: &str, format: ringmq::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        ringmq::config::LogFormat::Text => builder.with_ansi(ansi).init(),
        ringmq::config::LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}
