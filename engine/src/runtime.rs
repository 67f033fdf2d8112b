//! The glommio runner: one executor per shard (pinned to its CPU unless the config says not to),
//! each running the [`ShardCore`] loop with the WAL's IO as its own tasks, a ticker, and
//! channels for client requests and peer messages. This is the only module of the engine that
//! knows about glommio or threads.
//!
//! One loop iteration: take every waiting input (client requests, peer messages, WAL
//! completions, ticks), then `propose`, `collect_ready`, start the next WAL write if none is in
//! flight (group commit: everything appended since the last write goes in it), `apply`, and send
//! the output. The loop sleeps only when it has nothing to do. Requests to propose that arrive
//! while a WAL write is in flight do not wake it ([`ShardInbox`]): they could only join the entry
//! proposed once the write completes.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use ringraft_sm::{Command, GlommioSmDisk, KvConfig, KvStore, StateMachine};
use ringraft_tuning::{Config, SyncMode, Topology};
use ringraft_wal::{GlommioDisk, IoDone, IoJob, Wal, WalConfig};

use crate::client::{Client, Route};
use crate::core::{
    unapplied_floors, Consistency, EngineError, Envelope, GroupMetrics, ShardConfig, ShardCore, ShardStats,
};
use crate::reply::{AnswerBatch, Reply};
use crate::snapshot::SnapshotPiece;
use crate::tickets::Tickets;
use crate::transport::{InProcess, Inbound, MemberChange, NodeHandle, ShardLink, ShardNet, Transport};
use hdrhistogram::Histogram;

/// What a shard receives from other threads.
pub(crate) enum ShardInput {
    Submit {
        group: u64,
        commands: Vec<Command>,
        reply: Reply,
    },
    Read {
        group: u64,
        key: Vec<u8>,
        consistency: Consistency,
        reply: Reply,
    },
    Peer(Box<Envelope>),
    Piece(Box<SnapshotPiece>),
    Membership {
        group: u64,
        changes: Vec<MemberChange>,
        reply: Reply,
    },
    Stats {
        reply: flume::Sender<NodeStats>,
    },
    Metrics {
        reply: flume::Sender<ShardMetrics>,
    },
    Status {
        reply: flume::Sender<Vec<GroupStatus>>,
    },
    Transfer {
        group: u64,
        to: Option<u64>,
        reply: Reply,
    },
    Shutdown {
        done: flume::Sender<()>,
    },
    /// Nodes that joined the cluster's address book (see [`Engine::add_nodes`]).
    AddNodes {
        nodes: Vec<ringraft_tuning::NodeAddress>,
        done: flume::Sender<Result<(), String>>,
    },
    /// Nodes that left it (see [`Engine::remove_nodes`]); answered with those that are still
    /// members of groups here, and which groups.
    RemoveNodes {
        nodes: Vec<u64>,
        done: flume::Sender<Result<LeavingNodes, String>>,
    },
}

impl ShardInput {
    /// The reply a request carries (queries and peer inputs carry none).
    fn into_reply(self) -> Option<Reply> {
        match self {
            ShardInput::Submit { reply, .. }
            | ShardInput::Read { reply, .. }
            | ShardInput::Membership { reply, .. }
            | ShardInput::Transfer { reply, .. } => Some(reply),
            ShardInput::Peer(_)
            | ShardInput::Piece(_)
            | ShardInput::Stats { .. }
            | ShardInput::Metrics { .. }
            | ShardInput::Status { .. }
            | ShardInput::AddNodes { .. }
            | ShardInput::RemoveNodes { .. }
            | ShardInput::Shutdown { .. } => None,
        }
    }

    /// An input that never reached its shard (its queue full or the shard gone): whoever
    /// tried to send it answers its caller, so a reply inside goes without an answer.
    fn unsent(self) {
        if let Some(reply) = self.into_reply() {
            reply.forget();
        }
    }
}

/// One group as its shard sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    pub node: u64,
    pub group: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
}

/// One shard's metrics at one moment: counters, histograms, queue depths and every group's
/// figures (lags, queues, leader changes).
#[derive(Clone, Debug)]
pub struct ShardMetrics {
    pub node: u64,
    pub shard: u64,
    pub stats: ShardStats,
    pub wal_writes: u64,
    pub wal_bytes_written: u64,
    pub wal_cache_bytes: u64,
    /// Bytes appended but not yet written.
    pub wal_pending_bytes: u64,
    pub wal_segments_live: u64,
    /// Segment preparations that failed (a full disk, most often) and were retried; while
    /// `wal_prepare_error` is set, writes that need a new segment wait for space.
    pub wal_prepare_failures: u64,
    pub wal_prepare_error: Option<String>,
    /// Commands per proposed raft entry.
    pub commands_per_entry: Histogram<u64>,
    /// WAL write-to-durable latency (one write + its sync), microseconds.
    pub sync_latency_us: Histogram<u64>,
    /// From a proposal entering the leader's log to its commit (in a quorum's synced WALs),
    /// microseconds.
    pub commit_latency_us: Histogram<u64>,
    /// From a request reaching the shard to its ok answer (queueing, commit in a quorum's WALs,
    /// apply), microseconds.
    pub request_latency_us: Histogram<u64>,
    /// Client requests accepted and not yet answered.
    pub requests_waiting: u64,
    /// Requests answered `Timeout` by this shard after `limits.request_timeout_ms`.
    pub requests_timed_out: u64,
    /// Inputs (requests, peer messages) waiting in the shard's inbox.
    pub inbox_depth: u64,
    /// Groups asleep (not ticked): quiesced while idle, or of which this node is no member.
    pub groups_asleep: u64,
    /// Nodes removed from the address book that are still members of a group here: they leave
    /// once they are members of none ([`Engine::remove_nodes`]).
    pub nodes_leaving: Vec<u64>,
    pub groups: Vec<GroupMetrics>,
}

/// A node's metrics: one entry per shard.
#[derive(Clone, Debug)]
pub struct NodeMetrics {
    pub node: u64,
    pub shards: Vec<ShardMetrics>,
}

impl NodeMetrics {
    fn merged(&self, pick: impl Fn(&ShardMetrics) -> &Histogram<u64>) -> Histogram<u64> {
        let mut out = new_histogram();
        for shard in &self.shards {
            out.add(pick(shard)).expect("histograms share their bounds");
        }
        out
    }

    /// Commands per entry over all shards.
    pub fn commands_per_entry(&self) -> Histogram<u64> {
        self.merged(|s| &s.commands_per_entry)
    }

    /// Commit latency (proposal to commit) over all shards, microseconds.
    pub fn commit_latency_us(&self) -> Histogram<u64> {
        self.merged(|s| &s.commit_latency_us)
    }

    /// Request latency (arrival at the shard to ok answer) over all shards, microseconds.
    pub fn request_latency_us(&self) -> Histogram<u64> {
        self.merged(|s| &s.request_latency_us)
    }

    /// WAL sync latency over all shards, microseconds.
    pub fn sync_latency_us(&self) -> Histogram<u64> {
        self.merged(|s| &s.sync_latency_us)
    }

    /// Every group of the node.
    pub fn groups(&self) -> impl Iterator<Item = &GroupMetrics> {
        self.shards.iter().flat_map(|s| s.groups.iter())
    }
}

/// The bounds every engine histogram uses: 1 to 2^40, 2 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 1 << 40, 2).expect("valid histogram bounds")
}

/// Counters of a node, summed over its shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub proposals: u64,
    pub commands_proposed: u64,
    pub entries_applied: u64,
    pub busy_answers: u64,
    pub wal_writes: u64,
    pub wal_bytes_written: u64,
}

impl NodeStats {
    /// Adds another node's (or shard's) counters.
    pub fn add(&mut self, other: NodeStats) {
        self.proposals += other.proposals;
        self.commands_proposed += other.commands_proposed;
        self.entries_applied += other.entries_applied;
        self.busy_answers += other.busy_answers;
        self.wal_writes += other.wal_writes;
        self.wal_bytes_written += other.wal_bytes_written;
    }
}

/// Peer messages a shard queues for another node's shard before dropping (raft resends).
const PEER_QUEUE_MAX: usize = 4096;
/// Requests to propose a shard's queue holds beyond `limits.client_queue_depth`. They do not
/// wake the shard while its WAL write is in flight (see [`ShardInbox`]), so a write's worth may
/// wait there: at a million puts a second and 1-2 ms writes, about 2,000; this leaves room for
/// several connections at full depth and for writes of ~10 ms before `Busy`.
const PROPOSALS_QUEUE_MAX: usize = 16384;
/// Inputs a shard takes per loop iteration before doing its work.
const INPUTS_PER_LOOP_MAX: usize = 8192;
/// State machine checkpoints (each a write and a sync) written per shard loop during a
/// checkpoint round: a round over thousands of groups is spread over many loops, adding at most
/// a few syncs to any loop's latency instead of stalling the shard for seconds.
const CHECKPOINTS_PER_LOOP: usize = 4;
/// Bytes of one state machine checkpoint encoded and written per step (at least one part of
/// the store's index, 1/256 of its keys): a large state's checkpoint (a million keys: ~80 MB)
/// is spread over hundreds of loops instead of stalling the shard for 250-370 ms at once.
const CHECKPOINT_BYTES_PER_LOOP: u64 = 256 << 10;
/// Checkpoint steps take at most about one part in this many of a shard's time: after a step
/// that took `d`, the next waits until `CHECKPOINT_SHARE * d` after it began. One step per loop
/// under load (steps of ~1-1.5 ms with three nodes on two vCPUs) left too little CPU for the
/// load: open loop at 150k puts/s, p99 46-64 ms while three nodes checkpointed a million keys
/// at once; spaced this way, 10-11 ms, the checkpoint taking 2-2.7 s instead of ~0.7 s. Small
/// checkpoints (thousands of tiny groups) take microseconds, so their rounds barely slow.
const CHECKPOINT_SHARE: u32 = 5;

/// Bytes of state machine upkeep (reclaiming overwritten values' space) per shard loop: about a
/// millisecond of IO on the measured disk, so upkeep keeps pace with overwrites without holding
/// the loop long.
const MAINTENANCE_BYTES_PER_LOOP: u64 = 1 << 20;

/// One shard's input channels: requests to propose in one, every other input (reads, peer
/// messages, queries, stop) in the other.
fn inbox(config: &Config) -> (ShardQueue, ShardInbox) {
    let depth = config.limits.client_queue_depth as usize;
    let (tx, rx) = flume::bounded(depth + PEER_QUEUE_MAX);
    let (proposals_tx, proposals_rx) = flume::bounded(depth + PROPOSALS_QUEUE_MAX);
    let queue = ShardQueue {
        tx,
        rx: rx.clone(),
        proposals_tx,
        proposals_rx: proposals_rx.clone(),
        closed: Arc::new(AtomicBool::new(false)),
    };
    let inbox = ShardInbox {
        inputs: rx,
        proposals: proposals_rx,
    };
    (queue, inbox)
}

/// The shard's end of its input channels. Requests to propose (`Submit`) have a queue of their
/// own so that they need not wake the shard while its WAL write is in flight: they could only
/// join the entry proposed once that write completes, and waking for them woke the shard tens of
/// thousands of times a second for a few requests each (in-process, one node: ~50k loops and
/// ~50k io_uring_enter calls a second; ~17k calls not waking for them). Whenever the shard is
/// awake it takes every input, proposals too, so their handling overlaps the write instead of
/// all landing between it and the next one. Reads and peer messages wake it at once.
pub(crate) struct ShardInbox {
    inputs: flume::Receiver<ShardInput>,
    proposals: flume::Receiver<ShardInput>,
}

impl ShardInbox {
    fn len(&self) -> usize {
        self.inputs.len() + self.proposals.len()
    }

    /// Whether an input is waiting that the shard takes now (requests to propose only if
    /// `proposals`).
    fn has_input(&self, proposals: bool) -> bool {
        !self.inputs.is_empty() || (proposals && !self.proposals.is_empty())
    }

    fn try_recv(&self, proposals: bool) -> Option<ShardInput> {
        match self.inputs.try_recv() {
            Ok(input) => Some(input),
            Err(_) if proposals => self.proposals.try_recv().ok(),
            Err(_) => None,
        }
    }

    /// The next input (requests to propose only if `proposals`); `None` once no one can send.
    async fn recv(&self, proposals: bool) -> Option<ShardInput> {
        if let Some(input) = self.try_recv(proposals) {
            return Some(input);
        }
        let inputs = async { self.inputs.recv_async().await.ok() };
        if !proposals {
            return inputs.await;
        }
        let proposals = async { self.proposals.recv_async().await.ok() };
        futures_lite::future::or(inputs, proposals).await
    }
}

/// Why [`ShardQueue::try_send`] did not take an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue is full: `Busy`.
    Full,
    /// The shard has stopped: another node may serve.
    Stopped,
}

/// A shard's input queue as its senders hold it. Every request put in is answered, even when the
/// shard stops: the shard closes the queue and then answers what is left in it; a sender that
/// finds the queue closed after putting its input in answers what is left itself. (With a plain
/// channel, an input sent between the shard's last read and the end of its thread would wait
/// forever.) Senders hold a receiver too, so the channel itself never disconnects; `closed` is
/// what says the shard is gone.
#[derive(Clone)]
pub(crate) struct ShardQueue {
    tx: flume::Sender<ShardInput>,
    rx: flume::Receiver<ShardInput>,
    proposals_tx: flume::Sender<ShardInput>,
    proposals_rx: flume::Receiver<ShardInput>,
    closed: Arc<AtomicBool>,
}

impl ShardQueue {
    /// Puts `input` in without waiting. Refused at once when the queue is full or the shard has
    /// stopped; the caller answers its own caller then, so a reply inside goes unanswered.
    pub(crate) fn try_send(&self, input: ShardInput) -> Result<(), Refused> {
        if self.closed.load(Ordering::SeqCst) {
            input.unsent();
            return Err(Refused::Stopped);
        }
        match self.sender_for(&input).try_send(input) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(input)) => {
                input.unsent();
                return Err(Refused::Full);
            }
            // Senders hold a receiver: the channel never disconnects.
            Err(flume::TrySendError::Disconnected(_)) => unreachable!("a shard queue never disconnects"),
        }
        self.after_send();
        Ok(())
    }

    /// Waits for room (queries and stop requests, not the data path); `Err` once the shard has
    /// stopped.
    pub(crate) fn send(&self, input: ShardInput) -> Result<(), ShardInput> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(input);
        }
        self.sender_for(&input).send(input).map_err(|e| e.into_inner())?;
        self.after_send();
        Ok(())
    }

    /// [`ShardQueue::send`] for async callers.
    pub(crate) async fn send_async(&self, input: ShardInput) -> Result<(), ShardInput> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(input);
        }
        self.sender_for(&input)
            .send_async(input)
            .await
            .map_err(|e| e.into_inner())?;
        self.after_send();
        Ok(())
    }

    /// Requests to propose go in their own queue (see [`ShardInbox`]).
    fn sender_for(&self, input: &ShardInput) -> &flume::Sender<ShardInput> {
        match input {
            ShardInput::Submit { .. } => &self.proposals_tx,
            _ => &self.tx,
        }
    }

    /// The shard may have closed the queue and answered what was in it just before this
    /// sender's input arrived (both flags are SeqCst: either the shard's last pass sees the
    /// input, or this load sees `closed`).
    fn after_send(&self) {
        if self.closed.load(Ordering::SeqCst) {
            self.answer_left("the shard has stopped");
        }
    }

    /// The shard's last act: no input is taken any more; everything in the queue is answered.
    fn close(&self, cause: &str) {
        self.closed.store(true, Ordering::SeqCst);
        self.answer_left(cause);
    }

    fn answer_left(&self, cause: &str) {
        while let Ok(input) = self.rx.try_recv().or_else(|_| self.proposals_rx.try_recv()) {
            fail_input(input, cause);
        }
    }
}

/// Raises RLIMIT_MEMLOCK and divides it among `shards` executors of this process.
fn plan_memory(config: &Config, shards: u64) -> Result<u64, EngineError> {
    let memlock =
        ringraft_tuning::raise_memlock().map_err(|e| EngineError::Failed(format!("RLIMIT_MEMLOCK: {e}")))?;
    let plan = ringraft_tuning::plan_io_memory(&config.glommio.io_memory_bytes, memlock.effective(), shards)
        .map_err(|e| EngineError::Failed(e.to_string()))?;
    Ok(plan.per_shard_bytes)
}

/// A running node: one executor per shard.
pub struct Engine {
    node: u64,
    inputs: Vec<ShardQueue>,
    threads: Vec<glommio::ExecutorJoinHandle<Result<(), String>>>,
    groups: u64,
    /// The first shard that stopped with an error, and why.
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.node)
            .field("shards", &self.inputs.len())
            .finish()
    }
}

fn wal_config(config: &Config) -> WalConfig {
    WalConfig {
        segment_bytes: config.wal.segment_bytes,
        batch_bytes_max: config.wal.batch_bytes_max as usize,
        cache_bytes_max: config.wal.cache_bytes as usize,
        segments_recycled_max: config.wal.segments_recycled_max as usize,
    }
}

/// Opens each group's state machine on its shard's executor: how users plug in their own
/// [`StateMachine`] ([`Engine::start_with`]). `dir` is the group's own directory
/// (`data_dir/shard-S/group-G`), which the machine may use as it likes.
pub trait MachineFactory<S: StateMachine>: Send + Sync + 'static {
    fn open(&self, group: u64, dir: PathBuf) -> Pin<Box<dyn Future<Output = Result<S, String>>>>;
}

/// The built-in key-value store on O_DIRECT files.
#[derive(Clone, Debug)]
pub struct KvFactory {
    config: KvConfig,
}

impl KvFactory {
    pub fn new(config: &Config) -> KvFactory {
        KvFactory {
            config: kv_config(config),
        }
    }
}

impl MachineFactory<KvStore<GlommioSmDisk>> for KvFactory {
    fn open(
        &self,
        _group: u64,
        dir: PathBuf,
    ) -> Pin<Box<dyn Future<Output = Result<KvStore<GlommioSmDisk>, String>>>> {
        let config = self.config.clone();
        Box::pin(async move {
            let disk = GlommioSmDisk::open(&dir)
                .await
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            KvStore::open(disk, config).await.map_err(|e| e.to_string())
        })
    }
}

fn kv_config(config: &Config) -> KvConfig {
    KvConfig {
        inline_value_bytes_max: config.sm.inline_value_bytes_max as usize,
        cache_bytes_max: config.sm.cache_bytes as usize,
        data_file_bytes_max: config.sm.data_file_bytes,
        snapshot_reads_in_flight: config.sm.snapshot_reads_in_flight as usize,
        ..KvConfig::default()
    }
}

impl Engine {
    /// Starts one node of a cluster whose peers are reached through `transport` (the TCP one
    /// is `ringraft-net`'s). Validates the config, raises RLIMIT_MEMLOCK and sizes glommio's
    /// registered memory for this node's shards.
    pub fn start(config: Config, transport: Arc<dyn Transport>) -> Result<Engine, EngineError> {
        let factory = Arc::new(KvFactory::new(&config));
        Engine::start_with(config, transport, factory)
    }

    /// [`Engine::start`] with the state machines `factory` opens instead of the built-in
    /// key-value store. Every node of a cluster must run the same kind of machine.
    pub fn start_with<S: StateMachine + 'static>(
        config: Config,
        transport: Arc<dyn Transport>,
        factory: Arc<dyn MachineFactory<S>>,
    ) -> Result<Engine, EngineError> {
        let topology = Topology::detect();
        ringraft_tuning::validate(&config, &topology).map_err(|e| EngineError::BadRequest(e.to_string()))?;
        let shards = ringraft_tuning::resolve_cpus(&config, &topology).len();
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| inbox(&config)).unzip();
        let io_memory = plan_memory(&config, shards as u64)?;
        Engine::spawn(
            config, &topology, io_memory, transport, factory, senders, receivers,
        )
    }

    /// Starts every node of an in-process cluster (nodes exchange messages through channels).
    /// `configs` holds one validated config per node, all with the same cluster section.
    pub fn start_in_process(configs: Vec<Config>) -> Result<(Vec<Engine>, Client), EngineError> {
        let topology = Topology::detect();
        let mut channels = BTreeMap::new();
        let mut receivers = BTreeMap::new();
        for config in &configs {
            ringraft_tuning::validate(config, &topology)
                .map_err(|e| EngineError::BadRequest(e.to_string()))?;
            let shards = ringraft_tuning::resolve_cpus(config, &topology).len();
            let (senders, rx): (Vec<_>, Vec<_>) = (0..shards).map(|_| inbox(config)).unzip();
            channels.insert(config.node.id, senders);
            receivers.insert(config.node.id, rx);
        }
        let transport = InProcess {
            shards: Arc::new(channels),
        };
        // Every shard of every node in this process shares one locked-memory limit.
        let shards_in_process: u64 = transport.shards.values().map(|s| s.len() as u64).sum();
        let io_memory = plan_memory(&configs[0], shards_in_process)?;
        let shared: Arc<dyn Transport> = Arc::new(transport.clone());
        let mut engines = Vec::new();
        for config in configs {
            let rx = receivers.remove(&config.node.id).unwrap();
            let senders = transport.shards[&config.node.id].clone();
            let factory: Arc<dyn MachineFactory<_>> = Arc::new(KvFactory::new(&config));
            engines.push(Engine::spawn(
                config,
                &topology,
                io_memory,
                shared.clone(),
                factory,
                senders,
                rx,
            )?);
        }
        let groups = engines[0].groups;
        let routes = transport
            .shards
            .iter()
            .map(|(&node, senders)| (node, senders.clone()))
            .collect();
        Ok((
            engines,
            Client::new(Route {
                nodes: routes,
                groups,
            }),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn<S: StateMachine + 'static>(
        config: Config,
        topology: &Topology,
        io_memory_bytes: u64,
        transport: Arc<dyn Transport>,
        factory: Arc<dyn MachineFactory<S>>,
        senders: Vec<ShardQueue>,
        receivers: Vec<ShardInbox>,
    ) -> Result<Engine, EngineError> {
        let cpus = ringraft_tuning::resolve_cpus(&config, topology);
        let shards = cpus.len() as u64;
        let groups = shards * config.shards.groups_per_shard;
        let handle = NodeHandle {
            node: config.node.id,
            groups,
            shards: senders.clone(),
        };
        let mut threads = Vec::new();
        let failure = Arc::new(std::sync::Mutex::new(None));
        for (shard, rx) in receivers.into_iter().enumerate() {
            let placement = if config.shards.pin {
                Placement::Fixed(cpus[shard])
            } else {
                Placement::Unbound
            };
            let config = config.clone();
            let net = ShardNet {
                node: config.node.id,
                shard: shard as u64,
                inbound: Inbound(senders[shard].clone()),
                handle: handle.clone(),
            };
            let transport = transport.clone();
            let factory = factory.clone();
            let failed = failure.clone();
            let queue = senders[shard].clone();
            let mut builder = LocalExecutorBuilder::new(placement);
            if config.glommio.spin_before_park_us > 0 {
                // Validated: only with pinned shards (glommio spins no other executor).
                builder = builder.spin_before_park(Duration::from_micros(config.glommio.spin_before_park_us));
            }
            let spawned = builder
                .name(&format!("ringraft-n{}-s{shard}", config.node.id))
                .io_memory(io_memory_bytes as usize)
                .ring_depth(config.glommio.ring_depth as usize)
                .spawn(move || async move {
                    let mut shutdown = None;
                    let result = run_shard(config, net, shards, &rx, transport, factory, &mut shutdown).await;
                    if let Err(cause) = &result {
                        failed
                            .lock()
                            .unwrap()
                            .get_or_insert_with(|| format!("shard {shard}: {cause}"));
                        // Stay until told to stop, answering every request with the cause: the
                        // node's other shards keep serving, and no caller waits forever on a
                        // queue nobody reads.
                        if shutdown.is_none() {
                            shutdown = serve_failed(&rx, cause).await;
                        }
                    }
                    // Whatever came in after the last read never reached raft: it is answered
                    // too, and so is anything sent from now on.
                    queue.close(
                        result
                            .as_ref()
                            .err()
                            .map_or("the shard has stopped", String::as_str),
                    );
                    if let Some(done) = shutdown {
                        let _ = done.send(());
                    }
                    result
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // Stop the shards already running before reporting.
                    let started = Engine {
                        node: handle.node,
                        inputs: senders[..threads.len()].to_vec(),
                        threads,
                        groups,
                        failure,
                    };
                    let _ = started.shutdown();
                    return Err(EngineError::Failed(format!("cannot start shard {shard}: {e}")));
                }
            }
        }
        Ok(Engine {
            node: config.node.id,
            inputs: senders,
            threads,
            groups,
            failure,
        })
    }

    /// Why a shard stopped on its own (a WAL or state machine failure), if one did. The node
    /// cannot serve that shard's groups any more; a process should stop and let recovery run.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }

    /// This node's shards, for a server taking client requests.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            node: self.node,
            groups: self.groups,
            shards: self.inputs.clone(),
        }
    }

    /// Per-group status of this node.
    pub fn status(&self) -> Vec<GroupStatus> {
        let mut out = Vec::new();
        for input in &self.inputs {
            let (tx, rx) = flume::bounded(1);
            if input.send(ShardInput::Status { reply: tx }).is_ok() {
                out.extend(rx.recv().unwrap_or_default());
            }
        }
        out.sort_by_key(|s| s.group);
        out
    }

    /// Metrics of every shard of this node.
    pub fn metrics(&self) -> NodeMetrics {
        let mut shards = Vec::new();
        for input in &self.inputs {
            let (tx, rx) = flume::bounded(1);
            if input.send(ShardInput::Metrics { reply: tx }).is_ok() {
                if let Ok(metrics) = rx.recv() {
                    shards.push(metrics);
                }
            }
        }
        NodeMetrics {
            node: self.node,
            shards,
        }
    }

    /// Counters summed over this node's shards.
    pub fn stats(&self) -> NodeStats {
        let mut total = NodeStats::default();
        for input in &self.inputs {
            let (tx, rx) = flume::bounded(1);
            if input.send(ShardInput::Stats { reply: tx }).is_ok() {
                total.add(rx.recv().unwrap_or_default());
            }
        }
        total
    }

    /// Adds nodes to the cluster's address book on every shard of this running node: the
    /// transport reaches them (dials, accepts their handshakes, names them to clients) and
    /// the shards send them beats. It makes them no member of any group: that is a membership
    /// change (`change_membership`), once they run. Nodes already known are left as they are.
    /// `Err`: the transport cannot take nodes after start (the in-process one), or a shard has
    /// stopped; shards that answered before keep the nodes.
    pub fn add_nodes(&self, nodes: &[ringraft_tuning::NodeAddress]) -> Result<(), String> {
        self.ask_each_shard(|done| ShardInput::AddNodes {
            nodes: nodes.to_vec(),
            done,
        })
        .map(drop)
    }

    /// Removes nodes from the cluster's address book on every shard of this running node: the
    /// transport drops their connections and refuses their handshakes, `CLUSTER` answers no
    /// longer list them, and the shards send them no beats. A node that is still a member of a
    /// group of a shard (as this node applied its membership) is leaving there: it stays
    /// reachable until it is a member of none of that shard's groups (remove it with
    /// `change_membership`), then goes without another call; meanwhile no group of the shard
    /// takes it again. Returns those nodes with their groups. Adding a leaving node
    /// (`add_nodes`) keeps it. Like [`Engine::add_nodes`], refused by a transport whose nodes
    /// are fixed.
    pub fn remove_nodes(&self, nodes: &[u64]) -> Result<LeavingNodes, String> {
        let held = self.ask_each_shard(|done| ShardInput::RemoveNodes {
            nodes: nodes.to_vec(),
            done,
        })?;
        let mut by_node: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (node, groups) in held.into_iter().flatten() {
            by_node.entry(node).or_default().extend(groups);
        }
        Ok(by_node
            .into_iter()
            .map(|(node, mut groups)| {
                groups.sort_unstable();
                (node, groups)
            })
            .collect())
    }

    /// Hands each shard in turn the input `make` builds around an answer channel and waits for
    /// its answer; stops at the first `Err` (shard numbered), or at a shard that has stopped.
    fn ask_each_shard<T>(
        &self,
        make: impl Fn(flume::Sender<Result<T, String>>) -> ShardInput,
    ) -> Result<Vec<T>, String> {
        let mut answers = Vec::with_capacity(self.inputs.len());
        for (shard, input) in self.inputs.iter().enumerate() {
            let (done, rx) = flume::bounded(1);
            if input.send(make(done)).is_err() {
                return Err(format!("shard {shard} has stopped"));
            }
            let answer = rx
                .recv()
                .unwrap_or_else(|_| Err("the shard has stopped".into()))
                .map_err(|e| format!("shard {shard}: {e}"))?;
            answers.push(answer);
        }
        Ok(answers)
    }

    /// Stops cleanly: no new requests, in-flight ones answered, the WAL synced, state machines
    /// checkpointed, files closed. Returns the first shard error, if any.
    pub fn shutdown(self) -> Result<(), String> {
        for input in &self.inputs {
            let (tx, rx) = flume::bounded(1);
            if input.send(ShardInput::Shutdown { done: tx }).is_ok() {
                let _ = rx.recv();
            }
        }
        let mut first = Ok(());
        for thread in self.threads {
            let result = thread
                .join()
                .map_err(|e| format!("shard thread: {e:?}"))
                .and_then(|r| r);
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

/// Nodes removed from the address book that are leaving: each with the groups still holding
/// it (see [`Engine::remove_nodes`]).
pub type LeavingNodes = Vec<(u64, Vec<u64>)>;

/// Wakes the shard loop from its own tasks (WAL completions, ticks).
#[derive(Default)]
struct Kick {
    kicked: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Kick {
    fn kick(&self) {
        self.kicked.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }
}

struct Kicked<'a>(&'a Kick);

impl Future for Kicked<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.0.kicked.replace(false) {
            Poll::Ready(())
        } else {
            *self.0.waker.borrow_mut() = Some(context.waker().clone());
            Poll::Pending
        }
    }
}

/// Sends what the core has for peers (messages, snapshot pieces: one flush) and answers the
/// requests it has finished with.
fn emit<S: StateMachine>(
    core: &mut ShardCore<GlommioDisk, S>,
    link: &mut dyn ShardLink,
    replies: &mut Tickets<(Reply, std::time::Instant)>,
    request_latency_us: &mut Histogram<u64>,
) {
    let (messages, answers) = core.take_output();
    for envelope in messages {
        let (to, group) = (envelope.message.to, envelope.group);
        // Dropped (no connection, queue full): raft probes the peer and resends.
        if !link.send(to, envelope) {
            core.report_unreachable(group, to);
        }
    }
    for piece in core.take_pieces() {
        // Dropped (no connection, queue full): the stream goes back to it after a pause.
        let (to, kept) = (piece.to, piece.without_data());
        if !link.send_piece(to, piece) {
            core.piece_not_sent(kept);
        }
    }
    link.flush();
    let mut batch = AnswerBatch::default();
    // One clock read for all of this loop's answers.
    let now = std::time::Instant::now();
    for answer in answers {
        if let Some((reply, since)) = replies.remove(answer.request) {
            if answer.result.is_ok() {
                let micros = now.saturating_duration_since(since).as_micros();
                let _ = request_latency_us.record(micros.max(1) as u64);
            }
            batch.add(reply, answer.result);
        }
    }
    batch.deliver();
}

/// A failed shard's loop: answers every request with `cause` until a stop request comes
/// (returned), or until no one can send any more (`None`).
async fn serve_failed(inbox: &ShardInbox, cause: &str) -> Option<flume::Sender<()>> {
    loop {
        match inbox.recv(true).await {
            Some(ShardInput::Shutdown { done }) => return Some(done),
            Some(input) => fail_input(input, cause),
            None => return None,
        }
    }
}

/// Answers an input the shard will not serve: requests get `Failed(cause)` (they never reached
/// raft, so they took no effect); queries get nothing (their callers see an empty answer);
/// peer messages are dropped, as a lossy network may.
fn fail_input(input: ShardInput, cause: &str) {
    if let ShardInput::Shutdown { done } = input {
        let _ = done.send(());
    } else if let Some(reply) = input.into_reply() {
        reply.send(Err(EngineError::Failed(cause.to_string())));
    }
}

/// Runs one shard until it is told to stop (`Ok`, its stop already answered) or fails (`Err`).
/// A stop request taken from the inbox is left in `shutdown` for the caller when the loop
/// fails before it could answer it.
async fn run_shard<S: StateMachine + 'static>(
    config: Config,
    net: ShardNet,
    shards: u64,
    inbox: &ShardInbox,
    transport: Arc<dyn Transport>,
    factory: Arc<dyn MachineFactory<S>>,
    shutdown: &mut Option<flume::Sender<()>>,
) -> Result<(), String> {
    let shard = net.shard;
    let dir: PathBuf = config.node.data_dir.join(format!("shard-{shard}"));
    let sync_mode = match config.wal.sync_mode {
        SyncMode::Dsync => ringraft_wal::SyncMode::Dsync,
        SyncMode::Fdatasync => ringraft_wal::SyncMode::Fdatasync,
    };
    let wal_disk = GlommioDisk::open(dir.join("wal"), sync_mode)
        .await
        .map_err(|e| e.to_string())?;
    let groups: Vec<u64> = (0..shards * config.shards.groups_per_shard)
        .filter(|g| g % shards == shard)
        .collect();
    let mut machines = Vec::new();
    for &group in &groups {
        let machine = factory
            .open(group, dir.join(format!("group-{group}")))
            .await
            .map_err(|e| format!("group {group}: state machine: {e}"))?;
        machines.push((group, machine));
    }
    // The state machines first: the WAL keeps in memory what they have yet to apply again.
    let wal = Wal::open_pinned(wal_disk.clone(), wal_config(&config), unapplied_floors(&machines))
        .await
        .map_err(|e| e.to_string())?;
    let mut core =
        ShardCore::new(ShardConfig::from_tuning(&config), wal, machines).map_err(|e| e.to_string())?;
    let mut link = transport.start_shard(net)?;
    let kick = Rc::new(Kick::default());
    let ticks = Rc::new(Cell::new(0u64));
    let done: Rc<RefCell<Vec<IoDone<GlommioDisk>>>> = Rc::new(RefCell::new(Vec::new()));
    // Log reads for lagging followers that finished, and snapshot chunks produced, beside the
    // loop; their tasks kick it.
    let fetched: FetchedQueue = Rc::new(RefCell::new(Vec::new()));
    let produced: ProducedQueue = Rc::new(RefCell::new(Vec::new()));
    // Client reads of values on disk, finished beside the loop.
    let values_read: ValuesReadQueue = Rc::new(RefCell::new(Vec::new()));
    // Failed log reads are logged once per LOG_READ_WARN_EVERY with how many failed: raft
    // retries a read at each append attempt, so a bad record would otherwise log at that rate.
    let read_failures: Rc<Cell<(Option<std::time::Instant>, u64)>> = Rc::new(Cell::new((None, 0)));
    let writing = Rc::new(Cell::new(false));
    let mut write_started: Option<std::time::Instant> = None;
    let mut sync_latency_us = new_histogram();
    let stop = Rc::new(Cell::new(false));
    {
        let (kick, ticks, stop) = (kick.clone(), ticks.clone(), stop.clone());
        let interval = Duration::from_millis(config.raft.tick_interval_ms);
        glommio::spawn_local(async move {
            while !stop.get() {
                glommio::timer::sleep(interval).await;
                ticks.set(ticks.get() + 1);
                kick.kick();
            }
        })
        .detach();
    }
    let entry_bytes_max = config.batching.entry_bytes_max as usize;
    // Requests waiting for their answers, with when they reached the shard; a request's id is
    // its ticket.
    let mut replies: Tickets<(Reply, std::time::Instant)> = Tickets::default();
    let mut request_latency_us = new_histogram();
    // Leadership transfers under way: (group, reply, deadline).
    let mut transfers: Vec<(u64, Reply, std::time::Instant)> = Vec::new();
    // When shutdown began; in-flight requests get until `request_limit` to be answered.
    let mut draining: Option<std::time::Instant> = None;
    // Every request held here is answered within this (see the sweep below), during a
    // shutdown's drain too.
    let request_limit = Duration::from_millis(config.limits.request_timeout_ms);
    let mut next_request_sweep = std::time::Instant::now() + REQUEST_SWEEP_INTERVAL;
    let mut requests_timed_out = 0u64;
    // Whether the WAL is retrying a segment preparation (for logging its start and end once).
    let mut prepare_failing = false;
    let transfer_limit = Duration::from_millis(2 * config.raft.election_timeout_ms);
    let mut transferring: Option<std::time::Instant> = None;
    let mut last_checkpoint = std::time::Instant::now();
    // When the next step of a checkpoint round may run (see CHECKPOINT_SHARE).
    let mut checkpoint_step_due = std::time::Instant::now();
    // The WAL's bytes written when the last checkpoint round began.
    let mut checkpoint_wal_bytes = 0u64;
    // A checkpoint round in progress: the next group to checkpoint.
    let mut checkpoint_cursor: Option<u64> = None;
    // The group whose state machine upkeep runs next.
    let mut maintenance_cursor = 0u64;
    let started = std::time::Instant::now();
    let checkpoint_every = Duration::from_millis(config.sm.checkpoint_interval_ms);
    let balance_every = Duration::from_millis(config.raft.leader_balance_interval_ms);
    let mut last_balance = std::time::Instant::now();
    loop {
        // Wait for work unless some is already there. Requests to propose do not wake the shard
        // while a WAL write is in flight (see `ShardInbox`); once it is awake, it takes them.
        let proposable = core.has_queued() && (!writing.get() || core.queued_bytes() >= entry_bytes_max);
        // (A completed write needs no look here: its task kicks the loop, which then does not
        // wait.)
        let wake_for_proposals = !writing.get();
        let mut waited = None;
        if !inbox.has_input(wake_for_proposals) && !kick.kicked.get() && !core.has_ready() && !proposable {
            let inbox_ready = inbox.recv(wake_for_proposals);
            let kicked = async {
                Kicked(&kick).await;
                None
            };
            waited = futures_lite::future::or(inbox_ready, kicked).await;
        }
        kick.kicked.set(false);
        // One clock read per loop: it stamps this loop's requests as they arrive.
        let loop_began = std::time::Instant::now();
        core.set_time_us(loop_began.duration_since(started).as_micros() as u64);
        // Take every waiting input (the one waited for first), up to a bound per loop.
        let mut pieces: Vec<SnapshotPiece> = Vec::new();
        for _ in 0..INPUTS_PER_LOOP_MAX {
            let Some(input) = waited.take().or_else(|| inbox.try_recv(true)) else {
                break;
            };
            if let ShardInput::Piece(piece) = input {
                pieces.push(*piece);
                continue;
            }
            if let ShardInput::AddNodes { nodes, done } = input {
                // The transport first: when it refuses, nothing changed.
                let added = link.add_nodes(&nodes);
                if added.is_ok() {
                    core.add_peers(nodes.iter().map(|n| n.id));
                }
                let _ = done.send(added);
                continue;
            }
            if let ShardInput::RemoveNodes { nodes, done } = input {
                // Members of no group here go now (the transport first: when it refuses,
                // nothing changed); the others are leaving, and go once they are members of
                // none (`take_departed`).
                let (free, held) = core.removal_split(&nodes);
                let removed = link.remove_nodes(&free);
                if removed.is_ok() {
                    core.remove_peers(&free);
                    core.mark_leaving(held.iter().map(|(node, _)| *node));
                }
                let _ = done.send(removed.map(|()| held));
                continue;
            }
            if let ShardInput::Transfer { group, to, reply } = input {
                match core.transfer_group(group, to) {
                    Err(error) => {
                        reply.send(Err(error));
                    }
                    Ok(false) => {
                        reply.send(Ok(Vec::new()));
                    }
                    Ok(true) => {
                        let deadline = std::time::Instant::now() + transfer_limit;
                        transfers.push((group, reply, deadline));
                    }
                }
                continue;
            }
            let extras = Extras {
                shard,
                loop_began,
                sync_latency_us: &sync_latency_us,
                request_latency_us: &request_latency_us,
                inbox_depth: inbox.len(),
                requests_timed_out,
            };
            handle_input(input, &mut core, &mut replies, shutdown, &extras);
        }
        for piece in pieces {
            core.step_piece(piece).await;
        }
        for (group, entries, contexts) in fetched.borrow_mut().drain(..) {
            core.fetched(group, entries, contexts);
        }
        for (group, to, stream, number, result) in produced.borrow_mut().drain(..) {
            core.chunk_produced(group, to, stream, number, result);
        }
        for (token, result) in values_read.borrow_mut().drain(..) {
            core.value_read(token, result);
        }
        for completion in done.borrow_mut().drain(..) {
            if let IoDone::Written { .. } = completion {
                writing.set(false);
                if let Some(started) = write_started.take() {
                    let _ = sync_latency_us.record(started.elapsed().as_micros().max(1) as u64);
                }
            }
            // A failed write is recorded in the WAL and reaches the core through on_durable. A
            // failed segment preparation (a full disk) or removal is only reported: the WAL
            // retries the preparation, and writes needing the segment wait meanwhile. Retries
            // of a preparation are logged when they start and when one succeeds, not each.
            let preparing = matches!(completion, IoDone::Prepared { .. });
            let result = core.wal().borrow_mut().io_done(completion);
            let retrying = core.wal().borrow().prepare_error().is_some();
            match result {
                Err(error) if preparing && retrying => {
                    if !prepare_failing {
                        tracing::warn!(
                            "shard {shard}: wal: {error}; retrying, writes that need the segment wait for space"
                        );
                    }
                }
                Err(error) => tracing::warn!("shard {shard}: wal: {error}"),
                Ok(()) if prepare_failing && !retrying => {
                    tracing::warn!("shard {shard}: wal: a segment is prepared again, writes go on");
                }
                Ok(()) => {}
            }
            prepare_failing = retrying;
            core.on_durable();
        }
        if let Some(cause) = core.failure() {
            // The WAL or a state machine failed: this shard cannot go on (its raft state may
            // be ahead of its disk). Answer everyone and stop; the node exits and recovery
            // runs at the next start. Looping on would spin on Readys it can no longer take.
            let cause = cause.to_string();
            let (_, answers) = core.take_output();
            for answer in answers {
                if let Some((reply, _)) = replies.remove(answer.request) {
                    reply.send(answer.result);
                }
            }
            for (reply, _) in replies.drain() {
                reply.send(Err(EngineError::Failed(cause.clone())));
            }
            link.close();
            stop.set(true);
            return Err(cause);
        }
        for _ in 0..ticks.replace(0) {
            core.tick();
        }
        // Nodes removed from the address book while members of a group here go once they are
        // members of none (`Engine::remove_nodes`).
        let departed = core.take_departed();
        if !departed.is_empty() {
            match link.remove_nodes(&departed) {
                Ok(()) => {
                    core.remove_peers(&departed);
                    tracing::info!(
                        ?departed,
                        shard,
                        "left the address book: members of no group of this shard any more"
                    );
                }
                // Only a transport that took the removal at first refuses: a bug.
                Err(e) => panic!("the transport refused nodes it had agreed to remove: {e}"),
            }
        }
        // Group commit for proposals too: while a WAL write is in flight, commands keep queueing
        // and go out as one entry when it completes (or once a full entry is queued). They would
        // wait for that write's completion in the WAL's open batch anyway.
        if !writing.get() || core.queued_bytes() >= entry_bytes_max {
            core.propose();
        }
        core.collect_ready().await;
        // Catch-up reads run beside the loop, not in it: a loop waiting on a read would hold
        // back this shard's WAL writes, heartbeats and answers for every group (on a busy
        // device, long enough for followers to start elections). Finished reads are handed
        // to raft at the top of a later loop; their task kicks the loop.
        for fetch in core.take_fetches() {
            let (disk, fetched, kick) = (wal_disk.clone(), fetched.clone(), kick.clone());
            let read_failures = read_failures.clone();
            glommio::spawn_local(async move {
                let entries = match fetch.plan {
                    Some(plan) => match plan.execute(&disk).await {
                        Ok(entries) => Some(entries),
                        Err(error) => {
                            // Raft asks again (or snapshots once the range is compacted). A
                            // segment recycled while the read was out fails it too.
                            let (last, failed) = read_failures.get();
                            let now = std::time::Instant::now();
                            if last.is_none_or(|at| now.duration_since(at) >= LOG_READ_WARN_EVERY) {
                                tracing::warn!(
                                    "shard {shard}: log read for group {}: {error} (failed reads since the last warning: {})",
                                    fetch.group,
                                    failed + 1
                                );
                                read_failures.set((Some(now), 0));
                            } else {
                                read_failures.set((last, failed + 1));
                            }
                            None
                        }
                    },
                    None => None,
                };
                fetched.borrow_mut().push((fetch.group, entries, fetch.contexts));
                kick.kick();
            })
            .detach();
        }
        // Start WAL IO: at most one write in flight; segment jobs beside it.
        let mut write_queued = false;
        loop {
            if writing.get() {
                break;
            }
            let job = core.wal().borrow_mut().poll_io();
            let Some(job) = job else { break };
            if matches!(job, IoJob::Write(_)) {
                writing.set(true);
                write_queued = true;
                write_started = Some(std::time::Instant::now());
            }
            let (disk, done, kick) = (wal_disk.clone(), done.clone(), kick.clone());
            glommio::spawn_local(async move {
                let completion = disk.perform_after_delay(job).await;
                done.borrow_mut().push(completion);
                kick.kick();
            })
            .detach();
        }
        // Zero-filling a new segment goes slowly while the log does not need it yet, so it
        // does not crowd the log's writes out of the device.
        wal_disk.pace_zero_fill(!core.wal().borrow().segment_needed_soon());
        if write_queued {
            // glommio hands queued IO to the kernel once per scheduler pass, after every
            // runnable task has run. Send what raft has for the peers, then let this pass end
            // (a 1 us timer fires after the reactor has submitted), so the WAL write and the
            // appends to followers are on their way before applying and answering below.
            emit(&mut core, link.as_mut(), &mut replies, &mut request_latency_us);
            glommio::timer::sleep(Duration::from_micros(1)).await;
        }
        core.apply().await;
        // Reads of values on disk run beside the loop, many at once (one at a time in the
        // loop, each ~100 µs device read held up every other read and the shard's own work).
        for read in core.take_value_reads() {
            let (values_read, kick) = (values_read.clone(), kick.clone());
            glommio::spawn_local(async move {
                let result = read.job.await;
                values_read.borrow_mut().push((read.token, result));
                kick.kick();
            })
            .detach();
        }
        core.pump_snapshots().await;
        // Snapshot chunks are read and encoded beside the loop too (a chunk of values in data
        // files is hundreds of reads): the shard's groups go on meanwhile.
        for job in core.take_chunk_jobs() {
            let (produced, kick) = (produced.clone(), kick.clone());
            glommio::spawn_local(async move {
                let result = job.job.await;
                produced
                    .borrow_mut()
                    .push((job.group, job.to, job.stream, job.number, result));
                kick.kick();
            })
            .detach();
        }
        // Transfers complete when this node no longer leads the group.
        for (group, reply, deadline) in std::mem::take(&mut transfers) {
            if !core.is_leader(group) {
                reply.send(Ok(Vec::new()));
            } else if std::time::Instant::now() >= deadline {
                reply.send(Err(EngineError::Timeout(format!(
                    "leadership of group {group} did not move within {} ms",
                    transfer_limit.as_millis()
                ))));
            } else {
                transfers.push((group, reply, deadline));
            }
        }
        emit(&mut core, link.as_mut(), &mut replies, &mut request_latency_us);
        // Every caller hears back within the limit, also when the shard cannot finish its
        // request: a WAL waiting for disk space, a quorum lost without a leader change yet.
        // (The ticker kicks the loop at least once per raft tick, so this runs while idle too.)
        if loop_began >= next_request_sweep {
            next_request_sweep = loop_began + REQUEST_SWEEP_INTERVAL;
            requests_timed_out += expire_requests(&mut replies, loop_began, request_limit) as u64;
        }
        if !balance_every.is_zero() && shutdown.is_none() && last_balance.elapsed() >= balance_every {
            core.balance_leaders();
            last_balance = std::time::Instant::now();
        }
        // A round starts on time, or earlier once the WAL has grown by checkpoint_log_bytes
        // (bounding what a restart must replay and hold in memory).
        if checkpoint_cursor.is_none() {
            let written = core.wal().borrow().stats().bytes_written;
            if last_checkpoint.elapsed() >= checkpoint_every
                || written - checkpoint_wal_bytes >= config.sm.checkpoint_log_bytes
            {
                checkpoint_cursor = Some(0);
                checkpoint_wal_bytes = written;
            }
        }
        let step_began = checkpoint_cursor.map(|_| std::time::Instant::now());
        if let Some((cursor, began)) = checkpoint_cursor
            .as_mut()
            .zip(step_began)
            .filter(|(_, began)| *began >= checkpoint_step_due)
        {
            let done = core
                .checkpoint_some(
                    cursor,
                    CHECKPOINTS_PER_LOOP,
                    Some(CHECKPOINT_BYTES_PER_LOOP),
                    config.wal.retain_entries,
                    config.wal.retain_for_followers_entries,
                )
                .await?;
            checkpoint_step_due = began + began.elapsed() * CHECKPOINT_SHARE;
            if done {
                checkpoint_cursor = None;
                last_checkpoint = std::time::Instant::now();
            }
        }
        core.maintain_some(&mut maintenance_cursor, MAINTENANCE_BYTES_PER_LOOP)
            .await?;
        if let Some(done) = shutdown.as_ref() {
            let since = *draining.get_or_insert_with(|| {
                // Stop accepting connections and requests; answer what is in flight (peer
                // links stay up: in-flight proposals need the followers to commit).
                link.close();
                std::time::Instant::now()
            });
            if since.elapsed() >= request_limit && !replies.is_empty() {
                // No quorum to finish them (peers gone, leadership lost): these may or may not
                // have been applied. Never a false ok.
                for (reply, _) in replies.drain() {
                    reply.send(Err(EngineError::UnknownOutcome));
                }
            }
            // Then hand leadership over, so clients of this node's groups find a new leader
            // without an election timeout (bounded: a transfer to a dead follower never ends).
            let handing_over = replies.is_empty() && core.failure().is_none() && {
                let started = *transferring.get_or_insert_with(std::time::Instant::now);
                started.elapsed() < transfer_limit && core.transfer_leadership() > 0
            };
            // Stop once nothing is waiting: every reply sent, leadership handed over, the WAL
            // idle.
            let idle =
                replies.is_empty() && !handing_over && !core.wal().borrow().has_pending() && !writing.get();
            if idle || core.failure().is_some() {
                core.checkpoint(config.wal.retain_entries, config.wal.retain_for_followers_entries)
                    .await?;
                stop.set(true);
                if let Some(cause) = core.failure() {
                    return Err(cause.to_string());
                }
                let _ = done.send(());
                return Ok(());
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Log reads finished beside a shard's loop: (group, entries or `None` if the read failed, the
/// raft requests it answers).
type FetchedQueue = Rc<
    RefCell<
        Vec<(
            u64,
            Option<Vec<ringraft_wal::Entry>>,
            Vec<raft::GetEntriesContext>,
        )>,
    >,
>;

/// Client reads of values on disk finished beside a shard's loop: (token, value).
type ValuesReadQueue = Rc<RefCell<Vec<(u64, Result<Option<Vec<u8>>, ringraft_sm::SmError>)>>>;

/// Snapshot chunks produced beside a shard's loop: (group, follower, stream, chunk number, bytes).
type ProducedQueue = Rc<RefCell<Vec<(u64, u64, u64, u64, Result<Vec<u8>, ringraft_sm::SmError>)>>>;

/// A shard warns about failed log reads for lagging followers at most this often.
const LOG_READ_WARN_EVERY: Duration = Duration::from_secs(10);

/// How often a shard looks for requests waiting longer than `limits.request_timeout_ms` (as
/// often as the TCP server does for its connections).
const REQUEST_SWEEP_INTERVAL: Duration = Duration::from_millis(50);

/// Answers `Timeout` to every request that reached the shard `limit` or longer before `now`, and
/// returns how many. Their commands may still be committed and applied: the answer says the
/// outcome is unknown, and the late answer finds no ticket and is dropped.
fn expire_requests(
    replies: &mut Tickets<(Reply, std::time::Instant)>,
    now: std::time::Instant,
    limit: Duration,
) -> usize {
    let expired: Vec<u64> = replies
        .iter()
        .filter(|(_, (_, arrived))| now.saturating_duration_since(*arrived) >= limit)
        .map(|(ticket, _)| ticket)
        .collect();
    for &ticket in &expired {
        let (reply, _) = replies.remove(ticket).expect("a ticket just listed");
        reply.send(Err(EngineError::Timeout(format!(
            "no answer within {} ms (limits.request_timeout_ms); the request may still take effect",
            limit.as_millis()
        ))));
    }
    expired.len()
}

/// What the runner knows beyond the core, for metrics.
struct Extras<'a> {
    shard: u64,
    /// When this loop began: the arrival time of the requests it takes.
    loop_began: std::time::Instant,
    sync_latency_us: &'a Histogram<u64>,
    request_latency_us: &'a Histogram<u64>,
    inbox_depth: usize,
    requests_timed_out: u64,
}

fn handle_input(
    input: ShardInput,
    core: &mut ShardCore<GlommioDisk, impl StateMachine>,
    replies: &mut Tickets<(Reply, std::time::Instant)>,
    shutdown: &mut Option<flume::Sender<()>>,
    extras: &Extras<'_>,
) {
    let mut register = |reply: Reply| replies.insert((reply, extras.loop_began));
    match input {
        ShardInput::Submit { reply, group, .. } | ShardInput::Read { reply, group, .. }
            if shutdown.is_some() =>
        {
            // Nothing was done; the client tries another node (the new leader once leadership
            // has been handed over).
            let leader = core.leader(group).filter(|&l| l != core.node());
            reply.send(Err(EngineError::NotLeader { leader }));
        }
        ShardInput::Submit {
            group,
            commands,
            reply,
        } => {
            let request = register(reply);
            core.submit(group, request, commands);
        }
        ShardInput::Read {
            group,
            key,
            consistency,
            reply,
        } => {
            let request = register(reply);
            core.read(group, request, key, consistency);
        }
        ShardInput::Peer(envelope) => core.step(*envelope),
        ShardInput::Piece(_) => unreachable!("the shard loop takes snapshot pieces itself"),
        ShardInput::Membership {
            group,
            changes,
            reply,
        } => {
            let request = register(reply);
            let mut change = raft::eraftpb::ConfChangeV2::default();
            change.set_changes(changes.into_iter().map(MemberChange::to_single).collect());
            core.change_membership(group, request, change);
        }
        ShardInput::Status { reply } => {
            let groups: Vec<u64> = core.groups().collect();
            let status = groups
                .into_iter()
                .map(|group| {
                    let (term, commit, applied) = core.progress(group).unwrap_or_default();
                    GroupStatus {
                        node: core.node(),
                        group,
                        leader: core.leader(group),
                        term,
                        commit,
                        applied,
                    }
                })
                .collect();
            let _ = reply.send(status);
        }
        ShardInput::Stats { reply } => {
            let shard = core.stats();
            let wal = core.wal().borrow().stats();
            let _ = reply.send(NodeStats {
                proposals: shard.proposals,
                commands_proposed: shard.commands_proposed,
                entries_applied: shard.entries_applied,
                busy_answers: shard.busy_answers,
                wal_writes: wal.writes,
                wal_bytes_written: wal.bytes_written,
            });
        }
        ShardInput::Metrics { reply } => {
            let wal = core.wal().borrow().stats();
            let _ = reply.send(ShardMetrics {
                node: core.node(),
                shard: extras.shard,
                stats: core.stats(),
                wal_writes: wal.writes,
                wal_bytes_written: wal.bytes_written,
                wal_cache_bytes: wal.cache_bytes as u64,
                wal_pending_bytes: wal.pending_bytes as u64,
                wal_segments_live: wal.segments_live as u64,
                wal_prepare_failures: wal.prepare_failures,
                wal_prepare_error: core.wal().borrow().prepare_error().map(str::to_owned),
                commands_per_entry: core.commands_per_entry().clone(),
                commit_latency_us: core.commit_latency_us().clone(),
                sync_latency_us: extras.sync_latency_us.clone(),
                request_latency_us: extras.request_latency_us.clone(),
                requests_waiting: replies.len() as u64,
                requests_timed_out: extras.requests_timed_out,
                inbox_depth: extras.inbox_depth as u64,
                groups_asleep: core.asleep_groups() as u64,
                nodes_leaving: core.leaving().iter().copied().collect(),
                groups: core.group_metrics(),
            });
        }
        ShardInput::Transfer { .. } => unreachable!("the shard loop takes transfers itself"),
        ShardInput::AddNodes { .. } | ShardInput::RemoveNodes { .. } => {
            unreachable!("the shard loop changes the address book itself")
        }
        ShardInput::Shutdown { done } => *shutdown = Some(done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(tx: flume::Sender<crate::reply::Outcome>) -> ShardInput {
        ShardInput::Submit {
            group: 0,
            commands: vec![Command::Get { key: b"k".to_vec() }],
            reply: Reply::channel(tx),
        }
    }

    fn read(tx: flume::Sender<crate::reply::Outcome>) -> ShardInput {
        ShardInput::Read {
            group: 0,
            key: b"k".to_vec(),
            consistency: Consistency::Local,
            reply: Reply::channel(tx),
        }
    }

    #[test]
    fn requests_past_the_limit_are_answered_timeout_and_their_late_answers_dropped() {
        let now = std::time::Instant::now();
        let limit = Duration::from_secs(10);
        let mut replies: Tickets<(Reply, std::time::Instant)> = Tickets::default();
        let (old_tx, old_rx) = flume::bounded(1);
        let (new_tx, new_rx) = flume::bounded(1);
        let (edge_tx, edge_rx) = flume::bounded(1);
        let old = replies.insert((Reply::channel(old_tx), now - Duration::from_secs(11)));
        let new = replies.insert((Reply::channel(new_tx), now - Duration::from_secs(9)));
        let edge = replies.insert((Reply::channel(edge_tx), now - limit));
        assert_eq!(expire_requests(&mut replies, now, limit), 2);
        for rx in [old_rx, edge_rx] {
            match rx.try_recv() {
                Ok(Err(EngineError::Timeout(message))) => {
                    assert!(message.contains("10000 ms"), "{message}");
                    assert!(message.contains("may still take effect"), "{message}");
                }
                other => panic!("expected a timeout, got {other:?}"),
            }
        }
        assert!(
            new_rx.try_recv().is_err(),
            "a request within the limit keeps waiting"
        );
        assert_eq!(replies.len(), 1);
        // The expired requests' real answers come too late: no ticket takes them.
        assert!(replies.remove(old).is_none());
        assert!(replies.remove(edge).is_none());
        assert!(replies.remove(new).is_some());
        // Nothing waits: nothing to do.
        assert_eq!(expire_requests(&mut replies, now, limit), 0);
    }

    #[test]
    fn requests_to_propose_wait_in_their_own_queue_until_taken() {
        let (queue, inbox) = inbox(&Config::default());
        let (tx, _rx) = flume::unbounded();
        queue.try_send(submit(tx.clone())).unwrap();
        queue.try_send(read(tx)).unwrap();
        assert_eq!(inbox.len(), 2);
        // What the shard waits for while its WAL write is in flight: the read, not the request to
        // propose.
        assert!(matches!(inbox.try_recv(false), Some(ShardInput::Read { .. })));
        assert!(inbox.try_recv(false).is_none());
        assert!(!inbox.has_input(false));
        assert!(inbox.has_input(true));
        assert!(matches!(inbox.try_recv(true), Some(ShardInput::Submit { .. })));
        assert!(inbox.try_recv(true).is_none());
    }

    #[test]
    fn a_stopped_shard_answers_what_is_left_in_either_queue() {
        let (queue, inbox) = inbox(&Config::default());
        let (tx, rx) = flume::unbounded();
        queue.try_send(submit(tx.clone())).unwrap();
        queue.try_send(read(tx.clone())).unwrap();
        queue.close("stopped for the test");
        for _ in 0..2 {
            match rx.try_recv() {
                Ok(Err(EngineError::Failed(cause))) => assert_eq!(cause, "stopped for the test"),
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(inbox.len(), 0);
        // After the stop, a request is refused at once (the caller answers its own caller).
        assert_eq!(queue.try_send(submit(tx)).unwrap_err(), Refused::Stopped);
    }

    #[test]
    fn a_failed_shard_answers_requests_to_propose_as_they_come() {
        let (queue, inbox) = inbox(&Config::default());
        let serving = std::thread::spawn(move || {
            futures_lite::future::block_on(serve_failed(&inbox, "the disk failed"))
        });
        let (tx, rx) = flume::unbounded();
        queue.try_send(submit(tx.clone())).unwrap();
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Err(EngineError::Failed(cause))) => assert_eq!(cause, "the disk failed"),
            other => panic!("unexpected answer {other:?}"),
        }
        let (done_tx, _done_rx) = flume::bounded(1);
        queue.try_send(ShardInput::Shutdown { done: done_tx }).unwrap();
        assert!(serving.join().unwrap().is_some());
        // What came after the stop request is answered when the queue closes.
        queue.try_send(submit(tx)).unwrap();
        queue.close("the disk failed");
        assert!(matches!(rx.try_recv(), Ok(Err(EngineError::Failed(_)))));
    }
}
