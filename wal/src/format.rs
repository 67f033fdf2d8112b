//! The WAL's byte format, version 1. The normative spec is `docs/wal-format.md`; this module is
//! its only implementation, and `tests/golden.rs` pins the bytes it produces.
//!
//! A segment file is `SEGMENT_HEADER_BYTES` of header followed by batches. A batch starts at a
//! `BLOCK_BYTES`-aligned offset with a `BatchHeader` record and holds records laid out at
//! `RECORD_ALIGN`-byte offsets. Every record is a `RECORD_HEADER_BYTES` header followed by its
//! payload; every integer is little-endian.

/// Magic at offset 0 of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"RRAFTWAL";
/// Format version written into every segment header. Bump it on any change to this module.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this build still reads (version 1 lacks only the `Meta` record).
pub const FORMAT_VERSION_MIN: u32 = 1;
/// Unit of every write and of batch placement: O_DIRECT needs the device's logical block size,
/// and 4 KiB covers every device ringraft targets.
pub const BLOCK_BYTES: usize = 4096;
/// The segment header occupies the whole first block so that batches start block-aligned.
pub const SEGMENT_HEADER_BYTES: usize = BLOCK_BYTES;
/// Bytes of the segment header that carry data (the rest of the block is zero).
pub const SEGMENT_HEADER_USED_BYTES: usize = 36;
/// Every record starts at a multiple of this, and so does every payload: rkyv archives with
/// 16-byte alignment can be read in place.
pub const RECORD_ALIGN: usize = 16;
/// Fixed size of a record header.
pub const RECORD_HEADER_BYTES: usize = 48;
/// Largest payload one record may carry (and so one raft entry): it must fit in a `u32` length
/// and, with its header, in one batch; the WAL config bounds it further.
pub const PAYLOAD_BYTES_MAX: usize = (u32::MAX as usize) & !(RECORD_ALIGN - 1);
/// Smallest segment: the header block plus one block of batch space.
pub const SEGMENT_BYTES_MIN: u64 = 2 * BLOCK_BYTES as u64;

const _: () = assert!(RECORD_HEADER_BYTES % RECORD_ALIGN == 0);
const _: () = assert!(BLOCK_BYTES % RECORD_ALIGN == 0);
const _: () = assert!(SEGMENT_HEADER_BYTES % BLOCK_BYTES == 0);
const _: () = assert!(SEGMENT_HEADER_USED_BYTES <= SEGMENT_HEADER_BYTES);

/// What a record says. The numeric values are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// First record of every batch: `index` = batch bytes (from this header to the end of the
    /// last record's payload, unpadded), `term` = number of records that follow.
    BatchHeader = 1,
    /// A raft entry of `group` at `index`, `term`; `entry_type` is opaque to the WAL.
    Entry = 2,
    /// The group's hard state: `term`, `index` = commit, payload = vote (8 bytes).
    HardState = 3,
    /// Entries of `group` up to and including `index` (whose term is `term`) are discarded.
    Compact = 4,
    /// The group's whole log is discarded; it continues after `index` (term `term`): a snapshot
    /// was installed.
    Reset = 5,
    /// Engine metadata of `group` as of `index` (e.g. the membership applied at that index);
    /// the payload is opaque to the WAL. Format version 2.
    Meta = 6,
}

impl RecordKind {
    pub fn from_u8(value: u8) -> Option<RecordKind> {
        Some(match value {
            1 => RecordKind::BatchHeader,
            2 => RecordKind::Entry,
            3 => RecordKind::HardState,
            4 => RecordKind::Compact,
            5 => RecordKind::Reset,
            6 => RecordKind::Meta,
            _ => return None,
        })
    }
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub crc: u32,
    pub payload_len: u32,
    pub kind: RecordKind,
    pub entry_type: u8,
    pub batch: u64,
    pub group: u64,
    pub index: u64,
    pub term: u64,
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub const fn align_up(value: usize, align: usize) -> usize {
    (value + align - 1) & !(align - 1)
}

/// Bytes a record with `payload_len` bytes of payload occupies, padding included.
pub const fn record_bytes(payload_len: usize) -> usize {
    RECORD_HEADER_BYTES + align_up(payload_len, RECORD_ALIGN)
}

/// The crc32c seed for records of the segment with sequence `segment_seq`: mixing the sequence
/// in means bytes left over from an earlier use of a recycled file never validate.
pub fn record_crc_seed(segment_seq: u64) -> u32 {
    crc32c::crc32c(&segment_seq.to_le_bytes())
}

/// The checksum of a record: header bytes 4..48 and the payload, seeded by the segment.
pub fn record_crc(segment_seq: u64, header_after_crc: &[u8], payload: &[u8]) -> u32 {
    debug_assert_eq!(header_after_crc.len(), RECORD_HEADER_BYTES - 4);
    let crc = crc32c::crc32c_append(record_crc_seed(segment_seq), header_after_crc);
    crc32c::crc32c_append(crc, payload)
}

/// The crc32c polynomial, bit-reflected (as crc32c computes it).
const CRC32C_POLY_REFLECTED: u32 = 0x82F6_3B78;

/// `a * b mod P` over GF(2), both in crc32c's reflected representation (bit 31 is x^0).
const fn crc_multiply(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = 1u32 << 31;
    while bit != 0 {
        if a & bit != 0 {
            product ^= b;
        }
        bit >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY_REFLECTED
        } else {
            b >> 1
        };
    }
    product
}

/// `x^(8 * 2^k) mod P` for k = 0..64: appending 2^k zero bytes to a crc multiplies it by entry k.
const ZERO_BYTES_POWERS: [u32; 64] = {
    let mut table = [0u32; 64];
    // x^8: eight one-bit shifts of x^0 (bit 31 in the reflected representation).
    let mut power = 1u32 << 31;
    let mut shift = 0;
    while shift < 8 {
        power = crc_multiply(power, 1 << 30); // times x
        shift += 1;
    }
    let mut k = 0;
    while k < 64 {
        table[k] = power;
        power = crc_multiply(power, power);
        k += 1;
    }
    table
};

/// The crc32c of `first ++ second` from `crc32c(first)`, `crc32c(second)` and `second`'s length
/// (zlib's crc32_combine, with the crc32c polynomial). At most 64 small multiplications.
pub fn crc32c_concat(first: u32, second: u32, second_len: usize) -> u32 {
    let mut shift = 1u32 << 31; // x^0
    let mut len = second_len as u64;
    let mut k = 0;
    while len != 0 {
        if len & 1 != 0 {
            shift = crc_multiply(ZERO_BYTES_POWERS[k], shift);
        }
        len >>= 1;
        k += 1;
    }
    crc_multiply(shift, first) ^ second
}

/// Payloads from this size on have their crc computed when copied in ([`stage_payload_crc`]);
/// smaller ones are checksummed directly when sealed, which costs less than combining.
pub const STAGED_CRC_MIN_BYTES: usize = 1024;

/// Stores the crc32c of the record's payload in its crc slot, where [`seal_staged_record`] takes
/// it from: the payload's checksum is computed when the payload is copied in (while it is in
/// the cache, and while the previous batch's write is in flight), and sealing the record once
/// its segment and batch are known costs a 44-byte crc and one combination, not a pass over
/// the payload. Does nothing for payloads under [`STAGED_CRC_MIN_BYTES`].
pub fn stage_payload_crc(record: &mut [u8]) {
    let payload_len = u32::from_le_bytes(record[4..8].try_into().unwrap()) as usize;
    if payload_len < STAGED_CRC_MIN_BYTES {
        return;
    }
    let crc = crc32c::crc32c(&record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_len]);
    record[0..4].copy_from_slice(&crc.to_le_bytes());
}

/// [`seal_record`] for a record that went through [`stage_payload_crc`], with `seed` =
/// [`record_crc_seed`] of its segment. Same result; a large payload is not read again.
pub fn seal_staged_record(seed: u32, record: &mut [u8]) {
    let payload_len = u32::from_le_bytes(record[4..8].try_into().unwrap()) as usize;
    let head = crc32c::crc32c_append(seed, &record[4..RECORD_HEADER_BYTES]);
    let crc = if payload_len < STAGED_CRC_MIN_BYTES {
        crc32c::crc32c_append(
            head,
            &record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_len],
        )
    } else {
        let payload_crc = u32::from_le_bytes(record[0..4].try_into().unwrap());
        crc32c_concat(head, payload_crc, payload_len)
    };
    record[0..4].copy_from_slice(&crc.to_le_bytes());
}

/// Writes a record header with a zero crc into `out[..RECORD_HEADER_BYTES]`; the crc is filled
/// by [`seal_record`] once the record's segment is known.
#[allow(clippy::too_many_arguments)]
pub fn encode_record_header(
    out: &mut [u8],
    payload_len: u32,
    kind: RecordKind,
    entry_type: u8,
    batch: u64,
    group: u64,
    index: u64,
    term: u64,
) {
    let out = &mut out[..RECORD_HEADER_BYTES];
    out[0..4].copy_from_slice(&0u32.to_le_bytes());
    out[4..8].copy_from_slice(&payload_len.to_le_bytes());
    out[8] = kind as u8;
    out[9] = entry_type;
    out[10..16].fill(0);
    out[16..24].copy_from_slice(&batch.to_le_bytes());
    out[24..32].copy_from_slice(&group.to_le_bytes());
    out[32..40].copy_from_slice(&index.to_le_bytes());
    out[40..48].copy_from_slice(&term.to_le_bytes());
}

/// Computes and stores the crc of the record at the start of `record` (header + payload).
pub fn seal_record(segment_seq: u64, record: &mut [u8]) {
    let payload_len = u32::from_le_bytes(record[4..8].try_into().unwrap()) as usize;
    let crc = record_crc(
        segment_seq,
        &record[4..RECORD_HEADER_BYTES],
        &record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_len],
    );
    record[0..4].copy_from_slice(&crc.to_le_bytes());
}

/// Why bytes at some position are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordFault {
    /// Fewer bytes remain than a header, or than the header's length says.
    Truncated,
    /// The kind byte is not a known kind.
    UnknownKind(u8),
    /// Reserved bytes are not zero.
    Reserved,
    /// The checksum does not match (torn write, corruption, or a stale recycled record).
    Checksum { stored: u32, computed: u32 },
}

impl std::fmt::Display for RecordFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordFault::Truncated => write!(f, "record extends past the end of the data"),
            RecordFault::UnknownKind(kind) => write!(f, "unknown record kind {kind}"),
            RecordFault::Reserved => write!(f, "reserved header bytes are not zero"),
            RecordFault::Checksum { stored, computed } => {
                write!(
                    f,
                    "crc32c mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
        }
    }
}

/// Reads the header fields of a record without verifying its crc: for a record this process
/// just encoded (the batch being placed), or one [`decode_record`] has already verified (the
/// recovery scan verifies each batch before replaying it). Panics on an unknown kind: that
/// would be a bug in the caller.
pub fn peek_own_record_header(bytes: &[u8]) -> RecordHeader {
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    RecordHeader {
        crc: u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
        payload_len: u32::from_le_bytes(bytes[4..8].try_into().unwrap()),
        kind: RecordKind::from_u8(bytes[8]).expect("own record has a known kind"),
        entry_type: bytes[9],
        batch: u64_at(16),
        group: u64_at(24),
        index: u64_at(32),
        term: u64_at(40),
    }
}

/// Decodes and verifies the record at the start of `bytes`, written in segment `segment_seq`.
/// Returns the header and the payload slice.
pub fn decode_record(segment_seq: u64, bytes: &[u8]) -> Result<(RecordHeader, &[u8]), RecordFault> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(RecordFault::Truncated);
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let crc = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let payload_len = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    // Checked before the length is trusted for slicing: a corrupt length must not read past the
    // buffer, and the crc over a bogus length would fail anyway.
    if (payload_len as usize) > bytes.len() - RECORD_HEADER_BYTES {
        return Err(RecordFault::Truncated);
    }
    let payload = &bytes[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_len as usize];
    let computed = record_crc(segment_seq, &bytes[4..RECORD_HEADER_BYTES], payload);
    if computed != crc {
        return Err(RecordFault::Checksum {
            stored: crc,
            computed,
        });
    }
    let kind = RecordKind::from_u8(bytes[8]).ok_or(RecordFault::UnknownKind(bytes[8]))?;
    if bytes[10..16].iter().any(|&b| b != 0) {
        return Err(RecordFault::Reserved);
    }
    Ok((
        RecordHeader {
            crc,
            payload_len,
            kind,
            entry_type: bytes[9],
            batch: u64_at(16),
            group: u64_at(24),
            index: u64_at(32),
            term: u64_at(40),
        },
        payload,
    ))
}

/// A decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    pub segment_bytes: u64,
}

/// Encodes a segment header into a whole header block.
pub fn encode_segment_header(header: SegmentHeader, out: &mut [u8]) {
    let out = &mut out[..SEGMENT_HEADER_BYTES];
    out.fill(0);
    out[0..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(SEGMENT_HEADER_BYTES as u32).to_le_bytes());
    out[16..24].copy_from_slice(&header.seq.to_le_bytes());
    out[24..32].copy_from_slice(&header.segment_bytes.to_le_bytes());
    let crc = crc32c::crc32c(&out[0..32]);
    out[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// Why a segment header is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentHeaderFault {
    Truncated,
    Magic,
    Checksum,
    /// A valid header of a format this build does not read.
    Version(u32),
    HeaderBytes(u32),
}

impl std::fmt::Display for SegmentHeaderFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SegmentHeaderFault::Truncated => write!(f, "file shorter than a segment header"),
            SegmentHeaderFault::Magic => write!(f, "bad magic"),
            SegmentHeaderFault::Checksum => write!(f, "header crc32c mismatch"),
            SegmentHeaderFault::Version(v) => {
                write!(
                    f,
                    "format version {v}, this build reads {FORMAT_VERSION_MIN} to {FORMAT_VERSION}"
                )
            }
            SegmentHeaderFault::HeaderBytes(n) => write!(f, "header size {n} is not {SEGMENT_HEADER_BYTES}"),
        }
    }
}

pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, SegmentHeaderFault> {
    if bytes.len() < SEGMENT_HEADER_USED_BYTES {
        return Err(SegmentHeaderFault::Truncated);
    }
    if bytes[0..8] != SEGMENT_MAGIC {
        return Err(SegmentHeaderFault::Magic);
    }
    let stored = u32::from_le_bytes(bytes[32..36].try_into().unwrap());
    if crc32c::crc32c(&bytes[0..32]) != stored {
        return Err(SegmentHeaderFault::Checksum);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return Err(SegmentHeaderFault::Version(version));
    }
    let header_bytes = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    if header_bytes as usize != SEGMENT_HEADER_BYTES {
        return Err(SegmentHeaderFault::HeaderBytes(header_bytes));
    }
    Ok(SegmentHeader {
        seq: u64::from_le_bytes(bytes[16..24].try_into().unwrap()),
        segment_bytes: u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
    })
}

/// File name of the segment with sequence `seq`: zero-padded so names sort by sequence.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:020}.wal")
}

/// The sequence a segment file name carries, or `None` for files that are not segments.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn crc32c_concat_matches_one_pass(a in proptest::collection::vec(any::<u8>(), 0..300), b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(crc32c_concat(crc32c::crc32c(&a), crc32c::crc32c(&b), b.len()), crc32c::crc32c(&whole));
        }

        #[test]
        fn staged_sealing_equals_sealing(payload in proptest::collection::vec(any::<u8>(), 0..3000), seq in any::<u64>(), batch in any::<u64>()) {
            let mut plain = vec![0u8; record_bytes(payload.len())];
            encode_record_header(&mut plain, payload.len() as u32, RecordKind::Entry, 1, 0, 5, 6, 7);
            plain[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()].copy_from_slice(&payload);
            let mut staged = plain.clone();
            stage_payload_crc(&mut staged);
            // The batch number is written after staging, as `place` does.
            plain[16..24].copy_from_slice(&batch.to_le_bytes());
            staged[16..24].copy_from_slice(&batch.to_le_bytes());
            seal_record(seq, &mut plain);
            seal_staged_record(record_crc_seed(seq), &mut staged);
            prop_assert_eq!(&plain, &staged);
            prop_assert!(decode_record(seq, &staged).is_ok());
        }
    }

    #[test]
    fn crc32c_concat_of_large_lengths() {
        // Lengths with high bits set use the upper powers of the table.
        let a = b"ringraft";
        let b = vec![0xA5u8; (1 << 20) + 12345];
        let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
        assert_eq!(
            crc32c_concat(crc32c::crc32c(a), crc32c::crc32c(&b), b.len()),
            crc32c::crc32c(&whole)
        );
        assert_eq!(crc32c_concat(0x1234_5678, 0, 0), 0x1234_5678);
    }

    #[test]
    fn record_round_trips_and_rejects_other_segment_seq() {
        let mut buf = vec![0u8; record_bytes(5)];
        encode_record_header(&mut buf, 5, RecordKind::Entry, 7, 3, 11, 42, 9);
        buf[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + 5].copy_from_slice(b"hello");
        seal_record(77, &mut buf);
        let (header, payload) = decode_record(77, &buf).unwrap();
        assert_eq!(payload, b"hello");
        assert_eq!(
            (
                header.kind,
                header.entry_type,
                header.batch,
                header.group,
                header.index,
                header.term
            ),
            (RecordKind::Entry, 7, 3, 11, 42, 9)
        );
        assert!(matches!(
            decode_record(78, &buf),
            Err(RecordFault::Checksum { .. })
        ));
    }

    #[test]
    fn corrupt_length_is_truncated_not_a_panic() {
        let mut buf = vec![0u8; record_bytes(0)];
        encode_record_header(&mut buf, 0, RecordKind::Compact, 0, 1, 1, 1, 1);
        buf[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_record(1, &buf), Err(RecordFault::Truncated));
    }

    #[test]
    fn zeroed_bytes_are_not_a_record() {
        let buf = vec![0u8; 64];
        assert!(decode_record(0, &buf).is_err());
        assert!(decode_record(5, &buf).is_err());
    }

    #[test]
    fn segment_names_sort_and_parse() {
        assert_eq!(segment_file_name(12), "00000000000000000012.wal");
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_segment_file_name("12.wal"), None);
        assert_eq!(parse_segment_file_name("0000000000000000001x.wal"), None);
        assert_eq!(parse_segment_file_name(".iopoll-guard"), None);
    }

    #[test]
    fn segment_header_round_trips_and_detects_flips() {
        let mut block = vec![0u8; SEGMENT_HEADER_BYTES];
        let header = SegmentHeader {
            seq: 9,
            segment_bytes: 1 << 20,
        };
        encode_segment_header(header, &mut block);
        assert_eq!(decode_segment_header(&block), Ok(header));
        block[17] ^= 1;
        assert_eq!(decode_segment_header(&block), Err(SegmentHeaderFault::Checksum));
    }
}
