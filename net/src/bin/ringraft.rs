//! `ringraft`: one node of a cluster (`run`), and a status query (`status`).
//!
//! `ringraft run --config node.toml` validates the config (every problem reported, exit 2),
//! starts the engine with the TCP transport and serves until SIGTERM or SIGINT; then it stops
//! accepting, answers what is in flight, syncs, checkpoints and exits 0. A SIGKILL at any moment
//! loses no acknowledged write (they are in a quorum's synced WALs).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ringraft_engine::Engine;
use ringraft_net::client::{fetch_status, ClientConfig};
use ringraft_net::TcpTransport;
use ringraft_tuning::{Config, Topology};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{error, info};

#[derive(Parser, Debug)]
#[command(name = "ringraft", version, about = "A ringraft node")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs one node until SIGTERM/SIGINT.
    Run {
        /// The node's TOML config (docs/config.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// Shows leader, term, commit and applied index of every group on one node.
    Status {
        /// The node's client address, host:port (any of its shards' client ports).
        #[arg(long)]
        addr: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run { config } => run(&config),
        Cmd::Status { addr, json } => status(&addr, json),
    }
}

fn run(path: &std::path::Path) -> ExitCode {
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
    if let Err(errors) = ringraft_tuning::validate(&config, &Topology::detect()) {
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
    let signal = signals.forever().next();
    info!(?signal, "stopping: answering in-flight requests, syncing");
    match engine.shutdown() {
        Ok(()) => {
            info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("a shard failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(addr: &str, json: bool) -> ExitCode {
    let groups = match fetch_status(addr, &ClientConfig::new([addr])) {
        Ok(groups) => groups,
        Err(e) => {
            eprintln!("ringraft: status from {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let rows: Vec<serde_json::Value> = groups
            .iter()
            .map(|g| {
                serde_json::json!({
                    "node": g.node, "group": g.group, "leader": g.leader,
                    "term": g.term, "commit": g.commit, "applied": g.applied,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!(
            "{:>6} {:>6} {:>7} {:>8} {:>12} {:>12}",
            "node", "group", "leader", "term", "commit", "applied"
        );
        for g in &groups {
            let leader = g.leader.map_or("-".to_string(), |l| l.to_string());
            println!(
                "{:>6} {:>6} {:>7} {:>8} {:>12} {:>12}",
                g.node, g.group, leader, g.term, g.commit, g.applied
            );
        }
    }
    ExitCode::SUCCESS
}
