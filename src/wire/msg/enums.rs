//! Small enums and bit sets carried by frames.

use crate::wire::WireError;

/// How a DATA payload is encoded: the codec ids of the protocol, and the
/// one codec type of the tree (`crate::compress` codes with it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// The payload is the raw chunk.
    None = 0,
    /// LZ4 block format.
    Lz4 = 1,
    /// A zstd frame.
    Zstd = 2,
}

impl Codec {
    /// The codec for a wire byte.
    pub fn from_u8(code: u8) -> Result<Self, WireError> {
        match code {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Lz4),
            2 => Ok(Codec::Zstd),
            _ => Err(WireError::UnknownCodec { code }),
        }
    }

    /// The wire byte of this codec.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Codec::None => "raw",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        })
    }
}

/// What a pass does (the HELLO `mode` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum PassMode {
    /// Every data range of the source (v1 behaviour).
    #[default]
    Full = 0,
    /// Only the ranges a PLAN lists, on top of a base sync.
    Incremental = 1,
    /// Compare block digests with the target, send the blocks that differ.
    Delta = 2,
}

impl PassMode {
    /// The mode for a HELLO byte.
    pub fn from_u8(code: u8) -> Result<Self, WireError> {
        match code {
            0 => Ok(PassMode::Full),
            1 => Ok(PassMode::Incremental),
            2 => Ok(PassMode::Delta),
            _ => Err(WireError::BadField {
                frame: "HELLO",
                field: "mode",
                why: "is not 0 (full), 1 (incremental) or 2 (delta): upgrade the receiver",
            }),
        }
    }

    /// The HELLO byte of this mode.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for PassMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PassMode::Full => "full",
            PassMode::Incremental => "incremental",
            PassMode::Delta => "delta",
        })
    }
}

/// Feature bits offered in HELLO and accepted in WELCOME. Unknown bits are
/// kept as received; a receiver answers with the intersection of what was
/// offered and what it supports, so unknown bits are never accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u32);

impl Features {
    /// DATA frames may use [`Codec::Lz4`].
    pub const LZ4: Features = Features(1 << 0);
    /// DATA frames may use [`Codec::Zstd`].
    pub const ZSTD: Features = Features(1 << 1);
    /// Chunk and image digests are BLAKE3 (required in v1).
    pub const BLAKE3: Features = Features(1 << 2);
    /// The receiver keeps a journal and WELCOME carries durable ranges.
    pub const RESUME: Features = Features(1 << 3);
    /// DATA `raw_digest` is XXH3-128 of the raw bytes (16 bytes, little
    /// endian, then 16 zero bytes) instead of BLAKE3: the same protection
    /// against corruption between the read and the write, at a fraction of
    /// the CPU (TLS already authenticates the bytes in flight). The image
    /// digest of a verify pass stays BLAKE3.
    pub const XXH3: Features = Features(1 << 4);
    /// Every bit this build knows.
    pub const KNOWN: Features = Features(0b1_1111);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits set in both.
    pub fn intersect(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// Bits set in either.
    pub fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }
}

/// HELLO flags. Unknown bits are refused: they would change what the
/// receiver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct HelloFlags(pub u32);

impl HelloFlags {
    /// Discard any journal for this job and start over.
    pub const RESTART: HelloFlags = HelloFlags(1 << 0);
    /// A fresh job may replace an existing, non-empty target file that no
    /// journal of the receiver describes.
    pub const OVERWRITE: HelloFlags = HelloFlags(1 << 1);
    /// Every bit this build knows.
    pub const KNOWN: HelloFlags = HelloFlags(Self::RESTART.0 | Self::OVERWRITE.0);

    /// Whether `RESTART` is set.
    pub fn restart(self) -> bool {
        self.0 & Self::RESTART.0 != 0
    }

    /// Whether `OVERWRITE` is set.
    pub fn overwrite(self) -> bool {
        self.0 & Self::OVERWRITE.0 != 0
    }

    pub(crate) fn check(bits: u32) -> Result<(), WireError> {
        if bits & !Self::KNOWN.0 != 0 {
            return Err(WireError::BadField {
                frame: "HELLO",
                field: "flags",
                why: "has bits this build does not know: upgrade the receiver",
            });
        }
        Ok(())
    }
}

/// Why a peer ended a stream (ERROR frame), or refused a HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Protocol version mismatch.
    Version,
    /// HELLO fields the receiver cannot accept (bad chunk size, features…).
    BadRequest,
    /// The receiver is not configured to write this target.
    TargetNotAllowed,
    /// Resume refused: the journal was written for another source identity.
    SourceMismatch,
    /// The receiver's journal for this job cannot be read; restart the job.
    JournalDamaged,
    /// The target is in use by another job.
    Busy,
    /// A chunk's digest did not match its bytes.
    DigestMismatch,
    /// The target could not be written or flushed.
    TargetIo,
    /// The source could not be read.
    SourceIo,
    /// The frames broke the protocol.
    Protocol,
    /// The job was cancelled by an operator.
    Cancelled,
    /// No frame for longer than the stall timeout.
    Timeout,
    /// A bug or an unexpected condition.
    Internal,
    /// An incremental pass's base is not the target's last complete sync
    /// (or the target changed since).
    BaseMismatch,
    /// A code this build does not know (kept so it can be reported).
    Other(u16),
}

impl ErrorCode {
    const TABLE: [(ErrorCode, u16); 14] = [
        (ErrorCode::Version, 1),
        (ErrorCode::BadRequest, 2),
        (ErrorCode::TargetNotAllowed, 3),
        (ErrorCode::SourceMismatch, 4),
        (ErrorCode::JournalDamaged, 5),
        (ErrorCode::Busy, 6),
        (ErrorCode::DigestMismatch, 7),
        (ErrorCode::TargetIo, 8),
        (ErrorCode::SourceIo, 9),
        (ErrorCode::Protocol, 10),
        (ErrorCode::Cancelled, 11),
        (ErrorCode::Timeout, 12),
        (ErrorCode::Internal, 13),
        (ErrorCode::BaseMismatch, 14),
    ];

    /// The code for a wire value (unknown values become [`ErrorCode::Other`]).
    pub fn from_u16(value: u16) -> Self {
        Self::TABLE
            .iter()
            .find(|(_, v)| *v == value)
            .map_or(ErrorCode::Other(value), |(c, _)| *c)
    }

    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Other(v) => v,
            known => Self::TABLE
                .iter()
                .find(|(c, _)| *c == known)
                .map_or(0, |(_, v)| *v),
        }
    }
}
