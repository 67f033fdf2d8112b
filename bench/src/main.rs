//! `ringraft-bench`: see `--help`, README.md and docs/bench-output.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ringraft_bench::{machine, probe, wal_bench};
use ringraft_wal::{SyncMode, WalConfig};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "ringraft-bench",
    version,
    about = "Benchmarks for ringraft, each measured against the raw device probe of the same run",
    long_about = "Benchmarks for ringraft. Every run records the machine and, unless --no-probe is given, \
                  measures the device itself first (io_uring, O_DIRECT, fdatasync) so that results \
                  are reported as ratios to what the disk can do."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The raw device probe: durable write rounds (4 KiB, 64 KiB, 1 MiB write + fdatasync at
    /// queue depth 1) and sequential O_DIRECT bandwidth.
    Disk {
        #[command(flatten)]
        common: Common,
    },
    /// The write-ahead log: N closed-loop appenders over G groups on one shard, each waiting for
    /// durability before its next append.
    Wal(WalArgs),
}

#[derive(Args, Debug)]
struct Common {
    /// Directory for benchmark files (created; must be on the device to measure; O_DIRECT).
    #[arg(long, default_value = "ringraft-bench-data")]
    dir: PathBuf,
    /// Print one JSON object on stdout instead of the table (keys: docs/bench-output.md).
    #[arg(long)]
    json: bool,
    /// Seconds the probe spends on each write size.
    #[arg(long, default_value_t = 1.0, value_parser = positive_f64)]
    probe_seconds: f64,
    /// Size of the probe's file in MiB (written in full before measuring).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(4..=65536))]
    probe_file_mib: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum SyncChoice {
    /// O_DSYNC segment files: the write is the sync.
    Dsync,
    /// O_DIRECT write, then fdatasync.
    Fdatasync,
    /// Run both and report the faster as `wal` (all runs under `wal_runs`).
    Both,
}

#[derive(Args, Debug)]
struct WalArgs {
    #[command(flatten)]
    common: Common,
    /// Raft groups sharing the WAL.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    groups: u64,
    /// Concurrent appenders (closed loop: each waits for durability before appending again).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    writers: u64,
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(0..=(64 << 20)))]
    payload_bytes: u64,
    /// Measured seconds per sync mode.
    #[arg(long, default_value_t = 10.0, value_parser = positive_f64)]
    duration_s: f64,
    /// Unmeasured warm-up seconds before each measurement.
    #[arg(long, default_value_t = 2.0, value_parser = non_negative_f64)]
    warmup_s: f64,
    /// How writes are made durable.
    #[arg(long, value_enum, default_value_t = SyncChoice::Both)]
    sync_mode: SyncChoice,
    /// Segment file size in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4095))]
    segment_mib: u64,
    /// Largest batch (one write) in KiB; a multiple of 4.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(4..=(1 << 20)))]
    batch_kib: u64,
    /// Entry cache in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: u64,
    /// Entries kept per group; older ones are compacted during the run.
    #[arg(long, default_value_t = 10_000)]
    retain_entries: u64,
    /// Pin the benchmark's executor to this (online) CPU; unpinned by default.
    #[arg(long)]
    cpu: Option<usize>,
    /// glommio io_memory of the executor in MiB. Default: sized from the locked-memory limit
    /// (raised soft to hard first), as the node does; glommio registers it in three rings.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    io_memory_mib: Option<u64>,
    /// Skip the device probe (no ratios are printed).
    #[arg(long)]
    no_probe: bool,
}

fn positive_f64(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(format!("{text} must be greater than 0"))
    }
}

fn non_negative_f64(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(format!("{text} must be 0 or more"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ringraft-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

fn run_probe(common: &Common) -> Result<probe::DiskProbe, String> {
    eprintln!(
        "probing the device under {} ({} MiB file, {} s per size)...",
        common.dir.display(),
        common.probe_file_mib,
        common.probe_seconds
    );
    probe::run(&common.dir, common.probe_file_mib << 20, common.probe_seconds)
        .map_err(|e| format!("device probe in {}: {e}", common.dir.display()))
}

fn print_probe(probe: &probe::DiskProbe) {
    println!("device probe (io_uring, O_DIRECT, write + fdatasync at queue depth 1)");
    println!(
        "  {:<10} {:>12} {:>10} {:>10} {:>10}",
        "size", "rounds/s", "p50 us", "p99 us", "MB/s"
    );
    let rows = [
        (
            "4 KiB",
            probe.write_4k_rounds_per_s,
            probe.write_4k_latency_us_p50,
            probe.write_4k_latency_us_p99,
            probe.write_4k_rounds_per_s * 4096.0 / 1e6,
        ),
        (
            "64 KiB",
            probe.write_64k_rounds_per_s,
            probe.write_64k_latency_us_p50,
            probe.write_64k_latency_us_p99,
            probe.write_64k_mb_per_s,
        ),
        (
            "1 MiB",
            probe.write_1m_rounds_per_s,
            probe.write_1m_latency_us_p50,
            probe.write_1m_latency_us_p99,
            probe.write_1m_mb_per_s,
        ),
    ];
    for (size, rounds, p50, p99, mb) in rows {
        println!("  {size:<10} {rounds:>12.0} {p50:>10.0} {p99:>10.0} {mb:>10.1}");
    }
    println!(
        "  sequential 1 MiB O_DIRECT, 4 in flight, one fdatasync: {:.0} MB/s",
        probe.sequential_mb_per_s
    );
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Disk { common } => {
            let machine = machine::detect_after_create(&common.dir)?;
            let probe = run_probe(&common)?;
            if common.json {
                println!(
                    "{}",
                    json!({ "command": command_line(), "machine": machine, "disk": probe })
                );
            } else {
                print_machine(&machine);
                print_probe(&probe);
            }
            Ok(())
        }
        Command::Wal(args) => run_wal(args),
    }
}

fn print_machine(machine: &machine::Machine) {
    println!(
        "machine: {} | {} CPUs | kernel {} | disk {} | ringraft {}",
        machine.cpu_model, machine.cpus_online, machine.kernel, machine.disk, machine.ringraft_version
    );
}

fn run_wal(args: WalArgs) -> Result<(), String> {
    let common = &args.common;
    let config = WalConfig {
        segment_bytes: args.segment_mib << 20,
        batch_bytes_max: (args.batch_kib << 10) as usize,
        cache_bytes_max: (args.cache_mib << 20) as usize,
        segments_recycled_max: 2,
    };
    config.validate().map_err(|e| e.to_string())?;
    if args.payload_bytes as usize > config.payload_bytes_max() {
        return Err(format!(
            "--payload-bytes {} exceeds what one batch holds ({} with --batch-kib {})",
            args.payload_bytes,
            config.payload_bytes_max(),
            args.batch_kib
        ));
    }
    if let Some(cpu) = args.cpu {
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpu >= online {
            return Err(format!(
                "--cpu {cpu} is not an online CPU (this machine has {online}: 0..{})",
                online - 1
            ));
        }
    }
    let memlock = ringraft_tuning::raise_memlock().map_err(|e| format!("cannot read RLIMIT_MEMLOCK: {e}"))?;
    let requested = match args.io_memory_mib {
        Some(mib) => ringraft_tuning::IoMemory::Bytes(mib << 20),
        None => ringraft_tuning::IoMemory::Auto(ringraft_tuning::AutoKeyword::Auto),
    };
    let io_memory =
        ringraft_tuning::plan_io_memory(&requested, memlock.effective(), 1).map_err(|e| e.to_string())?;
    if let Some(warning) = &io_memory.warning {
        eprintln!("warning: {warning}");
    }
    let machine = machine::detect_after_create(&common.dir)?;
    let probe = if args.no_probe {
        None
    } else {
        Some(run_probe(common)?)
    };
    let modes = match args.sync_mode {
        SyncChoice::Dsync => vec![SyncMode::Dsync],
        SyncChoice::Fdatasync => vec![SyncMode::Fdatasync],
        SyncChoice::Both => vec![SyncMode::Dsync, SyncMode::Fdatasync],
    };
    let mut runs = Vec::new();
    for mode in modes {
        eprintln!(
            "wal: {} writers, {} groups, {} B payloads, sync {mode}, {} s (+{} s warm-up)...",
            args.writers, args.groups, args.payload_bytes, args.duration_s, args.warmup_s
        );
        let options = wal_bench::WalBenchOptions {
            dir: common.dir.clone(),
            groups: args.groups,
            writers: args.writers,
            payload_bytes: args.payload_bytes as usize,
            duration: Duration::from_secs_f64(args.duration_s),
            warmup: Duration::from_secs_f64(args.warmup_s),
            sync_mode: mode,
            config: config.clone(),
            retain_entries: args.retain_entries,
            cpu: args.cpu,
            io_memory_bytes: io_memory.per_shard_bytes as usize,
        };
        runs.push(wal_bench::run(options, probe.clone())?);
    }
    let _ = std::fs::remove_dir_all(common.dir.join("wal"));
    let best = runs
        .iter()
        .max_by(|a, b| a.entries_per_s.total_cmp(&b.entries_per_s))
        .expect("at least one run")
        .clone();
    if common.json {
        println!(
            "{}",
            json!({ "command": command_line(), "machine": machine, "disk": probe, "wal": best, "wal_runs": runs })
        );
        return Ok(());
    }
    print_machine(&machine);
    if let Some(probe) = &probe {
        print_probe(probe);
    }
    println!(
        "wal: {} writers, {} groups, {} B payloads (closed loop, durable before next append)",
        args.writers, args.groups, args.payload_bytes
    );
    println!(
        "  {:<10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "sync", "entries/s", "MB/s", "syncs/s", "per sync", "p50 us", "p99 us", "p999 us", "recov MB/s"
    );
    for run in &runs {
        println!(
            "  {:<10} {:>12.0} {:>9.1} {:>9.0} {:>9.1} {:>9.0} {:>9.0} {:>9.0} {:>10.0}",
            run.sync_mode,
            run.entries_per_s,
            run.mb_per_s,
            run.syncs_per_s,
            run.entries_per_sync_mean,
            run.latency_us_p50,
            run.latency_us_p99,
            run.latency_us_p999,
            run.recovery_mb_per_s
        );
    }
    if let (Some(p50), Some(bandwidth)) = (best.latency_p50_vs_probe_4k_p50, best.mb_per_s_vs_probe_1m) {
        println!(
            "  best ({}): p50 latency = {p50:.2}x the probe's 4 KiB durable write; bandwidth = {:.0}% of the probe's 1 MiB durable writes",
            best.sync_mode,
            bandwidth * 100.0
        );
    }
    println!(
        "  peak RSS {:.1} MiB",
        best.rss_bytes_max as f64 / (1 << 20) as f64
    );
    Ok(())
}
