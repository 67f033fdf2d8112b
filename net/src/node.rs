//! Running one node as a process: what `ringraft run` (and `ringraft-bench`'s node processes)
//! do. Validates the config (every problem reported, exit 2), logs through tracing (level from
//! `node.log_level` or `RUST_LOG`), starts the engine with the TCP transport and serves until
//! SIGTERM or SIGINT; then it stops accepting, answers what is in flight, syncs, checkpoints and
//! exits 0. A SIGKILL at any moment loses no acknowledged write: those are in a quorum's synced
//! WALs. SIGHUP re-reads the config file and applies `node.log_level` and nodes added to or
//! removed from `cluster.nodes` (see [`reload`]); a file that does not load or validate changes
//! nothing, and other changed settings wait for a restart (logged).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ringraft_engine::Engine;
use ringraft_tuning::{AddressBookChange, Config, Topology};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload::Handle, EnvFilter, Registry};

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
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = rust_log.clone().unwrap_or_else(|| config.node.log_level.clone());
    let filter = match EnvFilter::try_new(&filter) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("ringraft: node.log_level / RUST_LOG {filter:?}: {e}");
            return ExitCode::from(2);
        }
    };
    // The filter sits behind a reload handle so that SIGHUP can change it.
    let (filter, log_filter) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only for a terminal: a log file gets plain text.
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    let topology = Topology::detect();
    if let Err(errors) = ringraft_tuning::validate(&config, &topology) {
        eprintln!("ringraft: {}: {errors}", path.display());
        return ExitCode::from(2);
    }
    // Signals first, so one arriving during start is not lost.
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
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
    let mut running = config.clone();
    'serving: loop {
        for signal in signals.pending() {
            if signal == SIGHUP {
                reload(
                    path,
                    &mut running,
                    rust_log.is_some(),
                    &log_filter,
                    &topology,
                    &engine,
                );
                continue;
            }
            info!(
                signal,
                "stopping: answering in-flight requests, handing leadership over, syncing"
            );
            break 'serving;
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

/// SIGHUP: reads `path` again and applies to the running node its `node.log_level` (unless
/// `RUST_LOG` decides the level) and nodes added to or removed from `cluster.nodes` (when
/// that is the only change to the `cluster` section: [`Config::address_book_change`]). A file
/// that does not load or validate changes nothing (the node goes on as it runs, and says why);
/// other settings that differ from `running` are named as taking effect at the next start.
fn reload(
    path: &std::path::Path,
    running: &mut Config,
    rust_log: bool,
    log_filter: &Handle<EnvFilter, Registry>,
    topology: &Topology,
    engine: &Engine,
) {
    info!("SIGHUP: re-reading {}", path.display());
    let new = match Config::load(path) {
        Ok(new) => new,
        Err(e) => {
            error!("SIGHUP: {e}; nothing changes");
            return;
        }
    };
    if let Err(errors) = ringraft_tuning::validate(&new, topology) {
        error!("SIGHUP: {}: {errors}; nothing changes", path.display());
        return;
    }
    if new.node.log_level != running.node.log_level {
        if rust_log {
            warn!("SIGHUP: node.log_level changed, but RUST_LOG is set and keeps deciding the log level");
        } else {
            let level = new.node.log_level.clone();
            match EnvFilter::try_new(&level).map(|filter| log_filter.reload(filter)) {
                Ok(Ok(())) => {
                    running.node.log_level = level.clone();
                    info!(log_level = %level, "SIGHUP: node.log_level applied");
                }
                Ok(Err(e)) => error!("SIGHUP: cannot apply node.log_level {level:?}: {e}"),
                Err(e) => error!("SIGHUP: node.log_level {level:?}: {e}"),
            }
        }
    }
    if new.cluster != running.cluster {
        match running.address_book_change(&new) {
            Ok(change) => match apply_address_book(engine, &change) {
                // All of the section: `address_book_change` found the rest equivalent (the
                // voters may have been written out where they were left implicit).
                Ok(()) => running.cluster = new.cluster.clone(),
                // What was applied stays (shards that took added nodes keep them); the next
                // SIGHUP tries the rest again.
                Err(e) => error!("SIGHUP: {e}"),
            },
            Err(why) => warn!(
                "SIGHUP: {why}; the node applies only added and removed nodes to a running \
                 cluster section, so this waits for a restart"
            ),
        }
    }
    let mut rest = new;
    rest.node.log_level = running.node.log_level.clone();
    rest.cluster = running.cluster.clone();
    if rest != *running {
        warn!(
            "SIGHUP: {} changes settings other than node.log_level and the address book; they \
             take effect when the node restarts",
            path.display()
        );
    }
}

/// Adds, then removes, the nodes of an address book change (see [`Engine::add_nodes`] and
/// [`Engine::remove_nodes`]: a node still in a group leaves once it is in none).
fn apply_address_book(engine: &Engine, change: &AddressBookChange) -> Result<(), String> {
    if !change.added.is_empty() {
        let ids: Vec<u64> = change.added.iter().map(|n| n.id).collect();
        engine
            .add_nodes(&change.added)
            .map_err(|e| format!("cannot add nodes {ids:?}: {e}"))?;
        info!(?ids, "SIGHUP: nodes added to the address book");
    }
    if !change.removed.is_empty() {
        let ids = &change.removed;
        let held = engine
            .remove_nodes(ids)
            .map_err(|e| format!("cannot remove nodes {ids:?}: {e}"))?;
        let gone: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| !held.iter().any(|(node, _)| node == id))
            .collect();
        if !gone.is_empty() {
            info!(ids = ?gone, "SIGHUP: nodes removed from the address book");
        }
        for (node, groups) in held {
            warn!(
                "SIGHUP: node {node} leaves the address book once it is a member of no group here; \
                 it still is of groups {groups:?} (ringraft member remove), and no group takes it \
                 meanwhile"
            );
        }
    }
    Ok(())
}
