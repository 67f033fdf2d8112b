//! raft-rs `Storage` for one group, served from the shard's WAL: terms and cached entries from
//! memory, never a disk wait. Entries raft may only read synchronously (committed, unapplied)
//! are pinned in the WAL cache by the shard ([`ringraft_wal::Wal::set_cache_floor`]); older
//! entries for lagging followers are fetched asynchronously (`LogTemporarilyUnavailable`, then
//! `on_entries_fetched`).

use std::cell::RefCell;
use std::rc::Rc;

use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{Error, GetEntriesContext, RaftState, StorageError};
use ringraft_wal::{Disk, ReadError, Wal};

/// An uncached range raft asked for asynchronously: `lo..hi`, at most `max_bytes`.
#[derive(Debug)]
pub(crate) struct FetchRequest {
    pub(crate) lo: u64,
    pub(crate) hi: u64,
    pub(crate) max_bytes: u64,
    pub(crate) context: GetEntriesContext,
}

/// Shared between a group's storage (which records requests) and the shard (which serves them).
pub(crate) type FetchQueue = Rc<RefCell<Vec<FetchRequest>>>;

/// Between a group's storage and the shard: whether raft asked for a snapshot, and the one the
/// shard prepared (metadata only: the data travels as snapshot pieces, see `snapshot.rs`).
#[derive(Debug, Default)]
pub(crate) struct SnapshotSlot {
    pub(crate) wanted: bool,
    pub(crate) ready: Option<Snapshot>,
}

pub(crate) type SnapSlot = Rc<RefCell<SnapshotSlot>>;

/// A group's view of the shared WAL.
pub struct GroupStorage<D: Disk> {
    group: u64,
    wal: Rc<RefCell<Wal<D>>>,
    conf_state: ConfState,
    /// The state machine's durable index: raft's commit is raised to it at start (commit-only
    /// hard states are not synced, so the persisted commit may lag what was applied).
    applied_floor: u64,
    /// Uncached entries raft asked for asynchronously.
    pub(crate) fetches: FetchQueue,
    pub(crate) snapshot: SnapSlot,
}

impl<D: Disk> std::fmt::Debug for GroupStorage<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupStorage")
            .field("group", &self.group)
            .finish()
    }
}

impl<D: Disk> GroupStorage<D> {
    pub fn new(
        group: u64,
        wal: Rc<RefCell<Wal<D>>>,
        conf_state: ConfState,
        applied_floor: u64,
    ) -> GroupStorage<D> {
        GroupStorage {
            group,
            wal,
            conf_state,
            applied_floor,
            fetches: Rc::new(RefCell::new(Vec::new())),
            snapshot: Rc::default(),
        }
    }
}

pub(crate) fn entry_type_code(entry_type: EntryType) -> u8 {
    match entry_type {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    }
}

fn entry_type_of(code: u8) -> EntryType {
    match code {
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => EntryType::EntryNormal,
    }
}

pub(crate) fn to_raft_entry(group_entry: ringraft_wal::Entry) -> Entry {
    Entry {
        entry_type: entry_type_of(group_entry.entry_type),
        term: group_entry.term,
        index: group_entry.index,
        data: group_entry.payload,
        ..Default::default()
    }
}

fn storage_error(error: ReadError) -> Error {
    match error {
        ReadError::Compacted { .. } => Error::Store(StorageError::Compacted),
        ReadError::Unavailable { .. } => Error::Store(StorageError::Unavailable),
        ReadError::NotCached { .. } => Error::Store(StorageError::LogTemporarilyUnavailable),
    }
}

impl<D: Disk> raft::Storage for GroupStorage<D> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let wal = self.wal.borrow();
        let hs = wal.hard_state(self.group);
        let last = wal.last_index(self.group);
        Ok(RaftState {
            hard_state: HardState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit.max(self.applied_floor).min(last),
                ..Default::default()
            },
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let wal = self.wal.borrow();
        match wal.entries(self.group, low, high, max_size) {
            Ok(entries) => Ok(entries.into_iter().map(to_raft_entry).collect()),
            Err(ReadError::NotCached { .. }) if context.can_async() => {
                self.fetches.borrow_mut().push(FetchRequest {
                    lo: low,
                    hi: high,
                    max_bytes: max_size.unwrap_or(u64::MAX),
                    context,
                });
                Err(Error::Store(StorageError::LogTemporarilyUnavailable))
            }
            // The shard pins unapplied entries in the cache, so a synchronous miss is a bug.
            Err(ReadError::NotCached { index, .. }) => {
                panic!(
                    "group {}: raft read uncached entry {index} synchronously",
                    self.group
                )
            }
            Err(error) => Err(storage_error(error)),
        }
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.wal.borrow().term(self.group, idx).map_err(storage_error)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.wal.borrow().first_index(self.group))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.wal.borrow().last_index(self.group))
    }

    /// The snapshot the shard prepared, if it is recent enough (at or past `request_index`, not
    /// older than the log's start, or the follower could not continue after it, and with `to`
    /// among its members); otherwise
    /// the shard is asked to take one and raft retries at its next append to that follower.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut slot = self.snapshot.borrow_mut();
        let first = self.wal.borrow().first_index(self.group);
        if let Some(snapshot) = &slot.ready {
            let index = snapshot.get_metadata().index;
            // A snapshot from before `to` joined would be refused by it (raft checks that the
            // receiver is in the snapshot's membership): take a newer one.
            let cs = snapshot.get_metadata().get_conf_state();
            let includes = cs
                .voters
                .iter()
                .chain(&cs.learners)
                .chain(&cs.voters_outgoing)
                .any(|&id| id == to);
            if index >= request_index && index + 1 >= first && includes {
                return Ok(snapshot.clone());
            }
        }
        slot.wanted = true;
        Err(Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}
