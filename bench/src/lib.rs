//! `ringraft-bench`: the benchmark harness and the raw device probe.
//!
//! **Owns**: the `ringraft-bench` command, its workloads, its JSON output
//! (`docs/bench-output.md`) and the device probe every result is compared against. Performance
//! targets live here, never in timed tests. **Runs on**: its own threads and glommio executors;
//! the probe uses io_uring directly, with no glommio in the way.

pub mod cluster_bench;
pub mod machine;
pub mod probe;
pub mod sm_bench;
pub mod wal_bench;
