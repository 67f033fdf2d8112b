//! Deterministic simulation: three nodes, several groups, one thread, a fake clock, the WAL's
//! faulty in-memory disk (writes land volatile and are synced only when the simulated write
//! completes; a crash tears what was not synced), in-memory state machine files that lose
//! unsynced data at a crash, and a network that drops, delays, duplicates, reorders and
//! partitions. Everything comes from one seed.
//!
//! Checked after every step: at most one leader per term per group; an entry applied at an index
//! never differs between nodes or across restarts. At the end, after faults stop: every group
//! elects a leader and serves a write, every acknowledged write is on every node, all nodes hold
//! the same state, and the client history (puts and linearizable reads, including requests whose
//! outcome stayed unknown) is linearizable, key by key, per porcupine-rs (memoized WGL search).
//!
//! Reads are linearizable: half through ReadIndex, half through the leader's lease, with every
//! node's clock running at its own rate (within the drift the lease margin covers).
//!
//! Leadership moves on purpose too: random transfers during the fault phase and leader
//! balancing on every node, as the runtime does.
//!
//! Snapshots: state machines checkpoint and the WAL compacts a few entries behind, so nodes
//! that were down or cut off catch up by snapshot (streamed in small chunks through the same
//! faulty network).
//!
//! Membership: four nodes, of which 1-3 start as every group's voters. During the fault phase
//! groups add learners, promote them, remove voters, and replace a voter in one joint-consensus
//! change, with crashes anywhere in the middle. The end checks compare the nodes that are
//! members of a group at the end.
//!
//! Determinism: everything random comes from the seed. raft-rs draws election timeouts from a
//! thread-local generator, so each node gets a fixed, distinct timeout instead.
//!
//! `RINGRAFT_SIM_SEED=n` replays one seed; `RINGRAFT_SIM_SEEDS=n` runs n seeds (long mode);
//! `RINGRAFT_SIM_DEBUG=1` prints the linearizability check per key.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use porcupine_rs::{Model, Operation};
use ringraft_engine::raft::eraftpb::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, MessageType,
};
use ringraft_engine::{
    unapplied_floors, Answer, Consistency, EngineError, Envelope, Fetch, PieceKind, ShardConfig, ShardCore,
    ShardStats, SnapshotChunkJob, SnapshotPiece, ValueRead,
};
use ringraft_sm::{Command, CommandLimits, CommandResult, KvConfig, KvStore, MemSmDisk, StateMachine};
use ringraft_wal::{Disk, IoDone, IoJob, MemDisk, MemFault, MemFileHandle, SplitMix64, Wal, WalConfig};

fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("simulated IO never waits"),
    }
}

const NODES: u64 = 4;
/// Every group's voters at the start; node 4 joins groups through membership changes.
const INITIAL_VOTERS: u64 = 3;
const GROUPS: u64 = 2;
const TICK_MS: u64 = 10;
/// Each node's clock runs at its own rate, within this many parts per thousand of the true
/// rate (so two clocks differ by at most twice that).
const DRIFT_PER_MILLE: u64 = 20;
/// Lease: 20 election ticks minus a 20% margin, which covers the drift above (4% at most).
const LEASE_TICKS: u64 = 16;
const FAULT_PHASE_MS: u64 = 4_000;
const LIVENESS_MS: u64 = 6_000;

type Core = ShardCore<MemDisk, KvStore<MemSmDisk>>;

fn shard_config(node: u64) -> ShardConfig {
    ShardConfig {
        node,
        voters: (1..=INITIAL_VOTERS).collect(),
        election_ticks: 20,
        heartbeat_ticks: 3,
        // raft-rs would draw timeouts from a thread-local generator: give each node its own
        // fixed timeout instead, so the run depends on the seed alone.
        election_ticks_range: Some((20 + 4 * node as usize, 21 + 4 * node as usize)),
        max_size_per_msg: 64 << 10,
        max_inflight_msgs: 32,
        max_uncommitted_bytes: 8 << 20,
        max_committed_size_per_ready: 1 << 20,
        pre_vote: true,
        check_quorum: true,
        entry_bytes_max: 64 << 10,
        entry_commands_max: 256,
        group_queue_commands_max: 1024,
        group_queue_bytes_max: 1 << 20,
        limits: CommandLimits::default(),
        snapshot_chunks_in_flight: 2,
        // Few, so catch-up reads also wait for a slot.
        log_reads_in_flight: 2,
        value_reads_in_flight: 3,
        lease_ticks: LEASE_TICKS,
        peers: (1..=NODES).filter(|&n| n != node).collect(),
        quiesce_after_ticks: 30,
        promote_lag_max_entries: 50,
        // Every segment but the current one is over the limit: the compaction that keeps idle
        // groups from pinning the WAL runs often (about 5 times per seed), under crashes too.
        live_segments_max: 1,
    }
}

fn wal_config() -> WalConfig {
    WalConfig {
        segment_bytes: 256 << 10,
        batch_bytes_max: 64 << 10,
        cache_bytes_max: 4 << 10,
        segments_recycled_max: 1,
    }
}

fn kv_config() -> KvConfig {
    KvConfig {
        inline_value_bytes_max: 16,
        // Small data files: they seal often, so upkeep compacts them under faults too.
        data_file_bytes_max: 1 << 10,
        // Small chunks: a snapshot takes several, so streams resume and reorder under faults.
        snapshot_chunk_bytes: 256,
        // A small write buffer and read cache: reads of values find them in data files, and
        // are served beside the loop.
        write_buffer_bytes: 4096,
        cache_bytes_max: 256,
        ..KvConfig::default()
    }
}

struct Node {
    id: u64,
    wal_disk: MemDisk,
    sm_disks: BTreeMap<u64, MemSmDisk>,
    core: Option<Core>,
    /// A WAL write issued (bytes written, not yet synced) and when it completes.
    write: Option<(u64, MemFileHandle, u64)>,
    /// Log reads for lagging followers handed out by the core, and when each is performed
    /// and reported (later than asked, as on a device: the log may change meanwhile).
    fetches: Vec<(u64, Fetch<MemDisk>)>,
    /// Snapshot chunk jobs handed out, and when each runs and is reported (the state machine
    /// goes on applying meanwhile).
    chunk_jobs: Vec<(u64, SnapshotChunkJob)>,
    /// Client reads of values on disk handed out, and when each is performed and reported
    /// (the state machine goes on applying meanwhile).
    value_reads: Vec<(u64, ValueRead)>,
    /// A segment preparation the WAL retries after a failure, and when (its backoff).
    prepare: Option<(u64, IoJob<MemDisk>)>,
    /// Until when the node's disk is full: creating a WAL segment fails with ENOSPC, and so
    /// does any state machine write that would grow a file.
    disk_full_until: u64,
    /// Segment preparations that failed on this node (across restarts).
    prepare_failures: u64,
    /// Only the state machines' disk is full (their writes that would grow a file fail).
    sm_disks_full: bool,
    /// The counters of this node's earlier incarnations (see [`Sim::total`]).
    earlier: Vec<ShardStats>,
    restart_at: Option<u64>,
    /// The group whose state machine upkeep runs next.
    maintenance_cursor: u64,
    /// A stepwise checkpoint round under way (as the runtime runs them): the group it is at.
    checkpoint_cursor: Option<u64>,
    /// `ShardConfig::live_segments_max` of this node's shard.
    live_segments_max: usize,
    /// This node's tick period in microseconds of true time (its clock drift), and the time
    /// accumulated towards its next tick.
    tick_period_us: u64,
    tick_debt_us: u64,
}

impl Node {
    fn start(&mut self) {
        let machines: Vec<(u64, KvStore<MemSmDisk>)> = (0..GROUPS)
            .map(|group| {
                let disk = self.sm_disks.entry(group).or_default().clone();
                // Seeded hashing: the index's order (snapshot chunks, checkpoint steps) must
                // not differ from one run of a seed to the next.
                let config = KvConfig {
                    hash_seed: Some(self.id << 32 | group),
                    ..kv_config()
                };
                (
                    group,
                    now(KvStore::open(disk, config)).expect("state machine recovers"),
                )
            })
            .collect();
        let wal = now(Wal::open_pinned(
            self.wal_disk.clone(),
            wal_config(),
            unapplied_floors(&machines),
        ))
        .expect("wal recovers");
        let config = ShardConfig {
            live_segments_max: self.live_segments_max,
            ..shard_config(self.id)
        };
        let mut core = ShardCore::new(config, wal, machines).expect("shard starts");
        core.observe_applied();
        self.core = Some(core);
        self.write = None;
        self.fetches.clear();
        self.chunk_jobs.clear();
        self.value_reads.clear();
        self.prepare = None;
        self.checkpoint_cursor = None;
    }

    fn crash(&mut self) {
        if let Some(core) = &self.core {
            self.earlier.push(core.stats());
        }
        self.core = None;
        self.write = None;
        self.fetches.clear();
        self.chunk_jobs.clear();
        self.value_reads.clear();
        self.wal_disk.crash();
        for disk in self.sm_disks.values() {
            disk.crash();
        }
    }
}

#[derive(Clone, Debug)]
struct Pending {
    group: u64,
    key: Vec<u8>,
    value: Vec<u8>,
    read: bool,
}

/// Shared keys per group (at a time) that many writes and reads touch, for the
/// linearizability check.
const HOT_KEYS: u64 = 2;
/// Entries kept below a checkpoint when compacting: few, so snapshots are common.
const RETAIN_ENTRIES: u64 = 5;
/// Linux's errno for a full disk.
const ENOSPC: i32 = 28;

type Value = Option<Vec<u8>>;

/// What a request did to a key, as the client saw it.
#[derive(Clone, Debug)]
enum RegisterOp {
    Write(Value),
    Read,
}

#[derive(Clone, Debug)]
enum RegisterRet {
    WriteOk,
    ReadOk(Value),
}

/// The client history, in the order the simulation observed it.
#[derive(Clone, Debug)]
enum Event {
    Invoke {
        request: u64,
        key: Vec<u8>,
        op: RegisterOp,
    },
    Return {
        request: u64,
        ret: RegisterRet,
    },
}

/// A register (one key) for porcupine: values are numbered per key; 0 is "absent".
#[derive(Clone)]
struct Register;

#[derive(Clone, Debug)]
enum RegisterStep {
    Write(u64),
    /// A read and the value it returned.
    Read(u64),
}

impl Model for Register {
    type State = u64;
    type Op = RegisterStep;
    type Metadata = ();

    fn init() -> u64 {
        0
    }

    fn step(state: &u64, op: &RegisterStep) -> (bool, u64) {
        match op {
            RegisterStep::Write(value) => (true, *value),
            RegisterStep::Read(seen) => (seen == state, *state),
        }
    }
}

/// What travels between nodes: raft messages and snapshot pieces, under the same faults.
#[derive(Clone, Debug)]
enum Packet {
    Raft(Envelope),
    Piece(SnapshotPiece),
}

struct Sim {
    seed: u64,
    rng: SplitMix64,
    clock: u64,
    nodes: Vec<Node>,
    network: Vec<(u64, u64, Packet)>, // (deliver at, to, message)
    blocked: BTreeSet<(u64, u64)>,
    drop_percent: u64,
    faults: bool,
    load: bool,
    next_request: u64,
    pending: BTreeMap<u64, Pending>,
    acked: Vec<Pending>,
    leader_hint: BTreeMap<u64, u64>,
    leaders: BTreeMap<(u64, u64), u64>,
    applied: BTreeMap<(u64, u64), (u64, u32)>,
    writes: u64,
    /// Per group, the numbers of the writes to unique keys (`g{group}-w{number}`) proposed.
    unique_writes: BTreeMap<u64, Vec<u64>>,
    reads_ok: u64,
    history: Vec<Event>,
    /// Requests refused before anything happened (NotLeader, Busy...): left out of the history.
    refused: BTreeSet<u64>,
    membership_changes: u64,
    lease_reads_total: u64,
    /// Entries kept behind each checkpoint (and for followers) when compacting.
    retain: u64,
    /// Milliseconds a snapshot chunk job takes at least (a slow disk under the leader's data).
    chunk_delay: u64,
    /// Snapshot chunks and acknowledgements the transport refuses next, as one whose queue to
    /// the peer is full would: handed back to their core (`piece_not_sent`).
    unsent_chunks: u64,
    unsent_acks: u64,
    /// Every packet takes the same time, so none overtakes another (as on one TCP connection).
    fifo: bool,
    /// Vote and pre-vote requests each node sent (campaigns), dropped ones included.
    vote_requests: BTreeMap<u64, u64>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = SplitMix64::new(seed);
        let nodes = (1..=NODES)
            .map(|id| Node {
                id,
                wal_disk: MemDisk::new(rng.next_u64()),
                sm_disks: BTreeMap::new(),
                core: None,
                write: None,
                fetches: Vec::new(),
                chunk_jobs: Vec::new(),
                value_reads: Vec::new(),
                prepare: None,
                disk_full_until: 0,
                prepare_failures: 0,
                earlier: Vec::new(),
                sm_disks_full: false,
                restart_at: None,
                maintenance_cursor: 0,
                checkpoint_cursor: None,
                live_segments_max: shard_config(id).live_segments_max,
                tick_period_us: TICK_MS
                    * 1000
                    * (1000 - DRIFT_PER_MILLE + rng.below(2 * DRIFT_PER_MILLE + 1))
                    / 1000,
                tick_debt_us: id * 1000,
            })
            .collect();
        let mut sim = Sim {
            seed,
            rng,
            clock: 0,
            nodes,
            network: Vec::new(),
            blocked: BTreeSet::new(),
            drop_percent: 3,
            faults: true,
            load: true,
            next_request: 1,
            pending: BTreeMap::new(),
            acked: Vec::new(),
            leader_hint: BTreeMap::new(),
            leaders: BTreeMap::new(),
            applied: BTreeMap::new(),
            writes: 0,
            unique_writes: BTreeMap::new(),
            reads_ok: 0,
            history: Vec::new(),
            refused: BTreeSet::new(),
            membership_changes: 0,
            lease_reads_total: 0,
            retain: RETAIN_ENTRIES,
            chunk_delay: 0,
            unsent_chunks: 0,
            unsent_acks: 0,
            fifo: false,
            vote_requests: BTreeMap::new(),
        };
        for node in &mut sim.nodes {
            node.start();
        }
        sim
    }

    fn fail(&self, what: String) -> ! {
        for node in &self.nodes {
            match &node.core {
                Some(core) => {
                    let groups: Vec<_> = (0..GROUPS)
                        .map(|g| {
                            (
                                core.progress(g),
                                core.leader(g),
                                core.is_leader(g),
                                core.wal().borrow().last_index(g),
                            )
                        })
                        .collect();
                    eprintln!("node {}: (term, commit, applied), leader, is_leader, wal last: {groups:?} stats {:?}", node.id, core.stats());
                }
                None => eprintln!("node {}: down", node.id),
            }
        }
        for group in 0..GROUPS {
            for node in &self.nodes {
                if let Some(core) = &node.core {
                    eprintln!("group {group} node {}: {}", node.id, core.debug_state(group));
                }
            }
        }
        eprintln!(
            "acked {} pending {} network {}",
            self.acked.len(),
            self.pending.len(),
            self.network.len()
        );
        panic!("simulation seed {} at {} ms: {what}\nreplay: RINGRAFT_SIM_SEED={} cargo test -p ringraft-engine --test sim", self.seed, self.clock, self.seed);
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    /// Performs the node's WAL IO: segment jobs at once (a retried preparation after its
    /// backoff), one write at a time that lands (volatile) when issued and is synced when its
    /// simulated latency has passed. While the node's disk is full, creating a segment fails.
    fn wal_io(&mut self, i: usize) {
        let clock = self.clock;
        let latency = 1 + self.rng.below(3);
        let node = &mut self.nodes[i];
        let Some(core) = node.core.as_mut() else { return };
        let mut segment_job = |job: IoJob<MemDisk>, core: &mut Core| {
            let create = matches!(&job, IoJob::Prepare(p) if p.recycle_from.is_none());
            let full = create && clock < node.disk_full_until;
            if full {
                node.wal_disk.inject(MemFault::Create(ENOSPC));
            }
            let done = now(ringraft_wal::perform(&node.wal_disk, job));
            match core.wal().borrow_mut().io_done(done) {
                Ok(()) => {}
                // A full disk fails only the preparation: the WAL retries it.
                Err(error) if full && error.to_string().contains("prepare segment") => {
                    node.prepare_failures += 1;
                }
                Err(error) => panic!("segment job: {error}"),
            }
        };
        if node.prepare.as_ref().is_some_and(|(due, _)| clock >= *due) {
            let (_, job) = node.prepare.take().unwrap();
            segment_job(job, core);
        }
        if let Some((done_at, file, batch)) = node.write.take() {
            if clock < done_at {
                node.write = Some((done_at, file, batch));
            } else {
                let result = now(node.wal_disk.sync(&file));
                let done = IoDone::Written { batch, result };
                let _ = core.wal().borrow_mut().io_done(done);
                core.on_durable();
            }
        }
        if node.write.is_some() {
            return;
        }
        loop {
            let job = core.wal().borrow_mut().poll_io();
            match job {
                None => break,
                Some(IoJob::Write(write)) => {
                    now(node.wal_disk.write_at(&write.file, write.offset, write.buffer)).expect("write");
                    node.write = Some((clock + latency, write.file, write.batch));
                    break;
                }
                Some(IoJob::Prepare(prepare)) if !prepare.delay.is_zero() => {
                    let due = clock + prepare.delay.as_millis() as u64;
                    node.prepare = Some((due, IoJob::Prepare(prepare)));
                }
                Some(other) => segment_job(other, core),
            }
        }
    }

    fn send(&mut self, from: u64, packets: Vec<Packet>) {
        for envelope in packets {
            let to = match &envelope {
                Packet::Raft(envelope) => envelope.message.to,
                Packet::Piece(piece) => piece.to,
            };
            if let Packet::Raft(envelope) = &envelope {
                if matches!(
                    envelope.message.msg_type,
                    MessageType::MsgRequestPreVote | MessageType::MsgRequestVote
                ) {
                    *self.vote_requests.entry(from).or_default() += 1;
                }
            }
            if self.blocked.contains(&(from, to)) || self.chance(self.drop_percent) {
                continue;
            }
            let delay = match self.fifo {
                true => 2,
                false => 1 + self.rng.below(if self.faults { 8 } else { 3 }),
            };
            if self.faults && self.chance(2) {
                self.network.push((self.clock + delay + 3, to, envelope.clone()));
            }
            self.network.push((self.clock + delay, to, envelope));
        }
    }

    fn answer(&mut self, answers: Vec<Answer>) {
        for answer in answers {
            let Some(request) = self.pending.remove(&answer.request) else {
                continue;
            };
            match answer.result {
                Ok(results) if !request.read && results == vec![CommandResult::Ok] => {
                    self.history.push(Event::Return {
                        request: answer.request,
                        ret: RegisterRet::WriteOk,
                    });
                    self.acked.push(request);
                }
                Ok(results) if request.read => {
                    let value = match results.as_slice() {
                        [CommandResult::Value(value)] => Some(value.clone()),
                        [CommandResult::NotFound] => None,
                        other => self.fail(format!("unexpected read results {other:?}")),
                    };
                    self.reads_ok += 1;
                    self.history.push(Event::Return {
                        request: answer.request,
                        ret: RegisterRet::ReadOk(value),
                    });
                }
                Ok(other) => self.fail(format!("unexpected results {other:?}")),
                // Nothing happened: these are answered before the request enters the log.
                Err(EngineError::NotLeader { leader }) => {
                    self.refused.insert(answer.request);
                    if let Some(leader) = leader {
                        self.leader_hint.insert(request.group, leader);
                    }
                }
                Err(
                    EngineError::Busy(_)
                    | EngineError::TooLarge(_)
                    | EngineError::BadRequest(_)
                    | EngineError::UnknownGroup(_),
                ) => {
                    self.refused.insert(answer.request);
                }
                // May or may not have happened: stays in flight in the history.
                Err(EngineError::UnknownOutcome | EngineError::Failed(_) | EngineError::Timeout(_)) => {}
            }
        }
    }

    /// Checks every key's history with a linearizability tester (linearizability is
    /// compositional, so keys are checked one by one).
    fn check_linearizable(&self) {
        let mut by_key: BTreeMap<Vec<u8>, Vec<&Event>> = BTreeMap::new();
        let mut key_of = BTreeMap::new();
        for event in &self.history {
            match event {
                Event::Invoke { request, key, .. } => {
                    if !self.refused.contains(request) {
                        key_of.insert(*request, key.clone());
                        by_key.entry(key.clone()).or_default().push(event);
                    }
                }
                Event::Return { request, .. } => {
                    if let Some(key) = key_of.get(request) {
                        by_key.get_mut(key).unwrap().push(event);
                    }
                }
            }
        }
        for (key, events) in by_key {
            let name = String::from_utf8_lossy(&key).into_owned();
            // Values numbered per key (0 = absent) keep the model's state small.
            let mut ids: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            let mut id_of = |value: &Value| match value {
                None => 0,
                Some(bytes) => {
                    let next = ids.len() as u64 + 1;
                    *ids.entry(bytes.clone()).or_insert(next)
                }
            };
            // Time is the position in the observed event order. An operation that never
            // returned (its outcome unknown) gets an infinite return time: it may take effect at
            // any point after its call, including after everything (that is, not at all).
            let mut calls: BTreeMap<u64, (i64, RegisterOp)> = BTreeMap::new();
            let mut operations = Vec::new();
            for (time, event) in events.iter().enumerate() {
                match event {
                    Event::Invoke { request, op, .. } => {
                        calls.insert(*request, (time as i64, op.clone()));
                    }
                    Event::Return { request, ret } => {
                        let (call_time, op) = calls.remove(request).expect("a return follows its call");
                        let step = match (op, ret) {
                            (RegisterOp::Write(value), RegisterRet::WriteOk) => {
                                RegisterStep::Write(id_of(&value))
                            }
                            (RegisterOp::Read, RegisterRet::ReadOk(value)) => {
                                RegisterStep::Read(id_of(value))
                            }
                            (op, ret) => self.fail(format!("key {name}: {op:?} returned {ret:?}")),
                        };
                        operations.push(Operation {
                            client_id: None,
                            call_time,
                            return_time: time as i64,
                            op: step,
                            metadata: None,
                        });
                    }
                }
            }
            for (_, (call_time, op)) in calls {
                // Unanswered reads have no effect; unanswered writes may have.
                if let RegisterOp::Write(value) = op {
                    let step = RegisterStep::Write(id_of(&value));
                    operations.push(Operation {
                        client_id: None,
                        call_time,
                        return_time: i64::MAX,
                        op: step,
                        metadata: None,
                    });
                }
            }
            let began = std::time::Instant::now();
            let linearizable = porcupine_rs::check_operations::<Register>(&operations);
            if std::env::var_os("RINGRAFT_SIM_DEBUG").is_some() {
                eprintln!(
                    "key {name}: {} operations checked in {:?}",
                    operations.len(),
                    began.elapsed()
                );
            }
            if !linearizable {
                self.fail(format!("key {name} is not linearizable: {events:?}"));
            }
        }
    }

    fn client(&mut self) {
        if !self.load || !self.chance(30) {
            return;
        }
        let group = self.rng.below(GROUPS);
        let hint = self.leader_hint.get(&group).copied();
        let target = match hint {
            Some(leader) if !self.chance(10) => leader,
            _ => 1 + self.rng.below(NODES),
        };
        let request = self.next_request;
        self.next_request += 1;
        let node = &mut self.nodes[(target - 1) as usize];
        let Some(core) = node.core.as_mut() else { return };
        // Hot keys rotate every 250 simulated ms: each key's history stays short enough for an
        // exhaustive linearizability check even with writes whose outcome stays unknown.
        let hot = format!("g{group}-hot{}-{}", self.clock / 250, self.rng.below(HOT_KEYS)).into_bytes();
        match self.rng.below(10) {
            0..=2 => {
                // A linearizable read: mostly of a hot key, sometimes of a unique key written
                // earlier (its value long since in a data file, if it is not inline).
                let earlier = self.unique_writes.get(&group).filter(|w| !w.is_empty());
                let key = match earlier {
                    Some(writes) if self.rng.below(4) == 0 => {
                        let number = writes[self.rng.below(writes.len() as u64) as usize];
                        format!("g{group}-w{number}").into_bytes()
                    }
                    _ => hot,
                };
                self.pending.insert(
                    request,
                    Pending {
                        group,
                        key: key.clone(),
                        value: Vec::new(),
                        read: true,
                    },
                );
                self.history.push(Event::Invoke {
                    request,
                    key: key.clone(),
                    op: RegisterOp::Read,
                });
                // Half of the reads use the leader's lease (served without a round trip while
                // it holds, under clock drift within the lease margin).
                let consistency = if self.rng.below(2) == 0 {
                    Consistency::Lease
                } else {
                    Consistency::Linearizable
                };
                core.read(group, request, key, consistency);
            }
            choice => {
                self.writes += 1;
                let key = if choice <= 5 {
                    hot
                } else {
                    self.unique_writes.entry(group).or_default().push(self.writes);
                    format!("g{group}-w{}", self.writes).into_bytes()
                };
                // Every other value is longer than the store keeps inline: those go to data
                // files, which overwrites of the hot keys fill with garbage for upkeep to reclaim.
                let value = if self.writes % 2 == 0 {
                    format!("v{}", self.writes).into_bytes()
                } else {
                    format!("v{}-{:0>24}", self.writes, self.writes).into_bytes()
                };
                self.pending.insert(
                    request,
                    Pending {
                        group,
                        key: key.clone(),
                        value: value.clone(),
                        read: false,
                    },
                );
                self.history.push(Event::Invoke {
                    request,
                    key: key.clone(),
                    op: RegisterOp::Write(Some(value.clone())),
                });
                core.submit(group, request, vec![Command::Put { key, value }]);
            }
        }
    }

    fn faults(&mut self) {
        if !self.faults {
            return;
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_some() && self.chance(1) && self.rng.below(10) < 3 {
                self.nodes[i].crash();
                self.nodes[i].restart_at = Some(self.clock + 50 + self.rng.below(400));
            }
        }
        // A node's disk fills up for a while: its WAL cannot create segments (its writes stall
        // at the next rollover), and it must carry on once space is back.
        if self.chance(1) && self.rng.below(4) == 0 {
            let i = self.rng.below(NODES) as usize;
            self.nodes[i].disk_full_until = self.clock + 20 + self.rng.below(300);
        }
        if self.chance(1) {
            let a = 1 + self.rng.below(NODES);
            let b = 1 + self.rng.below(NODES);
            if a != b {
                self.blocked.insert((a, b));
                self.blocked.insert((b, a));
            }
        }
        if self.chance(2) {
            self.blocked.clear();
        }
        // Membership changes, one at a time per group (a second one is refused while the first
        // is pending), with crashes and partitions going on.
        if self.chance(1) {
            self.change_membership();
        }
        // Leadership transfers under load and faults (an operator's, or a stopping node's).
        if self.chance(1) {
            let i = self.rng.below(NODES) as usize;
            let group = self.rng.below(GROUPS);
            let to = if self.chance(33) {
                None
            } else {
                Some(1 + self.rng.below(NODES))
            };
            if let Some(core) = self.nodes[i].core.as_mut() {
                let _ = core.transfer_group(group, to);
            }
        }
    }

    /// Asks a group's leader for the next change: promote a learner, else shrink four voters to
    /// three, else add the non-member as a learner or swap it for a voter in one joint change.
    fn change_membership(&mut self) {
        let group = self.rng.below(GROUPS);
        let Some(i) =
            (0..self.nodes.len()).find(|&i| self.nodes[i].core.as_ref().is_some_and(|c| c.is_leader(group)))
        else {
            return;
        };
        let conf = self.nodes[i].core.as_ref().unwrap().membership(group).unwrap();
        let outsiders: Vec<u64> = (1..=NODES)
            .filter(|n| !conf.voters.contains(n) && !conf.learners.contains(n))
            .collect();
        let single = |change_type, node_id| {
            let mut c = ConfChangeSingle::default();
            c.set_change_type(change_type);
            c.node_id = node_id;
            c
        };
        let pick = |rng: &mut SplitMix64, list: &[u64]| list[rng.below(list.len() as u64) as usize];
        let changes = if let Some(&learner) = conf.learners.first() {
            vec![single(ConfChangeType::AddNode, learner)]
        } else if conf.voters.len() > INITIAL_VOTERS as usize {
            let voter = pick(&mut self.rng, &conf.voters);
            vec![single(ConfChangeType::RemoveNode, voter)]
        } else if !outsiders.is_empty() && self.chance(50) {
            vec![single(
                ConfChangeType::AddLearnerNode,
                pick(&mut self.rng, &outsiders),
            )]
        } else if !outsiders.is_empty() {
            let voter = pick(&mut self.rng, &conf.voters);
            vec![
                single(ConfChangeType::AddNode, pick(&mut self.rng, &outsiders)),
                single(ConfChangeType::RemoveNode, voter),
            ]
        } else {
            return;
        };
        let mut change = ConfChangeV2::default();
        change.set_changes(changes.into());
        let request = self.next_request;
        self.next_request += 1;
        self.membership_changes += 1;
        self.nodes[i]
            .core
            .as_mut()
            .unwrap()
            .change_membership(group, request, change);
    }

    /// The members (voters and learners) of `group` as its leader (or any node) applied them.
    fn members(&self, group: u64) -> BTreeSet<u64> {
        let cores = || self.nodes.iter().filter_map(|n| n.core.as_ref());
        let core = cores()
            .find(|c| c.is_leader(group))
            .or_else(|| cores().next())
            .unwrap();
        let conf = core.membership(group).unwrap();
        conf.voters.iter().chain(&conf.learners).copied().collect()
    }

    fn check(&mut self, i: usize) {
        let id = self.nodes[i].id;
        let Some(core) = self.nodes[i].core.as_mut() else {
            return;
        };
        let applied = core.take_applied();
        let leaders: Vec<(u64, u64)> = (0..GROUPS)
            .filter(|&g| core.is_leader(g))
            .map(|g| (g, core.progress(g).unwrap().0))
            .collect();
        for (group, term) in leaders {
            if let Some(&other) = self.leaders.get(&(group, term)) {
                if other != id {
                    self.fail(format!("group {group} term {term}: leaders {other} and {id}"));
                }
            }
            self.leaders.insert((group, term), id);
        }
        for (group, index, term, crc) in applied {
            match self.applied.get(&(group, index)) {
                Some(&(t, c)) if (t, c) != (term, crc) => self.fail(format!(
                    "group {group} index {index}: node {id} applied term {term} crc {crc:#x}, another applied term {t} crc {c:#x}"
                )),
                _ => {
                    self.applied.insert((group, index), (term, crc));
                }
            }
        }
    }

    fn step(&mut self) {
        self.clock += 1;
        let (clock, retain) = (self.clock, self.retain);
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.network)
            .into_iter()
            .partition(|(at, _, _)| *at <= clock);
        self.network = later;
        for (_, to, packet) in due {
            if let Some(core) = self.nodes[(to - 1) as usize].core.as_mut() {
                match packet {
                    Packet::Raft(envelope) => core.step(envelope),
                    Packet::Piece(piece) => now(core.step_piece(piece)),
                }
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() {
                if self.nodes[i].restart_at.is_some_and(|at| at <= clock) {
                    self.nodes[i].restart_at = None;
                    self.nodes[i].start();
                }
                continue;
            }
            let node = &mut self.nodes[i];
            node.tick_debt_us += 1000;
            if node.tick_debt_us >= node.tick_period_us {
                node.tick_debt_us -= node.tick_period_us;
                node.core.as_mut().unwrap().tick();
            }
            let node = &mut self.nodes[i];
            let core = node.core.as_mut().unwrap();
            // While the disk is full, the state machines' writes that need space fail too:
            // checkpoints are abandoned, applies of values stored in files and snapshot
            // installs wait, and all go on once space is back.
            let full = clock < node.disk_full_until || node.sm_disks_full;
            for disk in node.sm_disks.values() {
                disk.set_full(full);
            }
            if clock % 1400 == 0 {
                // Compacting close behind the checkpoint makes followers that were down or cut
                // off fall behind the log: they catch up by snapshot. A whole checkpoint
                // abandons a stepwise one under way.
                now(core.checkpoint(retain, retain)).expect("checkpoint");
            } else if clock % 700 == 0 && node.checkpoint_cursor.is_none() {
                node.checkpoint_cursor = Some(0);
            }
            if let Some(cursor) = node.checkpoint_cursor.as_mut() {
                // Stepwise, as the runtime does: a few records per millisecond, so applies,
                // snapshots, upkeep and crashes come between the steps.
                let done =
                    now(core.checkpoint_some(cursor, 2, Some(64), retain, retain)).expect("checkpoint step");
                if done {
                    node.checkpoint_cursor = None;
                }
            }
            let core = self.nodes[i].core.as_mut().unwrap();
            // Leader balancing runs on every node, as the runtime does.
            if clock % 500 == 0 {
                core.balance_leaders();
            }
            // State machine upkeep (the KV store compacting its data files) in small steps,
            // between applies and checkpoints, crashes included.
            if clock % 50 == 0 {
                let node = &mut self.nodes[i];
                let core = node.core.as_mut().unwrap();
                now(core.maintain_some(&mut node.maintenance_cursor, 4096)).expect("upkeep");
            }
        }
        self.client();
        for i in 0..self.nodes.len() {
            let Some(core) = self.nodes[i].core.as_mut() else {
                continue;
            };
            core.set_time_us(self.clock * 1000);
            // Log reads due now are performed and reported; one whose segment was recycled
            // or removed meanwhile fails (raft asks again).
            let clock = self.clock;
            let node = &mut self.nodes[i];
            let core = node.core.as_mut().unwrap();
            let (due, later): (Vec<_>, Vec<_>) = node.fetches.drain(..).partition(|(at, _)| *at <= clock);
            node.fetches = later;
            for (_, fetch) in due {
                let entries = fetch
                    .plan
                    .and_then(|plan| now(plan.execute(core.wal().borrow().disk())).ok());
                core.fetched(fetch.group, entries, fetch.contexts);
            }
            let (due, later): (Vec<_>, Vec<_>) = node.chunk_jobs.drain(..).partition(|(at, _)| *at <= clock);
            node.chunk_jobs = later;
            for (_, job) in due {
                let result = now(job.job);
                core.chunk_produced(job.group, job.to, job.stream, job.number, result);
            }
            let (due, later): (Vec<_>, Vec<_>) = node.value_reads.drain(..).partition(|(at, _)| *at <= clock);
            node.value_reads = later;
            for (_, read) in due {
                core.value_read(read.token, now(read.job));
            }
            core.propose();
            now(core.collect_ready());
            for fetch in core.take_fetches() {
                let due = clock + self.rng.below(4);
                self.nodes[i].fetches.push((due, fetch));
            }
            self.wal_io(i);
            let core = self.nodes[i].core.as_mut().unwrap();
            now(core.apply());
            now(core.pump_snapshots());
            let reads = core.take_value_reads();
            for job in core.take_chunk_jobs() {
                let due = self.clock + self.chunk_delay + self.rng.below(4);
                self.nodes[i].chunk_jobs.push((due, job));
            }
            for read in reads {
                let due = self.clock + self.rng.below(4);
                self.nodes[i].value_reads.push((due, read));
            }
            let core = self.nodes[i].core.as_mut().unwrap();
            if let Some(cause) = core.failure() {
                let cause = cause.to_string();
                self.fail(format!("node {} failed: {cause}", i + 1));
            }
            let (messages, answers) = core.take_output();
            let mut packets: Vec<Packet> = messages.into_iter().map(Packet::Raft).collect();
            for piece in core.take_pieces() {
                let refused = match piece.kind {
                    PieceKind::Chunk { .. } => &mut self.unsent_chunks,
                    PieceKind::Ack { .. } => &mut self.unsent_acks,
                    PieceKind::Done { .. } => &mut 0,
                };
                if *refused > 0 {
                    *refused -= 1;
                    core.piece_not_sent(piece.without_data());
                } else {
                    packets.push(Packet::Piece(piece));
                }
            }
            let from = self.nodes[i].id;
            self.send(from, packets);
            self.answer(answers);
            self.check(i);
        }
        self.faults();
    }

    /// A run without faults, and without the WAL's live segment bound (which compacts the
    /// groups pinning the oldest segments through their checkpoints, whatever a follower needs).
    fn calm(seed: u64) -> Sim {
        let mut sim = Sim::new(seed);
        sim.faults = false;
        for node in &mut sim.nodes {
            node.live_segments_max = 1_000;
            node.start();
        }
        sim
    }

    /// Cuts node `id` off from every other node (until `blocked` is cleared).
    fn isolate(&mut self, id: u64) {
        for other in (1..=NODES).filter(|&n| n != id) {
            self.blocked.insert((id, other));
            self.blocked.insert((other, id));
        }
    }

    /// Whether node `i` (an index) has applied, in every group, at least what the least
    /// advanced of the group's other members has.
    fn caught_up(&self, i: usize) -> bool {
        let id = self.nodes[i].id;
        (0..GROUPS).all(|group| {
            let applied = |n: &Node| n.core.as_ref().unwrap().progress(group).unwrap().2;
            let members = self.members(group);
            let others = self
                .nodes
                .iter()
                .filter(|n| n.id != id && members.contains(&n.id))
                .map(applied)
                .min()
                .unwrap_or(0);
            applied(&self.nodes[i]) >= others
        })
    }

    /// Node `id`'s shard (it must be running).
    fn core(&self, id: u64) -> &Core {
        self.nodes[(id - 1) as usize].core.as_ref().unwrap()
    }

    /// The node leading `group` now (there must be one).
    fn leader_of(&self, group: u64) -> u64 {
        (1..=NODES)
            .find(|&id| {
                self.nodes[(id - 1) as usize]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.is_leader(group))
            })
            .unwrap_or_else(|| panic!("group {group} has no leader"))
    }

    /// How many groups node `id` leads.
    fn leads(&self, id: u64) -> usize {
        let core = self.nodes[(id - 1) as usize].core.as_ref().unwrap();
        (0..GROUPS).filter(|&g| core.is_leader(g)).count()
    }

    /// Steps past the leader balancing of the first second until every group has a leader;
    /// returns a node that leads one.
    fn a_leader_after_balancing(&mut self) -> u64 {
        while self.clock < 1_100 || (1..=NODES).map(|id| self.leads(id)).sum::<usize>() < GROUPS as usize {
            assert!(self.clock < 10_000, "no leaders");
            self.step();
        }
        (1..=NODES).find(|&id| self.leads(id) > 0).unwrap()
    }

    /// Steps until node `id` leads no group, failing after `within` ms with `why`.
    fn until_it_leads_none(&mut self, id: u64, within: u64, why: &str) {
        let since = self.clock;
        while self.leads(id) > 0 {
            assert!(
                self.clock < since + within,
                "node {id} still leads {} group(s) {why}",
                self.leads(id)
            );
            self.step();
        }
    }

    /// Steps until every group acknowledged a write, failing at `deadline` with `why`.
    fn until_every_group_serves(&mut self, deadline: u64, why: &str) {
        let acked_before = self.acked.len();
        let mut served = BTreeSet::new();
        while served.len() < GROUPS as usize {
            assert!(self.clock < deadline, "only groups {served:?} served {why}");
            self.step();
            served.extend(self.acked[acked_before..].iter().map(|p| p.group));
        }
    }

    /// Stops the load, lets every node catch up, and checks: all replicas applied the same
    /// index and hold the same state, every acknowledged write is there, no snapshot is held
    /// open, idle groups quiesced, the history is linearizable.
    fn settle_and_check(&mut self) {
        // Stop the load and let every node catch up, then compare.
        self.load = false;
        let settle = self.clock + std::env::var("SETTLE").map_or(2_000, |s| s.parse().unwrap());
        while self.clock < settle {
            self.step();
        }
        for group in 0..GROUPS {
            let members = self.members(group);
            let progress: Vec<_> = self
                .nodes
                .iter()
                .filter(|n| members.contains(&n.id))
                .map(|n| n.core.as_ref().unwrap().progress(group).unwrap())
                .collect();
            let applied: BTreeSet<u64> = progress.iter().map(|p| p.2).collect();
            if applied.len() != 1 {
                for n in &self.nodes {
                    eprintln!("node {}: {}", n.id, n.core.as_ref().unwrap().debug_state(group));
                }
                self.fail(format!(
                    "group {group}: nodes applied different indexes {progress:?}"
                ));
            }
        }
        // No snapshot is held open once nobody needs one (an open snapshot makes the state
        // machine keep what changes).
        for node in &self.nodes {
            let open = node.core.as_ref().unwrap().open_snapshots();
            if open > 0 {
                self.fail(format!(
                    "node {} holds {open} snapshot(s) after 2 s idle",
                    node.id
                ));
            }
        }
        // Idle groups quiesced on every member (and the checks above held with groups falling
        // asleep and waking throughout the fault phase).
        for group in 0..GROUPS {
            let members = self.members(group);
            for node in self.nodes.iter().filter(|n| members.contains(&n.id)) {
                if !node.core.as_ref().unwrap().is_asleep(group) {
                    for n in &self.nodes {
                        eprintln!("node {}: {}", n.id, n.core.as_ref().unwrap().debug_state(group));
                    }
                    self.fail(format!(
                        "group {group} is not quiesced on node {} after 2 s idle",
                        node.id
                    ));
                }
            }
        }
        self.check_linearizable();
        let acked: Vec<Pending> = self
            .acked
            .iter()
            .filter(|w| !w.key.windows(3).any(|x| x == b"hot"))
            .cloned()
            .collect();
        let members: Vec<BTreeSet<u64>> = (0..GROUPS).map(|g| self.members(g)).collect();
        for node in &mut self.nodes {
            let core = node.core.as_mut().unwrap();
            for write in acked
                .iter()
                .filter(|w| members[w.group as usize].contains(&node.id))
            {
                let value = now(core.machine(write.group).unwrap().read(&write.key)).expect("read");
                if value.as_ref() != Some(&write.value) {
                    let key = String::from_utf8_lossy(&write.key).into_owned();
                    let message = format!("node {}: acknowledged write {key} is {value:?}", node.id);
                    panic!("simulation seed {}: {message}", self.seed);
                }
            }
        }
        // All nodes hold the same state (every key ever written, acknowledged or not).
        for group in 0..GROUPS {
            for n in 1..=self.writes {
                let key = format!("g{group}-w{n}").into_bytes();
                let values: BTreeSet<Option<Vec<u8>>> = self
                    .nodes
                    .iter_mut()
                    .filter(|node| members[group as usize].contains(&node.id))
                    .map(|node| now(node.core.as_mut().unwrap().machine(group).unwrap().read(&key)).unwrap())
                    .collect();
                if values.len() != 1 {
                    self.fail(format!(
                        "group {group}: replicas disagree on key g{group}-w{n}: {values:?}"
                    ));
                }
            }
        }
    }

    /// Runs the seed; returns what happened in it (for the checks over many seeds).
    fn run(mut self) -> RunTotals {
        while self.clock < FAULT_PHASE_MS {
            self.step();
        }
        // Faults stop: heal, restart everyone, no more loss.
        self.faults = false;
        self.blocked.clear();
        self.drop_percent = 0;
        for node in &mut self.nodes {
            if node.core.is_none() {
                node.restart_at = Some(0);
            }
        }
        let deadline = self.clock + LIVENESS_MS;
        let acked_before = self.acked.len();
        let mut served = BTreeSet::new();
        while self.clock < deadline && served.len() < GROUPS as usize {
            self.step();
            for pending in &self.acked[acked_before..] {
                served.insert(pending.group);
            }
        }
        if served.len() < GROUPS as usize {
            self.fail(format!(
                "after faults stopped, only groups {served:?} served a write within {LIVENESS_MS} ms"
            ));
        }
        self.settle_and_check();
        let members: Vec<BTreeSet<u64>> = (0..GROUPS).map(|g| self.members(g)).collect();
        let installed = self
            .nodes
            .iter()
            .map(|n| n.core.as_ref().unwrap().stats().snapshots_installed)
            .sum();
        self.lease_reads_total = self
            .nodes
            .iter()
            .map(|n| n.core.as_ref().unwrap().stats().lease_reads)
            .sum();
        if std::env::var_os("RINGRAFT_SIM_DEBUG").is_some() {
            eprintln!(
                "seed {}: {} membership changes proposed, members at the end {members:?}",
                self.seed, self.membership_changes
            );
        }
        let initial: BTreeSet<u64> = (1..=INITIAL_VOTERS).collect();
        let changed = members.iter().filter(|m| **m != initial).count();
        let prepare_failures = self.nodes.iter().map(|n| n.prepare_failures).sum();
        RunTotals {
            acked: self.acked.len(),
            installed,
            changed,
            lease_reads: self.lease_reads_total,
            prepare_failures,
            abandoned: self.total(|s| s.checkpoints_abandoned),
            log_reads: self.total(|s| s.log_reads),
            apply_stalls: self.total(|s| s.apply_stalls),
            restore_stalls: self.total(|s| s.restore_stalls),
            value_reads: self.total(|s| s.value_reads),
            campaigns_stopped: self.total(|s| s.campaigns_stopped),
        }
    }

    /// A shard counter summed over every node, its earlier incarnations included.
    fn total(&self, counter: impl Fn(&ShardStats) -> u64) -> u64 {
        let live = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .map(|c| c.stats());
        let earlier = self.nodes.iter().flat_map(|n| n.earlier.iter().copied());
        live.chain(earlier).map(|s| counter(&s)).sum()
    }
}

/// What one seed's run did: writes acknowledged, snapshots installed, groups whose membership
/// ended other than it began, lease reads, failed segment preparations, abandoned checkpoints,
/// log reads for lagging followers, applies, chunks and installs refused for disk space, reads
/// of values on disk run beside the loop, and groups where a removed node stopped campaigning.
#[derive(Default)]
struct RunTotals {
    acked: usize,
    installed: u64,
    changed: usize,
    lease_reads: u64,
    prepare_failures: u64,
    abandoned: u64,
    log_reads: u64,
    apply_stalls: u64,
    restore_stalls: u64,
    value_reads: u64,
    campaigns_stopped: u64,
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("RINGRAFT_SIM_SEED") {
        return vec![seed.parse().expect("RINGRAFT_SIM_SEED is a number")];
    }
    let count = std::env::var("RINGRAFT_SIM_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    (0..count).collect()
}

#[test]
fn cluster_is_safe_under_crashes_partitions_and_loss_and_recovers() {
    // Some seeds crash nodes so often that little is acknowledged during the fault phase (the
    // liveness phase after it must still serve every group); over many seeds the checks must
    // have had real work to judge.
    let seeds = seeds();
    let runs: Vec<RunTotals> = seeds.iter().map(|&seed| Sim::new(seed).run()).collect();
    let total = |counter: fn(&RunTotals) -> u64| runs.iter().map(counter).sum::<u64>();
    let (acked, installed, changed) = (
        total(|r| r.acked as u64),
        total(|r| r.installed),
        total(|r| r.changed as u64),
    );
    let (lease_reads, prepare_failures, abandoned) = (
        total(|r| r.lease_reads),
        total(|r| r.prepare_failures),
        total(|r| r.abandoned),
    );
    let (apply_stalls, restore_stalls) = (total(|r| r.apply_stalls), total(|r| r.restore_stalls));
    let (value_reads, log_reads) = (total(|r| r.value_reads), total(|r| r.log_reads));
    let campaigns_stopped = total(|r| r.campaigns_stopped);
    // Each at least `per_seed` times the number of seeds (over enough seeds to mean anything).
    let at_least = |got: u64, per_seed: f64, what: &str| {
        assert!(
            seeds.len() < 20 || got as f64 >= per_seed * seeds.len() as f64,
            "only {got} {what} over {} seeds",
            seeds.len()
        );
    };
    at_least(acked, 20.0, "writes acknowledged: too few to mean anything");
    // Followers that were down or cut off fall behind the compacted log: snapshots must have
    // been streamed and installed under faults (and the checks above held across them).
    at_least(installed, 0.25, "snapshots installed");
    // Membership changes (with crashes in the middle) must have taken effect, and the checks
    // above held for the final members.
    at_least(changed, 0.5, "groups changed membership");
    // Lease reads were served under the lease (not only through the ReadIndex fallback), and
    // the history including them is linearizable.
    at_least(lease_reads, 1.0, "lease reads served under a lease");
    // Full disks failed segment preparations, which the WAL retried, and state machine
    // checkpoints, which were abandoned and done again later, while the checks held.
    at_least(
        prepare_failures,
        0.25,
        "segment preparations failed on a full disk",
    );
    at_least(abandoned, 0.25, "checkpoints abandoned on a full disk");
    // Full state machine disks refused applies of values stored in files (offered again
    // later) and snapshot chunks or installs (resent later), while the checks held.
    at_least(apply_stalls, 0.25, "applies refused on a full disk");
    at_least(restore_stalls, 0.05, "snapshot pieces refused on a full disk");
    // Reads of values in data files ran beside the loops, answering milliseconds later while
    // applies went on, and the history including them is linearizable.
    at_least(value_reads, 0.5, "reads of values on disk");
    // Followers caught up from the log too, through reads that finished loops later (the log
    // changing meanwhile).
    at_least(log_reads, 1.0, "log reads for lagging followers");
    // Voters removed while crashed or cut off were told so by the members and stopped
    // campaigning, and the liveness checks held (re-added ones woke and caught up).
    at_least(campaigns_stopped, 0.1, "campaigns of removed nodes stopped");
    eprintln!(
        "{acked} writes acknowledged, {installed} snapshots installed, {changed} groups changed membership, \
         {lease_reads} reads served under a lease, {prepare_failures} segment preparations failed, \
         {abandoned} checkpoints abandoned, {log_reads} log reads, {apply_stalls} applies and \
         {restore_stalls} snapshot pieces refused for space, {value_reads} values read beside the loop, \
         {campaigns_stopped} campaigns of removed nodes stopped"
    );
}

/// A follower cut off for a while catches up from the leader's log (its cache long since past
/// those entries): the reads run beside the leaders' loops, at most `log_reads_in_flight` at a
/// time per shard, finish steps later while the log moves on, and the follower ends up with
/// the same state without a snapshot.
#[test]
fn a_follower_behind_the_cache_catches_up_through_bounded_log_reads() {
    let mut most_out_any = 0;
    for seed in 0..6 {
        let mut sim = Sim::calm(300 + seed);
        // Nothing compacted that node 3 will need.
        sim.retain = 1_000_000;
        while sim.clock < 1_100 {
            sim.step();
        }
        // Node 3 hears nothing for 1.5 s under load, then rejoins.
        sim.isolate(3);
        let heal = sim.clock + 1_500;
        let deadline = heal + 5_000;
        let limit = shard_config(1).log_reads_in_flight;
        let mut most_out = 0;
        loop {
            if sim.clock == heal {
                sim.blocked.clear();
            }
            sim.step();
            for node in &sim.nodes {
                let out = node.core.as_ref().unwrap().fetches_out();
                assert!(out <= limit, "seed {seed}: {out} log reads out, limit {limit}");
                assert_eq!(out, node.fetches.len(), "seed {seed}: reads out are the runner's");
                most_out = most_out.max(out);
            }
            if sim.clock > heal && sim.caught_up(2) {
                break;
            }
            assert!(sim.clock < deadline, "seed {seed}: node 3 did not catch up");
        }
        let stats = |i: usize| sim.nodes[i].core.as_ref().unwrap().stats();
        let reads = stats(0).log_reads + stats(1).log_reads;
        assert!(reads > 0, "seed {seed}: caught up without log reads");
        assert_eq!(
            stats(2).snapshots_installed,
            0,
            "seed {seed}: caught up by snapshot"
        );
        most_out_any = most_out_any.max(most_out);
        sim.settle_and_check();
    }
    // Reads waited for a slot at times (the limit was reached, not just respected).
    assert_eq!(most_out_any, shard_config(1).log_reads_in_flight);
}

/// A snapshot that streams slowly (each chunk takes longer than the leader takes to compact
/// its log again) still brings its follower up to date: the leader keeps the log after the
/// snapshot while it streams. (It used to compact past it, abandon the stream as useless, take
/// a new snapshot, and so on forever.)
#[test]
fn a_slow_snapshot_stream_keeps_the_log_it_needs_and_the_follower_catches_up() {
    for seed in 0..4 {
        // (Without the WAL's segment bound, which compacts whatever pins the oldest segments,
        // streams included: the checkpoints' compaction is what is tested.)
        let mut sim = Sim::calm(400 + seed);
        while sim.clock < 1_100 {
            sim.step();
        }
        sim.isolate(3);
        let heal = sim.clock + 1_500;
        while sim.clock < heal {
            sim.step();
        }
        sim.blocked.clear();
        // A snapshot of several chunks takes longer than the checkpoint interval (700 ms, which
        // compacts to 5 entries behind), while each chunk comes within the follower's patience
        // (it drops a staged snapshot after 4 election timeouts without a chunk, 800 ms here).
        sim.chunk_delay = 150;
        let deadline = heal + 20_000;
        loop {
            sim.step();
            if sim.caught_up(2) {
                break;
            }
            if sim.clock >= deadline {
                for group in 0..GROUPS {
                    for n in &sim.nodes {
                        eprintln!(
                            "group {group} node {}: {}",
                            n.id,
                            n.core.as_ref().unwrap().debug_state(group)
                        );
                    }
                }
            }
            assert!(sim.clock < deadline, "seed {seed}: node 3 did not catch up");
        }
        let installed = sim.nodes[2].core.as_ref().unwrap().stats().snapshots_installed;
        assert!(installed > 0, "seed {seed}: caught up without a snapshot");
        sim.chunk_delay = 0;
        sim.settle_and_check();
    }
}

/// Snapshot chunks the transport cannot take (its queue to the follower full) are sent again
/// after a short pause, not after the stream's resend timer (an election timeout each, while
/// the follower only sees a gap); so are the follower's acknowledgements.
#[test]
fn snapshot_chunks_the_transport_refused_go_again_within_ticks() {
    for (seed, unsent, unsent_acks) in [(30, 0, 0), (30, 3, 0), (31, 0, 2), (31, 4, 3), (32, 4, 1)] {
        let mut sim = Sim::calm(seed);
        sim.a_leader_after_balancing();
        // No piece lost or overtaken on the way: only the refused ones could need a resend.
        sim.drop_percent = 0;
        sim.fifo = true;
        // The leaders' logs are compacted by now: node 4, added to group 0, needs a snapshot.
        let newcomer = NODES;
        let group = 0;
        let leader = sim.leader_of(group);
        sim.unsent_chunks = unsent;
        sim.unsent_acks = unsent_acks;
        let resends = |sim: &Sim| sim.total(|s| s.snapshot_resends);
        let before = resends(&sim);
        let request = sim.next_request;
        sim.next_request += 1;
        let change = conf_change(ConfChangeType::AddLearnerNode, newcomer);
        sim.nodes[(leader - 1) as usize]
            .core
            .as_mut()
            .unwrap()
            .change_membership(group, request, change);
        let added = sim.clock;
        let applied = |sim: &Sim, id: u64| sim.core(id).progress(group).unwrap().2;
        while !(sim.members(group).contains(&newcomer) && applied(&sim, newcomer) >= applied(&sim, leader)) {
            sim.step();
            assert!(
                sim.clock < added + 5_000,
                "seed {seed}: node {newcomer} did not catch up"
            );
        }
        let installed = sim.core(newcomer).stats().snapshots_installed;
        assert!(installed > 0, "seed {seed}: caught up without a snapshot");
        assert_eq!(
            sim.unsent_chunks, 0,
            "seed {seed}: fewer chunks sent than refused"
        );
        assert_eq!(
            sim.unsent_acks, 0,
            "seed {seed}: fewer acknowledgements sent than refused"
        );
        assert_eq!(
            sim.total(|s| s.snapshot_pieces_unsent),
            unsent + unsent_acks,
            "seed {seed}"
        );
        // No stream waited out its resend timer: a refused chunk went again within ticks
        // (four in a row pause 1 + 2 + 4 + 8 ticks, within the timer's 20; refused for
        // longer, the timer still counts its rounds, so a stream to a peer that is gone is
        // abandoned as before).
        assert_eq!(
            resends(&sim),
            before,
            "seed {seed}: {unsent} chunks, {unsent_acks} acks refused"
        );
        sim.settle_and_check();
    }
}

/// A leader whose disk fills up cannot persist once its WAL needs a new segment. It hands its
/// groups to followers as soon as preparing that segment fails, the others serve on, and once
/// space is back it catches up.
#[test]
fn a_leader_out_of_disk_space_hands_its_groups_over_and_catches_up_later() {
    let mut sim = Sim::new(5);
    sim.faults = false;
    let full = sim.a_leader_after_balancing();
    let i = (full - 1) as usize;
    sim.nodes[i].disk_full_until = u64::MAX;
    let failing = |sim: &Sim| {
        let core = sim.nodes[i].core.as_ref().unwrap();
        let failing = core.wal().borrow().prepare_error().is_some();
        failing
    };
    while !failing(&sim) {
        assert!(sim.clock < 60_000, "node {full}'s WAL never needed a new segment");
        sim.step();
    }
    sim.until_it_leads_none(full, 3_000, "with its disk full");
    // Every group serves writes without it, well after its WAL stalled.
    let handed_over = sim.clock;
    while sim.clock < handed_over + 2_000 {
        sim.step();
    }
    sim.until_every_group_serves(handed_over + 6_000, &format!("with node {full} out of space"));
    assert!(failing(&sim), "the disk is still full");
    assert!(sim.nodes[i].prepare_failures > 1, "the preparation was retried");
    // Space comes back: the node's WAL goes on and it catches up with the others.
    sim.nodes[i].disk_full_until = 0;
    sim.load = false;
    let freed = sim.clock;
    loop {
        sim.step();
        let caught_up = (0..GROUPS).all(|g| {
            let applied: BTreeSet<u64> = sim
                .nodes
                .iter()
                .filter(|n| sim.members(g).contains(&n.id))
                .map(|n| n.core.as_ref().unwrap().progress(g).unwrap().2)
                .collect();
            applied.len() == 1
        });
        if !failing(&sim) && caught_up {
            break;
        }
        assert!(
            sim.clock < freed + 5_000,
            "node {full} did not catch up once space was back"
        );
    }
}

/// A node whose state machine disk fills up while its WAL has space cannot apply values stored
/// in files: the entry waits (refused whole, offered again each tick) while the groups' logs go
/// on; as a leader the node hands its groups to followers after about an election timeout, and
/// the others serve writes. What it holds unapplied stays within its WAL cache budget (it
/// takes no more entries beyond it). Once space is back it applies everything and agrees with
/// them.
#[test]
fn a_node_whose_state_machine_disk_is_full_waits_to_apply_hands_over_and_catches_up() {
    let mut sim = Sim::calm(11);
    let full = sim.a_leader_after_balancing();
    let i = (full - 1) as usize;
    sim.nodes[i].sm_disks_full = true;
    let stalls = |sim: &Sim| sim.nodes[i].core.as_ref().unwrap().stats().apply_stalls;
    let start = sim.clock;
    while stalls(&sim) == 0 {
        assert!(
            sim.clock < start + 3_000,
            "node {full} never ran out of space applying"
        );
        sim.step();
    }
    let since = sim.clock;
    sim.until_it_leads_none(full, 3_000, "unable to apply");
    // Every group serves writes without it.
    let why = format!("with node {full}'s state machines out of space");
    sim.until_every_group_serves(since + 8_000, &why);
    // The writes go on for a while: what the node holds unapplied (pinned in its WAL cache)
    // stays bounded, as it takes no more entries once its cache is over budget.
    let cached = |sim: &Sim| {
        sim.nodes[i]
            .core
            .as_ref()
            .unwrap()
            .wal()
            .borrow()
            .stats()
            .cache_bytes
    };
    let (mut most_cached, until) = (cached(&sim), sim.clock + 6_000);
    while sim.clock < until {
        sim.step();
        most_cached = most_cached.max(cached(&sim));
    }
    // The budget, and one append taken while under it.
    let bound = wal_config().cache_bytes_max + shard_config(1).max_size_per_msg as usize;
    assert!(most_cached <= bound, "{most_cached} bytes cached, over {bound}");
    let refused = stalls(&sim);
    assert!(refused > 1, "the apply was offered again ({refused})");
    assert!(
        !sim.caught_up(i),
        "node {full} cannot have applied what the others did"
    );
    assert!(sim.nodes[i].core.as_ref().unwrap().failure().is_none());
    // Space comes back: it applies what waited and agrees with the others.
    sim.nodes[i].sm_disks_full = false;
    sim.load = false;
    let freed = sim.clock;
    while !sim.caught_up(i) {
        assert!(
            sim.clock < freed + 5_000,
            "node {full} did not catch up once space was back"
        );
        sim.step();
    }
    sim.settle_and_check();
}

/// One membership change: `change_type` of `node`.
fn conf_change(change_type: ConfChangeType, node: u64) -> ConfChangeV2 {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(change_type);
    single.node_id = node;
    let mut change = ConfChangeV2::default();
    change.set_changes(vec![single].into());
    change
}

/// A voter removed from every group while it was cut off never applies its removal, so it would
/// campaign for ever (pre-vote keeps it from disrupting the members, not from trying). The
/// members tell it in their beats and it stops. Added back, it catches up and votes again.
#[test]
fn a_node_removed_while_cut_off_stops_campaigning_and_can_be_added_back() {
    let mut sim = Sim::calm(21);
    sim.a_leader_after_balancing();
    let away = (1..=INITIAL_VOTERS).find(|&id| sim.leads(id) == 0).unwrap();
    let i = (away - 1) as usize;
    sim.isolate(away);
    // Asks each group's leader for `change_type` of `away` until every group's membership
    // `holds`.
    let change_all = |sim: &mut Sim, change_type, holds: &dyn Fn(&ConfState) -> bool| {
        let since = sim.clock;
        let applied_everywhere = |sim: &Sim| {
            (0..GROUPS).all(|group| {
                // The other initial voters (node 4 is in no group).
                sim.nodes
                    .iter()
                    .filter(|n| n.id != away && n.id <= INITIAL_VOTERS)
                    .all(|n| {
                        let conf = n.core.as_ref().unwrap().membership(group).unwrap();
                        holds(&conf)
                    })
            })
        };
        while !applied_everywhere(sim) {
            assert!(
                sim.clock < since + 5_000,
                "membership change {change_type:?} of node {away} not applied"
            );
            if sim.clock % 200 == 0 {
                for group in 0..GROUPS {
                    let leader = sim
                        .nodes
                        .iter_mut()
                        .filter_map(|n| n.core.as_mut())
                        .find(|c| c.is_leader(group));
                    if let Some(core) = leader {
                        if !holds(&core.membership(group).unwrap()) {
                            let request = sim.next_request;
                            sim.next_request += 1;
                            core.change_membership(group, request, conf_change(change_type, away));
                        }
                    }
                }
            }
            sim.step();
        }
    };
    let removed = |conf: &ConfState| !conf.voters.contains(&away) && !conf.learners.contains(&away);
    change_all(&mut sim, ConfChangeType::RemoveNode, &removed);
    // It still thinks it is a voter, and campaigns once it can reach the others.
    let campaigns = |sim: &Sim| sim.vote_requests.get(&away).copied().unwrap_or(0);
    let stopped_in = |sim: &Sim| sim.core(away).stats().campaigns_stopped;
    assert_eq!(stopped_in(&sim), 0);
    let before = campaigns(&sim);
    sim.load = false;
    sim.blocked.clear();
    let healed = sim.clock;
    while sim.clock < healed + 2_000 {
        sim.step();
    }
    assert!(
        campaigns(&sim) > before,
        "node {away} did not campaign after its removal"
    );
    assert_eq!(
        stopped_in(&sim),
        GROUPS,
        "node {away} did not stop campaigning in every group"
    );
    let stopped = campaigns(&sim);
    while sim.clock < healed + 6_000 {
        sim.step();
    }
    assert_eq!(campaigns(&sim), stopped, "node {away} campaigned again");
    for group in 0..GROUPS {
        assert!(sim.core(away).is_asleep(group));
    }
    // Added back (a learner, then a voter): the leader's messages wake it and it catches up.
    sim.load = true;
    change_all(&mut sim, ConfChangeType::AddLearnerNode, &|c: &ConfState| {
        c.learners.contains(&away)
    });
    change_all(&mut sim, ConfChangeType::AddNode, &|c: &ConfState| {
        c.voters.contains(&away)
    });
    let why = format!("with node {away} back as a voter");
    sim.until_every_group_serves(sim.clock + 5_000, &why);
    sim.settle_and_check();
    assert!(sim.caught_up(i), "node {away} did not catch up");
}

/// A node that is no member of a group (node 4 starts in none) has nothing to tick there and
/// sleeps, under load too; added as a learner, the leader's messages wake it and it catches up.
#[test]
fn a_node_outside_a_group_sleeps_and_catches_up_once_added() {
    let mut sim = Sim::calm(8);
    sim.a_leader_after_balancing();
    let outsider = NODES;
    let start = sim.clock;
    while sim.clock < start + 1_000 {
        sim.step();
    }
    for group in 0..GROUPS {
        assert!(
            sim.core(outsider).is_asleep(group),
            "node {outsider} ticks group {group}, of which it is no member"
        );
    }
    let group = 0;
    // A local read there would be served from no copy of the group: it is redirected instead,
    // without waking the group.
    let request = sim.next_request;
    sim.next_request += 1;
    let core = sim.nodes[(outsider - 1) as usize].core.as_mut().unwrap();
    core.read(group, request, b"k".to_vec(), Consistency::Local);
    let (_, answers) = core.take_output();
    assert!(
        matches!(
            answers[..],
            [Answer {
                request: r,
                result: Err(EngineError::NotLeader { .. }),
            }] if r == request
        ),
        "{answers:?}"
    );
    assert!(sim.core(outsider).is_asleep(group));
    let leader = sim.leader_of(group);
    let change = conf_change(ConfChangeType::AddLearnerNode, outsider);
    let request = sim.next_request;
    sim.next_request += 1;
    let core = sim.nodes[(leader - 1) as usize].core.as_mut().unwrap();
    core.change_membership(group, request, change);
    let applied = |sim: &Sim, id: u64| sim.core(id).progress(group).unwrap().2;
    let added = sim.clock;
    loop {
        sim.step();
        let joined = sim.members(group).contains(&outsider);
        if joined && applied(&sim, outsider) >= applied(&sim, leader) && !sim.core(outsider).is_asleep(group)
        {
            break;
        }
        assert!(
            sim.clock < added + 5_000,
            "node {outsider} did not catch up in group {group} once added"
        );
    }
    sim.settle_and_check();
}

/// A node removed from the address book while a member of a group is leaving: it stays while
/// the group needs it, no other group takes it, and it goes once it is a member of none.
#[test]
fn a_removed_member_leaves_the_address_book_once_it_is_in_no_group() {
    let mut sim = Sim::calm(12);
    sim.a_leader_after_balancing();
    let outsider = NODES;
    let others: Vec<u64> = (1..=INITIAL_VOTERS).collect();
    // Asks `group`'s leader for `change`; returns the leader's immediate answers (its messages
    // go out as usual).
    let ask = |sim: &mut Sim, group: u64, change: ConfChangeV2| -> Vec<Answer> {
        let leader = sim.leader_of(group);
        let request = sim.next_request;
        sim.next_request += 1;
        let core = sim.nodes[(leader - 1) as usize].core.as_mut().unwrap();
        core.change_membership(group, request, change);
        let (messages, answers) = core.take_output();
        sim.send(leader, messages.into_iter().map(Packet::Raft).collect());
        answers
    };
    let applied_by_all = |sim: &Sim, group: u64, member: bool| {
        others.iter().all(|&id| {
            let conf = sim.core(id).membership(group).unwrap();
            conf.learners.contains(&outsider) == member
        })
    };
    // Node 4 joins group 0 as a learner.
    let since = sim.clock;
    while !applied_by_all(&sim, 0, true) {
        if sim.clock % 500 == since % 500 {
            ask(&mut sim, 0, conf_change(ConfChangeType::AddLearnerNode, outsider));
        }
        sim.step();
        assert!(sim.clock < since + 5_000, "node {outsider} did not join group 0");
    }
    // The others drop it from their address books: it is held by group 0 (node 9 they never
    // knew, and themselves, they skip).
    for &id in &others {
        let core = sim.nodes[(id - 1) as usize].core.as_mut().unwrap();
        let (free, held) = core.removal_split(&[outsider, 9, id]);
        assert_eq!((free, held.clone()), (vec![], vec![(outsider, vec![0])]));
        core.mark_leaving([outsider]);
        // Listed again (a later SIGHUP), it stays; then the removal comes back.
        core.add_peers([outsider]);
        assert!(core.leaving().is_empty());
        core.mark_leaving([outsider]);
    }
    // No group takes it meanwhile.
    let refused = ask(&mut sim, 1, conf_change(ConfChangeType::AddLearnerNode, outsider));
    assert!(
        matches!(&refused[..], [Answer { result: Err(EngineError::BadRequest(why)), .. }] if why.contains("leaving")),
        "{refused:?}"
    );
    // While group 0 holds it, it stays.
    let held_since = sim.clock;
    while sim.clock < held_since + 500 {
        sim.step();
        for &id in &others {
            let core = sim.nodes[(id - 1) as usize].core.as_mut().unwrap();
            assert_eq!(core.take_departed(), Vec::<u64>::new());
            assert!(core.leaving().contains(&outsider));
        }
    }
    // Removed from group 0, it goes on every node that applied that.
    let since = sim.clock;
    let mut departed: BTreeSet<u64> = BTreeSet::new();
    while departed.len() < others.len() {
        if sim.clock % 500 == since % 500 && !applied_by_all(&sim, 0, false) {
            ask(&mut sim, 0, conf_change(ConfChangeType::RemoveNode, outsider));
        }
        sim.step();
        for &id in &others {
            let in_group = sim.core(id).membership(0).unwrap().learners.contains(&outsider);
            let core = sim.nodes[(id - 1) as usize].core.as_mut().unwrap();
            let gone = core.take_departed();
            if !gone.is_empty() {
                assert!(
                    !in_group,
                    "node {id} let node {outsider} go while it was in group 0"
                );
                assert_eq!(gone, [outsider]);
                core.remove_peers(&gone);
                departed.insert(id);
            }
        }
        assert!(
            sim.clock < since + 5_000,
            "node {outsider} did not leave: {departed:?}"
        );
    }
    for &id in &others {
        assert!(sim.core(id).leaving().is_empty());
    }
}

/// A learner is promoted to voter only once it keeps up: cut off, its promotion is answered
/// `Busy` (a voter that lags would count toward the quorum without helping to make one);
/// reachable and caught up, it is promoted.
#[test]
fn a_learner_that_lags_is_not_promoted_until_it_caught_up() {
    let mut sim = Sim::calm(14);
    sim.a_leader_after_balancing();
    let learner = NODES;
    let group = 0;
    // Asks the group's leader for `change`; its immediate answers (its messages go out).
    let ask = |sim: &mut Sim, change_type| -> Vec<Answer> {
        let leader = sim.leader_of(group);
        let request = sim.next_request;
        sim.next_request += 1;
        let core = sim.nodes[(leader - 1) as usize].core.as_mut().unwrap();
        core.change_membership(group, request, conf_change(change_type, learner));
        let (messages, answers) = core.take_output();
        sim.send(leader, messages.into_iter().map(Packet::Raft).collect());
        answers
    };
    let conf = |sim: &Sim| sim.core(sim.leader_of(group)).membership(group).unwrap();
    // Node 4 joins as a learner while cut off: it cannot catch up.
    sim.isolate(learner);
    let since = sim.clock;
    while !conf(&sim).learners.contains(&learner) {
        if sim.clock % 500 == since % 500 {
            ask(&mut sim, ConfChangeType::AddLearnerNode);
        }
        sim.step();
        assert!(
            sim.clock < since + 5_000,
            "node {learner} was not added as a learner"
        );
    }
    let cut_off = sim.clock;
    while sim.clock < cut_off + 1_000 {
        sim.step();
    }
    let refused = ask(&mut sim, ConfChangeType::AddNode);
    assert!(
        matches!(&refused[..], [Answer { result: Err(EngineError::Busy(why)), .. }] if why.contains("not caught up")),
        "{refused:?}"
    );
    // Reachable again, it catches up and is promoted.
    sim.blocked.clear();
    let healed = sim.clock;
    while !conf(&sim).voters.contains(&learner) {
        if sim.clock % 200 == healed % 200 {
            ask(&mut sim, ConfChangeType::AddNode);
        }
        sim.step();
        assert!(sim.clock < healed + 10_000, "node {learner} was never promoted");
    }
    let leader = sim.leader_of(group);
    let applied = |id: u64| sim.core(id).progress(group).unwrap().2;
    assert!(
        applied(learner) + 50 >= applied(leader),
        "promoted while {} entries behind",
        applied(leader) - applied(learner)
    );
    sim.settle_and_check();
}

/// A quiesced follower answers the requests it cannot serve (writes, linearizable and lease
/// reads) with `NotLeader` naming the leader, and stays asleep: a client with stale routing
/// must not keep idle groups, and their leaders, ticking.
#[test]
fn a_quiesced_follower_redirects_requests_without_waking() {
    let mut sim = Sim::calm(3);
    sim.a_leader_after_balancing();
    sim.load = false;
    let idle = sim.clock;
    while sim.clock < idle + 3_000 {
        sim.step();
    }
    let group = 0;
    let members = sim.members(group);
    let asleep = |sim: &Sim| members.iter().all(|&id| sim.core(id).is_asleep(group));
    assert!(asleep(&sim), "group {group} did not quiesce");
    let leader = sim.leader_of(group);
    let follower = members.iter().copied().find(|&id| id != leader).unwrap();
    let core = sim.nodes[(follower - 1) as usize].core.as_mut().unwrap();
    let request = sim.next_request;
    sim.next_request += 3;
    let put = Command::Put {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    };
    core.submit(group, request, vec![put]);
    core.read(group, request + 1, b"k".to_vec(), Consistency::Linearizable);
    core.read(group, request + 2, b"k".to_vec(), Consistency::Lease);
    let (_, answers) = core.take_output();
    assert_eq!(answers.len(), 3);
    for answer in answers {
        assert!(
            matches!(answer.result, Err(EngineError::NotLeader { leader: Some(l) }) if l == leader),
            "{:?}",
            answer.result
        );
    }
    let asked = sim.clock;
    while sim.clock < asked + 1_000 {
        sim.step();
        assert!(asleep(&sim), "a request to a follower woke group {group}");
    }
}

/// A leader cut off from its group keeps proposing; a new leader's entries then replace the
/// tail of its log. Proposals whose index the cut-back log no longer reaches are answered
/// (outcome unknown) without waiting for the group to write that far again: an idle group
/// never would, and it could never quiesce while they wait.
#[test]
fn a_deposed_leaders_proposals_cut_from_its_log_are_answered_without_more_writes() {
    let mut sim = Sim::new(11);
    sim.faults = false;
    sim.load = false;
    let leader_of =
        |sim: &Sim| (1..=NODES).find(|&id| sim.nodes[(id - 1) as usize].core.as_ref().unwrap().is_leader(0));
    while leader_of(&sim).is_none() {
        assert!(sim.clock < 5_000, "no leader elected");
        sim.step();
    }
    // Past the leader balancing of the first second (a transfer under way refuses proposals).
    while sim.clock < 1_100 || leader_of(&sim).is_none() {
        sim.step();
    }
    let old = leader_of(&sim).unwrap();
    let old_term = sim.nodes[(old - 1) as usize]
        .core
        .as_ref()
        .unwrap()
        .progress(0)
        .unwrap()
        .0;
    for other in (1..=NODES).filter(|&n| n != old) {
        sim.blocked.insert((old, other));
        sim.blocked.insert((other, old));
    }
    let requests: Vec<u64> = (0..5).map(|n| 1_000_000 + n).collect();
    for &request in &requests {
        let key = format!("cut-{request}").into_bytes();
        sim.pending.insert(
            request,
            Pending {
                group: 0,
                key: key.clone(),
                value: b"v".to_vec(),
                read: false,
            },
        );
        let core = sim.nodes[(old - 1) as usize].core.as_mut().unwrap();
        core.submit(
            0,
            request,
            vec![Command::Put {
                key,
                value: b"v".to_vec(),
            }],
        );
        sim.step();
    }
    assert!(
        requests.iter().all(|r| sim.pending.contains_key(r)),
        "proposed, not refused"
    );
    // The others elect a leader of a later term; then the partition heals, with no more load.
    let deadline = sim.clock + 5_000;
    while leader_of(&sim).is_none_or(|l| l == old) {
        assert!(sim.clock < deadline, "the cut-off majority elected no leader");
        sim.step();
    }
    let new = leader_of(&sim).unwrap();
    assert!(
        sim.nodes[(new - 1) as usize]
            .core
            .as_ref()
            .unwrap()
            .progress(0)
            .unwrap()
            .0
            > old_term
    );
    sim.blocked.clear();
    let deadline = sim.clock + 3_000;
    while requests.iter().any(|r| sim.pending.contains_key(r)) {
        assert!(
            sim.clock < deadline,
            "proposals of the deposed leader still unanswered: {:?}",
            requests
                .iter()
                .filter(|r| sim.pending.contains_key(r))
                .collect::<Vec<_>>()
        );
        sim.step();
    }
    assert!(
        requests
            .iter()
            .all(|r| !sim.acked.iter().any(|a| a.key == format!("cut-{r}").into_bytes())),
        "none of them was acknowledged"
    );
}

/// A stopping node hands its groups over ([`ShardCore::transfer_leadership`]) and stops once
/// that reports nothing left. It steps down as soon as the transferee's vote request arrives,
/// before the transferee has won; stopping then would leave the group without a leader for a
/// moment, and the stopping node's clients with no one to be sent to. So nothing is reported
/// left only once every group this node led has a new leader that it knows of.
#[test]
fn a_node_handing_over_reports_done_only_once_each_group_has_a_known_new_leader() {
    for seed in 0..20 {
        let mut sim = Sim::new(100 + seed);
        sim.faults = false;
        let led = |sim: &Sim, id: u64| -> Vec<u64> {
            let core = sim.nodes[(id - 1) as usize].core.as_ref().unwrap();
            core.groups().filter(|&g| core.is_leader(g)).collect()
        };
        // Past the leader balancing of the first second, with load running.
        while sim.clock < 1_100 || led(&sim, 1).is_empty() {
            assert!(sim.clock < 10_000, "seed {seed}: node 1 leads no group");
            sim.step();
        }
        let handed = led(&sim, 1);
        let deadline = sim.clock + 3_000;
        let mut stepped_down_before_done = false;
        loop {
            assert!(sim.clock < deadline, "seed {seed}: hand-over never finished");
            let core = sim.nodes[0].core.as_mut().unwrap();
            let pending = core.transfer_leadership();
            if handed
                .iter()
                .any(|&g| !core.is_leader(g) && core.leader(g).is_none())
            {
                stepped_down_before_done = true;
                assert!(pending > 0, "seed {seed}: done while a group has no known leader");
            }
            if pending == 0 {
                break;
            }
            sim.step();
        }
        for &group in &handed {
            let known = sim.nodes[0].core.as_ref().unwrap().leader(group);
            let leader = known.expect("the new leader is known");
            assert_ne!(leader, 1, "seed {seed}: group {group} still led by node 1");
            assert!(
                sim.nodes[(leader - 1) as usize]
                    .core
                    .as_ref()
                    .unwrap()
                    .is_leader(group),
                "seed {seed}: node {leader}, named for group {group}, does not lead it"
            );
        }
        if stepped_down_before_done {
            return;
        }
    }
    panic!("in no seed did node 1 step down before a new leader was known: the test tests nothing");
}
