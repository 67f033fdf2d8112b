//! The `StateMachine` trait: what the engine drives on every replica.

use crate::command::{ArchivedBatch, CommandResult};
use crate::error::SmError;

/// A snapshot chunk being produced apart from its machine (see
/// [`StateMachine::snapshot_chunk_job`]). Not `Send`: it runs on the machine's shard.
pub type ChunkJob = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, SmError>>>>;

/// How a snapshot chunk is to be produced.
pub enum ChunkStart {
    /// There is no such chunk: the snapshot has fewer.
    End,
    /// Call [`StateMachine::snapshot_chunk`].
    Inline,
    /// Run this job for the chunk's bytes.
    Job(ChunkJob),
}

impl std::fmt::Debug for ChunkStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkStart::End => "End",
            ChunkStart::Inline => "Inline",
            ChunkStart::Job(_) => "Job",
        })
    }
}

/// A local read of a value being served apart from its machine (see
/// [`StateMachine::read_job`]). Not `Send`: it runs on the machine's shard.
pub type ReadJob = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<Vec<u8>>, SmError>>>>;

/// How a local read is to be served.
pub enum ReadStart {
    /// The value, at hand (or `None`: no such key).
    Done(Option<Vec<u8>>),
    /// Call [`StateMachine::read`].
    Inline,
    /// Run this job for the value.
    Job(ReadJob),
}

impl std::fmt::Debug for ReadStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadStart::Done(_) => "Done",
            ReadStart::Inline => "Inline",
            ReadStart::Job(_) => "Job",
        })
    }
}

/// A replicated state machine. Runs on its shard's thread (futures are not `Send`).
///
/// The contract:
/// - [`apply`](StateMachine::apply) need not be durable: the WAL holds every committed entry and
///   the engine replays from [`durable_index`](StateMachine::durable_index) + 1 after a restart.
/// - [`checkpoint`](StateMachine::checkpoint) makes everything applied so far durable. The engine
///   compacts the log only up to the last durable checkpoint, so no committed entry is ever lost.
/// - Applying an index at or below [`applied_index`](StateMachine::applied_index) is a no-op that
///   yields no results (replay after a crash is idempotent).
/// - Apply is deterministic: every replica that applies the same entries reaches the same state.
///   A command it cannot honour yields a result (e.g. `CasMismatch`); apply never panics on
///   validated input.
/// - Snapshots are consistent at one applied index, produced as numbered chunks that can be
///   produced again from any chunk number (resumable), and restored chunk by chunk. A restore
///   only ever gets chunks of one snapshot (the engine identifies each transfer), so two
///   snapshots at the same index may cut different chunks.
/// - A chunk produced as a job ([`snapshot_chunk_job`](StateMachine::snapshot_chunk_job)) holds
///   the snapshot's state while the machine applies, checkpoints and compacts before the job
///   runs: it keeps alive whatever it will read.
#[allow(async_fn_in_trait)] // single-threaded executors: no Send bound is wanted
pub trait StateMachine {
    /// A snapshot being streamed out.
    type Snapshot;

    /// Applies the batch committed at `index`, pushing one result per command, in batch order.
    /// An error for which [`SmError::is_out_of_space`] holds must leave the machine as it was
    /// before the call, with no results pushed: the engine applies the same entry again later.
    /// Any other error stops the shard.
    async fn apply(
        &mut self,
        index: u64,
        batch: &ArchivedBatch,
        results: &mut Vec<CommandResult>,
    ) -> Result<(), SmError>;

    /// The value of `key` as applied so far (a local read; the engine adds linearizability).
    async fn read(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, SmError>;

    /// The value of `key` as applied so far, as a job that does its IO without borrowing the
    /// machine: the caller runs it while the machine goes on applying, many at once, so that
    /// reads of values on disk neither hold the shard's other work nor wait for each other.
    /// The job answers with the value as of this call (later applies do not change it), which
    /// keeps reads linearizable: this call happens after the read's index is applied and
    /// before its answer. The default, [`ReadStart::Inline`], makes the engine call
    /// [`read`](StateMachine::read) instead, with its loop waiting.
    fn read_job(&mut self, key: &[u8]) -> Result<ReadStart, SmError> {
        let _ = key;
        Ok(ReadStart::Inline)
    }

    /// The last index applied (in memory).
    fn applied_index(&self) -> u64;

    /// The last index made durable by a checkpoint.
    fn durable_index(&self) -> u64;

    /// Makes the state at `applied_index()` durable; returns that index. A stepwise checkpoint
    /// under way ([`StateMachine::checkpoint_step`]) is abandoned. Errors as for
    /// `checkpoint_step`: out of space leaves the machine usable, anything else stops the shard.
    async fn checkpoint(&mut self) -> Result<u64, SmError>;

    /// A checkpoint a step at a time, so that a large state never holds the shard for long: the
    /// first call fixes the state to write (as of `applied_index()` then), each call does about
    /// `budget_bytes` of the writing, and applies run between calls. Returns `Some(index)` once
    /// the state at `index` is durable, `None` while the checkpoint is under way. The default
    /// writes the whole checkpoint in one call. An error for which
    /// [`SmError::is_out_of_space`] holds must leave the machine usable with the round
    /// abandoned (the engine tries again later); any other error stops the shard.
    async fn checkpoint_step(&mut self, budget_bytes: u64) -> Result<Option<u64>, SmError> {
        let _ = budget_bytes;
        self.checkpoint().await.map(Some)
    }

    /// Starts a consistent snapshot at `applied_index()`.
    fn snapshot(&mut self) -> Result<Self::Snapshot, SmError>;

    /// Chunk `number` of `snapshot` (numbers start at 0), or `None` past the last one. Any chunk
    /// can be asked for again (resuming after a dropped connection).
    async fn snapshot_chunk(
        &mut self,
        snapshot: &Self::Snapshot,
        number: u64,
    ) -> Result<Option<Vec<u8>>, SmError>;

    /// Chunk `number` of `snapshot` as a job that does its IO without borrowing the machine:
    /// what it needs from the machine it takes now, and the caller runs it while the machine
    /// goes on applying (a leader's shard keeps serving its groups while a follower catches
    /// up). The job's bytes must equal what [`snapshot_chunk`](StateMachine::snapshot_chunk)
    /// would return. The default, [`ChunkStart::Inline`], makes the engine call
    /// `snapshot_chunk` instead, with its loop waiting.
    fn snapshot_chunk_job(
        &mut self,
        _snapshot: &Self::Snapshot,
        _number: u64,
    ) -> Result<ChunkStart, SmError> {
        Ok(ChunkStart::Inline)
    }

    /// Replaces the whole state with a snapshot, given its chunks in order (a chunk already
    /// received is ignored, so a sender may resume from an earlier boundary). The state switches
    /// atomically and durably at [`StateMachine::restore_finish`]. An error for which
    /// [`SmError::is_out_of_space`] holds must leave the chunk unstaged and the restore as it
    /// was (the sender resends the chunk later); any other error drops the restore.
    async fn restore_chunk(&mut self, chunk: &[u8]) -> Result<(), SmError>;

    /// Called once every chunk is in, before raft hears of the snapshot (so it may be called
    /// again, and the restore may still be aborted): does whatever needs disk space, so that
    /// [`restore_finish`](StateMachine::restore_finish), which must not fail, needs none. An
    /// out-of-space error leaves the restore staged and the engine calls this again later; any
    /// other error stops the shard. The default does nothing.
    async fn restore_prepare(&mut self) -> Result<(), SmError> {
        Ok(())
    }

    /// Completes a restore; returns the snapshot's applied index, now durable. Any error stops
    /// the shard (the state machine may have switched in memory already).
    async fn restore_finish(&mut self) -> Result<u64, SmError>;

    /// Discards a restore in progress, if any (raft declined the snapshot, or another one
    /// replaces it). The current state is untouched; staged data becomes garbage.
    fn restore_abort(&mut self);

    /// Background upkeep between applies, such as reclaiming the space of overwritten values,
    /// bounded by about `budget_bytes` of IO. Returns the bytes processed; 0 when there is
    /// nothing to do (the engine then moves on to another group). The engine calls it on every
    /// loop of the shard, so a state machine that never reclaims space may keep the default.
    async fn maintain(&mut self, budget_bytes: u64) -> Result<u64, SmError> {
        let _ = budget_bytes;
        Ok(0)
    }
}
