//! CPU topology: which CPUs are online and usable, which are SMT siblings of one physical core,
//! and which NUMA node each belongs to. Read from /sys, intersected with the CPUs this process
//! may run on (core_affinity).

use std::collections::BTreeSet;
use std::path::Path;

/// One online CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub id: usize,
    /// Physical package (socket).
    pub package: usize,
    /// Core id within the package; (package, core) names one physical core.
    pub core: usize,
    /// All CPUs sharing this physical core, this one included (SMT siblings).
    pub siblings: Vec<usize>,
    pub numa_node: Option<usize>,
}

/// The CPUs of this machine that ringraft may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Online, usable CPUs in id order.
    pub cpus: Vec<Cpu>,
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi): (usize, usize) = (lo.parse().ok()?, hi.parse().ok()?);
                if lo > hi {
                    return None;
                }
                out.extend(lo..=hi);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

fn read_number(path: &Path) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Topology {
    /// Detects the topology of this machine.
    pub fn detect() -> Topology {
        Topology::from_sys(Path::new("/sys/devices/system/cpu"), usable_cpus())
    }

    /// Reads the topology under `cpu_dir` (normally /sys/devices/system/cpu), keeping the CPUs
    /// in `usable` (all online ones when `None`).
    pub fn from_sys(cpu_dir: &Path, usable: Option<BTreeSet<usize>>) -> Topology {
        let online = std::fs::read_to_string(cpu_dir.join("online"))
            .ok()
            .and_then(|t| parse_cpu_list(&t))
            .unwrap_or_else(|| (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect());
        let mut cpus = Vec::new();
        for id in online {
            if usable.as_ref().is_some_and(|u| !u.contains(&id)) {
                continue;
            }
            let dir = cpu_dir.join(format!("cpu{id}"));
            let topology = dir.join("topology");
            let siblings = std::fs::read_to_string(topology.join("thread_siblings_list"))
                .ok()
                .and_then(|t| parse_cpu_list(&t))
                .unwrap_or_else(|| vec![id]);
            let numa_node = std::fs::read_dir(&dir).ok().and_then(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
                    .next()
            });
            cpus.push(Cpu {
                id,
                package: read_number(&topology.join("physical_package_id")).unwrap_or(0),
                core: read_number(&topology.join("core_id")).unwrap_or(id),
                siblings,
                numa_node,
            });
        }
        Topology { cpus }
    }

    /// A made-up machine for tests and examples: `cores` physical cores, two threads each when
    /// `smt` (siblings numbered `c` and `c + cores`, as Linux does on x86), spread evenly over
    /// `numa_nodes` nodes.
    pub fn synthetic(cores: usize, smt: bool, numa_nodes: usize) -> Topology {
        assert!(
            cores > 0 && numa_nodes > 0 && cores % numa_nodes == 0,
            "synthetic topology shape"
        );
        let threads = if smt { 2 } else { 1 };
        let per_node = cores / numa_nodes;
        let cpus = (0..cores * threads)
            .map(|id| {
                let core = id % cores;
                Cpu {
                    id,
                    package: core / per_node,
                    core: core % per_node,
                    siblings: (0..threads).map(|t| core + t * cores).collect(),
                    numa_node: Some(core / per_node),
                }
            })
            .collect();
        Topology { cpus }
    }

    pub fn online_ids(&self) -> Vec<usize> {
        self.cpus.iter().map(|c| c.id).collect()
    }

    pub fn cpu(&self, id: usize) -> Option<&Cpu> {
        self.cpus.iter().find(|c| c.id == id)
    }

    /// Number of physical cores among the usable CPUs.
    pub fn physical_cores(&self) -> usize {
        self.cpus
            .iter()
            .map(|c| (c.package, c.core))
            .collect::<BTreeSet<_>>()
            .len()
    }

    pub fn smt(&self) -> bool {
        self.cpus.iter().any(|c| c.siblings.len() > 1)
    }

    pub fn numa_nodes(&self) -> usize {
        self.cpus
            .iter()
            .filter_map(|c| c.numa_node)
            .collect::<BTreeSet<_>>()
            .len()
            .max(1)
    }
}

/// CPUs this process may be scheduled on, per core_affinity (the affinity mask).
fn usable_cpus() -> Option<BTreeSet<usize>> {
    core_affinity::get_core_ids().map(|ids| ids.into_iter().map(|c| c.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn synthetic_smt_siblings_pair_up() {
        let t = Topology::synthetic(4, true, 2);
        assert_eq!(t.cpus.len(), 8);
        assert_eq!(t.cpu(1).unwrap().siblings, vec![1, 5]);
        assert_eq!(t.cpu(5).unwrap().siblings, vec![1, 5]);
        assert_eq!(t.physical_cores(), 4);
        assert_eq!(t.numa_nodes(), 2);
        assert_eq!(t.cpu(3).unwrap().numa_node, Some(1));
    }

    #[test]
    fn this_machine_has_at_least_one_cpu() {
        let t = Topology::detect();
        assert!(!t.cpus.is_empty());
        for cpu in &t.cpus {
            assert!(cpu.siblings.contains(&cpu.id), "{cpu:?}");
        }
    }
}
