//! Damaged checkpoint and data files: detected, reported with the file name, never served.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use ringraft_sm::{encode_batch, BatchView, Command, KvConfig, KvStore, MemSmDisk, SmError, StateMachine};

fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("MemSmDisk never waits"),
    }
}

fn put(store: &mut KvStore<MemSmDisk>, index: u64, key: &str, value: &[u8]) {
    let bytes = encode_batch(vec![Command::Put {
        key: key.as_bytes().to_vec(),
        value: value.to_vec(),
    }]);
    now(store.apply(index, BatchView::new(&bytes).unwrap().batch(), &mut Vec::new())).unwrap();
}

fn checkpoints(disk: &MemSmDisk) -> Vec<String> {
    let mut names: Vec<String> = disk
        .names()
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    names
}

/// A store with two checkpoints (at 1 and 2) and a large value in a data file.
fn store_with_two_checkpoints() -> MemSmDisk {
    let disk = MemSmDisk::new();
    let mut store = now(KvStore::open(disk.clone(), KvConfig::default())).unwrap();
    put(&mut store, 1, "small", b"v1");
    now(store.checkpoint()).unwrap();
    put(&mut store, 2, "big", &[7; 5000]);
    now(store.checkpoint()).unwrap();
    assert_eq!(checkpoints(&disk).len(), 2);
    disk
}

#[test]
fn damaged_newest_checkpoint_falls_back_to_the_previous_and_names_it() {
    let disk = store_with_two_checkpoints();
    let newest = checkpoints(&disk).pop().unwrap();
    disk.flip_bit(&newest, 100, 3);
    let mut store = now(KvStore::open(disk.clone(), KvConfig::default())).unwrap();
    assert_eq!(
        store.durable_index(),
        1,
        "recovered from the older checkpoint; the engine replays from 2"
    );
    assert_eq!(store.warnings().len(), 1);
    assert!(
        store.warnings()[0].contains(&newest) && store.warnings()[0].contains("crc32c"),
        "{:?}",
        store.warnings()
    );
    assert_eq!(now(store.read(b"small")).unwrap(), Some(b"v1".to_vec()));
    assert_eq!(now(store.read(b"big")).unwrap(), None);
}

#[test]
fn every_checkpoint_damaged_refuses_to_open_naming_the_file() {
    let disk = store_with_two_checkpoints();
    for name in checkpoints(&disk) {
        disk.flip_bit(&name, 10, 0);
    }
    match now(KvStore::open(disk.clone(), KvConfig::default())) {
        Err(SmError::Corrupt { file, reason, .. }) => {
            assert!(file.starts_with("checkpoint-"), "{file}");
            assert!(reason.contains("no valid checkpoint"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn damaged_value_in_a_data_file_is_an_error_naming_the_file_never_the_bytes() {
    let disk = store_with_two_checkpoints();
    disk.flip_bit("data-0000000000.kv", 40, 1);
    let mut store = now(KvStore::open(disk.clone(), KvConfig::default())).unwrap();
    match now(store.read(b"big")) {
        Err(SmError::Corrupt { file, reason, .. }) => {
            assert_eq!(file, "data-0000000000.kv");
            assert!(reason.contains("crc32c"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Inline values are unaffected.
    assert_eq!(now(store.read(b"small")).unwrap(), Some(b"v1".to_vec()));
}

#[test]
fn truncated_data_file_is_detected_at_open() {
    let disk = store_with_two_checkpoints();
    let bytes = {
        // Replace the data file with a shorter one.
        now(ringraft_sm::SmDisk::remove(&disk, "data-0000000000.kv")).unwrap();
        now(ringraft_sm::SmDisk::write_at(
            &disk,
            "data-0000000000.kv",
            0,
            vec![0; 0],
        ))
        .unwrap();
        disk.names()
    };
    assert!(bytes.contains(&"data-0000000000.kv".to_string()));
    match now(KvStore::open(disk, KvConfig::default())) {
        Err(SmError::Corrupt { file, reason, .. }) => {
            assert_eq!(file, "data-0000000000.kv");
            assert!(reason.contains("the checkpoint needs"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn bad_snapshot_chunks_are_refused() {
    let disk = store_with_two_checkpoints();
    let mut source = now(KvStore::open(disk, KvConfig::default())).unwrap();
    let snapshot = source.snapshot().unwrap();
    let chunk = now(source.snapshot_chunk(&snapshot, 0)).unwrap().unwrap();
    let mut target = now(KvStore::open(MemSmDisk::new(), KvConfig::default())).unwrap();
    let mut damaged = chunk.clone();
    *damaged.last_mut().unwrap() ^= 1;
    assert!(matches!(
        now(target.restore_chunk(&damaged)),
        Err(SmError::BadChunk { .. })
    ));
    assert!(matches!(
        now(target.restore_chunk(b"garbage")),
        Err(SmError::BadChunk { .. })
    ));
    let mut skipped = chunk.clone();
    skipped[16..24].copy_from_slice(&5u64.to_le_bytes()); // claims to be chunk 5, validly
    let crc = crc32c::crc32c(&skipped[..36]);
    skipped[36..40].copy_from_slice(&crc.to_le_bytes());
    match now(target.restore_chunk(&skipped)) {
        Err(SmError::BadChunk { chunk: 5, reason }) => {
            assert!(reason.contains("past the snapshot"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(now(target.restore_finish()), Err(SmError::BadChunk { .. })),
        "nothing to finish"
    );
    now(target.restore_chunk(&chunk)).unwrap();
    assert_eq!(now(target.restore_finish()).unwrap(), 2);
    assert_eq!(now(target.read(b"big")).unwrap(), Some(vec![7; 5000]));
}

#[test]
fn an_incomplete_restore_cannot_finish() {
    let disk = MemSmDisk::new();
    let config = KvConfig {
        snapshot_chunk_bytes: 100,
        ..KvConfig::default()
    };
    let mut source = now(KvStore::open(disk, config.clone())).unwrap();
    for i in 1..=10 {
        put(&mut source, i, &format!("key{i}"), &[i as u8; 90]);
    }
    let snapshot = source.snapshot().unwrap();
    assert!(snapshot.chunks() >= 3);
    let mut target = now(KvStore::open(MemSmDisk::new(), config)).unwrap();
    let second = now(source.snapshot_chunk(&snapshot, 1)).unwrap().unwrap();
    match now(target.restore_chunk(&second)) {
        Err(SmError::BadChunk { chunk: 1, reason }) => {
            assert!(reason.contains("starts at chunk 0"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    now(target.restore_chunk(&now(source.snapshot_chunk(&snapshot, 0)).unwrap().unwrap())).unwrap();
    match now(target.restore_finish()) {
        Err(SmError::BadChunk { reason, .. }) => assert!(reason.contains("only 1 of"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Nothing switched: the target is still empty and can go on receiving.
    assert_eq!(now(target.read(b"key1")).unwrap(), None);
    for number in 1..snapshot.chunks() {
        now(target.restore_chunk(&now(source.snapshot_chunk(&snapshot, number)).unwrap().unwrap())).unwrap();
    }
    assert_eq!(now(target.restore_finish()).unwrap(), 10);
    assert_eq!(now(target.read(b"key7")).unwrap(), Some(vec![7; 90]));
}

/// Entries of a stepwise checkpoint are in no order (a key changed while it is written goes in
/// when it changes), so nothing but this check stops a damaged one from listing a key twice.
#[test]
fn a_checkpoint_listing_a_key_twice_is_refused() {
    let entry = |value: &[u8]| {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&5u64.to_le_bytes());
        bytes.extend_from_slice(b"key");
        bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
        bytes.extend_from_slice(value);
        bytes
    };
    let body = [entry(b"one"), entry(b"two")].concat();
    let mut file = vec![0; 64];
    file[0..8].copy_from_slice(b"RRKVCKP1");
    file[8..12].copy_from_slice(&1u32.to_le_bytes());
    file[16..24].copy_from_slice(&7u64.to_le_bytes());
    file[24..32].copy_from_slice(&2u64.to_le_bytes());
    file[48..56].copy_from_slice(&(body.len() as u64).to_le_bytes());
    file[56..60].copy_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    let crc = crc32c::crc32c(&file[..60]);
    file[60..64].copy_from_slice(&crc.to_le_bytes());
    file.extend_from_slice(&body);
    file.resize(4096, 0);
    let disk = MemSmDisk::new();
    let name = "checkpoint-00000000000000000007.ck";
    now(ringraft_sm::SmDisk::write_at(&disk, name, 0, file.clone())).unwrap();
    match now(KvStore::open(disk, KvConfig::default())) {
        Err(SmError::Corrupt { file, reason, .. }) => {
            assert_eq!(file, name);
            assert!(reason.contains("appears twice"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // The same file with the second key changed opens: the refusal is the duplicate's.
    file[64 + 26 + 16..64 + 26 + 19].copy_from_slice(b"kez"); // the second entry's key
    let crc = crc32c::crc32c(&file[64..64 + body.len()]);
    file[56..60].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32c::crc32c(&file[..60]);
    file[60..64].copy_from_slice(&crc.to_le_bytes());
    let disk = MemSmDisk::new();
    now(ringraft_sm::SmDisk::write_at(&disk, name, 0, file)).unwrap();
    let mut store = now(KvStore::open(disk, KvConfig::default())).unwrap();
    assert_eq!(now(store.read(b"key")).unwrap(), Some(b"one".to_vec()));
    assert_eq!(now(store.read(b"kez")).unwrap(), Some(b"two".to_vec()));
}

mod arbitrary_files {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_checkpoint_bytes_are_an_error_not_a_panic(mut body in proptest::collection::vec(any::<u8>(), 0..600), valid_header in any::<bool>()) {
            let disk = MemSmDisk::new();
            if valid_header && body.len() >= 64 {
                // Make the header and body checksums right, so parsing goes deep.
                body[0..8].copy_from_slice(b"RRKVCKP1");
                body[8..12].copy_from_slice(&1u32.to_le_bytes());
                body[16..24].copy_from_slice(&7u64.to_le_bytes());
                let body_len = (body.len() - 64) as u64;
                body[48..56].copy_from_slice(&body_len.to_le_bytes());
                let crc = crc32c::crc32c(&body[64..]);
                body[56..60].copy_from_slice(&crc.to_le_bytes());
                let crc = crc32c::crc32c(&body[..60]);
                body[60..64].copy_from_slice(&crc.to_le_bytes());
            }
            let padded = body.len().div_ceil(4096).max(1) * 4096;
            let mut buffer = vec![0; padded];
            buffer[..body.len()].copy_from_slice(&body);
            now(ringraft_sm::SmDisk::write_at(&disk, "checkpoint-00000000000000000007.ck", 0, buffer)).unwrap();
            // Either it opens (the bytes happened to describe an empty store) or it is refused.
            let _ = now(KvStore::open(disk, KvConfig::default()));
        }
    }
}

/// Upkeep between the chunks of a restore: the staged records are live only in the restore's
/// index, so compaction must leave their files alone, or the restored state (and the
/// checkpoint that makes it durable) would point into files taken for garbage.
#[test]
fn upkeep_during_a_restore_keeps_the_staged_snapshot() {
    let config = KvConfig {
        inline_value_bytes_max: 8,
        data_file_bytes_max: 1024,
        snapshot_chunk_bytes: 300,
        ..KvConfig::default()
    };
    let mut source = now(KvStore::open(MemSmDisk::new(), config.clone())).unwrap();
    for i in 1..=20 {
        put(&mut source, i, &format!("key{i}"), &[i as u8; 200]);
    }
    let snapshot = source.snapshot().unwrap();
    let target_disk = MemSmDisk::new();
    let mut target = now(KvStore::open(target_disk.clone(), config.clone())).unwrap();
    let mut number = 0;
    while let Some(chunk) = now(source.snapshot_chunk(&snapshot, number)).unwrap() {
        now(target.restore_chunk(&chunk)).unwrap();
        // Staged data fills and seals data files; upkeep runs between chunks.
        while now(target.maintain(1 << 20)).unwrap() > 0 {}
        number += 1;
    }
    assert_eq!(now(target.restore_finish()).unwrap(), 20);
    while now(target.maintain(1 << 20)).unwrap() > 0 {}
    now(target.checkpoint()).unwrap();
    drop(target);
    let mut reopened = now(KvStore::open(target_disk, config)).expect("the restored state recovers");
    for i in 1..=20 {
        assert_eq!(
            now(reopened.read(format!("key{i}").as_bytes())).unwrap(),
            Some(vec![i as u8; 200]),
            "key{i}"
        );
    }
}
