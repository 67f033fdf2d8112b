//! Whether io_uring works here: kernel version, the `io_uring_disabled` sysctl, and a real ring.

/// io_uring needs Linux 5.8 or newer for everything ringraft and glommio use.
pub const KERNEL_MIN: (u32, u32) = (5, 8);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoUringStatus {
    pub kernel: String,
    pub kernel_ok: bool,
    /// `/proc/sys/kernel/io_uring_disabled`: 0 allowed, 1 only for a group, 2 off; `None` if the
    /// kernel has no such switch (older kernels: allowed).
    pub disabled_sysctl: Option<u32>,
    /// Creating an 8-entry ring worked, or why not.
    pub probe: Result<(), String>,
}

impl IoUringStatus {
    pub fn usable(&self) -> bool {
        self.kernel_ok && self.probe.is_ok()
    }
}

pub(crate) fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

pub fn io_uring_status() -> IoUringStatus {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |k| k.trim().to_string());
    let kernel_ok = parse_kernel_version(&kernel).is_some_and(|v| v >= KERNEL_MIN);
    let disabled_sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|v| v.trim().parse().ok());
    let probe = io_uring::IoUring::new(8).map(drop).map_err(|e| e.to_string());
    IoUringStatus {
        kernel,
        kernel_ok,
        disabled_sysctl,
        probe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.8.0"), Some((5, 8)));
        assert!(parse_kernel_version("5.4.0-generic").unwrap() < KERNEL_MIN);
        assert_eq!(parse_kernel_version("weird"), None);
    }
}
