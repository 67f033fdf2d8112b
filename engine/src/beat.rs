//! The shard beat: one message per peer shard per heartbeat interval, for all groups at once
//! (idle groups send no raft heartbeats of their own).
//!
//! It travels as a raft `MsgHeartbeat` addressed to the reserved group [`BEAT_GROUP`], with this
//! payload in the message's `context` (so every transport carries it unchanged, inside the
//! loop's one frame per peer). Specified in `docs/wire-format.md` ("Shard beat"), golden-tested
//! below. Two layouts: version 1 (magic "RGB1") when there are no removal notices, so a beat
//! reads the same to a node of the version before them; version 2 ("RGB2") adds that list.
//!
//! ```text
//! 0   4  magic "RGB1" | "RGB2"
//! 4   4  quiesce count q
//! 8   4  quiesced count a
//! 12  4  woke count w
//! 16  4  removed count r                                   (version 2 only)
//! F   24 x q   (group, term, index): groups the sender leads, idle at `index`, which the
//!              receiver may quiesce                       (F = 16 in version 1, 20 in 2)
//! ..  16 x a   (group, term): groups the sender (a follower) quiesced at the receiver's request
//! ..  16 x w   (group, term): groups the sender (a follower) woke: the receiver, their leader,
//!              must tick them again
//! ..  16 x r   (group, term): groups of which the receiver is no member, as the sender (which
//!              knows the group's leader at `term`) applied their membership: the receiver
//!              campaigned in them, and stops                (version 2 only)
//! end 4  crc32c of everything before it
//! ```
//!
//! Quiescence: a leader whose group stayed idle (everything committed, applied and acknowledged
//! by every member, nothing queued) for `raft.quiesce_after_ms` lists it in its beats. A
//! follower that has exactly that state quiesces the group (stops ticking it) and acknowledges;
//! once every member did, the leader stops ticking it too: no heartbeats, no ticks. Any message
//! from a member, request to the leader or snapshot piece for the group wakes it; a follower
//! that wakes says so in its next beat, which wakes its leader (else the follower would time out
//! waiting for heartbeats and unseat a healthy leader). Beats keep flowing: a follower whose
//! leader's node went silent for an election timeout wakes the groups that node leads, which
//! then elect a new leader as usual.
//!
//! Removal notices: a node removed from a group while it was down or cut off never applies its
//! removal, so it would campaign forever (pre-vote keeps it from disrupting the members, not
//! from trying). A member that knows a leader and gets its vote requests lists the group in its
//! next beat to it; the removed node then puts the group to sleep (no ticks, so no campaigns).
//! Sleeping is always safe, and any message from a member wakes it as usual: if it is added
//! back, the leader's appends or snapshot reach it and it catches up.

use raft::eraftpb::{Message, MessageType};

use crate::meta::{check_crc, seal_crc};

/// The group id beats are addressed to (never a real group).
pub const BEAT_GROUP: u64 = u64::MAX;

const MAGIC_V1: [u8; 4] = *b"RGB1";
const MAGIC_V2: [u8; 4] = *b"RGB2";
const FIXED_BYTES_V1: usize = 16;
const FIXED_BYTES_V2: usize = 20;

/// What one shard tells the same shard of a peer node each heartbeat interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Beat {
    /// (group, term, index): groups the sender leads, idle at `index`.
    pub quiesce: Vec<(u64, u64, u64)>,
    /// (group, term): groups the sender quiesced at the receiver's request.
    pub quiesced: Vec<(u64, u64)>,
    /// (group, term): groups the sender (a follower) woke; their leader must tick them again.
    pub woke: Vec<(u64, u64)>,
    /// (group, term): groups of which the receiver is no member; it stops campaigning in them.
    pub removed: Vec<(u64, u64)>,
}

impl Beat {
    pub fn encode(&self) -> Vec<u8> {
        let v2 = !self.removed.is_empty();
        let fixed = if v2 { FIXED_BYTES_V2 } else { FIXED_BYTES_V1 };
        let pairs = self.quiesced.len() + self.woke.len() + self.removed.len();
        let mut out = Vec::with_capacity(fixed + 24 * self.quiesce.len() + 16 * pairs + 4);
        out.extend_from_slice(if v2 { &MAGIC_V2 } else { &MAGIC_V1 });
        out.extend_from_slice(&(self.quiesce.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.quiesced.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.woke.len() as u32).to_le_bytes());
        if v2 {
            out.extend_from_slice(&(self.removed.len() as u32).to_le_bytes());
        }
        for &(group, term, index) in &self.quiesce {
            for v in [group, term, index] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        for &(group, term) in self.quiesced.iter().chain(&self.woke).chain(&self.removed) {
            for v in [group, term] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        seal_crc(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Beat, String> {
        let body = check_crc(bytes, FIXED_BYTES_V1, "beat")?;
        let fixed = match body[0..4].try_into().unwrap() {
            MAGIC_V1 => FIXED_BYTES_V1,
            MAGIC_V2 if body.len() >= FIXED_BYTES_V2 => FIXED_BYTES_V2,
            MAGIC_V2 => return Err(format!("beat version 2 in {} bytes", body.len())),
            _ => return Err("not a beat (magic)".into()),
        };
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
        let (q, a, w) = (u32_at(4), u32_at(8), u32_at(12));
        let r = if fixed == FIXED_BYTES_V2 { u32_at(16) } else { 0 };
        if (body.len() - fixed) as u128 != 24 * q as u128 + 16 * (a as u128 + w as u128 + r as u128) {
            return Err(format!(
                "beat lists {q} + {a} + {w} + {r} groups in {} bytes",
                body.len()
            ));
        }
        let quiesce = (0..q)
            .map(|i| {
                let at = fixed + 24 * i;
                (u64_at(at), u64_at(at + 8), u64_at(at + 16))
            })
            .collect();
        let base = fixed + 24 * q;
        let pair = |i: usize| (u64_at(base + 16 * i), u64_at(base + 16 * i + 8));
        let quiesced = (0..a).map(pair).collect();
        let woke = (a..a + w).map(pair).collect();
        let removed = (a + w..a + w + r).map(pair).collect();
        Ok(Beat {
            quiesce,
            quiesced,
            woke,
            removed,
        })
    }

    /// The raft message carrying it.
    pub fn to_message(&self, from: u64, to: u64) -> Message {
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgHeartbeat);
        message.from = from;
        message.to = to;
        message.context = self.encode().into();
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Beat {
        Beat {
            quiesce: vec![(3, 7, 1000), (5, 7, 12)],
            quiesced: vec![(4, 6)],
            woke: vec![(9, 2)],
            removed: Vec::new(),
        }
    }

    fn sample_v2() -> Beat {
        Beat {
            removed: vec![(11, 8), (12, 8)],
            ..sample()
        }
    }

    /// The bytes are part of the wire format. Without removal notices a beat keeps version 1's
    /// layout, byte for byte.
    #[test]
    fn golden_bytes() {
        let hex: String = sample().encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5247423102000000010000000100000003000000000000000700000000000000e8030000000000000500\
             0000000000000700000000000000\
             0c00000000000000040000000000000006000000000000000900000000000000020000000000000068\
             73441f"
        );
    }

    #[test]
    fn golden_bytes_v2() {
        let hex: String = sample_v2().encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "524742320200000001000000010000000200000003000000000000000700000000000000e803000000000000\
             0500000000000000070000000000000\
             00c0000000000000004000000000000000600000000000000090000000000000002000000000000000b00\
             00000000000008000000000000000c000000000000000800000000000000894470a7"
        );
    }

    #[test]
    fn round_trip_and_every_corruption_is_an_error() {
        assert_eq!(Beat::decode(&Beat::default().encode()).unwrap(), Beat::default());
        for beat in [sample(), sample_v2()] {
            let bytes = beat.encode();
            assert_eq!(Beat::decode(&bytes).unwrap(), beat);
            for cut in 0..bytes.len() {
                assert!(Beat::decode(&bytes[..cut]).is_err(), "cut {cut}");
            }
            for at in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[at] ^= 0x04;
                assert!(Beat::decode(&bad).is_err(), "flip at {at}");
            }
        }
    }

    /// A version 2 header too short for its fourth count, with a valid checksum.
    #[test]
    fn a_short_version_2_header_is_an_error() {
        let mut bytes = b"RGB2".to_vec();
        bytes.extend_from_slice(&[0; 12]);
        seal_crc(&mut bytes);
        assert!(Beat::decode(&bytes).unwrap_err().contains("version 2"));
    }
}
