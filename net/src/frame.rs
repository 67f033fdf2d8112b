//! Frames: the unit of every ringraft connection (peer and client ports). Specified in
//! `docs/wire-format.md`.
//!
//! ```text
//! 0   2      magic "RF"
//! 2   1      format version (1)
//! 3   1      kind
//! 4   4      payload length (u32 LE), at most the configured frame maximum
//! 8   4      crc32c of bytes 0..8 followed by the payload (u32 LE)
//! 12  4      reserved, zero
//! 16  ...    payload
//! ```
//!
//! The length is checked against the maximum before any payload buffer is allocated.

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt};

pub const MAGIC: [u8; 2] = *b"RF";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 16;

/// Frame kinds. Peer port: `HELLO`, `AUTH`, `RAFT`. Client port: requests `0x10..=0x16`,
/// `RESPONSE`, `ERROR`.
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const AUTH: u8 = 0x02;
    pub const RAFT: u8 = 0x03;
    pub const SNAP: u8 = 0x04;
    pub const SUBMIT: u8 = 0x10;
    pub const GET: u8 = 0x11;
    pub const CLUSTER: u8 = 0x12;
    pub const STATUS: u8 = 0x13;
    pub const STATS: u8 = 0x14;
    pub const TRANSFER: u8 = 0x15;
    pub const GROUP_METRICS: u8 = 0x16;
    pub const MEMBER: u8 = 0x17;
    pub const GROUP_METRICS_V2: u8 = 0x18;
    pub const RESPONSE: u8 = 0x20;
    pub const ERROR: u8 = 0x21;
}

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad frame magic {0:02x?} (not a ringraft connection?)")]
    Magic([u8; 2]),
    #[error("frame format version {0} is not supported (this build speaks {VERSION})")]
    Version(u8),
    #[error("frame payload of {len} bytes exceeds the maximum {max} (limits.frame_bytes_max)")]
    TooLarge { len: u64, max: u64 },
    #[error("frame reserved bytes are not zero")]
    Reserved,
    #[error("frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("connection closed")]
    Closed,
    #[error("connection: {0}")]
    Io(String),
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Bytes,
}

/// A validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub len: usize,
    crc: u32,
    prefix: [u8; 8],
}

/// Checks a header; the length against `max` before anything is allocated for the payload.
pub fn parse_header(bytes: &[u8; HEADER_BYTES], max: u64) -> Result<Header, FrameError> {
    let magic = [bytes[0], bytes[1]];
    if magic != MAGIC {
        return Err(FrameError::Magic(magic));
    }
    if bytes[2] != VERSION {
        return Err(FrameError::Version(bytes[2]));
    }
    let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if bytes[12..16] != [0; 4] {
        return Err(FrameError::Reserved);
    }
    Ok(Header {
        kind: bytes[3],
        len: len as usize,
        crc: u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        prefix: bytes[0..8].try_into().unwrap(),
    })
}

impl Header {
    /// Checks the payload against the header's checksum.
    pub fn check(&self, payload: &[u8]) -> Result<(), FrameError> {
        let computed = crc32c::crc32c_append(crc32c::crc32c(&self.prefix), payload);
        if computed != self.crc {
            return Err(FrameError::Checksum {
                stored: self.crc,
                computed,
            });
        }
        Ok(())
    }
}

/// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes are needed, else the
/// frame and how many bytes it took.
pub fn decode(buf: &[u8], max: u64) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(head) = buf.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let header = parse_header(head.try_into().unwrap(), max)?;
    let Some(payload) = buf.get(HEADER_BYTES..HEADER_BYTES + header.len) else {
        return Ok(None);
    };
    header.check(payload)?;
    Ok(Some((
        Frame {
            kind: header.kind,
            payload: Bytes::copy_from_slice(payload),
        },
        HEADER_BYTES + header.len,
    )))
}

/// Starts a frame at the end of `out`; write the payload after it, then [`finish`].
pub fn begin(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&[0; 12]);
    start
}

/// Fills in the length and checksum of the frame begun at `start` (everything after its header
/// is its payload).
pub fn finish(out: &mut [u8], start: usize) {
    let len = out.len() - start - HEADER_BYTES;
    let len = u32::try_from(len).expect("frame payload under 4 GiB (callers bound it)");
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&out[start..start + 8]),
        &out[start + HEADER_BYTES..],
    );
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// Appends a whole frame.
pub fn encode(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let start = begin(out, kind);
    out.extend_from_slice(payload);
    finish(out, start);
}

/// Reads one frame from a stream. Allocates the payload only after the header passed, so a
/// peer cannot make it allocate more than `max`.
pub async fn read<R: AsyncRead + Unpin>(reader: &mut R, max: u64) -> Result<Frame, FrameError> {
    read_carved(reader, max, &mut BytesMut::new(), 0).await
}

/// Bytes a reader's payload arena gets at a time (see [`read_in`]).
pub const ARENA_BYTES: usize = 64 << 10;

/// [`read`], with the payload carved out of `arena`, a buffer the caller keeps between frames:
/// small frames then share one allocation of [`ARENA_BYTES`] instead of one each (a zeroed
/// allocation per request was ~2% of a loaded leader's shard thread). The arena is freed when
/// every frame cut from it is dropped, so it suits frames decoded and dropped soon (client
/// requests and answers), not payloads kept for long.
pub async fn read_in<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: u64,
    arena: &mut BytesMut,
) -> Result<Frame, FrameError> {
    read_carved(reader, max, arena, ARENA_BYTES).await
}

/// Reads a frame into `arena`, which grows by at least `chunk` bytes when short of room.
async fn read_carved<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: u64,
    arena: &mut BytesMut,
    chunk: usize,
) -> Result<Frame, FrameError> {
    let mut head = [0u8; HEADER_BYTES];
    read_exact(reader, &mut head, true).await?;
    let header = parse_header(&head, max)?;
    arena.clear();
    if arena.capacity() < header.len {
        // Reuses the arena's memory if no frame holds it any more, else takes a new one.
        arena.reserve(header.len.max(chunk));
    }
    arena.resize(header.len, 0);
    let filled = read_exact(reader, arena, false).await;
    let payload = arena.split();
    filled?;
    header.check(&payload)?;
    Ok(Frame {
        kind: header.kind,
        payload: payload.freeze(),
    })
}

async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    at_boundary: bool,
) -> Result<(), FrameError> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]).await {
            Ok(0) if done == 0 && at_boundary => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io("connection closed inside a frame".into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e.to_string())),
        }
    }
    Ok(())
}

/// A little-endian reader over a payload that fails instead of panicking.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A payload field was missing or malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed payload: {0}")]
pub struct Malformed(pub String);

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], Malformed> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                Malformed(format!(
                    "{what}: needs {n} bytes at offset {}, payload has {}",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, Malformed> {
        Ok(self.bytes(1, what)?[0])
    }

    pub fn u16(&mut self, what: &str) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(self.bytes(2, what)?.try_into().unwrap()))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(self.bytes(4, what)?.try_into().unwrap()))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.bytes(8, what)?.try_into().unwrap()))
    }

    /// A u32 length, then that many bytes.
    pub fn blob(&mut self, what: &str) -> Result<&'a [u8], Malformed> {
        let len = self.u32(what)? as usize;
        self.bytes(len, what)
    }

    /// A u16 length, then that many UTF-8 bytes.
    pub fn string(&mut self, what: &str) -> Result<String, Malformed> {
        let len = self.u16(what)? as usize;
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed(format!("{what}: not UTF-8")))
    }

    /// Skips to the next multiple of `align` (relative to the payload start); padding is zero.
    pub fn align(&mut self, align: usize, what: &str) -> Result<(), Malformed> {
        let pad = (align - self.pos % align) % align;
        if self.bytes(pad, what)?.iter().any(|&b| b != 0) {
            return Err(Malformed(format!("{what}: padding is not zero")));
        }
        Ok(())
    }

    pub fn finish(&self, what: &str) -> Result<(), Malformed> {
        if self.pos != self.buf.len() {
            return Err(Malformed(format!(
                "{what}: {} trailing bytes",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

/// Little-endian writers matching [`Cursor`].
pub fn put_blob(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

pub fn put_string(out: &mut Vec<u8>, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Zero padding up to a multiple of `align` counted from `base`.
pub fn pad(out: &mut Vec<u8>, base: usize, align: usize) {
    let pad = (align - (out.len() - base) % align) % align;
    out.resize(out.len() + pad, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_input() {
        let mut out = Vec::new();
        encode(&mut out, kind::RAFT, b"hello");
        encode(&mut out, kind::AUTH, b"");
        for cut in 0..HEADER_BYTES + 5 {
            assert_eq!(decode(&out[..cut], 1024), Ok(None), "cut {cut}");
        }
        let (frame, used) = decode(&out, 1024).unwrap().unwrap();
        assert_eq!(
            (frame.kind, &frame.payload[..], used),
            (kind::RAFT, &b"hello"[..], 21)
        );
        let (frame, used) = decode(&out[used..], 1024).unwrap().unwrap();
        assert_eq!((frame.kind, frame.payload.len(), used), (kind::AUTH, 0, 16));
    }

    #[test]
    fn every_header_field_is_checked() {
        let mut good = Vec::new();
        encode(&mut good, kind::RAFT, b"abc");
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad, 64), Err(FrameError::Magic(_))));
        let mut bad = good.clone();
        bad[2] = 9;
        assert_eq!(decode(&bad, 64), Err(FrameError::Version(9)));
        assert_eq!(decode(&good, 2), Err(FrameError::TooLarge { len: 3, max: 2 }));
        let mut bad = good.clone();
        bad[13] = 1;
        assert_eq!(decode(&bad, 64), Err(FrameError::Reserved));
        for at in [3, 16, 18] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            assert!(
                matches!(decode(&bad, 64), Err(FrameError::Checksum { .. })),
                "byte {at}"
            );
        }
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading_the_payload() {
        // Only the header exists: the length is refused without waiting for 4 GiB.
        let mut head = vec![b'R', b'F', VERSION, kind::RAFT];
        head.extend_from_slice(&u32::MAX.to_le_bytes());
        head.extend_from_slice(&[0; 8]);
        let error = futures_lite::future::block_on(read(&mut &head[..], 1 << 20)).unwrap_err();
        assert_eq!(
            error,
            FrameError::TooLarge {
                len: u32::MAX as u64,
                max: 1 << 20
            }
        );
    }

    #[test]
    fn stream_reader_distinguishes_clean_close_from_a_cut_frame() {
        let mut out = Vec::new();
        encode(&mut out, kind::HELLO, b"0123456789");
        let mut whole = &out[..];
        let frame = futures_lite::future::block_on(read(&mut whole, 64)).unwrap();
        assert_eq!(&frame.payload[..], b"0123456789");
        assert_eq!(
            futures_lite::future::block_on(read(&mut whole, 64)),
            Err(FrameError::Closed)
        );
        let mut cut = &out[..20];
        assert!(matches!(
            futures_lite::future::block_on(read(&mut cut, 64)),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn cursor_never_reads_past_the_end() {
        let mut c = Cursor::new(&[1, 0, 0, 0, 7]);
        assert_eq!(c.u32("n"), Ok(1));
        assert!(c.u64("x").is_err());
        assert_eq!(c.u8("y"), Ok(7));
        assert!(c.u8("z").is_err());
        let mut c = Cursor::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(c.blob("huge").is_err());
    }
}
