//! `ringraft-tune`: what this machine offers ringraft, and a recommended config for it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringraft_tuning::{
    io_uring_status, plan_io_memory, read_memlock, recommend, resolve_cpus, shards_away_from_interrupts,
    validate, Config, Limit, Topology,
};

#[derive(Parser, Debug)]
#[command(
    name = "ringraft-tune",
    version,
    about = "Shows the CPU topology, locked-memory limit and io_uring support, and recommends a ringraft config"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The full report (the default): topology, memlock, io_uring, then the recommended config.
    Report,
    /// Print only the recommended config (TOML, reasons as comments), e.g. to start a file.
    Recommend,
    /// Validate a config file against this machine and print the effective config (defaults
    /// filled in, RINGRAFT_NODE_ID and RINGRAFT_DATA_DIR applied).
    Check {
        /// The config file.
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    // A report piped into `head` ends quietly when the reader goes, as other command-line tools
    // do, instead of panicking on the failed write (Rust ignores SIGPIPE by default; this tool
    // has no sockets that need that).
    // SAFETY: setting a signal's disposition to its default before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let topology = Topology::detect();
    match cli.command.unwrap_or(Command::Report) {
        Command::Report => {
            report(&topology);
            ExitCode::SUCCESS
        }
        Command::Recommend => {
            print!("{}", recommend(&topology, memlock_limit()).to_toml());
            ExitCode::SUCCESS
        }
        Command::Check { config } => check(&config, &topology),
    }
}

fn memlock_limit() -> Limit {
    // The node raises soft to hard at start, so the hard limit is what it will have.
    read_memlock().map_or(Limit::Bytes(0), |m| {
        if m.privileged {
            Limit::Unlimited
        } else {
            m.hard
        }
    })
}

fn report(topology: &Topology) {
    println!("# CPU topology");
    println!(
        "#   {} usable CPUs, {} physical cores, SMT {}, {} NUMA node(s)",
        topology.cpus.len(),
        topology.physical_cores(),
        if topology.smt() { "on" } else { "off" },
        topology.numa_nodes()
    );
    for cpu in &topology.cpus {
        println!(
            "#   cpu {:>3}: package {} core {:>3} siblings {:?} numa {}",
            cpu.id,
            cpu.package,
            cpu.core,
            cpu.siblings,
            cpu.numa_node.map_or("?".to_string(), |n| n.to_string())
        );
    }
    println!("# Locked memory (RLIMIT_MEMLOCK)");
    match read_memlock() {
        Ok(m) => println!(
            "#   soft {}, hard {}{}; ringraft raises soft to hard at start",
            m.soft,
            m.hard,
            if m.privileged {
                ", CAP_IPC_LOCK held (no limit applies)"
            } else {
                ""
            }
        ),
        Err(e) => println!("#   cannot read: {e}"),
    }
    let status = io_uring_status();
    println!("# io_uring");
    println!(
        "#   kernel {} ({}), io_uring_disabled = {}, probe ring: {}",
        status.kernel,
        if status.kernel_ok {
            "ok"
        } else {
            "too old: need 5.8 or newer"
        },
        status
            .disabled_sysctl
            .map_or("absent".to_string(), |v| v.to_string()),
        match &status.probe {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("FAILED ({e})"),
        }
    );
    if !status.usable() {
        println!("#   ringraft cannot run here until io_uring works (kernel >= 5.8, io_uring_disabled = 0)");
    }
    println!("#");
    print!("{}", recommend(topology, memlock_limit()).to_toml());
}

/// Says which shards' CPUs do not take the data device's completion interrupts (those shards
/// are woken from another CPU after each WAL write).
fn interrupt_note(config: &Config, shard_cpus: &[usize]) {
    if let Some((interrupted, elsewhere)) = shards_away_from_interrupts(&config.node.data_dir, shard_cpus) {
        println!(
            "# note: the data directory's disk interrupts CPUs {interrupted:?}; shards on CPUs {elsewhere:?} \
             are woken from there after each WAL write (one shard on a 2-CPU VM served ~15-22% more puts \
             on the interrupted CPU)"
        );
    }
}

fn check(path: &std::path::Path, topology: &Topology) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ringraft-tune: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(errors) = validate(&config, topology) {
        eprint!("ringraft-tune: {}: {errors}", path.display());
        return ExitCode::FAILURE;
    }
    let shards = resolve_cpus(&config, topology).len() as u64;
    match plan_io_memory(&config.glommio.io_memory_bytes, memlock_limit(), shards) {
        Ok(plan) => {
            println!(
                "# valid. {shards} shard(s) on CPUs {:?}; io_memory {} KiB per shard",
                resolve_cpus(&config, topology),
                plan.per_shard_bytes / 1024
            );
            if let Some(warning) = plan.warning {
                println!("# warning: {warning}");
            }
            interrupt_note(&config, &resolve_cpus(&config, topology));
        }
        Err(error) => {
            eprintln!("ringraft-tune: {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    }
    print!("{}", config.to_toml());
    ExitCode::SUCCESS
}
