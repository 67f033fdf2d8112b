//! The payload of a `SNAP` frame: one snapshot piece (`ringraft_engine::SnapshotPiece`).
//! Specified in `docs/wire-format.md`; the frame's crc32c covers it, and chunk data carries the
//! state machine's own checksums.
//!
//! ```text
//! u64 group, u64 from, u64 to, u64 index, u64 term, u64 stream
//! u8 kind (1 chunk, 2 done, 3 ack), u8 flags (ack: bit 0 = complete), u16 reserved (0)
//! u32 data length
//! u64 number (chunk: its number; done: the chunk count; ack: the next chunk wanted)
//! data (chunk: the chunk; done: the group metadata; ack: none)
//! ```

use bytes::Bytes;
use ringraft_engine::{PieceKind, SnapshotPiece};

use crate::frame::{Cursor, Malformed};

const CHUNK: u8 = 1;
const DONE: u8 = 2;
const ACK: u8 = 3;

/// Appends a piece's payload to `out`.
pub fn put_piece(out: &mut Vec<u8>, piece: &SnapshotPiece) {
    for field in [
        piece.group,
        piece.from,
        piece.to,
        piece.index,
        piece.term,
        piece.stream,
    ] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    let (kind, flags, number, data): (u8, u8, u64, &[u8]) = match &piece.kind {
        PieceKind::Chunk { number, data } => (CHUNK, 0, *number, data),
        PieceKind::Done { chunks, meta } => (DONE, 0, *chunks, meta),
        PieceKind::Ack { next, complete } => (ACK, u8::from(*complete), *next, &[]),
    };
    out.extend_from_slice(&[kind, flags, 0, 0]);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&number.to_le_bytes());
    out.extend_from_slice(data);
}

/// Encodes one piece (tests and tools).
pub fn encode(piece: &SnapshotPiece) -> Vec<u8> {
    let mut out = Vec::new();
    put_piece(&mut out, piece);
    out
}

/// Decodes a payload; data is a slice of `payload` (no copy).
pub fn decode(payload: &Bytes) -> Result<SnapshotPiece, Malformed> {
    let mut c = Cursor::new(payload);
    let group = c.u64("group")?;
    let from = c.u64("from")?;
    let to = c.u64("to")?;
    let index = c.u64("index")?;
    let term = c.u64("term")?;
    let stream = c.u64("stream")?;
    let kind = c.u8("piece kind")?;
    let flags = c.u8("flags")?;
    if c.u16("reserved")? != 0 {
        return Err(Malformed("reserved field is not zero".into()));
    }
    let len = c.u32("data length")? as usize;
    let number = c.u64("number")?;
    let at = c.position();
    c.bytes(len, "piece data")?;
    c.finish("snapshot piece")?;
    let data = payload.slice(at..at + len);
    let kind = match (kind, flags) {
        (CHUNK, 0) => PieceKind::Chunk { number, data },
        (DONE, 0) => PieceKind::Done {
            chunks: number,
            meta: data,
        },
        (ACK, 0 | 1) if len == 0 => PieceKind::Ack {
            next: number,
            complete: flags == 1,
        },
        _ => {
            return Err(Malformed(format!(
                "piece kind {kind} with flags {flags} and {len} data bytes"
            )))
        }
    };
    Ok(SnapshotPiece {
        group,
        from,
        to,
        index,
        term,
        stream,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn samples() -> Vec<SnapshotPiece> {
        let base = |kind| SnapshotPiece {
            group: 4,
            from: 1,
            to: 2,
            index: 900,
            term: 3,
            stream: (5 << 24) | 2,
            kind,
        };
        vec![
            base(PieceKind::Chunk {
                number: 0,
                data: Bytes::from_static(b"chunk bytes"),
            }),
            base(PieceKind::Done {
                chunks: 1,
                meta: Bytes::from_static(b"meta"),
            }),
            base(PieceKind::Ack {
                next: 1,
                complete: true,
            }),
        ]
    }

    #[test]
    fn round_trip_truncations_and_lies() {
        for piece in samples() {
            let payload = encode(&piece);
            assert_eq!(decode(&Bytes::from(payload.clone())).unwrap(), piece);
            for cut in 0..payload.len() {
                assert!(
                    decode(&Bytes::copy_from_slice(&payload[..cut])).is_err(),
                    "cut {cut}"
                );
            }
            let mut extra = payload.clone();
            extra.push(0);
            assert!(decode(&Bytes::from(extra)).is_err());
            let mut bad_kind = payload.clone();
            bad_kind[48] = 9;
            assert!(decode(&Bytes::from(bad_kind)).is_err());
        }
    }
}
