//! Model-based property test: the store against a BTreeMap through random puts, deletes, CAS and
//! gets, checkpoints, compaction, power loss between checkpoints followed by replay of the log
//! from the last durable index (as the engine does), and snapshot + restore on a fresh store.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use proptest::prelude::*;
use ringraft_sm::{
    encode_batch, BatchView, Command, CommandResult, KvConfig, KvStore, MemSmDisk, StateMachine,
};

fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("MemSmDisk never waits"),
    }
}

fn config() -> KvConfig {
    KvConfig {
        inline_value_bytes_max: 8,
        cache_bytes_max: 1024,
        data_file_bytes_max: 8192,
        write_buffer_bytes: 4096,
        compaction_live_percent_max: 60,
        checkpoints_kept: 2,
        snapshot_chunk_bytes: 300,
    }
}

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// What the model says a command yields, applying it.
fn model_apply(model: &mut Model, command: &Command) -> CommandResult {
    match command {
        Command::Put { key, value } => {
            model.insert(key.clone(), value.clone());
            CommandResult::Ok
        }
        Command::Delete { key } => match model.remove(key) {
            Some(_) => CommandResult::Ok,
            None => CommandResult::NotFound,
        },
        Command::CompareAndSwap { key, expected, new } => {
            let current = model.get(key).cloned();
            if current == *expected {
                match new {
                    Some(value) => model.insert(key.clone(), value.clone()),
                    None => model.remove(key),
                };
                CommandResult::Ok
            } else {
                CommandResult::CasMismatch { current }
            }
        }
        Command::Get { key } => model
            .get(key)
            .map_or(CommandResult::NotFound, |v| CommandResult::Value(v.clone())),
    }
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    (0u8..12).prop_map(|k| format!("key{k}").into_bytes())
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Inline; few lengths and many bytes, so overwrites in place change what is stored.
        (0usize..8, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        (9usize..700, any::<u8>()).prop_map(|(n, b)| vec![b; n]), // in data files
    ]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => (key(), value()).prop_map(|(key, value)| Command::Put { key, value }),
        2 => key().prop_map(|key| Command::Delete { key }),
        2 => (key(), proptest::option::of(value()), proptest::option::of(value()))
            .prop_map(|(key, expected, new)| Command::CompareAndSwap { key, expected, new }),
        1 => key().prop_map(|key| Command::Get { key }),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Batch(Vec<Command>),
    Checkpoint,
    Compact(u64),
    Crash,
    SnapshotRestore,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => proptest::collection::vec(command(), 1..6).prop_map(Op::Batch),
        2 => Just(Op::Checkpoint),
        2 => (100u64..3000).prop_map(Op::Compact),
        1 => Just(Op::Crash),
        1 => Just(Op::SnapshotRestore),
    ]
}

fn contents(store: &mut KvStore<MemSmDisk>, keys: impl Iterator<Item = Vec<u8>>) -> Model {
    let mut out = Model::new();
    for key in keys {
        if let Some(value) = now(store.read(&key)).unwrap() {
            out.insert(key, value);
        }
    }
    out
}

fn all_keys() -> impl Iterator<Item = Vec<u8>> {
    (0u8..12).map(|k| format!("key{k}").into_bytes())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let disk = MemSmDisk::new();
    let mut store = now(KvStore::open(disk.clone(), config())).unwrap();
    let mut model = Model::new();
    // The log: every committed batch by index, as the WAL would keep it.
    let mut log: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut index = 0u64;
    for op in ops {
        match op {
            Op::Batch(commands) => {
                index += 1;
                let bytes = encode_batch(commands.clone());
                let view = BatchView::new(&bytes).unwrap();
                let mut results = Vec::new();
                now(store.apply(index, view.batch(), &mut results)).unwrap();
                let expected: Vec<CommandResult> =
                    commands.iter().map(|c| model_apply(&mut model, c)).collect();
                prop_assert_eq!(results, expected);
                prop_assert_eq!(store.applied_index(), index);
                log.push((index, bytes.to_vec()));
            }
            Op::Checkpoint => {
                prop_assert_eq!(now(store.checkpoint()).unwrap(), index);
                prop_assert_eq!(store.durable_index(), index);
            }
            Op::Compact(budget) => {
                now(store.compact_step(budget)).unwrap();
            }
            Op::Crash => {
                drop(store);
                disk.crash();
                store = now(KvStore::open(disk.clone(), config())).unwrap();
                prop_assert!(store.warnings().is_empty(), "{:?}", store.warnings());
                let durable = store.durable_index();
                prop_assert_eq!(store.applied_index(), durable);
                // Replay from the log, twice for the first entry (idempotence).
                for (i, bytes) in log.iter().filter(|(i, _)| *i + 1 >= durable) {
                    let view = BatchView::new(bytes).unwrap();
                    let mut results = Vec::new();
                    now(store.apply(*i, view.batch(), &mut results)).unwrap();
                    prop_assert!(
                        *i > durable || results.is_empty(),
                        "index {i} <= durable {durable} must be skipped"
                    );
                }
                prop_assert_eq!(store.applied_index(), index);
            }
            Op::SnapshotRestore => {
                let snapshot = store.snapshot().unwrap();
                let fresh_disk = MemSmDisk::new();
                let mut fresh = now(KvStore::open(fresh_disk.clone(), config())).unwrap();
                let mut number = 0;
                while let Some(chunk) = now(store.snapshot_chunk(&snapshot, number)).unwrap() {
                    now(fresh.restore_chunk(&chunk)).unwrap();
                    if number == 1 {
                        // A resumed sender repeats a chunk: ignored.
                        let again = now(store.snapshot_chunk(&snapshot, 0)).unwrap().unwrap();
                        now(fresh.restore_chunk(&again)).unwrap();
                    }
                    number += 1;
                }
                prop_assert_eq!(number, snapshot.chunks());
                prop_assert_eq!(now(fresh.restore_finish()).unwrap(), index);
                prop_assert_eq!(contents(&mut fresh, all_keys()), model.clone());
                // The restored store is durable: it survives power loss on its own.
                drop(fresh);
                fresh_disk.crash();
                let mut reopened = now(KvStore::open(fresh_disk, config())).unwrap();
                prop_assert_eq!(reopened.durable_index(), index);
                prop_assert_eq!(contents(&mut reopened, all_keys()), model.clone());
            }
        }
        prop_assert_eq!(contents(&mut store, all_keys()), model.clone());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn store_agrees_with_a_btreemap_across_crashes_compaction_and_snapshots(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

#[test]
fn compaction_reclaims_space_and_old_files_go_after_checkpoints() {
    let disk = MemSmDisk::new();
    let mut store = now(KvStore::open(disk.clone(), config())).unwrap();
    let mut index = 0;
    // Overwrite the same few keys many times: most bytes in sealed files become garbage.
    for round in 0..200u64 {
        index += 1;
        let bytes = encode_batch(vec![Command::Put {
            key: format!("k{}", round % 4).into_bytes(),
            value: vec![round as u8; 500],
        }]);
        now(store.apply(index, BatchView::new(&bytes).unwrap().batch(), &mut Vec::new())).unwrap();
    }
    now(store.checkpoint()).unwrap();
    let before = store.stats();
    assert!(before.data_files > 5, "{before:?}");
    while now(store.compact_step(4096)).unwrap() > 0 {}
    now(store.checkpoint()).unwrap();
    now(store.checkpoint_after_change(&mut index)).unwrap();
    let after = store.stats();
    assert!(after.data_files < before.data_files, "{before:?} -> {after:?}");
    let files = disk.names().iter().filter(|n| n.starts_with("data-")).count();
    assert_eq!(files, after.data_files, "deleted files are gone from disk");
    for k in 0..4u64 {
        let value = now(store.read(format!("k{k}").as_bytes())).unwrap().unwrap();
        assert_eq!(value, vec![(196 + k) as u8; 500]);
    }
}

trait CheckpointAfterChange {
    /// Applies one more entry and checkpoints, so the kept checkpoints move past old files.
    async fn checkpoint_after_change(&mut self, index: &mut u64) -> Result<u64, ringraft_sm::SmError>;
}

impl CheckpointAfterChange for KvStore<MemSmDisk> {
    async fn checkpoint_after_change(&mut self, index: &mut u64) -> Result<u64, ringraft_sm::SmError> {
        for _ in 0..2 {
            *index += 1;
            let bytes = encode_batch(vec![Command::Get { key: b"k0".to_vec() }]);
            self.apply(*index, BatchView::new(&bytes).unwrap().batch(), &mut Vec::new())
                .await?;
            self.checkpoint().await?;
        }
        Ok(*index)
    }
}
