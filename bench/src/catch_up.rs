//! The catch-up scenario: a follower is killed under load, stays down while the leader writes
//! and compacts its log past what the follower has, then restarts. Reported: the load's
//! throughput before, the time until the follower has applied everything the leader had
//! committed when it restarted, the throughput during that catch-up (the dip), and whether the
//! follower caught up by snapshot (it must, when it fell behind the retained log).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringraft_net::client::{fetch_group_metrics, ClientConfig};
use serde::Serialize;

use crate::cluster_bench::{net_client, start_processes_with, ClusterBenchOptions, NodeProcess, Target};

#[derive(Clone, Debug)]
pub struct CatchUpOptions {
    pub exe: PathBuf,
    pub dir: PathBuf,
    /// Closed-loop writer threads.
    pub writers: u64,
    pub value_bytes: usize,
    /// Load measured before the kill.
    pub baseline: Duration,
    /// How long the follower stays down.
    pub down: Duration,
    /// `wal.retain_entries` on every node (the leader compacts this close behind checkpoints).
    pub retain_entries: u64,
    /// Give up waiting for the catch-up after this long.
    pub catch_up_limit: Duration,
}

/// Keys are part of the JSON output (docs/bench-output.md).
#[derive(Clone, Debug, Serialize)]
pub struct CatchUpResult {
    pub writers: u64,
    pub value_bytes: usize,
    pub retain_entries: u64,
    pub down_s: f64,
    pub baseline_ops_per_s: f64,
    /// Entries the follower was behind when it restarted (the leader's commit then minus what
    /// the follower had applied before it was killed).
    pub entries_behind: u64,
    pub catch_up_s: f64,
    pub catch_up_ops_per_s: f64,
    /// Throughput during the catch-up over the baseline.
    pub dip_ratio: f64,
    pub snapshot_installed: bool,
}

/// (applied, commit, is leader) of group 0 on the node at `addr`.
fn group0(addr: &str) -> Option<(u64, u64, bool)> {
    let groups = fetch_group_metrics(addr, &ClientConfig::new([addr])).ok()?;
    groups
        .iter()
        .find(|g| g.group == 0)
        .map(|g| (g.applied, g.commit, g.is_leader))
}

pub fn run(o: &CatchUpOptions) -> Result<CatchUpResult, String> {
    let cluster = ClusterBenchOptions {
        target: Target::Processes { exe: o.exe.clone() },
        dir: o.dir.clone(),
        nodes: 3,
        shards: 1,
        groups_per_shard: 1,
        clients: 1,
        in_flight: o.writers,
        key_bytes: 16,
        value_bytes: o.value_bytes,
        keys: 100_000,
        duration: o.baseline,
        warmup: Duration::from_secs(2),
        workload: crate::workload::Workload::Write,
        distribution: crate::workload::Distribution::Uniform,
        read_consistency: ringraft_engine::Consistency::Linearizable,
        rate: None,
        ops: None,
        spin_us: 0,
    };
    let _ = std::fs::remove_dir_all(o.dir.join("cluster"));
    let retain = o.retain_entries;
    let mut nodes = start_processes_with(&cluster, &o.exe, &|config| {
        config.wal.retain_entries = retain;
        config.wal.retain_for_followers_entries = 0;
        config.sm.checkpoint_interval_ms = 500;
        config.node.log_level = "info".into();
    })?;
    let outcome = scenario(o, &mut nodes);
    for node in nodes {
        let id = node.id;
        if let Err(e) = node.stop() {
            eprintln!("ringraft-bench: node {id}: {e}");
        }
    }
    outcome
}

fn scenario(o: &CatchUpOptions, nodes: &mut [NodeProcess]) -> Result<CatchUpResult, String> {
    let seeds: Vec<String> = nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = net_client(&seeds, Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.put_blocking(b"catch-up-warm", b"x").is_err() {
        if Instant::now() > deadline {
            return Err("group 0 elected no leader within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..o.writers)
        .map(|w| {
            let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
            let value = vec![b'v'; o.value_bytes];
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = crate::key(w << 32 | n, 16);
                    if client.put_blocking(&key, &value).is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let result = (|| {
        std::thread::sleep(Duration::from_secs(2));
        let start = (Instant::now(), acked.load(Ordering::Relaxed));
        std::thread::sleep(o.baseline);
        let baseline_ops_per_s =
            (acked.load(Ordering::Relaxed) - start.1) as f64 / start.0.elapsed().as_secs_f64();
        // Kill a follower of group 0 (kill -9: a crash).
        let victim = nodes
            .iter()
            .position(|n| group0(&n.client_addr).is_some_and(|g| !g.2))
            .ok_or("no follower of group 0 found")?;
        let applied_before = group0(&nodes[victim].client_addr).map_or(0, |g| g.0);
        nodes[victim].kill();
        eprintln!(
            "  node {} (a follower) killed; down for {:?}",
            nodes[victim].id, o.down
        );
        std::thread::sleep(o.down);
        let leader_addr = nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .find_map(|(_, n)| {
                group0(&n.client_addr)
                    .filter(|g| g.2)
                    .map(|_| n.client_addr.clone())
            })
            .ok_or("group 0 has no leader")?;
        let exe = &o.exe;
        nodes[victim].restart(exe)?;
        let restarted = (Instant::now(), acked.load(Ordering::Relaxed));
        let target = group0(&leader_addr).ok_or("the leader does not answer")?.1;
        eprintln!(
            "  node {} restarted, {} entries behind; waiting until it applied index {target}",
            nodes[victim].id,
            target.saturating_sub(applied_before)
        );
        loop {
            if group0(&nodes[victim].client_addr).is_some_and(|g| g.0 >= target) {
                break;
            }
            if restarted.0.elapsed() > o.catch_up_limit {
                return Err(format!("node did not catch up within {:?}", o.catch_up_limit));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let catch_up = restarted.0.elapsed().as_secs_f64();
        let catch_up_ops_per_s = (acked.load(Ordering::Relaxed) - restarted.1) as f64 / catch_up;
        let log = std::fs::read_to_string(&nodes[victim].log).unwrap_or_default();
        Ok(CatchUpResult {
            writers: o.writers,
            value_bytes: o.value_bytes,
            retain_entries: o.retain_entries,
            down_s: o.down.as_secs_f64(),
            baseline_ops_per_s,
            entries_behind: target.saturating_sub(applied_before),
            catch_up_s: catch_up,
            catch_up_ops_per_s,
            dip_ratio: if baseline_ops_per_s > 0.0 {
                catch_up_ops_per_s / baseline_ops_per_s
            } else {
                0.0
            },
            snapshot_installed: log.contains("installed a snapshot"),
        })
    })();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.join();
    }
    result
}
