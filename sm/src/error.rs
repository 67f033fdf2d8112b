//! Operating errors of the state machine crate. A bug panics; bad input, a damaged file or a
//! failing disk is an [`SmError`] that names what failed, where, and during which operation.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum SmError {
    /// A command exceeds a configured limit; refused at the API, never in apply.
    #[error("sm: {what} of {bytes} bytes exceeds the limit of {limit} bytes ({key})")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        limit: usize,
        /// The config key that sets the limit.
        key: &'static str,
    },
    /// Bytes that should be a batch are not (from disk or network): refused, nothing applied.
    #[error("sm: bad batch: {0}")]
    BadBatch(String),
    /// The operating system failed an IO call.
    #[error("sm: {op} {file}: {source}")]
    Io {
        op: &'static str,
        file: String,
        #[source]
        source: io::Error,
    },
    /// A file's contents fail their checksum or structure: the store refuses to serve them.
    #[error("sm: corrupt {file} at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    /// A snapshot chunk is damaged, out of order, or from another snapshot.
    #[error("sm: bad snapshot chunk {chunk}: {reason}")]
    BadChunk { chunk: u64, reason: String },
    /// An earlier write failed; the store refuses further work until reopened.
    #[error("sm: refusing {op}: an earlier write failed ({cause}); reopen the store")]
    Failed { op: &'static str, cause: String },
}

impl SmError {
    pub(crate) fn io(op: &'static str, file: impl Into<String>, source: io::Error) -> SmError {
        SmError::Io {
            op,
            file: file.into(),
            source,
        }
    }

    /// Whether this is the file system running out of space (ENOSPC, EDQUOT). From
    /// [`crate::StateMachine::checkpoint_step`] it means the round was abandoned and the machine
    /// goes on: the engine retries the checkpoint later instead of stopping the shard.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            SmError::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                    || source.kind() == io::ErrorKind::StorageFull
            }
            _ => false,
        }
    }
}
