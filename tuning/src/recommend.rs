//! A recommended configuration for a machine, with the reasoning written into the TOML.

use std::collections::BTreeSet;

use crate::config::{Config, CpuList, IoMemory};
use crate::memlock::{plan_io_memory, Limit};
use crate::topology::Topology;

/// Above this many usable CPUs, CPU 0 (and its SMT siblings) is left to the OS and interrupts.
pub const RESERVE_CPU0_ABOVE: usize = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recommendation {
    /// CPUs to pin one shard each to, in shard order.
    pub cpus: Vec<usize>,
    /// Why, one sentence per decision.
    pub reasons: Vec<String>,
    pub io_memory_bytes: Option<u64>,
    pub io_memory_note: String,
}

/// Chooses shard CPUs for `topology`: one shard per physical core, never two on SMT siblings,
/// CPU 0 left to the OS on machines with more than four CPUs, ordered by NUMA node.
pub fn recommend(topology: &Topology, memlock: Limit) -> Recommendation {
    let mut reasons = Vec::new();
    let mut reserved = BTreeSet::new();
    if topology.cpus.len() > RESERVE_CPU0_ABOVE {
        if let Some(cpu0) = topology.cpus.first() {
            reserved.extend(cpu0.siblings.iter().copied());
            reasons.push(format!(
                "CPU {:?} left free: with more than {RESERVE_CPU0_ABOVE} CPUs, one core for interrupts, \
                 the kernel and other processes keeps them off the shards' cores",
                cpu0.siblings
            ));
        }
    } else {
        reasons.push(format!(
            "all {} usable CPUs run shards: with {RESERVE_CPU0_ABOVE} or fewer, reserving one would cost \
             too large a share of the machine",
            topology.cpus.len()
        ));
    }
    let mut cores_taken = BTreeSet::new();
    let mut chosen: Vec<(usize, usize)> = Vec::new(); // (numa node, cpu)
    let mut skipped_siblings = Vec::new();
    for cpu in &topology.cpus {
        if reserved.contains(&cpu.id) {
            continue;
        }
        if !cores_taken.insert((cpu.package, cpu.core)) {
            skipped_siblings.push(cpu.id);
            continue;
        }
        chosen.push((cpu.numa_node.unwrap_or(0), cpu.id));
    }
    if !skipped_siblings.is_empty() {
        reasons.push(format!(
            "one shard per physical core: SMT siblings {skipped_siblings:?} are left out, since two shards \
             on one core share its execution units and slow each other"
        ));
    }
    chosen.sort_unstable();
    let nodes = topology.numa_nodes();
    if nodes > 1 {
        reasons.push(format!(
            "shards are ordered by NUMA node ({nodes} nodes): each shard allocates its memory from its own \
             thread, so it stays local to its node; route clients to the shards of the node they run near"
        ));
    }
    let cpus: Vec<usize> = chosen.into_iter().map(|(_, cpu)| cpu).collect();
    let shards = cpus.len().max(1) as u64;
    let (io_memory_bytes, io_memory_note) =
        match plan_io_memory(&IoMemory::Auto(crate::config::AutoKeyword::Auto), memlock, shards) {
            Ok(plan) => (
                Some(plan.per_shard_bytes),
                match plan.warning {
                    Some(warning) => warning,
                    None => format!(
                        "{} KiB per shard fits RLIMIT_MEMLOCK ({memlock}) across {shards} shards x 3 rings",
                        plan.per_shard_bytes / 1024
                    ),
                },
            ),
            Err(error) => (None, error.to_string()),
        };
    Recommendation {
        cpus,
        reasons,
        io_memory_bytes,
        io_memory_note,
    }
}

impl Recommendation {
    /// A complete config file with this recommendation, the reasons as comments.
    pub fn to_toml(&self) -> String {
        let mut config = Config::default();
        config.shards.cpus = CpuList::List(self.cpus.clone());
        if let Some(bytes) = self.io_memory_bytes {
            config.glommio.io_memory_bytes = IoMemory::Bytes(bytes);
        }
        let body = config.to_toml();
        let mut out = String::from(
            "# ringraft configuration recommended by `ringraft-tune` for this machine.\n\
             # Every key, its default and why: docs/config.md. Review [node] and [cluster].\n\n",
        );
        for line in body.lines() {
            if line == "[shards]" {
                for reason in &self.reasons {
                    out.push_str(&format!("# {reason}\n"));
                }
            }
            if line == "[glommio]" {
                out.push_str(&format!("# {}\n", self.io_memory_note));
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}
