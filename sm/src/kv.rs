//! `KvStore`, the built-in state machine: an in-memory hash index over log-structured data files.
//!
//! - Values up to `inline_value_bytes_max` live in the index; larger ones are appended as
//!   records to the active data file (`data-{id}.kv`) through a block-aligned tail buffer, and
//!   read back with O_DIRECT, verified against their crc, key and version, through a bounded
//!   cache. The store never serves bytes that fail verification.
//! - Apply is not durable by itself (the WAL replays it). [`KvStore::checkpoint_now`] writes out
//!   the tail, syncs every data file written since the last checkpoint, then writes the whole
//!   index and applied index to `checkpoint.tmp`, syncs it and renames it to
//!   `checkpoint-{applied}.ck` (rename and directory sync are durable).
//!   [`KvStore::checkpoint_step`] does the same a step at a time, applies going on between the
//!   steps, without copying the index (see [`CheckpointJob`]). The last `checkpoints_kept`
//!   checkpoints are kept (the next older one becomes the next `checkpoint.tmp`); recovery
//!   loads the newest valid one and reports damaged ones by name.
//! - A full disk is an operating condition, not a failure. Running out of space writing or
//!   syncing `checkpoint.tmp` abandons that checkpoint and nothing more (the next one rewrites
//!   the file whole). A tail write that runs out of space keeps the tail in memory (its values
//!   are served from there) and stalls the store's writes: nothing seals or compacts, and the
//!   next change that would append records (a batch holding file values, a restore chunk) first
//!   retries the write and, while it still fails, is refused unapplied with the out-of-space
//!   error ([`KvStore::writable`]), so the tail holds at most one change past the write buffer.
//!   Any other IO failure fails the store.
//! - Compaction rewrites the live records of the emptiest sealed file into the active one, a
//!   bounded number of bytes per step; a fully rewritten file is deleted once no kept checkpoint
//!   and no open snapshot references it.
//! - Snapshots stream the live keys as numbered, checksummed chunks (fixed ranges of index
//!   parts) that can be produced again from any number. Nothing is copied when a snapshot is
//!   taken: while it is open, the first old slot of each changed key is kept for it
//!   ([`KvSnapshot`]). Restore stages the new state beside the old; once every chunk is in,
//!   [`StateMachine::restore_prepare`] writes and syncs the staged values and the new state's
//!   whole checkpoint to `restore.tmp` (everything that needs disk space, so a full disk only
//!   delays it), and [`StateMachine::restore_finish`] switches with a rename of that file;
//!   snapshots of the old state then fail.
//!
//! Formats: `docs/kv-format.md`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::index::{Index, Key, SmallBytes, PARTS};

/// The cache map: ahash (keyed per process at random, so clients cannot pick colliding keys)
/// instead of std's SipHash, which cost 10% of a leader's CPU in the cluster benchmark. The key
/// index is an [`Index`] (split into parts, so growing it never stalls apply).
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<K> = std::collections::HashSet<K, ahash::RandomState>;
use std::rc::Rc;

use crate::command::{ArchivedBatch, ArchivedCommand, CommandResult};
use crate::disk::{SmDisk, SM_BLOCK_BYTES};
use crate::error::SmError;
use crate::machine::{ChunkStart, ReadStart, StateMachine};

/// Limits of one store. `tuning` maps the operator's `[sm]` section onto it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvConfig {
    /// Values up to this size stay in memory: no read IO for small values. Default 64.
    pub inline_value_bytes_max: usize,
    /// Read cache for values in data files. Default 64 MiB.
    pub cache_bytes_max: usize,
    /// A data file is sealed and a new one started past this size. Default 64 MiB.
    pub data_file_bytes_max: u64,
    /// The tail is written out whenever it holds this much. Default 1 MiB.
    pub write_buffer_bytes: usize,
    /// Sealed files whose live bytes are below this percentage of their size are compacted.
    /// Default 50.
    pub compaction_live_percent_max: u64,
    /// Checkpoints kept (the newest is used; older ones are fallbacks). Default 2.
    pub checkpoints_kept: usize,
    /// Target size of a snapshot chunk (whole index parts; a chunk may hold no record, or more
    /// than this when one part does). Default 1 MiB.
    pub snapshot_chunk_bytes: usize,
    /// Data file reads a snapshot chunk keeps in flight at once. Default 32.
    pub snapshot_reads_in_flight: usize,
    /// Seeds the key index's hashing, so that its order (and with it snapshot chunks and
    /// checkpoint steps) repeats from run to run: for deterministic simulation. `None` (the
    /// default): random per process, so clients cannot choose keys that collide.
    pub hash_seed: Option<u64>,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            inline_value_bytes_max: 64,
            cache_bytes_max: 64 << 20,
            data_file_bytes_max: 64 << 20,
            write_buffer_bytes: 1 << 20,
            compaction_live_percent_max: 50,
            checkpoints_kept: 2,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_reads_in_flight: 32,
            hash_seed: None,
        }
    }
}

const RECORD_HEADER_BYTES: usize = 24;
const CHECKPOINT_MAGIC: [u8; 8] = *b"RRKVCKP1";
const CHECKPOINT_HEADER_BYTES: usize = 64;
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
/// A restored state's checkpoint, written before the switch and renamed into place by it.
const RESTORE_TMP: &str = "restore.tmp";
const SNAPSHOT_MAGIC: [u8; 8] = *b"RRKVSNP1";
const SNAPSHOT_HEADER_BYTES: usize = 40;
const FORMAT_VERSION: u32 = 1;

fn data_file_name(id: u32) -> String {
    format!("data-{id:010}.kv")
}

fn parse_data_file_name(name: &str) -> Option<u32> {
    name.strip_prefix("data-")?.strip_suffix(".kv")?.parse().ok()
}

/// Whether `error` is running out of space where a checkpoint (or a restore's preparation) can
/// simply be abandoned and tried again later: writing or syncing a checkpoint file nothing
/// refers to yet, or writing the tail (which stays in memory, see `KvStore::flush_tail`).
fn abandons_checkpoint(error: &SmError) -> bool {
    if !error.is_out_of_space() {
        return false;
    }
    match error {
        SmError::Io {
            op: "write" | "sync",
            file,
            ..
        } if file == CHECKPOINT_TMP || file == RESTORE_TMP => true,
        SmError::Io {
            op: "write", file, ..
        } => parse_data_file_name(file).is_some(),
        _ => false,
    }
}

fn checkpoint_name(applied: u64) -> String {
    format!("checkpoint-{applied:020}.ck")
}

fn parse_checkpoint_name(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?
        .strip_suffix(".ck")?
        .parse()
        .ok()
}

fn record_bytes(key_len: usize, value_len: usize) -> u64 {
    ((RECORD_HEADER_BYTES + key_len + value_len).div_ceil(8) * 8) as u64
}

fn align_down(value: u64) -> u64 {
    value & !(SM_BLOCK_BYTES as u64 - 1)
}

/// Encodes a data-file record: crc32c over everything after it, key and value lengths, version.
fn encode_record(out: &mut Vec<u8>, key: &[u8], value: &[u8], version: u64) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    out.resize(start + record_bytes(key.len(), value.len()) as usize, 0);
}

/// A decoded record: (key, value, version), or why the bytes are not one.
fn decode_record(bytes: &[u8]) -> Result<(&[u8], &[u8], u64), String> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err("truncated record header".into());
    }
    let key_len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    let value_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let end = RECORD_HEADER_BYTES
        .checked_add(key_len)
        .and_then(|n| n.checked_add(value_len))
        .filter(|&end| end <= bytes.len())
        .ok_or("record lengths exceed the data")?;
    let stored = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    if crc32c::crc32c(&bytes[4..end]) != stored {
        return Err("crc32c mismatch".into());
    }
    let version = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    Ok((&bytes[24..24 + key_len], &bytes[24 + key_len..end], version))
}

/// Values of up to this many bytes are held in the index entry itself.
const IN_PLACE_VALUE_BYTES: usize = 64;

/// A value held in memory: up to [`IN_PLACE_VALUE_BYTES`] in place, inside the index entry,
/// longer ones (when `inline_value_bytes_max` allows them) in an allocation of their own.
///
/// In place, a put that overwrites the value, a read, and a checkpoint encoding it touch the
/// memory the index lookup already brought into the cache. A value in its own allocation costs
/// one more cache miss on each with millions of keys: with 64 B values, ~12% of the whole
/// machine in the TCP benchmark went to copying into and out of those allocations. The price
/// is a larger index entry for every key (80 B of slot instead of 32 B, the same 24 B key):
/// at 64 B values about what the separate allocation cost, more for tiny or file-held values.
type InlineValue = SmallBytes<IN_PLACE_VALUE_BYTES>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Loc {
    Inline(InlineValue),
    File { file: u32, offset: u64, value_len: u32 },
}

#[derive(Clone, Debug)]
struct Slot {
    version: u64,
    loc: Loc,
}

/// How many commands ahead of the one being applied its index slot is prefetched: far enough
/// that the memory arrives in time (a put applies in ~0.2 µs, a miss takes ~0.1 µs), near
/// enough that the prefetched lines are still cached when used.
const PREFETCH_AHEAD: usize = 4;

#[derive(Clone, Copy, Debug, Default)]
struct FileStats {
    len: u64,
    live: u64,
}

/// Values read from data files, bounded by bytes, evicted oldest first.
#[derive(Debug, Default)]
struct ReadCache {
    values: HashMap<(u32, u64), Rc<[u8]>>,
    order: VecDeque<(u32, u64)>,
    bytes: usize,
}

impl ReadCache {
    fn insert(&mut self, key: (u32, u64), value: Rc<[u8]>, limit: usize) {
        if value.len() > limit || self.values.contains_key(&key) {
            return;
        }
        self.bytes += value.len();
        self.values.insert(key, value);
        self.order.push_back(key);
        while self.bytes > limit {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(value) = self.values.remove(&old) {
                self.bytes -= value.len();
            }
        }
    }

    fn clear(&mut self) {
        *self = ReadCache::default();
    }

    /// Drops the values of a deleted file, and their bytes from the count.
    fn forget_file(&mut self, file: u32) {
        let bytes = &mut self.bytes;
        self.values.retain(|&(f, _), value| {
            if f == file {
                *bytes -= value.len();
            }
            f != file
        });
        self.order.retain(|&(f, _)| f != file);
    }
}

/// A checkpoint as loaded or written: its applied index, file name and referenced data files.
#[derive(Clone, Debug)]
struct CheckpointInfo {
    applied: u64,
    name: String,
    files: BTreeSet<u32>,
}

/// Every data file the store has, kept on disk (not deleted as garbage) while this lives:
/// what a stepwise checkpoint or a snapshot may still point into.
#[derive(Debug)]
struct PinnedFiles {
    pins: Rc<RefCell<BTreeMap<u32, usize>>>,
    files: Vec<u32>,
}

impl PinnedFiles {
    /// Just `file` (what one read needs).
    fn only<D: SmDisk>(store: &KvStore<D>, file: u32) -> PinnedFiles {
        *store.pins.borrow_mut().entry(file).or_insert(0) += 1;
        PinnedFiles {
            pins: store.pins.clone(),
            files: vec![file],
        }
    }

    fn new<D: SmDisk>(store: &KvStore<D>) -> PinnedFiles {
        let files: Vec<u32> = store.files.keys().copied().collect();
        let mut pins = store.pins.borrow_mut();
        for &file in &files {
            *pins.entry(file).or_insert(0) += 1;
        }
        PinnedFiles {
            pins: store.pins.clone(),
            files,
        }
    }
}

impl Drop for PinnedFiles {
    fn drop(&mut self) {
        let mut pins = self.pins.borrow_mut();
        for file in &self.files {
            if let Some(count) = pins.get_mut(file) {
                *count -= 1;
            }
        }
    }
}

/// The entries of index part `part` as they were when a snapshot began: the live
/// ones, with `kept` (the slots then of keys changed since; `None`: absent then) in place of
/// what changed, and the keys deleted since.
fn part_as_it_was<'a>(
    index: &'a Index<Slot>,
    part: usize,
    kept: &'a HashMap<Key, Option<Slot>>,
) -> impl Iterator<Item = (&'a Key, &'a Slot)> {
    let live = index
        .part_entries(part)
        .filter_map(|(key, slot)| match kept.get(key.as_bytes()) {
            None => Some((key, slot)),
            Some(then) => then.as_ref().map(|then| (key, then)), // None: added since
        });
    let deleted = kept.iter().filter_map(|(key, then)| {
        let then = then.as_ref()?;
        index.get(key.as_bytes()).is_none().then_some((key, then))
    });
    live.chain(deleted)
}

/// A checkpoint written a step at a time ([`KvStore::checkpoint_step`]) of the index as it was
/// at `applied`, while applies go on. Nothing is copied when it begins: the index's parts are
/// encoded in order, a few per step, and the first change to a key of a part not yet encoded
/// encodes the key's slot as it was, there and then, into `staged` (entries are in no order).
///
/// Which keys have changed since it began needs no bookkeeping of its own: every put writes the
/// entry index it applies as the slot's version, so a slot with `version > applied` was
/// written since (its key was absent then, or its old slot is already encoded), and one with
/// `version <= applied` is as it was. The one change that keeps the version is compaction moving
/// a record; such keys are encoded before the move and listed in `moved`. A map of old slots
/// per changed key (as snapshots keep) cost ~40% of apply's time per command during checkpoint
/// rounds in the TCP benchmark, where most puts hit a part not yet encoded.
///
/// The data files it lists stay on disk (pinned) until it is dropped.
struct CheckpointJob {
    applied: u64,
    active_file: u32,
    active_len: u64,
    /// The data files when it began (the checkpoint's file table).
    files: PinnedFiles,
    /// Keys in the index when it began (the header's entry count).
    entries: u64,
    /// Entries encoded so far; `entries` at the end, or the bookkeeping is wrong.
    encoded: u64,
    /// Parts of the index encoded so far (in part order).
    parts_done: usize,
    /// Per part not yet encoded: keys moved by compaction since the checkpoint began, already
    /// encoded as they were (their version did not change). Dropped when the part is encoded.
    moved: Vec<HashSet<Key>>,
    /// Encoded bytes not yet written, starting at file offset `offset` (a block boundary).
    staged: Vec<u8>,
    /// How many bytes of `staged` `body_len` and `body_crc` cover.
    summed: usize,
    offset: u64,
    /// Block 0 as first written, header still zero: rewritten with the header at the end.
    first_block: Option<Vec<u8>>,
    body_len: u64,
    body_crc: u32,
}

/// A restore in progress.
#[derive(Debug)]
struct Restore {
    applied: u64,
    next_chunk: u64,
    chunks: u64,
    index: Index<Slot>,
    /// Set by `restore_prepare`: `restore.tmp` holds this state's checkpoint, durable, listing
    /// these data files.
    prepared: Option<BTreeSet<u32>>,
}

/// The built-in key-value state machine. See the module docs.
pub struct KvStore<D: SmDisk> {
    disk: D,
    config: KvConfig,
    index: Index<Slot>,
    applied: u64,
    durable: u64,
    active_file: u32,
    active_len: u64,
    /// Bytes of the active file from `tail_start` (block aligned) to `active_len`.
    tail_start: u64,
    tail: Vec<u8>,
    /// The last write of the tail ran out of space; see the module docs and
    /// [`KvStore::writable`].
    write_stalled: bool,
    files: BTreeMap<u32, FileStats>,
    dirty: BTreeSet<u32>,
    /// Shared with read jobs ([`StateMachine::read_job`]), which fill it as they finish.
    cache: Rc<RefCell<ReadCache>>,
    checkpoints: VecDeque<CheckpointInfo>,
    pins: Rc<RefCell<BTreeMap<u32, usize>>>,
    garbage: BTreeSet<u32>,
    /// Ids are never reused (cached reads are keyed by file id and offset).
    next_file: u32,
    compaction: Option<(u32, u64)>,
    restore: Option<Restore>,
    /// A stepwise checkpoint under way.
    checkpoint_job: Option<CheckpointJob>,
    /// What open snapshots need of keys changed since they began (shared with each
    /// [`KvSnapshot`]; dropped here once the snapshot is).
    snapshot_views: Vec<Rc<RefCell<SnapshotView>>>,
    failure: Option<String>,
    warnings: Vec<String>,
}

impl<D: SmDisk> std::fmt::Debug for KvStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("keys", &self.index.len())
            .field("applied", &self.applied)
            .field("durable", &self.durable)
            .field("active_file", &self.active_file)
            .field("files", &self.files.len())
            .finish()
    }
}

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    pub keys: usize,
    pub data_files: usize,
    pub data_bytes: u64,
    pub live_bytes: u64,
    pub cache_bytes: usize,
    /// Records appended but not written to their data file yet (the tail). Beyond the write
    /// buffer only while writes are stalled for space.
    pub unwritten_bytes: usize,
    /// Whether writes are stalled for space (see [`KvStore::writable`]).
    pub write_stalled: bool,
}

impl<D: SmDisk> KvStore<D> {
    /// Opens the store in `disk`: loads the newest valid checkpoint (reporting damaged ones in
    /// [`KvStore::warnings`]) or starts empty. The engine then replays the log from
    /// `durable_index() + 1`.
    pub async fn open(disk: D, config: KvConfig) -> Result<KvStore<D>, SmError> {
        assert!(
            config.checkpoints_kept > 0 && config.write_buffer_bytes >= SM_BLOCK_BYTES,
            "KvConfig limits"
        );
        let names = disk
            .list()
            .await
            .map_err(|e| SmError::io("list", "state machine directory", e))?;
        let hash_seed = config.hash_seed;
        let mut store = KvStore {
            disk: disk.clone(),
            config,
            index: Index::with_capacity(0, hash_seed),
            applied: 0,
            durable: 0,
            active_file: 0,
            active_len: 0,
            tail_start: 0,
            tail: Vec::new(),
            write_stalled: false,
            files: BTreeMap::new(),
            dirty: BTreeSet::new(),
            cache: Rc::default(),
            checkpoints: VecDeque::new(),
            pins: Rc::new(RefCell::new(BTreeMap::new())),
            garbage: BTreeSet::new(),
            next_file: 1,
            compaction: None,
            restore: None,
            checkpoint_job: None,
            snapshot_views: Vec::new(),
            failure: None,
            warnings: Vec::new(),
        };
        // Unfinished checkpoints (a restore's, if the switch never came, is of no use either).
        for tmp in [CHECKPOINT_TMP, RESTORE_TMP] {
            if names.iter().any(|n| n == tmp) {
                let _ = disk.remove(tmp).await;
            }
        }
        let mut checkpoints: Vec<(u64, String)> = names
            .iter()
            .filter_map(|n| parse_checkpoint_name(n).map(|a| (a, n.clone())))
            .collect();
        checkpoints.sort_unstable();
        let mut loaded = None;
        let mut valid = Vec::new();
        for (applied, name) in checkpoints.iter().rev() {
            let len = disk
                .len(name)
                .await
                .map_err(|e| SmError::io("stat", name.clone(), e))?;
            let bytes = disk
                .read_at(name, 0, len as usize)
                .await
                .map_err(|e| SmError::io("read", name.clone(), e))?;
            match parse_checkpoint(&bytes, store.config.hash_seed) {
                Ok(parsed) if parsed.applied == *applied => {
                    valid.push(CheckpointInfo {
                        applied: *applied,
                        name: name.clone(),
                        files: parsed.files.keys().copied().collect(),
                    });
                    if loaded.is_none() {
                        loaded = Some(parsed);
                    }
                }
                Ok(parsed) => store
                    .warnings
                    .push(format!("{name}: names applied index {}", parsed.applied)),
                Err(reason) => store.warnings.push(format!("{name}: {reason}")),
            }
        }
        if loaded.is_none() && !checkpoints.is_empty() {
            let (_, newest) = checkpoints.last().unwrap();
            return Err(SmError::Corrupt {
                file: newest.clone(),
                offset: 0,
                reason: format!(
                    "no valid checkpoint to recover from: {}",
                    store.warnings.join("; ")
                ),
            });
        }
        valid.reverse();
        store.checkpoints = valid.into();
        let referenced: BTreeSet<u32> = store
            .checkpoints
            .iter()
            .flat_map(|c| c.files.iter().copied())
            .collect();
        if let Some(checkpoint) = loaded {
            for (&id, &len) in &checkpoint.files {
                if len == 0 {
                    // An active file nothing was written to yet: it may never have been created.
                    store.files.insert(id, FileStats::default());
                    continue;
                }
                let name = data_file_name(id);
                let actual = disk.len(&name).await.map_err(|e| SmError::Corrupt {
                    file: name.clone(),
                    offset: 0,
                    reason: format!("data file named by the checkpoint cannot be opened: {e}"),
                })?;
                if actual < len {
                    return Err(SmError::Corrupt {
                        file: name,
                        offset: actual,
                        reason: format!("data file is {actual} bytes, the checkpoint needs {len}"),
                    });
                }
                store.files.insert(id, FileStats { len, live: 0 });
            }
            store.applied = checkpoint.applied;
            store.durable = checkpoint.applied;
            store.active_file = checkpoint.active_file;
            store.active_len = checkpoint.active_len;
            store.index = checkpoint.index;
            store.files.entry(store.active_file).or_default().len = store.active_len;
        }
        // Data files no kept checkpoint needs (written after the last checkpoint, or garbage).
        for name in &names {
            if let Some(id) = parse_data_file_name(name) {
                if !referenced.contains(&id) && !(store.files.contains_key(&id)) {
                    disk.remove(name)
                        .await
                        .map_err(|e| SmError::io("remove stale data file", name.clone(), e))?;
                }
            }
        }
        // Files only older kept checkpoints list: deleted once those checkpoints are.
        for &file in &referenced {
            if !store.files.contains_key(&file) {
                store.garbage.insert(file);
            }
        }
        store.next_file = referenced
            .iter()
            .chain(store.files.keys())
            .max()
            .map_or(0, |&m| m)
            + 1;
        store.next_file = store.next_file.max(store.active_file + 1);
        store.recount_live();
        store.tail_start = align_down(store.active_len);
        if store.active_len > store.tail_start {
            let name = data_file_name(store.active_file);
            let len = (store.active_len - store.tail_start) as usize;
            let block = disk
                .read_at(&name, store.tail_start, len)
                .await
                .map_err(|e| SmError::io("read", name.clone(), e))?;
            if block.len() != len {
                return Err(SmError::Corrupt {
                    file: name,
                    offset: store.tail_start,
                    reason: "active data file is shorter than its tail".into(),
                });
            }
            store.tail = block;
        }
        Ok(store)
    }

    /// Damaged checkpoints skipped at open, each with its file name and the reason.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn stats(&self) -> KvStats {
        KvStats {
            keys: self.index.len(),
            data_files: self.files.len(),
            data_bytes: self.files.values().map(|f| f.len).sum(),
            live_bytes: self.files.values().map(|f| f.live).sum(),
            cache_bytes: self.cache.borrow().bytes,
            unwritten_bytes: self.tail.len(),
            write_stalled: self.write_stalled,
        }
    }

    fn recount_live(&mut self) {
        for stats in self.files.values_mut() {
            stats.live = 0;
        }
        for (key, slot) in &self.index {
            if let Loc::File { file, value_len, .. } = slot.loc {
                self.files.entry(file).or_default().live += record_bytes(key.len(), value_len as usize);
            }
        }
    }

    fn check_usable(&self, op: &'static str) -> Result<(), SmError> {
        match &self.failure {
            Some(cause) => Err(SmError::Failed {
                op,
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fail(&mut self, error: SmError) -> SmError {
        self.checkpoint_job = None;
        if self.failure.is_none() {
            self.failure = Some(error.to_string());
        }
        error
    }

    /// Writes the tail's blocks to the active file (the partial last block is written again
    /// next time, with more bytes). A failed write leaves the tail as it was: its records are
    /// still served from it, and a later write at the same offset puts the same bytes there
    /// (whatever a failed O_DIRECT write left in the file is unreferenced until then). Running
    /// out of space stalls the store's writes until a write succeeds (see [`KvStore::writable`]).
    async fn flush_tail(&mut self) -> Result<(), SmError> {
        if self.tail.is_empty() {
            self.write_stalled = false;
            return Ok(());
        }
        let padded = self.tail.len().div_ceil(SM_BLOCK_BYTES) * SM_BLOCK_BYTES;
        let mut buffer = self.disk.alloc_buffer(padded);
        buffer.as_mut()[..self.tail.len()].copy_from_slice(&self.tail);
        let name = data_file_name(self.active_file);
        let written = self.disk.write_at(&name, self.tail_start, buffer).await;
        let error = written.err().map(|e| SmError::io("write", name.clone(), e));
        self.write_stalled = error.as_ref().is_some_and(SmError::is_out_of_space);
        if let Some(error) = error {
            return Err(error);
        }
        self.dirty.insert(self.active_file);
        let full = (self.tail.len() / SM_BLOCK_BYTES) * SM_BLOCK_BYTES;
        self.tail.drain(..full);
        self.tail_start += full as u64;
        Ok(())
    }

    /// `flush_tail` while the store's writes are not stalled, where running out of space is
    /// not an error: the tail stays in memory and the writes stall (see
    /// [`KvStore::writable`]). Returns whether the tail is written.
    async fn try_flush_tail(&mut self) -> Result<bool, SmError> {
        if self.write_stalled {
            return Ok(false);
        }
        match self.flush_tail().await {
            Ok(()) => Ok(true),
            Err(error) if error.is_out_of_space() => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Before a change that appends records (a batch holding values stored in files, a restore
    /// chunk): a store whose writes stalled for space writes its tail again, and while that
    /// still fails, the change is refused with the out-of-space error before anything of it is
    /// done (the store stays usable; the caller tries again later). Within a change, a write
    /// that runs out of space only stalls the writes, so the tail outgrows the write buffer by
    /// at most one change (a batch is bounded by raft's entry size).
    pub(crate) async fn writable(&mut self) -> Result<(), SmError> {
        if !self.write_stalled {
            return Ok(());
        }
        match self.flush_tail().await {
            Ok(()) => Ok(()),
            Err(error) if error.is_out_of_space() => Err(error),
            Err(error) => Err(self.fail(error)),
        }
    }

    /// Appends a record for `key` to the active file; returns its location. Out of space is no
    /// error here (see [`KvStore::writable`]).
    async fn append_record(&mut self, key: &[u8], value: &[u8], version: u64) -> Result<Loc, SmError> {
        let bytes = record_bytes(key.len(), value.len());
        // A file is sealed only once its tail is written out: while writes are stalled, the
        // active file grows past its bound instead (by at most one change).
        if self.active_len > 0
            && self.active_len + bytes > self.config.data_file_bytes_max
            && self.try_flush_tail().await?
        {
            // Seal the active file and start the next one.
            let next = self.next_file;
            self.next_file += 1;
            self.active_file = next;
            self.active_len = 0;
            self.tail_start = 0;
            self.tail.clear();
            self.files.insert(next, FileStats::default());
        }
        let offset = self.active_len;
        encode_record(&mut self.tail, key, value, version);
        self.active_len += bytes;
        let stats = self.files.entry(self.active_file).or_default();
        stats.len = self.active_len;
        if self.tail.len() >= self.config.write_buffer_bytes {
            self.try_flush_tail().await?;
        }
        Ok(Loc::File {
            file: self.active_file,
            offset,
            value_len: value.len() as u32,
        })
    }

    fn release(&mut self, key_len: usize, slot: &Slot) {
        if let Loc::File { file, value_len, .. } = slot.loc {
            if let Some(stats) = self.files.get_mut(&file) {
                stats.live = stats
                    .live
                    .saturating_sub(record_bytes(key_len, value_len as usize));
            }
        }
    }

    /// Before `key` changes (`moved`: compaction is moving its record, keeping its version): a
    /// stepwise checkpoint that has yet to write its part encodes the slot it had when the
    /// checkpoint began, and every open snapshot keeps it (the first change since then is the
    /// one to keep).
    fn keep_before_change(&mut self, key: &[u8], moved: bool) {
        if self.checkpoint_job.is_none() && self.snapshot_views.is_empty() {
            return;
        }
        let part = self.index.part_of(key);
        if let Some(job) = self.checkpoint_job.as_mut() {
            if part >= job.parts_done {
                if let Some(slot) = self.index.get(key) {
                    // See `CheckpointJob` for why the version tells.
                    if slot.version <= job.applied && !job.moved[part].contains(key) {
                        encode_checkpoint_entry(&mut job.staged, key, slot);
                        job.encoded += 1;
                        if moved {
                            job.moved[part].insert(Key::new(key));
                        }
                    }
                }
            }
        }
        // Open snapshots keep the first slot of every changed key for as long as they live:
        // any chunk may be asked for again.
        self.snapshot_views.retain(|view| Rc::strong_count(view) > 1);
        for view in &self.snapshot_views {
            let mut view = view.borrow_mut();
            if !view.kept[part].contains_key(key) {
                view.kept[part].insert(Key::new(key), self.index.get(key).cloned());
            }
        }
    }

    async fn put(&mut self, key: &[u8], value: &[u8], version: u64) -> Result<(), SmError> {
        self.keep_before_change(key, false);
        if value.len() <= self.config.inline_value_bytes_max {
            // An inline value over one of the same length is overwritten in place: no
            // allocation, no free (snapshots hold copies, never this memory).
            let old = match self.index.get_mut(key) {
                Some(slot) => match &mut slot.loc {
                    Loc::Inline(bytes) if bytes.len() == value.len() => {
                        bytes.copy_from_slice(value);
                        slot.version = version;
                        return Ok(());
                    }
                    _ => std::mem::replace(
                        slot,
                        Slot {
                            version,
                            loc: Loc::Inline(value.into()),
                        },
                    ),
                },
                None => {
                    let loc = Loc::Inline(value.into());
                    self.index.insert(key, Slot { version, loc });
                    return Ok(());
                }
            };
            self.release(key.len(), &old);
            return Ok(());
        }
        let loc = self.append_record(key, value, version).await?;
        if let Loc::File { file, .. } = loc {
            self.files.entry(file).or_default().live += record_bytes(key.len(), value.len());
        }
        // Overwrites keep the existing key.
        let old = match self.index.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, Slot { version, loc })),
            None => {
                self.index.insert(key, Slot { version, loc });
                None
            }
        };
        if let Some(old) = old {
            self.release(key.len(), &old);
        }
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> bool {
        self.keep_before_change(key, false);
        match self.index.remove(key) {
            Some(old) => {
                self.release(key.len(), &old);
                true
            }
            None => false,
        }
    }

    /// Where the value of `key` (at `slot`) can be had: in memory (inline in the index, or in
    /// the read cache), in the active file's tail not written out yet (checked), or only by a
    /// read of its data file record.
    fn locate(&self, key: &[u8], slot: &Slot) -> Result<ValueAt, SmError> {
        let (file, offset, value_len) = match &slot.loc {
            Loc::Inline(value) => return Ok(ValueAt::Held(Rc::from(&value[..]))),
            Loc::File {
                file,
                offset,
                value_len,
            } => (*file, *offset, *value_len as usize),
        };
        if let Some(value) = self.cache.borrow().values.get(&(file, offset)) {
            return Ok(ValueAt::Held(value.clone()));
        }
        let record = DataRecord {
            file,
            name: data_file_name(file),
            offset,
            len: RECORD_HEADER_BYTES + key.len() + value_len,
            value_len,
        };
        if file == self.active_file && offset >= self.tail_start {
            let at = (offset - self.tail_start) as usize;
            let bytes = &self.tail[at..at + record.len];
            let value = record.check(bytes, key, slot.version)?;
            return Ok(ValueAt::Tail(value, record));
        }
        Ok(ValueAt::Disk(record))
    }

    /// The values of a snapshot chunk's records that are in memory, and the reads that fetch
    /// the rest (by item) from data files.
    #[allow(clippy::type_complexity)]
    fn snapshot_values(
        &self,
        items: &[(Key, Slot)],
    ) -> Result<(Vec<Option<Rc<[u8]>>>, Vec<(usize, DataRecord)>), SmError> {
        let mut values = Vec::with_capacity(items.len());
        let mut reads = Vec::new();
        for (at, (key, slot)) in items.iter().enumerate() {
            values.push(match self.locate(key.as_bytes(), slot)? {
                ValueAt::Held(value) | ValueAt::Tail(value, _) => Some(value),
                ValueAt::Disk(record) => {
                    reads.push((at, record));
                    None
                }
            });
        }
        Ok((values, reads))
    }

    /// Reads a value at a location, verifying it; values from data files (written or not)
    /// go into the read cache.
    async fn load(&mut self, key: &[u8], slot: &Slot) -> Result<Rc<[u8]>, SmError> {
        let (value, record) = match self.locate(key, slot)? {
            ValueAt::Held(value) => return Ok(value),
            ValueAt::Tail(value, record) => (value, record),
            ValueAt::Disk(record) => {
                let bytes = record.read(&self.disk).await?;
                (record.check(&bytes, key, slot.version)?, record)
            }
        };
        self.cache.borrow_mut().insert(
            (record.file, record.offset),
            value.clone(),
            self.config.cache_bytes_max,
        );
        Ok(value)
    }

    /// The current value of `key`.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Rc<[u8]>>, SmError> {
        let Some(slot) = self.index.get(key).cloned() else {
            return Ok(None);
        };
        self.load(key, &slot).await.map(Some)
    }

    /// Whether applying `batch` may append records (holds a value too large for the index).
    fn appends_records(&self, batch: &ArchivedBatch) -> bool {
        let inline_max = self.config.inline_value_bytes_max;
        batch.commands.iter().any(|command| match command {
            ArchivedCommand::Put { value, .. } => value.len() > inline_max,
            ArchivedCommand::CompareAndSwap { new, .. } => {
                new.as_ref().is_some_and(|value| value.len() > inline_max)
            }
            ArchivedCommand::Delete { .. } | ArchivedCommand::Get { .. } => false,
        })
    }

    async fn apply_batch(
        &mut self,
        index: u64,
        batch: &ArchivedBatch,
        results: &mut Vec<CommandResult>,
    ) -> Result<(), SmError> {
        let commands = batch.commands.as_slice();
        for command in commands.iter().take(PREFETCH_AHEAD) {
            self.index.prefetch(command.key());
        }
        for (at, command) in commands.iter().enumerate() {
            // The index slot of a command a few ahead starts loading now, while this one is
            // applied (each lookup is about two cache misses; this overlaps them).
            if let Some(ahead) = commands.get(at + PREFETCH_AHEAD) {
                self.index.prefetch(ahead.key());
            }
            let result = match command {
                ArchivedCommand::Put { key, value } => {
                    self.put(key.as_slice(), value.as_slice(), index).await?;
                    CommandResult::Ok
                }
                ArchivedCommand::Delete { key } => {
                    if self.delete(key.as_slice()) {
                        CommandResult::Ok
                    } else {
                        CommandResult::NotFound
                    }
                }
                ArchivedCommand::CompareAndSwap { key, expected, new } => {
                    let current = self.get(key.as_slice()).await?;
                    if current.as_deref() == expected.as_ref().map(|e| e.as_slice()) {
                        match new.as_ref() {
                            Some(value) => self.put(key.as_slice(), value.as_slice(), index).await?,
                            None => {
                                self.delete(key.as_slice());
                            }
                        }
                        CommandResult::Ok
                    } else {
                        CommandResult::CasMismatch {
                            current: current.map(|v| v.to_vec()),
                        }
                    }
                }
                ArchivedCommand::Get { key } => match self.get(key.as_slice()).await? {
                    Some(value) => CommandResult::Value(value.to_vec()),
                    None => CommandResult::NotFound,
                },
            };
            results.push(result);
        }
        Ok(())
    }

    /// Writes the index and applied index durably, all at once (see the module docs for the
    /// sequence). A stepwise checkpoint under way is abandoned.
    pub async fn checkpoint_now(&mut self) -> Result<u64, SmError> {
        self.check_usable("checkpoint")?;
        self.checkpoint_job = None;
        if self.durable == self.applied && !self.checkpoints.is_empty() {
            return Ok(self.durable);
        }
        let result = match self.checkpoint_begin().await {
            Ok(()) => self.checkpoint_advance(u64::MAX).await,
            Err(error) => Err(error),
        };
        match result {
            Ok(done) => {
                assert!(done, "an unbounded checkpoint step finishes");
                Ok(self.durable)
            }
            // As in `checkpoint_step`: a full disk abandons the checkpoint, nothing more.
            Err(error) if abandons_checkpoint(&error) => Err(error),
            Err(error) => Err(self.fail(error)),
        }
    }

    /// Makes the state durable a step at a time: the first call writes out the tail and syncs
    /// the data files; each call encodes and writes about `budget_bytes` of the checkpoint
    /// (whole parts of the index, 1/256 of the keys each). Applies, reads and compaction may
    /// run between calls: a change to a key not yet written keeps its slot for the checkpoint
    /// first (`keep_before_change`). Returns `Some(index)` once the state at `index` (the applied
    /// index when this checkpoint began) is durable, `None` while it is under way.
    pub async fn checkpoint_step(&mut self, budget_bytes: u64) -> Result<Option<u64>, SmError> {
        self.check_usable("checkpoint")?;
        if self.checkpoint_job.is_none() {
            if self.durable == self.applied && !self.checkpoints.is_empty() {
                return Ok(Some(self.durable));
            }
            match self.checkpoint_begin().await {
                Ok(()) => {}
                // Out of space writing the tail: it stays in memory, and nothing began.
                Err(error) if abandons_checkpoint(&error) => return Err(error),
                Err(error) => return Err(self.fail(error)),
            }
        }
        match self.checkpoint_advance(budget_bytes).await {
            Ok(done) => Ok(done.then_some(self.durable)),
            // Out of space writing or syncing `checkpoint.tmp`: nothing refers to that file
            // and the next round writes all of it again, so the round is abandoned (the job,
            // with its pinned files, is already dropped) and the store goes on; the WAL still
            // holds everything applied since the last checkpoint. A failure anywhere else (the
            // data files' syncs, the rename into place) fails the store as before.
            Err(error) if abandons_checkpoint(&error) => {
                debug_assert!(self.checkpoint_job.is_none());
                Err(error)
            }
            Err(error) => Err(self.fail(error)),
        }
    }

    /// Writes out the tail and syncs every data file written since the last checkpoint: a
    /// checkpoint that points into them can exist only after this.
    async fn write_out_data(&mut self) -> Result<(), SmError> {
        self.flush_tail().await?;
        for file in std::mem::take(&mut self.dirty) {
            let name = data_file_name(file);
            self.disk
                .sync(&name)
                .await
                .map_err(|e| SmError::io("sync", name.clone(), e))?;
        }
        Ok(())
    }

    /// Step 1 of the sequence; the state to write is the index as it is now (nothing copied).
    async fn checkpoint_begin(&mut self) -> Result<(), SmError> {
        self.write_out_data().await?;
        // `checkpoint.tmp`, if there, is an old checkpoint kept for reuse (or one abandoned):
        // it is written over, its header last, and never read as a checkpoint.
        let mut staged = vec![0; CHECKPOINT_HEADER_BYTES];
        for (&id, stats) in &self.files {
            staged.extend_from_slice(&id.to_le_bytes());
            staged.extend_from_slice(&stats.len.to_le_bytes());
        }
        self.checkpoint_job = Some(CheckpointJob {
            applied: self.applied,
            active_file: self.active_file,
            active_len: self.active_len,
            // Compaction may empty a listed file meanwhile; it stays until this is dropped.
            files: PinnedFiles::new(self),
            entries: self.index.len() as u64,
            encoded: 0,
            parts_done: 0,
            moved: (0..PARTS).map(|_| HashSet::default()).collect(),
            body_len: (staged.len() - CHECKPOINT_HEADER_BYTES) as u64,
            body_crc: crc32c::crc32c(&staged[CHECKPOINT_HEADER_BYTES..]),
            summed: staged.len(),
            staged,
            offset: 0,
            first_block: None,
        });
        Ok(())
    }

    /// Encodes and writes about `budget_bytes` more of the checkpoint under way; at its end,
    /// steps 2 to 4 of the sequence. Returns whether it is durable.
    async fn checkpoint_advance(&mut self, budget_bytes: u64) -> Result<bool, SmError> {
        let mut job = self.checkpoint_job.take().expect("a checkpoint under way");
        let target = usize::try_from(budget_bytes).unwrap_or(usize::MAX);
        let from = job.staged.len();
        // Whole parts (1/256 of the keys each; at least one per step): no change can come
        // between a part's entries.
        while job.parts_done < PARTS && job.staged.len() - from < target.max(1) {
            let moved = std::mem::take(&mut job.moved[job.parts_done]);
            for (key, slot) in self.index.part_entries(job.parts_done) {
                // Written since the checkpoint began, or encoded before compaction moved it.
                if slot.version > job.applied || (!moved.is_empty() && moved.contains(key)) {
                    continue;
                }
                encode_checkpoint_entry(&mut job.staged, key.as_bytes(), slot);
                job.encoded += 1;
            }
            job.parts_done += 1;
        }
        // Everything staged since the last step: these parts and the changed keys' old slots.
        job.body_crc = crc32c::crc32c_append(job.body_crc, &job.staged[job.summed..]);
        job.body_len += (job.staged.len() - job.summed) as u64;
        job.summed = job.staged.len();
        let io = |op| move |e| SmError::io(op, CHECKPOINT_TMP, e);
        if job.parts_done < PARTS {
            // Whole blocks out; the partial last one waits for more bytes.
            let whole = job.staged.len() / SM_BLOCK_BYTES * SM_BLOCK_BYTES;
            if whole == 0 {
                self.checkpoint_job = Some(job);
                return Ok(false);
            }
            let mut buffer = self.disk.alloc_buffer(whole);
            buffer.as_mut().copy_from_slice(&job.staged[..whole]);
            if job.offset == 0 {
                job.first_block = Some(job.staged[..SM_BLOCK_BYTES].to_vec());
            }
            self.disk
                .write_at(CHECKPOINT_TMP, job.offset, buffer)
                .await
                .map_err(io("write"))?;
            job.staged.drain(..whole);
            job.summed -= whole;
            job.offset += whole as u64;
            self.checkpoint_job = Some(job);
            return Ok(false);
        }
        assert_eq!(
            job.encoded, job.entries,
            "a checkpoint holds exactly the keys of the index when it began"
        );
        let header = checkpoint_header(&job.head());
        if job.offset == 0 {
            job.staged[..CHECKPOINT_HEADER_BYTES].copy_from_slice(&header);
        }
        let padded = job.staged.len().div_ceil(SM_BLOCK_BYTES) * SM_BLOCK_BYTES;
        if padded > 0 {
            let mut buffer = self.disk.alloc_buffer(padded);
            buffer.as_mut()[..job.staged.len()].copy_from_slice(&job.staged);
            self.disk
                .write_at(CHECKPOINT_TMP, job.offset, buffer)
                .await
                .map_err(io("write"))?;
        }
        if let Some(mut first) = job.first_block.take() {
            first[..CHECKPOINT_HEADER_BYTES].copy_from_slice(&header);
            let mut buffer = self.disk.alloc_buffer(SM_BLOCK_BYTES);
            buffer.as_mut().copy_from_slice(&first);
            self.disk
                .write_at(CHECKPOINT_TMP, 0, buffer)
                .await
                .map_err(io("write"))?;
        }
        self.disk.sync(CHECKPOINT_TMP).await.map_err(io("sync"))?;
        // The switch: the rename is durable when it returns (the directory is synced).
        let name = checkpoint_name(job.applied);
        self.disk
            .rename(CHECKPOINT_TMP, &name)
            .await
            .map_err(io("rename"))?;
        debug_assert!(job.applied >= self.durable, "checkpoints only move forward");
        self.durable = job.applied;
        self.checkpoints.retain(|c| c.name != name);
        self.checkpoints.push_back(CheckpointInfo {
            applied: job.applied,
            name,
            files: job.files.files.iter().copied().collect(),
        });
        drop(job);
        self.retire_checkpoints().await?;
        Ok(true)
    }

    /// After a new checkpoint: drops the ones beyond those kept, and the data files no kept
    /// one needs any more.
    async fn retire_checkpoints(&mut self) -> Result<(), SmError> {
        // The oldest checkpoint beyond those kept becomes the next one's file: unlinking a
        // checkpoint of a million keys (~80 MB) held the shard for 15-30 ms on ext4, and
        // writing over allocated blocks is faster than into new ones.
        let mut reuse = true;
        while self.checkpoints.len() > self.config.checkpoints_kept {
            let old = self.checkpoints.pop_front().unwrap();
            let (op, done) = match reuse {
                true => ("rename", self.disk.rename(&old.name, CHECKPOINT_TMP).await),
                false => ("remove", self.disk.remove(&old.name).await),
            };
            done.map_err(|e| SmError::io(op, old.name.clone(), e))?;
            reuse = false;
        }
        self.delete_garbage().await
    }

    fn restore_incomplete(&self) -> SmError {
        let reason = match &self.restore {
            Some(r) => format!("only {} of {} chunks received", r.next_chunk, r.chunks),
            None => "no restore in progress".into(),
        };
        SmError::BadChunk {
            chunk: self.restore.as_ref().map_or(0, |r| r.next_chunk),
            reason,
        }
    }

    /// Deletes fully compacted files no kept checkpoint or open snapshot references.
    async fn delete_garbage(&mut self) -> Result<(), SmError> {
        let referenced: BTreeSet<u32> = self
            .checkpoints
            .iter()
            .flat_map(|c| c.files.iter().copied())
            .collect();
        let pinned: BTreeSet<u32> = self
            .pins
            .borrow()
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(&f, _)| f)
            .collect();
        for file in self.garbage.clone() {
            if referenced.contains(&file) || pinned.contains(&file) || file == self.active_file {
                continue;
            }
            let name = data_file_name(file);
            self.disk
                .remove(&name)
                .await
                .map_err(|e| SmError::io("remove", name.clone(), e))?;
            self.garbage.remove(&file);
            self.cache.borrow_mut().forget_file(file);
        }
        Ok(())
    }

    /// Moves live records out of the emptiest sealed file, reading at most about `budget_bytes`
    /// of it; returns the bytes processed (0: nothing to compact). Call it between applies; its
    /// budget bounds how long it holds the shard.
    pub async fn compact_step(&mut self, budget_bytes: u64) -> Result<u64, SmError> {
        self.check_usable("compact")?;
        if self.restore.is_some() {
            // Staged records are live only in the restore's index: compacting now would take
            // their files for garbage and lose the snapshot being received.
            return Ok(0);
        }
        if self.write_stalled {
            // Out of space: moving records would only grow the tail (a checkpoint or the next
            // batch retries the write).
            return Ok(0);
        }
        if self.compaction.is_none() {
            let candidate = self
                .files
                .iter()
                .filter(|(&id, s)| id != self.active_file && !self.garbage.contains(&id) && s.len > 0)
                .filter(|(_, s)| s.live * 100 < s.len * self.config.compaction_live_percent_max)
                .min_by_key(|(_, s)| s.live * 1000 / s.len.max(1))
                .map(|(&id, _)| id);
            match candidate {
                Some(file) => self.compaction = Some((file, 0)),
                None => return Ok(0),
            }
        }
        let (file, start) = self.compaction.unwrap();
        let name = data_file_name(file);
        let len = self.files.get(&file).map_or(0, |s| s.len);
        let want = budget_bytes
            .max(RECORD_HEADER_BYTES as u64)
            .min(len.saturating_sub(start)) as usize;
        let bytes = self
            .disk
            .read_at(&name, start, want)
            .await
            .map_err(|e| SmError::io("read", name.clone(), e))?;
        let mut at = 0usize;
        while (at as u64) < want as u64 && start + (at as u64) < len {
            let offset = start + at as u64;
            // The record, from the window when it lies inside, else read on its own (its header
            // first when even that straddles the window's end).
            let header = if bytes.len() >= at + RECORD_HEADER_BYTES {
                bytes[at..at + RECORD_HEADER_BYTES].to_vec()
            } else {
                self.disk
                    .read_at(&name, offset, RECORD_HEADER_BYTES)
                    .await
                    .map_err(|e| SmError::io("read", name.clone(), e))?
            };
            if header.len() < RECORD_HEADER_BYTES {
                return Err(SmError::Corrupt {
                    file: name,
                    offset,
                    reason: "truncated record header".into(),
                });
            }
            let key_len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
            let value_len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
            let total = RECORD_HEADER_BYTES
                .saturating_add(key_len)
                .saturating_add(value_len);
            let record = if bytes.len() >= at.saturating_add(total) {
                bytes[at..at + total].to_vec()
            } else {
                self.disk
                    .read_at(&name, offset, total)
                    .await
                    .map_err(|e| SmError::io("read", name.clone(), e))?
            };
            let (key, value, version) = decode_record(&record).map_err(|reason| SmError::Corrupt {
                file: name.clone(),
                offset,
                reason,
            })?;
            let live = self.index.get(key).is_some_and(|slot| {
                slot.version == version
                    && matches!(slot.loc, Loc::File { file: f, offset: o, .. } if f == file && o == offset)
            });
            if live {
                let (key, value) = (key.to_vec(), value.to_vec());
                let loc = self.append_record(&key, &value, version).await?;
                self.files.entry(self.active_file).or_default().live += record_bytes(key.len(), value.len());
                self.keep_before_change(&key, true);
                let slot = self.index.get_mut(&key[..]).unwrap();
                let old = std::mem::replace(slot, Slot { version, loc });
                self.release(key.len(), &old);
            }
            at += record_bytes(key.len(), value.len()) as usize;
        }
        let next = start + at as u64;
        if next >= len {
            // Fully rewritten: new checkpoints no longer list it; it is deleted once the kept
            // checkpoints that do list it are gone.
            self.compaction = None;
            self.files.remove(&file);
            self.garbage.insert(file);
        } else {
            self.compaction = Some((file, next));
        }
        Ok(at as u64)
    }
}

/// A checkpoint's contents.
struct ParsedCheckpoint {
    applied: u64,
    active_file: u32,
    active_len: u64,
    files: BTreeMap<u32, u64>,
    index: Index<Slot>,
}

/// One index entry of a checkpoint's body.
fn encode_checkpoint_entry(body: &mut Vec<u8>, key: &[u8], slot: &Slot) {
    body.extend_from_slice(&(key.len() as u32).to_le_bytes());
    body.push(matches!(slot.loc, Loc::File { .. }) as u8);
    body.extend_from_slice(&[0; 3]);
    body.extend_from_slice(&slot.version.to_le_bytes());
    body.extend_from_slice(key);
    match &slot.loc {
        Loc::Inline(value) => {
            body.extend_from_slice(&(value.len() as u32).to_le_bytes());
            body.extend_from_slice(value);
        }
        Loc::File {
            file,
            offset,
            value_len,
        } => {
            body.extend_from_slice(&file.to_le_bytes());
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&value_len.to_le_bytes());
        }
    }
}

/// The header of a finished checkpoint body.
/// What a checkpoint's header says.
struct CheckpointHead {
    files: usize,
    applied: u64,
    entries: u64,
    active_file: u32,
    active_len: u64,
    body_len: u64,
    body_crc: u32,
}

impl CheckpointJob {
    fn head(&self) -> CheckpointHead {
        CheckpointHead {
            files: self.files.files.len(),
            applied: self.applied,
            entries: self.entries,
            active_file: self.active_file,
            active_len: self.active_len,
            body_len: self.body_len,
            body_crc: self.body_crc,
        }
    }
}

/// A whole checkpoint file of a state that does not change meanwhile (a restore's): header,
/// file table (`files`: id to length), every entry of `index`; padded to whole blocks.
fn encode_checkpoint(
    applied: u64,
    active_file: u32,
    active_len: u64,
    files: &BTreeMap<u32, u64>,
    index: &Index<Slot>,
) -> Vec<u8> {
    let mut out = vec![0; CHECKPOINT_HEADER_BYTES];
    for (&id, &len) in files {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    let mut entries = 0;
    for part in 0..PARTS {
        for (key, slot) in index.part_entries(part) {
            encode_checkpoint_entry(&mut out, key.as_bytes(), slot);
            entries += 1;
        }
    }
    let body = &out[CHECKPOINT_HEADER_BYTES..];
    let head = CheckpointHead {
        files: files.len(),
        applied,
        entries,
        active_file,
        active_len,
        body_len: body.len() as u64,
        body_crc: crc32c::crc32c(body),
    };
    out[..CHECKPOINT_HEADER_BYTES].copy_from_slice(&checkpoint_header(&head));
    out.resize(out.len().div_ceil(SM_BLOCK_BYTES) * SM_BLOCK_BYTES, 0);
    out
}

fn checkpoint_header(head: &CheckpointHead) -> [u8; CHECKPOINT_HEADER_BYTES] {
    let mut out = Vec::with_capacity(CHECKPOINT_HEADER_BYTES);
    out.extend_from_slice(&CHECKPOINT_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(head.files as u32).to_le_bytes());
    out.extend_from_slice(&head.applied.to_le_bytes());
    out.extend_from_slice(&head.entries.to_le_bytes());
    out.extend_from_slice(&head.active_file.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&head.active_len.to_le_bytes());
    out.extend_from_slice(&head.body_len.to_le_bytes());
    out.extend_from_slice(&head.body_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&out[..60]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.try_into().expect("64 header bytes")
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

fn parse_checkpoint(bytes: &[u8], hash_seed: Option<u64>) -> Result<ParsedCheckpoint, String> {
    if bytes.len() < CHECKPOINT_HEADER_BYTES {
        return Err("shorter than a checkpoint header".into());
    }
    if bytes[0..8] != CHECKPOINT_MAGIC {
        return Err("bad magic".into());
    }
    let header_crc = u32::from_le_bytes(bytes[60..64].try_into().unwrap());
    if crc32c::crc32c(&bytes[..60]) != header_crc {
        return Err("header crc32c mismatch".into());
    }
    let mut header = Reader {
        bytes: &bytes[..60],
        at: 8,
    };
    let version = header.u32()?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this build reads {FORMAT_VERSION}"
        ));
    }
    let file_count = header.u32()? as usize;
    let applied = header.u64()?;
    let entries = header.u64()?;
    let active_file = header.u32()?;
    header.u32()?;
    let active_len = header.u64()?;
    let body_len = header.u64()? as usize;
    let body_crc = header.u32()?;
    let body = bytes
        .get(CHECKPOINT_HEADER_BYTES..CHECKPOINT_HEADER_BYTES.saturating_add(body_len))
        .ok_or("body extends past the end of the file")?;
    if crc32c::crc32c(body) != body_crc {
        return Err("body crc32c mismatch".into());
    }
    let mut r = Reader { bytes: body, at: 0 };
    let mut files = BTreeMap::new();
    for _ in 0..file_count {
        let id = r.u32()?;
        files.insert(id, r.u64()?);
    }
    let mut index = Index::with_capacity(entries.min(1 << 24) as usize, hash_seed);
    for _ in 0..entries {
        let key_len = r.u32()? as usize;
        let kind = r.take(4)?[0];
        let version = r.u64()?;
        let key = r.take(key_len)?;
        let loc = match kind {
            0 => {
                let len = r.u32()? as usize;
                Loc::Inline(r.take(len)?.into())
            }
            1 => {
                let file = r.u32()?;
                let offset = r.u64()?;
                let value_len = r.u32()?;
                // Checked: a damaged offset must be an error, not an overflow.
                let end = offset.checked_add(record_bytes(key_len, value_len as usize));
                if files
                    .get(&file)
                    .is_none_or(|&len| end.is_none_or(|end| end > len))
                {
                    return Err(format!("an entry points past data file {file}"));
                }
                Loc::File {
                    file,
                    offset,
                    value_len,
                }
            }
            other => return Err(format!("unknown entry kind {other}")),
        };
        if index.insert(key, Slot { version, loc }).is_some() {
            return Err(format!("key {key:02x?} appears twice"));
        }
    }
    if r.at != body.len() {
        return Err("trailing bytes after the last entry".into());
    }
    Ok(ParsedCheckpoint {
        applied,
        active_file,
        active_len,
        files,
        index,
    })
}

/// What a snapshot needs of the store beyond its live index: per index part, the keys changed
/// since the snapshot began, with their slot then (`None`: absent then).
#[derive(Debug)]
struct SnapshotView {
    kept: Vec<HashMap<Key, Option<Slot>>>,
    /// False once a restore replaced the store's state: the snapshot can no longer be produced.
    valid: bool,
}

/// A consistent snapshot of a [`KvStore`]: the live keys at one applied index. Nothing is copied
/// when it is taken: chunk `n` is a fixed range of the index's parts, produced from the live
/// index and the slots the store keeps aside for this snapshot when a key changes (see
/// `keep_before_change`), so it holds the same records whenever it is produced (in an order
/// that may differ). Data files it reads stay on disk while it is alive.
#[derive(Debug)]
pub struct KvSnapshot {
    applied: u64,
    view: Rc<RefCell<SnapshotView>>,
    /// The first index part of each chunk.
    chunk_parts: Vec<usize>,
    /// Shared with chunk jobs under way, which read these files.
    files: Rc<PinnedFiles>,
}

impl KvSnapshot {
    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    pub fn chunks(&self) -> u64 {
        self.chunk_parts.len() as u64
    }
}

impl<D: SmDisk> StateMachine for KvStore<D> {
    type Snapshot = KvSnapshot;

    async fn maintain(&mut self, budget_bytes: u64) -> Result<u64, SmError> {
        self.compact_step(budget_bytes).await
    }

    async fn apply(
        &mut self,
        index: u64,
        batch: &ArchivedBatch,
        results: &mut Vec<CommandResult>,
    ) -> Result<(), SmError> {
        self.check_usable("apply")?;
        if index <= self.applied {
            return Ok(());
        }
        if self.write_stalled && self.appends_records(batch) {
            // Out of space: refused whole, before any command of it (see `writable`).
            self.writable().await?;
        }
        match self.apply_batch(index, batch, results).await {
            Ok(()) => {
                self.applied = index;
                Ok(())
            }
            // Part of the batch may be applied: only a reopen (checkpoint + replay) is sound.
            Err(error) => Err(self.fail(error)),
        }
    }

    async fn read(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, SmError> {
        self.check_usable("read")?;
        Ok(self.get(key).await?.map(|v| v.to_vec()))
    }

    /// Values in memory (the index, the read cache, the unwritten tail) at once; a value only
    /// in a data file as a job that reads and checks its record, with the file pinned against
    /// deletion, and puts it in the read cache.
    fn read_job(&mut self, key: &[u8]) -> Result<ReadStart, SmError> {
        self.check_usable("read")?;
        let Some(slot) = self.index.get(key) else {
            return Ok(ReadStart::Done(None));
        };
        let version = slot.version;
        let record = match self.locate(key, slot)? {
            ValueAt::Held(value) => return Ok(ReadStart::Done(Some(value.to_vec()))),
            ValueAt::Tail(value, record) => {
                let limit = self.config.cache_bytes_max;
                let key = (record.file, record.offset);
                self.cache.borrow_mut().insert(key, value.clone(), limit);
                return Ok(ReadStart::Done(Some(value.to_vec())));
            }
            ValueAt::Disk(record) => record,
        };
        let (disk, cache, limit) = (self.disk.clone(), self.cache.clone(), self.config.cache_bytes_max);
        let pin = PinnedFiles::only(self, record.file);
        let key = key.to_vec();
        Ok(ReadStart::Job(Box::pin(async move {
            let bytes = record.read(&disk).await?;
            let value = record.check(&bytes, &key, version)?;
            cache
                .borrow_mut()
                .insert((record.file, record.offset), value.clone(), limit);
            drop(pin);
            Ok(Some(value.to_vec()))
        })))
    }

    fn applied_index(&self) -> u64 {
        self.applied
    }

    fn durable_index(&self) -> u64 {
        self.durable
    }

    async fn checkpoint(&mut self) -> Result<u64, SmError> {
        self.checkpoint_now().await
    }

    async fn checkpoint_step(&mut self, budget_bytes: u64) -> Result<Option<u64>, SmError> {
        KvStore::checkpoint_step(self, budget_bytes).await
    }

    fn snapshot(&mut self) -> Result<KvSnapshot, SmError> {
        self.check_usable("snapshot")?;
        // Chunks of consecutive whole index parts, about `snapshot_chunk_bytes` each, sizing
        // parts by their key counts and the record size of a sample of keys (chunk sizes only
        // steer memory and message sizes; reading every key here is what is avoided).
        let mut sampled = (0usize, 0usize); // (records, bytes)
        for part in 0..PARTS {
            for (key, slot) in self.index.part_entries(part) {
                let value_len = match &slot.loc {
                    Loc::Inline(v) => v.len(),
                    Loc::File { value_len, .. } => *value_len as usize,
                };
                sampled = (sampled.0 + 1, sampled.1 + 16 + key.as_bytes().len() + value_len);
            }
            if sampled.0 >= 256 {
                break;
            }
        }
        let record_bytes = sampled.1.checked_div(sampled.0).unwrap_or(1).max(1);
        let mut chunk_parts = vec![0];
        let mut size = 0;
        for part in 0..PARTS {
            let bytes = self.index.part_len(part) * record_bytes;
            if size > 0 && size + bytes > self.config.snapshot_chunk_bytes {
                chunk_parts.push(part);
                size = 0;
            }
            size += bytes;
        }
        let view = Rc::new(RefCell::new(SnapshotView {
            kept: (0..PARTS).map(|_| HashMap::default()).collect(),
            valid: true,
        }));
        self.snapshot_views.retain(|view| Rc::strong_count(view) > 1);
        self.snapshot_views.push(view.clone());
        Ok(KvSnapshot {
            applied: self.applied,
            view,
            chunk_parts,
            files: Rc::new(PinnedFiles::new(self)),
        })
    }

    async fn snapshot_chunk(
        &mut self,
        snapshot: &KvSnapshot,
        number: u64,
    ) -> Result<Option<Vec<u8>>, SmError> {
        match self.snapshot_chunk_job(snapshot, number)? {
            ChunkStart::End => Ok(None),
            ChunkStart::Job(job) => job.await.map(Some),
            ChunkStart::Inline => unreachable!("the store always produces a job"),
        }
    }

    fn snapshot_chunk_job(&mut self, snapshot: &KvSnapshot, number: u64) -> Result<ChunkStart, SmError> {
        let Some(&start) = snapshot.chunk_parts.get(number as usize) else {
            return Ok(ChunkStart::End);
        };
        let end = snapshot
            .chunk_parts
            .get(number as usize + 1)
            .copied()
            .unwrap_or(PARTS);
        // The records of these parts as they were when the snapshot began.
        let mut items: Vec<(Key, Slot)> = Vec::new();
        {
            let view = snapshot.view.borrow();
            if !view.valid {
                return Err(SmError::Failed {
                    op: "snapshot",
                    cause: "the store's state was replaced by a restore since the snapshot began".into(),
                });
            }
            for part in start..end {
                let entries = part_as_it_was(&self.index, part, &view.kept[part]);
                items.extend(entries.map(|(key, slot)| (key.clone(), slot.clone())));
            }
        }
        let (values, reads) = self.snapshot_values(&items)?;
        let job = ChunkJobParts {
            disk: self.disk.clone(),
            window: self.config.snapshot_reads_in_flight.max(1),
            items,
            values,
            reads,
            applied: snapshot.applied,
            number,
            chunks: snapshot.chunk_parts.len() as u32,
            _files: snapshot.files.clone(),
        };
        Ok(ChunkStart::Job(Box::pin(job.run())))
    }

    async fn restore_chunk(&mut self, chunk: &[u8]) -> Result<(), SmError> {
        self.check_usable("restore")?;
        let bad = |number: u64, reason: String| SmError::BadChunk {
            chunk: number,
            reason,
        };
        if chunk.len() < SNAPSHOT_HEADER_BYTES || chunk[0..8] != SNAPSHOT_MAGIC {
            return Err(bad(0, "not a snapshot chunk".into()));
        }
        let mut header = Reader {
            bytes: &chunk[..SNAPSHOT_HEADER_BYTES],
            at: 8,
        };
        let applied = header.u64().map_err(|e| bad(0, e))?;
        let number = header.u64().map_err(|e| bad(0, e))?;
        let records = header.u32().map_err(|e| bad(number, e))?;
        let chunks = header.u32().map_err(|e| bad(number, e))? as u64;
        let body_crc = header.u32().map_err(|e| bad(number, e))?;
        let header_crc = header.u32().map_err(|e| bad(number, e))?;
        if crc32c::crc32c(&chunk[..36]) != header_crc {
            return Err(bad(number, "header crc32c mismatch".into()));
        }
        let body = &chunk[SNAPSHOT_HEADER_BYTES..];
        if crc32c::crc32c(body) != body_crc {
            return Err(bad(number, "body crc32c mismatch".into()));
        }
        if number >= chunks {
            return Err(bad(
                number,
                format!("numbered past the snapshot's {chunks} chunks"),
            ));
        }
        if self.restore.is_none() {
            if number != 0 {
                return Err(bad(number, "a restore starts at chunk 0".into()));
            }
            self.restore = Some(Restore {
                applied,
                next_chunk: 0,
                chunks,
                index: Index::with_capacity(0, self.config.hash_seed),
                prepared: None,
            });
        }
        let restore = self.restore.as_mut().unwrap();
        if restore.applied != applied || restore.chunks != chunks {
            return Err(bad(
                number,
                format!("belongs to the snapshot at {applied}, not {}", restore.applied),
            ));
        }
        if number < restore.next_chunk {
            return Ok(()); // already have it: the sender resumed from an earlier boundary
        }
        if number > restore.next_chunk {
            return Err(bad(number, format!("chunk {} is missing", restore.next_chunk)));
        }
        let mut r = Reader { bytes: body, at: 0 };
        let mut parsed = Vec::with_capacity(records as usize);
        for _ in 0..records {
            let key_len = r.u32().map_err(|e| bad(number, e))? as usize;
            let value_len = r.u32().map_err(|e| bad(number, e))? as usize;
            let version = r.u64().map_err(|e| bad(number, e))?;
            let key = r.take(key_len).map_err(|e| bad(number, e))?;
            let value = r.take(value_len).map_err(|e| bad(number, e))?;
            parsed.push((key, value, version));
        }
        if r.at != body.len() {
            return Err(bad(number, "trailing bytes after the last record".into()));
        }
        // Values are written beside the current state; nothing of it changes until the finish.
        // Out of space: this chunk is refused (the sender resends it) and the staging stays.
        let inline_max = self.config.inline_value_bytes_max;
        if self.write_stalled && parsed.iter().any(|(_, value, _)| value.len() > inline_max) {
            self.writable().await?;
        }
        let mut staged = Vec::with_capacity(parsed.len());
        for (key, value, version) in parsed {
            let loc = if value.len() <= self.config.inline_value_bytes_max {
                Loc::Inline(value.into())
            } else {
                self.append_record(key, value, version)
                    .await
                    .map_err(|e| self.fail(e))?
            };
            staged.push((Box::<[u8]>::from(key), Slot { version, loc }));
        }
        let restore = self.restore.as_mut().unwrap();
        restore.index.extend(staged);
        restore.next_chunk += 1;
        Ok(())
    }

    fn restore_abort(&mut self) {
        // Staged values were appended without counting as live: compaction reclaims them.
        self.restore = None;
    }

    async fn restore_prepare(&mut self) -> Result<(), SmError> {
        self.check_usable("restore")?;
        let Some(restore) = self.restore.as_ref().filter(|r| r.next_chunk == r.chunks) else {
            return Err(self.restore_incomplete());
        };
        if restore.prepared.is_some() {
            return Ok(());
        }
        // The staged values, written and synced (as in a checkpoint's first step; out of space
        // writing the tail waits, a failed sync fails the store).
        if let Err(error) = self.write_out_data().await {
            return Err(match abandons_checkpoint(&error) {
                true => error,
                false => self.fail(error),
            });
        }
        // The new state's checkpoint. Its files: those its values are in (staged since the
        // restore began: compaction waits for it, so none of them goes meanwhile), and the
        // active file, where appends go on after the switch.
        let restore = self.restore.as_ref().unwrap();
        let mut files = BTreeMap::from([(self.active_file, self.active_len)]);
        for (_, slot) in restore.index.iter() {
            if let Loc::File { file, .. } = slot.loc {
                files.entry(file).or_insert_with(|| self.files[&file].len);
            }
        }
        let bytes = encode_checkpoint(
            restore.applied,
            self.active_file,
            self.active_len,
            &files,
            &restore.index,
        );
        let mut buffer = self.disk.alloc_buffer(bytes.len());
        buffer.as_mut().copy_from_slice(&bytes);
        drop(bytes);
        let io = |op| move |e| SmError::io(op, RESTORE_TMP, e);
        let mut written = self
            .disk
            .write_at(RESTORE_TMP, 0, buffer)
            .await
            .map_err(io("write"));
        if written.is_ok() {
            written = self.disk.sync(RESTORE_TMP).await.map_err(io("sync"));
        }
        match written {
            Ok(()) => {
                self.restore.as_mut().unwrap().prepared = Some(files.into_keys().collect());
                Ok(())
            }
            // Nothing refers to `restore.tmp` yet: the next call writes it whole again.
            Err(error) if abandons_checkpoint(&error) => Err(error),
            Err(error) => Err(self.fail(error)),
        }
    }

    async fn restore_finish(&mut self) -> Result<u64, SmError> {
        self.check_usable("restore")?;
        let Some(mut restore) = self.restore.take_if(|r| r.next_chunk == r.chunks) else {
            return Err(self.restore_incomplete());
        };
        // A stepwise checkpoint of the old state must not finish after the switch, and open
        // snapshots of it can no longer be produced.
        self.checkpoint_job = None;
        for view in self.snapshot_views.drain(..) {
            view.borrow_mut().valid = false;
        }
        let previous: BTreeSet<u32> = self
            .files
            .keys()
            .copied()
            .filter(|&f| f != self.active_file)
            .collect();
        self.index = restore.index;
        self.applied = restore.applied;
        self.cache.borrow_mut().clear();
        // A compaction under way was of the old state's files.
        self.compaction = None;
        self.recount_live();
        // Files that held only the old state become garbage once no checkpoint needs them.
        let dead: Vec<u32> = self
            .files
            .iter()
            .filter(|(file, stats)| stats.live == 0 && previous.contains(file))
            .map(|(&file, _)| file)
            .collect();
        for file in dead {
            self.files.remove(&file);
            self.garbage.insert(file);
        }
        // Any failure from here on fails the store, out of space included: the state in memory
        // is the new one already, and only its checkpoint can make it the durable one.
        let Some(files) = restore.prepared.take() else {
            // Not prepared (`restore_prepare` is optional for callers): the whole checkpoint now.
            self.durable = 0; // force it: the switch is durable when it returns
            self.checkpoints.retain(|c| c.applied != self.applied);
            return match self.checkpoint_now().await {
                Ok(applied) => Ok(applied),
                Err(error) => Err(self.fail(error)),
            };
        };
        // Prepared: the checkpoint is durable in `restore.tmp`; the rename (durable when it
        // returns) makes it the newest, which is the switch.
        let name = checkpoint_name(self.applied);
        if let Err(error) = self.disk.rename(RESTORE_TMP, &name).await {
            return Err(self.fail(SmError::io("rename", RESTORE_TMP, error)));
        }
        self.durable = self.applied;
        self.checkpoints.retain(|c| c.name != name);
        self.checkpoints.push_back(CheckpointInfo {
            applied: self.applied,
            name,
            files,
        });
        match self.retire_checkpoints().await {
            Ok(()) => Ok(self.applied),
            Err(error) => Err(self.fail(error)),
        }
    }
}

/// Where a value can be had (see `KvStore::locate`).
enum ValueAt {
    /// Inline in the index, or in the read cache.
    Held(Rc<[u8]>),
    /// In the active file's tail, not written out yet (checked), and the record it is in.
    Tail(Rc<[u8]>, DataRecord),
    /// Only by reading its record.
    Disk(DataRecord),
}

/// A record of a data file holding a value.
struct DataRecord {
    file: u32,
    name: String,
    offset: u64,
    /// The whole record's length, and its value's.
    len: usize,
    value_len: usize,
}

impl DataRecord {
    async fn read<D: SmDisk>(&self, disk: &D) -> Result<Vec<u8>, SmError> {
        disk.read_at(&self.name, self.offset, self.len)
            .await
            .map_err(|e| SmError::io("read", self.name.clone(), e))
    }

    /// The value in `bytes` (this record read back), after checking that the record is whole
    /// (crc) and is `key`'s, at `version`, of the expected length.
    fn check(&self, bytes: &[u8], key: &[u8], version: u64) -> Result<Rc<[u8]>, SmError> {
        let corrupt = |reason: String| SmError::Corrupt {
            file: self.name.clone(),
            offset: self.offset,
            reason,
        };
        let (stored_key, value, stored_version) = decode_record(bytes).map_err(corrupt)?;
        if stored_key != key || stored_version != version || value.len() != self.value_len {
            return Err(corrupt(format!(
                "record is for another key or version (version {stored_version}, expected {version})"
            )));
        }
        Ok(Rc::from(value))
    }
}

/// Everything a snapshot chunk's production needs once it leaves the store: the records as
/// they were when the snapshot began, the values already in memory, the reads for the rest,
/// and the snapshot's pin on the data files they read.
struct ChunkJobParts<D: SmDisk> {
    disk: D,
    window: usize,
    items: Vec<(Key, Slot)>,
    values: Vec<Option<Rc<[u8]>>>,
    reads: Vec<(usize, DataRecord)>,
    applied: u64,
    number: u64,
    chunks: u32,
    _files: Rc<PinnedFiles>,
}

impl<D: SmDisk> ChunkJobParts<D> {
    /// Reads the values in data files `window` at a time rather than one after another (a
    /// chunk of 1 KiB values holds about a thousand, each a device round trip), checks each
    /// record, and encodes the chunk. Values read here do not go into the read cache, which
    /// holds what clients read, not what a catching-up follower needs once.
    async fn run(mut self) -> Result<Vec<u8>, SmError> {
        for batch in self.reads.chunks(self.window) {
            let disk = &self.disk;
            let results = join_all(batch.iter().map(|(_, record)| record.read(disk))).await;
            for ((item, record), bytes) in batch.iter().zip(results) {
                let (key, slot) = &self.items[*item];
                self.values[*item] = Some(record.check(&bytes?, key.as_bytes(), slot.version)?);
            }
        }
        let mut body = Vec::new();
        for ((key, slot), value) in self.items.iter().zip(&self.values) {
            let key = key.as_bytes();
            let value = value.as_ref().expect("every value in memory or read");
            body.extend_from_slice(&(key.len() as u32).to_le_bytes());
            body.extend_from_slice(&(value.len() as u32).to_le_bytes());
            body.extend_from_slice(&slot.version.to_le_bytes());
            body.extend_from_slice(key);
            body.extend_from_slice(value);
        }
        let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + body.len());
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.extend_from_slice(&self.applied.to_le_bytes());
        out.extend_from_slice(&self.number.to_le_bytes());
        out.extend_from_slice(&(self.items.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.chunks.to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        let header_crc = crc32c::crc32c(&out);
        out.extend_from_slice(&header_crc.to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }
}

/// Runs futures together until all are done; their outputs in order. The data file reads it
/// joins reach the device together (glommio submits them in one pass). Each wake-up polls the
/// unfinished ones again: fine for the few dozen it is given.
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|context| {
        let mut done = true;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(context) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|output| output.expect("every future finished"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_up_to_the_limit_are_held_in_place_and_read_as_their_bytes() {
        for len in [0, 1, 63, 64, 65, 300] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let value = InlineValue::from(&bytes[..]);
            assert_eq!(&*value, &bytes[..]);
            let in_place = matches!(value, SmallBytes::Inline { .. });
            assert_eq!(in_place, len <= IN_PLACE_VALUE_BYTES, "{len} bytes");
            // Overwritten in place, compared by its bytes only.
            let mut copy = value.clone();
            copy.iter_mut().for_each(|b| *b = b.wrapping_add(1));
            assert_eq!(copy == value, len == 0);
            copy.iter_mut().for_each(|b| *b = b.wrapping_sub(1));
            assert_eq!(copy, value);
        }
        // A shorter value is not equal to a longer one that starts with it (in-place padding
        // is zeros).
        assert_ne!(InlineValue::from(&[1u8][..]), InlineValue::from(&[1u8, 0][..]));
        // The index entry's slot stays within 80 bytes.
        assert!(
            std::mem::size_of::<Slot>() <= 80,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }
}
