//! Prometheus metrics: the engine's [`NodeMetrics`] and process figures in the text exposition
//! format (version 0.0.4), served at `GET /metrics` on `node.metrics_addr` by `ringraft run`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringraft_engine::{Engine, Histogram, NodeMetrics, ShardMetrics};
use tracing::{info, warn};

/// One metric family: its help, type and samples (labels, value).
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: f64) {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
    }

    fn summary(&mut self, name: &str, labels: &[(&str, String)], histogram: &Histogram<u64>) {
        for q in [0.5, 0.9, 0.99, 0.999] {
            let mut with_q = labels.to_vec();
            with_q.push(("quantile", q.to_string()));
            self.sample(name, &with_q, histogram.value_at_quantile(q) as f64);
        }
        let mean_sum = histogram.mean() * histogram.len() as f64;
        self.sample(&format!("{name}_sum"), labels, mean_sum);
        self.sample(&format!("{name}_count"), labels, histogram.len() as f64);
    }
}

/// User + system CPU seconds of a process from its `/proc/<pid>/stat` (0 if unreadable).
pub fn cpu_seconds(stat_path: &str) -> f64 {
    let ticks = (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64;
    std::fs::read_to_string(stat_path)
        .ok()
        .and_then(|stat| {
            // The fields after the command name (which may hold spaces and parentheses).
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some((fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

/// (user + system CPU seconds, resident bytes) of this process, from /proc.
fn process_usage() -> (f64, f64) {
    let cpu = cpu_seconds("/proc/self/stat");
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |pages| {
            pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64
        });
    (cpu, rss)
}

/// The exposition text for one node.
pub fn render(metrics: &NodeMetrics) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    let node = metrics.node.to_string();
    type ShardField = fn(&ringraft_engine::ShardMetrics) -> f64;
    let shard_counters: [(&str, &str, &str, ShardField); 27] = [
        (
            "ringraft_proposals_total",
            "counter",
            "Raft entries proposed (one batch of commands each).",
            |s| s.stats.proposals as f64,
        ),
        (
            "ringraft_commands_proposed_total",
            "counter",
            "Client commands proposed.",
            |s| s.stats.commands_proposed as f64,
        ),
        (
            "ringraft_entries_applied_total",
            "counter",
            "Committed entries applied.",
            |s| s.stats.entries_applied as f64,
        ),
        (
            "ringraft_busy_answers_total",
            "counter",
            "Requests refused with Busy (a bounded queue was full).",
            |s| s.stats.busy_answers as f64,
        ),
        (
            "ringraft_snapshots_sent_total",
            "counter",
            "Snapshots streamed to followers behind the compacted log (as leader).",
            |s| s.stats.snapshots_sent as f64,
        ),
        (
            "ringraft_snapshots_installed_total",
            "counter",
            "Snapshots received and installed (as follower).",
            |s| s.stats.snapshots_installed as f64,
        ),
        (
            "ringraft_lease_reads_total",
            "counter",
            "Lease reads served under the leader's lease, without a ReadIndex round.",
            |s| s.stats.lease_reads as f64,
        ),
        (
            "ringraft_wal_writes_total",
            "counter",
            "WAL writes, each made durable by one sync.",
            |s| s.wal_writes as f64,
        ),
        (
            "ringraft_wal_written_bytes_total",
            "counter",
            "Bytes written to the WAL.",
            |s| s.wal_bytes_written as f64,
        ),
        (
            "ringraft_wal_pending_bytes",
            "gauge",
            "Bytes appended to the WAL and not yet written.",
            |s| s.wal_pending_bytes as f64,
        ),
        (
            "ringraft_wal_prepare_failures_total",
            "counter",
            "WAL segment preparations that failed (a full disk, most often) and were retried.",
            |s| s.wal_prepare_failures as f64,
        ),
        (
            "ringraft_wal_prepare_failing",
            "gauge",
            "1 while the WAL retries a failed segment preparation: writes needing it wait.",
            |s| f64::from(u8::from(s.wal_prepare_error.is_some())),
        ),
        (
            "ringraft_groups_asleep",
            "gauge",
            "Groups not ticked: quiesced while idle, or of which this node is no member.",
            |s| s.groups_asleep as f64,
        ),
        (
            "ringraft_nodes_leaving",
            "gauge",
            "Nodes removed from the address book that are still members of a group of this shard (they leave once in none).",
            |s| s.nodes_leaving.len() as f64,
        ),
        (
            "ringraft_requests_waiting",
            "gauge",
            "Client requests accepted and not yet answered.",
            |s| s.requests_waiting as f64,
        ),
        (
            "ringraft_checkpoints_total",
            "counter",
            "State machine checkpoints written (each lets the WAL drop the log below it).",
            |s| s.stats.checkpoints as f64,
        ),
        (
            "ringraft_checkpoints_abandoned_total",
            "counter",
            "State machine checkpoints abandoned for lack of disk space (retried later).",
            |s| s.stats.checkpoints_abandoned as f64,
        ),
        (
            "ringraft_log_reads_total",
            "counter",
            "Reads of older log entries for lagging followers (catch-up from the log).",
            |s| s.stats.log_reads as f64,
        ),
        (
            "ringraft_log_reads_failed_total",
            "counter",
            "Log reads for lagging followers that failed (raft asks again, or sends a snapshot).",
            |s| s.stats.log_reads_failed as f64,
        ),
        (
            "ringraft_apply_stalls_total",
            "counter",
            "Entries the state machine refused to apply for lack of disk space (offered again each tick).",
            |s| s.stats.apply_stalls as f64,
        ),
        (
            "ringraft_restore_stalls_total",
            "counter",
            "Snapshot chunks or installs refused for lack of disk space (the leader resends them).",
            |s| s.stats.restore_stalls as f64,
        ),
        (
            "ringraft_value_reads_total",
            "counter",
            "Client reads served by reading a value from the state machine's data files beside the shard loop.",
            |s| s.stats.value_reads as f64,
        ),
        (
            "ringraft_campaigns_stopped_total",
            "counter",
            "Groups this node stopped campaigning in because a member said it had been removed from them while away.",
            |s| s.stats.campaigns_stopped as f64,
        ),
        (
            "ringraft_snapshot_pieces_unsent_total",
            "counter",
            "Snapshot chunks and ends the transport could not take (no connection, queue full); the stream goes back to them after a pause.",
            |s| s.stats.snapshot_pieces_unsent as f64,
        ),
        (
            "ringraft_snapshot_resends_total",
            "counter",
            "Times a snapshot stream went back to its last acknowledged chunk after an election timeout without progress.",
            |s| s.stats.snapshot_resends as f64,
        ),
        (
            "ringraft_requests_timed_out_total",
            "counter",
            "Requests the shard answered Timeout after limits.request_timeout_ms (outcome unknown).",
            |s| s.requests_timed_out as f64,
        ),
        (
            "ringraft_inbox_depth",
            "gauge",
            "Inputs waiting in the shard's inbox.",
            |s| s.inbox_depth as f64,
        ),
    ];
    for (name, kind, help, value) in shard_counters {
        f.header(name, kind, help);
        for s in &metrics.shards {
            f.sample(
                name,
                &[("node", node.clone()), ("shard", s.shard.to_string())],
                value(s),
            );
        }
    }
    type ShardHistogram = fn(&ShardMetrics) -> &Histogram<u64>;
    let summaries: [(&str, &str, ShardHistogram); 4] = [
        (
            "ringraft_commands_per_entry",
            "Commands per proposed raft entry (batching).",
            |s| &s.commands_per_entry,
        ),
        (
            "ringraft_sync_latency_microseconds",
            "WAL write-to-durable latency.",
            |s| &s.sync_latency_us,
        ),
        (
            "ringraft_commit_latency_microseconds",
            "From a proposal entering the leader's log to its commit in a quorum's synced WALs.",
            |s| &s.commit_latency_us,
        ),
        (
            "ringraft_request_latency_microseconds",
            "From a request reaching its shard to its ok answer: queueing, commit in a quorum's WALs, apply.",
            |s| &s.request_latency_us,
        ),
    ];
    for (name, help, histogram) in summaries {
        f.header(name, "summary", help);
        for s in &metrics.shards {
            f.summary(
                name,
                &[("node", node.clone()), ("shard", s.shard.to_string())],
                histogram(s),
            );
        }
    }
    type GroupField = fn(&ringraft_engine::GroupMetrics) -> f64;
    let group_fields: [(&str, &str, &str, GroupField); 13] = [
        (
            "ringraft_group_is_leader",
            "gauge",
            "1 if this node leads the group.",
            |g| g.is_leader as u8 as f64,
        ),
        (
            "ringraft_group_term",
            "gauge",
            "The group's raft term on this node.",
            |g| g.term as f64,
        ),
        (
            "ringraft_group_commit_index",
            "gauge",
            "The group's commit index on this node.",
            |g| g.commit as f64,
        ),
        (
            "ringraft_group_applied_index",
            "gauge",
            "The group's applied index on this node.",
            |g| g.applied as f64,
        ),
        (
            "ringraft_group_commit_lag",
            "gauge",
            "Entries in the log not yet known committed.",
            |g| g.commit_lag as f64,
        ),
        (
            "ringraft_group_apply_lag",
            "gauge",
            "Entries committed and not yet applied.",
            |g| g.apply_lag as f64,
        ),
        (
            "ringraft_group_queued_commands",
            "gauge",
            "Commands waiting to be proposed.",
            |g| g.queued_commands as f64,
        ),
        (
            "ringraft_group_queued_bytes",
            "gauge",
            "Bytes of commands waiting to be proposed.",
            |g| g.queued_bytes as f64,
        ),
        (
            "ringraft_group_reads_waiting",
            "gauge",
            "Reads waiting to be served.",
            |g| g.reads_waiting as f64,
        ),
        (
            "ringraft_group_leader_changes_total",
            "counter",
            "Times the group's known leader changed.",
            |g| g.leader_changes as f64,
        ),
        (
            "ringraft_group_entries_appended_total",
            "counter",
            "Entries this node wrote to its WAL for the group.",
            |g| g.entries_appended as f64,
        ),
        (
            "ringraft_group_first_index",
            "gauge",
            "The first index still in this node's log for the group (compaction moves it).",
            |g| g.first_index as f64,
        ),
        (
            "ringraft_group_checkpoint_index",
            "gauge",
            "The index of the group's last durable state machine checkpoint on this node.",
            |g| g.checkpoint_index as f64,
        ),
    ];
    for (name, kind, help, value) in group_fields {
        f.header(name, kind, help);
        for g in metrics.groups() {
            f.sample(
                name,
                &[("node", node.clone()), ("group", g.group.to_string())],
                value(g),
            );
        }
    }
    let (cpu, rss) = process_usage();
    f.header(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time of the process.",
    );
    f.sample("process_cpu_seconds_total", &[("node", node.clone())], cpu);
    f.header(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the process.",
    );
    f.sample("process_resident_memory_bytes", &[("node", node)], rss);
    out
}

/// Serves `GET /metrics` on `addr` from a thread of its own until `stop` is set.
pub fn serve(
    addr: std::net::SocketAddr,
    engine: Arc<Engine>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let server = tiny_http::Server::http(addr).map_err(|e| format!("node.metrics_addr {addr}: {e}"))?;
    info!(%addr, "serving metrics at /metrics");
    std::thread::Builder::new()
        .name("ringraft-metrics".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let request = match server.recv_timeout(Duration::from_millis(200)) {
                    Ok(Some(request)) => request,
                    Ok(None) => continue,
                    Err(e) => {
                        warn!("metrics endpoint: {e}");
                        continue;
                    }
                };
                let response = if request.method() == &tiny_http::Method::Get && request.url() == "/metrics" {
                    let body = render(&engine.metrics());
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"text/plain; version=0.0.4"[..],
                    )
                    .expect("a valid header");
                    tiny_http::Response::from_string(body).with_header(header)
                } else {
                    tiny_http::Response::from_string("only GET /metrics is served\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .map_err(|e| format!("metrics thread: {e}"))
}
