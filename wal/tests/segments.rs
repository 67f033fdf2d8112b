//! When the next segment is needed soon (`segment_needed_soon`): what a disk that paces segment
//! preparation goes by.

mod common;

use common::*;
use ringraft_wal::{complete_now, perform, IoJob, MemDisk, Wal, WalConfig};

/// Performs every job but segment preparations, which it keeps; returns whether the WAL went
/// idle with nothing pending (false: a write waits for a segment).
fn drive_holding_prepares(wal: &mut Wal<MemDisk>, disk: &MemDisk, held: &mut Vec<IoJob<MemDisk>>) -> bool {
    while let Some(job) = wal.poll_io() {
        if matches!(job, IoJob::Prepare(_)) {
            held.push(job);
            continue;
        }
        let done = complete_now(perform(disk, job));
        wal.io_done(done).expect("io");
    }
    !wal.has_pending()
}

#[test]
fn the_next_segment_is_needed_soon_once_none_is_ready_and_the_current_one_is_half_written() {
    let disk = MemDisk::new(3);
    // Each write takes at least a 4 KiB block: 64 of them fill a segment.
    let config = WalConfig {
        segment_bytes: 256 * 1024,
        ..small_config()
    };
    let mut wal = open(&disk, &config);
    drive(&mut wal, &disk);
    assert!(!wal.segment_needed_soon(), "one segment is prepared ahead");

    let mut held = Vec::new();
    let mut seen = Vec::new();
    let mut index = 1;
    // Append 1 KiB entries one write at a time, holding back every segment preparation: the
    // ready segment is rolled into, the next one is not prepared, and the current one fills.
    let stalled = loop {
        wal.append(1, &[entry(index, 1, &payload_for(1, index, 1, 1024))])
            .unwrap();
        index += 1;
        let idle = drive_holding_prepares(&mut wal, &disk, &mut held);
        seen.push((held.len(), wal.segment_needed_soon()));
        if !idle {
            break true;
        }
        assert!(index < 1000, "the log never needed a segment");
    };
    assert!(stalled);
    assert_eq!(held.len(), 1, "one preparation asked for, after the rollover");
    // Before the rollover a segment was ready; right after it, none was, but the new segment
    // was nearly empty: not needed soon yet. From about half written on it was, and it still
    // is while a write waits.
    let rollover = seen.iter().position(|&(held, _)| held == 1).expect("a rollover");
    let first = seen
        .iter()
        .position(|&(_, soon)| soon)
        .expect("needed soon at some point");
    assert!(seen[..first].iter().all(|&(_, soon)| !soon));
    assert!(
        first > rollover + 3,
        "needed soon {} writes after the rollover: {seen:?}",
        first - rollover
    );
    assert!(seen[first..].iter().all(|&(_, soon)| soon), "{seen:?}");
    let (after, total) = (first - rollover, seen.len() - rollover);
    assert!(
        after * 3 > total && after * 3 < 2 * total,
        "half way: {after} of {total} writes"
    );
    assert!(wal.segment_needed_soon());

    // Once the held preparation is done, a segment is ready again and the log goes on.
    for job in held.drain(..) {
        let done = complete_now(perform(&disk, job));
        wal.io_done(done).expect("io");
    }
    drive(&mut wal, &disk);
    assert!(!wal.has_pending());
    assert!(!wal.segment_needed_soon());
}
