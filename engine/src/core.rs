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
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use raft::eraftpb::{Entry, Message};
use raft::{GetEntriesContext, RawNode, StateRole, Storage};
use ringraft_sm::{encode_batch, BatchView, Command, CommandLimits, CommandResult, StateMachine};
use ringraft_wal::{Disk, Ticket, Wal};

use crate::storage::{entry_type_code, FetchQueue, GroupStorage};

/// Identifies a client request within a shard; chosen by the runner.
pub type RequestId = u64;

/// Why a request was not (or may not have been) carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("not the leader of this group (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("busy: {0} is full; retry later")]
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
}

/// Limits and raft parameters of a shard (mapped from `ringraft_tuning::Config`).
#[derive(Clone, Debug)]
pub struct ShardConfig {
    pub node: u64,
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
}

impl ShardConfig {
    pub fn from_tuning(config: &ringraft_tuning::Config) -> ShardConfig {
        ShardConfig {
            node: config.node.id,
            voters: config.cluster.nodes.iter().map(|n| n.id).collect(),
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
        }
    }
}

/// The follower that has acknowledged the most of a leader's log (where leadership goes when
/// handed over); `None` without followers.
fn best_follower<T: Storage>(raft: &raft::Raft<T>) -> Option<u64> {
    raft.prs()
        .iter()
        .filter(|(id, _)| **id != raft.id)
        .max_by_key(|(_, progress)| progress.matched)
        .map(|(id, _)| *id)
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
}

/// Entries to read from disk for raft (see [`ShardCore::take_fetches`]).
pub struct Fetch<D: Disk> {
    pub group: u64,
    /// `None` when the range was compacted or truncated meanwhile.
    pub plan: Option<ringraft_wal::ReadPlan<D::File>>,
    pub context: GetEntriesContext,
}

impl<D: Disk> std::fmt::Debug for Fetch<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetch").field("group", &self.group).finish()
    }
}

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
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub proposals: u64,
    pub commands_proposed: u64,
    pub entries_applied: u64,
    pub busy_answers: u64,
    pub leader_changes: u64,
}

/// One shard's groups. See the module docs for how a runner drives it.
pub struct ShardCore<D: Disk, S: StateMachine> {
    config: ShardConfig,
    wal: Rc<RefCell<Wal<D>>>,
    groups: BTreeMap<u64, Group<D, S>>,
    persist_waiting: VecDeque<PersistWait>,
    messages: Vec<Envelope>,
    answers: Vec<Answer>,
    ticks: u64,
    next_read_context: u64,
    failure: Option<String>,
    stats: ShardStats,
    /// Commands per proposed entry (the batching factor).
    commands_per_entry: hdrhistogram::Histogram<u64>,
    /// When on, every applied entry is recorded as (group, index, term, crc32c of its data).
    applied_log: Option<Vec<(u64, u64, u64, u32)>>,
}

impl<D: Disk, S: StateMachine> std::fmt::Debug for ShardCore<D, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCore")
            .field("node", &self.config.node)
            .field("groups", &self.groups.len())
            .field("failure", &self.failure)
            .finish()
    }
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

impl<D: Disk, S: StateMachine> ShardCore<D, S> {
    /// Builds the shard over a recovered WAL and each group's recovered state machine. Raft
    /// restarts at each machine's durable index and replays the log from there.
    pub fn new(
        config: ShardConfig,
        wal: Wal<D>,
        machines: Vec<(u64, S)>,
    ) -> Result<ShardCore<D, S>, EngineError> {
        let wal = Rc::new(RefCell::new(wal));
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut groups = BTreeMap::new();
        for (group, sm) in machines {
            let applied = sm.durable_index();
            let storage = GroupStorage::new(group, wal.clone(), config.voters.clone(), applied);
            let fetches = storage.fetches.clone();
            let last = storage.last_index().unwrap_or(0);
            if applied > last {
                return Err(EngineError::Failed(format!(
                    "group {group}: the state machine is durable at {applied} but the WAL ends at {last}"
                )));
            }
            wal.borrow_mut().set_cache_floor(group, applied + 1);
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
                },
            );
        }
        Ok(ShardCore {
            config,
            wal,
            groups,
            persist_waiting: VecDeque::new(),
            messages: Vec::new(),
            answers: Vec::new(),
            ticks: 0,
            next_read_context: 1,
            failure: None,
            stats: ShardStats::default(),
            applied_log: None,
            commands_per_entry: crate::runtime::new_histogram(),
        })
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
        if g.raw.raft.state != StateRole::Leader {
            let leader = g.raw.raft.leader_id;
            return Err(EngineError::NotLeader {
                leader: known_leader(leader),
            });
        }
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
        if bytes + 64 > self.config.entry_bytes_max || commands.len() > self.config.entry_commands_max {
            return Err(EngineError::TooLarge(format!(
                "{} commands of ~{bytes} bytes exceed one entry (batching.entry_bytes_max {}, entry_commands_max {})",
                commands.len(),
                self.config.entry_bytes_max,
                self.config.entry_commands_max
            )));
        }
        if g.queue_commands + commands.len() > self.config.group_queue_commands_max {
            return Err(EngineError::Busy(
                "the group's command queue (limits.group_queue_commands_max)",
            ));
        }
        if g.queue_bytes + bytes > self.config.group_queue_bytes_max {
            return Err(EngineError::Busy(
                "the group's queue bytes (limits.group_queue_bytes_max)",
            ));
        }
        g.queue_commands += commands.len();
        g.queue_bytes += bytes;
        g.queue.push_back((request, commands, bytes));
        Ok(())
    }

    /// Queues a read. Linearizable reads need leadership; local reads are served by any replica.
    pub fn read(&mut self, group: u64, request: RequestId, key: Vec<u8>, consistency: Consistency) {
        let Some(g) = self.groups.get_mut(&group) else {
            self.answers.push(Answer {
                request,
                result: Err(EngineError::UnknownGroup(group)),
            });
            return;
        };
        let read = ReadRequest { request, key };
        match consistency {
            Consistency::Local => g.reads_local.push(read),
            Consistency::Linearizable if g.raw.raft.state == StateRole::Leader => g.reads_unsent.push(read),
            Consistency::Linearizable => {
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

    /// Delivers a message from a peer. Bad or stale messages are dropped (raft tolerates loss).
    pub fn step(&mut self, envelope: Envelope) {
        if let Some(g) = self.groups.get_mut(&envelope.group) {
            if envelope.message.to == self.config.node {
                let _ = g.raw.step(envelope.message);
            }
        }
    }

    /// Hands leadership of every group this node leads to its most up-to-date follower (raft's
    /// leader transfer: the follower campaigns at once, without waiting for an election
    /// timeout), so a planned stop costs clients no timeout. Returns how many groups this node
    /// still leads and could hand over (a group without followers is not counted).
    pub fn transfer_leadership(&mut self) -> usize {
        let mut leading = 0;
        for g in self.groups.values_mut() {
            if g.raw.raft.state != StateRole::Leader {
                continue;
            }
            let Some(to) = best_follower(&g.raw.raft) else {
                continue;
            };
            leading += 1;
            if g.raw.raft.lead_transferee.is_none() {
                g.raw.transfer_leader(to);
            }
        }
        leading
    }

    /// Starts handing leadership of `group` to node `to` (or, with `None`, to the most
    /// up-to-date follower). `Ok(true)`: started (the caller waits for [`ShardCore::is_leader`]
    /// to turn false); `Ok(false)`: nothing to do (`to` is this node, which leads). A follower
    /// answers `NotLeader`, so a client asks the leader.
    pub fn transfer_group(&mut self, group: u64, to: Option<u64>) -> Result<bool, EngineError> {
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
            Some(to) if g.raw.raft.prs().iter().any(|(id, _)| *id == to) => to,
            Some(to) => {
                return Err(EngineError::BadRequest(format!(
                    "node {to} is not a member of group {group}"
                )))
            }
            None => best_follower(&g.raw.raft)
                .ok_or_else(|| EngineError::BadRequest(format!("group {group} has no other member")))?,
        };
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
        let voters = &self.config.voters;
        let me = self.config.node;
        let share = self.groups.len().div_ceil(voters.len().max(1));
        let mut led: BTreeMap<u64, usize> = voters.iter().map(|&v| (v, 0)).collect();
        for g in self.groups.values() {
            if let Some(leader) = known_leader(g.raw.raft.leader_id) {
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
            let caught_up = raft
                .prs()
                .get(to)
                .is_some_and(|p| p.recent_active && p.matched == raft.raft_log.last_index());
            if caught_up {
                g.raw.transfer_leader(to);
                return Some((group, to));
            }
        }
        None
    }

    /// The transport could not deliver a message of `group` to node `to` (no connection, or its
    /// queue was full): raft-rs stops pipelining to it and probes instead.
    pub fn report_unreachable(&mut self, group: u64, to: u64) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.raw.report_unreachable(to);
        }
    }

    /// Advances every group's logical clock by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        let retry_after = self.config.election_ticks as u64;
        for g in self.groups.values_mut() {
            g.raw.tick();
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
        }
    }

    /// Turns each group's queued commands into one raft entry (one batch), and sends one
    /// ReadIndex request for the group's waiting linearizable reads.
    pub fn propose(&mut self) {
        for g in self.groups.values_mut() {
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
            while !g.queue.is_empty() {
                let mut commands = Vec::new();
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
                let data = encode_batch(commands).to_vec();
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
                        g.proposals.push_back(Proposal { index, term, parts });
                    }
                    outcome => {
                        // Dropped (uncommitted bytes over raft.max_uncommitted_bytes, or a
                        // leadership transfer): nothing entered the log.
                        let error = match outcome {
                            Err(raft::Error::ProposalDropped) => {
                                EngineError::Busy("the group's uncommitted log (raft.max_uncommitted_bytes)")
                            }
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
    pub fn collect_ready(&mut self) {
        if self.failure.is_some() {
            return;
        }
        let groups: Vec<u64> = self.groups.keys().copied().collect();
        for group in groups {
            if let Err(cause) = self.collect_group(group) {
                self.fail(cause);
                return;
            }
        }
        // A Ready that wrote nothing new (a vote, a heartbeat response) waits for a ticket that
        // may already be durable: release it now rather than at the next write completion.
        self.on_durable();
    }

    fn collect_group(&mut self, group: u64) -> Result<(), String> {
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
            self.messages.push(Envelope { group, message });
        }
        assert!(
            ready.snapshot().data.is_empty() && ready.snapshot().get_metadata().index == 0,
            "snapshots are not sent yet"
        );
        for state in ready.take_read_states() {
            let ctx = u64::from_le_bytes(state.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            if let Some((reads, _)) = g.reads_inflight.remove(&ctx) {
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
        g.committed.extend(ready.take_committed_entries());
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
    /// reads each plan (async, off the raft path) and reports with [`ShardCore::fetched`].
    pub fn take_fetches(&mut self) -> Vec<Fetch<D>> {
        let mut out = Vec::new();
        for (&group, g) in &self.groups {
            for request in g.fetches.borrow_mut().drain(..) {
                let plan = self
                    .wal
                    .borrow()
                    .read_plan(group, request.lo, request.hi, Some(request.max_bytes))
                    .ok();
                out.push(Fetch {
                    group,
                    plan,
                    context: request.context,
                });
            }
        }
        out
    }

    /// The result of a [`Fetch`]: entries go back into the WAL cache and raft retries. A failed
    /// or impossible read makes raft ask again later (or send a snapshot once it can).
    pub fn fetched(
        &mut self,
        group: u64,
        entries: Option<Vec<ringraft_wal::Entry>>,
        context: GetEntriesContext,
    ) {
        if let Some(entries) = entries {
            self.wal.borrow_mut().insert_cached(group, &entries);
        }
        if let Some(g) = self.groups.get_mut(&group) {
            g.raw.on_entries_fetched(context);
        }
    }

    /// Whether a later `collect_ready` may produce output (used by runners to decide to loop).
    pub fn has_ready(&self) -> bool {
        self.groups
            .values()
            .any(|g| g.raw.has_ready() || !g.committed.is_empty())
    }

    /// Bytes of commands queued, not yet proposed, over all groups.
    pub fn queued_bytes(&self) -> usize {
        self.groups.values().map(|g| g.queue_bytes).sum()
    }

    /// Whether any group has commands or linearizable reads waiting to be proposed.
    pub fn has_queued(&self) -> bool {
        self.groups
            .values()
            .any(|g| !g.queue.is_empty() || !g.reads_unsent.is_empty())
    }

    /// Applies committed entries and answers their proposers; serves reads whose index is
    /// applied.
    pub async fn apply(&mut self) {
        if self.failure.is_some() {
            return;
        }
        let groups: Vec<u64> = self.groups.keys().copied().collect();
        for group in groups {
            if let Err(cause) = self.apply_group(group).await {
                self.fail(cause);
                return;
            }
        }
    }

    async fn apply_group(&mut self, group: u64) -> Result<(), String> {
        let g = self.groups.get_mut(&group).unwrap();
        let mut results = Vec::new();
        let mut last_applied = None;
        while let Some(entry) = g.committed.pop_front() {
            results.clear();
            let mut bad_batch = None;
            if !entry.data.is_empty() && entry.entry_type == raft::eraftpb::EntryType::EntryNormal {
                match BatchView::new(&entry.data) {
                    Ok(view) => {
                        g.sm.apply(entry.index, view.batch(), &mut results)
                            .await
                            .map_err(|e| e.to_string())?
                    }
                    // Deterministic on every replica: the entry is skipped, its proposer told.
                    Err(error) => bad_batch = Some(error.to_string()),
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
                if proposal.index == entry.index && proposal.term == entry.term {
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
        if let Some(index) = last_applied {
            g.applied = index;
            g.raw.advance_apply_to(index);
            self.wal.borrow_mut().set_cache_floor(group, index + 1);
        }
        let applied = g.applied;
        while g.reads_ready.front().is_some_and(|(index, _)| *index <= applied) {
            let (_, reads) = g.reads_ready.pop_front().unwrap();
            g.reads_local.extend(reads);
        }
        for read in std::mem::take(&mut g.reads_local) {
            let result = match g.sm.read(&read.key).await {
                Ok(Some(value)) => Ok(vec![CommandResult::Value(value)]),
                Ok(None) => Ok(vec![CommandResult::NotFound]),
                Err(error) => return Err(error.to_string()),
            };
            self.answers.push(Answer {
                request: read.request,
                result,
            });
        }
        Ok(())
    }

    /// After a failure every waiting request is answered, and new ones are refused.
    fn fail(&mut self, cause: String) {
        if self.failure.is_none() {
            self.failure = Some(cause.clone());
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
