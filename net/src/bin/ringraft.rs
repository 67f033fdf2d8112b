//! `ringraft`: one node of a cluster (`run`), and admin commands: `status`, `cluster`,
//! `transfer`, `member`.
//!
//! `ringraft run --config node.toml`: see [`ringraft_net::node::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use ringraft_engine::MemberChange;
use ringraft_net::client::{fetch_cluster, fetch_group_metrics, ClientConfig, ClientError, NetClient};
use ringraft_net::protocol::Failure;

/// jemalloc: glibc's malloc spent a fifth of a loaded leader's shard thread in `_int_malloc`
/// and `malloc_consolidate` (see ARCHITECTURE.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Changes group membership: `add` a node as a learner (it catches up from the leader:
    /// snapshot, then log), `promote` it to voter (the leader answers BUSY until it has caught
    /// up, and this waits), `remove` it; `add-voter` adds a voter at once. Applies to one group or, by default, every group; each change returns once applied.
    /// Replacing a node: add the new one, promote it, remove the old one.
    Member {
        action: MemberAction,
        /// Any node's client address, host:port.
        #[arg(long)]
        addr: String,
        /// The node added, promoted or removed.
        #[arg(long)]
        node: u64,
        /// One group; default: every group.
        #[arg(long)]
        group: Option<u64>,
        /// How long to keep asking while a leader answers BUSY: a learner not caught up yet
        /// (see raft.promote_lag_max_entries), or another change of the group still applying.
        #[arg(long, default_value_t = 600)]
        wait_s: u64,
    },
    /// Shows the cluster as one node knows it: cluster id, groups, shards, and its address
    /// book (each member's id, host, peer and client ports). After a SIGHUP that added or
    /// removed nodes, ask each node to see that it took the change.
    Cluster {
        /// The node's client address, host:port.
        #[arg(long)]
        addr: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    if !matches!(cli.command, Cmd::Run { .. }) {
        // An admin command piped into `head` ends quietly when the reader goes, instead of
        // panicking on the failed print (Rust ignores SIGPIPE). Its sockets are std's, which
        // send with MSG_NOSIGNAL, so only its output is concerned. A node (`run`) keeps ignoring
        // it: a peer or client closing its socket is an error value there, never the end.
        // SAFETY: setting a signal's disposition to its default before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Cmd::Run { config } => ringraft_net::node::run(&config),
        Cmd::Status { addr, json } => status(&addr, json),
        Cmd::Cluster { addr, json } => cluster(&addr, json),
        Cmd::Transfer { addr, group, to } => transfer(&addr, group, to),
        Cmd::Member {
            action,
            addr,
            node,
            group,
            wait_s,
        } => member(&addr, action, node, group, Duration::from_secs(wait_s)),
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MemberAction {
    Add,
    AddVoter,
    Promote,
    Remove,
}

fn member(addr: &str, action: MemberAction, node: u64, group: Option<u64>, wait: Duration) -> ExitCode {
    let client = match NetClient::connect(ClientConfig::new([addr])) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("ringraft: member: {e}");
            return ExitCode::FAILURE;
        }
    };
    let change = match action {
        MemberAction::Add => MemberChange::AddLearner(node),
        MemberAction::AddVoter | MemberAction::Promote => MemberChange::AddVoter(node),
        MemberAction::Remove => MemberChange::Remove(node),
    };
    let groups: Vec<u64> = match group {
        Some(group) => vec![group],
        None => (0..client.cluster().groups).collect(),
    };
    let deadline = Instant::now() + wait;
    for group in groups {
        let mut said = false;
        loop {
            match client.change_membership_blocking(group, vec![change]) {
                Ok(()) => break,
                Err(e) => match busy(&e) {
                    // The client retried for a while already; keep asking until the deadline.
                    Some(why) if Instant::now() < deadline => {
                        if !std::mem::replace(&mut said, true) {
                            println!("group {group}: waiting ({why})");
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    _ => {
                        eprintln!("ringraft: member {action:?} node {node} in group {group}: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            }
        }
        println!("group {group}: {change:?} applied");
    }
    ExitCode::SUCCESS
}

/// The reason of a `BUSY` answer, also when the client gave up after retrying it.
fn busy(error: &ClientError) -> Option<&str> {
    match error {
        ClientError::Server(Failure::Busy(why)) => Some(why),
        ClientError::GaveUp { last, .. } => busy(last),
        _ => None,
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

fn cluster(addr: &str, json: bool) -> ExitCode {
    let info = match fetch_cluster(addr, &ClientConfig::new([addr])) {
        Ok(info) => info,
        Err(e) => {
            eprintln!("ringraft: cluster from {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let members: Vec<serde_json::Value> = info
            .members
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id, "host": m.host, "peer_port": m.peer_port, "client_port": m.client_port,
                })
            })
            .collect();
        let out = serde_json::json!({
            "cluster": info.cluster, "groups": info.groups, "shards": info.shards, "members": members,
        });
        println!("{out}");
    } else {
        println!(
            "cluster {}: {} groups on {} shards per node",
            info.cluster, info.groups, info.shards
        );
        println!(
            "{:>6}  {:<40} {:>9} {:>11}",
            "node", "host", "peer-port", "client-port"
        );
        for m in &info.members {
            println!(
                "{:>6}  {:<40} {:>9} {:>11}",
                m.id, m.host, m.peer_port, m.client_port
            );
        }
    }
    ExitCode::SUCCESS
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
                    "busy_answers": g.busy_answers, "voters": g.voters, "learners": g.learners,
                    "first_index": g.first_index, "checkpoint_index": g.checkpoint_index,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!(
            "{:>6} {:>7} {:>8} {:>12} {:>12} {:>12} {:>12} {:>10} {:>9} {:>8} {:>6} {:>8} {:>6}  members",
            "group",
            "leader",
            "term",
            "commit",
            "applied",
            "checkpoint",
            "log-from",
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
            let ids = |l: &[u64]| l.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            let members = if g.learners.is_empty() {
                ids(&g.voters)
            } else {
                format!("{} learners {}", ids(&g.voters), ids(&g.learners))
            };
            println!(
                "{:>6} {:>7} {:>8} {:>12} {:>12} {:>12} {:>12} {:>10} {:>9} {:>8} {:>6} {:>8} {:>6}  {}",
                g.group,
                leader,
                g.term,
                g.commit,
                g.applied,
                g.checkpoint_index,
                g.first_index,
                g.commit_lag,
                g.apply_lag,
                g.queued_commands,
                g.reads_waiting,
                g.leader_changes,
                g.busy_answers,
                members
            );
        }
        println!("(* this node leads the group)");
    }
    ExitCode::SUCCESS
}
