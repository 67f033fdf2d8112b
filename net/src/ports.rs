//! Free ports on 127.0.0.1 for clusters started on one machine (the benchmark, tests).
//!
//! Asking the kernel for port 0 hands out a port from its ephemeral range, the same range every
//! outgoing connection takes its local port from. Between choosing such a port and the node
//! binding it, a connection elsewhere (another node dialling its peers, a client) may take it,
//! and the node then fails to start. So ports here come from below the ephemeral range (or
//! above it when there is no room below), where the kernel never places anything by itself,
//! from a random starting point so that concurrent callers rarely try the same ports, and every
//! port of one call is held until all of them are chosen, so one call never returns a port
//! twice.

use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;

/// Where the search starts being worth it: ports below are often fixed services' ports.
const LOWEST: u32 = 10_000;

/// `ranges` bases, each the first of `len` consecutive ports free on 127.0.0.1 when chosen,
/// no port in two ranges.
pub fn local_port_ranges(ranges: usize, len: u16) -> Result<Vec<u16>, String> {
    let len = u32::from(len.max(1));
    let (ephemeral_low, ephemeral_high) = ephemeral_range();
    let window = if ephemeral_low >= LOWEST + 4 * len * ranges as u32 {
        LOWEST..ephemeral_low
    } else {
        ephemeral_high + 1..65_536
    };
    let slots = (window.end - window.start) / len;
    if slots < 2 * ranges as u32 {
        return Err(format!(
            "no room for {ranges} ranges of {len} ports outside the ephemeral range {ephemeral_low}-{ephemeral_high}"
        ));
    }
    let start = (RandomState::new().hash_one(std::process::id()) % u64::from(slots)) as u32;
    let mut held: Vec<TcpListener> = Vec::new();
    let mut bases = Vec::with_capacity(ranges);
    for step in 0..slots {
        if bases.len() == ranges {
            break;
        }
        let base = window.start + (start + step) % slots * len;
        let bound: Result<Vec<_>, _> = (base..base + len)
            .map(|port| TcpListener::bind(("127.0.0.1", port as u16)))
            .collect();
        if let Ok(listeners) = bound {
            held.extend(listeners);
            bases.push(base as u16);
        }
    }
    if bases.len() < ranges {
        return Err(format!(
            "found only {} of {ranges} ranges of {len} free ports on 127.0.0.1",
            bases.len()
        ));
    }
    Ok(bases)
}

/// The kernel's ephemeral port range (Linux's default when it cannot be read).
fn ephemeral_range() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut numbers = text.split_whitespace().map(|n| n.parse::<u32>());
            match (numbers.next(), numbers.next()) {
                (Some(Ok(low)), Some(Ok(high))) if low <= high && high < 65_536 => Some((low, high)),
                _ => None,
            }
        })
        .unwrap_or((32_768, 60_999))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_free_disjoint_and_outside_the_ephemeral_range() {
        let bases = local_port_ranges(3, 2).unwrap();
        assert_eq!(bases.len(), 3);
        let (low, high) = ephemeral_range();
        let mut ports: Vec<u16> = bases.iter().flat_map(|&b| [b, b + 1]).collect();
        for &port in &ports {
            assert!(
                u32::from(port) < low || u32::from(port) > high,
                "{port} is ephemeral"
            );
        }
        // Each port can be bound now (the call released them all).
        let listeners: Vec<_> = ports
            .iter()
            .map(|&p| TcpListener::bind(("127.0.0.1", p)).unwrap())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6, "no port in two ranges: {bases:?}");
        // Ports in use are skipped.
        for base in local_port_ranges(2, 2).unwrap() {
            assert!(
                !ports.contains(&base) && !ports.contains(&(base + 1)),
                "{base} is in use"
            );
        }
        drop(listeners);
    }
}
