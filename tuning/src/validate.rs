//! Validation: every rule names the key at fault and the fix. All problems are reported at once.

use std::collections::BTreeSet;

use crate::config::{Config, CpuList, IoMemory};
use crate::error::{ConfigError, ConfigErrors};
use crate::topology::Topology;

/// WAL block size: segment and batch sizes are multiples of it (O_DIRECT alignment).
pub const WAL_BLOCK_BYTES: u64 = 4096;
/// Per-entry framing the WAL adds to a batch entry (batch header + record header).
pub const WAL_RECORD_OVERHEAD_BYTES: u64 = 96;
/// Room a frame needs beyond one entry's payload (frame and message headers).
pub const FRAME_OVERHEAD_BYTES: u64 = 4096;
/// Room one command needs in a batch beyond its key and value (archive framing).
pub const COMMAND_OVERHEAD_BYTES: u64 = 64;

/// The CPUs that will run shards, in shard order.
pub fn resolve_cpus(config: &Config, topology: &Topology) -> Vec<usize> {
    match &config.shards.cpus {
        CpuList::Auto(_) => topology.online_ids(),
        CpuList::List(list) => list.clone(),
    }
}

/// The longest `glommio.spin_before_park_us`: a device slower than this to sync leaves the shard
/// nothing to do for long enough that sleeping costs nothing noticeable.
pub const SPIN_BEFORE_PARK_US_MAX: u64 = 10_000;

/// Checks `config` against itself and against this machine's `topology`.
pub fn validate(config: &Config, topology: &Topology) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    let mut error = |key: &str, problem: String, fix: &str| errors.push(ConfigError::new(key, problem, fix));

    // Shards.
    if let CpuList::List(list) = &config.shards.cpus {
        let online = topology.online_ids();
        if list.is_empty() {
            error(
                "shards.cpus",
                "the list is empty".into(),
                "name at least one online CPU, or use \"auto\"",
            );
        }
        let mut seen = BTreeSet::new();
        for &cpu in list {
            if !seen.insert(cpu) {
                error(
                    "shards.cpus",
                    format!("CPU {cpu} is listed twice"),
                    "list each CPU once: two shards on one CPU share it without gaining parallelism",
                );
            }
            if !online.contains(&cpu) {
                error(
                    "shards.cpus",
                    format!("CPU {cpu} is not online (online and usable: {online:?})"),
                    "use online CPUs only (see `ringraft-tune`), or \"auto\"",
                );
            }
        }
    }
    let shards = resolve_cpus(config, topology).len().max(1) as u64;

    // Node and cluster.
    if config.node.id == 0 {
        error(
            "node.id",
            "0 is not a valid node id".into(),
            "use a positive integer (raft reserves 0)",
        );
    }
    if config.cluster.nodes.is_empty() {
        error(
            "cluster.nodes",
            "no nodes are listed".into(),
            "list every node of the cluster, this one included",
        );
    } else if config.this_node().is_none() {
        error(
            "node.id",
            format!(
                "node {} is not in cluster.nodes (ids: {:?})",
                config.node.id,
                config.cluster.nodes.iter().map(|n| n.id).collect::<Vec<_>>()
            ),
            "add this node to cluster.nodes or set node.id (or RINGRAFT_NODE_ID) to a listed id",
        );
    }
    let mut ids = BTreeSet::new();
    for node in &config.cluster.nodes {
        if node.id == 0 {
            error("cluster.nodes", "a node has id 0".into(), "use positive node ids");
        }
        if !ids.insert(node.id) {
            error(
                "cluster.nodes",
                format!("node id {} is listed twice", node.id),
                "give every node a distinct id",
            );
        }
    }
    for voter in &config.cluster.initial_voters {
        if !ids.contains(voter) {
            error(
                "cluster.initial_voters",
                format!("node {voter} is not in cluster.nodes"),
                "list only ids from cluster.nodes (or leave it empty: every node votes)",
            );
        }
    }
    // Ports: each node uses [peer_port, peer_port + shards) and [client_port, client_port + shards).
    let mut ranges: Vec<(std::net::IpAddr, u64, u64, String)> = Vec::new();
    for node in &config.cluster.nodes {
        for (kind, start) in [("peer", node.peer_port), ("client", node.client_port)] {
            let start = start as u64;
            let end = start + shards;
            if start == 0 || end - 1 > u16::MAX as u64 {
                error(
                    "cluster.nodes",
                    format!(
                        "node {} {kind} ports {start}..{} do not fit in 1..=65535 for {shards} shards",
                        node.id,
                        end - 1
                    ),
                    "choose a lower base port",
                );
                continue;
            }
            let name = format!("node {} {kind} ports {start}..={}", node.id, end - 1);
            for (host, other_start, other_end, other) in &ranges {
                if *host == node.host && start < *other_end && *other_start < end {
                    error(
                        "cluster.nodes",
                        format!("{name} collide with {other} on {host}"),
                        "space base ports at least one per shard apart for every node on the same host",
                    );
                }
            }
            ranges.push((node.host, start, end, name));
        }
    }
    if !config.node.listen_host.is_loopback() && config.cluster.key.as_deref().is_none_or(str::is_empty) {
        error(
            "cluster.key",
            format!(
                "node.listen_host {} is not a loopback address and no cluster key is set",
                config.node.listen_host
            ),
            "set cluster.key to a long random secret shared by all nodes (peers authenticate with it)",
        );
    }

    // Limits that must not be zero.
    let c = config;
    let nonzero: [(&str, u64); 30] = [
        ("shards.groups_per_shard", c.shards.groups_per_shard),
        ("batching.entry_bytes_max", c.batching.entry_bytes_max),
        ("batching.entry_commands_max", c.batching.entry_commands_max),
        ("wal.segment_bytes", c.wal.segment_bytes),
        ("wal.batch_bytes_max", c.wal.batch_bytes_max),
        ("wal.cache_bytes", c.wal.cache_bytes),
        ("wal.live_segments_max", c.wal.live_segments_max),
        ("sm.cache_bytes", c.sm.cache_bytes),
        ("sm.checkpoint_interval_ms", c.sm.checkpoint_interval_ms),
        ("sm.checkpoint_log_bytes", c.sm.checkpoint_log_bytes),
        ("sm.data_file_bytes", c.sm.data_file_bytes),
        ("raft.tick_interval_ms", c.raft.tick_interval_ms),
        ("raft.election_timeout_ms", c.raft.election_timeout_ms),
        ("raft.heartbeat_interval_ms", c.raft.heartbeat_interval_ms),
        ("raft.max_inflight_msgs", c.raft.max_inflight_msgs),
        ("raft.max_size_per_msg_bytes", c.raft.max_size_per_msg_bytes),
        ("raft.max_uncommitted_bytes", c.raft.max_uncommitted_bytes),
        (
            "raft.max_committed_size_per_ready_bytes",
            c.raft.max_committed_size_per_ready_bytes,
        ),
        ("glommio.ring_depth", c.glommio.ring_depth),
        ("limits.key_bytes_max", c.limits.key_bytes_max),
        ("limits.value_bytes_max", c.limits.value_bytes_max),
        ("limits.frame_bytes_max", c.limits.frame_bytes_max),
        ("limits.client_queue_depth", c.limits.client_queue_depth),
        (
            "limits.group_queue_commands_max",
            c.limits.group_queue_commands_max,
        ),
        ("limits.peer_queue_messages", c.limits.peer_queue_messages),
        ("limits.request_timeout_ms", c.limits.request_timeout_ms),
        (
            "limits.snapshot_chunks_in_flight",
            c.limits.snapshot_chunks_in_flight,
        ),
        ("limits.log_reads_in_flight", c.limits.log_reads_in_flight),
        ("limits.value_reads_in_flight", c.limits.value_reads_in_flight),
        ("sm.snapshot_reads_in_flight", c.sm.snapshot_reads_in_flight),
    ];
    let mut zero = BTreeSet::new();
    for (key, value) in nonzero
        .into_iter()
        .chain([("limits.group_queue_bytes_max", c.limits.group_queue_bytes_max)])
    {
        if value == 0 {
            zero.insert(key);
            error(
                key,
                "is 0".into(),
                "use a positive value (docs/config.md gives the default and why)",
            );
        }
    }

    // WAL geometry.
    let w = &c.wal;
    if !zero.contains("wal.segment_bytes")
        && (w.segment_bytes % WAL_BLOCK_BYTES != 0
            || w.segment_bytes < 2 * WAL_BLOCK_BYTES
            || w.segment_bytes > u32::MAX as u64)
    {
        error(
            "wal.segment_bytes",
            format!(
                "{} is not a multiple of 4096 between 8192 and 4 GiB",
                w.segment_bytes
            ),
            "use a multiple of 4 KiB, e.g. 67108864 (64 MiB)",
        );
    }
    if !zero.contains("wal.batch_bytes_max") {
        if w.batch_bytes_max % WAL_BLOCK_BYTES != 0 {
            error(
                "wal.batch_bytes_max",
                format!("{} is not a multiple of 4096", w.batch_bytes_max),
                "use a multiple of 4 KiB, e.g. 1048576 (1 MiB)",
            );
        } else if w.batch_bytes_max + WAL_BLOCK_BYTES > w.segment_bytes {
            error(
                "wal.batch_bytes_max",
                format!(
                    "{} does not fit in a segment of {} bytes after its 4 KiB header",
                    w.batch_bytes_max, w.segment_bytes
                ),
                "lower it or raise wal.segment_bytes",
            );
        }
    }
    if c.batching.entry_bytes_max + WAL_RECORD_OVERHEAD_BYTES > w.batch_bytes_max {
        error(
            "batching.entry_bytes_max",
            format!(
                "{} plus {WAL_RECORD_OVERHEAD_BYTES} bytes of WAL framing exceeds wal.batch_bytes_max ({})",
                c.batching.entry_bytes_max, w.batch_bytes_max
            ),
            "lower batching.entry_bytes_max or raise wal.batch_bytes_max",
        );
    }

    // Raft timing.
    let r = &c.raft;
    if r.tick_interval_ms > r.election_timeout_ms {
        error(
            "raft.tick_interval_ms",
            format!(
                "{} ms is longer than raft.election_timeout_ms ({} ms)",
                r.tick_interval_ms, r.election_timeout_ms
            ),
            "use a tick of a small fraction of the election timeout, e.g. 10 ms for 500 ms",
        );
    } else if r.heartbeat_interval_ms < r.tick_interval_ms || r.heartbeat_interval_ms >= r.election_timeout_ms
    {
        error(
            "raft.heartbeat_interval_ms",
            format!(
                "{} ms must be at least one tick ({} ms) and below the election timeout ({} ms)",
                r.heartbeat_interval_ms, r.tick_interval_ms, r.election_timeout_ms
            ),
            "use about a tenth of the election timeout",
        );
    } else if r.lease_margin_ms >= r.election_timeout_ms {
        error(
            "raft.lease_margin_ms",
            format!(
                "{} ms leaves no lease within the election timeout ({} ms)",
                r.lease_margin_ms, r.election_timeout_ms
            ),
            "use a fraction of the election timeout covering clock-rate differences (default 100 ms of 500 ms)",
        );
    } else if r.election_ticks() <= r.heartbeat_ticks() {
        error(
            "raft.election_timeout_ms",
            format!(
                "{} election ticks do not exceed {} heartbeat ticks",
                r.election_ticks(),
                r.heartbeat_ticks()
            ),
            "make the election timeout several heartbeats long",
        );
    }

    // Sizes that must nest: a value in a command in an entry in a message in a frame.
    let l = &c.limits;
    if l.key_bytes_max + l.value_bytes_max + COMMAND_OVERHEAD_BYTES > c.batching.entry_bytes_max {
        error(
            "limits.value_bytes_max",
            format!(
                "a command with the largest key ({}) and value ({}) plus {COMMAND_OVERHEAD_BYTES} bytes of framing does not fit in one entry (batching.entry_bytes_max {})",
                l.key_bytes_max, l.value_bytes_max, c.batching.entry_bytes_max
            ),
            "lower limits.value_bytes_max or raise batching.entry_bytes_max",
        );
    }
    // raft sends at least one entry even when it exceeds max_size_per_msg.
    if r.max_size_per_msg_bytes + c.batching.entry_bytes_max + FRAME_OVERHEAD_BYTES > l.frame_bytes_max {
        error(
            "raft.max_size_per_msg_bytes",
            format!(
                "{} plus one entry (batching.entry_bytes_max {}) and frame overhead exceeds limits.frame_bytes_max ({})",
                r.max_size_per_msg_bytes, c.batching.entry_bytes_max, l.frame_bytes_max
            ),
            "lower it or raise limits.frame_bytes_max",
        );
    }
    if c.batching.entry_bytes_max + FRAME_OVERHEAD_BYTES > l.frame_bytes_max {
        error(
            "limits.frame_bytes_max",
            format!(
                "{} cannot carry one entry of batching.entry_bytes_max ({})",
                l.frame_bytes_max, c.batching.entry_bytes_max
            ),
            "raise it to at least the entry size plus 4 KiB",
        );
    }
    if c.glommio.ring_depth > 32_768 {
        error(
            "glommio.ring_depth",
            format!("{} exceeds io_uring's 32768", c.glommio.ring_depth),
            "use 128..4096",
        );
    }
    if c.glommio.spin_before_park_us > 0 && !c.shards.pin {
        // glommio ignores it for unpinned executors; saying so beats a silent no-op.
        error(
            "glommio.spin_before_park_us",
            format!("{} µs with shards.pin = false", c.glommio.spin_before_park_us),
            "spin only with shards pinned to cores of their own (shards.pin = true), or use 0",
        );
    }
    if c.glommio.spin_before_park_us > SPIN_BEFORE_PARK_US_MAX {
        error(
            "glommio.spin_before_park_us",
            format!(
                "{} exceeds {SPIN_BEFORE_PARK_US_MAX}",
                c.glommio.spin_before_park_us
            ),
            "use a little more than the device's sync latency (100-500 µs), or 0",
        );
    }
    if let IoMemory::Bytes(bytes) = c.glommio.io_memory_bytes {
        if bytes % WAL_BLOCK_BYTES != 0 || bytes < crate::memlock::IO_MEMORY_MIN_BYTES {
            error(
                "glommio.io_memory_bytes",
                format!(
                    "{bytes} is not a multiple of 4096 of at least {}",
                    crate::memlock::IO_MEMORY_MIN_BYTES
                ),
                "use \"auto\" (sized from the memlock limit) or e.g. 16777216",
            );
        }
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}
