//! `ringraft-tuning`: configuration, validation, CPU topology and pinning, memlock.
//!
//! **Owns**: the one TOML config file (`docs/config.md` documents every key), its validation
//! (every error names the key and the fix), the machine's topology, RLIMIT_MEMLOCK and the sizing
//! of glommio's registered memory, the recommended configuration (`ringraft-tune`). **Runs on**:
//! the main thread at start, before any shard exists. **Invariants**: every limit of the system
//! has its default and reason here; a config that passed [`validate`] has no zero limits, no CPU
//! that is offline or listed twice, no colliding ports, and sizes that nest (value in command in
//! entry in WAL batch; message in frame).

mod config;
mod error;
mod irq;
mod memlock;
mod recommend;
mod topology;
mod uring;
mod validate;

pub use config::{
    AddressBookChange, AutoKeyword, BatchingConfig, ClusterConfig, Config, CpuList, GlommioConfig, IoMemory,
    LimitsConfig, NodeAddress, NodeConfig, RaftConfig, ShardsConfig, SmConfig, SyncMode, WalConfig,
    ENV_DATA_DIR, ENV_NODE_ID,
};
pub use error::{ConfigError, ConfigErrors};
pub use irq::{device_interrupt_cpus, interrupt_cpus_in, shards_away_from_interrupts};
pub use memlock::{
    plan_io_memory, raise_memlock, read_memlock, IoMemoryPlan, Limit, Memlock, IO_MEMORY_AUTO_MAX_BYTES,
    IO_MEMORY_MIN_BYTES, IO_MEMORY_RECOMMENDED_BYTES, MEMLOCK_RESERVE_BYTES, RINGS_PER_EXECUTOR,
};
pub use recommend::{recommend, Recommendation, RESERVE_CPU0_ABOVE};
pub use topology::{parse_cpu_list, Cpu, Topology};
pub use uring::{io_uring_status, IoUringStatus};
pub use validate::{
    resolve_cpus, validate, COMMAND_OVERHEAD_BYTES, FRAME_OVERHEAD_BYTES, SPIN_BEFORE_PARK_US_MAX,
    WAL_BLOCK_BYTES, WAL_RECORD_OVERHEAD_BYTES,
};
