//! Golden bytes of a WAL segment: any change to the on-disk format shows up as a diff of
//! `tests/golden/segment-v2.hex` in review. Regenerate deliberately with
//! `RINGRAFT_BLESS=1 cargo test -p ringraft-wal --test golden` (and bump FORMAT_VERSION).

mod common;

use common::*;
use ringraft_wal::format::{segment_file_name, BLOCK_BYTES};
use ringraft_wal::{HardState, MemDisk, WalConfig};

/// Hex dump, 16 bytes a line with the offset; all-zero lines are left out.
fn dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (line, chunk) in bytes.chunks(16).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        out.push_str(&format!("{:08x}:", line * 16));
        for byte in chunk {
            out.push_str(&format!(" {byte:02x}"));
        }
        out.push('\n');
    }
    out
}

fn check(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("RINGRAFT_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        expected == actual,
        "{name} changed: the WAL format differs from the golden file.\n{actual}"
    );
}

#[test]
fn segment_bytes_match_the_golden_file() {
    let disk = MemDisk::new(0);
    let config = WalConfig {
        segment_bytes: 4 * BLOCK_BYTES as u64,
        batch_bytes_max: BLOCK_BYTES,
        cache_bytes_max: 1 << 20,
        segments_recycled_max: 1,
    };
    let mut wal = open(&disk, &config);
    // Batch 1: two entries of group 7 and its hard state.
    wal.append(7, &[entry(1, 1, b"put k1=v1"), entry(2, 1, b"")])
        .unwrap();
    wal.set_hard_state(
        7,
        HardState {
            term: 1,
            vote: 3,
            commit: 1,
        },
    )
    .unwrap();
    drive(&mut wal, &disk);
    // Batch 2: an overwrite of index 2, a compaction and a snapshot reset of another group.
    wal.append(7, &[entry(2, 2, &[0xab; 20])]).unwrap();
    wal.compact(7, 1).unwrap();
    wal.reset(9, 100, 4).unwrap();
    drive(&mut wal, &disk);
    // Batch 3 (format version 2): engine metadata of group 9.
    wal.set_meta(9, 100, b"voters 1 2 3").unwrap();
    drive(&mut wal, &disk);
    let segment = disk.contents(&segment_file_name(1)).unwrap();
    check("segment-v2.hex", &dump(&segment));
}

/// Segments written by format version 1 (before `Meta` records) still recover.
#[test]
fn version_1_segments_still_recover() {
    let hex = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/segment-v1.hex"),
    )
    .unwrap();
    let mut bytes = vec![0u8; 4 * BLOCK_BYTES];
    for line in hex.lines() {
        let (offset, rest) = line.split_once(':').unwrap();
        let start = usize::from_str_radix(offset, 16).unwrap();
        for (at, byte) in (start..).zip(rest.split_whitespace()) {
            bytes[at] = u8::from_str_radix(byte, 16).unwrap();
        }
    }
    let disk = MemDisk::new(0);
    disk.put_file(&segment_file_name(1), bytes);
    let config = WalConfig {
        segment_bytes: 4 * BLOCK_BYTES as u64,
        batch_bytes_max: BLOCK_BYTES,
        cache_bytes_max: 1 << 20,
        segments_recycled_max: 1,
    };
    let wal = open(&disk, &config);
    assert_eq!(wal.last_index(7), 2);
    assert_eq!(wal.term(7, 2), Ok(2));
    assert_eq!(wal.first_index(9), 101);
    assert_eq!(wal.hard_state(7).vote, 3);
}
