//! `ringraft-bench`: see `--help`, README.md and docs/bench-output.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ringraft_bench::workload::{Distribution, Workload};
use ringraft_bench::{machine, probe, wal_bench};
use ringraft_wal::{SyncMode, WalConfig};
use serde_json::json;

/// The allocator of the `ringraft` binary (the nodes this runs are measured as they ship).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Without a command: `cluster` with its defaults (three node processes on loopback).
    #[command(subcommand)]
    command: Option<Command>,
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
    /// A whole cluster (the default command): node processes on loopback talking TCP, nodes in
    /// this process (`--transport inproc`) or an existing cluster (`--connect`), loaded by
    /// client executors keeping puts in flight; fsync on.
    Cluster(ClusterArgs),
    /// The cluster benchmark over shard counts and group counts (one fresh cluster each): how
    /// throughput grows with cores and what many groups cost.
    Scale(ScaleArgs),
    /// A follower falls behind the retained log and catches up: three node processes under
    /// closed-loop writes; one follower is killed, stays down while the leader compacts past
    /// it, and restarts. Reports catch-up time, the throughput dip during it, and whether a
    /// snapshot was installed.
    CatchUp(CatchUpArgs),
    /// Prints two results (`--json` outputs) side by side with the ratio B / A of every number
    /// they share.
    Compare {
        /// The baseline.
        a: PathBuf,
        /// The run compared with it.
        b: PathBuf,
    },
    /// Runs one node (what `ringraft run` does); the cluster benchmark starts its nodes so.
    #[command(hide = true)]
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// The state machine: apply throughput of validated batches of puts on one core with
    /// checkpoints on, reads from the index, and a mixed put/get workload.
    Sm(SmArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Transport {
    /// One process per node on 127.0.0.1, TCP between them (the real thing).
    Tcp,
    /// Nodes in this process, messages through channels.
    Inproc,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum WorkloadArg {
    Write,
    ReadHeavy,
    Mixed,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ConsistencyArg {
    Linearizable,
    Local,
    /// Linearizable through the leader's lease (no round trip while it holds).
    Lease,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum DistributionArg {
    Uniform,
    Zipfian,
}

fn zipf_theta(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if value > 0.0 && value < 1.0 {
        Ok(value)
    } else {
        Err(format!("{text} must be between 0 and 1 (exclusive)"))
    }
}

#[derive(Args, Debug)]
struct CatchUpArgs {
    /// Directory for the nodes' files.
    #[arg(long, default_value = "ringraft-bench-data")]
    dir: PathBuf,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Closed-loop writer threads.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    writers: u64,
    #[arg(long, default_value_t = 64)]
    value_bytes: usize,
    /// Seconds of load measured before the kill.
    #[arg(long, default_value_t = 5)]
    baseline_s: u64,
    /// Seconds the follower stays down.
    #[arg(long, default_value_t = 10)]
    down_s: u64,
    /// `wal.retain_entries` on every node: the leader compacts this close behind checkpoints,
    /// so a follower down for a few seconds needs a snapshot.
    #[arg(long, default_value_t = 1000)]
    retain_entries: u64,
}

#[derive(Args, Debug)]
struct ScaleArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Shards (executors) per node to try.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 2], value_parser = clap::value_parser!(u64).range(1..=256))]
    shards_list: Vec<u64>,
    /// Raft groups per node to try (multiples of the shard count).
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 4, 16, 64], value_parser = clap::value_parser!(u64).range(1..=100_000))]
    groups_list: Vec<u64>,
}

#[derive(Args, Debug)]
struct ClusterArgs {
    /// Directory for the nodes' files.
    #[arg(long, default_value = "ringraft-bench-data")]
    dir: PathBuf,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// How nodes talk to each other.
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    transport: Transport,
    /// Drive an existing cluster instead of starting one: client addresses (host:port,
    /// comma-separated) to learn it from. --nodes, --shards and --groups-per-shard are then the
    /// cluster's own.
    #[arg(long, value_delimiter = ',', conflicts_with = "transport")]
    connect: Vec<String>,
    /// Skip the device probe (no ratio to the disk's durable-write limit).
    #[arg(long)]
    no_probe: bool,
    /// The operation mix: write (puts), read-heavy (9 reads : 1 put), mixed (50% puts, 25%
    /// reads, 25% compare-and-swap).
    #[arg(long, value_enum, default_value_t = WorkloadArg::Write)]
    workload: WorkloadArg,
    /// Consistency of the reads in read-heavy and mixed workloads.
    #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
    read_consistency: ConsistencyArg,
    /// How keys are drawn.
    #[arg(long, value_enum, default_value_t = DistributionArg::Uniform)]
    distribution: DistributionArg,
    /// Skew of the zipfian distribution (0 < theta < 1; YCSB uses 0.99).
    #[arg(long, default_value_t = 0.99, value_parser = zipf_theta)]
    zipf_theta: f64,
    /// Open loop: send this many requests per second in total (spread over every client's
    /// in-flight slots) and count latency from each request's intended start (no coordinated
    /// omission). Without it: closed loop.
    #[arg(long, value_parser = positive_f64)]
    rate: Option<f64>,
    /// Open-loop rates to try in turn on the same cluster (comma-separated); reports the highest
    /// whose p99 stays within --p99-bound-ms.
    #[arg(long, value_delimiter = ',', value_parser = positive_f64, conflicts_with = "rate")]
    sweep_rates: Vec<f64>,
    /// The p99 bound of --sweep-rates, in milliseconds.
    #[arg(long, default_value_t = 10.0, value_parser = positive_f64)]
    p99_bound_ms: f64,
    /// Save the run's latency histogram (nanoseconds, HdrHistogram V2 + deflate, base64 on one
    /// line: `hdrhistogram`'s interchange format).
    #[arg(long)]
    hist_out: Option<PathBuf>,
    /// Draw the latency percentile curve into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Seconds the probe spends on each write size.
    #[arg(long, default_value_t = 0.5, value_parser = positive_f64)]
    probe_seconds: f64,
    /// Size of the probe's file in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(4..=65536))]
    probe_file_mib: u64,
    /// Nodes (the replication factor).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    nodes: u64,
    /// Shards (executors) per node.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    shards: u64,
    /// Raft groups per shard.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    groups_per_shard: u64,
    /// Client executors (with one node: on the CPUs its pinned shards leave, if any).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=256))]
    clients: u64,
    /// Puts each client executor keeps in flight.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    in_flight: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    key_bytes: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=(1 << 20)))]
    value_bytes: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Measured seconds (with --ops: the most).
    #[arg(long, default_value_t = 10.0, value_parser = positive_f64)]
    duration_s: f64,
    /// End the measured window after this many acknowledged operations (or at --duration-s,
    /// whichever comes first).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    ops: Option<u64>,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 2.0, value_parser = non_negative_f64)]
    warmup_s: f64,
    /// The nodes' `glommio.spin_before_park_us`: microseconds an idle shard polls before it
    /// sleeps. Needs pinned shards (one node, at most one shard per online CPU).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=ringraft_tuning::SPIN_BEFORE_PARK_US_MAX))]
    spin_us: u64,
}

#[derive(Args, Debug)]
struct SmArgs {
    /// Directory for the store's files.
    #[arg(long, default_value = "ringraft-bench-data")]
    dir: PathBuf,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Commands per batch (one raft entry).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    batch_commands: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    key_bytes: u64,
    /// Value size in bytes (values up to 64 bytes are kept inline in the index).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=(1 << 20)))]
    value_bytes: u64,
    /// Distinct keys written.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Seconds of put batches (reads and the mixed workload run half as long each).
    #[arg(long, default_value_t = 10.0, value_parser = positive_f64)]
    duration_s: f64,
    /// Seconds between checkpoints during the put phase.
    #[arg(long, default_value_t = 1.0, value_parser = positive_f64)]
    checkpoint_interval_s: f64,
    /// Pin the executor to this (online) CPU; unpinned by default.
    #[arg(long)]
    cpu: Option<usize>,
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
    /// Pin the benchmark's executor to this (online) CPU. Default: the first CPU taking the
    /// disk's completion interrupts, if they can be told (woken there, a write's completion
    /// needs no cross-CPU wake-up), else unpinned.
    #[arg(long, conflicts_with = "unpinned")]
    cpu: Option<usize>,
    /// Leave the executor unpinned.
    #[arg(long)]
    unpinned: bool,
    /// Microseconds the executor polls for completions before it sleeps when it has nothing to
    /// run (glommio's spin_before_park; the node's `glommio.spin_before_park_us`). Needs a
    /// pinned executor.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=ringraft_tuning::SPIN_BEFORE_PARK_US_MAX))]
    spin_us: u64,
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

fn read_result(path: &std::path::Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a ringraft-bench --json result: {e}", path.display()))
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
    println!("device probe (io_uring, O_DIRECT, durable writes at queue depth 1, the faster of O_DSYNC and write + fdatasync)");
    println!(
        "  {:<10} {:>12} {:>10} {:>10} {:>10}  method",
        "size", "rounds/s", "p50 us", "p99 us", "MB/s"
    );
    let rows = [
        (
            "4 KiB",
            probe.write_4k_rounds_per_s,
            probe.write_4k_latency_us_p50,
            probe.write_4k_latency_us_p99,
            probe.write_4k_rounds_per_s * 4096.0 / 1e6,
            probe.durable_method_4k,
        ),
        (
            "64 KiB",
            probe.write_64k_rounds_per_s,
            probe.write_64k_latency_us_p50,
            probe.write_64k_latency_us_p99,
            probe.write_64k_mb_per_s,
            probe.durable_method_64k,
        ),
        (
            "1 MiB",
            probe.write_1m_rounds_per_s,
            probe.write_1m_latency_us_p50,
            probe.write_1m_latency_us_p99,
            probe.write_1m_mb_per_s,
            probe.durable_method_1m,
        ),
    ];
    for (size, rounds, p50, p99, mb, method) in rows {
        println!("  {size:<10} {rounds:>12.0} {p50:>10.0} {p99:>10.0} {mb:>10.1}  {method}");
    }
    println!(
        "  sequential 1 MiB O_DIRECT, 4 in flight, one fdatasync: {:.0} MB/s",
        probe.sequential_mb_per_s
    );
}

fn run(cli: Cli) -> Result<(), String> {
    let command = match cli.command {
        Some(command) => command,
        None => Cli::parse_from(["ringraft-bench", "cluster"])
            .command
            .expect("cluster parses"),
    };
    match command {
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
        Command::Sm(args) => run_sm(args),
        Command::Cluster(args) => run_cluster(args),
        Command::Scale(args) => run_scale(args),
        Command::CatchUp(args) => run_catch_up(args),
        Command::Compare { a, b } => {
            let (a_json, b_json) = (read_result(&a)?, read_result(&b)?);
            let rows = ringraft_bench::compare::rows(&a_json, &b_json);
            if rows.is_empty() {
                return Err(format!(
                    "{} and {} share no numeric results (different benchmarks?)",
                    a.display(),
                    b.display()
                ));
            }
            println!("{:<44} {:>14} {:>14} {:>8}", "key", "A", "B", "B/A");
            for row in rows {
                let ratio = row.ratio.map_or("-".to_string(), |r| format!("{r:.2}"));
                println!("{:<44} {:>14} {:>14} {:>8}", row.key, row.a, row.b, ratio);
            }
            Ok(())
        }
        Command::Node { config } => match ringraft_net::node::run(&config) {
            code if code == ExitCode::SUCCESS => Ok(()),
            _ => Err(format!("node {} stopped with an error", config.display())),
        },
    }
}

fn check_cpu(cpu: Option<usize>) -> Result<(), String> {
    if let Some(cpu) = cpu {
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpu >= online {
            return Err(format!(
                "--cpu {cpu} is not an online CPU (this machine has {online}: 0..{})",
                online - 1
            ));
        }
    }
    Ok(())
}

/// glommio io_memory per executor: `requested_mib`, or sized from the memlock limit (raised soft
/// to hard first) as the node does; refused when it cannot fit.
fn io_memory(requested_mib: Option<u64>, shards: u64) -> Result<u64, String> {
    let memlock = ringraft_tuning::raise_memlock().map_err(|e| format!("cannot read RLIMIT_MEMLOCK: {e}"))?;
    let requested = match requested_mib {
        Some(mib) => ringraft_tuning::IoMemory::Bytes(mib << 20),
        None => ringraft_tuning::IoMemory::Auto(ringraft_tuning::AutoKeyword::Auto),
    };
    let plan = ringraft_tuning::plan_io_memory(&requested, memlock.effective(), shards)
        .map_err(|e| e.to_string())?;
    if let Some(warning) = &plan.warning {
        eprintln!("warning: {warning}");
    }
    Ok(plan.per_shard_bytes)
}

fn cluster_target(args: &ClusterArgs) -> Result<ringraft_bench::cluster_bench::Target, String> {
    use ringraft_bench::cluster_bench::Target;
    Ok(if !args.connect.is_empty() {
        Target::Connect(args.connect.clone())
    } else {
        match args.transport {
            Transport::Inproc => Target::InProcess,
            Transport::Tcp => Target::Processes {
                exe: std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?,
            },
        }
    })
}

fn cluster_options(
    args: &ClusterArgs,
    target: ringraft_bench::cluster_bench::Target,
) -> ringraft_bench::cluster_bench::ClusterBenchOptions {
    ringraft_bench::cluster_bench::ClusterBenchOptions {
        target,
        dir: args.dir.clone(),
        nodes: args.nodes,
        shards: args.shards as usize,
        groups_per_shard: args.groups_per_shard,
        clients: args.clients,
        in_flight: args.in_flight,
        key_bytes: args.key_bytes as usize,
        value_bytes: args.value_bytes as usize,
        keys: args.keys,
        duration: Duration::from_secs_f64(args.duration_s),
        warmup: Duration::from_secs_f64(args.warmup_s),
        workload: match args.workload {
            WorkloadArg::Write => Workload::Write,
            WorkloadArg::ReadHeavy => Workload::ReadHeavy,
            WorkloadArg::Mixed => Workload::Mixed,
        },
        distribution: match args.distribution {
            DistributionArg::Uniform => Distribution::Uniform,
            DistributionArg::Zipfian => Distribution::Zipfian {
                theta: args.zipf_theta,
            },
        },
        read_consistency: match args.read_consistency {
            ConsistencyArg::Linearizable => ringraft_engine::Consistency::Linearizable,
            ConsistencyArg::Local => ringraft_engine::Consistency::Local,
            ConsistencyArg::Lease => ringraft_engine::Consistency::Lease,
        },
        rate: args.rate,
        ops: args.ops,
        spin_us: args.spin_us,
    }
}

/// `scale`: the same workload over shard counts and group counts, one fresh cluster each.
fn run_scale(args: ScaleArgs) -> Result<(), String> {
    let cluster = &args.cluster;
    if !cluster.connect.is_empty() {
        return Err("scale starts its own clusters; --connect cannot be used with it".into());
    }
    let machine = machine::detect_after_create(&cluster.dir)?;
    let mut results = Vec::new();
    for &shards in &args.shards_list {
        for &groups in &args.groups_list {
            if groups % shards != 0 {
                eprintln!(
                    "skipping {groups} groups on {shards} shards (groups must be a multiple of shards)"
                );
                continue;
            }
            eprintln!("scale: {shards} shard(s), {groups} groups per node...");
            let mut options = cluster_options(cluster, cluster_target(cluster)?);
            options.shards = shards as usize;
            options.groups_per_shard = groups / shards;
            let mut run = ringraft_bench::cluster_bench::run(options, &[cluster.rate])?;
            results.push(run.remove(0));
        }
    }
    if let Some(path) = &cluster.plot {
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for &shards in &args.shards_list {
            let points = results
                .iter()
                .filter(|r| r.shards_per_node as u64 == shards)
                .map(|r| ((r.groups as f64).log2(), r.ops_per_s))
                .collect();
            series.push((format!("{shards} shard(s) per node"), points));
        }
        ringraft_bench::plot::scaling(path, &series)?;
    }
    if cluster.json {
        println!(
            "{}",
            json!({ "command": command_line(), "machine": machine, "scale": results })
        );
        return Ok(());
    }
    print_machine(&machine);
    println!(
        "scale: {} nodes, {} clients x {} in flight, {:?} workload, fsync on",
        cluster.nodes, cluster.clients, cluster.in_flight, cluster.workload
    );
    println!(
        "  {:>6} {:>7} {:>12} {:>14} {:>10} {:>10} {:>10}",
        "shards", "groups", "ops/s", "ops/s/shard", "p50 us", "p99 us", "cmds/entry"
    );
    for r in &results {
        println!(
            "  {:>6} {:>7} {:>12.0} {:>14.0} {:>10.0} {:>10.0} {:>10.1}",
            r.shards_per_node,
            r.groups,
            r.ops_per_s,
            r.ops_per_s / r.shards_per_node.max(1) as f64,
            r.latency_us_p50,
            r.latency_us_p99,
            r.commands_per_entry_mean
        );
    }
    Ok(())
}

fn run_cluster(args: ClusterArgs) -> Result<(), String> {
    use ringraft_bench::cluster_bench::Target;
    let target = cluster_target(&args)?;
    let machine = machine::detect_after_create(&args.dir)?;
    let probe = if args.no_probe || matches!(target, Target::Connect(_)) {
        None
    } else {
        Some(run_probe(&Common {
            dir: args.dir.clone(),
            json: args.json,
            probe_seconds: args.probe_seconds,
            probe_file_mib: args.probe_file_mib,
        })?)
    };
    let place = match &target {
        Target::InProcess => "in this process",
        Target::Processes { .. } => "as processes on 127.0.0.1",
        Target::Connect(_) => "(existing cluster)",
    };
    eprintln!(
        "cluster: {} nodes {place}, {} shard(s) each, {} clients x {} in flight, {} B values, {} s (+{} s warm-up)...",
        args.nodes, args.shards, args.clients, args.in_flight, args.value_bytes, args.duration_s, args.warmup_s
    );
    let rates: Vec<Option<f64>> = if args.sweep_rates.is_empty() {
        vec![args.rate]
    } else {
        args.sweep_rates.iter().map(|&r| Some(r)).collect()
    };
    let results = ringraft_bench::cluster_bench::run(cluster_options(&args, target), &rates)?;
    // The sweep's answer: the highest rate whose p99 stayed within the bound.
    let bound_us = args.p99_bound_ms * 1000.0;
    let best = results
        .iter()
        .filter(|r| r.latency_us_p99 <= bound_us)
        .max_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s));
    let result = if args.sweep_rates.is_empty() {
        results.last().expect("one load ran")
    } else {
        best.unwrap_or_else(|| results.first().expect("one load ran"))
    };
    if let Some(path) = &args.hist_out {
        let mut bytes = Vec::new();
        hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder::new()
            .with_base_time(std::time::SystemTime::now())
            .begin_log_with(
                &mut bytes,
                &mut hdrhistogram::serialization::V2DeflateSerializer::new(),
            )
            .and_then(|mut log| {
                log.write_histogram(
                    &result.histogram,
                    Duration::ZERO,
                    Duration::from_secs_f64(result.duration_s),
                    None,
                )
                .map_err(std::io::Error::other)
            })
            .map_err(|e| format!("--hist-out: {e}"))?;
        std::fs::write(path, bytes).map_err(|e| format!("--hist-out {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let curves: Vec<(String, &hdrhistogram::Histogram<u64>)> = results
            .iter()
            .map(|r| {
                let label = match r.target_rate_per_s {
                    Some(rate) => format!("{rate:.0}/s open loop"),
                    None => format!("{} x {} closed loop", r.clients, r.in_flight),
                };
                (label, &r.histogram)
            })
            .collect();
        ringraft_bench::plot::latency_percentiles(path, "acknowledged operations", &curves)?;
    }
    // Every node syncs its own WAL on the same device here: the device's durable-write rate
    // bounds the sum of all nodes' syncs.
    let sync_ratio = probe
        .as_ref()
        .map(|p| result.syncs_per_s / p.write_4k_rounds_per_s.max(1.0));
    if args.json {
        let mut out = json!({
            "command": command_line(), "machine": machine, "cluster": result,
            "disk": probe, "syncs_to_probe_ratio": sync_ratio,
        });
        if !args.sweep_rates.is_empty() {
            out["sweep"] = json!(results);
            out["sweep_p99_bound_ms"] = json!(args.p99_bound_ms);
            out["sweep_best_rate_per_s"] = json!(best.and_then(|b| b.target_rate_per_s));
        }
        println!("{out}");
        return Ok(());
    }
    print_machine(&machine);
    if let Some(probe) = &probe {
        print_probe(probe);
    }
    if !args.sweep_rates.is_empty() {
        println!("sweep (open loop; p99 bound {} ms)", args.p99_bound_ms);
        println!(
            "  {:>12} {:>12} {:>10} {:>10} {:>8}",
            "target/s", "ops/s", "p50 us", "p99 us", "errors"
        );
        for r in &results {
            println!(
                "  {:>12.0} {:>12.0} {:>10.0} {:>10.0} {:>8}",
                r.target_rate_per_s.unwrap_or(0.0),
                r.ops_per_s,
                r.latency_us_p50,
                r.latency_us_p99,
                r.errors
            );
        }
        match best {
            Some(b) => println!(
                "  highest rate within the bound: {:.0}/s ({:.0} ops/s, p99 {:.0} us)",
                b.target_rate_per_s.unwrap_or(0.0),
                b.ops_per_s,
                b.latency_us_p99
            ),
            None => println!("  no rate kept p99 within {} ms", args.p99_bound_ms),
        }
    }
    let model = match result.target_rate_per_s {
        Some(rate) => format!("open loop at {rate:.0}/s"),
        None => format!("{} clients x {} in flight", result.clients, result.in_flight),
    };
    println!(
        "cluster ({} transport): {} nodes x {} shard(s), {} groups, {model}, {:?} workload, {} B keys, {} B values, fsync on",
        result.transport, result.nodes, result.shards_per_node, result.groups, result.workload, result.key_bytes, result.value_bytes
    );
    println!("  acknowledged ops/s: {:>12.0}", result.ops_per_s);
    println!(
        "  latency us: p50 {:.0}  p99 {:.0}  p999 {:.0}  max {:.0}",
        result.latency_us_p50, result.latency_us_p99, result.latency_us_p999, result.latency_us_max
    );
    println!(
        "  commands per entry: {:.1}   syncs/s (all nodes): {:.0}   errors: {}",
        result.commands_per_entry_mean, result.syncs_per_s, result.errors
    );
    if let (Some(probe), Some(ratio)) = (&probe, sync_ratio) {
        println!(
            "  syncs/s vs the device's 4 KiB durable rounds/s ({:.0}): {:.2}",
            probe.write_4k_rounds_per_s, ratio
        );
    }
    for (i, (cpu, rss)) in result
        .node_cpu_percent
        .iter()
        .zip(&result.node_rss_bytes_max)
        .enumerate()
    {
        println!(
            "  node {}: CPU {:.0}%  peak RSS {:.1} MiB",
            i + 1,
            cpu,
            *rss as f64 / (1 << 20) as f64
        );
    }
    println!(
        "  peak RSS {:.1} MiB",
        result.rss_bytes_max as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn run_sm(args: SmArgs) -> Result<(), String> {
    check_cpu(args.cpu)?;
    let machine = machine::detect_after_create(&args.dir)?;
    eprintln!(
        "sm: batches of {} puts ({} B keys, {} B values) over {} keys, {} s...",
        args.batch_commands, args.key_bytes, args.value_bytes, args.keys, args.duration_s
    );
    let result = ringraft_bench::sm_bench::run(ringraft_bench::sm_bench::SmBenchOptions {
        dir: args.dir.clone(),
        batch_commands: args.batch_commands as usize,
        key_bytes: args.key_bytes as usize,
        value_bytes: args.value_bytes as usize,
        keys: args.keys,
        duration: Duration::from_secs_f64(args.duration_s),
        checkpoint_interval: Duration::from_secs_f64(args.checkpoint_interval_s),
        cpu: args.cpu,
        io_memory_bytes: io_memory(None, 1)? as usize,
    })?;
    if args.json {
        println!(
            "{}",
            json!({ "command": command_line(), "machine": machine, "sm": result })
        );
        return Ok(());
    }
    print_machine(&machine);
    println!(
        "sm: batches of {} puts, {} B keys, {} B values, {} keys, one core",
        result.batch_commands, result.key_bytes, result.value_bytes, result.keys
    );
    println!(
        "  applied commands/s (validated, checkpoints on): {:>12.0}",
        result.commands_per_s
    );
    println!(
        "  batches/s:                                     {:>12.0}",
        result.batches_per_s
    );
    println!(
        "  checkpoints: {} (slowest {:.1} ms)",
        result.checkpoints, result.checkpoint_ms_max
    );
    println!(
        "  reads/s from the index:                        {:>12.0}",
        result.reads_per_s
    );
    println!(
        "  mixed put/get commands/s:                      {:>12.0}",
        result.mixed_commands_per_s
    );
    println!(
        "  snapshot of every key:                         {:>9.1} ms",
        result.snapshot_ms
    );
    println!(
        "  peak RSS {:.1} MiB",
        result.rss_bytes_max as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn print_machine(machine: &machine::Machine) {
    let interrupts = match &machine.disk_interrupt_cpus {
        Some(cpus) => format!(" (interrupts on CPUs {cpus:?})"),
        None => String::new(),
    };
    println!(
        "machine: {} | {} CPUs | kernel {} | disk {}{interrupts} | ringraft {}",
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
    check_cpu(args.cpu)?;
    let io_memory_bytes = io_memory(args.io_memory_mib, 1)?;
    let machine = machine::detect_after_create(&common.dir)?;
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = match (args.cpu, args.unpinned) {
        (Some(cpu), _) => Some(cpu),
        (None, true) => None,
        (None, false) => {
            let first = machine
                .disk_interrupt_cpus
                .as_ref()
                .and_then(|cpus| cpus.first().copied());
            let cpu = first.filter(|&cpu| cpu < online);
            if let Some(cpu) = cpu {
                eprintln!("wal: executor pinned to CPU {cpu}, which takes the disk's completion interrupts");
            }
            cpu
        }
    };
    if args.spin_us > 0 && cpu.is_none() {
        return Err(
            "--spin-us needs a pinned executor (--cpu N, or a disk whose interrupt CPUs are known)".into(),
        );
    }
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
            cpu,
            spin_before_park: Duration::from_micros(args.spin_us),
            io_memory_bytes: io_memory_bytes as usize,
        };
        let mut run = wal_bench::run(options, probe.clone())?;
        if probe.is_some() {
            run.disk_after = Some(run_probe(common)?);
            run.rate_against_probes();
        }
        runs.push(run);
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
            "  best ({}): p50 latency = {p50:.2}x the probe's 4 KiB durable write; bandwidth = {:.0}% of the probe's 1 MiB durable writes (probes before and after, averaged)",
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

fn run_catch_up(args: CatchUpArgs) -> Result<(), String> {
    let options = ringraft_bench::catch_up::CatchUpOptions {
        exe: std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?,
        dir: args.dir,
        writers: args.writers,
        value_bytes: args.value_bytes,
        baseline: Duration::from_secs(args.baseline_s),
        down: Duration::from_secs(args.down_s),
        retain_entries: args.retain_entries,
        catch_up_limit: Duration::from_secs(120),
    };
    eprintln!(
        "catch-up: 3 node processes on 127.0.0.1, {} writers, {} B values, follower down {} s, retain {} entries...",
        args.writers, args.value_bytes, args.down_s, args.retain_entries
    );
    let machine = machine::detect_after_create(&options.dir)?;
    let result = ringraft_bench::catch_up::run(&options)?;
    if args.json {
        let value = json!({
            "command": "catch-up",
            "machine": serde_json::to_value(&machine).map_err(|e| e.to_string())?,
            "catch_up": serde_json::to_value(&result).map_err(|e| e.to_string())?,
        });
        println!("{value}");
    } else {
        print_machine(&machine);
        println!("  baseline ops/s:            {:>10.0}", result.baseline_ops_per_s);
        println!("  entries behind at restart: {:>10}", result.entries_behind);
        println!("  catch-up time:             {:>10.2} s", result.catch_up_s);
        println!(
            "  ops/s during catch-up:     {:>10.0}   ({:.0}% of baseline)",
            result.catch_up_ops_per_s,
            result.dip_ratio * 100.0
        );
        println!(
            "  caught up by:              {:>10}",
            if result.snapshot_installed {
                "snapshot + log"
            } else {
                "log"
            }
        );
    }
    Ok(())
}
