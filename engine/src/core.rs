//! The raft-driving logic of one shard, free of IO: it takes events (client submissions,
//! messages, ticks, "WAL durable up to ticket t") and produces outputs (messages to send, answers
//! to clients). WAL writes go into the shard's [`Wal`] as buffered appends; a runner performs the
//! WAL's IO jobs and calls [`ShardCore::on_durable`]. State machines are applied through their
//! own seam ([`StateMachine`]). The glommio runner and the deterministic simulator drive this
//! same code.
//!
//! One loop of a runner:
//! 1. `step` each inbound message, `tick` when due, `submit`/`read` client requests;
//! 2. [`ShardCore::propose`]: every group with queued commands gets one entry (one rkyv batch);
//! 3. [`ShardCore::collect_ready`]: every group's `Ready`; the leader's messages are output at
//!    once (before its own write is durable, raft thesis 10.2.1); entries and hard states of all
//!    groups go into the one open WAL batch (group commit);
//! 4. perform WAL IO; when a batch is durable, [`ShardCore::on_durable`] calls `on_persist_ready`
//!    for every group it covered and outputs the followers' persisted messages;
//! 5. [`ShardCore::apply`]: committed entries (never beyond what is durable locally: raft-rs 0.7
//!    caps them at the persisted index) are applied and their proposers answered.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{GetEntriesContext, RawNode, SnapshotStatus, StateRole, Storage};
use ringraft_sm::{
    encode_batch, encode_batch_vec, BatchView, ChunkJob, ChunkStart, Command, CommandLimits, CommandResult,
    ReadJob, ReadStart, SmError, StateMachine,
};
use ringraft_wal::{Disk, ReadError, Ticket, Wal};

use crate::beat::{Beat, BEAT_GROUP};
use crate::meta::GroupMeta;
use crate::snapshot::{Incoming, Outgoing, PieceKind, Serving, SnapshotPiece, STREAM_RETRIES_MAX};
use crate::storage::{entry_type_code, FetchQueue, GroupStorage, SnapSlot};

/// Identifies a client request within a shard; chosen by the runner.
pub type RequestId = u64;

/// Why a request was not (or may not have been) carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("not the leader of this group (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("busy: {0}; retry later")]
    Busy(&'static str),
    /// The proposal's entry was replaced after a leader change, or the node lost track of it:
    /// it may or may not have been applied. Never a false ok.
    #[error("outcome unknown: the proposal may or may not have been applied")]
    UnknownOutcome,
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("unknown group {0}")]
    UnknownGroup(u64),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Did not complete in time (e.g. a leadership transfer).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The shard's WAL or a state machine failed; the shard must restart.
    #[error("shard failed: {0}")]
    Failed(String),
}

/// The answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub request: RequestId,
    pub result: Result<Vec<CommandResult>, EngineError>,
}

/// A raft message for a group.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    pub group: u64,
    pub message: Message,
}

/// Read consistency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Linearizable: served after a ReadIndex round confirms leadership and the state machine
    /// has applied up to the read index.
    Linearizable,
    /// Whatever this replica has applied (possibly stale); any replica serves it.
    Local,
    /// Linearizable while the leader's lease holds: served by the leader at its commit index
    /// without a round trip, if a quorum confirmed its leadership (a ReadIndex round) less than
    /// `raft.election_timeout_ms - raft.lease_margin_ms` ago (followers with check-quorum
    /// refuse to elect another leader for an election timeout after hearing from it). Otherwise
    /// it takes the ReadIndex path, which renews the lease. Safe while no node's clock runs
    /// faster than the leader's by more than the margin over one election timeout.
    Lease,
}

/// Limits and raft parameters of a shard (mapped from `ringraft_tuning::Config`).
#[derive(Clone, Debug)]
pub struct ShardConfig {
    pub node: u64,
    /// Every group's voters when it starts from nothing (`cluster.initial_voters`); later
    /// memberships are in the log, the WAL's metadata records and snapshots.
    pub voters: Vec<u64>,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// raft-rs draws each election timeout from `[min, max)` ticks with a thread-local random
    /// generator; `None` keeps its default `[election, 2 x election)`. The deterministic
    /// simulator sets a one-tick range per node so a seed replays exactly.
    pub election_ticks_range: Option<(usize, usize)>,
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
    pub max_uncommitted_bytes: u64,
    pub max_committed_size_per_ready: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub entry_bytes_max: usize,
    pub entry_commands_max: usize,
    pub group_queue_commands_max: usize,
    pub group_queue_bytes_max: usize,
    pub limits: CommandLimits,
    /// Unacknowledged snapshot chunks per stream (`limits.snapshot_chunks_in_flight`).
    pub snapshot_chunks_in_flight: u64,
    /// Log reads for lagging followers out at once (`limits.log_reads_in_flight`).
    pub log_reads_in_flight: usize,
    /// Reads of values on disk out at once (`limits.value_reads_in_flight`).
    pub value_reads_in_flight: usize,
    /// Ticks a leader's lease lasts after a quorum confirmed it (0: lease reads take the
    /// ReadIndex path). See [`Consistency::Lease`].
    pub lease_ticks: u64,
    /// Every other node of the cluster (beats go to each).
    pub peers: Vec<u64>,
    /// Idle ticks after which a leader quiesces a group (0: never). See `beat.rs`.
    pub quiesce_after_ticks: u64,
    /// How far behind the commit index a learner may be and still be promoted
    /// (`raft.promote_lag_max_entries`; see `change_membership`).
    pub promote_lag_max_entries: u64,
    /// Live WAL segments beyond which a checkpoint round compacts the groups holding the
    /// oldest ones through their checkpoints, whatever they retain (`wal.live_segments_max`).
    pub live_segments_max: usize,
}

impl ShardConfig {
    pub fn from_tuning(config: &ringraft_tuning::Config) -> ShardConfig {
        ShardConfig {
            node: config.node.id,
            voters: config.initial_voters(),
            election_ticks: config.raft.election_ticks() as usize,
            heartbeat_ticks: config.raft.heartbeat_ticks() as usize,
            election_ticks_range: None,
            max_size_per_msg: config.raft.max_size_per_msg_bytes,
            max_inflight_msgs: config.raft.max_inflight_msgs as usize,
            max_uncommitted_bytes: config.raft.max_uncommitted_bytes,
            max_committed_size_per_ready: config.raft.max_committed_size_per_ready_bytes,
            pre_vote: config.raft.pre_vote,
            check_quorum: config.raft.check_quorum,
            entry_bytes_max: config.batching.entry_bytes_max as usize,
            entry_commands_max: config.batching.entry_commands_max as usize,
            group_queue_commands_max: config.limits.group_queue_commands_max as usize,
            group_queue_bytes_max: config.limits.group_queue_bytes_max as usize,
            limits: CommandLimits {
                key_bytes_max: config.limits.key_bytes_max as usize,
                value_bytes_max: config.limits.value_bytes_max as usize,
            },
            snapshot_chunks_in_flight: config.limits.snapshot_chunks_in_flight,
            log_reads_in_flight: config.limits.log_reads_in_flight as usize,
            value_reads_in_flight: config.limits.value_reads_in_flight as usize,
            lease_ticks: config.raft.lease_ticks(),
            peers: config
                .cluster
                .nodes
                .iter()
                .map(|n| n.id)
                .filter(|&id| id != config.node.id)
                .collect(),
            quiesce_after_ticks: config.raft.quiesce_after_ms / config.raft.tick_interval_ms.max(1),
            promote_lag_max_entries: config.raft.promote_lag_max_entries,
            live_segments_max: config.wal.live_segments_max as usize,
        }
    }
}

/// The follower that has acknowledged the most of a leader's log (where leadership goes when
/// handed over); `None` without followers.
fn best_follower<T: Storage>(raft: &raft::Raft<T>) -> Option<u64> {
    raft.prs()
        .iter()
        .filter(|(id, _)| **id != raft.id && is_voter(raft, **id))
        .max_by_key(|(_, progress)| progress.matched)
        .map(|(id, _)| *id)
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids
}

/// Whether `id` votes in the group's current configuration (a learner cannot lead).
fn is_voter<T: Storage>(raft: &raft::Raft<T>, id: u64) -> bool {
    raft.prs().conf().voters().contains(id)
}

/// raft-rs's leader id, or `None` for its "no leader" sentinel.
fn known_leader(id: u64) -> Option<u64> {
    (id != raft::INVALID_ID).then_some(id)
}

/// A proposal in the log, waiting to be applied: which requests own which commands.
#[derive(Debug)]
struct Proposal {
    index: u64,
    term: u64,
    parts: Vec<(RequestId, usize)>,
    /// A membership change: answered with no results once applied.
    conf: bool,
    /// When it entered the log ([`ShardCore::set_time_us`]), for the commit latency.
    proposed_at_us: u64,
}

/// Entries to read from disk for raft (see [`ShardCore::take_fetches`]).
pub struct Fetch<D: Disk> {
    pub group: u64,
    /// `None` when the range was compacted or truncated meanwhile.
    pub plan: Option<ringraft_wal::ReadPlan<D::File>>,
    /// Every raft request the read answers (the same range asked for again while it waited).
    pub contexts: Vec<GetEntriesContext>,
}

/// A client read of a value on disk, to run beside the shard's loop (see
/// [`ShardCore::take_value_reads`]); report it with [`ShardCore::value_read`] and `token`.
pub struct ValueRead {
    pub token: u64,
    pub job: ReadJob,
}

impl std::fmt::Debug for ValueRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValueRead").field("token", &self.token).finish()
    }
}

fn read_result(value: Option<Vec<u8>>) -> CommandResult {
    match value {
        Some(value) => CommandResult::Value(value),
        None => CommandResult::NotFound,
    }
}

/// A snapshot chunk to produce beside the shard's loop (see [`ShardCore::take_chunk_jobs`]).
pub struct SnapshotChunkJob {
    pub group: u64,
    /// The follower it is for, and the snapshot stream.
    pub to: u64,
    pub stream: u64,
    pub number: u64,
    pub job: ChunkJob,
}

impl std::fmt::Debug for SnapshotChunkJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotChunkJob")
            .field("group", &self.group)
            .field("to", &self.to)
            .field("number", &self.number)
            .finish()
    }
}

/// A log read waiting for one of the shard's read slots (`limits.log_reads_in_flight`).
struct FetchWait {
    hi: u64,
    max_bytes: u64,
    contexts: Vec<GetEntriesContext>,
}

/// Raft requests one waiting read answers at most: raft asks again for the same range at every
/// append attempt to a lagging follower (each heartbeat response); the rest are dropped, and
/// raft asks again once the read has refilled the cache.
const FETCH_CONTEXTS_MAX: usize = 4;

/// Distinct reads (group, first index) waiting at most. A follower has one range outstanding
/// per group, so this is reached only with thousands of lagging groups on one shard; requests
/// beyond it are dropped and raft asks again at its next append attempt.
const FETCHES_WAITING_MAX: usize = 4096;

impl<D: Disk> std::fmt::Debug for Fetch<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetch").field("group", &self.group).finish()
    }
}

/// A group whose state machine cannot apply its next entry for lack of disk space. The entry
/// stays first in line and is offered again once per tick; the group's log goes on (the WAL
/// has its own space, and a full WAL hands leadership over by itself), and reads wait for
/// apply. A leader that stays stalled for an election timeout hands its leadership to a
/// follower, whose clients then get answers, and again every `STALL_HANDOFF_EVERY` election
/// timeouts should it be elected back while still stalled.
///
/// Unapplied entries stay pinned in the WAL's cache (raft reads them synchronously), so a
/// stall would let memory grow with everything the group commits meanwhile. Once the shard's
/// cache is over its budget (only pinned entries put it there), a stalled group takes no new
/// entries: appends from its leader are dropped as if lost (the leader resends; the group
/// catches up from the log or a snapshot once it applies again), and as leader it proposes
/// nothing (requests wait in the group's bounded queue, then get `Busy`).
struct ApplyStall {
    since_tick: u64,
    /// Refused since the last tick: the loop leaves the group alone until the next one.
    waiting: bool,
    /// Tick from which this node, leading, hands its leadership over.
    handoff_at: u64,
    refusals: u64,
}

/// Election timeouts between hand-overs of a group whose apply stays stalled (see
/// [`ApplyStall`]): when every replica's disk is full, leadership moves this rarely.
const STALL_HANDOFF_EVERY: u64 = 10;

/// A persisted-messages batch waiting for its WAL ticket.
struct PersistWait {
    ticket: Ticket,
    group: u64,
    number: u64,
    messages: Vec<Message>,
}

struct ReadRequest {
    request: RequestId,
    key: Vec<u8>,
}

struct Group<D: Disk, S: StateMachine> {
    raw: RawNode<GroupStorage<D>>,
    sm: S,
    fetches: FetchQueue,
    queue: VecDeque<(RequestId, Vec<Command>, usize)>,
    queue_commands: usize,
    queue_bytes: usize,
    proposals: VecDeque<Proposal>,
    committed: VecDeque<Entry>,
    /// Last index applied, empty entries included (the state machine sees only batches).
    applied: u64,
    /// Linearizable reads not yet sent as a ReadIndex request.
    reads_unsent: Vec<ReadRequest>,
    /// ReadIndex requests in flight: context -> (reads, tick issued).
    reads_inflight: BTreeMap<u64, (Vec<ReadRequest>, u64)>,
    /// Reads whose read index is known, waiting for apply to reach it.
    reads_ready: VecDeque<(u64, Vec<ReadRequest>)>,
    /// Local reads, served at the next apply.
    reads_local: Vec<ReadRequest>,
    counters: GroupCounters,
    last_leader: Option<u64>,
    /// Membership as applied.
    conf_state: ConfState,
    /// Shared with the storage: snapshot wanted by raft / prepared by the shard.
    snap: SnapSlot,
    /// The snapshot this leader serves and its streams, by follower.
    serving: Option<Rc<Serving<S::Snapshot>>>,
    /// A stepwise checkpoint of this group's state machine is under way (it began when the
    /// group's membership records were durable, so it may finish whatever came since).
    checkpoint_stepping: bool,
    /// This node handed its leadership over ([`ShardCore::transfer_leadership`]) and has not
    /// yet heard from the new leader.
    handed_over: bool,
    /// The state machine refused the next entry for disk space ([`StateMachine::apply`]).
    apply_stall: Option<ApplyStall>,
    outgoing: BTreeMap<u64, Outgoing<S::Snapshot>>,
    incoming: Option<Incoming>,
    lease: Lease,
    /// Highest committed index whose proposals' commit latency was recorded.
    commit_recorded: u64,
    /// Quiesced: not ticked, and left out of the shard's per-loop passes (see `beat.rs`).
    asleep: bool,
    /// The shard's set of groups not asleep (this group adds itself when it wakes).
    awake: AwakeSet,
    id: u64,
    /// Leader: consecutive idle ticks, and the quiesce request out (term, index, members that
    /// acknowledged).
    idle_ticks: u64,
    quiesce_acks: Option<(u64, u64, BTreeSet<u64>)>,
    /// Follower: woke since the last beat, and its leader must hear so.
    woke_unreported: bool,
}

/// A leader's read lease, in ticks of this node's clock.
#[derive(Debug, Default)]
struct Lease {
    /// Lease reads are served while `ticks < until`.
    until: u64,
    /// No lease reads before this tick: a leadership transfer was under way (the target may
    /// campaign at once, ignoring the followers' leases).
    blocked_until: u64,
    /// Last tick a lease read arrived (renewals happen only while lease reads come).
    wanted_at: Option<u64>,
    /// Last tick a renewal round was sent.
    renewed_at: u64,
}

impl<D: Disk, S: StateMachine> Group<D, S> {
    /// Back to ticking (any activity): see `beat.rs`.
    fn wake(&mut self) {
        if self.asleep {
            self.asleep = false;
            self.awake.borrow_mut().insert(self.id);
            // A follower's leader may be asleep too: it must tick again (and heartbeat), or
            // this follower would time out and campaign. The next beat tells it.
            self.woke_unreported = self.raw.raft.state != StateRole::Leader;
        }
        self.idle_ticks = 0;
        self.quiesce_acks = None;
    }

    fn sleep(&mut self) {
        self.asleep = true;
        self.awake.borrow_mut().remove(&self.id);
        // Every member has everything: no snapshot is needed (an open one costs the state
        // machine what changes meanwhile).
        self.let_go_of_snapshot();
    }

    /// Drops the snapshot this node holds for sending, and raft's metadata for it: raft gets a
    /// new one when it next needs one.
    fn let_go_of_snapshot(&mut self) {
        self.serving = None;
        self.snap.borrow_mut().ready = None;
    }

    /// Whether the next loop's passes must visit this group: a Ready, entries to apply, requests
    /// or reads to propose or serve, entries to fetch, a snapshot to take or stream.
    fn has_work(&self) -> bool {
        self.raw.has_ready()
            || (!self.committed.is_empty() && !self.apply_stall.as_ref().is_some_and(|s| s.waiting))
            || !self.queue.is_empty()
            || !self.reads_unsent.is_empty()
            || !self.reads_ready.is_empty()
            || !self.reads_local.is_empty()
            || !self.fetches.borrow().is_empty()
            || self.snap.borrow().wanted
            || !self.outgoing.is_empty()
            || self
                .incoming
                .as_ref()
                .is_some_and(|i| i.complete && !i.complete_acked)
            || self.raw.raft.raft_log.applied < self.applied
    }

    /// Nothing waiting here ([`Group::unoccupied`]), and the whole log committed, persisted and
    /// applied.
    fn quiet(&self) -> bool {
        let log = &self.raw.raft.raft_log;
        let last = log.last_index();
        self.unoccupied() && log.committed == last && log.persisted == last
    }

    /// Nothing under way for clients or peers: no requests queued, reads waiting, proposals
    /// unanswered, snapshots moving or Ready, and everything committed applied (what is past
    /// the commit index may stay unknown: a removed node never learns its fate).
    fn unoccupied(&self) -> bool {
        self.queue.is_empty()
            && self.reads_unsent.is_empty()
            && self.reads_inflight.is_empty()
            && self.reads_ready.is_empty()
            && self.reads_local.is_empty()
            && self.proposals.is_empty()
            && self.committed.is_empty()
            && self.outgoing.is_empty()
            && self.incoming.is_none()
            && !self.raw.has_ready()
            && self.applied == self.raw.raft.raft_log.committed
    }

    /// Sleeps a group this node does not lead and has nothing under way in (see
    /// [`Group::unoccupied`]); returns whether it did. For a node that is no member of the
    /// group, whether it knows so itself or a member told it.
    fn rest_outside(&mut self) -> bool {
        let resting = self.raw.raft.state != StateRole::Leader && self.unoccupied();
        if resting {
            self.sleep();
        }
        resting
    }

    /// A leader whose group could quiesce: quiet, every member has everything, no transfer or
    /// membership change under way.
    fn leader_idle(&self) -> bool {
        let raft = &self.raw.raft;
        let last = raft.raft_log.last_index();
        raft.state == StateRole::Leader
            && raft.lead_transferee.is_none()
            && !raft.has_pending_conf()
            && self.conf_state.voters_outgoing.is_empty()
            && self.quiet()
            && raft
                .prs()
                .iter()
                .all(|(&id, p)| id == raft.id || p.matched == last)
    }

    /// Whether this leader may serve a lease read now (see [`Consistency::Lease`]). Besides the
    /// lease itself: no leadership transfer in sight, and an entry of this term committed (the
    /// commit index then covers everything any earlier leader committed).
    fn lease_holds(&mut self, ticks: u64, lease_ticks: u64, election_ticks: u64) -> bool {
        let raft = &self.raw.raft;
        if raft.lead_transferee.is_some() {
            self.lease.blocked_until = ticks + 2 * election_ticks;
            return false;
        }
        lease_ticks > 0
            && raft.state == StateRole::Leader
            && ticks < self.lease.until
            && ticks >= self.lease.blocked_until
            && raft.raft_log.term(raft.raft_log.committed).ok() == Some(raft.term)
    }
}

/// Counters of one group since the shard started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GroupCounters {
    proposals: u64,
    commands_proposed: u64,
    entries_appended: u64,
    bytes_appended: u64,
    leader_changes: u64,
    busy_answers: u64,
}

/// One group's figures at one moment ([`ShardCore::group_metrics`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupMetrics {
    pub group: u64,
    pub leader: Option<u64>,
    pub is_leader: bool,
    pub term: u64,
    pub last_index: u64,
    pub commit: u64,
    pub applied: u64,
    /// Entries in the local log not yet known committed (`last_index - commit`).
    pub commit_lag: u64,
    /// Entries committed but not yet applied (`commit - applied`).
    pub apply_lag: u64,
    /// Commands and bytes waiting to be proposed (the group's bounded queue).
    pub queued_commands: u64,
    pub queued_bytes: u64,
    /// Linearizable and local reads waiting.
    pub reads_waiting: u64,
    pub proposals: u64,
    pub commands_proposed: u64,
    /// Entries this node wrote to its WAL for the group (as leader or follower), and their bytes.
    pub entries_appended: u64,
    pub bytes_appended: u64,
    /// Times the group's known leader changed on this node.
    pub leader_changes: u64,
    pub busy_answers: u64,
    /// The group's membership as applied here (voters; learners).
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// The first index still in this node's log for the group (compaction moves it past
    /// checkpoints, minus what is retained: `wal.retain_entries`, and on a leader what a slow
    /// follower still needs), and the state machine's last durable checkpoint. A follower
    /// whose log ends before a leader's first index catches up by snapshot.
    pub first_index: u64,
    pub checkpoint_index: u64,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub proposals: u64,
    pub commands_proposed: u64,
    pub entries_applied: u64,
    pub busy_answers: u64,
    pub leader_changes: u64,
    /// Snapshots this node finished sending (as leader) and installed (as follower).
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
    /// Lease reads served under the lease (without a ReadIndex round).
    pub lease_reads: u64,
    /// State machine checkpoints written (a group with nothing applied since its last one
    /// writes none), and those abandoned for lack of disk space (retried later).
    pub checkpoints: u64,
    pub checkpoints_abandoned: u64,
    /// Log reads for lagging followers (entries no longer cached), and those that failed
    /// (raft asks again, or sends a snapshot once the range is compacted).
    pub log_reads: u64,
    pub log_reads_failed: u64,
    /// Entries the state machine refused to apply for lack of disk space (each is offered
    /// again at the next tick), and snapshot chunks or completions refused the same way (the
    /// leader resends them).
    pub apply_stalls: u64,
    pub restore_stalls: u64,
    /// Client reads served by reading a value from the state machine's data files beside the
    /// loop ([`StateMachine::read_job`]).
    pub value_reads: u64,
    /// Groups this node put to sleep because a member said it is no longer in them (it was
    /// removed while down or cut off, and kept campaigning): see `beat.rs`.
    pub campaigns_stopped: u64,
    /// Snapshot chunks and ends the transport could not take (no connection, or its queue to
    /// the peer full): each stream goes back to such a piece after a short pause.
    pub snapshot_pieces_unsent: u64,
    /// Times a snapshot stream went back to its last acknowledged chunk for lack of progress
    /// for an election timeout (pieces lost on the way, or a follower that stopped answering).
    pub snapshot_resends: u64,
}

/// One shard's groups. See the module docs for how a runner drives it.
pub struct ShardCore<D: Disk, S: StateMachine> {
    config: ShardConfig,
    wal: Rc<RefCell<Wal<D>>>,
    groups: BTreeMap<u64, Group<D, S>>,
    persist_waiting: VecDeque<PersistWait>,
    messages: Vec<Envelope>,
    pieces: Vec<SnapshotPiece>,
    answers: Vec<Answer>,
    /// The results of the entry being applied, kept between entries so a large batch does not
    /// regrow a fresh vector each time.
    apply_results: Vec<CommandResult>,
    ticks: u64,
    next_read_context: u64,
    failure: Option<String>,
    stats: ShardStats,
    /// Commands per proposed entry (the batching factor).
    commands_per_entry: hdrhistogram::Histogram<u64>,
    /// When on, every applied entry is recorded as (group, index, term, crc32c of its data).
    applied_log: Option<Vec<(u64, u64, u64, u32)>>,
    /// An encoded batch of no commands (applied for entries that carry none).
    empty_batch: Vec<u8>,
    /// The runner's clock (microseconds), set each loop.
    now_us: u64,
    /// From a proposal entering the leader's log to its commit (a quorum's WALs synced),
    /// microseconds.
    commit_latency_us: hdrhistogram::Histogram<u64>,
    /// Tick of the last beat from each peer node.
    last_heard: BTreeMap<u64, u64>,
    /// Quiesce acknowledgements to send with the next beat, by leader node.
    beat_acks: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Groups to tell a peer node it is no member of (it asked for votes in them), with the
    /// next beat; at most every group once per peer.
    removal_notices: BTreeMap<u64, BTreeSet<u64>>,
    /// Nodes removed from the address book while still members of a group here: they stay
    /// reachable until they are members of none, then leave (`take_departed`).
    leaving: BTreeSet<u64>,
    /// The tick at which `take_departed` last looked: once per tick is soon enough.
    leaving_checked: u64,
    /// Groups not asleep (ticked).
    awake: AwakeSet,
    /// Numbers this node's snapshot streams.
    next_stream: u64,
    /// Groups that may have work this loop (marked by every entry point that touches one, and
    /// kept while work remains): the per-loop passes visit only these, so a loop costs what
    /// its busy groups cost, not what the shard's thousands of idle ones would.
    active: BTreeSet<u64>,
    /// Log reads waiting for a slot, by (group, first index), in the order asked; and how
    /// many are out (handed to the runner by `take_fetches`, not yet `fetched`).
    fetch_waiting: BTreeMap<(u64, u64), FetchWait>,
    fetch_order: VecDeque<(u64, u64)>,
    fetches_out: usize,
    /// Snapshot chunks to produce, for the runner (`take_chunk_jobs`).
    chunk_jobs: Vec<SnapshotChunkJob>,
    /// Client reads of values on disk waiting for one of the shard's read slots
    /// (`limits.value_reads_in_flight`), and those out with the runner, by token.
    value_reads_waiting: VecDeque<(RequestId, ReadJob)>,
    value_reads_out: BTreeMap<u64, RequestId>,
    next_value_read: u64,
}

type AwakeSet = Rc<RefCell<BTreeSet<u64>>>;

impl<D: Disk, S: StateMachine> std::fmt::Debug for ShardCore<D, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCore")
            .field("node", &self.config.node)
            .field("groups", &self.groups.len())
            .field("failure", &self.failure)
            .finish()
    }
}

/// A group's membership at the state machine's durable index `applied`, from the WAL's metadata
/// (or the initial voters). Finishes a snapshot install that a crash interrupted after the state
/// machine switched to it but before the WAL reset was durable: the snapshot's metadata record
/// (written and made durable before the switch) gives the term the reset needs.
fn recover_membership<D: Disk>(
    wal: &mut Wal<D>,
    group: u64,
    applied: u64,
    initial_voters: &[u64],
) -> Result<ConfState, String> {
    let Some((at, bytes)) = wal.meta_at(group, applied) else {
        return Ok(ConfState {
            voters: initial_voters.to_vec(),
            ..Default::default()
        });
    };
    let meta = GroupMeta::decode(&bytes).map_err(|e| format!("WAL metadata at index {at}: {e}"))?;
    if at == applied && meta.snapshot_term != 0 && wal.term(group, applied) != Ok(meta.snapshot_term) {
        wal.reset(group, applied, meta.snapshot_term)
            .map_err(|e| e.to_string())?;
    }
    Ok(meta.conf_state)
}

/// Whether `change` removes node `id` or turns it into a learner.
fn removes_voter(change: &ConfChangeV2, id: u64) -> bool {
    change.changes.iter().any(|c| {
        c.node_id == id
            && matches!(
                c.get_change_type(),
                raft::eraftpb::ConfChangeType::RemoveNode | raft::eraftpb::ConfChangeType::AddLearnerNode
            )
    })
}

/// Applies a committed conf-change entry (V1 or V2; empty data is raft-rs's "leave the joint
/// configuration") and returns the new membership, or why the change is refused.
fn apply_conf_change<T: Storage>(raw: &mut RawNode<T>, entry: &Entry) -> Result<ConfState, String> {
    let change = match entry.entry_type {
        EntryType::EntryConfChange => {
            let v1 =
                ConfChange::parse_from_bytes(&entry.data).map_err(|e| format!("membership change: {e}"))?;
            let mut single = ConfChangeSingle::default();
            single.set_change_type(v1.get_change_type());
            single.node_id = v1.node_id;
            let mut v2 = ConfChangeV2::default();
            v2.mut_changes().push(single);
            v2
        }
        _ => ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| format!("membership change: {e}"))?,
    };
    // A leader that applies its own removal (proposed while another node led) steps down, and
    // first tells its most up-to-date follower to campaign at once (raft-rs would otherwise
    // keep it leading without being a member, an unsupported state).
    let me = raw.raft.id;
    let removes_me = removes_voter(&change, me);
    if removes_me && raw.raft.state == StateRole::Leader {
        if let Some(to) = best_follower(&raw.raft) {
            raw.transfer_leader(to);
        }
    }
    let conf_state = raw
        .apply_conf_change(&change)
        .map_err(|e| format!("membership change refused: {e}"))?;
    let voter = conf_state.voters.contains(&me) || conf_state.voters_outgoing.contains(&me);
    if !voter && raw.raft.state == StateRole::Leader {
        let term = raw.raft.term;
        raw.raft.become_follower(term, raft::INVALID_ID);
    }
    Ok(conf_state)
}

fn raft_config(config: &ShardConfig, applied: u64) -> raft::Config {
    raft::Config {
        id: config.node,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied,
        max_size_per_msg: config.max_size_per_msg,
        max_inflight_msgs: config.max_inflight_msgs,
        max_uncommitted_size: config.max_uncommitted_bytes,
        max_committed_size_per_ready: config.max_committed_size_per_ready,
        pre_vote: config.pre_vote,
        check_quorum: config.check_quorum,
        min_election_tick: config.election_ticks_range.map_or(0, |r| r.0),
        max_election_tick: config.election_ticks_range.map_or(0, |r| r.1),
        ..Default::default()
    }
}

/// Compacts `group`'s WAL through `through` when that lies within its log (a state machine
/// may be durable past the log's end after a snapshot; below the first index nothing is left).
fn compact_within_log<D: Disk>(wal: &mut Wal<D>, group: u64, through: u64) -> Result<(), String> {
    if through >= wal.first_index(group) && through <= wal.last_index(group) {
        wal.compact(group, through).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What to pass to [`ringraft_wal::Wal::open_pinned`] for these recovered state machines: each
/// group's entries after its durable index. Raft applies them again after a restart and reads
/// them synchronously, so they must be in memory however much the WAL's cache budget allows.
pub fn unapplied_floors<S: StateMachine>(machines: &[(u64, S)]) -> std::collections::HashMap<u64, u64> {
    machines
        .iter()
        .map(|(group, sm)| (*group, sm.durable_index() + 1))
        .collect()
}

impl<D: Disk, S: StateMachine> ShardCore<D, S> {
    /// Builds the shard over a recovered WAL and each group's recovered state machine. Raft
    /// restarts at each machine's durable index and replays the log from there: the WAL must
    /// have been opened with [`unapplied_floors`] of these machines, or a group whose unapplied
    /// entries are not all cached gets an error here (raft would need a disk read it cannot wait for).
    pub fn new(
        config: ShardConfig,
        wal: Wal<D>,
        machines: Vec<(u64, S)>,
    ) -> Result<ShardCore<D, S>, EngineError> {
        let wal = Rc::new(RefCell::new(wal));
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut groups = BTreeMap::new();
        let machines_ids: BTreeSet<u64> = machines.iter().map(|(g, _)| *g).collect();
        let awake: AwakeSet = Rc::new(RefCell::new(machines_ids.clone()));
        for (group, sm) in machines {
            let applied = sm.durable_index();
            let conf_state = recover_membership(&mut wal.borrow_mut(), group, applied, &config.voters)
                .map_err(|e| EngineError::Failed(format!("group {group}: {e}")))?;
            let storage = GroupStorage::new(group, wal.clone(), conf_state.clone(), applied);
            let fetches = storage.fetches.clone();
            let snap = storage.snapshot.clone();
            let last = storage.last_index().unwrap_or(0);
            if applied > last {
                return Err(EngineError::Failed(format!(
                    "group {group}: the state machine is durable at {applied} but the WAL ends at {last}"
                )));
            }
            wal.borrow_mut().set_cache_floor(group, applied + 1);
            if last > applied {
                if let Err(ReadError::NotCached { index, .. }) =
                    wal.borrow().entries(group, applied + 1, last + 1, None)
                {
                    return Err(EngineError::Failed(format!(
                        "group {group}: entry {index} is not applied and not in memory \
                         (open the WAL with unapplied_floors)"
                    )));
                }
            }
            let raw = RawNode::new(&raft_config(&config, applied), storage, &logger)
                .map_err(|e| EngineError::Failed(format!("group {group}: raft: {e}")))?;
            groups.insert(
                group,
                Group {
                    raw,
                    sm,
                    fetches,
                    queue: VecDeque::new(),
                    queue_commands: 0,
                    queue_bytes: 0,
                    proposals: VecDeque::new(),
                    committed: VecDeque::new(),
                    applied,
                    reads_unsent: Vec::new(),
                    reads_inflight: BTreeMap::new(),
                    reads_ready: VecDeque::new(),
                    reads_local: Vec::new(),
                    counters: GroupCounters::default(),
                    last_leader: None,
                    conf_state,
                    snap,
                    serving: None,
                    checkpoint_stepping: false,
                    handed_over: false,
                    apply_stall: None,
                    outgoing: BTreeMap::new(),
                    incoming: None,
                    lease: Lease::default(),
                    commit_recorded: 0,
                    asleep: false,
                    awake: awake.clone(),
                    id: group,
                    idle_ticks: 0,
                    quiesce_acks: None,
                    woke_unreported: false,
                },
            );
        }
        Ok(ShardCore {
            config,
            wal,
            groups,
            persist_waiting: VecDeque::new(),
            messages: Vec::new(),
            pieces: Vec::new(),
            answers: Vec::new(),
            apply_results: Vec::new(),
            ticks: 0,
            next_read_context: 1,
            failure: None,
            stats: ShardStats::default(),
            applied_log: None,
            commands_per_entry: crate::runtime::new_histogram(),
            empty_batch: encode_batch(Vec::new()).to_vec(),
            now_us: 0,
            commit_latency_us: crate::runtime::new_histogram(),
            last_heard: BTreeMap::new(),
            beat_acks: BTreeMap::new(),
            removal_notices: BTreeMap::new(),
            leaving: BTreeSet::new(),
            leaving_checked: u64::MAX,
            active: machines_ids,
            next_stream: 0,
            awake,
            fetch_waiting: BTreeMap::new(),
            fetch_order: VecDeque::new(),
            fetches_out: 0,
            chunk_jobs: Vec::new(),
            value_reads_waiting: VecDeque::new(),
            value_reads_out: BTreeMap::new(),
            next_value_read: 0,
        })
    }

    /// Nodes added to the cluster (see `Engine::add_nodes`): beats go to them from now on, and
    /// their silence counts from now. A node that was leaving (see `mark_leaving`) stays.
    pub fn add_peers(&mut self, nodes: impl IntoIterator<Item = u64>) {
        for node in nodes {
            self.leaving.remove(&node);
            if node != self.config.node && !self.config.peers.contains(&node) {
                self.config.peers.push(node);
                self.last_heard.insert(node, self.ticks);
            }
        }
    }

    /// The groups of this shard of which `node` is a member (voter, learner, or either side of
    /// a joint configuration) as this node applied them.
    fn groups_with_member(&self, node: u64) -> Vec<u64> {
        self.groups
            .iter()
            .filter(|(_, g)| {
                let c = &g.conf_state;
                c.voters
                    .iter()
                    .chain(&c.learners)
                    .chain(&c.voters_outgoing)
                    .chain(&c.learners_next)
                    .any(|&m| m == node)
            })
            .map(|(&group, _)| group)
            .collect()
    }

    /// Nodes removed from the cluster (see `Engine::remove_nodes`), split into those that can
    /// go now, members of no group here (the caller removes them from the transport, then calls
    /// `remove_peers`), and the others with the groups that hold them (the caller marks them
    /// `leaving`). Nodes this shard does not know, and this node, are in neither.
    pub fn removal_split(&self, nodes: &[u64]) -> (Vec<u64>, Vec<(u64, Vec<u64>)>) {
        let mut free = Vec::new();
        let mut held = Vec::new();
        for &node in nodes {
            if node == self.config.node || !self.config.peers.contains(&node) {
                continue;
            }
            match self.groups_with_member(node) {
                groups if groups.is_empty() => free.push(node),
                groups => held.push((node, groups)),
            }
        }
        (free, held)
    }

    /// Removed nodes still members of groups here (see `removal_split`): they stay reachable
    /// while the groups need them, no group takes them again (`change_membership` refuses),
    /// and `take_departed` hands them back once they are members of none.
    pub fn mark_leaving(&mut self, nodes: impl IntoIterator<Item = u64>) {
        self.leaving.extend(nodes);
        self.leaving_checked = u64::MAX;
    }

    /// Leaving nodes that are now members of no group here (looked at once per tick): the
    /// caller removes them from the transport, then calls `remove_peers`.
    pub fn take_departed(&mut self) -> Vec<u64> {
        if self.leaving.is_empty() || self.leaving_checked == self.ticks {
            return Vec::new();
        }
        self.leaving_checked = self.ticks;
        let departed: Vec<u64> = self
            .leaving
            .iter()
            .copied()
            .filter(|&node| self.groups_with_member(node).is_empty())
            .collect();
        for node in &departed {
            self.leaving.remove(node);
        }
        departed
    }

    /// Nodes removed from the cluster: no more beats to them.
    pub fn remove_peers(&mut self, nodes: &[u64]) {
        self.config.peers.retain(|p| !nodes.contains(p));
        for node in nodes {
            self.last_heard.remove(node);
            self.removal_notices.remove(node);
            self.leaving.remove(node);
        }
    }

    /// Nodes removed from the address book that are still members of a group here.
    pub fn leaving(&self) -> &BTreeSet<u64> {
        &self.leaving
    }

    /// This node's id.
    pub fn node(&self) -> u64 {
        self.config.node
    }

    /// The shard's WAL, for the runner to perform its IO jobs.
    pub fn wal(&self) -> &Rc<RefCell<Wal<D>>> {
        &self.wal
    }

    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// Starts recording applied entries (for checkers: committed entries must never change).
    pub fn observe_applied(&mut self) {
        self.applied_log.get_or_insert_with(Vec::new);
    }

    /// Applied entries recorded since the last call: (group, index, term, crc32c of the data).
    pub fn take_applied(&mut self) -> Vec<(u64, u64, u64, u32)> {
        self.applied_log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    pub fn groups(&self) -> impl Iterator<Item = u64> + '_ {
        self.groups.keys().copied()
    }

    /// The group's leader as this node knows it.
    pub fn leader(&self, group: u64) -> Option<u64> {
        let raft = &self.groups.get(&group)?.raw.raft;
        known_leader(raft.leader_id)
    }

    pub fn is_leader(&self, group: u64) -> bool {
        self.groups
            .get(&group)
            .is_some_and(|g| g.raw.raft.state == StateRole::Leader)
    }

    /// Sets the clock the commit latency is measured with (the runner's monotonic time, or the
    /// simulator's fake one). Call once per loop.
    pub fn set_time_us(&mut self, now_us: u64) {
        self.now_us = now_us;
    }

    /// Proposal to commit latency on this node as leader, microseconds.
    pub fn commit_latency_us(&self) -> &hdrhistogram::Histogram<u64> {
        &self.commit_latency_us
    }

    /// Commands per proposed entry since the shard started.
    pub fn commands_per_entry(&self) -> &hdrhistogram::Histogram<u64> {
        &self.commands_per_entry
    }

    /// Every group's figures now.
    pub fn group_metrics(&self) -> Vec<GroupMetrics> {
        self.groups
            .iter()
            .map(|(&group, g)| {
                let raft = &g.raw.raft;
                let applied = g.applied.max(g.sm.applied_index());
                let last_index = raft.raft_log.last_index();
                let commit = raft.raft_log.committed;
                let reads = g.reads_unsent.len()
                    + g.reads_inflight.values().map(|(r, _)| r.len()).sum::<usize>()
                    + g.reads_ready.iter().map(|(_, r)| r.len()).sum::<usize>()
                    + g.reads_local.len();
                GroupMetrics {
                    group,
                    leader: known_leader(raft.leader_id),
                    is_leader: raft.state == StateRole::Leader,
                    term: raft.term,
                    last_index,
                    commit,
                    applied,
                    commit_lag: last_index.saturating_sub(commit),
                    apply_lag: commit.saturating_sub(applied),
                    queued_commands: g.queue_commands as u64,
                    queued_bytes: g.queue_bytes as u64,
                    reads_waiting: reads as u64,
                    proposals: g.counters.proposals,
                    commands_proposed: g.counters.commands_proposed,
                    entries_appended: g.counters.entries_appended,
                    bytes_appended: g.counters.bytes_appended,
                    leader_changes: g.counters.leader_changes,
                    busy_answers: g.counters.busy_answers,
                    voters: sorted(&g.conf_state.voters),
                    learners: sorted(&g.conf_state.learners),
                    first_index: self.wal.borrow().first_index(group),
                    checkpoint_index: g.sm.durable_index(),
                }
            })
            .collect()
    }

    /// (term, commit, applied) of a group.
    pub fn progress(&self, group: u64) -> Option<(u64, u64, u64)> {
        let g = self.groups.get(&group)?;
        Some((
            g.raw.raft.term,
            g.raw.raft.raft_log.committed,
            g.applied.max(g.sm.applied_index()),
        ))
    }

    /// The group's state machine (for reads in tests and status).
    pub fn machine(&mut self, group: u64) -> Option<&mut S> {
        self.groups.get_mut(&group).map(|g| &mut g.sm)
    }

    /// Messages to send and answers to deliver since the last call.
    pub fn take_output(&mut self) -> (Vec<Envelope>, Vec<Answer>) {
        (
            std::mem::take(&mut self.messages),
            std::mem::take(&mut self.answers),
        )
    }

    /// Queues commands for `group`. Answers at once (in the next output) with `NotLeader`,
    /// `Busy`, `TooLarge` or `UnknownGroup` when it cannot take them; never waits.
    pub fn submit(&mut self, group: u64, request: RequestId, commands: Vec<Command>) {
        self.active.insert(group);
        let result = self.try_submit(group, request, commands);
        if let Err(error) = result {
            if matches!(error, EngineError::Busy(_)) {
                self.stats.busy_answers += 1;
                if let Some(g) = self.groups.get_mut(&group) {
                    g.counters.busy_answers += 1;
                }
            }
            self.answers.push(Answer {
                request,
                result: Err(error),
            });
        }
    }

    fn try_submit(
        &mut self,
        group: u64,
        request: RequestId,
        commands: Vec<Command>,
    ) -> Result<(), EngineError> {
        if let Some(cause) = &self.failure {
            return Err(EngineError::Failed(cause.clone()));
        }
        let limits = self.config.limits;
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(EngineError::UnknownGroup(group))?;
        // A follower answers without waking: a client with stale routing must not keep a
        // quiesced group (and its leader) awake, nor a removed node campaigning.
        if g.raw.raft.state != StateRole::Leader {
            let leader = g.raw.raft.leader_id;
            return Err(EngineError::NotLeader {
                leader: known_leader(leader),
            });
        }
        g.wake();
        if commands.is_empty() {
            return Err(EngineError::BadRequest("no commands".into()));
        }
        let mut bytes = 0;
        for command in &commands {
            limits
                .check(command)
                .map_err(|e| EngineError::TooLarge(e.to_string()))?;
            bytes += ringraft_sm::command_size_estimate(command);
        }
        if bytes + ringraft_sm::BATCH_SLACK_BYTES > self.config.entry_bytes_max
            || commands.len() > self.config.entry_commands_max
        {
            return Err(EngineError::TooLarge(format!(
                "{} commands of ~{bytes} bytes exceed one entry (batching.entry_bytes_max {}, entry_commands_max {})",
                commands.len(),
                self.config.entry_bytes_max,
                self.config.entry_commands_max
            )));
        }
        if g.queue_commands + commands.len() > self.config.group_queue_commands_max {
            return Err(EngineError::Busy(
                "the group's command queue is full (limits.group_queue_commands_max)",
            ));
        }
        if g.queue_bytes + bytes > self.config.group_queue_bytes_max {
            return Err(EngineError::Busy(
                "the group's queue bytes are at their limit (limits.group_queue_bytes_max)",
            ));
        }
        g.queue_commands += commands.len();
        g.queue_bytes += bytes;
        g.queue.push_back((request, commands, bytes));
        Ok(())
    }

    /// Queues a read. Linearizable reads need leadership; local reads are served by any member
    /// of the group (voter or learner). A node that is none holds no copy of the group, or a
    /// copy from before it was removed, stale without bound: it answers `NotLeader` instead.
    pub fn read(&mut self, group: u64, request: RequestId, key: Vec<u8>, consistency: Consistency) {
        self.active.insert(group);
        let Some(g) = self.groups.get_mut(&group) else {
            self.answers.push(Answer {
                request,
                result: Err(EngineError::UnknownGroup(group)),
            });
            return;
        };
        // Only a leader's reads need the group ticking (ReadIndex rounds, lease renewals); a
        // follower answers NotLeader or serves a local read without waking (see `try_submit`).
        if consistency != Consistency::Local && g.raw.raft.state == StateRole::Leader {
            g.wake();
        }
        let read = ReadRequest { request, key };
        let ticks = self.ticks;
        let lease_ticks = self.config.lease_ticks;
        let election = self.config.election_ticks as u64;
        match consistency {
            Consistency::Local if g.raw.raft.prs().get(g.raw.raft.id).is_some() => g.reads_local.push(read),
            Consistency::Lease if g.raw.raft.state == StateRole::Leader => {
                g.lease.wanted_at = Some(ticks);
                if g.lease_holds(ticks, lease_ticks, election) {
                    self.stats.lease_reads += 1;
                    let committed = g.raw.raft.raft_log.committed;
                    g.reads_ready.push_back((committed, vec![read]));
                } else {
                    g.reads_unsent.push(read);
                }
            }
            Consistency::Linearizable if g.raw.raft.state == StateRole::Leader => g.reads_unsent.push(read),
            Consistency::Linearizable | Consistency::Lease | Consistency::Local => {
                let leader = g.raw.raft.leader_id;
                self.answers.push(Answer {
                    request,
                    result: Err(EngineError::NotLeader {
                        leader: known_leader(leader),
                    }),
                });
            }
        }
    }

    /// Proposes a membership change of `group` (joint consensus when it changes more than one
    /// voter: raft-rs enters the joint configuration and leaves it automatically). Answered once
    /// the change is applied (`Ok` with no results), or at once with `NotLeader`, `Busy` (another
    /// change is still pending: raft-rs would silently turn this one into an empty entry) or
    /// `BadRequest`. A change removing or demoting this leader first hands leadership over and
    /// answers `NotLeader` naming the new leader, where the caller retries.
    pub fn change_membership(&mut self, group: u64, request: RequestId, change: ConfChangeV2) {
        self.active.insert(group);
        let result = self.try_change_membership(group, request, change);
        if let Err(error) = result {
            self.answers.push(Answer {
                request,
                result: Err(error),
            });
        }
    }

    fn try_change_membership(
        &mut self,
        group: u64,
        request: RequestId,
        change: ConfChangeV2,
    ) -> Result<(), EngineError> {
        if let Some(cause) = &self.failure {
            return Err(EngineError::Failed(cause.clone()));
        }
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(EngineError::UnknownGroup(group))?;
        g.wake();
        let raft = &g.raw.raft;
        if raft.state != StateRole::Leader {
            return Err(EngineError::NotLeader {
                leader: known_leader(raft.leader_id),
            });
        }
        if change.changes.is_empty() {
            return Err(EngineError::BadRequest(
                "a membership change needs at least one change".into(),
            ));
        }
        if change
            .changes
            .iter()
            .any(|c| c.node_id == 0 || c.node_id == raft::INVALID_ID)
        {
            return Err(EngineError::BadRequest("node id 0 is not a valid member".into()));
        }
        let me = raft.id;
        // A member this node cannot reach would be one the group counts on and never hears
        // from: a voter so added lowers how many failures the group survives.
        let unknown = change.changes.iter().find(|c| {
            c.change_type != raft::eraftpb::ConfChangeType::RemoveNode
                && c.node_id != me
                && !self.config.peers.contains(&c.node_id)
        });
        if let Some(c) = unknown {
            return Err(EngineError::BadRequest(format!(
                "node {} is not in this node's address book: list it in cluster.nodes on every \
                 node (SIGHUP applies it) before adding it to a group",
                c.node_id
            )));
        }
        let leaving = change.changes.iter().find(|c| {
            c.change_type != raft::eraftpb::ConfChangeType::RemoveNode && self.leaving.contains(&c.node_id)
        });
        if let Some(c) = leaving {
            return Err(EngineError::BadRequest(format!(
                "node {} is leaving this node's address book (it was removed from cluster.nodes): \
                 list it there again (SIGHUP applies it) before adding it to a group",
                c.node_id
            )));
        }
        // A learner becomes a voter only once it keeps up (what etcd calls a learner in sync):
        // a voter that lags counts toward the quorum without helping to make one, so one more
        // failure would stall the group until it caught up. `Busy`: clients retry.
        let lag_max = self.config.promote_lag_max_entries;
        let committed = raft.raft_log.committed;
        let behind = change.changes.iter().any(|c| {
            c.change_type == raft::eraftpb::ConfChangeType::AddNode
                && g.conf_state.learners.contains(&c.node_id)
                && !raft.prs().get(c.node_id).is_some_and(|p| {
                    p.state == raft::ProgressState::Replicate
                        && p.recent_active
                        && p.matched.saturating_add(lag_max) >= committed
                })
        });
        if behind {
            return Err(EngineError::Busy(
                "the learner is not caught up yet: promoted once its leader replicates to it \
                 normally, it answered within an election timeout, and it is within \
                 raft.promote_lag_max_entries of the commit index",
            ));
        }
        let demotes_me = removes_voter(&change, me);
        if demotes_me {
            // A leader does not remove itself (raft-rs leaves that path untested): it hands
            // leadership to its most up-to-date follower and sends the caller there.
            let to = best_follower(raft)
                .ok_or_else(|| EngineError::BadRequest(format!("node {me} is group {group}'s only voter")))?;
            if g.raw.raft.lead_transferee.is_none() {
                g.raw.transfer_leader(to);
            }
            return Err(EngineError::NotLeader { leader: Some(to) });
        }
        if raft.has_pending_conf() || !g.conf_state.voters_outgoing.is_empty() {
            return Err(EngineError::Busy(
                "another membership change of this group is still being applied",
            ));
        }
        let index = raft.raft_log.last_index() + 1;
        let term = raft.term;
        let data = change.write_to_bytes().expect("protobuf encoding cannot fail");
        let proposed = g.raw.propose_conf_change(Vec::new(), change);
        // raft-rs replaces a change proposed while another is pending with an empty normal
        // entry and reports success: check what actually entered the log.
        let entered = g.raw.raft.raft_log.last_index() == index
            && g.raw
                .raft
                .raft_log
                .entries(index, None, GetEntriesContext::empty(false))
                .ok()
                .and_then(|e| e.into_iter().next())
                .is_some_and(|e| e.entry_type == EntryType::EntryConfChangeV2 && e.data == data);
        match proposed {
            Ok(()) if entered => {
                g.proposals.push_back(Proposal {
                    index,
                    term,
                    parts: vec![(request, 0)],
                    conf: true,
                    proposed_at_us: self.now_us,
                });
                Ok(())
            }
            Ok(()) => Err(EngineError::Busy(
                "raft dropped the change: another membership change is pending",
            )),
            Err(raft::Error::ProposalDropped) => Err(EngineError::Busy(
                "raft dropped the change (a leadership transfer or the uncommitted log limit)",
            )),
            Err(error) => Err(EngineError::BadRequest(format!("membership change: {error}"))),
        }
    }

    /// A group's membership as applied here.
    pub fn membership(&self, group: u64) -> Option<ConfState> {
        self.groups.get(&group).map(|g| g.conf_state.clone())
    }

    /// Checkpoints every state machine, then lets the WAL drop what they made durable, keeping
    /// `retain` entries below it and, on a leader, what its slowest follower still needs within
    /// `retain_for_followers` entries (a follower further behind gets a snapshot instead).
    ///
    /// A group whose membership record is still in the WAL's buffers is skipped this time: a
    /// crash could otherwise leave a checkpoint past a change the recovered membership does not
    /// know (the log holding the change may be compacted).
    pub async fn checkpoint(&mut self, retain: u64, retain_for_followers: u64) -> Result<(), String> {
        let mut cursor = 0;
        while !self
            .checkpoint_some(&mut cursor, usize::MAX, None, retain, retain_for_followers)
            .await?
        {}
        Ok(())
    }

    /// Part of a checkpoint round: [`ShardCore::checkpoint`] for the groups from `*cursor` on,
    /// writing at most `budget` checkpoints (groups with nothing new since their last one cost
    /// nothing). Returns whether the round is complete; otherwise `*cursor` is where it goes on.
    /// A runner spreads a round over its loops this way, so ten thousand groups' checkpoints
    /// (each a write and a sync) never stall the shard at once.
    ///
    /// With `step_bytes`, a state machine writes about that much of its checkpoint per call
    /// ([`StateMachine::checkpoint_step`]) and the call ends there while one is unfinished: a
    /// million keys (~80 MB of checkpoint) once held the shard for 250-370 ms. Without it, each
    /// checkpoint is written whole.
    pub async fn checkpoint_some(
        &mut self,
        cursor: &mut u64,
        budget: usize,
        step_bytes: Option<u64>,
        retain: u64,
        retain_for_followers: u64,
    ) -> Result<bool, String> {
        let mut written = 0;
        let groups: Vec<u64> = self.groups.range(*cursor..).map(|(&g, _)| g).collect();
        for group in groups {
            if written >= budget {
                *cursor = group;
                return Ok(false);
            }
            let g = self.groups.get_mut(&group).unwrap();
            // Skipped only before it starts: a stepwise one under way holds the state of when
            // it began, and waiting a whole round would let what it keeps aside grow.
            let stepping = g.checkpoint_stepping && step_bytes.is_some();
            if !stepping && !self.wal.borrow().meta_durable(group) {
                continue;
            }
            let durable_before = g.sm.durable_index();
            if durable_before < g.sm.applied_index() {
                written += 1;
            }
            let result = match step_bytes {
                None => g.sm.checkpoint().await.map(Some),
                Some(bytes) => g.sm.checkpoint_step(bytes).await,
            };
            let durable = match result {
                Ok(Some(durable)) => durable,
                Ok(None) => {
                    g.checkpoint_stepping = true;
                    *cursor = group;
                    return Ok(false);
                }
                // A full disk: the machine abandoned the checkpoint and goes on (the WAL keeps
                // what it applied). This group's log is not compacted this round; the next
                // round tries again.
                Err(error) if error.is_out_of_space() => {
                    tracing::warn!("group {group}: checkpoint abandoned: {error}");
                    g.checkpoint_stepping = false;
                    self.stats.checkpoints_abandoned += 1;
                    continue;
                }
                Err(error) => return Err(error.to_string()),
            };
            g.checkpoint_stepping = false;
            if durable > durable_before {
                self.stats.checkpoints += 1;
            }
            // A snapshot streaming to a follower is of no use once the log right after it is
            // gone (the stream is abandoned then, and a new one starts): while one streams,
            // the log from its index on stays. Without this, a follower whose snapshot takes
            // longer to stream than the leader takes to write `retain` entries never caught
            // up. (`live_segments_max` still bounds the WAL; see compact_oldest_segments.)
            let streaming = g.outgoing.values().map(|stream| stream.serving.index).min();
            let mut through = durable.saturating_sub(retain);
            if let Some(slowest) = self.slowest_follower_match(group) {
                let floor = durable.saturating_sub(retain.max(retain_for_followers));
                through = through.min(slowest.max(floor));
            }
            if let Some(index) = streaming {
                through = through.min(index);
            }
            compact_within_log(&mut self.wal.borrow_mut(), group, through)?;
        }
        self.compact_oldest_segments()?;
        Ok(true)
    }

    /// One bounded step of state machine upkeep ([`StateMachine::maintain`]: the KV store
    /// reclaims the space of overwritten values) for the group at `*cursor`, or the next one
    /// with something to do; `*cursor` moves on once a group has nothing left. At most one
    /// step of `budget_bytes` per call, so a runner can call it on every loop.
    pub async fn maintain_some(&mut self, cursor: &mut u64, budget_bytes: u64) -> Result<(), String> {
        let next = |from: u64| {
            self.groups
                .range(from..)
                .next()
                .or_else(|| self.groups.iter().next())
        };
        let Some((&group, _)) = next(*cursor) else {
            return Ok(());
        };
        let g = self.groups.get_mut(&group).unwrap();
        let done =
            g.sm.maintain(budget_bytes)
                .await
                .map_err(|e| format!("group {group}: state machine upkeep: {e}"))?;
        *cursor = if done == 0 { group + 1 } else { group };
        Ok(())
    }

    /// Segments are purged oldest first, once every group with entries in one has compacted
    /// past them. A group that writes little (idle, or one this node left) would keep its
    /// retained entries, and with them every later segment, forever. Past
    /// `live_segments_max` live segments, the groups holding the oldest ones are compacted
    /// through them, as far as their state machines are durable (never further).
    fn compact_oldest_segments(&mut self) -> Result<(), String> {
        let mut wal = self.wal.borrow_mut();
        let live = wal.stats().segments_live;
        if live <= self.config.live_segments_max {
            return Ok(());
        }
        for (group, index) in wal.pinning_groups_of(live - self.config.live_segments_max) {
            let Some(g) = self.groups.get(&group) else {
                continue;
            };
            // As in a checkpoint: not past a membership change whose record is not durable.
            if !wal.meta_durable(group) {
                continue;
            }
            compact_within_log(&mut wal, group, index.min(g.sm.durable_index()))?;
        }
        Ok(())
    }

    /// Delivers a message from a peer. Bad or stale messages are dropped (raft tolerates loss).
    /// A `MsgSnapshot` is taken only once its data is staged here and its metadata durable (see
    /// `snapshot.rs`); otherwise the leader sends it again after its next probe.
    pub fn step(&mut self, envelope: Envelope) {
        if envelope.message.to != self.config.node {
            return;
        }
        if envelope.group == BEAT_GROUP {
            self.step_beat(&envelope.message);
            return;
        }
        let Some(g) = self.groups.get_mut(&envelope.group) else {
            return;
        };
        // Heartbeats and their responses are the idle traffic quiescence ends; anything else
        // (appends, votes, transfers) is activity. A node removed from the group that missed
        // its removal keeps campaigning: its messages must not keep the members awake (with
        // pre-vote and check-quorum raft ignores them anyway).
        let idle_traffic = matches!(
            envelope.message.msg_type,
            MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse
        );
        let from = envelope.message.from;
        let member = g.raw.raft.prs().get(from).is_some();
        if !idle_traffic && member {
            g.wake();
        }
        // A non-member asking for votes was removed while away: tell it with the next beat,
        // if this node knows the group's leader (so its membership is not just its own guess).
        if !member
            && matches!(
                envelope.message.msg_type,
                MessageType::MsgRequestPreVote | MessageType::MsgRequestVote
            )
            && g.raw.raft.leader_id != raft::INVALID_ID
            && self.config.peers.contains(&from)
        {
            self.removal_notices
                .entry(from)
                .or_default()
                .insert(envelope.group);
        }
        if envelope.message.msg_type == MessageType::MsgAppend
            && g.apply_stall.is_some()
            && self.wal.borrow().cache_over_budget()
        {
            // See `ApplyStall`: as if lost; the leader sends them again.
            self.active.insert(envelope.group);
            return;
        }
        if envelope.message.msg_type != MessageType::MsgSnapshot {
            let _ = g.raw.step(envelope.message);
            if g.asleep && g.raw.has_ready() {
                let raft = &g.raw.raft;
                if raft.state != StateRole::Follower || raft.raft_log.committed > g.applied {
                    // The heartbeat moved the commit index (or raft changed role): work to do.
                    g.wake();
                }
                // Otherwise only a heartbeat response to send (its leader is awake for a while,
                // for another follower or to quiesce): the loop sends it, the group stays asleep.
            }
            self.active.insert(envelope.group);
            return;
        }
        self.active.insert(envelope.group);
        let metadata = envelope.message.get_snapshot().get_metadata();
        let staged = g.incoming.as_ref().is_some_and(|inc| {
            inc.complete && inc.complete_acked && inc.index == metadata.index && inc.term == metadata.term
        });
        if !staged {
            return;
        }
        let _ = g.raw.step(envelope.message);
        if g.raw.raft.raft_log.unstable_snapshot().is_none() {
            // Declined (stale: the log already reached it, or this node leads): drop the staging.
            g.incoming = None;
            g.sm.restore_abort();
        }
    }

    /// Delivers a snapshot piece from a peer (see `snapshot.rs`).
    pub async fn step_piece(&mut self, piece: SnapshotPiece) {
        if piece.to != self.config.node || self.failure.is_some() {
            return;
        }
        let ticks = self.ticks;
        let Some(g) = self.groups.get_mut(&piece.group) else {
            return;
        };
        g.wake();
        self.active.insert(piece.group);
        let reply = |next: u64, complete: bool| SnapshotPiece {
            group: piece.group,
            from: piece.to,
            to: piece.from,
            index: piece.index,
            term: piece.term,
            stream: piece.stream,
            kind: PieceKind::Ack { next, complete },
        };
        match piece.kind {
            PieceKind::Ack { next, complete } => {
                let Some(stream) = g.outgoing.get_mut(&piece.from) else {
                    return;
                };
                let serving = &stream.serving;
                if (serving.index, serving.term, serving.stream) != (piece.index, piece.term, piece.stream) {
                    return;
                }
                if complete {
                    // Everything is staged and durable there: raft's message completes it.
                    let stream = g.outgoing.remove(&piece.from).unwrap();
                    self.messages.push(Envelope {
                        group: piece.group,
                        message: stream.message,
                    });
                    g.raw.report_snapshot(piece.from, SnapshotStatus::Finish);
                    self.stats.snapshots_sent += 1;
                } else if next > stream.acked {
                    stream.acked = next;
                    stream.last_progress_tick = ticks;
                    stream.retries = 0;
                    stream.drops = 0;
                } else if next < stream.acked {
                    // The follower lost its staging (it restarted): start over from there.
                    stream.acked = next;
                    stream.next = next;
                    stream.done_sent = false;
                }
            }
            PieceKind::Chunk { number, data } => {
                let same = g.incoming.as_ref().is_some_and(|inc| {
                    (inc.index, inc.term, inc.stream, inc.from)
                        == (piece.index, piece.term, piece.stream, piece.from)
                });
                if !same && g.raw.raft.raft_log.unstable_snapshot().is_some() {
                    // Raft accepted the staged snapshot; it is installed this loop. A newer
                    // stream must not replace the staging before that.
                    return;
                }
                if !same {
                    if number != 0 {
                        // Part of a stream this node has no start of: ask for the start.
                        self.pieces.push(reply(0, false));
                        return;
                    }
                    if g.incoming.take().is_some() {
                        g.sm.restore_abort();
                    }
                    g.incoming = Some(Incoming {
                        index: piece.index,
                        term: piece.term,
                        stream: piece.stream,
                        from: piece.from,
                        next: 0,
                        complete: false,
                        complete_acked: false,
                        last_tick: ticks,
                        space_refusals: 0,
                        ack_again_at: None,
                    });
                }
                let inc = g.incoming.as_mut().unwrap();
                inc.last_tick = ticks;
                if inc.complete {
                    if inc.complete_acked {
                        self.pieces.push(reply(inc.next, true));
                    }
                    return;
                }
                if number == inc.next {
                    match g.sm.restore_chunk(&data).await {
                        Ok(()) => inc.next += 1,
                        // No disk space to stage it: the staging stays, and the leader resends
                        // the chunk when it sees no progress.
                        Err(error) if error.is_out_of_space() => {
                            self.stats.restore_stalls += 1;
                            if let Some(refusals) = inc.refused_for_space() {
                                tracing::warn!(
                                    "group {}: snapshot chunk {number} from node {} waits for disk space ({refusals} refusals): {error}",
                                    piece.group,
                                    piece.from
                                );
                            }
                        }
                        Err(error) => {
                            // A chunk that does not verify: drop the staging; the leader's
                            // stream restarts from chunk 0 when it hears so.
                            tracing::warn!(
                                "group {}: snapshot chunk {number} from node {}: {error}",
                                piece.group,
                                piece.from
                            );
                            g.incoming = None;
                            g.sm.restore_abort();
                            self.pieces.push(reply(0, false));
                            return;
                        }
                    }
                }
                self.pieces.push(reply(inc.next, false));
            }
            PieceKind::Done { chunks, meta } => {
                let Some(inc) = g.incoming.as_mut().filter(|inc| {
                    (inc.index, inc.term, inc.stream, inc.from)
                        == (piece.index, piece.term, piece.stream, piece.from)
                }) else {
                    self.pieces.push(reply(0, false));
                    return;
                };
                if inc.complete || inc.next != chunks {
                    self.pieces
                        .push(reply(inc.next, inc.complete && inc.complete_acked));
                    return;
                }
                let valid = GroupMeta::decode(&meta)
                    .ok()
                    .filter(|m| m.snapshot_term == piece.term && m.snapshot_term != 0);
                if valid.is_none() {
                    tracing::warn!(
                        "group {}: snapshot metadata from node {} does not verify",
                        piece.group,
                        piece.from
                    );
                    return;
                }
                // Whatever the switch needs disk space for happens now, before raft hears of
                // the snapshot (the switch itself must not fail). Out of space: the staging
                // stays, and the leader sends its end again when it sees no progress.
                match g.sm.restore_prepare().await {
                    Ok(()) => {}
                    Err(error) if error.is_out_of_space() => {
                        self.stats.restore_stalls += 1;
                        if let Some(refusals) = inc.refused_for_space() {
                            tracing::warn!(
                                "group {}: snapshot install waits for disk space ({refusals} refusals): {error}",
                                piece.group
                            );
                        }
                        return;
                    }
                    Err(error) => {
                        self.fail(format!("group {}: snapshot install: {error}", piece.group));
                        return;
                    }
                }
                // Durable before the state machine may switch (the acknowledgement waits for it
                // in `pump_snapshots`): a restart after the switch finds the term here.
                let written = self.wal.borrow_mut().set_meta(piece.group, piece.index, &meta);
                if let Err(error) = written {
                    self.fail(format!("wal: {error}"));
                    return;
                }
                inc.complete = true;
            }
        }
    }

    /// Snapshot streams' work for this loop: on a leader, take snapshots raft asked for and
    /// send up to the window of chunks per stream; on a follower, acknowledge completed
    /// receptions once their metadata is durable. Resends and abandonments happen in `tick`.
    pub async fn pump_snapshots(&mut self) {
        if self.failure.is_some() {
            return;
        }
        let node = self.config.node;
        let window = self.config.snapshot_chunks_in_flight.max(1);
        let groups = self.active_ids();
        for group in groups {
            let meta_durable = self.wal.borrow().meta_durable(group);
            let g = self.groups.get_mut(&group).unwrap();
            if let Some(inc) = g.incoming.as_mut() {
                if inc.ack_again_at.is_some_and(|at| self.ticks >= at) {
                    inc.ack_again_at = None;
                    self.pieces
                        .push(inc.ack(group, node, inc.complete && inc.complete_acked));
                }
                if inc.complete && !inc.complete_acked && meta_durable {
                    inc.complete_acked = true;
                    self.pieces.push(inc.ack(group, node, true));
                }
            }
            if g.raw.raft.state != StateRole::Leader {
                g.outgoing.clear();
                // A snapshot prepared in an earlier term must not be offered again without its
                // data (a later leadership would send raft's message for it and fail forever).
                g.let_go_of_snapshot();
                continue;
            }
            if std::mem::take(&mut g.snap.borrow_mut().wanted) {
                if let Err(cause) = self.prepare_snapshot(group) {
                    self.fail(cause);
                    return;
                }
            }
            let g = self.groups.get_mut(&group).unwrap();
            let mut failed = Vec::new();
            for (&to, stream) in g.outgoing.iter_mut() {
                if self.ticks < stream.held_until {
                    continue;
                }
                // One chunk per stream per loop: producing a chunk reads and encodes up to a
                // chunk's worth of values, and the shard's other groups wait meanwhile.
                // A machine that produces chunks as jobs (the KV store) reads beside the loop
                // instead: one job out per stream, handed to the runner.
                let mut produced = 0;
                while produced < 1
                    && stream.producing.is_none()
                    && stream.next < stream.acked + window
                    && stream.chunks.is_none_or(|chunks| stream.next < chunks)
                {
                    produced += 1;
                    let result = match g.sm.snapshot_chunk_job(&stream.serving.snapshot, stream.next) {
                        Ok(ChunkStart::Job(job)) => {
                            stream.producing = Some(stream.next);
                            self.chunk_jobs.push(SnapshotChunkJob {
                                group,
                                to,
                                stream: stream.serving.stream,
                                number: stream.next,
                                job,
                            });
                            continue;
                        }
                        Ok(ChunkStart::End) => Ok(None),
                        Ok(ChunkStart::Inline) => {
                            g.sm.snapshot_chunk(&stream.serving.snapshot, stream.next).await
                        }
                        Err(error) => Err(error),
                    };
                    match result {
                        Ok(Some(data)) => self.pieces.push(stream.send_chunk(group, node, to, data)),
                        Ok(None) => stream.chunks = Some(stream.next),
                        Err(error) => {
                            tracing::warn!("group {group}: snapshot for node {to}: {error}");
                            failed.push(to);
                            break;
                        }
                    }
                }
                if let Some(chunks) = stream.chunks {
                    if stream.acked >= chunks && !stream.done_sent {
                        stream.done_sent = true;
                        let kind = PieceKind::Done {
                            chunks,
                            meta: stream.serving.meta.clone(),
                        };
                        self.pieces.push(stream.serving.piece(group, node, to, kind));
                    }
                }
            }
            for to in failed {
                g.outgoing.remove(&to);
                g.raw.report_snapshot(to, SnapshotStatus::Failure);
            }
        }
        // The loop's passes are done: keep only groups with work left for the next one.
        let groups = &self.groups;
        let wal = self.wal.borrow();
        self.active
            .retain(|group| groups[group].has_work() || !wal.meta_durable(*group));
    }

    /// A snapshot piece that the transport could not take (no connection, or its queue to the
    /// peer full), as [`SnapshotPiece::without_data`] kept it. A leader's stream goes back to
    /// the chunk (or sends its end again) instead of waiting out the resend timer (an election
    /// timeout, during which the follower would only see a gap), after a pause: one tick after
    /// the first drop, doubling with each drop in a row up to the resend timer, so a peer that
    /// is gone costs a chunk production per pause, not per loop. A follower sends its latest
    /// acknowledgement again at the next tick (a lost one would hold the leader's window).
    pub fn piece_not_sent(&mut self, piece: SnapshotPiece) {
        let (ticks, retry_after) = (self.ticks, self.config.election_ticks as u64);
        let Some(g) = self.groups.get_mut(&piece.group) else {
            return;
        };
        if let PieceKind::Ack { .. } = piece.kind {
            let same = |inc: &&mut Incoming| {
                (inc.index, inc.term, inc.stream, inc.from)
                    == (piece.index, piece.term, piece.stream, piece.to)
            };
            if let Some(inc) = g.incoming.as_mut().filter(same) {
                inc.ack_again_at = Some(ticks + 1);
                self.stats.snapshot_pieces_unsent += 1;
                self.active.insert(piece.group);
            }
            return;
        }
        let Some(stream) = g.outgoing.get_mut(&piece.to) else {
            return;
        };
        let serving = &stream.serving;
        if (serving.index, serving.term, serving.stream) != (piece.index, piece.term, piece.stream) {
            return;
        }
        match piece.kind {
            PieceKind::Chunk { number, .. } => stream.next = stream.next.min(number),
            PieceKind::Done { .. } => stream.done_sent = false,
            PieceKind::Ack { .. } => unreachable!("handled above"),
        }
        stream.drops = stream.drops.saturating_add(1);
        let pause = 1u64.checked_shl(stream.drops - 1).unwrap_or(u64::MAX);
        stream.held_until = ticks + pause.min(retry_after.max(1));
        self.stats.snapshot_pieces_unsent += 1;
        self.active.insert(piece.group);
    }

    /// Takes a snapshot of `group`'s state machine for raft to send (its storage returns it at
    /// raft's next try).
    fn prepare_snapshot(&mut self, group: u64) -> Result<(), String> {
        let g = self.groups.get_mut(&group).unwrap();
        let index = g.sm.applied_index();
        let wal = self.wal.borrow();
        let Ok(term) = wal.term(group, index) else {
            // Not at a log position this node can name; raft asks again later.
            return Ok(());
        };
        if index == 0 {
            return Ok(());
        }
        let conf_state = match wal.meta_at(group, index) {
            Some((at, bytes)) => {
                GroupMeta::decode(&bytes)
                    .map_err(|e| format!("group {group}: WAL metadata at index {at}: {e}"))?
                    .conf_state
            }
            None => ConfState {
                voters: self.config.voters.clone(),
                ..Default::default()
            },
        };
        drop(wal);
        let snapshot =
            g.sm.snapshot()
                .map_err(|e| format!("group {group}: snapshot: {e}"))?;
        let meta = GroupMeta {
            conf_state: conf_state.clone(),
            snapshot_term: term,
        };
        // Unique per node: no other stream of this node has this leadership term and counter.
        let stream = (g.raw.raft.term << 24) | (self.next_stream & 0xFF_FFFF);
        self.next_stream += 1;
        g.serving = Some(Rc::new(Serving {
            index,
            term,
            stream,
            meta: Bytes::from(meta.encode()),
            snapshot,
            taken_tick: self.ticks,
        }));
        let mut raft_snapshot = Snapshot::default();
        let metadata = raft_snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(conf_state);
        g.snap.borrow_mut().ready = Some(raft_snapshot);
        Ok(())
    }

    /// Snapshot pieces to send since the last call.
    pub fn take_pieces(&mut self) -> Vec<SnapshotPiece> {
        std::mem::take(&mut self.pieces)
    }

    /// Hands leadership of every group this node leads to its most up-to-date follower (raft's
    /// leader transfer: the follower campaigns at once, without waiting for an election
    /// timeout), so a planned stop costs clients no timeout. Returns how many groups are not
    /// handed over yet: still led by this node (a group without followers is not counted), or
    /// given up but without a known new leader. This node steps down when the transferee's
    /// vote request arrives, before the transferee has won; counting such a group until the new
    /// leader's first message names it means that once this returns 0, every handed-over group
    /// has a leader (which a stopping node's clients can be sent to).
    pub fn transfer_leadership(&mut self) -> usize {
        let mut pending = 0;
        for g in self.groups.values_mut() {
            if g.raw.raft.state != StateRole::Leader {
                if g.handed_over && g.raw.raft.leader_id == raft::INVALID_ID {
                    g.wake();
                    self.active.insert(g.id);
                    pending += 1;
                } else {
                    g.handed_over = false;
                }
                continue;
            }
            let Some(to) = best_follower(&g.raw.raft) else {
                continue;
            };
            g.wake();
            self.active.insert(g.id);
            pending += 1;
            g.handed_over = true;
            if g.raw.raft.lead_transferee.is_none() {
                g.raw.transfer_leader(to);
            }
        }
        pending
    }

    /// Starts handing leadership of `group` to node `to` (or, with `None`, to the most
    /// up-to-date follower). `Ok(true)`: started (the caller waits for [`ShardCore::is_leader`]
    /// to turn false); `Ok(false)`: nothing to do (`to` is this node, which leads). A follower
    /// answers `NotLeader`, so a client asks the leader.
    pub fn transfer_group(&mut self, group: u64, to: Option<u64>) -> Result<bool, EngineError> {
        self.active.insert(group);
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(EngineError::UnknownGroup(group))?;
        if g.raw.raft.state != StateRole::Leader {
            return Err(EngineError::NotLeader {
                leader: known_leader(g.raw.raft.leader_id),
            });
        }
        let me = g.raw.raft.id;
        let to = match to {
            Some(to) if to == me => return Ok(false),
            Some(to) if is_voter(&g.raw.raft, to) => to,
            Some(to) => {
                return Err(EngineError::BadRequest(format!(
                    "node {to} is not a voter of group {group}"
                )))
            }
            None => best_follower(&g.raw.raft)
                .ok_or_else(|| EngineError::BadRequest(format!("group {group} has no other member")))?,
        };
        g.wake();
        if g.raw.raft.lead_transferee != Some(to) {
            g.raw.transfer_leader(to);
        }
        Ok(true)
    }

    /// On the group's leader, the lowest index every follower has acknowledged (what the
    /// slowest one still needs starts after it); `None` elsewhere or without followers.
    pub fn slowest_follower_match(&self, group: u64) -> Option<u64> {
        let raft = &self.groups.get(&group)?.raw.raft;
        if raft.state != StateRole::Leader {
            return None;
        }
        raft.prs()
            .iter()
            .filter(|(id, _)| **id != raft.id)
            .map(|(_, p)| p.matched)
            .min()
    }

    /// One step of leader balancing: if this node leads more of the shard's groups than its
    /// share (`ceil(groups / voters)`), hands one of them to the member leading the fewest, if
    /// that member is caught up on it and stays within its share. Returns the transfer started.
    /// Every node runs this on its own view (each knows every group's leader); transfers move
    /// leadership only towards the share, so it converges and never ping-pongs.
    pub fn balance_leaders(&mut self) -> Option<(u64, u64)> {
        // The nodes voting in any of the shard's groups (memberships change over time).
        let voters: BTreeSet<u64> = self
            .groups
            .values()
            .flat_map(|g| g.conf_state.voters.iter().copied())
            .collect();
        let me = self.config.node;
        let share = self.groups.len().div_ceil(voters.len().max(1));
        let mut led: BTreeMap<u64, usize> = voters.iter().map(|&v| (v, 0)).collect();
        for g in self.groups.values() {
            if let Some(leader) = known_leader(g.raw.raft.leader_id).filter(|l| voters.contains(l)) {
                *led.entry(leader).or_default() += 1;
            }
        }
        if led.get(&me).copied().unwrap_or(0) <= share {
            return None;
        }
        let (&to, &count) = led.iter().filter(|(&v, _)| v != me).min_by_key(|(_, &c)| c)?;
        if count + 1 > share {
            return None;
        }
        for (&group, g) in self.groups.iter_mut() {
            let raft = &g.raw.raft;
            if raft.state != StateRole::Leader || raft.lead_transferee.is_some() {
                continue;
            }
            let caught_up = is_voter(raft, to)
                && raft
                    .prs()
                    .get(to)
                    .is_some_and(|p| p.recent_active && p.matched == raft.raft_log.last_index());
            if caught_up {
                g.wake();
                self.active.insert(group);
                g.raw.transfer_leader(to);
                return Some((group, to));
            }
        }
        None
    }

    /// The transport could not deliver a message of `group` to node `to` (no connection, or its
    /// queue was full): raft-rs stops pipelining to it and probes instead.
    pub fn report_unreachable(&mut self, group: u64, to: u64) {
        if self.groups.contains_key(&group) {
            self.active.insert(group);
        }
        if let Some(g) = self.groups.get_mut(&group) {
            g.raw.report_unreachable(to);
        }
    }

    /// Advances every group's logical clock by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        // A WAL out of space for its next segment stalls once the current one is full: a leader
        // here could then persist nothing, so it could apply nothing, and its clients would only
        // time out while its followers commit without it. Hand its groups to followers while
        // that lasts (raft's transfer, started again each tick until it takes).
        if self.wal.borrow().prepare_error().is_some() {
            self.transfer_leadership();
        }
        let retry_after = self.config.election_ticks as u64;
        let ticks = self.ticks;
        let election = self.config.election_ticks as u64;
        let quiesce_after = self.config.quiesce_after_ticks;
        // A quiesced follower wakes when its leader's node has been silent (no beat) for an
        // election timeout: the group then elects a new leader as usual.
        let silent: Vec<u64> = self
            .config
            .peers
            .iter()
            .copied()
            .filter(|p| ticks.saturating_sub(self.last_heard.get(p).copied().unwrap_or(0)) > election)
            .collect();
        if !silent.is_empty() && self.awake.borrow().len() < self.groups.len() {
            for g in self.groups.values_mut() {
                let raft = &g.raw.raft;
                if g.asleep && raft.state != StateRole::Leader && silent.contains(&raft.leader_id) {
                    g.wake();
                }
            }
        }
        for group in self.awake_ids() {
            let g = self.groups.get_mut(&group).unwrap();
            if let Some(stall) = g.apply_stall.as_mut() {
                // Offered again this loop. A leader stalled this long hands its groups over
                // (see `ApplyStall`).
                stall.waiting = false;
                self.active.insert(group);
                let raft = &g.raw.raft;
                if raft.state == StateRole::Leader
                    && ticks >= stall.handoff_at
                    && raft.lead_transferee.is_none()
                {
                    stall.handoff_at = ticks + STALL_HANDOFF_EVERY * election;
                    if let Some(to) = best_follower(raft) {
                        tracing::warn!(
                            "group {group}: handing leadership to node {to} while apply waits for disk space"
                        );
                        g.raw.transfer_leader(to);
                    }
                }
            }
            // A node that is no member of the group (removed, or never added: a node beyond
            // the group's replicas) has nothing to tick for, as raft never lets it campaign:
            // with quiescence on, it sleeps once nothing is under way. A member's message or a
            // snapshot piece wakes it, so a node added later catches up as before.
            if quiesce_after > 0 && g.raw.raft.prs().get(g.raw.raft.id).is_none() && g.rest_outside() {
                continue;
            }
            // Judged before the tick (whose heartbeats would count as activity).
            let idle = quiesce_after > 0 && g.leader_idle();
            // A transfer (and its abort) only happen between ticks: seeing it before and after
            // each tick blocks lease reads across it.
            if g.raw.raft.lead_transferee.is_some() {
                g.lease.blocked_until = ticks + 2 * election;
            }
            let ready = g.raw.tick();
            if g.raw.raft.lead_transferee.is_some() {
                g.lease.blocked_until = ticks + 2 * election;
            }
            // Proposals past the end of the log: it was cut back under them (a newer leader's
            // entries replaced this node's), and apply only answers them once the log reaches
            // their index again, which an idle group never does. The outcome is unknown: a
            // node that kept the entry might still see it committed.
            let last = g.raw.raft.raft_log.last_index();
            while g.proposals.back().is_some_and(|p| p.index > last) {
                let proposal = g.proposals.pop_back().unwrap();
                for (request, _) in proposal.parts {
                    self.answers.push(Answer {
                        request,
                        result: Err(EngineError::UnknownOutcome),
                    });
                }
            }
            let ack_due = g.incoming.as_ref().is_some_and(|inc| inc.ack_again_at.is_some());
            if ready || !g.outgoing.is_empty() || !g.reads_inflight.is_empty() || ack_due {
                self.active.insert(group);
            }
            // A stream whose follower raft no longer waits on for a snapshot (it caught up from
            // the log, or left the group) is dropped.
            let raft = &g.raw.raft;
            g.outgoing.retain(|to, _| {
                raft.state == StateRole::Leader
                    && raft
                        .prs()
                        .get(*to)
                        .is_some_and(|p| p.state == raft::ProgressState::Snapshot)
            });
            // Snapshot streams without progress for an election timeout resend from the last
            // acknowledged chunk (the connection may have dropped); after enough rounds raft is
            // told the snapshot failed, and asks for one again later.
            let mut abandoned = Vec::new();
            // A stream whose snapshot the log has since been compacted past is abandoned at
            // once: installed, it would leave the follower short of the leader's first entry,
            // needing another snapshot anyway. raft then asks for a new one.
            let first = self.wal.borrow().first_index(group);
            for (&to, stream) in g.outgoing.iter_mut() {
                if stream.serving.index + 1 < first && !stream.done_sent {
                    abandoned.push(to);
                    continue;
                }
                // The wait for an acknowledgement starts when the chunk went out, not while
                // this node is still producing it (reading a chunk's values on a slow disk).
                if stream.producing.is_some() || ticks - stream.last_progress_tick < retry_after {
                    continue;
                }
                stream.retries += 1;
                stream.last_progress_tick = ticks;
                if stream.retries > STREAM_RETRIES_MAX {
                    abandoned.push(to);
                } else {
                    stream.next = stream.acked;
                    stream.done_sent = false;
                    self.stats.snapshot_resends += 1;
                }
            }
            for to in abandoned {
                g.outgoing.remove(&to);
                g.raw.report_snapshot(to, SnapshotStatus::Failure);
            }
            // A snapshot no stream sends any more is let go (raft asks for a new one next
            // time): an open snapshot keeps the old slot of every key changed since, and its
            // data files, in the state machine. Not at once: raft asks for the one just taken
            // at its next try.
            let unused = g.outgoing.is_empty()
                && g.serving
                    .as_ref()
                    .is_some_and(|s| ticks.saturating_sub(s.taken_tick) > 2 * election);
            if unused {
                g.let_go_of_snapshot();
            }
            // A staged snapshot that stopped coming (its leader gave up or lost leadership), or
            // that the log overtook, is dropped.
            let installing = g.raw.raft.raft_log.unstable_snapshot().is_some();
            let stale_staging = !installing
                && g.incoming.as_ref().is_some_and(|inc| {
                    ticks.saturating_sub(inc.last_tick) > 4 * election
                        || (!inc.complete && g.raw.raft.raft_log.committed >= inc.index)
                });
            if stale_staging {
                g.incoming = None;
                g.sm.restore_abort();
            }
            // ReadIndex is silently dropped until the leader has committed an entry in its
            // term: re-send requests that got no answer.
            let stale: Vec<u64> = g
                .reads_inflight
                .iter()
                .filter(|(_, (_, at))| self.ticks - at >= retry_after)
                .map(|(&ctx, _)| ctx)
                .collect();
            for ctx in stale {
                let (reads, _) = g.reads_inflight.remove(&ctx).unwrap();
                g.reads_unsent.extend(reads);
            }
            if idle {
                g.idle_ticks += 1;
            } else {
                g.idle_ticks = 0;
                g.quiesce_acks = None;
            }
        }
        if ticks % (self.config.heartbeat_ticks.max(1) as u64) == 0 {
            self.send_beats();
        }
    }

    /// One beat to each peer node: idle groups this node leads (quiesce requests to their
    /// members) and acknowledgements of groups quiesced here. See `beat.rs`.
    fn send_beats(&mut self) {
        let quiesce_after = self.config.quiesce_after_ticks;
        let mut beats: BTreeMap<u64, Beat> =
            self.config.peers.iter().map(|&p| (p, Beat::default())).collect();
        for group in self.awake_ids() {
            let g = self.groups.get_mut(&group).unwrap();
            if std::mem::take(&mut g.woke_unreported) {
                let raft = &g.raw.raft;
                if let Some(beat) = beats.get_mut(&raft.leader_id) {
                    beat.woke.push((group, raft.term));
                }
            }
            if quiesce_after == 0 || g.asleep || g.idle_ticks < quiesce_after {
                continue;
            }
            let raft = &g.raw.raft;
            let (term, index) = (raft.term, raft.raft_log.last_index());
            let acks = g
                .quiesce_acks
                .get_or_insert_with(|| (term, index, Default::default()));
            if (acks.0, acks.1) != (term, index) {
                *acks = (term, index, Default::default());
            }
            for (&member, _) in raft.prs().iter() {
                if member != raft.id && !acks.2.contains(&member) {
                    beats
                        .entry(member)
                        .or_default()
                        .quiesce
                        .push((group, term, index));
                }
            }
        }
        for (leader, acks) in std::mem::take(&mut self.beat_acks) {
            beats.entry(leader).or_default().quiesced.extend(acks);
        }
        for (peer, groups) in std::mem::take(&mut self.removal_notices) {
            for group in groups {
                let Some(g) = self.groups.get(&group) else {
                    continue;
                };
                let raft = &g.raw.raft;
                if raft.leader_id != raft::INVALID_ID && raft.prs().get(peer).is_none() {
                    beats.entry(peer).or_default().removed.push((group, raft.term));
                }
            }
        }
        for (to, beat) in beats {
            self.messages.push(Envelope {
                group: BEAT_GROUP,
                message: beat.to_message(self.config.node, to),
            });
        }
    }

    /// A peer's beat: it is alive; quiesce what it asks (if this node has exactly that state);
    /// count its acknowledgements of this node's requests.
    fn step_beat(&mut self, message: &Message) {
        let from = message.from;
        self.last_heard.insert(from, self.ticks);
        let beat = match Beat::decode(&message.context) {
            Ok(beat) => beat,
            Err(error) => {
                tracing::warn!("beat from node {from}: {error}");
                return;
            }
        };
        for (group, term, index) in beat.quiesce {
            let Some(g) = self.groups.get_mut(&group) else {
                continue;
            };
            let raft = &g.raw.raft;
            let same = raft.state == StateRole::Follower
                && raft.leader_id == from
                && raft.term == term
                && raft.raft_log.last_index() == index;
            if same && g.quiet() {
                g.sleep();
                self.beat_acks.entry(from).or_default().push((group, term));
            }
        }
        for (group, term) in beat.woke {
            if let Some(g) = self.groups.get_mut(&group) {
                if g.raw.raft.state == StateRole::Leader && g.raw.raft.term == term {
                    g.wake();
                }
            }
        }
        for (group, term) in beat.removed {
            let Some(g) = self.groups.get_mut(&group) else {
                continue;
            };
            if !g.asleep && g.rest_outside() {
                tracing::info!(
                    "group {group}: node {from} (term {term}) says this node is no longer a member; \
                     it stops campaigning until a member contacts it"
                );
                self.stats.campaigns_stopped += 1;
            }
        }
        for (group, term) in beat.quiesced {
            let Some(g) = self.groups.get_mut(&group) else {
                continue;
            };
            let Some(acks) = g.quiesce_acks.as_mut().filter(|a| a.0 == term) else {
                continue;
            };
            acks.2.insert(from);
            let raft = &g.raw.raft;
            let all = raft
                .prs()
                .iter()
                .all(|(&id, _)| id == raft.id || acks.2.contains(&id));
            if all && g.leader_idle() {
                g.sleep();
            }
        }
    }

    /// Groups whose state machine snapshot this node holds for sending.
    pub fn open_snapshots(&self) -> usize {
        self.groups.values().filter(|g| g.serving.is_some()).count()
    }

    /// Groups quiesced on this node (not ticked).
    pub fn asleep_groups(&self) -> usize {
        self.groups.values().filter(|g| g.asleep).count()
    }

    /// A one-line dump of a group's state (role, queues, indexes, progress, snapshot streams),
    /// for failure reports.
    pub fn debug_state(&self, group: u64) -> String {
        let g = &self.groups[&group];
        let raft = &g.raw.raft;
        let log = &raft.raft_log;
        format!(
            "state {:?} leader {} term {} asleep {} idle_ticks {} acks {:?} queue {} ru {} ri {} rr {} rl {} props {} committed {} out {} inc {} has_ready {} commit {} persisted {} last {} applied {} transferee {:?} pending_conf {} prs {:?}",
            raft.state, raft.leader_id, raft.term, g.asleep, g.idle_ticks, g.quiesce_acks,
            g.queue.len(), g.reads_unsent.len(), g.reads_inflight.len(), g.reads_ready.len(), g.reads_local.len(),
            g.proposals.len(), g.committed.len(), g.outgoing.len(), g.incoming.is_some(), g.raw.has_ready(),
            log.committed, log.persisted, log.last_index(), g.applied, raft.lead_transferee, raft.has_pending_conf(),
            raft.prs().iter().map(|(id, p)| (*id, p.matched)).collect::<Vec<_>>()
        ) + &format!(" snap wanted {} ready {:?} progress {:?}", g.snap.borrow().wanted, g.snap.borrow().ready.as_ref().map(|s| (s.get_metadata().index, s.get_metadata().term)), raft.prs().iter().map(|(id, p)| (*id, p.state, p.next_idx, p.pending_snapshot, p.recent_active, p.paused)).collect::<Vec<_>>())
          + &format!(" conf {:?} first {} incoming {:?} outgoing {:?} active {} ticks {}", g.conf_state, self.wal.borrow().first_index(group), g.incoming, g.outgoing.iter().map(|(to, s)| (*to, s.serving.index, s.serving.term, s.next, s.acked, s.chunks, s.done_sent, s.last_progress_tick, s.retries)).collect::<Vec<_>>(), self.active.contains(&group), self.ticks)
    }

    /// Whether `group` is quiesced on this node.
    pub fn is_asleep(&self, group: u64) -> bool {
        self.groups.get(&group).is_some_and(|g| g.asleep)
    }

    /// Turns each group's queued commands into one raft entry (one batch), and sends one
    /// ReadIndex request for the group's waiting linearizable reads.
    pub fn propose(&mut self) {
        for group in self.active_ids() {
            let g = self.groups.get_mut(&group).unwrap();
            if g.raw.raft.state != StateRole::Leader {
                // Leadership was lost with requests queued: they were never proposed.
                let leader = g.raw.raft.leader_id;
                for (request, _, _) in g.queue.drain(..) {
                    self.answers.push(Answer {
                        request,
                        result: Err(EngineError::NotLeader {
                            leader: known_leader(leader),
                        }),
                    });
                }
                for read in g.reads_unsent.drain(..) {
                    self.answers.push(Answer {
                        request: read.request,
                        result: Err(EngineError::NotLeader {
                            leader: known_leader(leader),
                        }),
                    });
                }
                g.queue_commands = 0;
                g.queue_bytes = 0;
                continue;
            }
            if g.apply_stall.is_some() && self.wal.borrow().cache_over_budget() {
                // See `ApplyStall`: requests wait in the bounded queue (then `Busy`).
                continue;
            }
            while !g.queue.is_empty() {
                let mut commands = Vec::with_capacity(g.queue_commands.min(self.config.entry_commands_max));
                let mut parts = Vec::new();
                let mut bytes = 64;
                while let Some((_, front, size)) = g.queue.front() {
                    let fits = commands.is_empty()
                        || (bytes + size <= self.config.entry_bytes_max
                            && commands.len() + front.len() <= self.config.entry_commands_max);
                    if !fits {
                        break;
                    }
                    let (request, front, size) = g.queue.pop_front().unwrap();
                    g.queue_commands -= front.len();
                    g.queue_bytes -= size;
                    bytes += size;
                    parts.push((request, front.len()));
                    commands.extend(front);
                }
                let count = commands.len();
                let data = encode_batch_vec(commands, bytes);
                let index = g.raw.raft.raft_log.last_index() + 1;
                let term = g.raw.raft.term;
                match g.raw.propose(Vec::new(), data) {
                    Ok(()) if g.raw.raft.raft_log.last_index() == index => {
                        self.stats.proposals += 1;
                        self.stats.commands_proposed += count as u64;
                        g.counters.proposals += 1;
                        g.counters.commands_proposed += count as u64;
                        // Cannot fail: the count is within the histogram's bounds (saturating).
                        let _ = self.commands_per_entry.record(count.max(1) as u64);
                        g.proposals.push_back(Proposal {
                            index,
                            term,
                            parts,
                            conf: false,
                            proposed_at_us: self.now_us,
                        });
                    }
                    outcome => {
                        // Dropped (uncommitted bytes over raft.max_uncommitted_bytes, or a
                        // leadership transfer): nothing entered the log.
                        let error = match outcome {
                            Err(raft::Error::ProposalDropped) => EngineError::Busy(
                                "the group's uncommitted log is full (raft.max_uncommitted_bytes)",
                            ),
                            _ => EngineError::NotLeader { leader: None },
                        };
                        for (request, _) in parts {
                            self.answers.push(Answer {
                                request,
                                result: Err(error.clone()),
                            });
                        }
                    }
                }
            }
            // Keep the lease fresh while lease reads come: a ReadIndex round without reads
            // once half of it has passed.
            let lease_ticks = self.config.lease_ticks;
            let renew = lease_ticks > 0
                && g.lease.wanted_at.is_some_and(|at| self.ticks < at + lease_ticks)
                && self.ticks + lease_ticks / 2 >= g.lease.until
                && self.ticks > g.lease.renewed_at;
            if renew && g.reads_unsent.is_empty() {
                g.lease.renewed_at = self.ticks;
                let ctx = self.next_read_context;
                self.next_read_context += 1;
                g.raw.read_index(ctx.to_le_bytes().to_vec());
                g.reads_inflight.insert(ctx, (Vec::new(), self.ticks));
            }
            if !g.reads_unsent.is_empty() {
                let ctx = self.next_read_context;
                self.next_read_context += 1;
                g.raw.read_index(ctx.to_le_bytes().to_vec());
                g.reads_inflight
                    .insert(ctx, (std::mem::take(&mut g.reads_unsent), self.ticks));
            }
        }
    }

    /// Collects every group's `Ready`: sends leader messages now, writes entries and hard
    /// states into the WAL's open batch, and queues committed entries for apply.
    pub async fn collect_ready(&mut self) {
        if self.failure.is_some() {
            return;
        }
        for group in self.active_ids() {
            if let Err(cause) = self.collect_group(group).await {
                self.fail(cause);
                return;
            }
        }
        // A Ready that wrote nothing new (a vote, a heartbeat response) waits for a ticket that
        // may already be durable: release it now rather than at the next write completion.
        self.on_durable();
    }

    async fn collect_group(&mut self, group: u64) -> Result<(), String> {
        let g = self.groups.get_mut(&group).unwrap();
        if !g.raw.has_ready() {
            return Ok(());
        }
        let mut ready = g.raw.ready();
        if let Some(ss) = ready.ss() {
            self.stats.leader_changes += 1;
            if known_leader(ss.leader_id) != g.last_leader {
                g.last_leader = known_leader(ss.leader_id);
                g.counters.leader_changes += 1;
            }
            if ss.raft_state != StateRole::Leader {
                g.lease = Lease::default();
                // Reads waiting for a ReadIndex from a former leader can no longer be confirmed.
                let leader = known_leader(ss.leader_id);
                for (_, (reads, _)) in std::mem::take(&mut g.reads_inflight) {
                    for read in reads {
                        self.answers.push(Answer {
                            request: read.request,
                            result: Err(EngineError::NotLeader { leader }),
                        });
                    }
                }
            }
        }
        for message in ready.take_messages() {
            if message.msg_type == MessageType::MsgSnapshot {
                // Held back until the follower has the data (see `snapshot.rs`).
                let serving = g.serving.clone().filter(|s| {
                    let metadata = message.get_snapshot().get_metadata();
                    (s.index, s.term) == (metadata.index, metadata.term)
                });
                match serving {
                    Some(serving) => {
                        g.outgoing.insert(
                            message.to,
                            Outgoing {
                                serving,
                                message,
                                next: 0,
                                acked: 0,
                                chunks: None,
                                done_sent: false,
                                last_progress_tick: self.ticks,
                                retries: 0,
                                producing: None,
                                drops: 0,
                                held_until: 0,
                            },
                        );
                    }
                    None => {
                        // Its data is gone (prepared before a leadership change): take a new one.
                        let mut slot = g.snap.borrow_mut();
                        slot.ready = None;
                        slot.wanted = true;
                        drop(slot);
                        self.active.insert(group);
                        g.raw.report_snapshot(message.to, SnapshotStatus::Failure);
                    }
                }
                continue;
            }
            self.messages.push(Envelope { group, message });
        }
        if !ready.snapshot().is_empty() {
            // Install: the state machine switches (durably) first, then the WAL's log restarts
            // after the snapshot. The metadata record written when the data was staged (durable
            // before raft saw the message) lets a restart in between finish the reset.
            let metadata = ready.snapshot().get_metadata().clone();
            // The switch abandons a stepwise checkpoint of the old state: the next one starts
            // afresh, after the membership check.
            g.checkpoint_stepping = false;
            let installed =
                g.sm.restore_finish()
                    .await
                    .map_err(|e| format!("group {group}: snapshot install: {e}"))?;
            if installed != metadata.index {
                return Err(format!(
                    "group {group}: the state machine restored index {installed}, raft's snapshot is at {}",
                    metadata.index
                ));
            }
            g.incoming = None;
            self.stats.snapshots_installed += 1;
            tracing::info!(
                "group {group}: installed a snapshot at index {} (term {})",
                metadata.index,
                metadata.term
            );
            g.conf_state = metadata.get_conf_state().clone();
            g.applied = metadata.index;
            g.committed.clear();
            let mut wal = self.wal.borrow_mut();
            wal.reset(group, metadata.index, metadata.term)
                .map_err(|e| e.to_string())?;
            wal.set_cache_floor(group, metadata.index + 1);
        }
        for state in ready.take_read_states() {
            let ctx = u64::from_le_bytes(state.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            if let Some((reads, issued)) = g.reads_inflight.remove(&ctx) {
                // A quorum acknowledged heartbeats sent after `issued`: none of them will vote
                // for another leader within an election timeout of receiving them.
                if g.raw.raft.state == StateRole::Leader {
                    g.lease.until = g.lease.until.max(issued + self.config.lease_ticks);
                }
                g.reads_ready.push_back((state.index, reads));
            }
        }
        let entries = ready.take_entries();
        let wrote_entries = !entries.is_empty();
        let mut wal = self.wal.borrow_mut();
        if wrote_entries {
            let records: Vec<ringraft_wal::Entry> = entries
                .into_iter()
                .map(|e| {
                    assert!(e.context.is_empty(), "entry context is not stored");
                    ringraft_wal::Entry {
                        index: e.index,
                        term: e.term,
                        entry_type: entry_type_code(e.entry_type),
                        payload: e.data,
                    }
                })
                .collect();
            g.counters.entries_appended += records.len() as u64;
            g.counters.bytes_appended += records.iter().map(|r| r.payload.len() as u64).sum::<u64>();
            wal.append(group, &records).map_err(|e| e.to_string())?;
        }
        if let Some(hs) = ready.hs() {
            let hard_state = ringraft_wal::HardState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit,
            };
            let current = wal.hard_state(group);
            if !wrote_entries && current.term == hs.term && current.vote == hs.vote {
                // Only the commit index moved: it need not be durable (raft relearns it), so it
                // rides along with the next write instead of costing a sync of its own.
                wal.set_commit_lazily(group, hard_state)
                    .map_err(|e| e.to_string())?;
            } else {
                wal.set_hard_state(group, hard_state).map_err(|e| e.to_string())?;
            }
        }
        let committed = ready.take_committed_entries();
        if let Some(last) = committed.last() {
            // Proposals committed by this Ready (each once: they are answered at apply).
            for proposal in g.proposals.iter().filter(|p| p.index <= last.index) {
                if proposal.index > g.commit_recorded {
                    let latency = self.now_us.saturating_sub(proposal.proposed_at_us).max(1);
                    let _ = self.commit_latency_us.record(latency);
                }
            }
            g.commit_recorded = g.commit_recorded.max(last.index);
        }
        g.committed.extend(committed);
        let messages = ready.take_persisted_messages();
        // Everything this Ready wrote is durable once the WAL's latest ticket is.
        let ticket = wal.last_ticket();
        drop(wal);
        self.persist_waiting.push_back(PersistWait {
            ticket,
            group,
            number: ready.number(),
            messages,
        });
        g.raw.advance_append_async(ready);
        Ok(())
    }

    /// Call after the WAL reported progress: every `Ready` whose writes are now durable is
    /// acknowledged to raft, and its persisted messages (votes, append responses) go out.
    pub fn on_durable(&mut self) {
        let durable = self.wal.borrow().durable_ticket();
        while self.persist_waiting.front().is_some_and(|w| w.ticket <= durable) {
            let wait = self.persist_waiting.pop_front().unwrap();
            let g = self.groups.get_mut(&wait.group).unwrap();
            g.raw.on_persist_ready(wait.number);
            self.active.insert(wait.group);
            for message in wait.messages {
                self.messages.push(Envelope {
                    group: wait.group,
                    message,
                });
            }
        }
        if let Some(cause) = self.wal.borrow().failure() {
            if self.failure.is_none() {
                self.failure = Some(format!("wal: {cause}"));
            }
        }
        if let Some(cause) = self.failure.clone() {
            self.fail(cause);
        }
    }

    /// Entries raft asked for that are not cached (a lagging follower's catch-up): the runner
    /// reads each plan off the shard's loop (async, beside raft and the WAL's writes) and
    /// reports each with [`ShardCore::fetched`], in any order.
    ///
    /// At most `log_reads_in_flight` reads are out at once; the rest wait here, one per group
    /// and first index (raft asks again for the same range at each append attempt to a
    /// lagging follower, and those requests join the waiting one). A read is planned when it
    /// leaves, so it skips whatever an earlier read cached meanwhile.
    pub fn take_fetches(&mut self) -> Vec<Fetch<D>> {
        for group in self.active_ids() {
            let g = &self.groups[&group];
            for request in g.fetches.borrow_mut().drain(..) {
                let key = (group, request.lo);
                if let Some(wait) = self.fetch_waiting.get_mut(&key) {
                    wait.hi = wait.hi.max(request.hi);
                    wait.max_bytes = wait.max_bytes.max(request.max_bytes);
                    if wait.contexts.len() < FETCH_CONTEXTS_MAX {
                        wait.contexts.push(request.context);
                    }
                    continue;
                }
                if self.fetch_waiting.len() >= FETCHES_WAITING_MAX {
                    continue;
                }
                self.fetch_waiting.insert(
                    key,
                    FetchWait {
                        hi: request.hi,
                        max_bytes: request.max_bytes,
                        contexts: vec![request.context],
                    },
                );
                self.fetch_order.push_back(key);
            }
        }
        let mut out = Vec::new();
        while self.fetches_out < self.config.log_reads_in_flight.max(1) {
            let Some(key) = self.fetch_order.pop_front() else {
                break;
            };
            let wait = self.fetch_waiting.remove(&key).expect("ordered reads wait");
            let (group, lo) = key;
            // Only a leader sends appends: a read for a group this node no longer leads (or
            // no longer holds) would be answered by raft with nothing.
            let leads = self
                .groups
                .get(&group)
                .is_some_and(|g| g.raw.raft.state == StateRole::Leader);
            if !leads {
                continue;
            }
            let plan = self
                .wal
                .borrow()
                .read_plan(group, lo, wait.hi, Some(wait.max_bytes))
                .ok();
            self.fetches_out += 1;
            self.stats.log_reads += 1;
            out.push(Fetch {
                group,
                plan,
                contexts: wait.contexts,
            });
        }
        out
    }

    /// The result of a [`Fetch`]: entries go back into the WAL cache (only those still in the
    /// log with the same term: the log may have changed while the read was out) and raft
    /// retries. A failed or impossible read (`None`) makes raft ask again later, or send a
    /// snapshot once the range is compacted.
    pub fn fetched(
        &mut self,
        group: u64,
        entries: Option<Vec<ringraft_wal::Entry>>,
        contexts: Vec<GetEntriesContext>,
    ) {
        self.fetches_out = self
            .fetches_out
            .checked_sub(1)
            .expect("a fetch reported that was not handed out");
        match entries {
            Some(entries) => self.wal.borrow_mut().insert_cached(group, &entries),
            None => self.stats.log_reads_failed += 1,
        }
        if let Some(g) = self.groups.get_mut(&group) {
            g.wake();
            self.active.insert(group);
            for context in contexts {
                g.raw.on_entries_fetched(context);
            }
        }
    }

    /// Log reads handed to the runner and not reported yet.
    pub fn fetches_out(&self) -> usize {
        self.fetches_out
    }

    /// Snapshot chunks to produce (reading a leader's state machine files for a follower that
    /// catches up by snapshot): the runner runs each job beside its loop, in any order, and
    /// reports it with [`ShardCore::chunk_produced`]. At most one per stream is out.
    pub fn take_chunk_jobs(&mut self) -> Vec<SnapshotChunkJob> {
        std::mem::take(&mut self.chunk_jobs)
    }

    /// The result of a [`SnapshotChunkJob`]. Dropped if its stream ended, or went back to an
    /// earlier chunk (a retry) while the job ran; a failed job ends its stream, and raft sends
    /// a snapshot again later.
    pub fn chunk_produced(
        &mut self,
        group: u64,
        to: u64,
        stream_id: u64,
        number: u64,
        result: Result<Vec<u8>, SmError>,
    ) {
        let node = self.config.node;
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let Some(stream) = g.outgoing.get_mut(&to) else {
            return;
        };

        if stream.serving.stream != stream_id || stream.producing != Some(number) {
            return;
        }
        stream.producing = None;
        let current = number == stream.next;
        g.wake();
        self.active.insert(group);
        if !current {
            return;
        }
        let stream = g.outgoing.get_mut(&to).expect("the stream is there");
        match result {
            Ok(data) => {
                self.pieces.push(stream.send_chunk(group, node, to, data));
                stream.last_progress_tick = self.ticks;
            }
            Err(error) => {
                tracing::warn!("group {group}: snapshot for node {to}: {error}");
                g.outgoing.remove(&to);
                g.raw.report_snapshot(to, SnapshotStatus::Failure);
            }
        }
    }

    /// Whether a later `collect_ready` may produce output (used by runners to decide to loop).
    pub fn has_ready(&self) -> bool {
        self.active
            .iter()
            .map(|group| &self.groups[group])
            .any(|g| g.raw.has_ready() || !g.committed.is_empty())
    }

    /// Bytes of commands queued, not yet proposed, over all groups.
    pub fn queued_bytes(&self) -> usize {
        self.active
            .iter()
            .map(|group| self.groups[group].queue_bytes)
            .sum()
    }

    /// The groups not asleep (ticked).
    fn awake_ids(&self) -> Vec<u64> {
        self.awake.borrow().iter().copied().collect()
    }

    /// The groups the per-loop passes visit.
    fn active_ids(&self) -> Vec<u64> {
        self.active.iter().copied().collect()
    }

    /// Whether any group has commands or linearizable reads waiting to be proposed.
    pub fn has_queued(&self) -> bool {
        self.active
            .iter()
            .map(|group| &self.groups[group])
            .any(|g| !g.queue.is_empty() || !g.reads_unsent.is_empty())
    }

    /// Applies committed entries and answers their proposers; serves reads whose index is
    /// applied.
    pub async fn apply(&mut self) {
        if self.failure.is_some() {
            return;
        }
        let groups = self.active_ids();
        for group in groups {
            if let Err(cause) = self.apply_group(group).await {
                self.fail(cause);
                return;
            }
        }
    }

    async fn apply_group(&mut self, group: u64) -> Result<(), String> {
        let g = self.groups.get_mut(&group).unwrap();
        let mut results = std::mem::take(&mut self.apply_results);
        let mut last_applied = None;
        let waiting = g.apply_stall.as_ref().is_some_and(|s| s.waiting);
        while let Some(entry) = g.committed.front().filter(|_| !waiting) {
            results.clear();
            // The state machine first: every index reaches it (an empty batch for a leader's
            // empty entry, a membership change or a batch that does not verify), so its applied
            // index is raft's and a snapshot taken at it carries the membership of that index.
            // Refused for disk space, it changed nothing: the entry stays first in line.
            let conf = entry.entry_type != EntryType::EntryNormal;
            let view = match conf || entry.data.is_empty() {
                true => None,
                false => Some(BatchView::new(&entry.data)),
            };
            let applied = match &view {
                Some(Ok(view)) => g.sm.apply(entry.index, view.batch(), &mut results).await,
                _ => {
                    let empty = BatchView::new(&self.empty_batch).expect("the empty batch is valid");
                    g.sm.apply(entry.index, empty.batch(), &mut Vec::new()).await
                }
            };
            // Deterministic on every replica: the entry is skipped, its proposer told.
            let mut bad_batch = match view {
                Some(Err(error)) => Some(error.to_string()),
                _ => None,
            };
            match applied {
                Ok(()) => {
                    if let Some(stall) = g.apply_stall.take() {
                        tracing::info!(
                            "group {group}: applying again after {} ticks without disk space ({} refusals)",
                            self.ticks - stall.since_tick,
                            stall.refusals
                        );
                    }
                }
                Err(error) if error.is_out_of_space() => {
                    self.stats.apply_stalls += 1;
                    let election = self.config.election_ticks as u64;
                    let stall = g.apply_stall.get_or_insert_with(|| {
                        tracing::warn!("group {group}: apply waits for disk space: {error}");
                        ApplyStall {
                            since_tick: self.ticks,
                            waiting: false,
                            handoff_at: self.ticks + election,
                            refusals: 0,
                        }
                    });
                    stall.waiting = true;
                    stall.refusals += 1;
                    break;
                }
                Err(error) => return Err(error.to_string()),
            }
            let entry = g.committed.pop_front().unwrap();
            if conf {
                // A membership change: applied to raft, recorded in the WAL with its index (made
                // durable before any checkpoint covers it, see `checkpoint_allowed`).
                match apply_conf_change(&mut g.raw, &entry) {
                    Ok(conf_state) => {
                        let meta = GroupMeta {
                            conf_state: conf_state.clone(),
                            snapshot_term: 0,
                        };
                        self.wal
                            .borrow_mut()
                            .set_meta(group, entry.index, &meta.encode())
                            .map_err(|e| e.to_string())?;
                        g.conf_state = conf_state;
                    }
                    // Deterministic on every replica (the same change against the same
                    // configuration): the configuration stays, the proposer is told.
                    Err(reason) => bad_batch = Some(reason),
                }
            }
            self.stats.entries_applied += 1;
            last_applied = Some(entry.index);
            if let Some(log) = self.applied_log.as_mut() {
                log.push((group, entry.index, entry.term, crc32c::crc32c(&entry.data)));
            }
            // Answer the proposal at this index, or fail those whose entry was replaced.
            while let Some(proposal) = g.proposals.front() {
                if proposal.index > entry.index {
                    break;
                }
                let proposal = g.proposals.pop_front().unwrap();
                if proposal.index == entry.index && proposal.term == entry.term && proposal.conf {
                    let (request, _) = proposal.parts[0];
                    let result = match &bad_batch {
                        Some(reason) => Err(EngineError::BadRequest(reason.clone())),
                        None => Ok(Vec::new()),
                    };
                    self.answers.push(Answer { request, result });
                } else if proposal.index == entry.index && proposal.term == entry.term {
                    let mut at = 0;
                    for (request, count) in proposal.parts {
                        let result = match &bad_batch {
                            Some(reason) => Err(EngineError::BadRequest(reason.clone())),
                            None => Ok(results[at..at + count].to_vec()),
                        };
                        at += count;
                        self.answers.push(Answer { request, result });
                    }
                } else {
                    for (request, _) in proposal.parts {
                        self.answers.push(Answer {
                            request,
                            result: Err(EngineError::UnknownOutcome),
                        });
                    }
                }
            }
        }
        results.clear();
        self.apply_results = results;
        if let Some(index) = last_applied {
            g.applied = index;
            g.raw.advance_apply_to(index);
            self.wal.borrow_mut().set_cache_floor(group, index + 1);
        } else {
            // An installed snapshot counts as applied once raft knows it is persisted.
            let log = &g.raw.raft.raft_log;
            if g.applied > log.applied && g.applied <= log.committed.min(log.persisted) {
                g.raw.advance_apply_to(g.applied);
            }
        }
        let applied = g.applied;
        while g.reads_ready.front().is_some_and(|(index, _)| *index <= applied) {
            let (_, reads) = g.reads_ready.pop_front().unwrap();
            g.reads_local.extend(reads);
        }
        for read in std::mem::take(&mut g.reads_local) {
            // A value on disk is read beside the loop (`take_value_reads`); it is the value as
            // of now, and this read's index is applied: linearizable.
            let value = match g.sm.read_job(&read.key) {
                Ok(ReadStart::Done(value)) => value,
                Ok(ReadStart::Inline) => g.sm.read(&read.key).await.map_err(|e| e.to_string())?,
                Ok(ReadStart::Job(job)) => {
                    self.value_reads_waiting.push_back((read.request, job));
                    continue;
                }
                Err(error) => return Err(error.to_string()),
            };
            self.answers.push(Answer {
                request: read.request,
                result: Ok(vec![read_result(value)]),
            });
        }
        Ok(())
    }

    /// Client reads of values on disk to run beside the loop, at most
    /// `value_reads_in_flight` out at once (the rest wait for [`ShardCore::value_read`] to
    /// free a slot). The runner runs each job and reports it, in any order.
    pub fn take_value_reads(&mut self) -> Vec<ValueRead> {
        let mut out = Vec::new();
        while self.value_reads_out.len() < self.config.value_reads_in_flight.max(1) {
            let Some((request, job)) = self.value_reads_waiting.pop_front() else {
                break;
            };
            let token = self.next_value_read;
            self.next_value_read += 1;
            self.value_reads_out.insert(token, request);
            self.stats.value_reads += 1;
            out.push(ValueRead { token, job });
        }
        out
    }

    /// The outcome of a [`ValueRead`]. A value that cannot be read (a damaged record, a
    /// failing device) stops the shard, as a failing read during apply does: the store never
    /// serves bytes it cannot verify. A read the shard already answered (it failed meanwhile)
    /// is dropped.
    pub fn value_read(&mut self, token: u64, result: Result<Option<Vec<u8>>, SmError>) {
        let Some(request) = self.value_reads_out.remove(&token) else {
            return;
        };
        match result {
            Ok(value) => self.answers.push(Answer {
                request,
                result: Ok(vec![read_result(value)]),
            }),
            Err(error) => {
                self.answers.push(Answer {
                    request,
                    result: Err(EngineError::Failed(error.to_string())),
                });
                self.fail(format!("read: {error}"));
            }
        }
    }

    /// After a failure every waiting request is answered, and new ones are refused.
    fn fail(&mut self, cause: String) {
        if self.failure.is_none() {
            self.failure = Some(cause.clone());
        }
        let reads = self.value_reads_waiting.drain(..).map(|(request, _)| request);
        for request in reads.chain(std::mem::take(&mut self.value_reads_out).into_values()) {
            self.answers.push(Answer {
                request,
                result: Err(EngineError::Failed(cause.clone())),
            });
        }
        for g in self.groups.values_mut() {
            for (request, _, _) in g.queue.drain(..) {
                self.answers.push(Answer {
                    request,
                    result: Err(EngineError::Failed(cause.clone())),
                });
            }
            for proposal in g.proposals.drain(..) {
                for (request, _) in proposal.parts {
                    // It is in the log: it may yet be applied after the restart.
                    self.answers.push(Answer {
                        request,
                        result: Err(EngineError::UnknownOutcome),
                    });
                }
            }
            let reads = g
                .reads_unsent
                .drain(..)
                .chain(
                    g.reads_inflight
                        .values_mut()
                        .flat_map(|(r, _)| r.drain(..))
                        .collect::<Vec<_>>(),
                )
                .chain(g.reads_ready.drain(..).flat_map(|(_, r)| r))
                .chain(g.reads_local.drain(..))
                .collect::<Vec<_>>();
            for read in reads {
                self.answers.push(Answer {
                    request: read.request,
                    result: Err(EngineError::Failed(cause.clone())),
                });
            }
            g.reads_inflight.clear();
        }
    }
}
