//! The payload of a `RAFT` frame: every message one shard sends to one peer shard in one loop.
//! Specified in `docs/wire-format.md`.
//!
//! ```text
//! u32 count, u32 reserved (0)
//! count times:
//!   u64 group
//!   u32 proto_len          raft-rs Message, protobuf, with every entry's data cut out
//!   u32 entries            = the message's entry count
//!   u32 data_len x entries
//!   proto bytes
//!   zero padding to a multiple of 16 (from the payload start)
//!   entries times: data bytes, zero padding to a multiple of 16
//! ```
//!
//! Entry data (the rkyv command batches) starts at 16-byte offsets and is handed to raft as
//! slices of the received frame buffer: no copy, and the state machine reads batches in place.

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::Message;
use ringraft_engine::Envelope;

use crate::frame::{self, Cursor, Malformed};

/// Alignment of entry data within the payload.
pub const DATA_ALIGN: usize = 16;

/// Appends one message to a payload being built from `base` (the payload's first byte).
/// Returns the bytes it took.
pub fn put_message(out: &mut Vec<u8>, base: usize, envelope: &Envelope) -> usize {
    let start = out.len();
    let mut message = envelope.message.clone();
    let data: Vec<Bytes> = message.entries.iter_mut().map(|e| e.take_data()).collect();
    let proto = message
        .write_to_bytes()
        .expect("protobuf encoding of a raft message cannot fail");
    out.extend_from_slice(&envelope.group.to_le_bytes());
    out.extend_from_slice(&(proto.len() as u32).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    for d in &data {
        out.extend_from_slice(&(d.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(&proto);
    frame::pad(out, base, DATA_ALIGN);
    for d in &data {
        out.extend_from_slice(d);
        frame::pad(out, base, DATA_ALIGN);
    }
    out.len() - start
}

/// Starts a payload: count placeholder. Returns its base offset.
pub fn begin(out: &mut Vec<u8>) -> usize {
    let base = out.len();
    out.extend_from_slice(&[0; 8]);
    base
}

/// Writes the message count.
pub fn finish(out: &mut [u8], base: usize, count: u32) {
    out[base..base + 4].copy_from_slice(&count.to_le_bytes());
}

/// Encodes messages into one payload (tests and tools; the transport builds frames in place).
pub fn encode(envelopes: &[Envelope]) -> Vec<u8> {
    let mut out = Vec::new();
    let base = begin(&mut out);
    for envelope in envelopes {
        put_message(&mut out, base, envelope);
    }
    finish(&mut out, base, envelopes.len() as u32);
    out
}

/// Decodes a payload. Entry data are slices of `payload` (no copy).
pub fn decode(payload: &Bytes) -> Result<Vec<Envelope>, Malformed> {
    let mut c = Cursor::new(payload);
    let count = c.u32("message count")? as usize;
    if c.u32("reserved")? != 0 {
        return Err(Malformed("reserved field is not zero".into()));
    }
    // Each message takes at least 16 bytes: a count beyond that is a lie, not an allocation.
    if count > c.remaining() / 16 {
        return Err(Malformed(format!(
            "{count} messages cannot fit {} bytes",
            c.remaining()
        )));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let group = c.u64("group")?;
        let proto_len = c.u32("proto length")? as usize;
        let entries = c.u32("entry count")? as usize;
        if entries > c.remaining() / 4 {
            return Err(Malformed(format!("{entries} entries cannot fit the payload")));
        }
        let mut lens = Vec::with_capacity(entries);
        for _ in 0..entries {
            lens.push(c.u32("entry data length")? as usize);
        }
        let proto = c.bytes(proto_len, "message")?;
        let mut message =
            Message::parse_from_bytes(proto).map_err(|e| Malformed(format!("raft message: {e}")))?;
        if message.entries.len() != entries {
            return Err(Malformed(format!(
                "message has {} entries, header says {entries}",
                message.entries.len()
            )));
        }
        c.align(DATA_ALIGN, "message padding")?;
        for (entry, len) in message.entries.iter_mut().zip(lens) {
            let at = c.position();
            c.bytes(len, "entry data")?;
            entry.set_data(payload.slice(at..at + len));
            c.align(DATA_ALIGN, "entry padding")?;
        }
        out.push(Envelope { group, message });
    }
    c.finish("raft payload")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, MessageType};

    pub(crate) fn sample() -> Vec<Envelope> {
        let mut append = Message::default();
        append.set_msg_type(MessageType::MsgAppend);
        append.from = 1;
        append.to = 2;
        append.term = 3;
        append.log_term = 3;
        append.index = 41;
        append.commit = 40;
        for (index, data) in [(42u64, &b"first entry"[..]), (43, &[]), (44, &[7u8; 33][..])] {
            let mut entry = Entry {
                index,
                term: 3,
                ..Default::default()
            };
            entry.set_data(Bytes::copy_from_slice(data));
            append.entries.push(entry);
        }
        let mut heartbeat = Message::default();
        heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        heartbeat.from = 1;
        heartbeat.to = 2;
        heartbeat.term = 3;
        heartbeat.commit = 44;
        vec![
            Envelope {
                group: 5,
                message: append,
            },
            Envelope {
                group: 9,
                message: heartbeat,
            },
        ]
    }

    #[test]
    fn round_trip_with_aligned_entry_data() {
        let envelopes = sample();
        let payload = Bytes::from(encode(&envelopes));
        let decoded = decode(&payload).unwrap();
        assert_eq!(decoded, envelopes);
        for entry in &decoded[0].message.entries {
            let offset = entry.data.as_ptr() as usize - payload.as_ptr() as usize;
            assert_eq!(offset % DATA_ALIGN, 0);
        }
    }

    #[test]
    fn truncations_and_lies_are_errors() {
        let payload = encode(&sample());
        for cut in 0..payload.len() {
            assert!(
                decode(&Bytes::copy_from_slice(&payload[..cut])).is_err(),
                "cut {cut}"
            );
        }
        let mut lie = payload.clone();
        lie[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&Bytes::from(lie)).is_err());
        let mut extra = payload.clone();
        extra.push(0);
        assert!(decode(&Bytes::from(extra)).is_err());
    }
}
