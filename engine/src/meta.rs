//! The engine's per-group metadata, stored in the WAL's opaque `Meta` records
//! ([`ringraft_wal::Wal::set_meta`]) and carried in a snapshot's `Done` piece. Specified in
//! `docs/wal-format.md` ("Engine metadata"); pinned by a golden test.
//!
//! ```text
//! 0   4  magic "RGM1"
//! 4   1  version = 1
//! 5   1  flags: bit 0 = auto_leave (joint configuration left automatically)
//! 6   2  reserved (0)
//! 8   8  term: the term of the entry at the record's index when it describes an installed
//!        snapshot, else 0
//! 16  4  voters, 4 learners, 4 voters_outgoing, 4 learners_next (counts)
//! 32  8 x (sum of counts)  node ids, in that order
//! end 4  crc32c of everything before it
//! ```

use raft::eraftpb::ConfState;

const MAGIC: [u8; 4] = *b"RGM1";
const VERSION: u8 = 1;
const FIXED_BYTES: usize = 32;

/// A group's membership as of an index, and (for a snapshot) the term of that index.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupMeta {
    pub conf_state: ConfState,
    /// Non-zero for a snapshot: the term of its index, so a restart after the state machine
    /// switched but before the WAL reset was durable can finish the install.
    pub snapshot_term: u64,
}

impl GroupMeta {
    pub fn encode(&self) -> Vec<u8> {
        let cs = &self.conf_state;
        let lists = [&cs.voters, &cs.learners, &cs.voters_outgoing, &cs.learners_next];
        let mut out = Vec::with_capacity(FIXED_BYTES + 8 * lists.iter().map(|l| l.len()).sum::<usize>() + 4);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(u8::from(cs.auto_leave));
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.snapshot_term.to_le_bytes());
        for list in lists {
            out.extend_from_slice(&(list.len() as u32).to_le_bytes());
        }
        for list in lists {
            for id in list.iter() {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        seal_crc(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<GroupMeta, String> {
        let body = check_crc(bytes, FIXED_BYTES, "group metadata")?;
        if body[0..4] != MAGIC {
            return Err("group metadata has a bad magic".into());
        }
        if body[4] != VERSION {
            return Err(format!(
                "group metadata version {} (this build reads {VERSION})",
                body[4]
            ));
        }
        if body[5] > 1 || body[6..8] != [0, 0] {
            return Err("group metadata has unknown flags".into());
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
        let counts = [u32_at(16), u32_at(20), u32_at(24), u32_at(28)];
        let total: usize = counts.iter().sum();
        if body.len() != FIXED_BYTES + 8 * total {
            return Err(format!(
                "group metadata lists {total} ids in {} bytes",
                body.len() - FIXED_BYTES
            ));
        }
        let mut at = FIXED_BYTES;
        let mut lists: Vec<Vec<u64>> = Vec::new();
        for count in counts {
            lists.push((0..count).map(|i| u64_at(at + 8 * i)).collect());
            at += 8 * count;
        }
        let learners_next = lists.pop().unwrap();
        let voters_outgoing = lists.pop().unwrap();
        let learners = lists.pop().unwrap();
        let voters = lists.pop().unwrap();
        Ok(GroupMeta {
            conf_state: ConfState {
                voters,
                learners,
                voters_outgoing,
                learners_next,
                auto_leave: body[5] == 1,
                ..Default::default()
            },
            snapshot_term: u64_at(8),
        })
    }
}

/// Appends the crc32c of everything before it (the trailer of the engine's small formats).
pub(crate) fn seal_crc(out: &mut Vec<u8>) {
    let crc = crc32c::crc32c(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// The body before a [`seal_crc`] trailer, once it is at least `min_body` bytes and verifies.
pub(crate) fn check_crc<'a>(bytes: &'a [u8], min_body: usize, what: &str) -> Result<&'a [u8], String> {
    if bytes.len() < min_body + 4 {
        return Err(format!("{what} of {} bytes is too short", bytes.len()));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
        return Err(format!("{what} crc32c mismatch"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GroupMeta {
        GroupMeta {
            conf_state: ConfState {
                voters: vec![1, 2, 4],
                learners: vec![5],
                voters_outgoing: vec![1, 2, 3],
                learners_next: vec![3],
                auto_leave: true,
                ..Default::default()
            },
            snapshot_term: 7,
        }
    }

    /// The bytes are part of the WAL format: a change here is a format change.
    #[test]
    fn golden_bytes() {
        let hex: String = sample().encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "52474d310101000007000000000000000300000001000000030000000100000001000000000000000200\
             0000000000000400000000000000050000000000000001000000000000000200000000000000030000\
             00000000000300000000000000ee2b20d6"
        );
    }

    #[test]
    fn round_trip_and_every_corruption_is_an_error() {
        let meta = sample();
        let bytes = meta.encode();
        assert_eq!(GroupMeta::decode(&bytes).unwrap(), meta);
        for cut in 0..bytes.len() {
            assert!(GroupMeta::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(GroupMeta::decode(&bad).is_err(), "flip at {at}");
        }
    }
}
