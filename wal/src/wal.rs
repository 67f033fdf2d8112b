//! The WAL proper: per-group indexes, batch building, placement into segments, durability
//! tracking, purge. No IO happens here except in [`Wal::open`] (recovery) and
//! [`ReadPlan::execute`]: the write path hands out [`IoJob`]s, a runner performs them (see
//! [`perform`]) and reports back with [`Wal::io_done`]. The glommio runner, the benchmark and
//! the engine's deterministic simulator all drive the same code.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// The WAL's maps keyed by group: looked up per record on the write path, so a fast hasher
/// (SipHash showed in profiles; group ids are not attacker-chosen).
pub(crate) type Map<K, V> = HashMap<K, V, ahash::RandomState>;
use std::io;

use bytes::Bytes;

use crate::disk::Disk;
use crate::error::{ReadError, WalError};
use crate::format::{
    align_up, decode_record, encode_record_header, encode_segment_header, peek_own_record_header,
    record_bytes, record_crc_seed, seal_record, seal_staged_record, segment_file_name, stage_payload_crc,
    RecordKind, SegmentHeader, BLOCK_BYTES, RECORD_HEADER_BYTES, SEGMENT_BYTES_MIN, SEGMENT_HEADER_BYTES,
};

/// Limits of one WAL. The `tuning` crate maps the operator's config onto this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalConfig {
    /// Size of every segment file. Default 64 MiB: large enough that creating or recycling one
    /// (off the sync path) is rare, small enough that purge frees space in useful steps.
    pub segment_bytes: u64,
    /// Largest batch (one write). Default 1 MiB: the measured durable cost is nearly flat up to
    /// 1 MiB, and larger writes only add latency for the appends queued behind them.
    pub batch_bytes_max: usize,
    /// Entry payload bytes kept in memory for reads without disk IO. Default 64 MiB.
    pub cache_bytes_max: usize,
    /// Purged segments kept for recycling (renamed and reused, so no new extents are written on
    /// the sync path); any beyond this are deleted. Default 2.
    pub segments_recycled_max: usize,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_bytes: 64 << 20,
            batch_bytes_max: 1 << 20,
            cache_bytes_max: 64 << 20,
            segments_recycled_max: 2,
        }
    }
}

impl WalConfig {
    pub fn validate(&self) -> Result<(), WalError> {
        let block = BLOCK_BYTES as u64;
        if self.segment_bytes < SEGMENT_BYTES_MIN || self.segment_bytes % block != 0 {
            return Err(WalError::Config {
                key: "wal.segment_bytes",
                reason: format!(
                    "{} must be a multiple of {BLOCK_BYTES} and at least {SEGMENT_BYTES_MIN}",
                    self.segment_bytes
                ),
            });
        }
        if self.segment_bytes > u32::MAX as u64 {
            return Err(WalError::Config {
                key: "wal.segment_bytes",
                reason: format!("{} exceeds the 4 GiB segment limit", self.segment_bytes),
            });
        }
        if self.batch_bytes_max < BLOCK_BYTES
            || self.batch_bytes_max % BLOCK_BYTES != 0
            || self.batch_bytes_max as u64 > self.segment_bytes - SEGMENT_HEADER_BYTES as u64
        {
            return Err(WalError::Config {
                key: "wal.batch_bytes_max",
                reason: format!(
                    "{} must be a multiple of {BLOCK_BYTES} between {BLOCK_BYTES} and the segment's \
                     batch space ({} bytes)",
                    self.batch_bytes_max,
                    self.segment_bytes - SEGMENT_HEADER_BYTES as u64
                ),
            });
        }
        Ok(())
    }

    /// The largest entry payload an append accepts.
    pub fn payload_bytes_max(&self) -> usize {
        // One batch header and one entry record must fit in a batch.
        (self.batch_bytes_max - 2 * RECORD_HEADER_BYTES) & !(crate::format::RECORD_ALIGN - 1)
    }
}

/// The largest metadata record ([`Wal::set_meta`]): memberships of a few hundred nodes fit,
/// and a rollover checkpoint restating every group's stays small.
pub const META_BYTES_MAX: usize = 4096;

/// A raft entry as the WAL stores it. `entry_type` is opaque here (the engine stores raft's
/// entry type in it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub entry_type: u8,
    pub payload: Bytes,
}

/// Raft's hard state of one group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

/// Identifies the batch an append went into. Tickets grow by one per batch; a ticket is durable
/// once [`Wal::durable_ticket`] reaches it, and durability is reached in ticket order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// IO the WAL needs done. Perform it with [`perform`] (or step by step, as the simulator does to
/// crash in the middle) and hand the result to [`Wal::io_done`].
#[derive(Debug)]
pub enum IoJob<D: Disk> {
    /// Write `buffer` at `offset` of `file`, then sync. At most one is outstanding.
    Write(WriteJob<D>),
    /// Make segment `seq` ready: recycle `recycle_from` (rename, rewrite header) or create it.
    Prepare(PrepareJob),
    /// Delete a purged segment that is not kept for recycling.
    Remove { name: String },
}

#[derive(Debug)]
pub struct WriteJob<D: Disk> {
    pub file: D::File,
    pub name: String,
    pub offset: u64,
    pub buffer: D::Buffer,
    /// On-disk batch number of the first batch in the buffer.
    pub batch: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareJob {
    pub seq: u64,
    pub name: String,
    /// A purged segment to reuse, under its current name (which is `name` itself when an
    /// earlier attempt renamed it and then failed).
    pub recycle_from: Option<String>,
    pub segment_bytes: u64,
    /// How long the runner waits before performing the job: zero, except when it retries a
    /// preparation that failed (see [`Wal::prepare_error`]). The WAL has no clock; the runner
    /// has.
    pub delay: std::time::Duration,
}

/// Whether `error` says the file system is out of space (or the user's quota): the one failure
/// of a segment preparation that is waited out instead of failing the WAL.
fn is_out_of_space(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || error.kind() == io::ErrorKind::StorageFull
}

/// The wait before retrying a failed segment preparation: doubling from 10 ms, at most 1 s. A
/// full disk frees up at an operator's pace, so retrying faster would only add load.
fn prepare_retry_delay(consecutive_failures: u32) -> std::time::Duration {
    let exponent = consecutive_failures.saturating_sub(1).min(7);
    std::time::Duration::from_millis(10 << exponent).min(std::time::Duration::from_secs(1))
}

/// The outcome of an [`IoJob`].
#[derive(Debug)]
pub enum IoDone<D: Disk> {
    Written {
        batch: u64,
        result: io::Result<()>,
    },
    /// `recycled`: for a recycling job, the name the reused file has now (its old name if the
    /// rename did not happen, the new one if it did), so a failed attempt loses no file.
    Prepared {
        seq: u64,
        result: io::Result<D::File>,
        recycled: Option<String>,
    },
    Removed {
        name: String,
        result: io::Result<()>,
    },
}

/// Performs a job against `disk`: writes are followed by a sync of the same file, and a prepared
/// segment's header is written and synced before it is reported ready. This is where every
/// durability point of the WAL's write path is: [`Wal::io_done`] marks a batch durable only after
/// this function's `sync` returned `Ok`.
pub async fn perform<D: Disk>(disk: &D, job: IoJob<D>) -> IoDone<D> {
    match job {
        IoJob::Write(write) => {
            let result = async {
                disk.write_at(&write.file, write.offset, write.buffer).await?;
                // The sync that makes this batch (and, by the one-write-in-flight rule, every
                // earlier one) durable. With O_DSYNC files it is a no-op: the write was durable.
                disk.sync(&write.file).await
            }
            .await;
            IoDone::Written {
                batch: write.batch,
                result,
            }
        }
        IoJob::Prepare(prepare) => {
            let mut recycled = prepare.recycle_from.clone();
            let result = async {
                let file = match &prepare.recycle_from {
                    Some(old) => {
                        if *old != prepare.name {
                            disk.rename(old, &prepare.name).await?;
                            recycled = Some(prepare.name.clone());
                        }
                        disk.open(&prepare.name).await?.0
                    }
                    None => disk.create(&prepare.name, prepare.segment_bytes).await?,
                };
                let mut header = disk.alloc_buffer(SEGMENT_HEADER_BYTES);
                encode_segment_header(
                    SegmentHeader {
                        seq: prepare.seq,
                        segment_bytes: prepare.segment_bytes,
                    },
                    header.as_mut(),
                );
                disk.write_at(&file, 0, header).await?;
                // The header must be durable before any batch lands in the segment: recovery
                // trusts batches only in segments with a valid header.
                disk.sync(&file).await?;
                Ok(file)
            }
            .await;
            IoDone::Prepared {
                seq: prepare.seq,
                result,
                recycled,
            }
        }
        IoJob::Remove { name } => {
            let result = disk.remove(&name).await;
            IoDone::Removed { name, result }
        }
    }
}

/// Where an entry's record lives, and its payload while cached.
#[derive(Clone, Debug)]
pub(crate) struct EntryLoc {
    pub(crate) term: u64,
    pub(crate) ticket: u64,
    /// Offset of the record within its batch.
    pub(crate) offset_in_batch: u32,
    pub(crate) payload_len: u32,
    pub(crate) entry_type: u8,
    pub(crate) cached: Option<Bytes>,
}

/// One group's log as the WAL knows it.
#[derive(Clone, Debug)]
pub(crate) struct GroupLog {
    /// Index of `entries[0]`; entries below it are compacted.
    pub(crate) first: u64,
    /// Term of the entry at `first - 1` (the compaction point), so raft can match against it.
    pub(crate) snapshot_term: u64,
    pub(crate) entries: VecDeque<EntryLoc>,
    pub(crate) hard_state: HardState,
    /// Engine metadata by the index it is as of ([`Wal::set_meta`]): every one above the
    /// compaction point, and the newest at or below it.
    pub(crate) metas: BTreeMap<u64, Bytes>,
    /// Recovery only: entries before this index were in segments already purged; a compaction
    /// record must cover them before recovery ends.
    pub(crate) hole_at: Option<u64>,
}

impl Default for GroupLog {
    fn default() -> Self {
        // Same starting point as raft-rs's MemStorage: an empty log whose dummy entry is (0, 0).
        GroupLog {
            first: 1,
            snapshot_term: 0,
            entries: VecDeque::new(),
            hard_state: HardState::default(),
            metas: BTreeMap::new(),
            hole_at: None,
        }
    }
}

impl GroupLog {
    pub(crate) fn last(&self) -> u64 {
        self.first + self.entries.len() as u64 - 1
    }

    /// Drops entries from `index` on; returns the cached bytes released.
    pub(crate) fn truncate_from(&mut self, index: u64) -> usize {
        let keep = index.saturating_sub(self.first) as usize;
        let mut released = 0;
        while self.entries.len() > keep {
            let loc = self.entries.pop_back().unwrap();
            released += loc.cached.map_or(0, |b| b.len());
        }
        released
    }

    /// Drops entries up to and including `index` and records its term; returns cached bytes
    /// released. `index` may be past the last entry (the log becomes empty).
    pub(crate) fn compact_through(&mut self, index: u64, term: u64) -> usize {
        let mut released = 0;
        while self.first <= index {
            match self.entries.pop_front() {
                Some(loc) => released += loc.cached.map_or(0, |b| b.len()),
                None => {
                    self.first = index + 1;
                    break;
                }
            }
            self.first += 1;
        }
        self.snapshot_term = term;
        // Metadata as of the compaction point stays; older records are superseded by it.
        if let Some(&newest) = self.metas.range(..=index).next_back().map(|(i, _)| i) {
            self.metas = self.metas.split_off(&newest);
        }
        if self.hole_at.is_some_and(|hole| hole <= self.first) {
            self.hole_at = None;
        }
        released
    }
}

/// A batch being filled or waiting for its write.
struct Batch<B> {
    /// `None` for a rollover checkpoint batch, which carries no caller's records.
    ticket: Option<u64>,
    buffer: B,
    len: usize,
    records: u32,
}

/// A segment in the live chain.
#[derive(Debug)]
pub(crate) struct Segment<F> {
    pub(crate) seq: u64,
    pub(crate) name: String,
    pub(crate) file: F,
    pub(crate) bytes: u64,
    /// Highest entry index each group has in this segment: the segment can go once every
    /// group's durable first index passes it.
    pub(crate) max_index: Map<u64, u64>,
}

/// Where the records of a ticket's batch went.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placement {
    pub(crate) ticket: u64,
    pub(crate) segment_seq: u64,
    pub(crate) offset: u64,
}

/// What a completed write makes durable.
#[derive(Debug)]
struct InFlight {
    batch: u64,
    ticket: Option<u64>,
    /// (group, first index) of compaction/reset records in the write.
    compactions: Vec<(u64, u64)>,
    checkpoint_of_segment: Option<u64>,
}

/// Counters for metrics and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    pub writes: u64,
    pub bytes_written: u64,
    pub segments_live: usize,
    pub segments_free: usize,
    pub segments_ready: usize,
    pub cache_bytes: usize,
    pub pending_bytes: usize,
    /// Segment preparations that failed (and were retried) since the WAL was opened.
    pub prepare_failures: u64,
}

/// One shard's write-ahead log. See the crate docs for the contract.
pub struct Wal<D: Disk> {
    pub(crate) disk: D,
    pub(crate) config: WalConfig,
    pub(crate) groups: BTreeMap<u64, GroupLog>,
    /// Segments holding live data, oldest first; the last is the one being written.
    pub(crate) segments: VecDeque<Segment<D::File>>,
    /// Prepared, empty segments to roll over into.
    pub(crate) ready: VecDeque<Segment<D::File>>,
    /// Purged segments awaiting recycling, oldest first, with their sizes.
    pub(crate) free: VecDeque<(String, u64)>,
    pub(crate) next_segment_seq: u64,
    /// Offset in the current segment where the next batch goes (block aligned).
    pub(crate) write_offset: u64,
    pub(crate) next_batch_number: u64,
    pub(crate) placements: VecDeque<Placement>,
    /// Per group, the hard state and compaction point as of the records placed so far: what a
    /// rollover checkpoint must restate.
    pub(crate) placed_hard_state: Map<u64, HardState>,
    pub(crate) placed_compaction: Map<u64, (u64, u64)>,
    /// Per group, the first index made durable by a compaction record: purge relies on these
    /// only.
    pub(crate) durable_first: Map<u64, u64>,
    /// Whether the current segment's checkpoint batch is durable (or none was needed).
    pub(crate) checkpoint_durable: bool,
    open: Option<Batch<D::Buffer>>,
    /// Commit-only hard states waiting for the next batch written anyway (see
    /// [`Wal::set_commit_lazily`]).
    lazy_commits: BTreeMap<u64, HardState>,
    sealed: VecDeque<Batch<D::Buffer>>,
    in_flight: Option<InFlight>,
    preparing: bool,
    /// A segment preparation to try again after it failed: its sequence and, when it recycled
    /// a purged segment, that file's current name.
    prepare_retry: Option<(u64, Option<String>)>,
    /// Failures of the preparation being retried, in a row (for the backoff), and the last one.
    prepare_failures_in_row: u32,
    prepare_error: Option<String>,
    pub(crate) next_ticket: u64,
    pub(crate) durable_ticket: u64,
    pub(crate) cache_bytes: usize,
    /// Entries in append order, for cache eviction: (group, index, ticket).
    pub(crate) cache_order: VecDeque<(u64, u64, u64)>,
    /// Cached entries taken off the front of `cache_order` because their group's floor pins
    /// them, per group: (index, ticket). They go back to the front when the floor passes them,
    /// so one group's unapplied entries never hold up eviction for the others.
    parked: Map<u64, BTreeSet<(u64, u64)>>,
    /// Per group, entries at or above this index are never evicted (the engine sets it to the
    /// first unapplied index: raft reads those synchronously).
    pub(crate) cache_floor: Map<u64, u64>,
    /// Per group, the ticket of its latest `Meta` record.
    meta_tickets: Map<u64, u64>,
    failure: Option<String>,
    stats: WalStats,
}

impl<D: Disk> std::fmt::Debug for Wal<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("groups", &self.groups.len())
            .field("segments", &self.segments.len())
            .field("durable_ticket", &self.durable_ticket)
            .field("next_ticket", &self.next_ticket)
            .field("failure", &self.failure)
            .finish()
    }
}

impl<D: Disk> Wal<D> {
    pub(crate) fn empty(disk: D, config: WalConfig) -> Wal<D> {
        Wal {
            disk,
            config,
            groups: BTreeMap::new(),
            segments: VecDeque::new(),
            ready: VecDeque::new(),
            free: VecDeque::new(),
            next_segment_seq: 1,
            write_offset: SEGMENT_HEADER_BYTES as u64,
            next_batch_number: 1,
            placements: VecDeque::new(),
            placed_hard_state: Map::default(),
            placed_compaction: Map::default(),
            durable_first: Map::default(),
            checkpoint_durable: true,
            open: None,
            lazy_commits: BTreeMap::new(),
            sealed: VecDeque::new(),
            in_flight: None,
            preparing: false,
            prepare_retry: None,
            prepare_failures_in_row: 0,
            prepare_error: None,
            next_ticket: 1,
            durable_ticket: 0,
            cache_bytes: 0,
            cache_order: VecDeque::new(),
            parked: Map::default(),
            cache_floor: Map::default(),
            meta_tickets: Map::default(),
            failure: None,
            stats: WalStats::default(),
        }
    }

    /// The disk this WAL writes to (a cheap handle), e.g. to execute a [`ReadPlan`].
    pub fn disk(&self) -> &D {
        &self.disk
    }

    pub fn config(&self) -> &WalConfig {
        &self.config
    }

    /// The cause of the failure that stopped this WAL, if any. A failed WAL refuses appends.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Why the last segment preparation failed, while it is being retried (`None` once one
    /// succeeds). Writes that need a new segment wait meanwhile; appends are still taken, so
    /// the caller's own limits (the engine's `Busy`) bound what accumulates.
    pub fn prepare_error(&self) -> Option<&str> {
        self.prepare_error.as_deref()
    }

    fn check_usable(&self, op: &'static str) -> Result<(), WalError> {
        match &self.failure {
            Some(cause) => Err(WalError::Failed {
                op,
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn group_mut(&mut self, group: u64) -> &mut GroupLog {
        self.groups.entry(group).or_default()
    }

    /// Appends entries to a group's log, replacing its tail from `entries[0].index` on (raft's
    /// conflict truncation). Returns once the entries are buffered: they are readable at once
    /// and durable when [`Wal::durable_ticket`] reaches the returned ticket.
    ///
    /// Panics (a caller bug) unless the indexes are consecutive and the first is within
    /// `first_index..=last_index + 1`.
    pub fn append(&mut self, group: u64, entries: &[Entry]) -> Result<Ticket, WalError> {
        self.check_usable("append")?;
        let Some(head) = entries.first() else {
            return Ok(Ticket(
                self.next_ticket.saturating_sub(1).max(self.durable_ticket),
            ));
        };
        let limit = self.config.payload_bytes_max();
        if let Some(big) = entries.iter().find(|e| e.payload.len() > limit) {
            return Err(WalError::TooLarge {
                bytes: big.payload.len(),
                limit,
            });
        }
        for pair in entries.windows(2) {
            assert_eq!(
                pair[1].index,
                pair[0].index + 1,
                "wal append: indexes not consecutive"
            );
        }
        self.flush_lazy_commits();
        let log = self.group_mut(group);
        assert!(
            head.index >= log.first && head.index <= log.last() + 1,
            "wal append: group {group} index {} outside {}..={}",
            head.index,
            log.first,
            log.last() + 1
        );
        let released = log.truncate_from(head.index);
        self.cache_bytes -= released;
        let mut ticket = 0;
        for entry in entries {
            let payload_len = entry.payload.len();
            let (t, offset) = self.reserve(record_bytes(payload_len));
            ticket = t;
            let batch = self.open.as_mut().unwrap();
            let record = &mut batch.buffer.as_mut()[offset..offset + record_bytes(payload_len)];
            encode_record_header(
                record,
                payload_len as u32,
                RecordKind::Entry,
                entry.entry_type,
                0,
                group,
                entry.index,
                entry.term,
            );
            record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_len].copy_from_slice(&entry.payload);
            record[RECORD_HEADER_BYTES + payload_len..].fill(0);
            stage_payload_crc(record);
            self.cache_bytes += payload_len;
            self.cache_order.push_back((group, entry.index, ticket));
            self.groups.get_mut(&group).unwrap().entries.push_back(EntryLoc {
                term: entry.term,
                ticket,
                offset_in_batch: offset as u32,
                payload_len: payload_len as u32,
                entry_type: entry.entry_type,
                cached: Some(entry.payload.clone()),
            });
        }
        Ok(Ticket(ticket))
    }

    /// Records a group's hard state. A change of only `commit` need not be made durable before
    /// acting on it (raft recomputes commit), so callers may skip waiting for the ticket then.
    pub fn set_hard_state(&mut self, group: u64, hard_state: HardState) -> Result<Ticket, WalError> {
        self.check_usable("set_hard_state")?;
        self.group_mut(group).hard_state = hard_state;
        let ticket = self.push_small_record(
            RecordKind::HardState,
            group,
            hard_state.commit,
            hard_state.term,
            &hard_state.vote.to_le_bytes(),
        );
        Ok(Ticket(ticket))
    }

    /// Records a hard state that differs from the group's current one only in `commit`,
    /// without causing a write of its own: it goes into the open batch if there is one, else
    /// into the next batch written for any other reason. A crash before then loses it, which is
    /// safe: raft never needs the commit index to be durable (a restarted node relearns it from
    /// the leader, and the engine raises it to the state machine's durable index); only term
    /// and vote must be durable before a message depends on them. This saves one sync per
    /// commit advance on every node when few requests are in flight.
    pub fn set_commit_lazily(&mut self, group: u64, hard_state: HardState) -> Result<(), WalError> {
        self.check_usable("set_commit_lazily")?;
        let log = self.group_mut(group);
        assert!(
            log.hard_state.term == hard_state.term && log.hard_state.vote == hard_state.vote,
            "wal set_commit_lazily: group {group} changes term or vote"
        );
        log.hard_state = hard_state;
        self.lazy_commits.insert(group, hard_state);
        if self.open.is_some() {
            self.flush_lazy_commits();
        }
        Ok(())
    }

    /// Puts waiting commit-only hard states into the open (or a new) batch.
    fn flush_lazy_commits(&mut self) {
        for (group, hard_state) in std::mem::take(&mut self.lazy_commits) {
            self.push_small_record(
                RecordKind::HardState,
                group,
                hard_state.commit,
                hard_state.term,
                &hard_state.vote.to_le_bytes(),
            );
        }
    }

    /// Discards a group's entries up to and including `through` (which must not be past the last
    /// entry). Segments are recycled once every group has durably compacted past them.
    pub fn compact(&mut self, group: u64, through: u64) -> Result<Ticket, WalError> {
        self.check_usable("compact")?;
        let log = self.group_mut(group);
        assert!(
            through <= log.last(),
            "wal compact: group {group} through {through} past last {}",
            log.last()
        );
        if through < log.first {
            return Ok(Ticket(
                self.next_ticket.saturating_sub(1).max(self.durable_ticket),
            ));
        }
        let term = log.entries[(through - log.first) as usize].term;
        let released = log.compact_through(through, term);
        self.cache_bytes -= released;
        Ok(Ticket(self.push_small_record(
            RecordKind::Compact,
            group,
            through,
            term,
            &[],
        )))
    }

    /// Discards a group's whole log: a snapshot at (`index`, `term`) was installed and the log
    /// continues at `index + 1`.
    pub fn reset(&mut self, group: u64, index: u64, term: u64) -> Result<Ticket, WalError> {
        self.check_usable("reset")?;
        let log = self.group_mut(group);
        let mut released = log.truncate_from(0);
        log.first = index + 1;
        released += log.compact_through(index, term);
        self.cache_bytes -= released;
        Ok(Ticket(self.push_small_record(
            RecordKind::Reset,
            group,
            index,
            term,
            &[],
        )))
    }

    /// Records engine metadata of `group` as of `index` (opaque bytes: the engine stores the
    /// membership there, and a snapshot's term before installing it). Kept until a compaction
    /// point passes a newer one, and restated at every segment rollover.
    pub fn set_meta(&mut self, group: u64, index: u64, payload: &[u8]) -> Result<Ticket, WalError> {
        self.check_usable("set_meta")?;
        if payload.len() > META_BYTES_MAX {
            return Err(WalError::MetaTooLarge {
                bytes: payload.len(),
                limit: META_BYTES_MAX,
            });
        }
        self.group_mut(group)
            .metas
            .insert(index, Bytes::copy_from_slice(payload));
        let ticket = self.push_small_record(RecordKind::Meta, group, index, 0, payload);
        self.meta_tickets.insert(group, ticket);
        Ok(Ticket(ticket))
    }

    /// The newest metadata of `group` as of `index` or earlier, with its index.
    pub fn meta_at(&self, group: u64, index: u64) -> Option<(u64, Bytes)> {
        let log = self.log(group)?;
        let (&at, bytes) = log.metas.range(..=index).next_back()?;
        Some((at, bytes.clone()))
    }

    /// Every retained metadata record of `group`, oldest first.
    pub fn metas(&self, group: u64) -> Vec<(u64, Bytes)> {
        self.log(group)
            .map(|l| l.metas.iter().map(|(&i, b)| (i, b.clone())).collect())
            .unwrap_or_default()
    }

    /// Whether `group`'s latest metadata record is durable.
    pub fn meta_durable(&self, group: u64) -> bool {
        self.meta_tickets
            .get(&group)
            .is_none_or(|&t| t <= self.durable_ticket)
    }

    fn push_small_record(
        &mut self,
        kind: RecordKind,
        group: u64,
        index: u64,
        term: u64,
        payload: &[u8],
    ) -> u64 {
        self.flush_lazy_commits();
        let bytes = record_bytes(payload.len());
        let (ticket, offset) = self.reserve(bytes);
        let batch = self.open.as_mut().unwrap();
        let record = &mut batch.buffer.as_mut()[offset..offset + bytes];
        encode_record_header(record, payload.len() as u32, kind, 0, 0, group, index, term);
        record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()].copy_from_slice(payload);
        record[RECORD_HEADER_BYTES + payload.len()..].fill(0);
        stage_payload_crc(record);
        ticket
    }

    /// Reserves `bytes` in the open batch (sealing it and opening another when full); returns
    /// the batch's ticket and the record's offset in it.
    fn reserve(&mut self, bytes: usize) -> (u64, usize) {
        if self
            .open
            .as_ref()
            .is_some_and(|b| b.len + bytes > self.config.batch_bytes_max)
        {
            let full = self.open.take().unwrap();
            self.sealed.push_back(full);
        }
        if self.open.is_none() {
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            self.open = Some(self.new_batch(Some(ticket), self.config.batch_bytes_max));
        }
        let batch = self.open.as_mut().unwrap();
        let offset = batch.len;
        batch.len += bytes;
        batch.records += 1;
        (batch.ticket.unwrap(), offset)
    }

    fn new_batch(&self, ticket: Option<u64>, capacity: usize) -> Batch<D::Buffer> {
        // Every byte up to the padded length is written: record headers, payloads and their
        // padding by the appends, the batch header and the tail padding by `place`.
        let buffer = self.disk.alloc_buffer_uninit(align_up(capacity, BLOCK_BYTES));
        Batch {
            ticket,
            buffer,
            // Room for the batch header record, written when the batch is placed.
            len: RECORD_HEADER_BYTES,
            records: 0,
        }
    }

    /// Whether a full batch is sealed and waiting for its write: the next write is ready, so
    /// there is nothing to gain by letting more appends in first.
    pub fn has_sealed(&self) -> bool {
        !self.sealed.is_empty()
    }

    /// The highest ticket whose batch is durable.
    pub fn durable_ticket(&self) -> Ticket {
        Ticket(self.durable_ticket)
    }

    /// The ticket of the most recent append (durable or not).
    pub fn last_ticket(&self) -> Ticket {
        Ticket(self.next_ticket - 1)
    }

    /// Whether the next segment should be ready soon and is not: none is prepared and the
    /// current one is at least half written (or there is none). A disk that paces segment
    /// preparation (zero-filling a new file, so that it does not crowd the log's own writes out
    /// of the device) should then go at full speed.
    pub fn segment_needed_soon(&self) -> bool {
        self.ready.is_empty()
            && self
                .segments
                .back()
                .is_none_or(|s| self.write_offset.saturating_mul(2) >= s.bytes)
    }

    /// Whether appended records are waiting for a write or a write is in flight.
    pub fn has_pending(&self) -> bool {
        self.open.is_some() || !self.sealed.is_empty() || self.in_flight.is_some()
    }

    /// Bytes appended but not yet handed to the disk: the engine's backpressure signal.
    pub fn pending_bytes(&self) -> usize {
        self.open.as_ref().map_or(0, |b| b.len) + self.sealed.iter().map(|b| b.len).sum::<usize>()
    }

    /// Whether a write is outstanding.
    pub fn write_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    pub fn stats(&self) -> WalStats {
        WalStats {
            segments_live: self.segments.len(),
            segments_free: self.free.len(),
            segments_ready: self.ready.len(),
            cache_bytes: self.cache_bytes,
            pending_bytes: self.pending_bytes(),
            ..self.stats
        }
    }

    /// The next IO to perform, if any. At most one write is outstanding; the open batch is
    /// sealed only when no write is, so appends keep accumulating while the disk works (group
    /// commit). Segment preparation runs beside writes.
    pub fn poll_io(&mut self) -> Option<IoJob<D>> {
        if self.failure.is_some() {
            return None;
        }
        let stale_size = self
            .free
            .front()
            .is_some_and(|(_, bytes)| *bytes != self.config.segment_bytes);
        if stale_size || self.free.len() > self.config.segments_recycled_max {
            // Recycle only segments of the configured size; keep a bounded pool.
            return Some(IoJob::Remove {
                name: self.free.pop_front().unwrap().0,
            });
        }
        if !self.preparing && self.ready.is_empty() {
            self.preparing = true;
            let (seq, recycled, delay) = match self.prepare_retry.take() {
                // The same sequence again: nothing was written into the segment, and a recycled
                // file keeps the name it got. Every attempt rewrites the header and syncs it
                // again, so a failed sync is never trusted to have kept earlier bytes.
                Some((seq, recycled)) => (seq, recycled, prepare_retry_delay(self.prepare_failures_in_row)),
                None => {
                    let seq = self.next_segment_seq;
                    self.next_segment_seq += 1;
                    (seq, None, std::time::Duration::ZERO)
                }
            };
            return Some(IoJob::Prepare(PrepareJob {
                seq,
                name: segment_file_name(seq),
                recycle_from: recycled.or_else(|| self.free.pop_front().map(|(name, _)| name)),
                segment_bytes: self.config.segment_bytes,
                delay,
            }));
        }
        if self.in_flight.is_some() {
            return None;
        }
        if self.sealed.is_empty() {
            let open = self.open.take()?;
            self.sealed.push_back(open);
        }
        let needed = align_up(self.sealed[0].len, BLOCK_BYTES) as u64;
        let room = self
            .segments
            .back()
            .map_or(0, |s| s.bytes.saturating_sub(self.write_offset));
        if needed > room {
            // Roll over. The next segment must be prepared; if it is not yet, the write waits
            // for the Prepare job (which is already running).
            let next = self.ready.pop_front()?;
            self.segments.push_back(next);
            self.write_offset = SEGMENT_HEADER_BYTES as u64;
            let checkpoint = self.checkpoint_batch();
            if self.failure.is_some() {
                return None;
            }
            if let Some(checkpoint) = checkpoint {
                self.checkpoint_durable = false;
                return Some(self.place(checkpoint));
            }
            self.checkpoint_durable = true;
        }
        let batch = self.sealed.pop_front().unwrap();
        Some(self.place(batch))
    }

    /// Builds the records that restate every group's hard state and compaction point at the
    /// start of a new segment, so that older segments can be recycled without losing them.
    fn checkpoint_batch(&mut self) -> Option<Batch<D::Buffer>> {
        let mut groups: Vec<u64> = self
            .placed_hard_state
            .keys()
            .chain(self.placed_compaction.keys())
            .copied()
            .chain(
                self.groups
                    .iter()
                    .filter(|(_, l)| !l.metas.is_empty())
                    .map(|(&g, _)| g),
            )
            .collect();
        groups.sort_unstable();
        groups.dedup();
        if groups.is_empty() {
            return None;
        }
        let small = record_bytes(8);
        let meta_bytes: usize = self
            .groups
            .values()
            .flat_map(|l| l.metas.values())
            .map(|m| record_bytes(m.len()))
            .sum();
        let capacity = RECORD_HEADER_BYTES + groups.len() * (small + record_bytes(0)) + meta_bytes;
        // The checkpoint and one full batch must fit in a fresh segment, or every rollover would
        // need another.
        let needed = align_up(capacity, BLOCK_BYTES) + self.config.batch_bytes_max;
        if needed as u64 > self.config.segment_bytes - SEGMENT_HEADER_BYTES as u64 {
            self.fail(format!(
                "a rollover checkpoint of {} groups ({capacity} bytes) plus one batch does not fit \
                 in a segment of {} bytes: raise wal.segment_bytes",
                groups.len(),
                self.config.segment_bytes
            ));
            return None;
        }
        let mut batch = self.new_batch(None, capacity);
        for group in groups {
            if let Some(&(index, term)) = self.placed_compaction.get(&group) {
                let at = batch.len;
                let record = &mut batch.buffer.as_mut()[at..at + record_bytes(0)];
                encode_record_header(record, 0, RecordKind::Compact, 0, 0, group, index, term);
                batch.len += record_bytes(0);
                batch.records += 1;
            }
            if let Some(hard_state) = self.placed_hard_state.get(&group) {
                let at = batch.len;
                let record = &mut batch.buffer.as_mut()[at..at + small];
                encode_record_header(
                    record,
                    8,
                    RecordKind::HardState,
                    0,
                    0,
                    group,
                    hard_state.commit,
                    hard_state.term,
                );
                record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + 8]
                    .copy_from_slice(&hard_state.vote.to_le_bytes());
                record[RECORD_HEADER_BYTES + 8..].fill(0);
                stage_payload_crc(record);
                batch.len += small;
                batch.records += 1;
            }
            // Metadata is restated as the engine last set it (it only ever describes committed
            // state, so restating a record whose own batch is not yet durable is harmless).
            if let Some(log) = self.groups.get(&group) {
                for (&index, meta) in &log.metas {
                    let at = batch.len;
                    let bytes = record_bytes(meta.len());
                    let record = &mut batch.buffer.as_mut()[at..at + bytes];
                    encode_record_header(record, meta.len() as u32, RecordKind::Meta, 0, 0, group, index, 0);
                    record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + meta.len()].copy_from_slice(meta);
                    record[RECORD_HEADER_BYTES + meta.len()..].fill(0);
                    stage_payload_crc(record);
                    batch.len += bytes;
                    batch.records += 1;
                }
            }
        }
        Some(batch)
    }

    /// Assigns the batch its number and place in the current segment, seals every record's crc
    /// (which mixes in the segment sequence) and turns it into a write job.
    fn place(&mut self, mut batch: Batch<D::Buffer>) -> IoJob<D> {
        let number = self.next_batch_number;
        self.next_batch_number += 1;
        let segment = self.segments.back_mut().expect("place: no current segment");
        let seq = segment.seq;
        let offset = self.write_offset;
        let batch_len = batch.len;
        let padded = align_up(batch_len, BLOCK_BYTES);
        let mut compactions = Vec::new();
        {
            let bytes = batch.buffer.as_mut();
            encode_record_header(
                bytes,
                0,
                RecordKind::BatchHeader,
                0,
                number,
                0,
                batch_len as u64,
                batch.records as u64,
            );
            seal_record(seq, bytes);
            let seed = record_crc_seed(seq);
            let mut at = RECORD_HEADER_BYTES;
            while at < batch_len {
                let record = &mut bytes[at..];
                record[16..24].copy_from_slice(&number.to_le_bytes());
                // Every record's payload crc was staged when it was written into the batch.
                seal_staged_record(seed, record);
                // Our own bytes, just sealed: read the fields without a second crc pass.
                let header = peek_own_record_header(record);
                debug_assert!(decode_record(seq, record).is_ok(), "a sealed record verifies");
                match header.kind {
                    RecordKind::Entry => {
                        let max = segment.max_index.entry(header.group).or_insert(0);
                        *max = (*max).max(header.index);
                    }
                    RecordKind::HardState => {
                        let payload = &record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + 8];
                        let vote = u64::from_le_bytes(payload.try_into().unwrap());
                        self.placed_hard_state.insert(
                            header.group,
                            HardState {
                                term: header.term,
                                vote,
                                commit: header.index,
                            },
                        );
                    }
                    RecordKind::Compact | RecordKind::Reset => {
                        self.placed_compaction
                            .insert(header.group, (header.index, header.term));
                        compactions.push((header.group, header.index + 1));
                    }
                    RecordKind::Meta => {}
                    RecordKind::BatchHeader => unreachable!("place: nested batch header"),
                }
                at += record_bytes(header.payload_len as usize);
            }
            bytes[batch_len..padded].fill(0);
        }
        self.disk.truncate_buffer(&mut batch.buffer, padded);
        if let Some(ticket) = batch.ticket {
            self.placements.push_back(Placement {
                ticket,
                segment_seq: seq,
                offset,
            });
        }
        self.write_offset += padded as u64;
        self.stats.writes += 1;
        self.stats.bytes_written += padded as u64;
        self.in_flight = Some(InFlight {
            batch: number,
            ticket: batch.ticket,
            compactions,
            checkpoint_of_segment: batch.ticket.is_none().then_some(seq),
        });
        IoJob::Write(WriteJob {
            file: segment.file.clone(),
            name: segment.name.clone(),
            offset,
            buffer: batch.buffer,
            batch: number,
        })
    }

    /// Takes the outcome of a job from [`Wal::poll_io`]. A failed write or segment preparation
    /// fails the WAL: the returned error says why, and every later append returns it too. The
    /// exception is a preparation that ran out of space (ENOSPC, EDQUOT): it is returned (for
    /// the runner to report) and retried, see [`Wal::prepare_error`]. A failed removal is
    /// returned and costs only space.
    pub fn io_done(&mut self, done: IoDone<D>) -> Result<(), WalError> {
        match done {
            IoDone::Written { batch, result } => {
                let in_flight = self.in_flight.take().expect("io_done: no write in flight");
                assert_eq!(in_flight.batch, batch, "io_done: completion for another batch");
                if let Err(error) = result {
                    let name = self.segments.back().map_or(String::new(), |s| s.name.clone());
                    return Err(self.fail_io("write+sync", name, error));
                }
                if let Some(ticket) = in_flight.ticket {
                    debug_assert!(ticket > self.durable_ticket);
                    self.durable_ticket = ticket;
                }
                for (group, first) in in_flight.compactions {
                    let durable = self.durable_first.entry(group).or_insert(0);
                    *durable = (*durable).max(first);
                }
                if in_flight.checkpoint_of_segment.is_some() {
                    self.checkpoint_durable = true;
                }
                self.evict_cache();
                self.purge();
                Ok(())
            }
            IoDone::Prepared {
                seq,
                result,
                recycled,
            } => {
                self.preparing = false;
                match result {
                    Ok(file) => {
                        self.prepare_failures_in_row = 0;
                        self.prepare_error = None;
                        self.ready.push_back(Segment {
                            seq,
                            name: segment_file_name(seq),
                            file,
                            bytes: self.config.segment_bytes,
                            max_index: Map::default(),
                        });
                        Ok(())
                    }
                    // Out of space is not a failure of the WAL: no acknowledged byte depends on
                    // a segment being prepared, and space comes back (an operator frees some, a
                    // purge lets a segment be recycled). Writes that need the segment wait; the
                    // preparation is retried with a backoff. Any other error (EIO, a vanished
                    // directory) means a sick disk: the WAL fails and its shard stops, so that
                    // healthy nodes take over rather than this one limp on.
                    Err(error) if is_out_of_space(&error) => {
                        self.prepare_failures_in_row = self.prepare_failures_in_row.saturating_add(1);
                        self.stats.prepare_failures += 1;
                        self.prepare_retry = Some((seq, recycled));
                        let error = WalError::io("prepare segment", segment_file_name(seq), error);
                        self.prepare_error = Some(error.to_string());
                        Err(error)
                    }
                    Err(error) => Err(self.fail_io("prepare segment", segment_file_name(seq), error)),
                }
            }
            IoDone::Removed { name, result } => match result {
                Ok(()) => Ok(()),
                // A segment that could not be deleted wastes space but loses nothing: keep going.
                Err(error) => Err(WalError::io("remove segment", name, error)),
            },
        }
    }

    fn fail_io(&mut self, op: &'static str, file: String, error: io::Error) -> WalError {
        self.fail(format!("{op} {file}: {error}"));
        WalError::io(op, file, error)
    }

    fn fail(&mut self, cause: String) {
        if self.failure.is_none() {
            self.failure = Some(cause);
        }
    }

    /// Drops cached payloads of durable entries, oldest first, while over the cache budget.
    pub(crate) fn evict_cache(&mut self) {
        while self.cache_bytes > self.config.cache_bytes_max {
            let Some(&(group, index, ticket)) = self.cache_order.front() else {
                break;
            };
            if ticket > self.durable_ticket {
                break; // not on disk yet: must stay readable from memory
            }
            if self.cache_floor.get(&group).is_some_and(|&floor| index >= floor) {
                // Not applied yet: raft will read it synchronously. Set it aside until the
                // group's floor passes it, and go on with the entries behind it.
                self.cache_order.pop_front();
                self.parked.entry(group).or_default().insert((index, ticket));
                continue;
            }
            self.cache_order.pop_front();
            let Some(log) = self.groups.get_mut(&group) else {
                continue;
            };
            if index < log.first || index > log.last() {
                continue;
            }
            let loc = &mut log.entries[(index - log.first) as usize];
            if loc.ticket == ticket {
                if let Some(bytes) = loc.cached.take() {
                    self.cache_bytes -= bytes.len();
                }
            }
        }
        // The queue also holds entries since dropped by truncation or compaction: shed those
        // at the front so it stays near the number of live entries.
        while let Some(&(group, index, ticket)) = self.cache_order.front() {
            let live = self.groups.get(&group).is_some_and(|log| {
                index >= log.first
                    && index <= log.last()
                    && log.entries[(index - log.first) as usize].ticket == ticket
            });
            if live {
                break;
            }
            self.cache_order.pop_front();
        }
    }

    /// Whether the entry cache holds more than its budget: entries pinned by
    /// [`Wal::set_cache_floor`] (or not yet durable) cannot be evicted.
    pub fn cache_over_budget(&self) -> bool {
        self.cache_bytes > self.config.cache_bytes_max
    }

    /// Keeps a group's entries from `index` on in the cache: raft-rs reads unapplied committed
    /// entries synchronously, so they must not need a disk read. Raise it as entries are applied.
    pub fn set_cache_floor(&mut self, group: u64, index: u64) {
        self.cache_floor.insert(group, index);
        if let Some(parked) = self.parked.get_mut(&group) {
            // Entries the floor no longer pins are the oldest cached: evictable first.
            let pinned = parked.split_off(&(index, 0));
            let released = std::mem::replace(parked, pinned);
            for (i, ticket) in released.into_iter().rev() {
                self.cache_order.push_front((group, i, ticket));
            }
            if parked.is_empty() {
                self.parked.remove(&group);
            }
        }
        self.evict_cache();
    }

    /// Puts entries read from disk (through a [`ReadPlan`]) back into the cache, so a retried
    /// synchronous read finds them. Entries that were replaced meanwhile are ignored.
    pub fn insert_cached(&mut self, group: u64, entries: &[Entry]) {
        let Some(log) = self.groups.get_mut(&group) else {
            return;
        };
        for entry in entries {
            if entry.index < log.first || entry.index > log.last() {
                continue;
            }
            let loc = &mut log.entries[(entry.index - log.first) as usize];
            if loc.term == entry.term
                && loc.cached.is_none()
                && loc.payload_len as usize == entry.payload.len()
            {
                loc.cached = Some(entry.payload.clone());
                self.cache_bytes += entry.payload.len();
                self.cache_order.push_back((group, entry.index, loc.ticket));
            }
        }
    }

    /// Moves the oldest segments whose entries every group has durably compacted to the free
    /// list. Only a prefix of the chain is purged, and only once the current segment's
    /// checkpoint is durable, so recovery always finds a contiguous chain that restates every
    /// group's hard state and compaction point.
    pub(crate) fn purge(&mut self) {
        if !self.checkpoint_durable {
            return;
        }
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let done = oldest
                .max_index
                .iter()
                .all(|(group, &max)| self.durable_first.get(group).is_some_and(|&first| first > max));
            if !done {
                break;
            }
            let segment = self.segments.pop_front().unwrap();
            while self
                .placements
                .front()
                .is_some_and(|p| p.segment_seq == segment.seq)
            {
                self.placements.pop_front();
            }
            self.free.push_back((segment.name, segment.bytes));
        }
    }

    /// Groups that keep the oldest segment alive, with the index each must compact through to
    /// release it. Empty when nothing can be purged by compaction.
    pub fn pinning_groups(&self) -> Vec<(u64, u64)> {
        self.pinning_groups_of(1)
    }

    /// [`Wal::pinning_groups`] for the `oldest` oldest segments (never the current one): each
    /// group with entries there not yet durably compacted, with the index it must compact
    /// through to release them all.
    pub fn pinning_groups_of(&self, oldest: usize) -> Vec<(u64, u64)> {
        let count = oldest.min(self.segments.len().saturating_sub(1));
        let mut pins: BTreeMap<u64, u64> = BTreeMap::new();
        for segment in self.segments.iter().take(count) {
            for (&group, &max) in &segment.max_index {
                if self.durable_first.get(&group).is_none_or(|&first| first <= max) {
                    let pin = pins.entry(group).or_insert(0);
                    *pin = (*pin).max(max);
                }
            }
        }
        pins.into_iter().collect()
    }

    /// Groups with any state in this WAL.
    pub fn groups(&self) -> impl Iterator<Item = u64> + '_ {
        self.groups.keys().copied()
    }

    fn log(&self, group: u64) -> Option<&GroupLog> {
        self.groups.get(&group)
    }

    /// First retained index (raft-rs `first_index`). 1 for a group the WAL has not seen.
    pub fn first_index(&self, group: u64) -> u64 {
        self.log(group).map_or(1, |l| l.first)
    }

    /// Last index (raft-rs `last_index`); `first_index - 1` when the log is empty.
    pub fn last_index(&self, group: u64) -> u64 {
        self.log(group).map_or(0, |l| l.last())
    }

    pub fn hard_state(&self, group: u64) -> HardState {
        self.log(group).map_or_else(HardState::default, |l| l.hard_state)
    }

    /// The term of entry `index`, including the compaction point `first_index - 1`. Never
    /// touches the disk.
    pub fn term(&self, group: u64, index: u64) -> Result<u64, ReadError> {
        let default = GroupLog::default();
        let log = self.log(group).unwrap_or(&default);
        if index + 1 == log.first {
            return Ok(log.snapshot_term);
        }
        if index < log.first {
            return Err(ReadError::Compacted { group, index });
        }
        if index > log.last() {
            return Err(ReadError::Unavailable { group, index });
        }
        Ok(log.entries[(index - log.first) as usize].term)
    }

    fn check_range(&self, group: u64, lo: u64, hi: u64) -> Result<(), ReadError> {
        assert!(lo <= hi, "wal entries: lo {lo} > hi {hi}");
        if lo < self.first_index(group) {
            return Err(ReadError::Compacted { group, index: lo });
        }
        if hi > self.last_index(group) + 1 {
            return Err(ReadError::Unavailable { group, index: hi - 1 });
        }
        Ok(())
    }

    /// Entries `lo..hi` from the cache, raft-rs style: the total payload stays within
    /// `max_bytes` except that at least one entry is returned. `NotCached` means some entry must
    /// be read from disk: use [`Wal::read_plan`].
    pub fn entries(
        &self,
        group: u64,
        lo: u64,
        hi: u64,
        max_bytes: Option<u64>,
    ) -> Result<Vec<Entry>, ReadError> {
        self.check_range(group, lo, hi)?;
        let log = &self.groups[&group];
        let mut out = Vec::new();
        let mut total = 0u64;
        for index in lo..hi {
            let loc = &log.entries[(index - log.first) as usize];
            total += loc.payload_len as u64;
            if !out.is_empty() && max_bytes.is_some_and(|max| total > max) {
                break;
            }
            let Some(payload) = loc.cached.clone() else {
                return Err(ReadError::NotCached { group, index });
            };
            out.push(Entry {
                index,
                term: loc.term,
                entry_type: loc.entry_type,
                payload,
            });
        }
        Ok(out)
    }

    /// Like [`Wal::entries`] but for entries that may need disk reads: the plan holds what is
    /// cached and where the rest lives; [`ReadPlan::execute`] reads and verifies it.
    pub fn read_plan(
        &self,
        group: u64,
        lo: u64,
        hi: u64,
        max_bytes: Option<u64>,
    ) -> Result<ReadPlan<D::File>, ReadError> {
        self.check_range(group, lo, hi)?;
        let log = &self.groups[&group];
        let mut items = Vec::new();
        let mut total = 0u64;
        for index in lo..hi {
            let loc = &log.entries[(index - log.first) as usize];
            total += loc.payload_len as u64;
            if !items.is_empty() && max_bytes.is_some_and(|max| total > max) {
                break;
            }
            let source = match &loc.cached {
                Some(payload) => PlanSource::Cached(payload.clone()),
                None => {
                    let placement = self.placement(loc.ticket);
                    let segment = self
                        .segments
                        .iter()
                        .find(|s| s.seq == placement.segment_seq)
                        .expect("read_plan: an uncached entry's segment is live");
                    PlanSource::Disk {
                        file: segment.file.clone(),
                        name: segment.name.clone(),
                        segment_seq: segment.seq,
                        offset: placement.offset + loc.offset_in_batch as u64,
                    }
                }
            };
            items.push(PlanItem {
                index,
                term: loc.term,
                entry_type: loc.entry_type,
                payload_len: loc.payload_len,
                source,
            });
        }
        Ok(ReadPlan { group, items })
    }

    fn placement(&self, ticket: u64) -> Placement {
        let at = self.placements.partition_point(|p| p.ticket < ticket);
        let placement = self.placements[at];
        assert_eq!(placement.ticket, ticket, "placement of a durable entry is known");
        placement
    }
}

/// Entries to read, some from memory and some from disk.
#[derive(Debug)]
pub struct ReadPlan<F> {
    group: u64,
    items: Vec<PlanItem<F>>,
}

#[derive(Debug)]
struct PlanItem<F> {
    index: u64,
    term: u64,
    entry_type: u8,
    payload_len: u32,
    source: PlanSource<F>,
}

#[derive(Debug)]
enum PlanSource<F> {
    Cached(Bytes),
    Disk {
        file: F,
        name: String,
        segment_seq: u64,
        offset: u64,
    },
}

impl<F: Clone> ReadPlan<F> {
    /// How many entries must come from disk.
    pub fn disk_reads(&self) -> usize {
        self.items
            .iter()
            .filter(|i| matches!(i.source, PlanSource::Disk { .. }))
            .count()
    }

    /// How many reads [`ReadPlan::execute`] issues: records of one segment close together
    /// share a read (see [`READ_GAP_MAX`]).
    pub fn disk_read_calls(&self) -> usize {
        self.reads().len()
    }

    /// The reads covering the plan's disk items, in item order: `(first item, items, offset,
    /// len)`. A read grows over the next disk record while that record is in the same segment,
    /// starts at most [`READ_GAP_MAX`] bytes after the read's end, and keeps the read within
    /// [`READ_SPAN_MAX`] (a single record larger than that is read alone).
    fn reads(&self) -> Vec<(usize, usize, u64, usize)> {
        let mut reads: Vec<(usize, usize, u64, usize)> = Vec::new();
        let mut last: Option<(u64, usize)> = None; // (segment, index into reads)
        for (at, item) in self.items.iter().enumerate() {
            let PlanSource::Disk {
                segment_seq, offset, ..
            } = &item.source
            else {
                continue;
            };
            let len = record_bytes(item.payload_len as usize) as u64;
            if let Some((seq, r)) = last {
                let (first, count, start, span) = &mut reads[r];
                let end = *start + *span as u64;
                if seq == *segment_seq
                    && *offset >= end
                    && *offset - end <= READ_GAP_MAX as u64
                    && *offset + len - *start <= READ_SPAN_MAX as u64
                {
                    *span = (*offset + len - *start) as usize;
                    *count = at + 1 - *first;
                    continue;
                }
            }
            reads.push((at, 1, *offset, len as usize));
            last = Some((*segment_seq, reads.len() - 1));
        }
        reads
    }

    /// Reads the planned entries, verifying each record's checksum and identity. Records of
    /// one segment close together come back in one read (a lagging follower's catch-up reads
    /// a run of one group's entries, interleaved with the other groups' records of the same
    /// batches), so catch-up costs the device a few large reads rather than one per entry.
    pub async fn execute<D: Disk<File = F>>(self, disk: &D) -> Result<Vec<Entry>, WalError> {
        let reads = self.reads();
        let mut buffers = Vec::with_capacity(reads.len());
        for &(first, _, offset, len) in &reads {
            let PlanSource::Disk { file, name, .. } = &self.items[first].source else {
                unreachable!("reads start at disk items");
            };
            let bytes = disk
                .read_at(file, offset, len)
                .await
                .map_err(|e| WalError::io("read entry", name.clone(), e))?;
            buffers.push(bytes);
        }
        // Which read holds each disk item.
        let mut read_of = vec![usize::MAX; self.items.len()];
        for (r, &(first, count, _, _)) in reads.iter().enumerate() {
            for slot in &mut read_of[first..first + count] {
                *slot = r;
            }
        }
        let mut out = Vec::with_capacity(self.items.len());
        for (at, item) in self.items.into_iter().enumerate() {
            let payload = match item.source {
                PlanSource::Cached(bytes) => bytes,
                PlanSource::Disk {
                    name,
                    segment_seq,
                    offset,
                    ..
                } => {
                    let r = read_of[at];
                    let bytes: &[u8] = &buffers[r];
                    let from = (offset - reads[r].2) as usize;
                    let len = record_bytes(item.payload_len as usize);
                    let bad = |reason: String| WalError::BadRead {
                        group: self.group,
                        index: item.index,
                        file: name.clone(),
                        offset,
                        reason,
                    };
                    let Some(record) = bytes.get(from..from + len) else {
                        return Err(bad(format!(
                            "read ended at {} of {len} bytes",
                            bytes.len().saturating_sub(from)
                        )));
                    };
                    let (header, payload) =
                        decode_record(segment_seq, record).map_err(|f| bad(f.to_string()))?;
                    if header.kind != RecordKind::Entry
                        || header.group != self.group
                        || header.index != item.index
                        || header.term != item.term
                    {
                        return Err(bad(format!(
                            "record is {:?} group {} index {} term {}",
                            header.kind, header.group, header.index, header.term
                        )));
                    }
                    Bytes::copy_from_slice(payload)
                }
            };
            out.push(Entry {
                index: item.index,
                term: item.term,
                entry_type: item.entry_type,
                payload,
            });
        }
        Ok(out)
    }
}

/// Largest gap between two records of a [`ReadPlan`] that one read spans rather than
/// splitting in two: reading 256 KiB more costs a device less than another round trip (the
/// probe on this project's VM: a 64 KiB read-sized write round ~240 us, 1 MiB ~1.5 ms).
pub const READ_GAP_MAX: usize = 256 << 10;

/// Largest read of a [`ReadPlan`] covering several records (a record larger than this is read
/// alone): bounds the memory a catch-up read holds beside the entries it returns.
pub const READ_SPAN_MAX: usize = 2 << 20;
