//! The configuration file: one TOML document, every key documented in `docs/config.md` with its
//! default, unit and reason. Unknown keys are errors (a typo must not fall back to a default).

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The whole configuration of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    pub shards: ShardsConfig,
    pub batching: BatchingConfig,
    pub wal: WalConfig,
    pub sm: SmConfig,
    pub raft: RaftConfig,
    pub glommio: GlommioConfig,
    pub limits: LimitsConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id; must appear in `cluster.nodes`.
    pub id: u64,
    /// Where the WALs and state machine files live (one subdirectory per shard).
    pub data_dir: PathBuf,
    /// Address the shards listen on.
    pub listen_host: IpAddr,
    /// Log filter for the `ringraft` binary (tracing `EnvFilter` syntax); `RUST_LOG` overrides.
    pub log_level: String,
    /// Where `ringraft run` serves Prometheus metrics (`GET /metrics`), e.g. "127.0.0.1:9100";
    /// unset: no metrics endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            data_dir: PathBuf::from("ringraft-data"),
            listen_host: IpAddr::from([127, 0, 0, 1]),
            log_level: "info".into(),
            metrics_addr: None,
        }
    }
}

/// One member of the cluster. Shard `s` of the node listens for peers on `peer_port + s` and for
/// clients on `client_port + s`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddress {
    pub id: u64,
    pub host: IpAddr,
    pub peer_port: u16,
    pub client_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Identifies the cluster in peer handshakes: nodes of another cluster are refused.
    pub id: u64,
    /// Pre-shared key authenticating peers (HMAC). Required when listening on a non-loopback
    /// address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub nodes: Vec<NodeAddress>,
    /// Who votes in every group when it starts from nothing; empty means every listed node.
    /// A node added later (`ringraft member add`) is listed in `nodes` on every node but not
    /// here, and every node must agree on this list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub initial_voters: Vec<u64>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            id: 1,
            key: None,
            nodes: vec![NodeAddress {
                id: 1,
                host: IpAddr::from([127, 0, 0, 1]),
                peer_port: 7400,
                client_port: 7500,
            }],
            initial_voters: Vec::new(),
        }
    }
}

/// Which CPUs run shards: `"auto"` or an explicit list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "\"auto\" or a list of CPU numbers such as [2, 3]")]
pub enum CpuList {
    Auto(AutoKeyword),
    List(Vec<usize>),
}

/// The literal string `"auto"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoKeyword {
    Auto,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsConfig {
    /// CPUs to run one shard executor each on: `"auto"` (every online CPU) or a list.
    pub cpus: CpuList,
    /// Pin each shard's executor to its CPU. Off for tests on small machines, where executors
    /// share CPUs.
    pub pin: bool,
    /// Raft groups per shard; group `g` lives on shard `g % shards` on every node.
    pub groups_per_shard: u64,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig {
            cpus: CpuList::Auto(AutoKeyword::Auto),
            pin: true,
            groups_per_shard: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Largest batch of commands in one raft entry.
    pub entry_bytes_max: u64,
    /// Most commands in one raft entry.
    pub entry_commands_max: u64,
    /// How long a batch may wait for more commands; 0 = flush as soon as the loop is idle.
    pub wait_us_max: u64,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            // The largest command (4 KiB key + 1 MiB value) plus batch framing must fit one entry.
            entry_bytes_max: (1 << 20) + (64 << 10),
            entry_commands_max: 4096,
            wait_us_max: 0,
        }
    }
}

/// How WAL writes are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// O_DSYNC segment files: the write is the sync.
    Dsync,
    /// O_DIRECT write, then fdatasync.
    Fdatasync,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    pub segment_bytes: u64,
    pub batch_bytes_max: u64,
    pub sync_mode: SyncMode,
    pub cache_bytes: u64,
    pub segments_recycled_max: u64,
    /// Entries kept below the state machine's checkpoint for slow followers.
    pub retain_entries: u64,
    /// A leader also keeps what its slowest follower still needs (a follower behind the
    /// compacted log would need a snapshot), up to this many entries below the checkpoint.
    pub retain_for_followers_entries: u64,
    /// Live segments per shard beyond which the groups holding the oldest ones are compacted
    /// through their checkpoints regardless of `retain_entries` (their lagging followers then
    /// need snapshots). Segments are purged oldest first, so without this one idle group
    /// would keep every later segment on disk.
    pub live_segments_max: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_bytes: 64 << 20,
            // One WAL write must hold at least one full entry (batching.entry_bytes_max).
            batch_bytes_max: 2 << 20,
            sync_mode: SyncMode::Dsync,
            cache_bytes: 64 << 20,
            segments_recycled_max: 2,
            retain_entries: 10_000,
            retain_for_followers_entries: 100_000,
            live_segments_max: 16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmConfig {
    /// Values up to this size are kept in memory in the index instead of in data files.
    pub inline_value_bytes_max: u64,
    pub cache_bytes: u64,
    /// How often the state machine writes a checkpoint (which lets the WAL compact).
    pub checkpoint_interval_ms: u64,
    /// A data file of the KV store is sealed past this size; sealed files mostly holding
    /// overwritten values are compacted by the shard's upkeep.
    pub data_file_bytes: u64,
    /// A checkpoint round also starts once the shard's WAL has written this many bytes since
    /// the last round began, whatever the interval: it bounds the log a restart replays and the
    /// unapplied entries it must hold in memory.
    pub checkpoint_log_bytes: u64,
    /// Data file reads a snapshot chunk keeps in flight at once (a leader streaming a snapshot
    /// to a follower reads every value not held in memory).
    pub snapshot_reads_in_flight: u64,
}

impl Default for SmConfig {
    fn default() -> Self {
        SmConfig {
            inline_value_bytes_max: 64,
            cache_bytes: 64 << 20,
            checkpoint_interval_ms: 30_000,
            checkpoint_log_bytes: 256 << 20,
            data_file_bytes: 64 << 20,
            // A 1 MiB chunk of 1 KiB values is ~1000 reads: one at a time they hold the
            // leader's shard loop for ~1000 device round trips per chunk (measured: the cluster
            // fell to 3% of its throughput during such a catch-up). 32 at once fill an NVMe
            // or virtio queue well and bound the chunk's reads to ~32 x (key + value) bytes
            // beyond the chunk itself.
            snapshot_reads_in_flight: 32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub tick_interval_ms: u64,
    pub election_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub max_inflight_msgs: u64,
    pub max_size_per_msg_bytes: u64,
    pub max_uncommitted_bytes: u64,
    pub max_committed_size_per_ready_bytes: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// How often each shard checks whether it leads more than its share of groups and hands
    /// one over; 0 turns leader balancing off.
    pub leader_balance_interval_ms: u64,
    /// Lease reads: a leader serves `lease` reads without a round trip for the election
    /// timeout minus this margin after a quorum last confirmed it; the margin covers how much
    /// faster any node's clock may run than the leader's over one election timeout.
    pub lease_margin_ms: u64,
    /// A group idle this long (everything committed, applied and acknowledged, nothing queued)
    /// quiesces: no ticks, no heartbeats until a message or request wakes it. 0: never.
    pub quiesce_after_ms: u64,
    /// A learner becomes a voter (`ringraft member promote`) only while its leader replicates
    /// to it normally, it answered within the last election timeout, and it is at most this
    /// many entries behind the commit index; until then the leader answers `BUSY`. A voter
    /// that lags counts toward the quorum without helping to make one: one more failure would
    /// stall the group until it caught up.
    pub promote_lag_max_entries: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            tick_interval_ms: 10,
            election_timeout_ms: 500,
            heartbeat_interval_ms: 50,
            max_inflight_msgs: 256,
            max_size_per_msg_bytes: 1 << 20,
            max_uncommitted_bytes: 64 << 20,
            max_committed_size_per_ready_bytes: 16 << 20,
            pre_vote: true,
            check_quorum: true,
            leader_balance_interval_ms: 10_000,
            lease_margin_ms: 100,
            quiesce_after_ms: 1000,
            // One entry per group per shard loop: ~1000 entries are a fraction of a second of
            // a busy group's log, which a voter catches up on within an election timeout.
            promote_lag_max_entries: 1000,
        }
    }
}

impl RaftConfig {
    /// raft-rs `election_tick`.
    pub fn election_ticks(&self) -> u64 {
        self.election_timeout_ms / self.tick_interval_ms.max(1)
    }

    /// Ticks a lease lasts after a quorum confirmed the leader (0: no lease reads).
    pub fn lease_ticks(&self) -> u64 {
        if !self.check_quorum {
            return 0;
        }
        self.election_timeout_ms.saturating_sub(self.lease_margin_ms) / self.tick_interval_ms.max(1)
    }

    /// raft-rs `heartbeat_tick`.
    pub fn heartbeat_ticks(&self) -> u64 {
        self.heartbeat_interval_ms / self.tick_interval_ms.max(1)
    }
}

/// `"auto"` (sized from the memlock limit) or a byte count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "\"auto\" or a number of bytes")]
pub enum IoMemory {
    Auto(AutoKeyword),
    Bytes(u64),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlommioConfig {
    /// Registered DMA buffer arena per shard.
    pub io_memory_bytes: IoMemory,
    /// io_uring submission queue depth per ring.
    pub ring_depth: u64,
    /// Microseconds a shard with nothing to run keeps polling for IO completions before it
    /// sleeps; 0 sleeps at once. Sleeping and being woken by the kernel cost ~40 µs per WAL
    /// write on this project's test VM (a memory barrier across the process, a context switch
    /// into `io_uring_enter` and back): polling takes that off every sync's latency, but the
    /// shard's core is never idle. Only for shards pinned to cores of their own; on the core
    /// that takes the disk's interrupts it was measured to halve throughput instead.
    pub spin_before_park_us: u64,
}

impl Default for GlommioConfig {
    fn default() -> Self {
        GlommioConfig {
            io_memory_bytes: IoMemory::Auto(AutoKeyword::Auto),
            ring_depth: 128,
            spin_before_park_us: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub key_bytes_max: u64,
    pub value_bytes_max: u64,
    pub frame_bytes_max: u64,
    /// Requests one client connection may have in flight.
    pub client_queue_depth: u64,
    /// Commands waiting to be proposed, per group.
    pub group_queue_commands_max: u64,
    /// Bytes of commands waiting to be proposed, per group.
    pub group_queue_bytes_max: u64,
    /// Raft messages queued per peer connection before new ones are dropped (raft resends).
    pub peer_queue_messages: u64,
    /// How long the server waits for a client request's answer before replying `Timeout`.
    pub request_timeout_ms: u64,
    /// Unacknowledged snapshot chunks per snapshot stream.
    pub snapshot_chunks_in_flight: u64,
    /// Log reads for lagging followers a shard has out at once (the rest wait their turn).
    pub log_reads_in_flight: u64,
    /// Reads of values in state machine data files a shard has out at once (the rest wait
    /// their turn).
    pub value_reads_in_flight: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            key_bytes_max: 4096,
            value_bytes_max: 1 << 20,
            frame_bytes_max: 16 << 20,
            client_queue_depth: 1024,
            group_queue_commands_max: 65_536,
            group_queue_bytes_max: 64 << 20,
            peer_queue_messages: 4096,
            request_timeout_ms: 10_000,
            snapshot_chunks_in_flight: 4,
            // Catch-up reads share the device with the WAL's writes: a few in flight keep a
            // queue-depth device busy for a follower that is far behind, while each shard's
            // own writes still find the device free most of the time. Each read is at most
            // about raft.max_size_per_msg_bytes (plus gaps, wal READ_SPAN_MAX), so this also
            // bounds the memory catch-up holds.
            log_reads_in_flight: 4,
            // Client reads of values not in memory run beside the shard's loop, this many at
            // once: enough to keep an NVMe or virtio queue busy (one at a time, a 4 KiB read
            // of ~100 µs held every read behind it), bounded so a burst of reads cannot
            // crowd the WAL's writes off the device.
            value_reads_in_flight: 64,
        }
    }
}

/// Environment variables that override keys for one run.
pub const ENV_NODE_ID: &str = "RINGRAFT_NODE_ID";
pub const ENV_DATA_DIR: &str = "RINGRAFT_DATA_DIR";

impl Config {
    /// Every group's voters when it starts from nothing (`cluster.initial_voters`, or every node).
    pub fn initial_voters(&self) -> Vec<u64> {
        if self.cluster.initial_voters.is_empty() {
            self.cluster.nodes.iter().map(|n| n.id).collect()
        } else {
            self.cluster.initial_voters.clone()
        }
    }

    /// Parses a TOML document; unknown keys and wrong types are errors naming the key.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::parse(e.message(), e.span().map(|s| line_of(text, s.start))))
    }

    /// Reads and parses a config file, then applies the environment overrides.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "(file)",
                format!("cannot read {}: {e}", path.display()),
                "check the path",
            )
        })?;
        let mut config = Config::from_toml(&text).map_err(|e| e.in_file(path))?;
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Applies `RINGRAFT_NODE_ID` and `RINGRAFT_DATA_DIR`, read through `env`.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(id) = env(ENV_NODE_ID) {
            self.node.id = id.trim().parse().map_err(|_| {
                ConfigError::new(
                    "node.id",
                    format!("{ENV_NODE_ID}={id:?} is not a node id"),
                    "set it to a positive integer listed in cluster.nodes",
                )
            })?;
        }
        if let Some(dir) = env(ENV_DATA_DIR) {
            if dir.is_empty() {
                return Err(ConfigError::new(
                    "node.data_dir",
                    format!("{ENV_DATA_DIR} is empty"),
                    "unset it or name a directory",
                ));
            }
            self.node.data_dir = PathBuf::from(dir);
        }
        Ok(())
    }

    /// The effective configuration as TOML (defaults filled in, overrides applied).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a Config always serializes")
    }

    /// A local cluster of `nodes` nodes on 127.0.0.1 (the benchmark's default), seen from node
    /// `id`. Node `n` uses peer ports from `7400 + 100 n` and client ports from `7450 + 100 n`.
    pub fn local_cluster(nodes: u64, id: u64) -> Config {
        let mut config = Config::default();
        config.node.id = id;
        config.cluster.nodes = (1..=nodes)
            .map(|n| NodeAddress {
                id: n,
                host: IpAddr::from([127, 0, 0, 1]),
                peer_port: 7400 + 100 * n as u16,
                client_port: 7450 + 100 * n as u16,
            })
            .collect();
        config
    }

    /// This node's entry in `cluster.nodes`.
    pub fn this_node(&self) -> Option<&NodeAddress> {
        self.cluster.nodes.iter().find(|n| n.id == self.node.id)
    }

    /// How `new` changes this (running) config's address book, when nodes added to or removed
    /// from `cluster.nodes` are the only change to the `cluster` section, so a running node can
    /// apply it without a restart (SIGHUP). `Err` says which other cluster change needs one: a
    /// node readdressed, this node removed, another cluster id or key, or initial voters other
    /// than the old ones less the removed nodes. (With `initial_voters` left empty every listed
    /// node votes, so an added node would turn into an initial voter: list the original voters
    /// there first.) Settings outside `cluster` are not compared.
    pub fn address_book_change(&self, new: &Config) -> Result<AddressBookChange, String> {
        let (old, next) = (&self.cluster, &new.cluster);
        if old.id != next.id {
            return Err(format!("cluster.id changes from {} to {}", old.id, next.id));
        }
        if old.key != next.key {
            return Err("cluster.key changes".into());
        }
        let mut removed = Vec::new();
        for node in &old.nodes {
            match next.nodes.iter().find(|n| n.id == node.id) {
                None if node.id == self.node.id => {
                    return Err(format!(
                        "this node ({}) is no longer listed in cluster.nodes",
                        node.id
                    ))
                }
                None => removed.push(node.id),
                Some(n) if n != node => {
                    return Err(format!("node {}'s address changes in cluster.nodes", node.id))
                }
                Some(_) => {}
            }
        }
        let kept: Vec<u64> = self
            .initial_voters()
            .into_iter()
            .filter(|v| !removed.contains(v))
            .collect();
        if new.initial_voters() != kept {
            return Err(format!(
                "the initial voters change from {:?} to {:?}, not just by the removed nodes (with \
                 cluster.initial_voters empty, every listed node votes: list the original voters \
                 there)",
                self.initial_voters(),
                new.initial_voters()
            ));
        }
        let added = next
            .nodes
            .iter()
            .filter(|n| !old.nodes.iter().any(|o| o.id == n.id))
            .cloned()
            .collect();
        Ok(AddressBookChange { added, removed })
    }
}

/// What a reloaded config changes in a running node's address book
/// ([`Config::address_book_change`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressBookChange {
    pub added: Vec<NodeAddress>,
    pub removed: Vec<u64>,
}

impl AddressBookChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}
