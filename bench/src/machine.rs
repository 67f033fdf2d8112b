//! What machine a result came from, recorded in every run's output so results compare honestly.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus_online: usize,
    pub kernel: String,
    pub memory_bytes: u64,
    /// The block device under the benchmark directory, as `major:minor` and its model if known.
    pub disk: String,
    /// CPUs taking that device's completion interrupts, if they can be told.
    pub disk_interrupt_cpus: Option<Vec<usize>>,
    pub ringraft_version: String,
    pub date_unix_s: u64,
}

fn first_line_value(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

pub fn detect(dir: &std::path::Path) -> Machine {
    use std::os::unix::fs::MetadataExt;
    let disk = std::fs::metadata(dir)
        .map(|m| {
            let dev = m.dev();
            let (major, minor) = (libc::major(dev), libc::minor(dev));
            let model = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/device/model"))
                .or_else(|_| {
                    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/../device/model"))
                })
                .map(|m| m.trim().to_string())
                .unwrap_or_default();
            let name = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            format!("{major}:{minor} {name} {model}").trim().to_string()
        })
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        cpu_model: first_line_value("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into()),
        cpus_online: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |k| k.trim().into()),
        memory_bytes: first_line_value("/proc/meminfo", "MemTotal")
            .and_then(|v| v.split_whitespace().next().and_then(|kb| kb.parse::<u64>().ok()))
            .map_or(0, |kb| kb * 1024),
        disk,
        disk_interrupt_cpus: ringraft_tuning::device_interrupt_cpus(dir),
        ringraft_version: env!("CARGO_PKG_VERSION").to_string(),
        date_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

/// Creates the benchmark directory (so its device can be named) and detects the machine.
pub fn detect_after_create(dir: &std::path::Path) -> Result<Machine, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(detect(dir))
}
