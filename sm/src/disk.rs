//! The IO seam under the key-value store: named files in one directory, block-aligned writes.
//! [`GlommioSmDisk`] uses O_DIRECT through glommio; [`MemSmDisk`] keeps files in memory, loses
//! unsynced writes at [`MemSmDisk::crash`], and lets tests flip bits.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions};

/// Block size: offsets and lengths of writes are multiples of it.
pub const SM_BLOCK_BYTES: usize = 4096;

/// Contract: `write_at` creates the file if needed and is durable only after `sync` of that
/// file; `rename` and `remove` are durable when they return; reads see all completed writes.
#[allow(async_fn_in_trait)] // single-threaded executors: no Send bound is wanted
pub trait SmDisk: Clone + 'static {
    type Buffer: AsRef<[u8]> + AsMut<[u8]>;
    /// A zeroed buffer of `len` bytes (a multiple of the block size).
    fn alloc_buffer(&self, len: usize) -> Self::Buffer;
    async fn list(&self) -> io::Result<Vec<String>>;
    async fn len(&self, name: &str) -> io::Result<u64>;
    /// Up to `len` bytes at `offset` (fewer at the end of the file).
    async fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    async fn write_at(&self, name: &str, offset: u64, buffer: Self::Buffer) -> io::Result<()>;
    async fn sync(&self, name: &str) -> io::Result<()>;
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    async fn remove(&self, name: &str) -> io::Result<()>;
}

#[derive(Debug, Default)]
struct MemFile {
    durable: Vec<u8>,
    current: Vec<u8>,
}

/// In-memory files; see the module docs. Clones share the directory.
#[derive(Clone, Debug, Default)]
pub struct MemSmDisk {
    files: Rc<RefCell<BTreeMap<String, MemFile>>>,
    /// Writes to these files fail with the errno, once each (see [`MemSmDisk::fail_next_write`]).
    write_faults: Rc<RefCell<Vec<(String, i32)>>>,
    /// See [`MemSmDisk::set_full`].
    full: Rc<std::cell::Cell<bool>>,
}

impl MemSmDisk {
    pub fn new() -> MemSmDisk {
        MemSmDisk::default()
    }

    /// The next `write_at` to `name` fails with `errno`, writing nothing.
    pub fn fail_next_write(&self, name: &str, errno: i32) {
        self.write_faults.borrow_mut().push((name.to_string(), errno));
    }

    /// While full, a write that would make a file longer (or create one) fails with ENOSPC,
    /// writing nothing; writes within a file's length succeed, as on a real file system whose
    /// blocks are allocated.
    pub fn set_full(&self, full: bool) {
        self.full.set(full);
    }

    pub fn is_full(&self) -> bool {
        self.full.get()
    }

    /// Drops the faults [`MemSmDisk::fail_next_write`] set that no write has met yet.
    pub fn clear_write_faults(&self) {
        self.write_faults.borrow_mut().clear();
    }

    /// Power loss: every file returns to its last synced contents.
    pub fn crash(&self) {
        for file in self.files.borrow_mut().values_mut() {
            file.current.clone_from(&file.durable);
        }
    }

    pub fn flip_bit(&self, name: &str, offset: usize, bit: u8) {
        let mut files = self.files.borrow_mut();
        let file = files
            .get_mut(name)
            .unwrap_or_else(|| panic!("flip_bit: no file {name}"));
        file.current[offset] ^= 1 << bit;
        file.durable[offset] ^= 1 << bit;
    }

    pub fn names(&self) -> Vec<String> {
        self.files.borrow().keys().cloned().collect()
    }

    fn missing(name: &str) -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, format!("no file {name}"))
    }
}

impl SmDisk for MemSmDisk {
    type Buffer = Vec<u8>;

    fn alloc_buffer(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.names())
    }

    async fn len(&self, name: &str) -> io::Result<u64> {
        let files = self.files.borrow();
        Ok(files.get(name).ok_or_else(|| Self::missing(name))?.current.len() as u64)
    }

    async fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let files = self.files.borrow();
        let file = &files.get(name).ok_or_else(|| Self::missing(name))?.current;
        let start = (offset as usize).min(file.len());
        Ok(file[start..(start + len).min(file.len())].to_vec())
    }

    async fn write_at(&self, name: &str, offset: u64, buffer: Vec<u8>) -> io::Result<()> {
        assert!(
            offset as usize % SM_BLOCK_BYTES == 0 && buffer.len() % SM_BLOCK_BYTES == 0,
            "unaligned write"
        );
        let fault = {
            let mut faults = self.write_faults.borrow_mut();
            let at = faults.iter().position(|(file, _)| file == name);
            at.map(|at| faults.remove(at).1)
        };
        if let Some(errno) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let mut files = self.files.borrow_mut();
        let end = offset as usize + buffer.len();
        if self.full.get() && files.get(name).is_none_or(|f| f.current.len() < end) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let file = files.entry(name.to_string()).or_default();
        if file.current.len() < end {
            file.current.resize(end, 0);
        }
        file.current[offset as usize..end].copy_from_slice(&buffer);
        Ok(())
    }

    async fn sync(&self, name: &str) -> io::Result<()> {
        let mut files = self.files.borrow_mut();
        let file = files.get_mut(name).ok_or_else(|| Self::missing(name))?;
        file.durable.clone_from(&file.current);
        Ok(())
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut files = self.files.borrow_mut();
        let file = files.remove(from).ok_or_else(|| Self::missing(from))?;
        files.insert(to.to_string(), file);
        Ok(())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.files
            .borrow_mut()
            .remove(name)
            .map(drop)
            .ok_or_else(|| Self::missing(name))
    }
}

/// Files in a directory, opened with O_DIRECT through glommio on the current executor.
#[derive(Clone, Debug)]
pub struct GlommioSmDisk {
    dir: Rc<PathBuf>,
    open: Rc<RefCell<HashMap<String, Rc<DmaFile>>>>,
}

fn to_io(error: glommio::GlommioError<()>) -> io::Error {
    match error {
        // glommio's own conversion rebuilds these with the path in the message and drops the
        // errno, by which a full disk is told apart (`SmError::is_out_of_space`).
        glommio::GlommioError::EnhancedIoError { source, .. } if source.raw_os_error().is_some() => source,
        other => io::Error::from(other),
    }
}

/// Non-empty file opened first on each executor; see [`GlommioSmDisk::open`].
pub const SM_IOPOLL_GUARD_FILE: &str = ".iopoll-guard";

impl GlommioSmDisk {
    /// Opens (creating) the directory. glommio 0.9 probes polled-IO support on the first
    /// `DmaFile` of a device per thread, wrongly succeeding on an empty file (later reads then
    /// fail with EOPNOTSUPP); opening a non-empty guard file first makes the probe sound. The WAL
    /// does the same (`ringraft_wal::GlommioDisk::open`).
    pub async fn open(dir: impl AsRef<Path>) -> io::Result<GlommioSmDisk> {
        std::fs::create_dir_all(dir.as_ref())?;
        // Absolute: glommio 0.9 opens a relative directory path against fd -1 (EBADF), which
        // broke the directory sync of checkpoints under a relative data_dir.
        let dir = std::fs::canonicalize(dir.as_ref())?;
        let guard = dir.join(SM_IOPOLL_GUARD_FILE);
        if std::fs::metadata(&guard).map_or(true, |m| m.len() < SM_BLOCK_BYTES as u64) {
            let file = std::fs::File::create(&guard)?;
            file.write_all_at(&[0x5a; SM_BLOCK_BYTES], 0)?;
            file.sync_all()?;
        }
        let probe = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&guard)
            .await
            .map_err(to_io)?;
        probe.read_at(0, SM_BLOCK_BYTES).await.map_err(to_io)?;
        let _ = probe.close().await;
        Ok(GlommioSmDisk {
            dir: Rc::new(dir),
            open: Rc::new(RefCell::new(HashMap::new())),
        })
    }

    async fn file(&self, name: &str, create: bool) -> io::Result<Rc<DmaFile>> {
        if let Some(file) = self.open.borrow().get(name) {
            return Ok(file.clone());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .dma_open(self.dir.join(name))
            .await
            .map_err(to_io)?;
        let file = Rc::new(file);
        self.open.borrow_mut().insert(name.to_string(), file.clone());
        Ok(file)
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let dir = glommio::io::Directory::open(&*self.dir).await.map_err(to_io)?;
        dir.sync().await.map_err(to_io)?;
        let _ = dir.close().await;
        Ok(())
    }
}

impl SmDisk for GlommioSmDisk {
    type Buffer = DmaBuffer;

    fn alloc_buffer(&self, len: usize) -> DmaBuffer {
        let mut buffer = glommio::allocate_dma_buffer(len);
        buffer.as_bytes_mut().fill(0);
        buffer
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

    async fn len(&self, name: &str) -> io::Result<u64> {
        self.file(name, false).await?.file_size().await.map_err(to_io)
    }

    async fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let file = self.file(name, false).await?;
        Ok(file.read_at(offset, len).await.map_err(to_io)?.to_vec())
    }

    async fn write_at(&self, name: &str, offset: u64, buffer: DmaBuffer) -> io::Result<()> {
        let file = self.file(name, true).await?;
        let len = buffer.len();
        let written = file.write_at(buffer, offset).await.map_err(to_io)?;
        if written != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {len}"),
            ));
        }
        Ok(())
    }

    async fn sync(&self, name: &str) -> io::Result<()> {
        self.file(name, false).await?.fdatasync().await.map_err(to_io)
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.open.borrow_mut().remove(from);
        self.open.borrow_mut().remove(to);
        glommio::io::rename(self.dir.join(from), self.dir.join(to))
            .await
            .map_err(to_io)?;
        self.sync_dir().await
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.open.borrow_mut().remove(name);
        glommio::io::remove(self.dir.join(name)).await.map_err(to_io)?;
        self.sync_dir().await
    }
}
