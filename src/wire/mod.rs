//! The sender ↔ receiver wire protocol (see docs/wire-protocol.md).
//!
//! Sans-IO: everything here works on byte slices and `Vec<u8>`s; the
//! transport (TLS 1.3 or plaintext TCP) and the I/O engine are the driver's
//! business.
//!
//! * [`header`]: the fixed 12-byte frame header, frame types and the
//!   per-type payload bounds checked before anything is allocated.
//! * [`msg`]: the frames ([`Frame`]) and their encoders / parsers.
//! * [`decoder`]: [`FrameDecoder`], the incremental decoder a driver feeds
//!   (or lets read straight into its buffer).
//! * [`digest`]: [`chunk_digest`] and [`ImageDigest`], the whole-image
//!   digest both sides compute for the verify pass ([`ImageDigestStream`]:
//!   the same, front to back in constant memory).
//! * [`pass`] (v2): [`SyncId`], [`plan_digest`] of an incremental pass,
//!   [`block_digest`] of a delta pass, and their bounds.
//!
//! [`decode_any`] is the one-call entry point for fuzz targets.
#![forbid(unsafe_code)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(missing_docs)]

pub mod decoder;
pub mod digest;
pub mod header;
pub mod msg;
pub mod pass;

#[cfg(test)]
mod digest_tests;
#[cfg(test)]
mod malformed_tests;
#[cfg(test)]
mod pass_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use decoder::FrameDecoder;
pub use digest::{ChunkDigest, ImageDigest, ImageDigestStream, StreamingChunkDigest, chunk_digest};
pub use header::{FrameType, HEADER_LEN, Header, MAGIC, PROTOCOL_VERSION};
pub use msg::{
    Ack, ByteRange, Codec, DATA_HEAD_LEN, DATA_HEADER_LEN, Data, DataHead, ErrorCode, ErrorFrame,
    Features, Frame, Hello, HelloFlags, PassMode, Welcome, encode_data_header,
};
pub use pass::{SyncId, block_digest, parse_sync_id, plan_digest, sync_id_hex};

/// Largest raw (uncompressed) chunk a DATA frame may carry.
pub const MAX_CHUNK_BYTES: u32 = 32 * 1024 * 1024;
/// Largest string in any frame (target name, source identity, messages).
pub const MAX_STRING_BYTES: usize = 4096;
/// Largest number of durable ranges in a Welcome (ranges are merged, so
/// this covers any realistic journal).
pub const MAX_RESUME_RANGES: u32 = 1 << 20;
/// Largest number of newly durable ranges in one Ack.
pub const MAX_ACK_RANGES: u32 = 1 << 16;
/// Largest number of streams in one job.
pub const MAX_STREAMS: u16 = 64;

/// Everything that can be wrong with bytes on the wire (or with a frame a
/// caller asks us to encode). Decoding errors are fatal for the stream: the
/// driver answers with an Error frame (code from [`WireError::code`]) and
/// closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first four bytes of a frame are not `DFRY`.
    #[error(
        "bad frame magic {got:02x?} (want \"DFRY\"): the peer is not a diskferry \
         sender/receiver, or TLS is on at one end and off at the other"
    )]
    BadMagic {
        /// The four bytes received.
        got: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks diskferry wire protocol version {got}, this build speaks \
         {PROTOCOL_VERSION}: install the same diskferry release on both hosts"
    )]
    UnsupportedVersion {
        /// The peer's version.
        got: u8,
    },
    /// A frame type this build does not know.
    #[error("unknown frame type {code}: the peer runs a newer or broken diskferry")]
    UnknownFrameType {
        /// The code received.
        code: u8,
    },
    /// Header flag bits that v1 leaves reserved.
    #[error("reserved header flags {flags:#06x} are set: the peer is broken")]
    ReservedFlags {
        /// The flags received.
        flags: u16,
    },
    /// A frame's payload length is above the bound for its type.
    #[error(
        "{frame} frame claims {len_bytes} payload bytes, more than the \
         {max_bytes} allowed: refusing it before allocating"
    )]
    FrameTooLarge {
        /// The frame type.
        frame: &'static str,
        /// The length claimed.
        len_bytes: u32,
        /// The bound.
        max_bytes: u32,
    },
    /// A frame's payload length is below the fixed part of its type.
    #[error(
        "{frame} frame claims {len_bytes} payload bytes, fewer than its {min_bytes}-byte minimum"
    )]
    FrameTooSmall {
        /// The frame type.
        frame: &'static str,
        /// The length claimed.
        len_bytes: u32,
        /// The minimum.
        min_bytes: u32,
    },
    /// The input ended inside a frame (only from one-shot decoding; the
    /// incremental decoder just waits for more bytes).
    #[error("input ends inside a frame: {needed_bytes} more bytes needed; the connection was cut")]
    Truncated {
        /// Bytes missing.
        needed_bytes: usize,
    },
    /// A field runs past the end of the frame payload.
    #[error("{frame} frame ends inside field {field}: the peer is broken")]
    FieldTruncated {
        /// The frame type.
        frame: &'static str,
        /// The field.
        field: &'static str,
    },
    /// Bytes left over after the last field.
    #[error("{frame} frame has {extra_bytes} bytes after its last field: the peer is broken")]
    TrailingBytes {
        /// The frame type.
        frame: &'static str,
        /// Bytes left over.
        extra_bytes: usize,
    },
    /// A string longer than [`MAX_STRING_BYTES`].
    #[error(
        "{field} is {len_bytes} bytes long, more than the {max_bytes} allowed: use a shorter one"
    )]
    StringTooLong {
        /// The field.
        field: &'static str,
        /// The string's length.
        len_bytes: usize,
        /// The bound.
        max_bytes: usize,
    },
    /// A string that is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    StringNotUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A list longer than its bound.
    #[error("{field} has {count} entries, more than the {max} allowed")]
    ListTooLong {
        /// The field.
        field: &'static str,
        /// Entries received.
        count: u64,
        /// The bound.
        max: u64,
    },
    /// A DATA frame's raw length is above [`MAX_CHUNK_BYTES`].
    #[error(
        "DATA frame carries a {raw_len_bytes}-byte chunk, more than the {max_bytes} \
         allowed: use a smaller --chunk-size"
    )]
    ChunkTooLarge {
        /// The chunk length claimed.
        raw_len_bytes: u32,
        /// The bound.
        max_bytes: u32,
    },
    /// A compression codec this build does not know.
    #[error(
        "unknown compression codec {code}: the peer runs a newer or broken diskferry; \
         upgrade so both sides run the same version"
    )]
    UnknownCodec {
        /// The code received.
        code: u8,
    },
    /// A field with a value outside its domain.
    #[error("{frame} frame: {field} {why}")]
    BadField {
        /// The frame type.
        frame: &'static str,
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// A range list entry that is empty, overflows, or is out of order.
    #[error("{field}: range at offset {offset} length {len_bytes} {why}")]
    BadRange {
        /// The field.
        field: &'static str,
        /// The range's offset.
        offset: u64,
        /// The range's length.
        len_bytes: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Image digest geometry that cannot be used.
    #[error("image digest over {size_bytes} bytes in {window_bytes}-byte windows: {why}")]
    DigestGeometry {
        /// The image size.
        size_bytes: u64,
        /// The window size.
        window_bytes: u32,
        /// What is wrong.
        why: &'static str,
    },
    /// A window index past the end of the image.
    #[error("image digest window {index} is out of range (the image has {windows} windows)")]
    WindowOutOfRange {
        /// The window.
        index: u64,
        /// Windows in the image.
        windows: u64,
    },
    /// A window hashed from a buffer of the wrong length.
    #[error("image digest window {index} is {want_bytes} bytes long, got {got_bytes}")]
    WindowLength {
        /// The window.
        index: u64,
        /// The window's length.
        want_bytes: u32,
        /// Bytes supplied.
        got_bytes: usize,
    },
    /// `finish` before every window was supplied.
    #[error("image digest window {index} was never supplied: read that window before finishing")]
    WindowMissing {
        /// The window.
        index: u64,
    },
}

impl WireError {
    /// The Error-frame code a driver sends to the peer before closing
    /// because of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::UnsupportedVersion { .. } => ErrorCode::Version,
            _ => ErrorCode::Protocol,
        }
    }
}

/// Decodes a whole byte string into frames: every frame, or the first error
/// (a trailing partial frame is [`WireError::Truncated`]). Never panics and
/// never allocates more than one frame's bound at a time: this is the entry
/// point of the fuzz targets.
pub fn decode_any(bytes: &[u8]) -> Result<Vec<Frame>, WireError> {
    let mut frames = Vec::new();
    let mut decoder = FrameDecoder::new();
    let mut input = bytes;
    while let Some(frame) = decoder.decode_from(&mut input)? {
        frames.push(frame);
    }
    if decoder.is_mid_frame() {
        return Err(WireError::Truncated {
            needed_bytes: decoder.need(),
        });
    }
    Ok(frames)
}

/// Decodes exactly one frame from the start of `bytes`; returns it and the
/// number of bytes it used.
pub fn decode_frame(bytes: &[u8]) -> Result<(Frame, usize), WireError> {
    let mut decoder = FrameDecoder::new();
    let mut input = bytes;
    match decoder.decode_from(&mut input)? {
        Some(frame) => Ok((frame, bytes.len() - input.len())),
        None => Err(WireError::Truncated {
            needed_bytes: decoder.need(),
        }),
    }
}
