//! `ringraft-bench`: the benchmark harness and the raw device probe.
//!
//! **Owns**: the `ringraft-bench` command, its workloads, its JSON output
//! (`docs/bench-output.md`) and the device probe every result is compared against. Performance
//! targets live here, never in timed tests. **Runs on**: its own threads and glommio executors;
//! the probe uses io_uring directly, with no glommio in the way.

pub mod catch_up;
pub mod cluster_bench;
pub mod compare;
pub mod machine;
pub mod plot;
pub mod probe;
pub mod sm_bench;
pub mod wal_bench;
pub mod workload;

/// A deterministic key of `key_bytes` hex characters for `index`, spread over the key space
/// (the same keys in every run, so results compare).
pub fn key(index: u64, key_bytes: usize) -> Vec<u8> {
    let mixed = index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut text = format!("{mixed:0width$x}", width = key_bytes);
    text.truncate(key_bytes);
    text.into_bytes()
}
