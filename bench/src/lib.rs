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
    let mut out = Vec::with_capacity(key_bytes);
    write_key(index, key_bytes, &mut out);
    out
}

/// [`key`] into `out` (cleared first): the benchmark's clients draw a key per operation, and
/// formatting it through `format!` was ~2% of a client thread.
pub fn write_key(index: u64, key_bytes: usize, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mixed = index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // The hex digits of `mixed` without leading zeros, zero-padded on the left to `key_bytes`,
    // then cut to `key_bytes` (as `format!("{mixed:0key_bytes$x}")` truncated, which it was).
    let digits = (16 - mixed.leading_zeros() as usize / 4).max(1);
    out.clear();
    out.resize(key_bytes.saturating_sub(digits), b'0');
    for digit in (0..digits).rev() {
        if out.len() == key_bytes {
            break;
        }
        out.push(HEX[(mixed >> (4 * digit)) as usize & 0xf]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_the_hex_of_the_mixed_index_padded_and_cut() {
        let mut reused = Vec::new();
        for index in (0..5000u64).chain([u64::MAX, 1 << 60, 0x0f00_0000_0000_0000]) {
            for key_bytes in [0, 1, 7, 15, 16, 17, 24, 64] {
                let mixed = index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut expected = format!("{mixed:0width$x}", width = key_bytes);
                expected.truncate(key_bytes);
                assert_eq!(
                    super::key(index, key_bytes),
                    expected.as_bytes(),
                    "{index} {key_bytes}"
                );
                super::write_key(index, key_bytes, &mut reused);
                assert_eq!(reused, expected.as_bytes());
            }
        }
    }
}
