//! `ringraft-sm`: what every replica applies.
//!
//! **Owns**: the command language and the batch byte format (`docs/batch-format.md`: a small
//! versioned, checksummed header before one rkyv archive), the [`StateMachine`] trait the engine
//! drives, and the built-in [`KvStore`] (formats in `docs/kv-format.md`). **Runs on**: the
//! shard's executor; nothing here is `Send` or locked.
//!
//! **Invariants**: every batch from disk or network is validated (crc32c, then bytecheck)
//! before it is read in place; apply never panics on validated input and is deterministic;
//! apply need not be durable, `checkpoint` is, and the engine compacts its log only up to
//! `durable_index`; the store never returns bytes that fail their checksum.

mod command;
mod disk;
mod error;
mod index;
mod kv;
mod machine;

pub use command::{
    command_size_estimate, encode_batch, encode_batch_vec, ArchivedBatch, ArchivedCommand, Batch,
    BatchBuilder, BatchView, Command, CommandLimits, CommandResult, BATCH_HEADER_BYTES, BATCH_MAGIC,
    BATCH_SLACK_BYTES, BATCH_VERSION,
};
pub use disk::{GlommioSmDisk, MemSmDisk, SmDisk, SM_BLOCK_BYTES, SM_IOPOLL_GUARD_FILE};
pub use error::SmError;
pub use kv::{KvConfig, KvSnapshot, KvStats, KvStore};
pub use machine::{ChunkJob, ChunkStart, ReadJob, ReadStart, StateMachine};
