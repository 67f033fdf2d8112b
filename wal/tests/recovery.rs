//! One test per row of the recovery decision table in docs/wal-format.md.

mod common;

use common::*;
use ringraft_wal::format::{segment_file_name, BLOCK_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use ringraft_wal::{complete_now, perform, HardState, IoJob, MemDisk, MemFault, Wal, WalConfig, WalError};

/// Appends `count` entries of 100 bytes to group 1, one batch (and one write) each.
fn write_batches(wal: &mut Wal<MemDisk>, disk: &MemDisk, count: u64) {
    for _ in 0..count {
        let index = wal.last_index(1) + 1;
        wal.append(1, &[entry(index, 1, &payload_for(1, index, 1, 100))])
            .unwrap();
        drive(wal, disk);
    }
}

fn first_segment() -> String {
    segment_file_name(1)
}

/// Rolls over several segments with group 1's entries and compacts them, so the first segment
/// is recycled; reopens the WAL (a recovery) and checks the segment is gone.
fn recycle_first_segment(mut wal: Wal<MemDisk>, disk: &MemDisk, config: &WalConfig) -> Wal<MemDisk> {
    write_batches(&mut wal, disk, 30);
    wal.compact(1, 30).unwrap(); // lets the oldest segments go
    drive(&mut wal, disk);
    write_batches(&mut wal, disk, 10);
    drop(wal);
    let wal = open(disk, config);
    assert!(
        !disk.names().contains(&first_segment()),
        "the first segment was recycled"
    );
    wal
}

fn expect_corrupt(disk: &MemDisk, config: &WalConfig) -> (String, u64, String) {
    match complete_now(Wal::open(disk.clone(), config.clone())) {
        Err(WalError::Corrupt { file, offset, reason }) => (file, offset, reason),
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn clean_shutdown_recovers_everything() {
    let disk = MemDisk::new(1);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 30); // several segments
    wal.set_hard_state(
        1,
        HardState {
            term: 1,
            vote: 2,
            commit: 20,
        },
    )
    .unwrap();
    drive(&mut wal, &disk);
    let before = state_of(&wal, &disk);
    drop(wal);
    let wal = open(&disk, &config);
    assert_eq!(state_of(&wal, &disk), before);
    assert_eq!(wal.last_index(1), 30);
    assert!(wal.stats().segments_live > 1, "the test must span segments");
}

#[test]
fn torn_tail_is_truncated_on_recovery() {
    for seed in 0..64 {
        let disk = MemDisk::new(seed);
        let config = small_config();
        let mut wal = open(&disk, &config);
        write_batches(&mut wal, &disk, 3);
        let durable = state_of(&wal, &disk);
        wal.append(1, &[entry(4, 1, &payload_for(1, 4, 1, 3000))])
            .unwrap();
        let with_tail = state_of(&wal, &disk);
        assert!(write_without_sync(&mut wal, &disk));
        drop(wal);
        disk.crash();
        let wal = open(&disk, &config);
        let recovered = state_of(&wal, &disk);
        assert!(
            recovered == durable || recovered == with_tail,
            "seed {seed}: the torn batch must vanish or survive whole"
        );
    }
}

#[test]
fn unsynced_writes_are_lost_and_synced_ones_kept_across_crash() {
    let disk = MemDisk::new(7);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 5);
    let durable = state_of(&wal, &disk);
    // Appended, never handed to the disk.
    wal.append(1, &[entry(6, 1, b"lost")]).unwrap();
    drop(wal);
    disk.crash();
    let wal = open(&disk, &config);
    assert_eq!(state_of(&wal, &disk), durable);
}

#[test]
fn damaged_last_batch_is_a_torn_tail() {
    let disk = MemDisk::new(2);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 3);
    drop(wal);
    // Batch 3 sits in the third block after the header; damage its entry's payload.
    disk.flip_bit(
        &first_segment(),
        SEGMENT_HEADER_BYTES + 2 * BLOCK_BYTES + 2 * RECORD_HEADER_BYTES + 5,
        3,
    );
    let wal = open(&disk, &config);
    assert_eq!(wal.last_index(1), 2);
}

#[test]
fn damaged_middle_record_with_valid_batches_after_is_corruption() {
    let disk = MemDisk::new(3);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 3);
    drop(wal);
    let offset = SEGMENT_HEADER_BYTES + BLOCK_BYTES + 2 * RECORD_HEADER_BYTES + 5;
    disk.flip_bit(&first_segment(), offset, 0);
    let (file, at, reason) = expect_corrupt(&disk, &config);
    assert_eq!(file, first_segment());
    assert_eq!(at, (SEGMENT_HEADER_BYTES + BLOCK_BYTES) as u64);
    assert!(reason.contains("not a torn tail"), "{reason}");
    assert!(
        reason.contains(&format!(
            "offset {}",
            SEGMENT_HEADER_BYTES + BLOCK_BYTES + RECORD_HEADER_BYTES
        )),
        "{reason}"
    );
}

#[test]
fn damaged_middle_batch_header_with_valid_batches_after_is_corruption() {
    let disk = MemDisk::new(4);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 3);
    drop(wal);
    disk.flip_bit(&first_segment(), SEGMENT_HEADER_BYTES + BLOCK_BYTES + 20, 1);
    let (file, at, _) = expect_corrupt(&disk, &config);
    assert_eq!(
        (file, at),
        (first_segment(), (SEGMENT_HEADER_BYTES + BLOCK_BYTES) as u64)
    );
}

#[test]
fn damaged_segment_header_with_data_is_corruption() {
    let disk = MemDisk::new(5);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 2);
    drop(wal);
    disk.flip_bit(&first_segment(), 17, 2);
    let (file, _, reason) = expect_corrupt(&disk, &config);
    assert_eq!(file, first_segment());
    assert!(reason.contains("segment header"), "{reason}");
}

#[test]
fn damaged_header_of_a_later_segment_in_the_chain_is_corruption() {
    let disk = MemDisk::new(6);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 20);
    assert!(wal.stats().segments_live >= 3);
    drop(wal);
    disk.flip_bit(&segment_file_name(2), 3, 0);
    let (file, _, reason) = expect_corrupt(&disk, &config);
    assert_eq!(
        file,
        segment_file_name(1),
        "the chain stops at the end of segment 1"
    );
    assert!(
        reason.contains(&segment_file_name(3)) || reason.contains(&segment_file_name(2)),
        "{reason}"
    );
}

#[test]
fn missing_middle_segment_is_corruption() {
    let disk = MemDisk::new(8);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 20);
    drop(wal);
    disk.delete(&segment_file_name(2));
    expect_corrupt(&disk, &config);
}

#[test]
fn unused_segment_with_a_bad_header_is_replaced() {
    // A crash while a segment was being prepared leaves a file whose header never became
    // durable: it holds nothing and must not stop the WAL from opening.
    let disk = MemDisk::new(9);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 2);
    let before = state_of(&wal, &disk);
    drop(wal);
    let names = disk.names();
    let ready = names
        .iter()
        .filter(|n| n.ends_with(".wal"))
        .max()
        .unwrap()
        .clone();
    assert_ne!(ready, first_segment(), "a prepared segment is kept ahead");
    disk.flip_bit(&ready, 0, 0);
    let mut wal = open(&disk, &config);
    assert_eq!(state_of(&wal, &disk), before);
    assert!(!disk.names().contains(&ready), "the unusable file is removed");
    write_batches(&mut wal, &disk, 20);
    drop(wal);
    assert_eq!(open(&disk, &config).last_index(1), 22);
}

#[test]
fn crash_between_recycle_rename_and_header_write_is_harmless() {
    let disk = MemDisk::new(10);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 12);
    wal.compact(1, 12).unwrap();
    drive(&mut wal, &disk);
    // Compaction freed the oldest segments (a prefix of the chain); none is recycled yet.
    assert!(wal.stats().segments_free >= 1, "{:?}", wal.stats());
    let before = state_of(&wal, &disk);
    drop(wal);
    // Simulate: the oldest (free) segment renamed to the next sequence, header not rewritten.
    let mut names = disk.names();
    names.retain(|n| n.ends_with(".wal"));
    names.sort();
    let newest: u64 = names.last().unwrap()[..20].parse().unwrap();
    complete_now(ringraft_wal::Disk::rename(
        &disk,
        &names[0],
        &segment_file_name(newest + 1),
    ))
    .unwrap();
    let mut wal = open(&disk, &config);
    assert_eq!(state_of(&wal, &disk), before);
    write_batches(&mut wal, &disk, 12);
    let after = state_of(&wal, &disk);
    drop(wal);
    assert_eq!(state_of(&open(&disk, &config), &disk), after);
}

#[test]
fn renaming_away_a_live_segment_is_corruption() {
    let disk = MemDisk::new(15);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 12);
    drop(wal);
    complete_now(ringraft_wal::Disk::rename(
        &disk,
        &first_segment(),
        &segment_file_name(99),
    ))
    .unwrap();
    let (_, _, reason) = expect_corrupt(&disk, &config);
    assert!(reason.contains("missing"), "{reason}");
}

#[test]
fn stale_batch_header_left_by_a_truncated_tail_never_resurrects() {
    // Torn batch k at offset p, truncated at recovery; the next batch k then rolls over to a new
    // segment. The torn batch's header at p must not come back as batch k.
    for seed in 0..32 {
        let disk = MemDisk::new(100 + seed);
        let config = small_config();
        let mut wal = open(&disk, &config);
        write_batches(&mut wal, &disk, 2);
        let durable = state_of(&wal, &disk);
        wal.append(1, &[entry(3, 1, &payload_for(1, 3, 1, 200))]).unwrap();
        assert!(write_without_sync(&mut wal, &disk));
        drop(wal);
        disk.crash();
        let mut wal = open(&disk, &config);
        let recovered = state_of(&wal, &disk);
        // A batch too large for the rest of the segment goes to the next one.
        let index = wal.last_index(1) + 1;
        wal.append(1, &[entry(index, 2, &payload_for(1, index, 2, 3900))])
            .unwrap();
        for _ in 0..5 {
            wal.append(1, &[entry(wal.last_index(1) + 1, 2, &[1; 3900])])
                .unwrap();
            drive(&mut wal, &disk);
        }
        let expected = state_of(&wal, &disk);
        drop(wal);
        let wal = open(&disk, &config);
        assert_eq!(state_of(&wal, &disk), expected, "seed {seed}");
        assert!(recovered == durable || recovered.get(&1).unwrap().entries.len() == 3);
    }
}

#[test]
fn failed_sync_fails_the_wal_and_refuses_appends() {
    let disk = MemDisk::new(11);
    let config = small_config();
    let mut wal = open(&disk, &config);
    write_batches(&mut wal, &disk, 1);
    wal.append(1, &[entry(2, 1, b"x")]).unwrap();
    disk.inject(MemFault::Sync(libc::EIO));
    let mut failure = None;
    while let Some(job) = wal.poll_io() {
        let done = complete_now(ringraft_wal::perform(&disk, job));
        if let Err(error) = wal.io_done(done) {
            failure = Some(error);
        }
    }
    assert!(matches!(failure, Some(WalError::Io { .. })), "{failure:?}");
    assert!(wal.failure().unwrap().contains("Input/output error"));
    assert!(matches!(
        wal.append(1, &[entry(3, 1, b"y")]),
        Err(WalError::Failed { .. })
    ));
    assert_eq!(wal.durable_ticket(), ringraft_wal::Ticket(1));
}

#[test]
fn short_write_and_disk_full_are_errors_not_panics() {
    for fault in [MemFault::ShortWrite(100), MemFault::Write(libc::ENOSPC)] {
        let disk = MemDisk::new(12);
        let config = small_config();
        let mut wal = open(&disk, &config);
        write_batches(&mut wal, &disk, 1);
        wal.append(1, &[entry(2, 1, &[7; 1000])]).unwrap();
        disk.inject(fault);
        let mut errors = Vec::new();
        while let Some(job) = wal.poll_io() {
            let done = complete_now(ringraft_wal::perform(&disk, job));
            if let Err(error) = wal.io_done(done) {
                errors.push(error.to_string());
            }
        }
        assert_eq!(errors.len(), 1, "{fault:?}: {errors:?}");
        assert!(wal.append(1, &[entry(3, 1, b"y")]).is_err());
        drop(wal);
        disk.crash();
        assert_eq!(open(&disk, &config).last_index(1), 1, "{fault:?}");
    }
}

#[test]
fn failed_segment_creation_is_retried_with_a_backoff_and_loses_nothing() {
    let disk = MemDisk::new(13);
    disk.inject(MemFault::Create(libc::ENOSPC));
    disk.inject(MemFault::Create(libc::ENOSPC));
    disk.inject(MemFault::Create(libc::ENOSPC));
    let config = small_config();
    let mut wal = open(&disk, &config);
    let first = wal.append(1, &[entry(1, 1, b"a")]).unwrap();
    let mut delays = Vec::new();
    let mut errors = Vec::new();
    while let Some(job) = wal.poll_io() {
        if let IoJob::Prepare(prepare) = &job {
            delays.push(prepare.delay.as_millis());
        }
        if let Err(error) = wal.io_done(complete_now(perform(&disk, job))) {
            errors.push(error.to_string());
            // Not a failure of the WAL: appends are taken, nothing is durable yet.
            assert_eq!(wal.failure(), None);
            assert_eq!(wal.prepare_error(), Some(errors.last().unwrap().as_str()));
            assert!(wal.durable_ticket() < first);
            let index = wal.last_index(1) + 1;
            wal.append(1, &[entry(index, 1, &payload_for(1, index, 1, 100))])
                .unwrap();
        }
    }
    assert_eq!(delays[..4], [0, 10, 20, 40], "{delays:?}");
    assert_eq!(errors.len(), 3, "{errors:?}");
    for error in &errors {
        assert!(error.contains("prepare segment"), "{error}");
        assert!(
            error.contains(&segment_file_name(1)),
            "the same segment again: {error}"
        );
        assert!(error.contains("No space left"), "{error}");
    }
    assert_eq!(wal.prepare_error(), None);
    assert_eq!(wal.stats().prepare_failures, 3);
    assert_eq!(wal.durable_ticket(), wal.last_ticket());
    let before = state_of(&wal, &disk);
    assert_eq!(wal.last_index(1), 4);
    drop(wal);
    disk.crash();
    let wal = open(&disk, &config);
    assert_eq!(state_of(&wal, &disk), before);
    assert_eq!(disk.names(), [segment_file_name(1), segment_file_name(2)]);
}

#[test]
fn a_segment_preparation_failing_otherwise_than_for_space_fails_the_wal() {
    // EIO (a sick disk) or a vanished directory: not waited out. The shard stops and healthy
    // nodes take over.
    for fault in [MemFault::Create(libc::EIO), MemFault::Create(libc::ENOENT)] {
        let disk = MemDisk::new(13);
        disk.inject(fault);
        let config = small_config();
        let mut wal = open(&disk, &config);
        wal.append(1, &[entry(1, 1, b"a")]).unwrap();
        let job = wal.poll_io().unwrap();
        let error = wal.io_done(complete_now(perform(&disk, job))).unwrap_err();
        assert!(error.to_string().contains("prepare segment"), "{error}");
        assert!(wal.failure().is_some(), "{fault:?}");
        assert!(matches!(
            wal.append(1, &[entry(2, 1, b"b")]),
            Err(WalError::Failed { .. })
        ));
    }
}

#[test]
fn failed_recycling_keeps_the_file_and_is_retried() {
    // A fault at each step of recycling a purged segment: the rename, the open, the header's
    // write and its sync. The retry reuses the file under whichever name it has by then.
    // (ENOSPC at each step: a copy-on-write file system can run out of space even to
    // overwrite a block or sync it.)
    for fault in [
        MemFault::Rename(libc::ENOSPC),
        MemFault::Open(libc::EDQUOT),
        MemFault::Write(libc::ENOSPC),
        MemFault::Sync(libc::ENOSPC),
    ] {
        let disk = MemDisk::new(15);
        let config = small_config();
        let mut wal = open(&disk, &config);
        let mut injected = false;
        let mut errors = Vec::new();
        while wal.last_index(1) < 80 {
            let index = wal.last_index(1) + 1;
            wal.append(1, &[entry(index, 1, &payload_for(1, index, 1, 100))])
                .unwrap();
            if index > 10 {
                wal.compact(1, index - 10).unwrap(); // segments keep becoming free
            }
            while let Some(job) = wal.poll_io() {
                if let IoJob::Prepare(prepare) = &job {
                    if prepare.recycle_from.is_some() && !injected {
                        disk.inject(fault);
                        injected = true;
                    }
                }
                if let Err(error) = wal.io_done(complete_now(perform(&disk, job))) {
                    errors.push(error.to_string());
                }
            }
            // No file is lost or left behind: every segment file is live, ready or free.
            let stats = wal.stats();
            let files = disk.names().len();
            assert_eq!(
                files,
                stats.segments_live + stats.segments_ready + stats.segments_free,
                "{fault:?}: {:?}",
                disk.names()
            );
        }
        assert!(injected, "{fault:?}: the test must recycle a segment");
        assert_eq!(errors.len(), 1, "{fault:?}: {errors:?}");
        assert!(errors[0].contains("prepare segment"), "{fault:?}: {}", errors[0]);
        assert_eq!(wal.failure(), None, "{fault:?}");
        assert_eq!(wal.durable_ticket(), wal.last_ticket(), "{fault:?}");
        let before = state_of(&wal, &disk);
        drop(wal);
        disk.crash();
        let wal = open(&disk, &config);
        assert_eq!(state_of(&wal, &disk), before, "{fault:?}");
        assert_eq!(wal.last_index(1), 80, "{fault:?}");
    }
}

#[test]
fn bad_config_is_rejected_with_the_key() {
    let disk = MemDisk::new(14);
    let config = WalConfig {
        segment_bytes: 10_000,
        ..WalConfig::default()
    };
    let error = complete_now(Wal::open(disk, config)).unwrap_err();
    assert!(error.to_string().contains("wal.segment_bytes"), "{error}");
}

#[test]
fn reset_to_index_zero_keeps_its_term_across_recovery_and_recycling() {
    // Found by the property test: a reset at index 0 with term 3 leaves first = 1; after a
    // recovery the next rollover checkpoints must still restate it, or recycling the segment
    // holding the reset loses the term.
    let disk = MemDisk::new(16);
    let config = small_config();
    let mut wal = open(&disk, &config);
    wal.reset(7, 0, 3).unwrap();
    drive(&mut wal, &disk);
    drop(wal);
    let wal = open(&disk, &config);
    assert_eq!(wal.term(7, 0), Ok(3));
    let wal = recycle_first_segment(wal, &disk, &config);
    assert_eq!(wal.term(7, 0), Ok(3));
}

#[test]
fn metadata_survives_recovery_rollover_and_compaction() {
    let disk = MemDisk::new(17);
    let config = small_config();
    let mut wal = open(&disk, &config);
    wal.append(7, &[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
        .unwrap();
    wal.set_meta(7, 1, b"members 1 2 3").unwrap();
    wal.set_meta(7, 3, b"members 1 2 3 4").unwrap();
    assert!(!wal.meta_durable(7));
    drive(&mut wal, &disk);
    assert!(wal.meta_durable(7));
    drop(wal);
    let mut wal = open(&disk, &config);
    assert_eq!(wal.meta_at(7, 0), None);
    assert_eq!(wal.meta_at(7, 2).unwrap(), (1, b"members 1 2 3".to_vec().into()));
    assert_eq!(wal.meta_at(7, 9).unwrap().0, 3);
    // Compacting past the newer record supersedes the older one.
    wal.compact(7, 3).unwrap();
    assert_eq!(wal.metas(7).len(), 1);
    drive(&mut wal, &disk);
    // The rollover checkpoints restate the records once their segment is recycled.
    let wal = recycle_first_segment(wal, &disk, &config);
    assert_eq!(
        wal.meta_at(7, 100).unwrap(),
        (3, b"members 1 2 3 4".to_vec().into())
    );
    assert_eq!(wal.metas(7).len(), 1);
}

#[test]
fn oversized_metadata_is_an_error() {
    let disk = MemDisk::new(18);
    let mut wal = open(&disk, &small_config());
    let error = wal
        .set_meta(1, 1, &vec![0; ringraft_wal::META_BYTES_MAX + 1])
        .unwrap_err();
    assert!(error.to_string().contains("metadata record"), "{error}");
    assert_eq!(wal.meta_at(1, 1), None);
}
