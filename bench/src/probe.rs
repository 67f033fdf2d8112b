//! The raw device probe: what the disk itself can do, measured with io_uring directly (no
//! glommio, no WAL). Every ringraft figure is reported as a ratio to these.
//!
//! Durable rounds: one O_DIRECT write of a fixed size into an already-written file, made durable
//! at queue depth 1, by both means the WAL has: the write linked to an fdatasync, and the write
//! alone to an O_DSYNC descriptor. Each size reports the faster of the two (named in
//! `durable_method_*`): the device's best, which is what a WAL round costs at minimum.
//! Sequential bandwidth: 1 MiB O_DIRECT writes, four in flight, over the whole file, then one
//! fdatasync.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use io_uring::{opcode, squeue, types, IoUring};
use serde::Serialize;

/// Results of the probe. Keys are part of the JSON output (docs/bench-output.md).
#[derive(Clone, Debug, Serialize)]
pub struct DiskProbe {
    pub write_4k_rounds_per_s: f64,
    pub write_4k_latency_us_p50: f64,
    pub write_4k_latency_us_p99: f64,
    pub write_64k_rounds_per_s: f64,
    pub write_64k_latency_us_p50: f64,
    pub write_64k_latency_us_p99: f64,
    pub write_64k_mb_per_s: f64,
    pub write_1m_rounds_per_s: f64,
    pub write_1m_latency_us_p50: f64,
    pub write_1m_latency_us_p99: f64,
    pub write_1m_mb_per_s: f64,
    /// How the rounds above were made durable: "dsync" or "fdatasync" (the faster, per size).
    pub durable_method_4k: &'static str,
    pub durable_method_64k: &'static str,
    pub durable_method_1m: &'static str,
    pub sequential_mb_per_s: f64,
    pub file_bytes: u64,
    pub seconds_per_test: f64,
}

const ALIGN: usize = 4096;

/// A zeroed, 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuffer {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuffer {
    fn new(len: usize) -> AlignedBuffer {
        let layout = Layout::from_size_align(len, ALIGN).expect("layout");
        // SAFETY: the layout has a non-zero size (len > 0 at every call site).
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating {len} bytes");
        AlignedBuffer { ptr, layout }
    }

    fn fill(&mut self, byte: u8) {
        // SAFETY: ptr is valid for layout.size() bytes and uniquely owned.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.layout.size()) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn percentile_us(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// Runs the probe in `dir` (a file of `file_bytes` is written first and removed after).
pub fn run(dir: &Path, file_bytes: u64, seconds_per_test: f64) -> io::Result<DiskProbe> {
    assert!(
        file_bytes >= (4 << 20) && file_bytes % (1 << 20) == 0,
        "probe file must be whole MiB, >= 4"
    );
    std::fs::create_dir_all(dir)?;
    let path = dir.join("ringraft-probe.dat");
    // Pre-write the whole file (so the probe overwrites written blocks, as the WAL does).
    {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        let chunk = vec![0x33u8; 1 << 20];
        for at in (0..file_bytes).step_by(chunk.len()) {
            file.write_all_at(&chunk, at)?;
        }
        file.sync_all()?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)?;
    let dsync_file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(&path)?;
    let fd = types::Fd(file.as_raw_fd());
    let dsync_fd = types::Fd(dsync_file.as_raw_fd());
    let mut ring = IoUring::new(16)?;
    let budget = Duration::from_secs_f64(seconds_per_test);

    // `dsync`: one write to the O_DSYNC descriptor; otherwise a write linked to an fdatasync.
    let mut durable_rounds = |size: usize, dsync: bool| -> io::Result<(f64, Histogram<u64>)> {
        let mut buffer = AlignedBuffer::new(size);
        buffer.fill(0x5a);
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
        let slots = file_bytes / size as u64;
        let start = Instant::now();
        let mut rounds = 0u64;
        while start.elapsed() < budget {
            let offset = (rounds % slots) * size as u64;
            let write = opcode::Write::new(if dsync { dsync_fd } else { fd }, buffer.ptr, size as u32)
                .offset(offset)
                .build()
                .user_data(1);
            let sync = opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(2);
            let began = Instant::now();
            // SAFETY: the buffer outlives the operations: we wait for every completion below.
            unsafe {
                let mut queue = ring.submission();
                if dsync {
                    queue.push(&write).map_err(io::Error::other)?;
                } else {
                    queue
                        .push(&write.flags(squeue::Flags::IO_LINK))
                        .map_err(io::Error::other)?;
                    queue.push(&sync).map_err(io::Error::other)?;
                }
            }
            ring.submit_and_wait(if dsync { 1 } else { 2 })?;
            for completion in ring.completion() {
                let expect = if completion.user_data() == 1 {
                    size as i32
                } else {
                    0
                };
                if completion.result() != expect {
                    return Err(if completion.result() < 0 {
                        io::Error::from_raw_os_error(-completion.result())
                    } else {
                        io::Error::new(io::ErrorKind::WriteZero, "short write in probe")
                    });
                }
            }
            histogram
                .record(began.elapsed().as_nanos() as u64)
                .expect("record");
            rounds += 1;
        }
        Ok((rounds as f64 / start.elapsed().as_secs_f64(), histogram))
    };
    let mut best_rounds = |size: usize| -> io::Result<(f64, Histogram<u64>, &'static str)> {
        let (fdatasync_rate, fdatasync) = durable_rounds(size, false)?;
        let (dsync_rate, dsync) = durable_rounds(size, true)?;
        Ok(if dsync_rate >= fdatasync_rate {
            (dsync_rate, dsync, "dsync")
        } else {
            (fdatasync_rate, fdatasync, "fdatasync")
        })
    };
    let (r4k, h4k, m4k) = best_rounds(4096)?;
    let (r64k, h64k, m64k) = best_rounds(64 << 10)?;
    let (r1m, h1m, m1m) = best_rounds(1 << 20)?;
    drop(dsync_file);

    // Sequential: four 1 MiB writes in flight across the file, one fdatasync at the end.
    let chunk = 1usize << 20;
    let depth = 4;
    let buffers: Vec<AlignedBuffer> = (0..depth).map(|_| AlignedBuffer::new(chunk)).collect();
    let chunks = file_bytes / chunk as u64;
    let start = Instant::now();
    let mut issued = 0u64;
    let mut completed = 0u64;
    while completed < chunks {
        while issued < chunks && issued - completed < depth as u64 {
            let buffer = &buffers[(issued % depth as u64) as usize];
            let write = opcode::Write::new(fd, buffer.ptr, chunk as u32)
                .offset(issued * chunk as u64)
                .build()
                .user_data(issued);
            // SAFETY: each buffer is reused only after its previous write completed (at most
            // `depth` in flight, round-robin), and all complete before the buffers drop.
            unsafe { ring.submission().push(&write).map_err(io::Error::other)? };
            issued += 1;
        }
        ring.submit_and_wait(1)?;
        for completion in ring.completion() {
            if completion.result() != chunk as i32 {
                return Err(io::Error::other(format!(
                    "sequential write returned {}",
                    completion.result()
                )));
            }
            completed += 1;
        }
    }
    file.sync_data()?;
    let sequential_mb_per_s = file_bytes as f64 / 1e6 / start.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);

    Ok(DiskProbe {
        write_4k_rounds_per_s: r4k,
        write_4k_latency_us_p50: percentile_us(&h4k, 0.5),
        write_4k_latency_us_p99: percentile_us(&h4k, 0.99),
        write_64k_rounds_per_s: r64k,
        write_64k_latency_us_p50: percentile_us(&h64k, 0.5),
        write_64k_latency_us_p99: percentile_us(&h64k, 0.99),
        write_64k_mb_per_s: r64k * (64 << 10) as f64 / 1e6,
        write_1m_rounds_per_s: r1m,
        write_1m_latency_us_p50: percentile_us(&h1m, 0.5),
        write_1m_latency_us_p99: percentile_us(&h1m, 0.99),
        write_1m_mb_per_s: r1m * (1 << 20) as f64 / 1e6,
        durable_method_4k: m4k,
        durable_method_64k: m64k,
        durable_method_1m: m1m,
        sequential_mb_per_s,
        file_bytes,
        seconds_per_test,
    })
}
