//! `ringraft`: one node of a cluster (`run`), and a status query (`status`).
//!
//! `ringraft run --config node.toml`: see [`ringraft_net::node::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringraft_net::client::{fetch_group_metrics, ClientConfig, NetClient};

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
    /// Shows every group on one node: leader, term, commit and applied index, commit and apply
    /// lag, queued commands, waiting reads, leader changes, Busy answers.
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
    let groups = match fetch_group_metrics(addr, &ClientConfig::new([addr])) {
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
                    "group": g.group, "leader": g.leader, "is_leader": g.is_leader,
                    "term": g.term, "last_index": g.last_index, "commit": g.commit,
                    "applied": g.applied, "commit_lag": g.commit_lag, "apply_lag": g.apply_lag,
                    "queued_commands": g.queued_commands, "queued_bytes": g.queued_bytes,
                    "reads_waiting": g.reads_waiting, "proposals": g.proposals,
                    "commands_proposed": g.commands_proposed, "entries_appended": g.entries_appended,
                    "bytes_appended": g.bytes_appended, "leader_changes": g.leader_changes,
                    "busy_answers": g.busy_answers,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!(
            "{:>6} {:>7} {:>8} {:>12} {:>12} {:>10} {:>9} {:>8} {:>6} {:>8} {:>6}",
            "group",
            "leader",
            "term",
            "commit",
            "applied",
            "commit-lag",
            "apply-lag",
            "queued",
            "reads",
            "changes",
            "busy"
        );
        for g in &groups {
            let leader = match (g.leader, g.is_leader) {
                (Some(l), true) => format!("{l}*"),
                (Some(l), false) => l.to_string(),
                (None, _) => "-".into(),
            };
            println!(
                "{:>6} {:>7} {:>8} {:>12} {:>12} {:>10} {:>9} {:>8} {:>6} {:>8} {:>6}",
                g.group,
                leader,
                g.term,
                g.commit,
                g.applied,
                g.commit_lag,
                g.apply_lag,
                g.queued_commands,
                g.reads_waiting,
                g.leader_changes,
                g.busy_answers
            );
        }
        println!("(* this node leads the group)");
    }
    ExitCode::SUCCESS
}
