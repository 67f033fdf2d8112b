//! The WAL benchmark: N appenders over G groups on one shard (one glommio executor), each
//! waiting until its entry is durable before appending the next (closed loop). Measures what the
//! group commit turns N concurrent durable appends into.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use ringraft_wal::{Entry, GlommioWal, SyncMode, WalConfig};
use serde::Serialize;

use crate::probe::DiskProbe;

#[derive(Clone, Debug)]
pub struct WalBenchOptions {
    pub dir: PathBuf,
    pub groups: u64,
    pub writers: u64,
    pub payload_bytes: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub sync_mode: SyncMode,
    pub config: WalConfig,
    /// Keep this many entries per group; older ones are compacted as the run goes (so segments
    /// are recycled, as in a real shard).
    pub retain_entries: u64,
    /// Pin the executor to this CPU (must be online); unpinned when `None`.
    pub cpu: Option<usize>,
    /// Poll this long for completions before sleeping when idle (zero: sleep at once; only
    /// when pinned).
    pub spin_before_park: Duration,
    pub io_memory_bytes: usize,
}

/// Results of one WAL run. Keys are part of the JSON output (docs/bench-output.md).
#[derive(Clone, Debug, Serialize)]
pub struct WalResult {
    pub sync_mode: String,
    /// The CPU the executor was pinned to; `null`: unpinned.
    pub cpu: Option<usize>,
    /// Microseconds it polled before sleeping when idle.
    pub spin_before_park_us: u64,
    pub io_memory_bytes: u64,
    pub groups: u64,
    pub writers: u64,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub entries: u64,
    pub entries_per_s: f64,
    pub mb_per_s: f64,
    pub syncs_per_s: f64,
    pub entries_per_sync_mean: f64,
    pub write_bytes_mean: f64,
    pub latency_us_p50: f64,
    pub latency_us_p99: f64,
    pub latency_us_p999: f64,
    pub latency_us_max: f64,
    /// Segment files on disk at the end of the run (bounded by purge and recycling).
    pub segment_files: u64,
    pub recovery_mb_per_s: f64,
    pub recovery_s: f64,
    pub rss_bytes_max: u64,
    /// The same run's device probe, and the ratios against it.
    pub disk: Option<DiskProbe>,
    /// The probe again right after this run: the device drifts over seconds (1 MiB bandwidth
    /// by a third between two runs a minute apart), so the ratios compare against the mean of
    /// the probes before and after.
    pub disk_after: Option<DiskProbe>,
    pub latency_p50_vs_probe_4k_p50: Option<f64>,
    pub mb_per_s_vs_probe_1m: Option<f64>,
}

/// Peak resident set size of this process (VmHWM).
pub fn rss_bytes_max() -> u64 {
    peak_rss_bytes("/proc/self/status")
}

/// VmHWM (peak resident set) from a `/proc/<pid>/status` file, in bytes; 0 if unreadable.
pub fn peak_rss_bytes(status_path: &str) -> u64 {
    std::fs::read_to_string(status_path)
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

struct Shared {
    histogram: RefCell<Histogram<u64>>,
    entries: Cell<u64>,
    measuring: Cell<bool>,
    stop: Cell<bool>,
}

pub fn run(options: WalBenchOptions, disk: Option<DiskProbe>) -> Result<WalResult, String> {
    let placement = match options.cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    let wal_dir = options.dir.join("wal");
    // A fresh log for each run.
    let _ = std::fs::remove_dir_all(&wal_dir);
    let opts = options.clone();
    let mut builder = LocalExecutorBuilder::new(placement);
    if !options.spin_before_park.is_zero() {
        if options.cpu.is_none() {
            return Err("spinning before parking needs a pinned executor (--cpu)".into());
        }
        builder = builder.spin_before_park(options.spin_before_park);
    }
    let handle = builder
        .name("ringraft-bench-wal")
        .io_memory(options.io_memory_bytes)
        .spawn(move || async move { run_on_executor(opts, wal_dir).await })
        .map_err(|e| format!("cannot start the glommio executor: {e}"))?;
    let mut result = handle
        .join()
        .map_err(|e| format!("benchmark executor failed: {e:?}"))??;
    result.disk = disk;
    result.rate_against_probes();
    result.rss_bytes_max = rss_bytes_max();
    Ok(result)
}

impl WalResult {
    /// Sets the ratios against the probe before this run, and the one after it if there is
    /// one: against the mean of both.
    pub fn rate_against_probes(&mut self) {
        let Some(before) = &self.disk else {
            return;
        };
        let mean = |f: fn(&DiskProbe) -> f64| match &self.disk_after {
            Some(after) => (f(before) + f(after)) / 2.0,
            None => f(before),
        };
        self.latency_p50_vs_probe_4k_p50 = Some(self.latency_us_p50 / mean(|p| p.write_4k_latency_us_p50));
        self.mb_per_s_vs_probe_1m = Some(self.mb_per_s / mean(|p| p.write_1m_mb_per_s));
    }
}

async fn run_on_executor(options: WalBenchOptions, wal_dir: PathBuf) -> Result<WalResult, String> {
    let wal = GlommioWal::open(&wal_dir, options.sync_mode, options.config.clone())
        .await
        .map_err(|e| e.to_string())?;
    let shared = Rc::new(Shared {
        histogram: RefCell::new(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram")),
        entries: Cell::new(0),
        measuring: Cell::new(false),
        stop: Cell::new(false),
    });
    let payload = Bytes::from((0..options.payload_bytes).map(|i| i as u8).collect::<Vec<_>>());
    let mut tasks = Vec::new();
    for writer in 0..options.writers {
        let wal = wal.clone();
        let shared = shared.clone();
        let payload = payload.clone();
        let group = writer % options.groups;
        tasks.push(glommio::spawn_local(async move {
            // Closed loop: the next append starts when the last one became durable, so the
            // WAL's one clock reading per write times both (see `GlommioWal::durable_at`).
            let mut durable_at: Option<Instant> = None;
            while !shared.stop.get() {
                let began = durable_at.take().unwrap_or_else(Instant::now);
                let ticket = wal.with(|w| {
                    let index = w.last_index(group) + 1;
                    w.append(
                        group,
                        &[Entry {
                            index,
                            term: 1,
                            entry_type: 0,
                            payload: payload.clone(),
                        }],
                    )
                });
                let ticket = ticket.map_err(|e| e.to_string())?;
                wal.wait_durable(ticket).await.map_err(|e| e.to_string())?;
                let done = wal.durable_at().expect("a write completed");
                durable_at = Some(done);
                if shared.measuring.get() {
                    let nanos = done.saturating_duration_since(began).as_nanos() as u64;
                    shared
                        .histogram
                        .borrow_mut()
                        .record(nanos.max(1))
                        .expect("record");
                    shared.entries.set(shared.entries.get() + 1);
                }
            }
            Ok::<(), String>(())
        }));
    }
    // Compaction keeps each group's log at about `retain_entries`, as a shard would after
    // state machine checkpoints; segments then get recycled instead of accumulating.
    let compactor = {
        let wal = wal.clone();
        let shared = shared.clone();
        let groups = options.groups;
        let retain = options.retain_entries;
        glommio::spawn_local(async move {
            while !shared.stop.get() {
                glommio::timer::sleep(Duration::from_millis(20)).await;
                wal.with(|w| {
                    for group in 0..groups {
                        let through = w.last_index(group).saturating_sub(retain);
                        if through >= w.first_index(group) {
                            let _ = w.compact(group, through);
                        }
                    }
                });
            }
        })
    };

    glommio::timer::sleep(options.warmup).await;
    let stats_before = wal.with(|w| w.stats());
    shared.measuring.set(true);
    let start = Instant::now();
    glommio::timer::sleep(options.duration).await;
    shared.measuring.set(false);
    let elapsed = start.elapsed().as_secs_f64();
    let stats_after = wal.with(|w| w.stats());
    shared.stop.set(true);
    for task in tasks {
        task.await?;
    }
    compactor.await;
    wal.close().await.map_err(|e| e.to_string())?;
    drop(wal);

    // Recovery speed: reopen and replay what is on disk.
    let segment_files = std::fs::read_dir(&wal_dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".wal"))
        .count() as u64;
    let recover_start = Instant::now();
    let reopened = GlommioWal::open(&wal_dir, options.sync_mode, options.config.clone())
        .await
        .map_err(|e| e.to_string())?;
    let recovery_s = recover_start.elapsed().as_secs_f64();
    reopened.close().await.map_err(|e| e.to_string())?;
    let recovered_bytes = segment_files * options.config.segment_bytes;

    let histogram = shared.histogram.borrow();
    let entries = shared.entries.get();
    let writes = stats_after.writes - stats_before.writes;
    let bytes_written = stats_after.bytes_written - stats_before.bytes_written;
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(WalResult {
        sync_mode: options.sync_mode.to_string(),
        cpu: options.cpu,
        spin_before_park_us: options.spin_before_park.as_micros() as u64,
        io_memory_bytes: options.io_memory_bytes as u64,
        groups: options.groups,
        writers: options.writers,
        payload_bytes: options.payload_bytes,
        duration_s: elapsed,
        entries,
        entries_per_s: entries as f64 / elapsed,
        mb_per_s: entries as f64 * options.payload_bytes as f64 / 1e6 / elapsed,
        syncs_per_s: writes as f64 / elapsed,
        entries_per_sync_mean: if writes == 0 {
            0.0
        } else {
            entries as f64 / writes as f64
        },
        write_bytes_mean: if writes == 0 {
            0.0
        } else {
            bytes_written as f64 / writes as f64
        },
        latency_us_p50: us(0.5),
        latency_us_p99: us(0.99),
        latency_us_p999: us(0.999),
        latency_us_max: histogram.max() as f64 / 1000.0,
        segment_files,
        recovery_mb_per_s: recovered_bytes as f64 / 1e6 / recovery_s.max(1e-9),
        recovery_s,
        rss_bytes_max: 0,
        disk: None,
        disk_after: None,
        latency_p50_vs_probe_4k_p50: None,
        mb_per_s_vs_probe_1m: None,
    })
}
