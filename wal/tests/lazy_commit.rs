//! Commit-only hard states (`set_commit_lazily`) cost no write of their own: they ride along
//! with the next write, and a crash before it loses only the commit advance.

mod common;

use common::*;
use ringraft_wal::{HardState, MemDisk};

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit }
}

#[test]
fn a_lazy_commit_causes_no_write_and_rides_along_with_the_next() {
    let disk = MemDisk::new(7);
    let config = small_config();
    let mut wal = open(&disk, &config);
    wal.append(1, &[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
    wal.set_hard_state(1, hard_state(1, 1, 0)).unwrap();
    drive(&mut wal, &disk);
    let durable = wal.durable_ticket();

    wal.set_commit_lazily(1, hard_state(1, 1, 2)).unwrap();
    assert!(wal.poll_io().is_none(), "a lazy commit must not cause a write");
    assert_eq!(wal.durable_ticket(), durable);
    assert_eq!(wal.hard_state(1).commit, 2, "visible at once");

    // Another group's write carries it.
    wal.append(2, &[entry(1, 1, b"c")]).unwrap();
    drive(&mut wal, &disk);
    disk.crash();
    let wal = open(&disk, &config);
    assert_eq!(wal.hard_state(1), hard_state(1, 1, 2));
}

#[test]
fn a_crash_before_any_write_loses_only_the_commit_advance() {
    let disk = MemDisk::new(8);
    let config = small_config();
    let mut wal = open(&disk, &config);
    wal.append(1, &[entry(1, 1, b"a")]).unwrap();
    wal.set_hard_state(1, hard_state(1, 1, 0)).unwrap();
    drive(&mut wal, &disk);
    wal.set_commit_lazily(1, hard_state(1, 1, 1)).unwrap();
    disk.crash();
    let wal = open(&disk, &config);
    assert_eq!(wal.hard_state(1), hard_state(1, 1, 0));
    assert_eq!(wal.last_index(1), 1, "entries are untouched");
}

#[test]
fn lazy_then_real_hard_states_recover_in_order() {
    let disk = MemDisk::new(9);
    let config = small_config();
    let mut wal = open(&disk, &config);
    wal.append(1, &[entry(1, 1, b"a")]).unwrap();
    wal.set_hard_state(1, hard_state(1, 1, 0)).unwrap();
    drive(&mut wal, &disk);
    wal.set_commit_lazily(1, hard_state(1, 1, 1)).unwrap();
    // A term change after the lazy commit: the newer state must win on recovery.
    wal.set_hard_state(1, hard_state(2, 0, 1)).unwrap();
    drive(&mut wal, &disk);
    disk.crash();
    let wal = open(&disk, &config);
    assert_eq!(wal.hard_state(1), hard_state(2, 0, 1));
}

#[test]
#[should_panic(expected = "changes term or vote")]
fn a_lazy_hard_state_may_not_change_term_or_vote() {
    let disk = MemDisk::new(10);
    let mut wal = open(&disk, &small_config());
    wal.set_hard_state(1, hard_state(1, 1, 0)).unwrap();
    let _ = wal.set_commit_lazily(1, hard_state(2, 1, 0));
}
