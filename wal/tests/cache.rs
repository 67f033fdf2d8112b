//! The entry cache: bounded, never evicting unsynced entries or those above a group's floor,
//! refilled from disk reads.

mod common;

use common::*;
use ringraft_wal::{complete_now, MemDisk, ReadError, WalConfig, READ_GAP_MAX, READ_SPAN_MAX};

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

#[test]
fn reopening_caches_each_group_from_its_floor_on_whatever_the_budget() {
    let disk = MemDisk::new(3);
    let mut wal = open(&disk, &config());
    for index in 1..=10 {
        wal.append(1, &[entry(index, 1, &[index as u8; 300])]).unwrap();
        wal.append(2, &[entry(index, 1, &[index as u8; 300])]).unwrap();
        drive(&mut wal, &disk);
    }
    drop(wal);
    // Group 1's entries from 3 on (8 x 300 bytes, over the 1000-byte budget) are pinned;
    // group 2 has no floor: nothing of it is cached.
    let floors = [(1, 3)].into_iter().collect();
    let wal = complete_now(ringraft_wal::Wal::open_pinned(disk.clone(), config(), floors)).unwrap();
    let pinned = wal.entries(1, 3, 11, None).expect("pinned entries are cached");
    assert_eq!(pinned.len(), 8);
    assert!(pinned.iter().all(|e| e.payload.as_ref() == [e.index as u8; 300]));
    assert!(matches!(
        wal.entries(1, 2, 3, None),
        Err(ReadError::NotCached { index: 2, .. })
    ));
    assert!(matches!(
        wal.entries(2, 10, 11, None),
        Err(ReadError::NotCached { index: 10, .. })
    ));
    let read = complete_now(wal.read_plan(2, 1, 11, None).unwrap().execute(&disk)).unwrap();
    assert_eq!(read.len(), 10);
}

#[test]
fn one_group_pinned_at_the_front_does_not_stop_eviction_for_the_others() {
    let disk = MemDisk::new(4);
    let mut wal = open(&disk, &config());
    // Group 1 appends first and applies nothing (a leader that cannot commit): pinned.
    wal.set_cache_floor(1, 1);
    wal.append(1, &[entry(1, 1, &[1; 300])]).unwrap();
    drive(&mut wal, &disk);
    // Group 2, unpinned, writes far past the 1000-byte budget.
    for index in 1..=50 {
        wal.append(2, &[entry(index, 1, &[2; 300])]).unwrap();
        drive(&mut wal, &disk);
    }
    let cached = wal.stats().cache_bytes;
    assert!(
        cached <= 1000 + 300,
        "cache holds {cached} bytes: eviction stalled behind group 1"
    );
    assert!(
        wal.entries(1, 1, 2, None).is_ok(),
        "the pinned entry stays cached"
    );
    // Once group 1 applies, its entry can go too.
    wal.set_cache_floor(1, 2);
    for index in 51..=55 {
        wal.append(2, &[entry(index, 1, &[2; 300])]).unwrap();
        drive(&mut wal, &disk);
    }
    assert!(wal.stats().cache_bytes <= 1000, "{:?}", wal.stats());
    assert!(matches!(
        wal.entries(1, 1, 2, None),
        Err(ReadError::NotCached { .. })
    ));
}

/// Where `payload` first occurs in any file of the disk.
fn find(disk: &MemDisk, payload: &[u8]) -> (String, usize) {
    for name in disk.names() {
        let bytes = disk.contents(&name).unwrap();
        if let Some(at) = bytes.windows(payload.len()).position(|w| w == payload) {
            return (name, at);
        }
    }
    panic!("payload not on disk");
}

#[test]
fn nearby_records_come_back_in_one_read_per_segment_and_each_is_verified() {
    let disk = MemDisk::new(5);
    let uncached = WalConfig {
        cache_bytes_max: 0,
        ..small_config()
    };
    let mut wal = open(&disk, &uncached);
    // Two groups' entries interleaved, a batch per round: group 2's records are a few hundred
    // bytes apart, over several 24 KiB segments.
    for index in 1..=30u64 {
        wal.append(1, &[entry(index, 1, &[0x10; 200])]).unwrap();
        wal.append(2, &[entry(index, 1, &[0x80 + index as u8; 300])])
            .unwrap();
        drive(&mut wal, &disk);
    }
    let plan = wal.read_plan(2, 1, 31, None).unwrap();
    assert_eq!(plan.disk_reads(), 30);
    let calls = plan.disk_read_calls();
    assert!(
        (2..=6).contains(&calls),
        "30 records over a few segments took {calls} reads"
    );
    let read = complete_now(plan.execute(&disk)).unwrap();
    assert_eq!(read.len(), 30);
    for (at, e) in read.iter().enumerate() {
        assert_eq!(e.index, at as u64 + 1);
        assert_eq!(e.payload.as_ref(), [0x80 + e.index as u8; 300]);
    }
    // A bad record inside a shared read is named, not passed on.
    let (name, offset) = find(&disk, &[0x80 + 17; 300]);
    disk.flip_bit(&name, offset + 100, 3);
    let plan = wal.read_plan(2, 1, 31, None).unwrap();
    match complete_now(plan.execute(&disk)) {
        Err(ringraft_wal::WalError::BadRead { index: 17, file, .. }) => assert_eq!(file, name),
        other => panic!("expected a bad read of index 17, got {other:?}"),
    }
}

#[test]
fn records_far_apart_are_read_separately() {
    let disk = MemDisk::new(6);
    let config = WalConfig {
        segment_bytes: 8 << 20,
        batch_bytes_max: 2 << 20,
        cache_bytes_max: 0,
        segments_recycled_max: 1,
    };
    let mut wal = open(&disk, &config);
    // Group 1: entries 1 and 2 with a gap of just under READ_GAP_MAX of group 2 between them;
    // entries 2 and 3 with a gap over it.
    let small = READ_GAP_MAX - 4096;
    let large = READ_GAP_MAX + 4096;
    wal.append(1, &[entry(1, 1, &[1; 64])]).unwrap();
    wal.append(2, &[entry(1, 1, &vec![2; small])]).unwrap();
    wal.append(1, &[entry(2, 1, &[3; 64])]).unwrap();
    wal.append(2, &[entry(2, 1, &vec![4; large])]).unwrap();
    wal.append(1, &[entry(3, 1, &[5; 64])]).unwrap();
    drive(&mut wal, &disk);
    let plan = wal.read_plan(1, 1, 4, None).unwrap();
    assert_eq!((plan.disk_reads(), plan.disk_read_calls()), (3, 2));
    let read = complete_now(plan.execute(&disk)).unwrap();
    let payloads: Vec<u8> = read.iter().map(|e| e.payload[0]).collect();
    assert_eq!(payloads, [1, 3, 5]);
    // Adjacent records share a read only up to READ_SPAN_MAX: three of 40% of it take two.
    let big = READ_SPAN_MAX * 2 / 5;
    for index in 3..=5 {
        wal.append(2, &[entry(index, 1, &vec![index as u8; big])])
            .unwrap();
    }
    drive(&mut wal, &disk);
    let plan = wal.read_plan(2, 3, 6, None).unwrap();
    assert_eq!((plan.disk_reads(), plan.disk_read_calls()), (3, 2));
    let read = complete_now(plan.execute(&disk)).unwrap();
    assert!(read
        .iter()
        .all(|e| e.payload.len() == big && e.payload[0] == e.index as u8));
}
