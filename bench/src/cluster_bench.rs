//! The cluster benchmark with the in-process transport: a whole cluster in this process (one
//! glommio executor per shard per node, channels between nodes), loaded by client executors
//! that each keep a number of puts in flight (closed loop). fsync is on: every acknowledged put
//! is in a quorum's synced WALs.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use ringraft_engine::{Client, Engine, EngineError, NodeStats};
use ringraft_sm::Command;
use ringraft_tuning::{Config, CpuList};
use serde::Serialize;

use crate::key;

#[derive(Clone, Debug)]
pub struct ClusterBenchOptions {
    pub dir: PathBuf,
    pub nodes: u64,
    pub shards: usize,
    pub groups_per_shard: u64,
    pub clients: u64,
    pub in_flight: u64,
    pub key_bytes: usize,
    pub value_bytes: usize,
    pub keys: u64,
    pub duration: Duration,
    pub warmup: Duration,
}

/// Keys are part of the JSON output (docs/bench-output.md).
#[derive(Clone, Debug, Serialize)]
pub struct ClusterResult {
    pub transport: String,
    pub nodes: u64,
    pub shards_per_node: usize,
    pub groups: u64,
    pub clients: u64,
    pub in_flight: u64,
    pub key_bytes: usize,
    pub value_bytes: usize,
    pub duration_s: f64,
    pub ops: u64,
    pub ops_per_s: f64,
    pub latency_us_p50: f64,
    pub latency_us_p99: f64,
    pub latency_us_p999: f64,
    pub latency_us_max: f64,
    pub commands_per_entry_mean: f64,
    /// WAL writes (each one sync) per second, summed over every node.
    pub syncs_per_s: f64,
    pub rss_bytes_max: u64,
    /// Requests answered with an error (Busy, NotLeader during elections, ...).
    pub errors: u64,
}

/// Registered IO memory of each client executor (it only waits on channels and timers).
const CLIENT_IO_MEMORY_BYTES: u64 = 128 << 10;

fn configs(o: &ClusterBenchOptions) -> Result<Vec<Config>, String> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The nodes' arenas share the locked-memory limit with the client executors: size them
    // from what the clients leave.
    let memlock = ringraft_tuning::raise_memlock().map_err(|e| format!("cannot read RLIMIT_MEMLOCK: {e}"))?;
    let clients_locked = o.clients * ringraft_tuning::RINGS_PER_EXECUTOR * CLIENT_IO_MEMORY_BYTES;
    let limit = match memlock.effective() {
        ringraft_tuning::Limit::Unlimited => ringraft_tuning::Limit::Unlimited,
        ringraft_tuning::Limit::Bytes(bytes) => {
            ringraft_tuning::Limit::Bytes(bytes.saturating_sub(clients_locked))
        }
    };
    let auto = ringraft_tuning::IoMemory::Auto(ringraft_tuning::AutoKeyword::Auto);
    let plan = ringraft_tuning::plan_io_memory(&auto, limit, o.nodes * o.shards as u64)
        .map_err(|e| e.to_string())?;
    if let Some(warning) = &plan.warning {
        eprintln!("warning: {warning}");
    }
    Ok((1..=o.nodes)
        .map(|id| {
            let mut config = Config::local_cluster(o.nodes, id);
            config.node.data_dir = o.dir.join("cluster").join(format!("node{id}"));
            config.shards.cpus = CpuList::List((0..o.shards).map(|s| s % online).collect());
            // Several nodes (or more shards than CPUs) on one machine share CPUs: no pinning.
            config.shards.pin = o.nodes == 1 && o.shards <= online;
            config.shards.groups_per_shard = o.groups_per_shard;
            config.glommio.io_memory_bytes = ringraft_tuning::IoMemory::Bytes(plan.per_shard_bytes);
            config
        })
        .collect())
}

/// Counters summed over every node.
fn cluster_stats(engines: &[Engine]) -> NodeStats {
    let mut total = NodeStats::default();
    for engine in engines {
        total.add(engine.stats());
    }
    total
}

/// Waits until every group accepts a write.
fn wait_for_leaders(client: &Client) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for group in 0..client.groups() {
        loop {
            match client.submit_blocking(
                group,
                vec![Command::Get {
                    key: b"warmup".to_vec(),
                }],
            ) {
                Ok(_) => break,
                Err(EngineError::NotLeader { .. } | EngineError::Busy(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(error) => return Err(format!("group {group} did not elect a leader: {error}")),
            }
        }
    }
    Ok(())
}

pub fn run(o: ClusterBenchOptions) -> Result<ClusterResult, String> {
    let _ = std::fs::remove_dir_all(o.dir.join("cluster"));
    let (engines, client) = Engine::start_in_process(configs(&o)?).map_err(|e| e.to_string())?;
    let outcome = load(&o, &engines, &client);
    let mut shutdown = Ok(());
    for engine in engines {
        if let Err(error) = engine.shutdown() {
            shutdown = Err(error);
        }
    }
    let _ = std::fs::remove_dir_all(o.dir.join("cluster"));
    let mut result = outcome?;
    shutdown?;
    result.rss_bytes_max = crate::wal_bench::rss_bytes_max();
    Ok(result)
}

fn load(o: &ClusterBenchOptions, engines: &[Engine], client: &Client) -> Result<ClusterResult, String> {
    wait_for_leaders(client)?;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut executors = Vec::new();
    for c in 0..o.clients {
        let (client, measuring, stop, errors) =
            (client.clone(), measuring.clone(), stop.clone(), errors.clone());
        let (in_flight, keys, key_bytes, value_bytes) = (o.in_flight, o.keys, o.key_bytes, o.value_bytes);
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("ringraft-bench-client-{c}"))
            .io_memory(CLIENT_IO_MEMORY_BYTES as usize)
            .spawn(move || async move {
                let histogram = Rc::new(RefCell::new(
                    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap(),
                ));
                let mut tasks = Vec::new();
                for t in 0..in_flight {
                    let (client, measuring, stop, errors, histogram) = (
                        client.clone(),
                        measuring.clone(),
                        stop.clone(),
                        errors.clone(),
                        histogram.clone(),
                    );
                    tasks.push(glommio::spawn_local(async move {
                        let value = vec![0x5au8; value_bytes];
                        let mut n = (c << 32) ^ (t << 16);
                        while !stop.load(Ordering::Relaxed) {
                            n = n
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let k = key((n >> 16) % keys, key_bytes);
                            let began = Instant::now();
                            let result = client.put(&k, &value).await;
                            if measuring.load(Ordering::Relaxed) {
                                match result {
                                    Ok(()) => histogram
                                        .borrow_mut()
                                        .record(began.elapsed().as_nanos().max(1) as u64)
                                        .unwrap(),
                                    Err(_) => {
                                        errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            if result.is_err() {
                                glommio::timer::sleep(Duration::from_millis(1)).await;
                            }
                        }
                    }));
                }
                for task in tasks {
                    task.await;
                }
                Rc::try_unwrap(histogram).ok().unwrap().into_inner()
            })
            .map_err(|e| format!("cannot start a client executor: {e}"))?;
        executors.push(handle);
    }
    std::thread::sleep(o.warmup);
    let before = cluster_stats(engines);
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(o.duration);
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let after = cluster_stats(engines);
    stop.store(true, Ordering::Relaxed);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    for handle in executors {
        let part = handle
            .join()
            .map_err(|e| format!("client executor failed: {e:?}"))?;
        histogram.add(&part).map_err(|e| e.to_string())?;
    }
    let ops = histogram.len();
    let proposals = after.proposals - before.proposals;
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(ClusterResult {
        transport: "inproc".into(),
        nodes: o.nodes,
        shards_per_node: o.shards,
        groups: client.groups(),
        clients: o.clients,
        in_flight: o.in_flight,
        key_bytes: o.key_bytes,
        value_bytes: o.value_bytes,
        duration_s: elapsed,
        ops,
        ops_per_s: ops as f64 / elapsed,
        latency_us_p50: us(0.5),
        latency_us_p99: us(0.99),
        latency_us_p999: us(0.999),
        latency_us_max: histogram.max() as f64 / 1000.0,
        commands_per_entry_mean: if proposals == 0 {
            0.0
        } else {
            (after.commands_proposed - before.commands_proposed) as f64 / proposals as f64
        },
        syncs_per_s: (after.wal_writes - before.wal_writes) as f64 / elapsed,
        rss_bytes_max: 0,
        errors: errors.load(Ordering::Relaxed),
    })
}
