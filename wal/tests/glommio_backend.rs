//! The real backend on a temporary directory: O_DIRECT segment files through glommio, both sync
//! modes, group commit from concurrent appenders, recovery in a fresh executor, disk reads of
//! uncached entries, and the guard against glommio 0.9's iopoll probe bug.

use std::rc::Rc;

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use ringraft_wal::{Entry, GlommioWal, HardState, SyncMode, WalConfig};

fn config() -> WalConfig {
    WalConfig {
        segment_bytes: 256 * 1024,
        batch_bytes_max: 64 * 1024,
        cache_bytes_max: 4096, // most entries are read back from disk
        segments_recycled_max: 1,
    }
}

/// Runs `f` on a fresh executor thread (so glommio's per-thread device cache starts empty).
fn on_executor<T: Send + 'static, F>(f: impl FnOnce() -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10) // tests run in parallel: stay within an 8 MiB memlock limit
        .spawn(f)
        .expect("executor")
        .join()
        .expect("join")
}

fn payload(group: u64, index: u64) -> Bytes {
    Bytes::from(
        (0..(100 + index as usize % 900))
            .map(|i| (i as u64 * 13 + group + index) as u8)
            .collect::<Vec<_>>(),
    )
}

fn run(sync_mode: SyncMode) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let writer_path = path.clone();
    let (writes, last) = on_executor(move || async move {
        let wal = GlommioWal::open(&writer_path, sync_mode, config())
            .await
            .expect("open");
        let mut tasks = Vec::new();
        for writer in 0..16u64 {
            let wal: Rc<GlommioWal> = wal.clone();
            tasks.push(glommio::spawn_local(async move {
                let group = writer % 4;
                for _ in 0..40 {
                    let ticket = wal.with(|w| {
                        let index = w.last_index(group) + 1;
                        w.append(
                            group,
                            &[Entry {
                                index,
                                term: 1,
                                entry_type: 0,
                                payload: payload(group, index),
                            }],
                        )
                    });
                    wal.wait_durable(ticket.expect("append")).await.expect("durable");
                }
            }));
        }
        for task in tasks {
            task.await;
        }
        let ticket = wal
            .with(|w| {
                w.set_hard_state(
                    2,
                    HardState {
                        term: 1,
                        vote: 1,
                        commit: 100,
                    },
                )
            })
            .unwrap();
        wal.wait_durable(ticket).await.unwrap();
        wal.close().await.unwrap();
        let stats = wal.with(|w| w.stats());
        (
            stats.writes,
            (0..4).map(|g| wal.with(|w| w.last_index(g))).collect::<Vec<_>>(),
        )
    });
    assert_eq!(last, vec![160; 4]);
    // 640 appends from 16 concurrent writers share far fewer writes: group commit.
    assert!(writes < 640, "{writes} writes for 640 appends");

    on_executor(move || async move {
        let wal = GlommioWal::open(&path, sync_mode, config())
            .await
            .expect("reopen");
        for group in 0..4 {
            let plan = wal.with(|w| {
                assert_eq!(w.last_index(group), 160);
                w.read_plan(group, 1, 161, None).unwrap()
            });
            assert!(plan.disk_reads() > 0, "the test must read from disk");
            let disk = wal.with(|w| w.disk().clone());
            let entries = plan.execute(&disk).await.expect("disk read");
            for entry in entries {
                assert_eq!(entry.payload, payload(group, entry.index));
            }
        }
        assert_eq!(wal.with(|w| w.hard_state(2)).commit, 100);
        wal.close().await.unwrap();
    });
}

#[test]
fn dsync_mode_writes_recovers_and_reads_back() {
    run(SyncMode::Dsync);
}

#[test]
fn fdatasync_mode_writes_recovers_and_reads_back() {
    run(SyncMode::Fdatasync);
}

#[test]
fn iopoll_guard_file_is_created_and_reads_work_in_a_fresh_directory() {
    // A fresh thread and a fresh directory: the first DmaFile glommio would open is an empty new
    // segment. Without the guard, reads then fail with EOPNOTSUPP on devices without iopoll.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run_in(path.clone());
    assert!(path.join(ringraft_wal::IOPOLL_GUARD_FILE).exists());

    fn run_in(path: std::path::PathBuf) {
        on_executor(move || async move {
            let wal = GlommioWal::open(&path, SyncMode::Dsync, config())
                .await
                .expect("open");
            let ticket = wal
                .with(|w| {
                    w.append(
                        1,
                        &[Entry {
                            index: 1,
                            term: 1,
                            entry_type: 0,
                            payload: Bytes::from_static(&[1; 5000]),
                        }],
                    )
                })
                .unwrap();
            wal.wait_durable(ticket).await.unwrap();
            let disk = wal.with(|w| w.disk().clone());
            let plan = wal.with(|w| w.read_plan(1, 1, 2, None)).unwrap();
            assert_eq!(plan.disk_reads(), 1, "5000 bytes exceed the 4096-byte cache");
            let entries = plan
                .execute(&disk)
                .await
                .expect("read must not fail with EOPNOTSUPP");
            assert_eq!(entries[0].payload.len(), 5000);
            wal.close().await.unwrap();
        });
    }
}

#[test]
fn a_paced_segment_creation_writes_the_whole_file_with_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    // More than one 1 MiB chunk, and a partial one.
    let len = 3 * (1 << 20) + 8192;
    on_executor(move || async move {
        let disk = ringraft_wal::GlommioDisk::open(&path, SyncMode::Fdatasync)
            .await
            .unwrap();
        disk.pace_zero_fill(true);
        ringraft_wal::Disk::create(&disk, "paced.wal", len).await.unwrap();
        // Paced or not, the same file: turning pacing off changes only the speed.
        disk.pace_zero_fill(false);
        ringraft_wal::Disk::create(&disk, "unpaced.wal", len)
            .await
            .unwrap();
    });
    for name in ["paced.wal", "unpaced.wal"] {
        let bytes = std::fs::read(dir.path().join(name)).unwrap();
        assert_eq!(bytes.len() as u64, len, "{name}");
        assert!(bytes.iter().all(|&b| b == 0), "{name} is not all zeros");
        assert!(!dir.path().join(format!("{name}.creating")).exists());
    }
}

#[test]
fn a_failed_segment_creation_leaves_no_partial_file_and_leftovers_go_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    // What a crash in the middle of a creation leaves behind.
    let leftover = dir.path().join("00000000000000000007.wal.creating");
    std::fs::write(&leftover, [0u8; 4096]).unwrap();
    // A non-empty directory stands where the new segment must go: the fill succeeds, the
    // rename into place fails.
    std::fs::create_dir(dir.path().join("blocked.wal")).unwrap();
    std::fs::write(dir.path().join("blocked.wal").join("x"), b"x").unwrap();
    let error = on_executor(move || async move {
        let disk = ringraft_wal::GlommioDisk::open(&path, SyncMode::Fdatasync)
            .await
            .unwrap();
        ringraft_wal::Disk::create(&disk, "blocked.wal", 1 << 20)
            .await
            .unwrap_err()
            .to_string()
    });
    assert!(!leftover.exists(), "a crash's leftover is deleted at open");
    assert!(
        !dir.path().join("blocked.wal.creating").exists(),
        "the failed fill ({error}) keeps no space"
    );
}

#[test]
fn durable_at_is_when_the_write_covering_an_append_completed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    on_executor(move || async move {
        let wal = GlommioWal::open(&path, SyncMode::Dsync, config())
            .await
            .expect("open");
        let mut previous = wal.durable_at();
        for index in 1..=3 {
            let before = std::time::Instant::now();
            let ticket = wal
                .with(|w| {
                    w.append(
                        0,
                        &[Entry {
                            index,
                            term: 1,
                            entry_type: 0,
                            payload: payload(0, index),
                        }],
                    )
                })
                .unwrap();
            wal.wait_durable(ticket).await.unwrap();
            let at = wal.durable_at().expect("a write completed");
            // The write that covered this append completed after the append was made, and
            // each append here needed a write of its own.
            assert!(at >= before, "durable at {at:?}, appended at {before:?}");
            assert!(previous.is_none_or(|p| at > p));
            previous = Some(at);
        }
        wal.close().await.unwrap();
    });
}
