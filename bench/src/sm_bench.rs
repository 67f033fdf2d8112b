//! The state machine benchmark: apply throughput of validated batches on one core, with
//! checkpoints on, then reads from the index path, then a mixed put/get workload.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use ringraft_sm::{encode_batch, BatchView, Command, GlommioSmDisk, KvConfig, KvStore, StateMachine};
use serde::Serialize;

use crate::key;

#[derive(Clone, Debug)]
pub struct SmBenchOptions {
    pub dir: PathBuf,
    pub batch_commands: usize,
    pub key_bytes: usize,
    pub value_bytes: usize,
    pub keys: u64,
    pub duration: Duration,
    pub checkpoint_interval: Duration,
    pub cpu: Option<usize>,
    pub io_memory_bytes: usize,
}

/// Keys are part of the JSON output (docs/bench-output.md).
#[derive(Clone, Debug, Serialize)]
pub struct SmResult {
    pub batch_commands: usize,
    pub key_bytes: usize,
    pub value_bytes: usize,
    pub keys: u64,
    pub duration_s: f64,
    /// Put batches: validated and applied commands per second, checkpoints included.
    pub commands_per_s: f64,
    pub batches_per_s: f64,
    pub checkpoints: u64,
    pub checkpoint_ms_max: f64,
    /// Local reads through the index.
    pub reads_per_s: f64,
    /// Batches of half puts, half gets (gets through the log).
    pub mixed_commands_per_s: f64,
    /// Taking a snapshot of the whole store (every key), which the shard's loop waits for when
    /// a follower needs one.
    pub snapshot_ms: f64,
    pub rss_bytes_max: u64,
}

pub fn run(options: SmBenchOptions) -> Result<SmResult, String> {
    let placement = options.cpu.map_or(Placement::Unbound, Placement::Fixed);
    let dir = options.dir.join("sm");
    let _ = std::fs::remove_dir_all(&dir);
    let opts = options.clone();
    let handle = LocalExecutorBuilder::new(placement)
        .name("ringraft-bench-sm")
        .io_memory(options.io_memory_bytes)
        .spawn(move || async move { run_on_executor(opts, dir).await })
        .map_err(|e| format!("cannot start the glommio executor: {e}"))?;
    let mut result = handle
        .join()
        .map_err(|e| format!("benchmark executor failed: {e:?}"))??;
    result.rss_bytes_max = crate::wal_bench::rss_bytes_max();
    let _ = std::fs::remove_dir_all(options.dir.join("sm"));
    Ok(result)
}

async fn run_on_executor(o: SmBenchOptions, dir: PathBuf) -> Result<SmResult, String> {
    let disk = GlommioSmDisk::open(&dir)
        .await
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut store = KvStore::open(disk, KvConfig::default())
        .await
        .map_err(|e| e.to_string())?;
    let value = vec![0x42u8; o.value_bytes];
    // Pre-encoded batches (encoding is the proposer's cost, measured elsewhere); the replica's
    // costs are measured here: validation and apply. Enough batches that every key is written
    // (up to 4096 batches: 4M keys at 1,024 commands each): with fewer, the store would hold
    // only the keys they name and stay in the CPU's caches, whatever `--keys` says.
    let put_batches = (o.keys.div_ceil(o.batch_commands as u64)).clamp(64, 4096);
    let batches: Vec<_> = (0..put_batches)
        .map(|b| {
            let commands = (0..o.batch_commands as u64)
                .map(|i| Command::Put {
                    key: key((b * o.batch_commands as u64 + i) % o.keys, o.key_bytes),
                    value: value.clone(),
                })
                .collect();
            encode_batch(commands)
        })
        .collect();
    let mut index = 0u64;
    let mut results = Vec::with_capacity(o.batch_commands);
    let mut checkpoints = 0u64;
    let mut checkpoint_max = Duration::ZERO;
    let start = Instant::now();
    let mut last_checkpoint = start;
    let mut applied_batches = 0u64;
    while start.elapsed() < o.duration {
        index += 1;
        let view = BatchView::new(&batches[(index % put_batches) as usize]).map_err(|e| e.to_string())?;
        results.clear();
        store
            .apply(index, view.batch(), &mut results)
            .await
            .map_err(|e| e.to_string())?;
        applied_batches += 1;
        if last_checkpoint.elapsed() >= o.checkpoint_interval {
            let began = Instant::now();
            store.checkpoint().await.map_err(|e| e.to_string())?;
            checkpoint_max = checkpoint_max.max(began.elapsed());
            checkpoints += 1;
            last_checkpoint = Instant::now();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let commands_per_s = (applied_batches * o.batch_commands as u64) as f64 / elapsed;
    let batches_per_s = applied_batches as f64 / elapsed;

    // Reads through the index (local reads), spread over every key.
    let keys: Vec<Vec<u8>> = (0..65536u64)
        .map(|i| key(i * 7919 % o.keys, o.key_bytes))
        .collect();
    let start = Instant::now();
    let mut reads = 0u64;
    while start.elapsed() < o.duration / 2 {
        for k in &keys {
            std::hint::black_box(store.get(k).await.map_err(|e| e.to_string())?);
        }
        reads += keys.len() as u64;
    }
    let reads_per_s = reads as f64 / start.elapsed().as_secs_f64();

    // Mixed: half puts, half gets through the log.
    let mixed: Vec<_> = (0..16u64)
        .map(|b| {
            let commands = (0..o.batch_commands as u64)
                .map(|i| {
                    let k = key((b * o.batch_commands as u64 + i) * 7919 % o.keys, o.key_bytes);
                    if i % 2 == 0 {
                        Command::Put {
                            key: k,
                            value: value.clone(),
                        }
                    } else {
                        Command::Get { key: k }
                    }
                })
                .collect();
            encode_batch(commands)
        })
        .collect();
    let start = Instant::now();
    let mut mixed_batches = 0u64;
    while start.elapsed() < o.duration / 2 {
        index += 1;
        let view = BatchView::new(&mixed[(index % 16) as usize]).map_err(|e| e.to_string())?;
        results.clear();
        store
            .apply(index, view.batch(), &mut results)
            .await
            .map_err(|e| e.to_string())?;
        mixed_batches += 1;
    }
    let mixed_commands_per_s =
        (mixed_batches * o.batch_commands as u64) as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let snapshot = store.snapshot().map_err(|e| e.to_string())?;
    let snapshot_ms = start.elapsed().as_secs_f64() * 1000.0;
    drop(snapshot);
    store.checkpoint().await.map_err(|e| e.to_string())?;
    Ok(SmResult {
        batch_commands: o.batch_commands,
        key_bytes: o.key_bytes,
        value_bytes: o.value_bytes,
        keys: o.keys,
        duration_s: elapsed,
        commands_per_s,
        batches_per_s,
        checkpoints,
        checkpoint_ms_max: checkpoint_max.as_secs_f64() * 1000.0,
        reads_per_s,
        mixed_commands_per_s,
        snapshot_ms,
        rss_bytes_max: 0,
    })
}
