//! `ringraft-engine`: shards, the raft driver, batching, apply.
//!
//! **Owns**: the raft-driving logic of a shard ([`ShardCore`], free of IO), the raft-rs
//! `Storage` over the shard's WAL ([`GroupStorage`]), proposal batching, bounded queues and
//! backpressure, apply and answers, ReadIndex reads. **Runs on**: one shard's executor; the
//! deterministic simulator (`tests/sim.rs`) runs many shards of many nodes in one thread.
//!
//! **Invariants**: a client is answered ok only after its command was applied, hence committed
//! (in a quorum's synced WALs; the leader counts itself only after `on_persist_ready`); a
//! proposal whose entry was replaced is answered `UnknownOutcome`, never ok; followers' responses
//! go out only after the WAL batch holding the entries they acknowledge is durable; apply never
//! runs ahead of the local durable log (raft-rs 0.7 caps committed entries at the persisted
//! index); every queue is bounded and a full one answers `Busy` at once.
//!
//! The glommio runner (`runtime.rs`, the only glommio code here) runs one executor per shard;
//! [`Engine::start`] starts one node whose peers are reached through a [`Transport`] (the TCP
//! one is the `net` crate's); [`Engine::start_in_process`] starts a whole cluster in one process
//! with channels between nodes; [`Client`] is the embedded API and [`NodeHandle`] a node's own
//! shards, for network servers. A [`Session`] (from [`Client::session`]) is the embedded API for
//! one thread with many requests in flight: its answers come a shard loop at a time through one
//! [`ReplySink`], as the TCP server's connections get theirs (engine/src/reply.rs).
//!
//! Metrics: [`Engine::metrics`] (and [`NodeHandle::metrics`]) return a [`NodeMetrics`] snapshot:
//! per shard counters, commands-per-entry and sync-latency histograms, queue depths; per group
//! commit and apply lag, queues, leader changes, `Busy` answers.
//!
//! State machines: the built-in key-value store by default ([`KvFactory`]); any other
//! [`ringraft_sm::StateMachine`] through [`Engine::start_with`] and a [`MachineFactory`].

mod beat;
mod client;
mod core;
mod meta;
mod reply;
mod runtime;
mod session;
mod snapshot;
mod storage;
mod tickets;
mod transport;

pub use crate::beat::{Beat, BEAT_GROUP};
pub use crate::client::{group_of, Client, LeaderCache};
pub use crate::core::{
    unapplied_floors, Answer, Consistency, EngineError, Envelope, Fetch, GroupMetrics, RequestId,
    ShardConfig, ShardCore, ShardStats, SnapshotChunkJob, ValueRead,
};
pub use crate::meta::GroupMeta;
pub use crate::reply::{Outcome, ReplySink};
pub use crate::runtime::{
    Engine, GroupStatus, KvFactory, LeavingNodes, MachineFactory, NodeMetrics, NodeStats, ShardMetrics,
};
pub use crate::session::Session;
pub use crate::snapshot::{PieceKind, SnapshotPiece};
pub use crate::storage::GroupStorage;
pub use crate::tickets::Tickets;
pub use crate::transport::{Inbound, MemberChange, NodeHandle, Pending, ShardLink, ShardNet, Transport};
pub use hdrhistogram::Histogram;
pub use raft;
