//! The IO seam under the WAL: the only operations the WAL asks of a file system. Two
//! implementations: [`crate::GlommioDisk`] (O_DIRECT through io_uring) and [`crate::MemDisk`]
//! (in memory, seeded faults, crash simulation) for tests and the deterministic simulator.

use std::future::Future;
use std::io;
use std::ops::Deref;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// A directory of segment files.
///
/// Contract for implementations:
/// - `write_at` stores the bytes; they are durable only after a later `sync` of the same file
///   returns `Ok` (an implementation may make them durable sooner, e.g. with O_DSYNC).
/// - `create` returns a file of exactly `len` bytes, all zero and durable, whose name is durable
///   in the directory: the WAL never grows a file on the write path.
/// - `rename` and `remove` are durable when they return (the directory is synced).
/// - Offsets and lengths of `write_at` are multiples of [`crate::format::BLOCK_BYTES`]; buffers
///   come from `alloc_buffer`.
///
/// Futures are not `Send`: a WAL lives on one shard's thread. The futures returned must not
/// borrow `self` beyond the call (implementations are cheap handles), so a runner can keep IO in
/// flight while it goes on using the WAL.
#[allow(async_fn_in_trait)] // single-threaded executors: no Send bound is wanted
pub trait Disk: Clone {
    /// An open segment file.
    type File: Clone + std::fmt::Debug;
    /// A buffer the disk can write from directly (for O_DIRECT: 4 KiB aligned).
    type Buffer: AsRef<[u8]> + AsMut<[u8]> + std::fmt::Debug;
    /// Bytes read back.
    type ReadBuf: Deref<Target = [u8]>;

    /// A zeroed buffer of `len` bytes (a multiple of the block size).
    fn alloc_buffer(&self, len: usize) -> Self::Buffer;
    /// A buffer of `len` bytes with unspecified contents: the caller writes every byte it
    /// uses. Batch buffers are sized for the largest batch but mostly carry a few KiB, so
    /// zeroing them whole would cost more than the write (measured: 11% of a node's CPU).
    fn alloc_buffer_uninit(&self, len: usize) -> Self::Buffer {
        self.alloc_buffer(len)
    }
    /// Shortens a buffer to its first `len` bytes (still a block multiple) before a write.
    fn truncate_buffer(&self, buffer: &mut Self::Buffer, len: usize);
    /// Names of all files in the directory.
    async fn list(&self) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing; returns it and its size.
    async fn open(&self, name: &str) -> io::Result<(Self::File, u64)>;
    /// Creates (or replaces) `name` as `len` zero bytes, durably.
    async fn create(&self, name: &str, len: u64) -> io::Result<Self::File>;
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    async fn remove(&self, name: &str) -> io::Result<()>;
    /// Reads `len` bytes at `offset`; fewer only at the end of the file.
    async fn read_at(&self, file: &Self::File, offset: u64, len: usize) -> io::Result<Self::ReadBuf>;
    async fn write_at(&self, file: &Self::File, offset: u64, buffer: Self::Buffer) -> io::Result<()>;
    async fn sync(&self, file: &Self::File) -> io::Result<()>;
}

/// Runs a future that must complete without waiting (every [`crate::MemDisk`] operation does).
/// Panics if it returns `Pending`: that is a bug in the caller's choice of disk.
pub fn complete_now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut context) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("complete_now: the future is waiting on real IO"),
    }
}
