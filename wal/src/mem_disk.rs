//! An in-memory [`Disk`] that lies the way real disks do, for tests and the deterministic
//! simulator: written bytes are volatile until synced; [`MemDisk::crash`] keeps, drops or garbles
//! each unsynced sector (seeded, so a failing seed replays exactly); faults can be injected for the
//! next write, sync, create, rename or open; bits can be flipped in place. Every operation completes at once, so
//! callers may drive it with [`crate::complete_now`].

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::rc::Rc;

use crate::disk::Disk;
use crate::rng::SplitMix64;

/// Sector size of the simulated device: the unit that survives or not at a crash.
pub const MEM_SECTOR_BYTES: usize = 512;

/// A fault to inject into the next matching operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemFault {
    /// The next `write_at` fails with this errno; nothing is written.
    Write(i32),
    /// The next `write_at` writes only its first `n` bytes, then fails with EIO.
    ShortWrite(usize),
    /// The next `sync` fails with this errno; the file's unsynced bytes stay unsynced.
    Sync(i32),
    /// The next `create` fails with this errno.
    Create(i32),
    /// The next `rename` fails with this errno; nothing is renamed.
    Rename(i32),
    /// The next `open` fails with this errno.
    Open(i32),
}

#[derive(Debug, Default)]
struct MemFile {
    durable: Vec<u8>,
    current: Vec<u8>,
    dirty: BTreeSet<usize>,
}

/// Handle to an open file (stays valid across renames, like a file descriptor).
#[derive(Clone, Debug)]
pub struct MemFileHandle(Rc<RefCell<MemFile>>);

#[derive(Debug)]
struct MemState {
    files: BTreeMap<String, Rc<RefCell<MemFile>>>,
    rng: SplitMix64,
    faults: VecDeque<MemFault>,
    writes: u64,
    syncs: u64,
}

/// See the module docs. Clones share the same simulated directory.
#[derive(Clone, Debug)]
pub struct MemDisk {
    state: Rc<RefCell<MemState>>,
}

impl MemDisk {
    pub fn new(seed: u64) -> MemDisk {
        MemDisk {
            state: Rc::new(RefCell::new(MemState {
                files: BTreeMap::new(),
                rng: SplitMix64::new(seed),
                faults: VecDeque::new(),
                writes: 0,
                syncs: 0,
            })),
        }
    }

    /// Queues a fault for the next operation of its kind.
    pub fn inject(&self, fault: MemFault) {
        self.state.borrow_mut().faults.push_back(fault);
    }

    fn take_fault(&self, matches: impl Fn(&MemFault) -> bool) -> Option<MemFault> {
        let mut state = self.state.borrow_mut();
        let at = state.faults.iter().position(matches)?;
        state.faults.remove(at)
    }

    /// Simulates power loss: every unsynced sector independently survives whole, is lost (the
    /// last synced contents return) or is garbled, as the seeded generator decides.
    pub fn crash(&self) {
        let mut state = self.state.borrow_mut();
        let files: Vec<_> = state.files.values().cloned().collect();
        for file in files {
            let mut file = file.borrow_mut();
            let file = &mut *file;
            let dirty = std::mem::take(&mut file.dirty);
            for sector in dirty {
                let start = sector * MEM_SECTOR_BYTES;
                let end = (start + MEM_SECTOR_BYTES).min(file.current.len());
                match state.rng.below(10) {
                    0..=4 => file.durable[start..end].copy_from_slice(&file.current[start..end]),
                    5..=8 => {}
                    _ => {
                        for byte in &mut file.durable[start..end] {
                            *byte = state.rng.next_u64() as u8;
                        }
                    }
                }
            }
            file.current.clone_from(&file.durable);
        }
    }

    /// Flips one bit of a file's contents, synced or not (media corruption).
    pub fn flip_bit(&self, name: &str, offset: usize, bit: u8) {
        let state = self.state.borrow();
        let mut file = state
            .files
            .get(name)
            .unwrap_or_else(|| panic!("flip_bit: no file {name}"))
            .borrow_mut();
        file.current[offset] ^= 1 << bit;
        file.durable[offset] ^= 1 << bit;
    }

    /// The current (not necessarily durable) contents of a file.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        self.state
            .borrow()
            .files
            .get(name)
            .map(|f| f.borrow().current.clone())
    }

    /// Creates (or replaces) a file holding `bytes`, durably (e.g. an image from a golden file).
    pub fn put_file(&self, name: &str, bytes: Vec<u8>) {
        let file = MemFile {
            current: bytes.clone(),
            durable: bytes,
            dirty: Default::default(),
        };
        self.state
            .borrow_mut()
            .files
            .insert(name.to_string(), Rc::new(RefCell::new(file)));
    }

    /// Names of all files.
    pub fn names(&self) -> Vec<String> {
        self.state.borrow().files.keys().cloned().collect()
    }

    /// Writes and syncs performed so far.
    pub fn counts(&self) -> (u64, u64) {
        let state = self.state.borrow();
        (state.writes, state.syncs)
    }

    /// Removes a file outright (a lost or deleted segment).
    pub fn delete(&self, name: &str) {
        self.state.borrow_mut().files.remove(name);
    }

    fn not_found(name: &str) -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, format!("no file {name}"))
    }
}

impl Disk for MemDisk {
    type File = MemFileHandle;
    type Buffer = Vec<u8>;
    type ReadBuf = Vec<u8>;

    fn alloc_buffer(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }

    /// Garbage, not zeroes: any byte the WAL forgets to write shows up in the golden and
    /// recovery tests.
    fn alloc_buffer_uninit(&self, len: usize) -> Vec<u8> {
        vec![0xA5; len]
    }

    fn truncate_buffer(&self, buffer: &mut Vec<u8>, len: usize) {
        buffer.truncate(len);
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.names())
    }

    async fn open(&self, name: &str) -> io::Result<(MemFileHandle, u64)> {
        if let Some(MemFault::Open(errno)) = self.take_fault(|f| matches!(f, MemFault::Open(_))) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let state = self.state.borrow();
        let file = state.files.get(name).ok_or_else(|| Self::not_found(name))?;
        let len = file.borrow().current.len() as u64;
        Ok((MemFileHandle(file.clone()), len))
    }

    async fn create(&self, name: &str, len: u64) -> io::Result<MemFileHandle> {
        if let Some(MemFault::Create(errno)) = self.take_fault(|f| matches!(f, MemFault::Create(_))) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let file = Rc::new(RefCell::new(MemFile {
            durable: vec![0; len as usize],
            current: vec![0; len as usize],
            dirty: BTreeSet::new(),
        }));
        self.state
            .borrow_mut()
            .files
            .insert(name.to_string(), file.clone());
        Ok(MemFileHandle(file))
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        if let Some(MemFault::Rename(errno)) = self.take_fault(|f| matches!(f, MemFault::Rename(_))) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let mut state = self.state.borrow_mut();
        let file = state.files.remove(from).ok_or_else(|| Self::not_found(from))?;
        state.files.insert(to.to_string(), file);
        Ok(())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.state
            .borrow_mut()
            .files
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Self::not_found(name))
    }

    async fn read_at(&self, file: &MemFileHandle, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let file = file.0.borrow();
        let start = (offset as usize).min(file.current.len());
        let end = (start + len).min(file.current.len());
        Ok(file.current[start..end].to_vec())
    }

    async fn write_at(&self, file: &MemFileHandle, offset: u64, buffer: Vec<u8>) -> io::Result<()> {
        let fault = self.take_fault(|f| matches!(f, MemFault::Write(_) | MemFault::ShortWrite(_)));
        let mut len = buffer.len();
        if let Some(MemFault::Write(errno)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if let Some(MemFault::ShortWrite(n)) = fault {
            len = n.min(len);
        }
        let offset = offset as usize;
        let mut file = file.0.borrow_mut();
        if offset + len > file.current.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write past the end of a preallocated file",
            ));
        }
        file.current[offset..offset + len].copy_from_slice(&buffer[..len]);
        for sector in offset / MEM_SECTOR_BYTES..(offset + len).div_ceil(MEM_SECTOR_BYTES) {
            file.dirty.insert(sector);
        }
        self.state.borrow_mut().writes += 1;
        if fault.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    async fn sync(&self, file: &MemFileHandle) -> io::Result<()> {
        if let Some(MemFault::Sync(errno)) = self.take_fault(|f| matches!(f, MemFault::Sync(_))) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let mut file = file.0.borrow_mut();
        let file = &mut *file;
        for sector in std::mem::take(&mut file.dirty) {
            let start = sector * MEM_SECTOR_BYTES;
            let end = (start + MEM_SECTOR_BYTES).min(file.current.len());
            file.durable[start..end].copy_from_slice(&file.current[start..end]);
        }
        self.state.borrow_mut().syncs += 1;
        Ok(())
    }
}
