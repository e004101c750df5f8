//! The frames: what each carries, how it is encoded, parsed and validated.
//!
//! One validation per message ([`Frame::validate`], in `validate.rs`) is
//! used on both sides: before a frame is encoded and after it is parsed.
//! The encoders and parsers are in `codec.rs`.

use super::header::HEADER_LEN;
use super::pass::SyncId;

mod codec;
mod enums;
mod reader;
mod validate;

pub use codec::encode_data_header;
pub use enums::{Codec, ErrorCode, Features, HelloFlags, PassMode};
pub(crate) use validate::bad;

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
    /// Chunk size the sender uses; 1 ..= [`super::MAX_CHUNK_BYTES`].
    pub chunk_size_bytes: u32,
    /// Features the sender offers.
    pub features: Features,
    /// This stream's index, `< stream_count`.
    pub stream_index: u16,
    /// Streams in the job, 1 ..= [`super::MAX_STREAMS`].
    pub stream_count: u16,
    /// What the sender asks of the receiver for this job.
    pub flags: HelloFlags,
    /// Target name the receiver maps to a file / device / export.
    pub target: String,
    /// Sender-derived identity of the source (size + generation, or a
    /// digest); resume refuses a journal written for another identity.
    pub source_identity: String,
    /// What the pass does.
    pub mode: PassMode,
    /// Random per send run, never all zero: the id the target records
    /// when this job completes.
    pub sync_id: SyncId,
    /// [`PassMode::Incremental`]: the sync the changes are relative to
    /// (never all zero); otherwise all zero.
    pub base_sync_id: SyncId,
    /// [`PassMode::Incremental`]: `wire::plan_digest` of the PLAN that
    /// follows; otherwise all zero.
    pub plan_digest: [u8; 32],
    /// Free text naming the change (empty when none was given).
    pub change_id: String,
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
    /// The id the target records when this job completes; for a target
    /// that is already complete, the id it recorded then. Never all zero.
    pub sync_id: SyncId,
    /// Ranges already durable on the target for this job, sorted and
    /// disjoint; at most [`super::MAX_RESUME_RANGES`].
    pub durable: Vec<ByteRange>,
    /// Incremental passes only: ranges an interrupted earlier pass on the
    /// same base may have changed on the target that this plan does not
    /// list; the sender sends them too. Sorted and disjoint; at most
    /// [`super::pass::MAX_REPLAN_RANGES`].
    pub replan: Vec<ByteRange>,
}

/// The fixed part of a DATA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHead {
    /// Where the chunk goes in the image.
    pub offset: u64,
    /// Length of the raw (uncompressed) chunk; 1 ..= [`super::MAX_CHUNK_BYTES`].
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
    /// sorted and disjoint; at most [`super::MAX_ACK_RANGES`].
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

/// Every frame of protocol version 2.
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
    /// An incremental pass's changed set (sorted, disjoint, at most
    /// [`super::pass::MAX_PLAN_RANGES`]), right after HELLO on every stream.
    Plan(Vec<ByteRange>),
    /// Delta passes: digest the target's bytes in `[offset, offset +
    /// len_bytes)` block by block.
    DigestRequest {
        /// Where the span starts.
        offset: u64,
        /// Length of the span, 1 byte ..= 32 MiB.
        len_bytes: u32,
        /// Block size, a power of two in 4 KiB ..= 1 MiB.
        block_bytes: u32,
    },
    /// The answer to a DIGEST_REQUEST: [`super::block_digest`] of each
    /// block (the last one may be short; bytes past the target's end read
    /// as zeros).
    Digests {
        /// Where the first block starts.
        offset: u64,
        /// Block size.
        block_bytes: u32,
        /// One digest per block, at least one.
        digests: Vec<[u8; 16]>,
    },
}
