//! Helpers shared by the WAL tests: drive a `Wal<MemDisk>` synchronously and compare states.
#![allow(dead_code)]

use std::collections::BTreeMap;

use bytes::Bytes;
use ringraft_wal::{complete_now, perform, Entry, HardState, IoJob, MemDisk, Wal, WalConfig};

pub fn small_config() -> WalConfig {
    WalConfig {
        segment_bytes: 24 * 1024,
        batch_bytes_max: 4096,
        cache_bytes_max: 512,
        segments_recycled_max: 1,
    }
}

pub fn open(disk: &MemDisk, config: &WalConfig) -> Wal<MemDisk> {
    complete_now(Wal::open(disk.clone(), config.clone())).expect("open")
}

/// Performs every job until the WAL is idle: everything appended is durable afterwards.
pub fn drive(wal: &mut Wal<MemDisk>, disk: &MemDisk) {
    while let Some(job) = wal.poll_io() {
        let done = complete_now(perform(disk, job));
        wal.io_done(done).expect("io");
    }
}

/// Performs jobs until a write is issued, writes its bytes without syncing and returns (the write
/// stays in flight): a crash now may tear it. Returns false if there was nothing to write.
pub fn write_without_sync(wal: &mut Wal<MemDisk>, disk: &MemDisk) -> bool {
    while let Some(job) = wal.poll_io() {
        match job {
            IoJob::Write(write) => {
                complete_now(ringraft_wal::Disk::write_at(
                    disk,
                    &write.file,
                    write.offset,
                    write.buffer,
                ))
                .expect("write");
                return true;
            }
            other => {
                let done = complete_now(perform(disk, other));
                wal.io_done(done).expect("io");
            }
        }
    }
    false
}

pub fn entry(index: u64, term: u64, payload: &[u8]) -> Entry {
    Entry {
        index,
        term,
        entry_type: (index % 3) as u8,
        payload: Bytes::copy_from_slice(payload),
    }
}

pub fn payload_for(group: u64, index: u64, term: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (group as usize * 31 + index as usize * 7 + term as usize + i) as u8)
        .collect()
}

/// What a group's log holds, for comparisons: first index, term of `first - 1`, entries as
/// (term, type, payload), and the hard state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    pub first: u64,
    pub snapshot_term: u64,
    pub entries: Vec<(u64, u8, Vec<u8>)>,
    pub hard_state: HardState,
}

impl Default for GroupState {
    fn default() -> Self {
        GroupState {
            first: 1,
            snapshot_term: 0,
            entries: Vec::new(),
            hard_state: HardState::default(),
        }
    }
}

pub type State = BTreeMap<u64, GroupState>;

/// Everything a WAL holds, read through the public API (uncached entries from disk).
pub fn state_of(wal: &Wal<MemDisk>, disk: &MemDisk) -> State {
    let mut state = State::new();
    for group in wal.groups().collect::<Vec<_>>() {
        let first = wal.first_index(group);
        let last = wal.last_index(group);
        let plan = wal.read_plan(group, first, last + 1, None).expect("plan");
        let entries = complete_now(plan.execute(disk)).expect("read");
        for entry in &entries {
            assert_eq!(wal.term(group, entry.index), Ok(entry.term));
        }
        let group_state = GroupState {
            first,
            snapshot_term: wal.term(group, first - 1).expect("snapshot term"),
            entries: entries
                .into_iter()
                .map(|e| (e.term, e.entry_type, e.payload.to_vec()))
                .collect(),
            hard_state: wal.hard_state(group),
        };
        if group_state != GroupState::default() {
            state.insert(group, group_state);
        }
    }
    state
}
