//! The frames: what each carries, how it is encoded, parsed and validated.
//!
//! One validation per message ([`Frame::validate`]) is used on both sides:
//! before a frame is encoded and after it is parsed. The encoders and
//! parsers are in `codec.rs`.

use super::header::{FrameType, HEADER_LEN};
use super::{
    MAX_ACK_RANGES, MAX_CHUNK_BYTES, MAX_RESUME_RANGES, MAX_STREAMS, MAX_STRING_BYTES, WireError,
};

mod codec;
mod enums;
mod reader;

pub use codec::encode_data_header;
pub use enums::{Codec, ErrorCode, Features, HelloFlags};

/// Bytes of the fixed part of a DATA payload (offset, raw length, codec,
/// three reserved bytes, digest).
pub const DATA_HEAD_LEN: usize = DATA_HEAD_BYTES as usize;
/// [`DATA_HEAD_LEN`] as a frame length (`u32`).
pub const DATA_HEAD_BYTES: u32 = 8 + 4 + 1 + 3 + 32;
/// Bytes before the payload of a DATA frame: header plus fixed part.
pub const DATA_HEADER_LEN: usize = HEADER_LEN + DATA_HEAD_LEN;

/// A byte range `[offset, offset + len_bytes)` of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteRange {
    /// Where the range starts.
    pub offset: u64,
    /// How long it is.
    pub len_bytes: u64,
}

/// HELLO: the first frame of every stream, sender → receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// 16 random bytes naming the job; the same on every stream of a job
    /// and across reconnects (resume keys on it).
    pub job_id: [u8; 16],
    /// Size of the source image.
    pub size_bytes: u64,
    /// Chunk size the sender uses; 1 ..= [`MAX_CHUNK_BYTES`].
    pub chunk_size_bytes: u32,
    /// Features the sender offers.
    pub features: Features,
    /// This stream's index, `< stream_count`.
    pub stream_index: u16,
    /// Streams in the job, 1 ..= [`MAX_STREAMS`].
    pub stream_count: u16,
    /// What the sender asks of the receiver for this job.
    pub flags: HelloFlags,
    /// Target name the receiver maps to a file / device / export.
    pub target: String,
    /// Sender-derived identity of the source (size + generation, or a
    /// digest); resume refuses a journal written for another identity.
    pub source_identity: String,
}

/// WELCOME: the receiver's acceptance of a HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Features both sides use (a subset of those offered).
    pub features: Features,
    /// Random per job instance on the receiver: a new value means the
    /// receiver started the job again from its journal (after a restart),
    /// so acknowledgements of an older instance no longer count.
    pub instance: u64,
    /// Ranges already durable on the target for this job, sorted and
    /// disjoint; at most [`MAX_RESUME_RANGES`].
    pub durable: Vec<ByteRange>,
}

/// The fixed part of a DATA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHead {
    /// Where the chunk goes in the image.
    pub offset: u64,
    /// Length of the raw (uncompressed) chunk; 1 ..= [`MAX_CHUNK_BYTES`].
    pub raw_len_bytes: u32,
    /// How the payload is encoded.
    pub codec: Codec,
    /// BLAKE3 of the raw bytes.
    pub raw_digest: [u8; 32],
}

/// DATA: one chunk, raw or compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// The fixed part.
    pub head: DataHead,
    /// The chunk as sent: `raw_len_bytes` long for [`Codec::None`], at most
    /// `raw_len_bytes` long when compressed.
    pub payload: Vec<u8>,
}

/// ACK: durability report, receiver → sender, answers a BARRIER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The BARRIER sequence number answered.
    pub seq: u64,
    /// Bytes durable on the target for the whole job so far.
    pub bytes_durable_total: u64,
    /// Ranges that became durable since the previous ACK on this stream,
    /// sorted and disjoint; at most [`MAX_ACK_RANGES`].
    pub durable_added: Vec<ByteRange>,
}

/// ERROR: the last frame before the sender of it closes the stream. In
/// place of a WELCOME it is the receiver's refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What kind of error.
    pub code: ErrorCode,
    /// What went wrong, for the peer's operator.
    pub message: String,
}

/// Every frame of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The first frame of every stream, sender → receiver.
    Hello(Hello),
    /// The receiver's acceptance of a HELLO.
    Welcome(Welcome),
    /// One chunk.
    Data(Data),
    /// The range must read as zeros on the target.
    Zero(ByteRange),
    /// Make everything received on this stream durable, then ACK `seq`.
    Barrier {
        /// Sequence number the ACK answers with.
        seq: u64,
    },
    /// The receiver's answer to a BARRIER.
    Ack(Ack),
    /// The sender has nothing more for this stream.
    Done {
        /// DATA payload bytes sent on this stream.
        total_bytes_sent: u64,
        /// Frames sent on this stream.
        frames: u64,
    },
    /// Read the whole target back and digest it (see `ImageDigest`).
    VerifyRequest {
        /// Window size of the image digest.
        window_bytes: u32,
    },
    /// The receiver's image digest of the target.
    VerifyResult {
        /// The image digest.
        digest: [u8; 32],
        /// Bytes read back.
        bytes_read: u64,
    },
    /// The last frame before closing.
    Error(ErrorFrame),
    /// Keepalive; the peer answers PONG with the same nonce.
    Ping {
        /// Echoed by the PONG.
        nonce: u64,
    },
    /// The answer to a PING.
    Pong {
        /// The PING's nonce.
        nonce: u64,
    },
}

impl DataHead {
    /// Checks the fields and the payload length that goes with them.
    pub fn validate(&self, payload_len_bytes: u32) -> Result<(), WireError> {
        if self.raw_len_bytes > MAX_CHUNK_BYTES {
            return Err(WireError::ChunkTooLarge {
                raw_len_bytes: self.raw_len_bytes,
                max_bytes: MAX_CHUNK_BYTES,
            });
        }
        if self.raw_len_bytes == 0 {
            return Err(bad("DATA", "raw_len", "is zero: send nothing instead"));
        }
        if self
            .offset
            .checked_add(u64::from(self.raw_len_bytes))
            .is_none()
        {
            return Err(bad("DATA", "offset + raw_len", "overflows 64 bits"));
        }
        match self.codec {
            Codec::None if payload_len_bytes != self.raw_len_bytes => Err(bad(
                "DATA",
                "payload length",
                "differs from raw_len for an uncompressed chunk",
            )),
            _ if payload_len_bytes > self.raw_len_bytes => Err(bad(
                "DATA",
                "payload length",
                "is above raw_len: send the chunk uncompressed instead",
            )),
            _ if payload_len_bytes == 0 => Err(bad("DATA", "payload length", "is zero")),
            _ => Ok(()),
        }
    }
}

fn bad(frame: &'static str, field: &'static str, why: &'static str) -> WireError {
    WireError::BadField { frame, field, why }
}

/// Checks a range list: non-empty ranges, no overflow, sorted, disjoint.
fn check_ranges(field: &'static str, ranges: &[ByteRange], max: u32) -> Result<(), WireError> {
    if ranges.len() as u64 > u64::from(max) {
        return Err(WireError::ListTooLong {
            field,
            count: ranges.len() as u64,
            max: u64::from(max),
        });
    }
    let mut end_prev = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        let bad_range = |why| WireError::BadRange {
            field,
            offset: r.offset,
            len_bytes: r.len_bytes,
            why,
        };
        if r.len_bytes == 0 {
            return Err(bad_range("is empty"));
        }
        let Some(end) = r.offset.checked_add(r.len_bytes) else {
            return Err(bad_range("overflows 64 bits"));
        };
        if i > 0 && r.offset < end_prev {
            return Err(bad_range("overlaps or precedes the previous range"));
        }
        end_prev = end;
    }
    Ok(())
}

fn check_string(field: &'static str, s: &str) -> Result<(), WireError> {
    if s.len() > MAX_STRING_BYTES {
        return Err(WireError::StringTooLong {
            field,
            len_bytes: s.len(),
            max_bytes: MAX_STRING_BYTES,
        });
    }
    Ok(())
}

impl Frame {
    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Data(_) => FrameType::Data,
            Frame::Zero(_) => FrameType::Zero,
            Frame::Barrier { .. } => FrameType::Barrier,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Done { .. } => FrameType::Done,
            Frame::VerifyRequest { .. } => FrameType::VerifyRequest,
            Frame::VerifyResult { .. } => FrameType::VerifyResult,
            Frame::Error(_) => FrameType::Error,
            Frame::Ping { .. } => FrameType::Ping,
            Frame::Pong { .. } => FrameType::Pong,
        }
    }

    /// Checks every field against the protocol's bounds; run before
    /// encoding and after parsing.
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Frame::Hello(h) => {
                if h.chunk_size_bytes == 0 || h.chunk_size_bytes > MAX_CHUNK_BYTES {
                    return Err(bad("HELLO", "chunk_size", "must be 1 byte ..= 32 MiB"));
                }
                if h.stream_count == 0 || h.stream_count > MAX_STREAMS {
                    return Err(bad("HELLO", "stream_count", "must be 1 ..= 64"));
                }
                if h.stream_index >= h.stream_count {
                    return Err(bad("HELLO", "stream_index", "must be below stream_count"));
                }
                HelloFlags::check(h.flags.0)?;
                check_string("HELLO target", &h.target)?;
                check_string("HELLO source_identity", &h.source_identity)
            }
            Frame::Welcome(w) => check_ranges("WELCOME durable", &w.durable, MAX_RESUME_RANGES),
            Frame::Data(d) => {
                let len = u32::try_from(d.payload.len()).map_err(|_| WireError::ChunkTooLarge {
                    raw_len_bytes: u32::MAX,
                    max_bytes: MAX_CHUNK_BYTES,
                })?;
                d.head.validate(len)
            }
            Frame::Zero(r) => check_ranges("ZERO", std::slice::from_ref(r), 1),
            Frame::Ack(a) => check_ranges("ACK durable_added", &a.durable_added, MAX_ACK_RANGES),
            Frame::VerifyRequest { window_bytes } => {
                if *window_bytes == 0 || *window_bytes > MAX_CHUNK_BYTES {
                    return Err(bad("VERIFY_REQUEST", "window", "must be 1 byte ..= 32 MiB"));
                }
                Ok(())
            }
            Frame::Error(e) => check_string("ERROR message", &e.message),
            Frame::Barrier { .. }
            | Frame::Done { .. }
            | Frame::VerifyResult { .. }
            | Frame::Ping { .. }
            | Frame::Pong { .. } => Ok(()),
        }
    }
}
