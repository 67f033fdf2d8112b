//! A user's own state machine plugged into the runtime (`Engine::start_with`): the engine
//! drives it (apply, reads, checkpoints) instead of the built-in store.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringraft_engine::{
    Consistency, Engine, EngineError, Envelope, KvFactory, MachineFactory, ShardLink, ShardNet, Transport,
};
use ringraft_sm::{
    ArchivedBatch, Command, CommandResult, GlommioSmDisk, KvSnapshot, KvStore, SmError, StateMachine,
};
use ringraft_tuning::{Config, CpuList, IoMemory};

/// The built-in store, audited: counts the batches the engine applies and the reads it serves.
struct Audited {
    inner: KvStore<GlommioSmDisk>,
    applied: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
}

impl StateMachine for Audited {
    type Snapshot = KvSnapshot;

    async fn apply(
        &mut self,
        index: u64,
        batch: &ArchivedBatch,
        results: &mut Vec<CommandResult>,
    ) -> Result<(), SmError> {
        self.applied.fetch_add(1, Ordering::SeqCst);
        self.inner.apply(index, batch, results).await
    }

    async fn read(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, SmError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read(key).await
    }

    fn applied_index(&self) -> u64 {
        self.inner.applied_index()
    }

    fn durable_index(&self) -> u64 {
        self.inner.durable_index()
    }

    async fn checkpoint(&mut self) -> Result<u64, SmError> {
        self.inner.checkpoint().await
    }

    fn snapshot(&mut self) -> Result<KvSnapshot, SmError> {
        self.inner.snapshot()
    }

    async fn snapshot_chunk(
        &mut self,
        snapshot: &KvSnapshot,
        number: u64,
    ) -> Result<Option<Vec<u8>>, SmError> {
        self.inner.snapshot_chunk(snapshot, number).await
    }

    async fn restore_chunk(&mut self, chunk: &[u8]) -> Result<(), SmError> {
        self.inner.restore_chunk(chunk).await
    }

    async fn restore_finish(&mut self) -> Result<u64, SmError> {
        self.inner.restore_finish().await
    }

    fn restore_abort(&mut self) {
        self.inner.restore_abort()
    }
}

struct AuditedFactory {
    kv: KvFactory,
    applied: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
}

impl MachineFactory<Audited> for AuditedFactory {
    fn open(
        &self,
        group: u64,
        dir: PathBuf,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Audited, String>>>> {
        let inner = self.kv.open(group, dir);
        let (applied, reads) = (self.applied.clone(), self.reads.clone());
        Box::pin(async move {
            Ok(Audited {
                inner: inner.await?,
                applied,
                reads,
            })
        })
    }
}

/// A single-node cluster has no peers to reach.
struct NoPeers;

impl Transport for NoPeers {
    fn start_shard(&self, _: ShardNet) -> Result<Box<dyn ShardLink>, String> {
        Ok(Box::new(NoPeers))
    }
}

impl ShardLink for NoPeers {
    fn send(&mut self, _: u64, _: Envelope) -> bool {
        false
    }

    fn send_piece(&mut self, _: u64, _: ringraft_engine::SnapshotPiece) -> bool {
        false
    }
}

#[test]
fn a_user_state_machine_is_driven_by_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::local_cluster(1, 1);
    config.node.data_dir = dir.path().to_path_buf();
    config.shards.cpus = CpuList::List(vec![0]);
    config.shards.pin = false;
    config.wal.segment_bytes = 1 << 20;
    config.wal.batch_bytes_max = 256 << 10;
    config.batching.entry_bytes_max = 128 << 10;
    config.limits.value_bytes_max = 64 << 10;
    config.glommio.io_memory_bytes = IoMemory::Bytes(512 << 10);
    let (applied, reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let factory = Arc::new(AuditedFactory {
        kv: KvFactory::new(&config),
        applied: applied.clone(),
        reads: reads.clone(),
    });
    let engine = Engine::start_with(config, Arc::new(NoPeers), factory).expect("start");
    let node = engine.handle();
    let put = |key: &[u8]| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let command = Command::Put {
                key: key.to_vec(),
                value: b"v".to_vec(),
            };
            let outcome = node
                .submit(0, vec![command])
                .map(|p| futures_lite::future::block_on(p.result()));
            match outcome.and_then(|r| r) {
                Ok(results) => return results,
                Err(EngineError::NotLeader { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("put: {e}"),
            }
        }
    };
    for i in 0..10u32 {
        assert_eq!(put(&i.to_le_bytes()), vec![CommandResult::Ok]);
    }
    assert!(
        applied.load(Ordering::SeqCst) >= 10,
        "every batch went through the user's machine"
    );
    let value = futures_lite::future::block_on(
        node.read(0, 3u32.to_le_bytes().to_vec(), Consistency::Linearizable)
            .unwrap()
            .result(),
    )
    .unwrap();
    assert_eq!(value, vec![CommandResult::Value(b"v".to_vec())]);
    assert!(
        reads.load(Ordering::SeqCst) >= 1,
        "reads went through the user's machine"
    );
    engine.shutdown().expect("clean shutdown");
}
