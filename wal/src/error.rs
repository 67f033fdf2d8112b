//! Operating errors of the WAL. A bug (a caller breaking a documented precondition) panics; what
//! the disk, the files or the configuration can do wrong is a [`WalError`].

use std::io;

/// An operating error: what failed, on which file, during which operation.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The operating system failed an IO call.
    #[error("wal: {op} {file}: {source}")]
    Io {
        op: &'static str,
        file: String,
        #[source]
        source: io::Error,
    },
    /// A write or sync failed earlier. Whether its bytes reached the disk is unknown, and a
    /// retried fsync can report success without them ("fsyncgate"), so the WAL takes no more
    /// appends; restart the shard to recover from what is on disk.
    #[error("wal: refusing {op}: an earlier write or sync failed ({cause}); restart to recover")]
    Failed { op: &'static str, cause: String },
    /// Bytes on disk are damaged where a torn write cannot explain it: valid data follows the
    /// damage. Starting would silently drop acknowledged entries, so recovery refuses.
    #[error("wal: corruption in segment {file} at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    /// A read found a record whose checksum or identity does not match what the index expects.
    #[error("wal: read of group {group} index {index} from {file} at offset {offset}: {reason}")]
    BadRead {
        group: u64,
        index: u64,
        file: String,
        offset: u64,
        reason: String,
    },
    /// One record would not fit in a batch.
    #[error("wal: a record of {bytes} bytes exceeds the batch limit of {limit} bytes (wal.batch_bytes_max)")]
    TooLarge { bytes: usize, limit: usize },
    /// A metadata record larger than [`crate::META_BYTES_MAX`].
    #[error("wal: a metadata record of {bytes} bytes exceeds {limit} bytes")]
    MetaTooLarge { bytes: usize, limit: usize },
    /// The configuration cannot work.
    #[error("wal config: {key}: {reason}")]
    Config { key: &'static str, reason: String },
}

impl WalError {
    /// Whether the same call may succeed later without operator action.
    pub fn is_retryable(&self) -> bool {
        match self {
            WalError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }

    pub(crate) fn io(op: &'static str, file: impl Into<String>, source: io::Error) -> WalError {
        WalError::Io {
            op,
            file: file.into(),
            source,
        }
    }
}

/// Why `entries` or `term` cannot answer, mirroring raft-rs's `StorageError` contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The index is below the first retained entry (compacted away).
    #[error("index {index} of group {group} is compacted")]
    Compacted { group: u64, index: u64 },
    /// The index is past the last entry.
    #[error("index {index} of group {group} is past the last entry")]
    Unavailable { group: u64, index: u64 },
    /// The entry exists on disk but not in the cache: read it with the async read path.
    #[error("index {index} of group {group} is not cached; read it from disk")]
    NotCached { group: u64, index: u64 },
}
