//! Opening a WAL: scan the segments, rebuild the indexes, truncate a torn tail, refuse to start on
//! corruption. The decision table is in `docs/wal-format.md` ("Recovery"); each row has a test in
//! `tests/recovery.rs`.
//!
//! The chain walk: segments are read in sequence order; batches must follow each other with
//! consecutive numbers, each at the block-aligned end of the previous one, or at the start of the
//! next segment (rollover). The walk stops at the first place where neither holds. Because the WAL
//! keeps one write in flight and starts the next only after a sync, the only batch that can be
//! damaged without corruption is the one being written at the crash: the batch numbered
//! `last + 1`, at the stop position. Any valid batch header numbered beyond `last` found *after*
//! the stop position proves a later write happened, so the damage is corruption, not a tear.

use std::collections::HashMap;

use bytes::Bytes;

use crate::disk::Disk;
use crate::error::WalError;
use crate::format::{
    align_up, decode_record, decode_segment_header, parse_segment_file_name, peek_own_record_header,
    record_bytes, RecordKind, BLOCK_BYTES, RECORD_HEADER_BYTES, SEGMENT_BYTES_MIN, SEGMENT_HEADER_BYTES,
};
use crate::wal::{EntryLoc, HardState, Map, Placement, Segment, Wal, WalConfig};

/// A segment file as found at open (its body is read one segment at a time, so recovery holds
/// at most one segment in memory).
struct Image<F> {
    seq: u64,
    name: String,
    file: F,
    size: u64,
    /// Why the header is not usable, if it is not.
    header_fault: Option<String>,
}

async fn load<D: Disk>(disk: &D, image: &Image<D::File>) -> Result<D::ReadBuf, WalError> {
    let bytes = disk
        .read_at(&image.file, 0, image.size as usize)
        .await
        .map_err(|e| WalError::io("read", image.name.clone(), e))?;
    if bytes.len() as u64 != image.size {
        return Err(WalError::io(
            "read",
            image.name.clone(),
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("short read: {} of {} bytes", bytes.len(), image.size),
            ),
        ));
    }
    Ok(bytes)
}

/// A fully valid batch found by the walk.
struct ScannedBatch {
    number: u64,
    len: usize,
    /// Offsets (within the segment) of the batch's records after its header.
    records: Vec<usize>,
}

enum BatchFault {
    /// No batch header numbered as expected here (end of data, or damage to the header).
    NoHeader(String),
    /// The header is valid but the batch is not (a torn write, or damage).
    BadBody { offset: u64, reason: String },
}

fn scan_batch(seq: u64, bytes: &[u8], pos: usize, expect: Option<u64>) -> Result<ScannedBatch, BatchFault> {
    let (header, _) = decode_record(seq, &bytes[pos..]).map_err(|f| BatchFault::NoHeader(f.to_string()))?;
    if header.kind != RecordKind::BatchHeader {
        return Err(BatchFault::NoHeader(format!(
            "{:?} record where a batch header belongs",
            header.kind
        )));
    }
    if let Some(expect) = expect {
        if header.batch != expect {
            return Err(BatchFault::NoHeader(format!(
                "batch header numbered {} where {expect} belongs",
                header.batch
            )));
        }
    }
    let len = header.index as usize;
    let count = header.term;
    if len < RECORD_HEADER_BYTES || len > bytes.len() - pos {
        return Err(BatchFault::BadBody {
            offset: pos as u64,
            reason: format!("batch length {len} does not fit the segment"),
        });
    }
    let end = pos + len;
    let mut at = pos + RECORD_HEADER_BYTES;
    let mut records = Vec::new();
    for _ in 0..count {
        let bad = |reason: String| BatchFault::BadBody {
            offset: at as u64,
            reason,
        };
        let (record, _) = decode_record(seq, &bytes[at..end]).map_err(|f| bad(f.to_string()))?;
        if record.kind == RecordKind::BatchHeader || record.batch != header.batch {
            return Err(bad(format!(
                "{:?} record of batch {} inside batch {}",
                record.kind, record.batch, header.batch
            )));
        }
        records.push(at);
        at += record_bytes(record.payload_len as usize);
    }
    if at != end {
        return Err(BatchFault::BadBody {
            offset: at as u64,
            reason: format!("records end at {at}, the batch header says {end}"),
        });
    }
    Ok(ScannedBatch {
        number: header.batch,
        len,
        records,
    })
}

/// Whether a valid batch header numbered beyond `last` sits at a block start in
/// `bytes[from..]`; returns its offset and number.
fn later_batch(seq: u64, bytes: &[u8], from: usize, last: Option<u64>) -> Option<(usize, u64)> {
    let mut pos = align_up(from.max(SEGMENT_HEADER_BYTES), BLOCK_BYTES);
    while pos + RECORD_HEADER_BYTES <= bytes.len() {
        if let Ok((header, _)) = decode_record(seq, &bytes[pos..]) {
            if header.kind == RecordKind::BatchHeader && last.is_none_or(|last| header.batch > last) {
                return Some((pos, header.batch));
            }
        }
        pos += BLOCK_BYTES;
    }
    None
}

impl<D: Disk> Wal<D> {
    /// Opens (or creates) the WAL in `disk`'s directory: replays every valid batch, truncates a
    /// torn tail, and returns an error naming segment and offset if it finds corruption. No
    /// recovered entry is cached: reads go through [`Wal::read_plan`]. See [`Wal::open_pinned`].
    pub async fn open(disk: D, config: WalConfig) -> Result<Wal<D>, WalError> {
        Wal::open_pinned(disk, config, HashMap::new()).await
    }

    /// [`Wal::open`], with the entries of each group in `floors` from its floor index on kept
    /// in the cache (and pinned there, as by [`Wal::set_cache_floor`]), whatever their size.
    ///
    /// This is for raft: after a crash, the entries a group had committed but its state
    /// machine had not yet made durable are applied again, and raft-rs reads them
    /// synchronously, so they must be in memory before raft starts. Nothing else is copied
    /// while replaying: the scan reads each segment once and keeps only these payloads.
    pub async fn open_pinned(
        disk: D,
        config: WalConfig,
        floors: HashMap<u64, u64>,
    ) -> Result<Wal<D>, WalError> {
        config.validate()?;
        let mut names: Vec<(u64, String)> = disk
            .list()
            .await
            .map_err(|e| WalError::io("list", "wal directory", e))?
            .into_iter()
            .filter_map(|name| parse_segment_file_name(&name).map(|seq| (seq, name)))
            .collect();
        names.sort_unstable();
        let mut images = Vec::with_capacity(names.len());
        for (seq, name) in names {
            let (file, size) = disk
                .open(&name)
                .await
                .map_err(|e| WalError::io("open", name.clone(), e))?;
            let head = (size as usize).min(SEGMENT_HEADER_BYTES);
            let bytes = disk
                .read_at(&file, 0, head)
                .await
                .map_err(|e| WalError::io("read", name.clone(), e))?;
            let header_fault = if bytes.len() != head {
                Some(format!("short read: {} of {head} bytes", bytes.len()))
            } else if size < SEGMENT_BYTES_MIN || size % BLOCK_BYTES as u64 != 0 {
                Some(format!("size {size} is not a whole number of blocks"))
            } else {
                match decode_segment_header(&bytes) {
                    Err(fault) => Some(fault.to_string()),
                    Ok(h) if h.seq != seq => Some(format!("header names sequence {}", h.seq)),
                    Ok(h) if h.segment_bytes != size => Some(format!(
                        "header says {} bytes, the file has {size}",
                        h.segment_bytes
                    )),
                    Ok(_) => None,
                }
            };
            images.push(Image {
                seq,
                name,
                file,
                size,
                header_fault,
            });
        }

        let mut wal = Wal::empty(disk.clone(), config);
        wal.cache_floor = floors.into_iter().collect();
        wal.next_segment_seq = images.last().map_or(1, |i| i.seq + 1);
        let mut last: Option<u64> = None;
        // Where the walk stopped: (image index, offset, why). `None` while the chain goes on.
        let mut stop: Option<(usize, usize, String)> = None;
        // Chain segments end at `tail_image` (exclusive when the chain is empty).
        let mut chain_len = 0;
        let mut tail_pos = SEGMENT_HEADER_BYTES;
        // The body of the segment the walk is in (the tail segment once the walk ends).
        let mut current: Option<D::ReadBuf> = None;
        let mut i = 0;
        while i < images.len() && stop.is_none() {
            if let Some(fault) = &images[i].header_fault {
                stop = Some((i, SEGMENT_HEADER_BYTES, format!("segment header: {fault}")));
                break;
            }
            chain_len = i + 1;
            wal.segments.push_back(Segment {
                seq: images[i].seq,
                name: images[i].name.clone(),
                file: images[i].file.clone(),
                bytes: images[i].size,
                max_index: Map::default(),
            });
            drop(current.take()); // free the previous segment before reading the next
            let bytes = load(&disk, &images[i]).await?;
            let mut pos = SEGMENT_HEADER_BYTES;
            loop {
                let image = &images[i];
                let fault = if pos + RECORD_HEADER_BYTES > bytes.len() {
                    BatchFault::NoHeader("segment full".into())
                } else {
                    match scan_batch(image.seq, &bytes, pos, last.map(|l| l + 1)) {
                        Ok(batch) => {
                            wal.replay_batch(image, &bytes, pos, &batch)?;
                            last = Some(batch.number);
                            pos = align_up(pos + batch.len, BLOCK_BYTES);
                            continue;
                        }
                        Err(fault) => fault,
                    }
                };
                tail_pos = pos;
                match fault {
                    BatchFault::BadBody { offset, reason } => {
                        stop = Some((
                            i,
                            pos,
                            format!("batch at {pos} damaged at offset {offset}: {reason}"),
                        ));
                    }
                    BatchFault::NoHeader(reason) => {
                        // Rollover: the next batch went to the start of the next segment.
                        let mut next_continues = false;
                        if let (Some(last), Some(next)) = (last, images.get(i + 1)) {
                            if next.header_fault.is_none() {
                                let head = disk
                                    .read_at(&next.file, SEGMENT_HEADER_BYTES as u64, BLOCK_BYTES)
                                    .await
                                    .map_err(|e| WalError::io("read", next.name.clone(), e))?;
                                next_continues = decode_record(next.seq, &head).is_ok_and(|(h, _)| {
                                    h.kind == RecordKind::BatchHeader && h.batch == last + 1
                                });
                            }
                        }
                        if !next_continues {
                            stop = Some((i, pos, reason));
                        }
                    }
                }
                break;
            }
            current = Some(bytes);
            i += 1;
        }

        // Corruption check: nothing valid and newer may follow the stop position.
        if let Some((stop_image, stop_pos, reason)) = &stop {
            for (j, image) in images.iter().enumerate().skip(*stop_image) {
                let from = if j == *stop_image {
                    stop_pos + BLOCK_BYTES
                } else {
                    0
                };
                let loaded;
                let bytes: &[u8] = match &current {
                    Some(bytes) if j + 1 == chain_len => bytes,
                    _ => {
                        loaded = load(&disk, image).await?;
                        &loaded
                    }
                };
                if let Some((offset, number)) = later_batch(image.seq, bytes, from, last) {
                    return Err(WalError::Corrupt {
                        file: images[*stop_image].name.clone(),
                        offset: *stop_pos as u64,
                        reason: format!(
                            "{reason}; yet batch {number} is valid at {}:{offset}, so this is not a torn tail",
                            image.name
                        ),
                    });
                }
            }
        }
        for (group, log) in &wal.groups {
            if let Some(hole) = log.hole_at {
                return Err(WalError::Corrupt {
                    file: wal.segments.front().map_or(String::new(), |s| s.name.clone()),
                    offset: SEGMENT_HEADER_BYTES as u64,
                    reason: format!(
                        "group {group}: entries before index {hole} are missing and no compaction covers them"
                    ),
                });
            }
        }

        // Truncate the torn tail for good: zero the block where the next batch goes, so a stale
        // batch header there can never be mistaken for a later batch.
        if chain_len > 0 {
            let tail = &images[chain_len - 1];
            let bytes = current.as_deref().expect("the tail segment is loaded");
            if (tail_pos + BLOCK_BYTES) as u64 <= tail.size
                && bytes[tail_pos..tail_pos + BLOCK_BYTES].iter().any(|&b| b != 0)
            {
                let zero = disk.alloc_buffer(BLOCK_BYTES);
                disk.write_at(&tail.file, tail_pos as u64, zero)
                    .await
                    .map_err(|e| WalError::io("truncate torn tail", tail.name.clone(), e))?;
                disk.sync(&tail.file)
                    .await
                    .map_err(|e| WalError::io("sync truncated tail", tail.name.clone(), e))?;
            }
        }
        drop(current);
        wal.write_offset = tail_pos as u64;
        wal.next_batch_number = last.map_or(1, |l| l + 1);

        // Segments after the chain: empty prepared ones are ready; ones with a bad header hold
        // nothing valid (checked above) and are removed so they never sit inside a later chain.
        for image in images.into_iter().skip(chain_len) {
            if image.header_fault.is_some() || image.size != wal.config.segment_bytes {
                disk.remove(&image.name)
                    .await
                    .map_err(|e| WalError::io("remove unused segment", image.name.clone(), e))?;
            } else {
                wal.ready.push_back(Segment {
                    seq: image.seq,
                    name: image.name,
                    file: image.file,
                    bytes: image.size,
                    max_index: Map::default(),
                });
            }
        }

        // Everything recovered is durable and placed.
        for (&group, log) in &wal.groups {
            wal.durable_first.insert(group, log.first);
            if log.hard_state != HardState::default() {
                wal.placed_hard_state.insert(group, log.hard_state);
            }
            // Any compaction point, including a reset to index 0 with a non-zero term, must be
            // restated by the next rollover checkpoint.
            if log.first > 1 || log.snapshot_term != 0 {
                wal.placed_compaction
                    .insert(group, (log.first - 1, log.snapshot_term));
            }
        }
        wal.checkpoint_durable = true;
        wal.evict_cache();
        wal.purge();
        Ok(wal)
    }

    fn replay_batch(
        &mut self,
        image: &Image<D::File>,
        bytes: &[u8],
        pos: usize,
        batch: &ScannedBatch,
    ) -> Result<(), WalError> {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.durable_ticket = ticket;
        self.placements.push_back(Placement {
            ticket,
            segment_seq: image.seq,
            offset: pos as u64,
        });
        let segment = self.segments.back_mut().unwrap();
        for &at in &batch.records {
            // Verified by scan_batch: read the fields without a second crc pass.
            let header = peek_own_record_header(&bytes[at..]);
            let payload =
                &bytes[at + RECORD_HEADER_BYTES..at + RECORD_HEADER_BYTES + header.payload_len as usize];
            let group = header.group;
            let log = self.groups.entry(group).or_default();
            match header.kind {
                RecordKind::Entry => {
                    let index = header.index;
                    let below_first = index < log.first;
                    if below_first && log.hole_at.is_none() {
                        return Err(WalError::Corrupt {
                            file: image.name.clone(),
                            offset: at as u64,
                            reason: format!(
                                "group {group} entry {index} is below the first index {}",
                                log.first
                            ),
                        });
                    }
                    if below_first || index > log.last() + 1 {
                        // Entries before `index` were in purged segments (or replaced there): a
                        // compaction record must cover them before the replay ends.
                        self.cache_bytes -= log.truncate_from(0);
                        log.first = index;
                        log.snapshot_term = 0;
                        log.hole_at = Some(index);
                    } else {
                        self.cache_bytes -= log.truncate_from(index);
                    }
                    let pinned = self.cache_floor.get(&group).is_some_and(|&floor| index >= floor);
                    log.entries.push_back(EntryLoc {
                        term: header.term,
                        ticket,
                        offset_in_batch: (at - pos) as u32,
                        payload_len: header.payload_len,
                        entry_type: header.entry_type,
                        cached: pinned.then(|| Bytes::copy_from_slice(payload)),
                    });
                    if pinned {
                        self.cache_bytes += payload.len();
                        self.cache_order.push_back((group, index, ticket));
                    }
                    let max = segment.max_index.entry(group).or_insert(0);
                    *max = (*max).max(index);
                }
                RecordKind::HardState => {
                    let vote = u64::from_le_bytes(payload.try_into().map_err(|_| WalError::Corrupt {
                        file: image.name.clone(),
                        offset: at as u64,
                        reason: format!("hard state payload of {} bytes", payload.len()),
                    })?);
                    log.hard_state = HardState {
                        term: header.term,
                        vote,
                        commit: header.index,
                    };
                }
                RecordKind::Compact => {
                    // A restated (or older) compaction point below the current one changes nothing.
                    if header.index + 1 >= log.first {
                        self.cache_bytes -= log.compact_through(header.index, header.term);
                    }
                }
                RecordKind::Reset => {
                    self.cache_bytes -= log.truncate_from(0);
                    log.first = header.index + 1;
                    log.hole_at = None;
                    self.cache_bytes -= log.compact_through(header.index, header.term);
                }
                RecordKind::Meta => {
                    log.metas.insert(header.index, Bytes::copy_from_slice(payload));
                }
                RecordKind::BatchHeader => unreachable!("scan_batch rejects nested headers"),
            }
        }
        self.evict_cache();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_batch_ignores_older_numbers_and_non_headers() {
        let mut bytes = vec![0u8; 4 * BLOCK_BYTES];
        let mut put = |at: usize, kind: RecordKind, batch: u64| {
            crate::format::encode_record_header(&mut bytes[at..], 0, kind, 0, batch, 1, 1, 1);
            crate::format::seal_record(3, &mut bytes[at..]);
        };
        put(BLOCK_BYTES, RecordKind::BatchHeader, 4);
        put(2 * BLOCK_BYTES, RecordKind::Entry, 9);
        assert_eq!(later_batch(3, &bytes, 0, Some(4)), None);
        assert_eq!(later_batch(3, &bytes, 0, Some(3)), Some((BLOCK_BYTES, 4)));
        assert_eq!(later_batch(4, &bytes, 0, Some(3)), None, "other segment sequence");
    }
}
