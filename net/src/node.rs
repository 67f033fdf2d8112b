//! Running one node as a process: what `ringraft run` (and `ringraft-bench`'s node processes)
//! do. Validates the config (every problem reported, exit 2), logs through tracing (level from
//! `node.log_level` or `RUST_LOG`), starts the engine with the TCP transport and serves until
//! SIGTERM or SIGINT; then it stops accepting, answers what is in flight, syncs, checkpoints and
//! exits 0. A SIGKILL at any moment loses no acknowledged write: those are in a quorum's synced
//! WALs.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ringraft_engine::Engine;
use ringraft_tuning::{Config, Topology};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{error, info};

use crate::TcpTransport;

/// Runs the node configured in `path` until SIGTERM/SIGINT.
pub fn run(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ringraft: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.node.log_level.clone());
    let filter = match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("ringraft: node.log_level / RUST_LOG {filter:?}: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let topology = Topology::detect();
    if let Err(errors) = ringraft_tuning::validate(&config, &topology) {
        eprintln!("ringraft: {}: {errors}", path.display());
        return ExitCode::from(2);
    }
    // Signals first, so one arriving during start is not lost.
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("ringraft: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let transport = Arc::new(TcpTransport::new(&config));
    let engine = match Engine::start(config.clone(), transport) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("ringraft: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(node = config.node.id, data_dir = %config.node.data_dir.display(), "node running");
    if config.shards.pin {
        let cpus = ringraft_tuning::resolve_cpus(&config, &topology);
        if let Some((interrupted, elsewhere)) =
            ringraft_tuning::shards_away_from_interrupts(&config.node.data_dir, &cpus)
        {
            info!(
                ?interrupted,
                ?elsewhere,
                "the data disk interrupts other CPUs than some shards run on: those shards are woken \
                 across CPUs after each WAL write (shards.cpus can list the interrupted CPUs first)"
            );
        }
    }
    let engine = Arc::new(engine);
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = match config.node.metrics_addr {
        Some(addr) => match crate::metrics::serve(addr, engine.clone(), stop.clone()) {
            Ok(thread) => Some(thread),
            Err(e) => {
                error!("cannot serve metrics: {e}");
                drop(engine);
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // Wait for a signal, or for a shard to stop on its own (a disk failure): then exit.
    let mut failed = false;
    loop {
        if let Some(signal) = signals.pending().next() {
            info!(
                signal,
                "stopping: answering in-flight requests, handing leadership over, syncing"
            );
            break;
        }
        if let Some(cause) = engine.failure() {
            error!("stopping: {cause}");
            failed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(thread) = metrics {
        let _ = thread.join();
    }
    let engine = Arc::try_unwrap(engine).expect("the metrics thread has stopped");
    match engine.shutdown() {
        Ok(()) if !failed => {
            info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            error!("a shard failed: {e}");
            ExitCode::FAILURE
        }
    }
}
