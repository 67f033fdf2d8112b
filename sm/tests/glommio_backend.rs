//! The store on real files: O_DIRECT through glommio, checkpoint, reopen on a fresh executor,
//! compaction, snapshot to another directory.

use glommio::{LocalExecutorBuilder, Placement};
use ringraft_sm::{encode_batch, BatchView, Command, GlommioSmDisk, KvConfig, KvStore, StateMachine};

fn on_executor<T: Send + 'static, F>(f: impl FnOnce() -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10) // tests run in parallel: stay within an 8 MiB memlock limit
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

fn config() -> KvConfig {
    KvConfig {
        data_file_bytes_max: 256 << 10,
        snapshot_chunk_bytes: 64 << 10,
        ..KvConfig::default()
    }
}

fn value(key: u64, round: u64) -> Vec<u8> {
    vec![(key * 7 + round) as u8; 100 + (key as usize * 37) % 3000]
}

#[test]
fn store_survives_reopen_and_streams_a_snapshot_to_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (data, copy) = (dir.path().join("data"), dir.path().join("copy"));
    let (data2, copy2) = (data.clone(), copy.clone());
    on_executor(move || async move {
        let disk = GlommioSmDisk::open(&data2).await.unwrap();
        let mut store = KvStore::open(disk, config()).await.unwrap();
        let mut index = 0;
        for round in 0..5u64 {
            let commands = (0..200u64)
                .map(|k| Command::Put {
                    key: format!("k{k}").into_bytes(),
                    value: value(k, round),
                })
                .collect();
            index += 1;
            let bytes = encode_batch(commands);
            store
                .apply(index, BatchView::new(&bytes).unwrap().batch(), &mut Vec::new())
                .await
                .unwrap();
        }
        assert_eq!(store.checkpoint().await.unwrap(), 5);
        while store.compact_step(1 << 20).await.unwrap() > 0 {}
        store.checkpoint().await.unwrap();
        // Snapshot into a fresh store in another directory.
        let snapshot = store.snapshot().unwrap();
        let mut target = KvStore::open(GlommioSmDisk::open(&copy2).await.unwrap(), config())
            .await
            .unwrap();
        let mut number = 0;
        while let Some(chunk) = store.snapshot_chunk(&snapshot, number).await.unwrap() {
            target.restore_chunk(&chunk).await.unwrap();
            number += 1;
        }
        assert!(number > 1, "several chunks");
        // As the engine does: the new state's checkpoint is written to `restore.tmp` first,
        // and the switch renames it into place.
        target.restore_prepare().await.unwrap();
        assert_eq!(target.restore_finish().await.unwrap(), 5);
    });
    for dir in [data, copy] {
        on_executor(move || async move {
            let mut store = KvStore::open(GlommioSmDisk::open(&dir).await.unwrap(), config())
                .await
                .unwrap();
            assert_eq!(store.durable_index(), 5);
            for k in 0..200u64 {
                assert_eq!(
                    store.read(format!("k{k}").as_bytes()).await.unwrap(),
                    Some(value(k, 4)),
                    "{dir:?} k{k}"
                );
            }
        });
    }
}

#[test]
fn a_relative_directory_checkpoints() {
    // glommio 0.9 opens relative directory paths against fd -1: the checkpoint's directory sync
    // failed with EBADF under a relative data_dir until the disk made its path absolute.
    let dir = tempfile::tempdir_in(".").unwrap();
    let relative = dir
        .path()
        .strip_prefix(std::env::current_dir().unwrap())
        .unwrap()
        .join("data");
    assert!(relative.is_relative());
    on_executor(move || async move {
        let disk = GlommioSmDisk::open(&relative).await.unwrap();
        let mut store = KvStore::open(disk, config()).await.unwrap();
        let batch = encode_batch(vec![Command::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        }]);
        let view = BatchView::new(&batch).unwrap();
        store.apply(1, view.batch(), &mut Vec::new()).await.unwrap();
        assert_eq!(store.checkpoint().await.unwrap(), 1);
    });
}

#[test]
fn stepwise_checkpoints_on_real_files_write_over_the_oldest_and_reopen() {
    // Four stepwise checkpoints, shrinking: from the third on, each is written over the file of
    // the oldest (renamed to checkpoint.tmp), which is longer than the new one. Small values
    // stay inline, so the checkpoint is large; a step is a few KiB, so each takes many writes.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data2 = data.clone();
    on_executor(move || async move {
        let disk = GlommioSmDisk::open(&data2).await.unwrap();
        let mut store = KvStore::open(disk, config()).await.unwrap();
        for round in 0..4u64 {
            let commands: Vec<Command> = (0..4000u64)
                .map(|k| {
                    let key = format!("key-{k}").into_bytes();
                    match k < live_keys(round) {
                        true => Command::Put {
                            key,
                            value: vec![(k + round) as u8; 20],
                        },
                        false => Command::Delete { key },
                    }
                })
                .collect();
            let index = round + 1;
            let bytes = encode_batch(commands);
            let view = BatchView::new(&bytes).unwrap();
            store.apply(index, view.batch(), &mut Vec::new()).await.unwrap();
            let mut steps = 0;
            let durable = loop {
                steps += 1;
                if let Some(durable) = store.checkpoint_step(8 << 10).await.unwrap() {
                    break durable;
                }
            };
            assert_eq!(durable, index);
            assert!(steps > 5, "{steps} steps");
        }
        let names: Vec<String> = std::fs::read_dir(&data2)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("checkpoint"))
            .collect();
        assert_eq!(names.len(), 3, "two kept and the one to write over: {names:?}");
    });
    on_executor(move || async move {
        let mut store = KvStore::open(GlommioSmDisk::open(&data).await.unwrap(), config())
            .await
            .unwrap();
        assert!(store.warnings().is_empty(), "{:?}", store.warnings());
        assert_eq!(store.durable_index(), 4);
        for k in 0..4000u64 {
            let expected = (k < live_keys(3)).then(|| vec![(k + 3) as u8; 20]);
            let key = format!("key-{k}").into_bytes();
            assert_eq!(store.read(&key).await.unwrap(), expected, "key-{k}");
        }
    });
}

/// Keys present after round `round` of the test above: fewer each round.
fn live_keys(round: u64) -> u64 {
    4000 - round * 900
}

#[test]
fn a_stepwise_checkpoint_abandoned_midway_leaves_a_sound_store() {
    // Applies come between steps of a round on real files, then `checkpoint_now` abandons the
    // round and writes a whole checkpoint over the same `checkpoint.tmp`; the store reopens
    // from it with every change.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data2 = data.clone();
    let put = |k: u64, round: u64| Command::Put {
        key: format!("key-{k}").into_bytes(),
        value: vec![(k + round) as u8; 20],
    };
    on_executor(move || async move {
        let disk = GlommioSmDisk::open(&data2).await.unwrap();
        let mut store = KvStore::open(disk, config()).await.unwrap();
        let bytes = encode_batch((0..4000u64).map(|k| put(k, 0)).collect());
        store
            .apply(1, BatchView::new(&bytes).unwrap().batch(), &mut Vec::new())
            .await
            .unwrap();
        for step in 0..6u64 {
            assert_eq!(store.checkpoint_step(8 << 10).await.unwrap(), None, "step {step}");
            let bytes = encode_batch((0..100u64).map(|k| put(k * 40 + step, 1)).collect());
            let view = BatchView::new(&bytes).unwrap();
            store
                .apply(2 + step, view.batch(), &mut Vec::new())
                .await
                .unwrap();
        }
        assert_eq!(store.checkpoint_now().await.unwrap(), 7);
    });
    on_executor(move || async move {
        let mut store = KvStore::open(GlommioSmDisk::open(&data).await.unwrap(), config())
            .await
            .unwrap();
        assert!(store.warnings().is_empty(), "{:?}", store.warnings());
        assert_eq!(store.durable_index(), 7);
        for k in 0..4000u64 {
            let round = u64::from(k % 40 < 6);
            let key = format!("key-{k}").into_bytes();
            assert_eq!(
                store.read(&key).await.unwrap(),
                Some(vec![(k + round) as u8; 20]),
                "key-{k}"
            );
        }
    });
}
