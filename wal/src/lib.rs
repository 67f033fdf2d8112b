//! `ringraft-wal`: one shard's write-ahead log, shared by every raft group on that shard.
//!
//! **Owns**: the on-disk log format (`docs/wal-format.md`), group commit, the per-group entry
//! index and tail cache, recovery, and segment purge/recycling. **Runs on**: the shard's own
//! glommio executor (one thread); nothing here is `Send` or locked.
//!
//! **Contract** (what the engine relies on):
//! - [`Wal::append`], [`Wal::set_hard_state`], [`Wal::compact`] and [`Wal::reset`] return once
//!   the record is buffered. The record is readable at once; it is durable when
//!   [`Wal::durable_ticket`] reaches the returned [`Ticket`]. Tickets become durable in order.
//! - A later append for a group at an index it already has replaces the tail from there on, in
//!   memory at once and on disk for recovery.
//! - Durability happens in one place: [`perform`] writes a batch and syncs the file (or writes
//!   with O_DSYNC), and only after that returns `Ok` does [`Wal::io_done`] advance the durable
//!   ticket. One write is in flight at a time; the next batch accumulates meanwhile (group
//!   commit: one write and one sync per round for every group).
//! - After a failed write or sync the WAL refuses further appends ([`WalError::Failed`]): a
//!   retried fsync can lie, so the shard must restart and recover from what is on disk. A
//!   segment preparation that runs out of space (ENOSPC, EDQUOT) fails nothing: it is retried
//!   with a backoff ([`Wal::prepare_error`] says why meanwhile), and writes that need the
//!   segment wait. Any other failure to prepare a segment fails the WAL.
//! - Recovery replays every valid batch, truncates a torn tail, and refuses to start with
//!   [`WalError::Corrupt`] (naming segment and offset) when damage is followed by valid data.
//! - `term(i)` and cached `entries` never touch the disk; older entries are read through
//!   [`Wal::read_plan`] and verified against their checksums. Entries at or above a group's
//!   cache floor are never evicted, including right after recovery ([`Wal::open_pinned`]): a
//!   raft driver can read its unapplied entries synchronously.
//!
//! **Invariants**: batches start on 4 KiB boundaries and are numbered consecutively; every record
//! and payload starts on a 16-byte boundary; every record's crc32c is seeded with its segment's
//! sequence; segment files are created full-size and zero-filled (or recycled) off the write path
//! and never grow; only a prefix of the segment chain is ever purged, and only after the current
//! segment's checkpoint (hard states and compaction points of every group) is durable.

mod disk;
mod error;
pub mod format;
mod glommio_disk;
mod mem_disk;
mod recovery;
mod rng;
mod wal;

pub use disk::{complete_now, Disk};
pub use error::{ReadError, WalError};
pub use glommio_disk::{GlommioDisk, GlommioWal, SyncMode, IOPOLL_GUARD_FILE};
pub use mem_disk::{MemDisk, MemFault, MemFileHandle, MEM_SECTOR_BYTES};
pub use rng::SplitMix64;
pub use wal::{
    perform, Entry, HardState, IoDone, IoJob, PrepareJob, ReadPlan, Ticket, Wal, WalConfig, WalStats,
    WriteJob, META_BYTES_MAX, READ_GAP_MAX, READ_SPAN_MAX,
};
