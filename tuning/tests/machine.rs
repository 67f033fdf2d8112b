//! The recommendation logic on synthetic topologies and the memlock sizing arithmetic.

use ringraft_tuning::{
    plan_io_memory, raise_memlock, recommend, AutoKeyword, IoMemory, Limit, Topology,
    IO_MEMORY_AUTO_MAX_BYTES, IO_MEMORY_MIN_BYTES, MEMLOCK_RESERVE_BYTES,
};

const MIB: u64 = 1 << 20;

fn assert_no_two_siblings(topology: &Topology, cpus: &[usize]) {
    for &a in cpus {
        let siblings = &topology.cpu(a).unwrap().siblings;
        for &b in cpus {
            assert!(a == b || !siblings.contains(&b), "{a} and {b} are SMT siblings");
        }
    }
}

#[test]
fn two_cpus_without_smt_use_both() {
    let r = recommend(&Topology::synthetic(2, false, 1), Limit::Unlimited);
    assert_eq!(r.cpus, vec![0, 1]);
}

#[test]
fn two_cpus_that_are_siblings_use_one() {
    let t = Topology::synthetic(1, true, 1);
    let r = recommend(&t, Limit::Unlimited);
    assert_eq!(r.cpus, vec![0]);
    assert!(r.reasons.iter().any(|reason| reason.contains("SMT")));
}

#[test]
fn eight_cpus_without_smt_leave_cpu0_free() {
    let r = recommend(&Topology::synthetic(8, false, 1), Limit::Unlimited);
    assert_eq!(r.cpus, (1..8).collect::<Vec<_>>());
    assert!(r.reasons.iter().any(|reason| reason.contains("left free")));
}

#[test]
fn eight_cpus_with_smt_use_one_thread_per_core_and_free_core0() {
    let t = Topology::synthetic(4, true, 1);
    let r = recommend(&t, Limit::Unlimited);
    assert_eq!(r.cpus, vec![1, 2, 3]);
    assert!(!r.cpus.contains(&4), "CPU 4 is CPU 0's sibling");
    assert_no_two_siblings(&t, &r.cpus);
}

#[test]
fn sixty_four_cpus_on_two_numa_nodes() {
    let t = Topology::synthetic(32, true, 2);
    let r = recommend(&t, Limit::Unlimited);
    assert_eq!(r.cpus.len(), 31, "32 cores, core 0 left free");
    assert_no_two_siblings(&t, &r.cpus);
    let nodes: Vec<usize> = r
        .cpus
        .iter()
        .map(|&c| t.cpu(c).unwrap().numa_node.unwrap())
        .collect();
    assert!(
        nodes.windows(2).all(|w| w[0] <= w[1]),
        "ordered by NUMA node: {nodes:?}"
    );
    assert!(r.reasons.iter().any(|reason| reason.contains("NUMA")));
}

#[test]
fn sixty_four_cpus_without_smt() {
    let t = Topology::synthetic(64, false, 2);
    let r = recommend(&t, Limit::Unlimited);
    assert_eq!(r.cpus, (1..64).collect::<Vec<_>>());
}

#[test]
fn recommended_toml_parses_validates_and_explains() {
    let t = Topology::synthetic(4, true, 1);
    let text = recommend(&t, Limit::Bytes(64 * MIB)).to_toml();
    assert!(text.contains("# one shard per physical core"), "{text}");
    let config = ringraft_tuning::Config::from_toml(&text).unwrap();
    ringraft_tuning::validate(&config, &t).unwrap();
}

#[test]
fn auto_io_memory_fits_the_limit_across_shards_and_rings() {
    // 8 MiB, 2 shards: (8 - 1) MiB / (3 rings x 2 shards), rounded down to 4 KiB.
    let plan = plan_io_memory(&IoMemory::Auto(AutoKeyword::Auto), Limit::Bytes(8 * MIB), 2).unwrap();
    assert_eq!(
        plan.per_shard_bytes,
        ((8 * MIB - MEMLOCK_RESERVE_BYTES) / 6) & !4095
    );
    assert!(plan.locked_bytes <= 8 * MIB - MEMLOCK_RESERVE_BYTES);
    assert!(
        plan.warning.as_deref().unwrap().contains("ulimit -l"),
        "{:?}",
        plan.warning
    );
    let plan = plan_io_memory(&IoMemory::Auto(AutoKeyword::Auto), Limit::Unlimited, 16).unwrap();
    assert_eq!(
        (plan.per_shard_bytes, plan.warning),
        (IO_MEMORY_AUTO_MAX_BYTES, None)
    );
}

#[test]
fn too_little_memlock_refuses_with_how_to_raise_it() {
    let error = plan_io_memory(&IoMemory::Auto(AutoKeyword::Auto), Limit::Bytes(2 * MIB), 4).unwrap_err();
    assert_eq!(error.key, "RLIMIT_MEMLOCK");
    for hint in ["ulimit -l", "LimitMEMLOCK", "CAP_IPC_LOCK"] {
        assert!(error.fix.contains(hint), "{error}");
    }
    // Just enough for the minimum: accepted with a warning.
    let limit = IO_MEMORY_MIN_BYTES * 3 * 4 + MEMLOCK_RESERVE_BYTES;
    let plan = plan_io_memory(&IoMemory::Auto(AutoKeyword::Auto), Limit::Bytes(limit), 4).unwrap();
    assert_eq!(plan.per_shard_bytes, IO_MEMORY_MIN_BYTES);
    assert!(plan.warning.is_some());
}

#[test]
fn explicit_io_memory_over_the_limit_names_the_key() {
    let error = plan_io_memory(&IoMemory::Bytes(16 * MIB), Limit::Bytes(8 * MIB), 1).unwrap_err();
    assert_eq!(error.key, "glommio.io_memory_bytes");
    assert!(error.problem.contains("3 rings x 1 shards"), "{error}");
    let plan = plan_io_memory(&IoMemory::Bytes(2 * MIB), Limit::Bytes(8 * MIB), 1).unwrap();
    assert_eq!(plan.locked_bytes, 6 * MIB);
}

#[test]
fn raising_memlock_sets_soft_to_hard() {
    let memlock = raise_memlock().unwrap();
    assert_eq!(memlock.soft, memlock.hard);
}
