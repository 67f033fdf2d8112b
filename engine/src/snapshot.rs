//! Snapshot transfer between the same shard of two nodes, beside raft's own messages.
//!
//! raft-rs decides *when* a follower needs a snapshot (its next entry is compacted on the
//! leader) and carries only the snapshot's metadata in its `MsgSnapshot`. The state machine's
//! bytes travel as [`SnapshotPiece`]s, and the `MsgSnapshot` is delivered last:
//!
//! 1. raft asks the group's storage for a snapshot; the shard takes one from the state machine
//!    at its applied index (a consistent view; chunks are produced lazily from it).
//! 2. The leader's outgoing `MsgSnapshot` is held back; a stream sends `Chunk`s with at most
//!    `snapshot_chunks_in_flight` unacknowledged (bounded memory, flow control), then `Done`
//!    with the group's metadata (membership, term). Chunks are produced a window at a time per
//!    loop, so the shard's other groups keep being served.
//! 3. The follower stages each chunk in its state machine (`restore_chunk`, in order; a repeat
//!    is acknowledged and ignored) and acknowledges with the next chunk it wants. At `Done` it
//!    has the state machine do what the switch needs disk space for (`restore_prepare`), writes
//!    the metadata to its WAL and, once that is durable, acknowledges `complete`. A chunk or a
//!    `Done` refused for disk space leaves the staging as it was: the leader sends it again
//!    when it sees no progress.
//! 4. The leader then sends the held `MsgSnapshot`; raft on the follower accepts it (or declines
//!    a stale one: the staged restore is dropped), and the shard installs it: state machine
//!    switch (durable), then the WAL reset. A restart in between finishes the install from the
//!    metadata record (see `ShardCore::new`).
//!
//! Every chunk is checksummed by the state machine's chunk format and every frame by the
//! transport. Lost pieces are recovered by the leader: without progress for an election
//! timeout it resends from the last acknowledged chunk (resuming after a dropped connection);
//! after [`STREAM_RETRIES_MAX`] such rounds it reports the snapshot failed to raft, which asks
//! again later.

use std::rc::Rc;

use bytes::Bytes;
use raft::eraftpb::Message;

/// Resend rounds without progress before a stream is abandoned.
pub const STREAM_RETRIES_MAX: u32 = 10;

/// A piece of a snapshot transfer for one group, between the same shard of two nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPiece {
    pub group: u64,
    pub from: u64,
    pub to: u64,
    /// The snapshot: its index and the term of that index.
    pub index: u64,
    pub term: u64,
    /// The stream: unique per sending node (its leadership term and a counter). A receiver
    /// continues a staging only with pieces of the same stream, so a state machine need not
    /// cut two snapshots at the same index into the same chunks.
    pub stream: u64,
    pub kind: PieceKind,
}

impl SnapshotPiece {
    /// This piece without its chunk's data: what a sender keeps to hand back a piece the
    /// transport could not take (`ShardCore::piece_not_sent`).
    pub fn without_data(&self) -> SnapshotPiece {
        let kind = match &self.kind {
            PieceKind::Chunk { number, .. } => PieceKind::Chunk {
                number: *number,
                data: Bytes::new(),
            },
            other => other.clone(),
        };
        SnapshotPiece { kind, ..*self }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PieceKind {
    /// Leader to follower: chunk `number` (from 0) of the state machine's snapshot stream.
    Chunk { number: u64, data: Bytes },
    /// Leader to follower: the stream has `chunks` chunks; `meta` is the encoded
    /// [`crate::meta::GroupMeta`] (membership at the snapshot's index, and its term).
    Done { chunks: u64, meta: Bytes },
    /// Follower to leader: the next chunk wanted; `complete` once every chunk is staged and the
    /// metadata is durable (the leader then sends raft's `MsgSnapshot`).
    Ack { next: u64, complete: bool },
}

/// A snapshot a leader serves, shared by the streams sending it.
pub(crate) struct Serving<T> {
    pub(crate) index: u64,
    pub(crate) term: u64,
    pub(crate) stream: u64,
    pub(crate) meta: Bytes,
    pub(crate) snapshot: T,
    /// The shard's tick when it was taken.
    pub(crate) taken_tick: u64,
}

impl<T> Serving<T> {
    /// A piece of this snapshot for `to`.
    pub(crate) fn piece(&self, group: u64, from: u64, to: u64, kind: PieceKind) -> SnapshotPiece {
        SnapshotPiece {
            group,
            from,
            to,
            index: self.index,
            term: self.term,
            stream: self.stream,
            kind,
        }
    }
}

/// One stream of a leader's snapshot to one follower.
pub(crate) struct Outgoing<T> {
    pub(crate) serving: Rc<Serving<T>>,
    /// raft's `MsgSnapshot`, sent once the follower has everything.
    pub(crate) message: Message,
    /// Next chunk to send; every chunk below `acked` is staged at the follower.
    pub(crate) next: u64,
    pub(crate) acked: u64,
    /// Known once the state machine said there are no more.
    pub(crate) chunks: Option<u64>,
    pub(crate) done_sent: bool,
    pub(crate) last_progress_tick: u64,
    pub(crate) retries: u32,
    /// The chunk whose job is out (see `ShardCore::take_chunk_jobs`): one at a time per stream.
    pub(crate) producing: Option<u64>,
    /// Pieces the transport could not take in a row (see `ShardCore::piece_not_sent`), and the
    /// tick before which the stream sends nothing more: one tick after the first, doubling.
    pub(crate) drops: u32,
    pub(crate) held_until: u64,
}

impl<T> Outgoing<T> {
    /// The piece carrying chunk `next` of this stream (`data`) from `from` to `to`; the stream
    /// moves on to the next chunk.
    pub(crate) fn send_chunk(&mut self, group: u64, from: u64, to: u64, data: Vec<u8>) -> SnapshotPiece {
        let kind = PieceKind::Chunk {
            number: self.next,
            data: Bytes::from(data),
        };
        self.next += 1;
        self.serving.piece(group, from, to, kind)
    }
}

/// A follower's snapshot being received.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) index: u64,
    pub(crate) term: u64,
    pub(crate) stream: u64,
    pub(crate) from: u64,
    pub(crate) next: u64,
    /// Every chunk staged and the metadata written to the WAL.
    pub(crate) complete: bool,
    /// The `complete` acknowledgement went out (it waits for the metadata to be durable).
    pub(crate) complete_acked: bool,
    pub(crate) last_tick: u64,
    /// Chunks and completions of this staging refused for disk space so far.
    pub(crate) space_refusals: u64,
    /// The tick from which to send the acknowledgement again: the transport could not take
    /// the last one (see `ShardCore::piece_not_sent`).
    pub(crate) ack_again_at: Option<u64>,
}

impl Incoming {
    /// The acknowledgement of this staging from `node` for `group`: the next chunk it wants,
    /// and `complete` once everything is staged and durable.
    pub(crate) fn ack(&self, group: u64, node: u64, complete: bool) -> SnapshotPiece {
        SnapshotPiece {
            group,
            from: node,
            to: self.from,
            index: self.index,
            term: self.term,
            stream: self.stream,
            kind: PieceKind::Ack {
                next: self.next,
                complete,
            },
        }
    }

    /// Counts a chunk or completion refused for disk space; returns the count when it is worth
    /// logging (see [`worth_logging`]).
    pub(crate) fn refused_for_space(&mut self) -> Option<u64> {
        self.space_refusals += 1;
        worth_logging(self.space_refusals).then_some(self.space_refusals)
    }
}

/// Whether the `count`th occurrence of a repeating condition is logged: the 1st, 10th, 100th,
/// 1000th, then every 10,000th (a leader resends a refused chunk every election timeout).
pub(crate) fn worth_logging(count: u64) -> bool {
    matches!(count, 1 | 10 | 100 | 1000) || (count > 0 && count % 10_000 == 0)
}

#[cfg(test)]
mod tests {
    use super::worth_logging;

    #[test]
    fn repeated_refusals_are_logged_ever_more_rarely() {
        let logged: Vec<u64> = (0..=50_000).filter(|&n| worth_logging(n)).collect();
        assert_eq!(logged, [1, 10, 100, 1000, 10_000, 20_000, 30_000, 40_000, 50_000]);
    }
}
