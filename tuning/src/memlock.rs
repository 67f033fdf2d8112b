//! Locked memory for glommio's registered IO buffers.
//!
//! glommio registers each executor's `io_memory` arena with its io_uring rings (three per
//! executor), and registration counts against RLIMIT_MEMLOCK unless the process holds
//! CAP_IPC_LOCK. Buffers that do not fit the arena are plain heap memory: still correct, but
//! slower (BENCHMARKS.md measured 1 MiB WAL batches at about half the bandwidth with a 2 MiB arena
//! than with 16 MiB). At start: raise the soft limit to the hard limit, size `io_memory` so all
//! shards fit, warn when the arena is small, refuse when even the minimum cannot be had.

use crate::config::IoMemory;
use crate::error::ConfigError;

/// glommio registers the arena in this many rings per executor.
pub const RINGS_PER_EXECUTOR: u64 = 3;
/// Locked memory kept back for io_uring rings themselves and other users.
pub const MEMLOCK_RESERVE_BYTES: u64 = 1 << 20;
/// Below this an arena cannot hold even one WAL batch buffer of the smallest useful size.
pub const IO_MEMORY_MIN_BYTES: u64 = 256 << 10;
/// From this size on, 1 MiB batch buffers and concurrent reads fit the arena.
pub const IO_MEMORY_RECOMMENDED_BYTES: u64 = 16 << 20;
/// `auto` never takes more than this per shard.
pub const IO_MEMORY_AUTO_MAX_BYTES: u64 = 64 << 20;

/// A resource limit value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Bytes(u64),
    Unlimited,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Bytes(b) => write!(f, "{} KiB", b / 1024),
            Limit::Unlimited => write!(f, "unlimited"),
        }
    }
}

fn limit_of(raw: libc::rlim_t) -> Limit {
    if raw == libc::RLIM_INFINITY {
        Limit::Unlimited
    } else {
        Limit::Bytes(raw)
    }
}

/// The memlock situation of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memlock {
    pub soft_before: Limit,
    pub soft: Limit,
    pub hard: Limit,
    /// CAP_IPC_LOCK (root has it): locking is not limited.
    pub privileged: bool,
}

impl Memlock {
    /// What registration may lock.
    pub fn effective(&self) -> Limit {
        if self.privileged {
            Limit::Unlimited
        } else {
            self.soft
        }
    }
}

fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

fn getrlimit() -> std::io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit)
}

/// Reads RLIMIT_MEMLOCK without changing it.
pub fn read_memlock() -> std::io::Result<Memlock> {
    let limit = getrlimit()?;
    Ok(Memlock {
        soft_before: limit_of(limit.rlim_cur),
        soft: limit_of(limit.rlim_cur),
        hard: limit_of(limit.rlim_max),
        privileged: has_cap_ipc_lock(),
    })
}

/// Raises the soft RLIMIT_MEMLOCK to the hard limit (always allowed) and reports the result.
pub fn raise_memlock() -> std::io::Result<Memlock> {
    let mut limit = getrlimit()?;
    let before = limit_of(limit.rlim_cur);
    if limit.rlim_cur != limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(Memlock {
        soft_before: before,
        soft: limit_of(limit.rlim_cur),
        hard: limit_of(limit.rlim_max),
        privileged: has_cap_ipc_lock(),
    })
}

/// How much io_memory each shard gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoMemoryPlan {
    pub per_shard_bytes: u64,
    /// What registration locks across all shards.
    pub locked_bytes: u64,
    /// Set when the arena is smaller than recommended (slower large writes), with the reason.
    pub warning: Option<String>,
}

fn raise_hint(needed: u64) -> String {
    format!(
        "raise the locked-memory limit to at least {} KiB: `ulimit -l {}` (or `unlimited`) in the shell \
         that starts ringraft, `LimitMEMLOCK=infinity` in its systemd unit, a memlock line in \
         /etc/security/limits.conf, or grant CAP_IPC_LOCK (`setcap cap_ipc_lock+ep <binary>`)",
        needed.div_ceil(1024),
        needed.div_ceil(1024)
    )
}

/// Sizes io_memory for `shards` executors under the memlock limit `memlock` (from
/// [`Memlock::effective`]).
pub fn plan_io_memory(
    requested: &IoMemory,
    memlock: Limit,
    shards: u64,
) -> Result<IoMemoryPlan, ConfigError> {
    assert!(shards > 0, "plan_io_memory: no shards");
    let per_ring_set = RINGS_PER_EXECUTOR * shards;
    let budget = match memlock {
        Limit::Unlimited => None,
        Limit::Bytes(bytes) => Some(bytes.saturating_sub(MEMLOCK_RESERVE_BYTES)),
    };
    let fits = |per_shard: u64| budget.is_none_or(|b| per_shard * per_ring_set <= b);
    let per_shard = match requested {
        IoMemory::Bytes(bytes) => {
            if !fits(*bytes) {
                let needed = bytes * per_ring_set + MEMLOCK_RESERVE_BYTES;
                return Err(ConfigError::new(
                    "glommio.io_memory_bytes",
                    format!(
                        "{bytes} bytes x {RINGS_PER_EXECUTOR} rings x {shards} shards needs {} KiB of locked memory; \
                         RLIMIT_MEMLOCK allows {memlock}",
                        needed / 1024
                    ),
                    format!("lower it, use \"auto\", or {}", raise_hint(needed)),
                ));
            }
            *bytes
        }
        IoMemory::Auto(_) => {
            let fit = budget.map_or(IO_MEMORY_AUTO_MAX_BYTES, |b| (b / per_ring_set) & !4095);
            let per_shard = fit.min(IO_MEMORY_AUTO_MAX_BYTES);
            if per_shard < IO_MEMORY_MIN_BYTES {
                let needed = IO_MEMORY_MIN_BYTES * per_ring_set + MEMLOCK_RESERVE_BYTES;
                return Err(ConfigError::new(
                    "RLIMIT_MEMLOCK",
                    format!(
                        "{memlock} of locked memory leaves {} KiB per shard for {shards} shards; the minimum is {} KiB",
                        per_shard / 1024,
                        IO_MEMORY_MIN_BYTES / 1024
                    ),
                    raise_hint(needed),
                ));
            }
            per_shard
        }
    };
    let warning = (per_shard < IO_MEMORY_RECOMMENDED_BYTES).then(|| {
        format!(
            "io_memory is {} KiB per shard (recommended {} KiB): larger WAL batches will use unregistered \
             buffers and write more slowly; {}",
            per_shard / 1024,
            IO_MEMORY_RECOMMENDED_BYTES / 1024,
            raise_hint(IO_MEMORY_RECOMMENDED_BYTES * per_ring_set + MEMLOCK_RESERVE_BYTES)
        )
    });
    Ok(IoMemoryPlan {
        per_shard_bytes: per_shard,
        locked_bytes: per_shard * per_ring_set,
        warning,
    })
}
