//! The real backend: segment files opened with O_DIRECT through glommio's io_uring rings, and a
//! small runner ([`GlommioWal`]) that performs the WAL's jobs on the current executor. This is
//! the only module of the crate that knows about glommio.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

use crate::disk::Disk;
use crate::error::WalError;
use crate::wal::{perform, IoDone, IoJob, Ticket, Wal, WalConfig};

/// How a write is made durable. Both are correct; `ringraft-bench wal` measures which is faster
/// on a given device, and the default follows the measurement recorded in BENCHMARKS.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncMode {
    /// Segment files are opened with O_DSYNC: each write returns only once durable, with no
    /// separate sync call (one io_uring operation per batch).
    Dsync,
    /// Plain O_DIRECT writes followed by fdatasync (two operations per batch).
    Fdatasync,
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(text: &str) -> Result<SyncMode, String> {
        match text {
            "dsync" => Ok(SyncMode::Dsync),
            "fdatasync" => Ok(SyncMode::Fdatasync),
            other => Err(format!(
                "unknown sync mode {other:?}: expected dsync or fdatasync"
            )),
        }
    }
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncMode::Dsync => "dsync",
            SyncMode::Fdatasync => "fdatasync",
        })
    }
}

/// Name of the small file opened first on every executor; see [`GlommioDisk::open`].
pub const IOPOLL_GUARD_FILE: &str = ".iopoll-guard";
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;
/// What a segment file's name is followed by while it is being created (`docs/wal-format.md`,
/// "Files").
const CREATING_SUFFIX: &str = ".creating";

/// While paced (see [`GlommioDisk::pace_zero_fill`]), creating a segment waits this many times
/// as long as each chunk's write took before writing the next: the fill takes at most about
/// one part in five of the device. Unpaced, three nodes on one virtio disk each zero-filling a
/// 64 MiB segment (~65-120 ms of back-to-back 1 MiB writes) raised the open-loop benchmark's
/// p99 from ~3 ms to 18-30 ms in every second holding a fill; paced, those seconds stayed at
/// 3-5 ms.
const ZERO_FILL_PACE: u32 = 4;

/// A WAL directory on a real file system, used from one glommio executor.
#[derive(Clone, Debug)]
pub struct GlommioDisk {
    dir: Rc<PathBuf>,
    sync_mode: SyncMode,
    /// Whether segment creation paces its zero-fill (shared by clones).
    paced: Rc<Cell<bool>>,
}

fn dma_error(error: glommio::GlommioError<()>) -> io::Error {
    match error {
        // glommio's own conversion rebuilds these with the path in the message, which loses the
        // errno the WAL decides by (ENOSPC is waited out, see `Wal::io_done`). The WAL's error
        // names the operation and the file itself.
        glommio::GlommioError::EnhancedIoError { source, .. } if source.raw_os_error().is_some() => source,
        other => io::Error::from(other),
    }
}

impl GlommioDisk {
    /// Opens (creating if needed) a WAL directory for use on the current executor.
    ///
    /// glommio 0.9 decides once per device and thread whether the device supports polled IO, by
    /// reading the first block of the first `DmaFile` opened there. If that file is empty or
    /// write-only the probe wrongly succeeds and every later read fails with EOPNOTSUPP (upstream
    /// issues 605 and 670). So before any segment is opened, this opens a non-empty guard file
    /// read-write, which makes the probe read real data.
    pub async fn open(dir: impl AsRef<Path>, sync_mode: SyncMode) -> Result<GlommioDisk, WalError> {
        let shown = dir.as_ref().display().to_string();
        std::fs::create_dir_all(dir.as_ref())
            .map_err(|e| WalError::io("create directory", shown.clone(), e))?;
        // Absolute: glommio 0.9 opens a relative directory path against fd -1 (EBADF), so a
        // relative data_dir would fail every directory sync.
        let dir = std::fs::canonicalize(dir.as_ref())
            .map_err(|e| WalError::io("resolve directory", shown.clone(), e))?;
        // A segment whose creation a crash interrupted: never renamed into place, so nothing
        // refers to it; delete it rather than let it hold its share of the disk.
        let entries = std::fs::read_dir(&dir).map_err(|e| WalError::io("list", shown.clone(), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let leftover = name
                .to_string_lossy()
                .strip_suffix(CREATING_SUFFIX)
                .is_some_and(|segment| segment.ends_with(".wal"));
            if leftover {
                std::fs::remove_file(entry.path())
                    .map_err(|e| WalError::io("remove", name.to_string_lossy().into_owned(), e))?;
            }
        }
        let guard = dir.join(IOPOLL_GUARD_FILE);
        let guard_ok = std::fs::metadata(&guard).is_ok_and(|m| m.len() >= 4096);
        if !guard_ok {
            let file =
                std::fs::File::create(&guard).map_err(|e| WalError::io("create", IOPOLL_GUARD_FILE, e))?;
            file.write_all_at(&[0x5a; 4096], 0)
                .and_then(|()| file.sync_all())
                .map_err(|e| WalError::io("write", IOPOLL_GUARD_FILE, e))?;
        }
        let probe = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&guard)
            .await
            .map_err(|e| WalError::io("open", IOPOLL_GUARD_FILE, dma_error(e)))?;
        probe
            .read_at(0, 4096)
            .await
            .map_err(|e| WalError::io("read", IOPOLL_GUARD_FILE, dma_error(e)))?;
        let _ = probe.close().await;
        Ok(GlommioDisk {
            dir: Rc::new(dir),
            sync_mode,
            paced: Rc::new(Cell::new(false)),
        })
    }

    /// Creates `name` by filling `temporary` with zeros and renaming it.
    async fn create_through(&self, temporary: &str, name: &str, len: u64) -> io::Result<Rc<DmaFile>> {
        // Written in full with zeros (not fallocated): writes into unwritten extents sync ~3x
        // slower, and the WAL must never grow a file on its sync path.
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(true);
        let file = options
            .dma_open(self.dir.join(temporary))
            .await
            .map_err(dma_error)?;
        // One zeroed chunk, written again and again (zeroing a fresh 1 MiB buffer per chunk
        // was ~3% of a follower's CPU while segments were being created).
        let zeros = Rc::new(self.alloc_buffer(ZERO_FILL_CHUNK_BYTES.min(len as usize)));
        let mut at = 0u64;
        while at < len {
            let chunk = ZERO_FILL_CHUNK_BYTES.min((len - at) as usize);
            let buffer = if chunk == zeros.len() {
                zeros.clone()
            } else {
                Rc::new(self.alloc_buffer(chunk))
            };
            let began = std::time::Instant::now();
            let written = file.write_rc_at(buffer, at).await.map_err(dma_error)?;
            if written != chunk {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short write while zero-filling",
                ));
            }
            at += chunk as u64;
            if self.paced.get() && at < len {
                glommio::timer::sleep(began.elapsed() * ZERO_FILL_PACE).await;
            }
        }
        file.fdatasync().await.map_err(dma_error)?;
        let _ = file.close().await;
        glommio::io::rename(self.dir.join(temporary), self.dir.join(name))
            .await
            .map_err(dma_error)?;
        self.sync_dir().await?;
        Ok(self.open(name).await?.0)
    }

    /// [`perform`] after the job's delay: a retried segment preparation waits out its backoff
    /// here (the WAL has no clock). Every runner on glommio hands its jobs to this.
    pub async fn perform_after_delay(&self, job: IoJob<GlommioDisk>) -> IoDone<GlommioDisk> {
        if let IoJob::Prepare(prepare) = &job {
            if !prepare.delay.is_zero() {
                glommio::timer::sleep(prepare.delay).await;
            }
        }
        perform(self, job).await
    }

    /// Whether creating a segment paces its zero-fill from now on (off at first: opening a log
    /// creates its first segments at full speed). The log's runner turns it on while no
    /// segment is needed soon ([`crate::Wal::segment_needed_soon`]) and off when one is, so a
    /// fill in progress speeds up when the log is about to wait for it.
    pub fn pace_zero_fill(&self, paced: bool) {
        self.paced.set(paced);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn sync_mode(&self) -> SyncMode {
        self.sync_mode
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let dir = glommio::io::Directory::open(&*self.dir)
            .await
            .map_err(dma_error)?;
        dir.sync().await.map_err(dma_error)?;
        let _ = dir.close().await;
        Ok(())
    }

    async fn open_file(&self, name: &str, sync_mode: Option<SyncMode>) -> io::Result<DmaFile> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if sync_mode == Some(SyncMode::Dsync) {
            options.custom_flags(libc::O_DSYNC);
        }
        options.dma_open(self.dir.join(name)).await.map_err(dma_error)
    }
}

impl Disk for GlommioDisk {
    type File = Rc<DmaFile>;
    type Buffer = DmaBuffer;
    type ReadBuf = ReadResult;

    fn alloc_buffer(&self, len: usize) -> DmaBuffer {
        let mut buffer = glommio::allocate_dma_buffer(len);
        buffer.as_bytes_mut().fill(0);
        buffer
    }

    fn alloc_buffer_uninit(&self, len: usize) -> DmaBuffer {
        glommio::allocate_dma_buffer(len)
    }

    fn truncate_buffer(&self, buffer: &mut DmaBuffer, len: usize) {
        buffer.trim_to_size(len);
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&*self.dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    async fn open(&self, name: &str) -> io::Result<(Rc<DmaFile>, u64)> {
        let file = self.open_file(name, Some(self.sync_mode)).await?;
        let size = file.file_size().await.map_err(dma_error)?;
        Ok((Rc::new(file), size))
    }

    async fn create(&self, name: &str, len: u64) -> io::Result<Rc<DmaFile>> {
        let temporary = format!("{name}{CREATING_SUFFIX}");
        match self.create_through(&temporary, name, len).await {
            Ok(file) => Ok(file),
            Err(error) => {
                // A fill that failed (a full disk, most often) must not keep the space it took:
                // the WAL retries, and the retry starts over.
                let _ = glommio::io::remove(self.dir.join(&temporary)).await;
                Err(error)
            }
        }
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        glommio::io::rename(self.dir.join(from), self.dir.join(to))
            .await
            .map_err(dma_error)?;
        self.sync_dir().await
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        glommio::io::remove(self.dir.join(name))
            .await
            .map_err(dma_error)?;
        self.sync_dir().await
    }

    async fn read_at(&self, file: &Rc<DmaFile>, offset: u64, len: usize) -> io::Result<ReadResult> {
        file.read_at(offset, len).await.map_err(dma_error)
    }

    async fn write_at(&self, file: &Rc<DmaFile>, offset: u64, buffer: DmaBuffer) -> io::Result<()> {
        let len = buffer.len();
        let written = file.write_at(buffer, offset).await.map_err(dma_error)?;
        if written != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {len} bytes at {offset}"),
            ));
        }
        Ok(())
    }

    async fn sync(&self, file: &Rc<DmaFile>) -> io::Result<()> {
        match self.sync_mode {
            // The write itself was durable (O_DSYNC).
            SyncMode::Dsync => Ok(()),
            SyncMode::Fdatasync => file.fdatasync().await.map_err(dma_error),
        }
    }
}

/// A WAL driven on the current glommio executor: appends are made through [`GlommioWal::with`],
/// a background task performs the IO (one write in flight, the next batch accumulating), and
/// [`GlommioWal::wait_durable`] resolves once a sync covers a ticket.
pub struct GlommioWal {
    wal: RefCell<Wal<GlommioDisk>>,
    disk: GlommioDisk,
    io_waker: Cell<Option<Waker>>,
    kicked: Cell<bool>,
    durable_waiters: RefCell<Vec<Waker>>,
    /// When the IO task saw the last write complete: one clock read per write, for callers
    /// that time appends without reading the clock each ([`GlommioWal::durable_at`]).
    durable_at: Cell<Option<Instant>>,
    closing: Cell<bool>,
    closed: Cell<bool>,
}

impl std::fmt::Debug for GlommioWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlommioWal")
            .field("wal", &self.wal)
            .field("disk", &self.disk)
            .finish()
    }
}

impl GlommioWal {
    /// Opens (recovering) the WAL in `dir` and starts its IO task on the current executor.
    pub async fn open(
        dir: impl AsRef<Path>,
        sync_mode: SyncMode,
        config: WalConfig,
    ) -> Result<Rc<GlommioWal>, WalError> {
        let disk = GlommioDisk::open(dir, sync_mode).await?;
        let wal = Wal::open(disk.clone(), config).await?;
        let this = Rc::new(GlommioWal {
            wal: RefCell::new(wal),
            disk,
            io_waker: Cell::new(None),
            kicked: Cell::new(true),
            durable_waiters: RefCell::new(Vec::new()),
            durable_at: Cell::new(None),
            closing: Cell::new(false),
            closed: Cell::new(false),
        });
        glommio::spawn_local(this.clone().io_task()).detach();
        Ok(this)
    }

    /// Runs `f` on the WAL (to append, compact, read...) and wakes the IO task.
    pub fn with<R>(&self, f: impl FnOnce(&mut Wal<GlommioDisk>) -> R) -> R {
        let result = f(&mut self.wal.borrow_mut());
        self.kick();
        result
    }

    fn kick(&self) {
        self.kicked.set(true);
        if let Some(waker) = self.io_waker.take() {
            waker.wake();
        }
    }

    /// Resolves once `ticket` is durable, or with the WAL's failure.
    pub async fn wait_durable(&self, ticket: Ticket) -> Result<(), WalError> {
        WaitDurable { wal: self, ticket }.await
    }

    /// When the last write completed, as the IO task saw it; `None` before the first. An
    /// appender woken by [`GlommioWal::wait_durable`] takes this as the moment its append
    /// became durable: the appenders of one write share one clock reading (64 closed-loop
    /// appenders reading the clock twice each took ~6% of the thread, on the path between one
    /// write's completion and the next one's submission).
    pub fn durable_at(&self) -> Option<Instant> {
        self.durable_at.get()
    }

    /// Waits until everything appended is durable, then stops the IO task.
    pub async fn close(&self) -> Result<(), WalError> {
        let last = self.wal.borrow().last_ticket();
        let result = self.wait_durable(last).await;
        self.closing.set(true);
        self.kick();
        result
    }

    async fn io_task(self: Rc<Self>) {
        // Appenders whose batch became durable, not woken yet: glommio hands queued IO to the
        // kernel once per scheduler pass, after every runnable task has run. Waking them before
        // the next write is queued would let their copying (and checksumming) delay that write;
        // so when a write follows at once, they are woken only after it has been submitted.
        let mut deferred: Vec<Waker> = Vec::new();
        loop {
            // Let every task that is ready to append run first, so the batch sealed next is as
            // full as it will get without waiting on a timer. Unless a batch should go now: a
            // full one waits, or appenders of the last batch are about to be woken.
            if deferred.is_empty() && !self.wal.borrow().has_sealed() {
                YieldNow(false).await;
            }
            let job = self.wal.borrow_mut().poll_io();
            match job {
                Some(IoJob::Write(write)) => {
                    let mut write = std::pin::pin!(perform(&self.disk, IoJob::Write(write)));
                    let mut done = None;
                    if !deferred.is_empty() {
                        // Queue the write, let the scheduler pass end (that submits it), then
                        // wake the appenders: their next appends overlap this write.
                        std::future::poll_fn(|context| {
                            if let Poll::Ready(result) = write.as_mut().poll(context) {
                                done = Some(result);
                            }
                            Poll::Ready(())
                        })
                        .await;
                        if done.is_none() {
                            glommio::timer::sleep(std::time::Duration::from_micros(1)).await;
                        }
                        for waker in deferred.drain(..) {
                            waker.wake();
                        }
                    }
                    let done = match done {
                        Some(done) => done,
                        None => write.await,
                    };
                    self.durable_at.set(Some(Instant::now()));
                    // A failure is recorded in the WAL; waiters see it through `failure()`.
                    let _ = self.wal.borrow_mut().io_done(done);
                    deferred.append(&mut self.durable_waiters.borrow_mut());
                }
                Some(job) => {
                    let this = self.clone();
                    glommio::spawn_local(async move {
                        let done = this.disk.perform_after_delay(job).await;
                        // Failing to delete a spare segment costs space, not data; a failed
                        // prepare is retried (see `Wal::prepare_error`).
                        let _ = this.wal.borrow_mut().io_done(done);
                        for waker in this.durable_waiters.borrow_mut().drain(..) {
                            waker.wake();
                        }
                        this.kick();
                    })
                    .detach();
                }
                None => {
                    for waker in deferred.drain(..) {
                        waker.wake();
                    }
                    if self.closing.get() && !self.wal.borrow().has_pending() {
                        self.closed.set(true);
                        return;
                    }
                    if self.wal.borrow().failure().is_some() {
                        for waker in self.durable_waiters.borrow_mut().drain(..) {
                            waker.wake();
                        }
                    }
                    Kicked(&self).await;
                }
            }
        }
    }
}

struct Kicked<'a>(&'a GlommioWal);

impl Future for Kicked<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.0.kicked.replace(false) {
            Poll::Ready(())
        } else {
            self.0.io_waker.set(Some(context.waker().clone()));
            Poll::Pending
        }
    }
}

struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        context.waker().wake_by_ref();
        Poll::Pending
    }
}

struct WaitDurable<'a> {
    wal: &'a GlommioWal,
    ticket: Ticket,
}

impl Future for WaitDurable<'_> {
    type Output = Result<(), WalError>;
    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let wal = self.wal.wal.borrow();
        if wal.durable_ticket() >= self.ticket {
            return Poll::Ready(Ok(()));
        }
        if let Some(cause) = wal.failure() {
            return Poll::Ready(Err(WalError::Failed {
                op: "wait_durable",
                cause: cause.to_string(),
            }));
        }
        if self.wal.closed.get() {
            panic!("wait_durable on a closed WAL for a ticket it never wrote");
        }
        self.wal
            .durable_waiters
            .borrow_mut()
            .push(context.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glommio_errors_keep_their_errno() {
        // The WAL waits out ENOSPC while preparing a segment and fails on anything else, by
        // errno: glommio's own conversion would drop it.
        let error = glommio::GlommioError::<()>::EnhancedIoError {
            source: io::Error::from_raw_os_error(libc::ENOSPC),
            op: "Writing",
            path: Some("/x/00000000000000000003.wal.creating".into()),
            fd: Some(18),
        };
        assert_eq!(
            io::Error::from(error).raw_os_error(),
            None,
            "glommio's conversion"
        );
        let error = glommio::GlommioError::<()>::EnhancedIoError {
            source: io::Error::from_raw_os_error(libc::ENOSPC),
            op: "Writing",
            path: None,
            fd: None,
        };
        assert_eq!(dma_error(error).raw_os_error(), Some(libc::ENOSPC));
    }
}
