//! Commands, batches and results. The batch byte format is specified in `docs/batch-format.md`
//! and pinned by `tests/golden.rs`.
//!
//! A batch is many commands archived once with rkyv into one buffer; that buffer, behind a small
//! header, is the payload of one raft entry. Replicas validate it (bytecheck) and apply it in
//! place: no per-command allocation or copy.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::error::SmError;

/// A command of the built-in key-value store.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum Command {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Writes `new` (`None` deletes) only if the current value equals `expected` (`None`: absent).
    CompareAndSwap {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    },
    /// A read through the log (the slow, always-linearizable path).
    Get {
        key: Vec<u8>,
    },
}

impl Command {
    pub fn key(&self) -> &[u8] {
        match self {
            Command::Put { key, .. }
            | Command::Delete { key }
            | Command::CompareAndSwap { key, .. }
            | Command::Get { key } => key,
        }
    }
}

impl ArchivedCommand {
    /// The key the command reads or writes, in place.
    pub fn key(&self) -> &[u8] {
        match self {
            ArchivedCommand::Put { key, .. }
            | ArchivedCommand::Delete { key }
            | ArchivedCommand::CompareAndSwap { key, .. }
            | ArchivedCommand::Get { key } => key.as_slice(),
        }
    }
}

/// What the archive holds.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Batch {
    pub commands: Vec<Command>,
}

/// The outcome of one command, returned to the proposer in batch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandResult {
    /// Put, Delete of a present key, or a CAS that matched.
    Ok,
    /// Delete or Get of an absent key.
    NotFound,
    /// A CAS whose expectation did not hold, with the current value.
    CasMismatch { current: Option<Vec<u8>> },
    /// A Get's value.
    Value(Vec<u8>),
}

/// Size limits checked when commands enter a batch (`limits.key_bytes_max`,
/// `limits.value_bytes_max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandLimits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
}

impl Default for CommandLimits {
    fn default() -> Self {
        CommandLimits {
            key_bytes_max: 4096,
            value_bytes_max: 1 << 20,
        }
    }
}

impl CommandLimits {
    /// Refuses a command whose key or value is too large, with the limit's config key.
    pub fn check(&self, command: &Command) -> Result<(), SmError> {
        let key = command.key().len();
        if key > self.key_bytes_max {
            return Err(SmError::TooLarge {
                what: "key",
                bytes: key,
                limit: self.key_bytes_max,
                key: "limits.key_bytes_max",
            });
        }
        let values: [Option<&Vec<u8>>; 2] = match command {
            Command::Put { value, .. } => [Some(value), None],
            Command::CompareAndSwap { expected, new, .. } => [expected.as_ref(), new.as_ref()],
            Command::Delete { .. } | Command::Get { .. } => [None, None],
        };
        for value in values.into_iter().flatten() {
            if value.len() > self.value_bytes_max {
                return Err(SmError::TooLarge {
                    what: "value",
                    bytes: value.len(),
                    limit: self.value_bytes_max,
                    key: "limits.value_bytes_max",
                });
            }
        }
        Ok(())
    }
}

/// Magic of the batch header.
pub const BATCH_MAGIC: [u8; 2] = *b"RB";
/// Batch format version; bump on any change to the header or to the archived types.
pub const BATCH_VERSION: u8 = 1;
/// Header before the archive; the archive starts 16-byte aligned when the payload does.
pub const BATCH_HEADER_BYTES: usize = 16;
/// What an archive holds beyond its commands' [`command_size_estimate`]s: the root
/// (`ArchivedBatch`, 8 bytes) and the padding that aligns the command array (under 4 bytes).
pub const BATCH_SLACK_BYTES: usize = 64;

/// Encodes commands into a batch payload: header + rkyv archive.
pub fn encode_batch(commands: Vec<Command>) -> AlignedVec<16> {
    let bytes: usize = commands.iter().map(command_size_estimate).sum();
    let mut out = AlignedVec::<16>::with_capacity(BATCH_HEADER_BYTES + bytes + BATCH_SLACK_BYTES);
    out.extend_from_slice(&[0; BATCH_HEADER_BYTES]);
    archive_after_header(commands, out)
}

/// [`encode_batch`] into a plain `Vec` (what a raft entry holds), sized once from
/// `bytes_estimate` (the commands' [`command_size_estimate`]s, summed): the archive is written
/// after the header in place, with no copy and no regrowth. The bytes are the same: the header
/// is 16 bytes, a multiple of every alignment in the archive, and the archive's pointers are
/// relative. (A `Vec<u8>` from the system allocator is 16-byte aligned on the platforms this
/// runs on; [`BatchView::new`] copies a payload that is not.)
pub fn encode_batch_vec(commands: Vec<Command>, bytes_estimate: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(BATCH_HEADER_BYTES + bytes_estimate + BATCH_SLACK_BYTES);
    out.extend_from_slice(&[0; BATCH_HEADER_BYTES]);
    let mut out = archive_after_header(commands, out);
    // The entry lives on in the log and the WAL's cache, which count its length: give back the
    // estimate's slack (the system allocator shrinks in place, without a copy).
    out.shrink_to_fit();
    out
}

/// Archives `commands` into `out`, which holds a zeroed header so far, then fills the header.
fn archive_after_header<W>(commands: Vec<Command>, out: W) -> W
where
    W: rkyv::ser::Writer<rancor::Error> + std::ops::DerefMut<Target = [u8]>,
{
    let count = commands.len();
    let mut out = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&Batch { commands }, out)
        .expect("archiving a batch cannot fail");
    write_batch_header(&mut out, count);
    out
}

/// Fills the header of a payload whose archive follows it.
fn write_batch_header(out: &mut [u8], count: usize) {
    let (header, archive) = out.split_at_mut(BATCH_HEADER_BYTES);
    header[0..2].copy_from_slice(&BATCH_MAGIC);
    header[2] = BATCH_VERSION;
    header[3] = 0;
    header[4..8].copy_from_slice(&(archive.len() as u32).to_le_bytes());
    header[8..12].copy_from_slice(&crc32c::crc32c(archive).to_le_bytes());
    header[12..16].copy_from_slice(&(count as u32).to_le_bytes());
}

/// Builds a batch from commands arriving one by one, within the limits.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    limits: CommandLimits,
    commands: Vec<Command>,
    bytes: usize,
}

impl BatchBuilder {
    pub fn new(limits: CommandLimits) -> BatchBuilder {
        BatchBuilder {
            limits,
            commands: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds a command, refusing it (with nothing added) when it exceeds the limits.
    pub fn push(&mut self, command: Command) -> Result<(), SmError> {
        self.limits.check(&command)?;
        self.bytes += command_size_estimate(&command);
        self.commands.push(command);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// An upper estimate of the encoded size, for batching limits.
    pub fn bytes_estimate(&self) -> usize {
        BATCH_HEADER_BYTES + 16 + self.bytes
    }

    pub fn finish(&mut self) -> AlignedVec<16> {
        self.bytes = 0;
        encode_batch(std::mem::take(&mut self.commands))
    }
}

/// An upper bound on the archived size of one command: its archived enum (tag, relative
/// pointers, lengths) plus its bytes, each rounded up to 4. Summed over a batch, plus
/// [`BATCH_SLACK_BYTES`], it bounds the archive, so a buffer sized from it never regrows while a
/// batch is archived into it (a regrowth copies the whole entry).
pub fn command_size_estimate(command: &Command) -> usize {
    let pad = |n: usize| n.div_ceil(4) * 4;
    std::mem::size_of::<ArchivedCommand>()
        + match command {
            Command::Put { key, value } => pad(key.len()) + pad(value.len()),
            Command::Delete { key } | Command::Get { key } => pad(key.len()),
            Command::CompareAndSwap { key, expected, new } => {
                pad(key.len())
                    + expected.as_ref().map_or(0, |v| pad(v.len()))
                    + new.as_ref().map_or(0, |v| pad(v.len()))
            }
        }
}

/// A validated batch, read in place. Holds either the caller's bytes (when the archive is
/// 16-byte aligned, as in the WAL) or an aligned copy (bytes from a network frame at any offset).
#[derive(Debug)]
pub struct BatchView<'a> {
    storage: Storage<'a>,
}

#[derive(Debug)]
enum Storage<'a> {
    Borrowed(&'a [u8]),
    Copied(AlignedVec<16>),
}

impl<'a> BatchView<'a> {
    /// Checks the header, the crc and the archive (bytecheck). Never panics on any input.
    pub fn new(payload: &'a [u8]) -> Result<BatchView<'a>, SmError> {
        if payload.len() < BATCH_HEADER_BYTES {
            return Err(SmError::BadBatch(format!(
                "{} bytes is shorter than the header",
                payload.len()
            )));
        }
        if payload[0..2] != BATCH_MAGIC {
            return Err(SmError::BadBatch("bad magic".into()));
        }
        if payload[2] != BATCH_VERSION {
            return Err(SmError::BadBatch(format!(
                "format version {}, this build reads {BATCH_VERSION}",
                payload[2]
            )));
        }
        if payload[3] != 0 {
            return Err(SmError::BadBatch("reserved header byte is not zero".into()));
        }
        let len = u32::from_le_bytes(payload[4..8].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(payload[8..12].try_into().unwrap());
        let count = u32::from_le_bytes(payload[12..16].try_into().unwrap()) as usize;
        let archive = &payload[BATCH_HEADER_BYTES..];
        if archive.len() != len {
            return Err(SmError::BadBatch(format!(
                "archive is {} bytes, the header says {len}",
                archive.len()
            )));
        }
        if crc32c::crc32c(archive) != crc {
            return Err(SmError::BadBatch("crc32c mismatch".into()));
        }
        let storage = if (archive.as_ptr() as usize) % 16 == 0 {
            Storage::Borrowed(archive)
        } else {
            let mut copy = AlignedVec::<16>::with_capacity(len);
            copy.extend_from_slice(archive);
            Storage::Copied(copy)
        };
        let view = BatchView { storage };
        let batch = rkyv::access::<ArchivedBatch, rancor::Error>(view.bytes())
            .map_err(|e| SmError::BadBatch(format!("archive does not validate: {e}")))?;
        if batch.commands.len() != count {
            return Err(SmError::BadBatch(format!(
                "archive holds {} commands, the header says {count}",
                batch.commands.len()
            )));
        }
        Ok(view)
    }

    fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Borrowed(bytes) => bytes,
            Storage::Copied(copy) => copy,
        }
    }

    /// Whether validation had to copy the archive to align it.
    pub fn copied(&self) -> bool {
        matches!(self.storage, Storage::Copied(_))
    }

    /// The archived batch, already validated.
    pub fn batch(&self) -> &ArchivedBatch {
        // SAFETY: `new` validated exactly these bytes with `rkyv::access`, and they are immutable
        // for the view's lifetime.
        unsafe { rkyv::access_unchecked::<ArchivedBatch>(self.bytes()) }
    }
}
