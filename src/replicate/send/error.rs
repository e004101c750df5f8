//! Why a send was refused or failed. The messages name no command-line
//! flags: the command line adds them ([`crate::cli`]).

use crate::pipeline::CopyError;

/// Why a send was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Neither a TLS directory nor plaintext was asked for.
    #[error("a TLS directory is required (or plaintext on both sides)")]
    NoTransportSecurity,
    /// Both a TLS directory and plaintext were asked for.
    #[error(
        "both a TLS directory and plaintext given: choose one (TLS unless the network is trusted)"
    )]
    TlsAndPlaintext,
    #[error("the I/O timeout must be more than 0")]
    ZeroIoTimeout,
    #[error("the number of streams must be 1..={max}, not {got}")]
    Streams { got: u32, max: u16 },
    /// An incremental pass names an empty dirty bitmap or changed-areas
    /// path.
    #[error("an incremental pass needs a dirty bitmap name or a changed-areas file")]
    NoChangedSource,
    /// The delta block size is out of range.
    #[error("the delta block size must be a power of two in {min}..={max} bytes, not {got}")]
    DeltaBlock { got: u32, min: u32, max: u32 },
    /// The change id is too long.
    #[error("the change id has {got} bytes; at most {max}")]
    ChangeIdTooLong { got: usize, max: usize },
    /// Reading the source, the pipeline, the engine, the link to the
    /// receiver (what a send disk of a job reports).
    #[error(transparent)]
    Copy(#[from] CopyError),
}

impl SendError {
    /// Whether the options were refused (before anything was opened or
    /// dialled).
    pub fn is_usage(&self) -> bool {
        match self {
            SendError::Copy(CopyError::Usage(_)) => true,
            SendError::Copy(_) => false,
            _ => true,
        }
    }
}
