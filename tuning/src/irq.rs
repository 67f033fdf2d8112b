//! Which CPUs take a block device's completion interrupts.
//!
//! A shard waits for every WAL write; when the write completes, the device interrupts one CPU,
//! and a shard on another CPU must then be woken across CPUs. On this project's test VM (one
//! virtio queue, its interrupt on CPU 1) a single shard pinned to CPU 1 served ~22% more puts
//! than on CPU 0, and 64 closed-loop WAL writers ~40% more (BENCHMARKS.md). Machines with a
//! queue per CPU (NVMe) interrupt the submitting CPU already; there every CPU is listed.
//!
//! Read from sysfs and procfs: the device of a path (its whole disk, for a partition), the
//! first ancestor device with `msi_irqs`, and each of those interrupts' effective affinity,
//! leaving out interrupts that have never fired (configuration and idle queues).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::topology::parse_cpu_list;

/// The CPUs that take the completion interrupts of the block device holding `path`, in
/// increasing order; `None` when they cannot be told (not a PCI device, no MSI interrupts, no
/// sysfs, or none has fired yet).
pub fn device_interrupt_cpus(path: &Path) -> Option<Vec<usize>> {
    let dev = std::fs::metadata(path).ok()?.dev();
    interrupt_cpus_in(
        Path::new("/sys"),
        Path::new("/proc"),
        libc::major(dev),
        libc::minor(dev),
    )
}

/// Shards placed away from the data disk's interrupts: `(interrupted CPUs, shard CPUs not
/// among them)` when some of `shard_cpus` are elsewhere (each such shard is woken from another
/// CPU after every WAL write), `None` when all are there or the CPUs cannot be told. The data
/// directory may not exist yet: its nearest existing ancestor stands for it (the same device
/// unless a mount comes between).
pub fn shards_away_from_interrupts(
    data_dir: &Path,
    shard_cpus: &[usize],
) -> Option<(Vec<usize>, Vec<usize>)> {
    let existing = data_dir.ancestors().find(|p| p.exists())?;
    let interrupted = device_interrupt_cpus(existing)?;
    let elsewhere: Vec<usize> = shard_cpus
        .iter()
        .copied()
        .filter(|cpu| !interrupted.contains(cpu))
        .collect();
    (!elsewhere.is_empty()).then_some((interrupted, elsewhere))
}

/// [`device_interrupt_cpus`] for device `major:minor`, reading sysfs at `sys` and procfs at
/// `proc_root` (tests pass a made-up tree).
pub fn interrupt_cpus_in(sys: &Path, proc_root: &Path, major: u32, minor: u32) -> Option<Vec<usize>> {
    let mut block = std::fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}"))).ok()?;
    if block.join("partition").exists() {
        block.pop();
    }
    let sys = std::fs::canonicalize(sys).ok()?;
    let mut at = std::fs::canonicalize(block.join("device")).ok()?;
    let irqs: Vec<u32> = loop {
        if let Ok(entries) = std::fs::read_dir(at.join("msi_irqs")) {
            break entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
        }
        if !at.pop() || !at.starts_with(&sys) || at == sys {
            return None;
        }
    };
    let fired = interrupt_counts(&std::fs::read_to_string(proc_root.join("interrupts")).ok()?);
    let mut cpus = BTreeSet::new();
    for irq in irqs {
        if fired.get(&irq).is_none_or(|&count| count == 0) {
            continue;
        }
        let dir = proc_root.join(format!("irq/{irq}"));
        let list = std::fs::read_to_string(dir.join("effective_affinity_list"))
            .or_else(|_| std::fs::read_to_string(dir.join("smp_affinity_list")))
            .ok()?;
        cpus.extend(parse_cpu_list(list.trim())?);
    }
    (!cpus.is_empty()).then(|| cpus.into_iter().collect())
}

/// Interrupt number to how often it fired on all CPUs together, from `/proc/interrupts` (a
/// header of CPU names, then `N: count per CPU ... chip and name`; named rows are skipped).
fn interrupt_counts(text: &str) -> BTreeMap<u32, u64> {
    let mut lines = text.lines();
    let cpus = lines.next().map_or(0, |header| header.split_whitespace().count());
    lines
        .filter_map(|line| {
            let (irq, rest) = line.trim_start().split_once(':')?;
            let irq = irq.parse().ok()?;
            let counts = rest.split_whitespace().take(cpus).map(|c| c.parse::<u64>().ok());
            Some((irq, counts.sum::<Option<u64>>()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// sysfs and procfs as on the test VM: disk 254:0 (vda, partition vda1 is 254:1) under
    /// virtio1 under PCI device 0000:00:02.0, whose MSI interrupts are 35 (configuration, never
    /// fired, on CPU 0) and 36 (the request queue, on CPU 1).
    fn vm_tree(root: &Path) {
        let pci = root.join("sys/devices/pci0000:00/0000:00:02.0");
        let vda = pci.join("virtio1/block/vda");
        std::fs::create_dir_all(vda.join("vda1")).unwrap();
        std::fs::write(vda.join("vda1/partition"), "1\n").unwrap();
        symlink("../../../virtio1", vda.join("device")).unwrap();
        std::fs::create_dir_all(pci.join("msi_irqs")).unwrap();
        for irq in ["35", "36"] {
            std::fs::write(pci.join("msi_irqs").join(irq), "msix\n").unwrap();
        }
        std::fs::create_dir_all(root.join("sys/dev/block")).unwrap();
        let target = "../../devices/pci0000:00/0000:00:02.0/virtio1/block/vda";
        symlink(target, root.join("sys/dev/block/254:0")).unwrap();
        symlink(format!("{target}/vda1"), root.join("sys/dev/block/254:1")).unwrap();
        std::fs::create_dir_all(root.join("proc/irq/35")).unwrap();
        std::fs::create_dir_all(root.join("proc/irq/36")).unwrap();
        std::fs::write(root.join("proc/irq/35/effective_affinity_list"), "0\n").unwrap();
        std::fs::write(root.join("proc/irq/36/effective_affinity_list"), "1\n").unwrap();
        std::fs::write(
            root.join("proc/interrupts"),
            "           CPU0       CPU1\n  \
             35:          0          0 PCI-MSIX-0000:00:02.0   0-edge      virtio1-config\n  \
             36:          0   62998831 PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0\n \
             NMI:          0          0   Non-maskable interrupts\n",
        )
        .unwrap();
    }

    #[test]
    fn the_request_queue_interrupt_names_its_cpu_for_the_disk_and_its_partitions() {
        let dir = tempfile::tempdir().unwrap();
        vm_tree(dir.path());
        let (sys, proc_root) = (dir.path().join("sys"), dir.path().join("proc"));
        assert_eq!(interrupt_cpus_in(&sys, &proc_root, 254, 0), Some(vec![1]));
        assert_eq!(interrupt_cpus_in(&sys, &proc_root, 254, 1), Some(vec![1]));
        // Once the configuration interrupt has fired too, both CPUs take interrupts.
        let text = std::fs::read_to_string(proc_root.join("interrupts")).unwrap();
        let text = text.replace("35:          0          0", "35:          3          0");
        std::fs::write(proc_root.join("interrupts"), text).unwrap();
        assert_eq!(interrupt_cpus_in(&sys, &proc_root, 254, 0), Some(vec![0, 1]));
    }

    #[test]
    fn unknown_devices_and_devices_without_msi_interrupts_are_none() {
        let dir = tempfile::tempdir().unwrap();
        vm_tree(dir.path());
        let (sys, proc_root) = (dir.path().join("sys"), dir.path().join("proc"));
        assert_eq!(interrupt_cpus_in(&sys, &proc_root, 7, 0), None);
        std::fs::remove_dir_all(dir.path().join("sys/devices/pci0000:00/0000:00:02.0/msi_irqs")).unwrap();
        assert_eq!(interrupt_cpus_in(&sys, &proc_root, 254, 0), None);
    }

    #[test]
    fn interrupt_counts_sum_every_cpu_and_skip_named_rows() {
        let counts = interrupt_counts(
            "      CPU0  CPU1\n 1:  2  3  IO-APIC  1-edge  i8042\nLOC:  9  9  Local timer\n 7:  x  1  bad\n",
        );
        assert_eq!(counts, BTreeMap::from([(1, 5)]));
    }
}
