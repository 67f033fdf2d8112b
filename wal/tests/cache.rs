//! The entry cache: bounded, never evicting unsynced entries or those above a group's floor,
//! refilled from disk reads.

mod common;

use common::*;
use ringraft_wal::{complete_now, MemDisk, ReadError, WalConfig};

fn config() -> WalConfig {
    WalConfig {
        cache_bytes_max: 1000,
        ..small_config()
    }
}

#[test]
fn cache_evicts_down_to_its_budget_but_never_above_the_floor() {
    let disk = MemDisk::new(1);
    let mut wal = open(&disk, &config());
    // Entries from 5 on are "unapplied": pinned.
    wal.set_cache_floor(1, 5);
    for index in 1..=10 {
        wal.append(1, &[entry(index, 1, &[index as u8; 300])]).unwrap();
        drive(&mut wal, &disk);
    }
    assert!(matches!(
        wal.entries(1, 1, 2, None),
        Err(ReadError::NotCached { index: 1, .. })
    ));
    let pinned = wal
        .entries(1, 5, 11, None)
        .expect("entries above the floor stay cached");
    assert_eq!(pinned.len(), 6);
    // Raising the floor releases them.
    wal.set_cache_floor(1, 11);
    assert!(wal.stats().cache_bytes <= 1000, "{:?}", wal.stats());
    assert!(matches!(
        wal.entries(1, 5, 6, None),
        Err(ReadError::NotCached { .. })
    ));
}

#[test]
fn entries_read_from_disk_can_be_cached_again() {
    let disk = MemDisk::new(2);
    let mut wal = open(&disk, &config());
    for index in 1..=8 {
        wal.append(1, &[entry(index, 2, &[index as u8; 400])]).unwrap();
        drive(&mut wal, &disk);
    }
    assert!(wal.entries(1, 1, 3, None).is_err());
    let plan = wal.read_plan(1, 1, 3, None).unwrap();
    assert_eq!(plan.disk_reads(), 2);
    let read = complete_now(plan.execute(&disk)).unwrap();
    wal.insert_cached(1, &read);
    let cached = wal.entries(1, 1, 3, None).expect("cached after insert_cached");
    assert_eq!(cached, read);
    // Entries replaced since the read are not cached under the new ones' identity.
    wal.append(1, &[entry(2, 3, b"replacement")]).unwrap();
    wal.insert_cached(1, &read);
    assert_eq!(
        wal.entries(1, 2, 3, None).unwrap()[0].payload.as_ref(),
        b"replacement"
    );
}
