//! The fixed frame header and the per-type payload bounds.
//!
//! ```text
//! 0       4        5     6        8              12
//! | magic | version | type | flags | payload_len |  (little-endian)
//! ```

use super::pass::{MAX_DIGESTS, MAX_PLAN_RANGES, MAX_REPLAN_RANGES};
use super::{MAX_ACK_RANGES, MAX_CHUNK_BYTES, MAX_RESUME_RANGES, MAX_STRING_BYTES, WireError};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"DFRY";
/// The only protocol version this build speaks (exact match).
pub const PROTOCOL_VERSION: u8 = 2;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// Frame types (the `type` byte of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// HELLO: the sender opens a stream.
    Hello = 1,
    /// WELCOME: the receiver accepts a HELLO.
    Welcome = 2,
    /// DATA: one chunk.
    Data = 3,
    /// ZERO: a range that reads as zeros.
    Zero = 4,
    /// BARRIER: make what came durable, then ACK.
    Barrier = 5,
    /// ACK: durability report.
    Ack = 6,
    /// DONE: the sender has nothing more for the stream.
    Done = 7,
    /// VERIFY_REQUEST: read the target back and digest it.
    VerifyRequest = 8,
    /// VERIFY_RESULT: the digest of the target.
    VerifyResult = 9,
    /// ERROR: the last frame before closing.
    Error = 10,
    /// PING: keepalive.
    Ping = 11,
    /// PONG: answer to a PING.
    Pong = 12,
    /// PLAN: an incremental pass's changed ranges (v2).
    Plan = 13,
    /// DIGEST_REQUEST: digest blocks of the target (v2, delta passes).
    DigestRequest = 14,
    /// DIGESTS: the answer to a DIGEST_REQUEST (v2).
    Digests = 15,
}

/// Bytes of a length-prefixed string at its longest.
#[expect(clippy::cast_possible_truncation, reason = "MAX_STRING_BYTES is 4096")]
const STRING_MAX_ON_WIRE: u32 = 2 + MAX_STRING_BYTES as u32;

/// Fixed part of a Hello: job id, size, chunk size, features, stream index
/// and count, flags, mode, sync id, base sync id, plan digest, and three
/// string length prefixes.
pub(crate) const HELLO_MIN: u32 = 16 + 8 + 4 + 4 + 2 + 2 + 4 + 1 + 16 + 16 + 32 + 3 * 2;
/// Fixed part of a Welcome: features, instance, sync id and two range
/// counts.
pub(crate) const WELCOME_MIN: u32 = 4 + 8 + 16 + 4 + 4;
/// Fixed part of a Digests: offset, block size, digest count.
pub(crate) const DIGESTS_MIN: u32 = 8 + 4 + 4;
/// Bytes of one block digest on the wire.
pub(crate) const BLOCK_DIGEST_LEN: u32 = 16;
/// Fixed part of an Ack: seq, durable total, range count.
pub(crate) const ACK_MIN: u32 = 8 + 8 + 4;
/// Fixed part of an Error: code and string length prefix.
pub(crate) const ERROR_MIN: u32 = 2 + 2;
/// Bytes of one range on the wire.
pub(crate) const RANGE_LEN: u32 = 16;

impl FrameType {
    /// The frame type for a header byte.
    pub fn from_u8(code: u8) -> Result<Self, WireError> {
        use FrameType::*;
        Ok(match code {
            1 => Hello,
            2 => Welcome,
            3 => Data,
            4 => Zero,
            5 => Barrier,
            6 => Ack,
            7 => Done,
            8 => VerifyRequest,
            9 => VerifyResult,
            10 => Error,
            11 => Ping,
            12 => Pong,
            13 => Plan,
            14 => DigestRequest,
            15 => Digests,
            _ => return Err(WireError::UnknownFrameType { code }),
        })
    }

    /// Upper-case name used in error messages and docs.
    pub fn name(self) -> &'static str {
        use FrameType::*;
        match self {
            Hello => "HELLO",
            Welcome => "WELCOME",
            Data => "DATA",
            Zero => "ZERO",
            Barrier => "BARRIER",
            Ack => "ACK",
            Done => "DONE",
            VerifyRequest => "VERIFY_REQUEST",
            VerifyResult => "VERIFY_RESULT",
            Error => "ERROR",
            Ping => "PING",
            Pong => "PONG",
            Plan => "PLAN",
            DigestRequest => "DIGEST_REQUEST",
            Digests => "DIGESTS",
        }
    }

    /// Smallest and largest payload length (bytes) a frame of this type
    /// may claim. Checked as soon as a header is complete, before any
    /// payload buffer is allocated.
    pub fn payload_bounds(self) -> (u32, u32) {
        use FrameType::*;
        match self {
            Hello => (HELLO_MIN, HELLO_MIN - 6 + 3 * STRING_MAX_ON_WIRE),
            Welcome => (
                WELCOME_MIN,
                WELCOME_MIN + RANGE_LEN * (MAX_RESUME_RANGES + MAX_REPLAN_RANGES),
            ),
            Data => {
                let head = super::msg::DATA_HEAD_BYTES;
                (head + 1, head + MAX_CHUNK_BYTES)
            }
            Zero => (16, 16),
            Barrier | Ping | Pong => (8, 8),
            Ack => (ACK_MIN, ACK_MIN + RANGE_LEN * MAX_ACK_RANGES),
            Done => (16, 16),
            VerifyRequest => (4, 4),
            VerifyResult => (40, 40),
            Error => (ERROR_MIN, ERROR_MIN - 2 + STRING_MAX_ON_WIRE),
            Plan => (4, 4 + RANGE_LEN * MAX_PLAN_RANGES),
            DigestRequest => (16, 16),
            Digests => (DIGESTS_MIN, DIGESTS_MIN + BLOCK_DIGEST_LEN * MAX_DIGESTS),
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub frame_type: FrameType,
    /// Bytes of payload after the header.
    pub payload_len_bytes: u32,
}

impl Header {
    /// A header for `frame_type` with `payload_len_bytes`, checked against
    /// the bounds of the type.
    pub fn new(frame_type: FrameType, payload_len_bytes: u32) -> Result<Self, WireError> {
        let header = Header {
            frame_type,
            payload_len_bytes,
        };
        header.check_len()?;
        Ok(header)
    }

    /// The 12 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = PROTOCOL_VERSION;
        out[5] = self.frame_type as u8;
        out[6..8].copy_from_slice(&0u16.to_le_bytes());
        out[8..12].copy_from_slice(&self.payload_len_bytes.to_le_bytes());
        out
    }

    /// Parses and validates 12 header bytes: magic, version, type, reserved
    /// flags and the payload length against the bounds of the type, in that
    /// order (so a peer of another version always gets a version error).
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let magic: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(WireError::BadMagic { got: magic });
        }
        if bytes[4] != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion { got: bytes[4] });
        }
        let frame_type = FrameType::from_u8(bytes[5])?;
        let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
        if flags != 0 {
            return Err(WireError::ReservedFlags { flags });
        }
        let payload_len_bytes = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        Header::new(frame_type, payload_len_bytes)
    }

    fn check_len(&self) -> Result<(), WireError> {
        let (min_bytes, max_bytes) = self.frame_type.payload_bounds();
        let frame = self.frame_type.name();
        let len_bytes = self.payload_len_bytes;
        if len_bytes > max_bytes {
            return Err(WireError::FrameTooLarge {
                frame,
                len_bytes,
                max_bytes,
            });
        }
        if len_bytes < min_bytes {
            return Err(WireError::FrameTooSmall {
                frame,
                len_bytes,
                min_bytes,
            });
        }
        Ok(())
    }
}
