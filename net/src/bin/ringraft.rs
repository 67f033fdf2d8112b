//! `ringraft`: one node of a cluster (`run`), and a status query (`status`).
//!
//! `ringraft run --config node.toml`: see [`ringraft_net::node::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringraft_net::client::{fetch_status, ClientConfig, NetClient};

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
    /// Hands leadership of a group to another node (or the most up-to-date follower) and waits
    /// until it moved.
    Transfer {
        /// Any node's client address, host:port.
        #[arg(long)]
        addr: String,
        #[arg(long)]
        group: u64,
        /// The node to lead the group; default: the most up-to-date follower.
        #[arg(long)]
        to: Option<u64>,
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
        Cmd::Run { config } => ringraft_net::node::run(&config),
        Cmd::Status { addr, json } => status(&addr, json),
        Cmd::Transfer { addr, group, to } => transfer(&addr, group, to),
    }
}

fn transfer(addr: &str, group: u64, to: Option<u64>) -> ExitCode {
    let outcome = NetClient::connect(ClientConfig::new([addr]))
        .and_then(|client| client.transfer_leader_blocking(group, to));
    match outcome {
        Ok(()) => {
            println!("leadership of group {group} moved");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringraft: transfer of group {group}: {e}");
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
