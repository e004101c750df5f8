//! Per-chunk compression: codecs (lz4, zstd) and the `auto` policy.
//!
//! * [`codec`] — [`compress`] / [`decompress`] and the per-thread reusable
//!   contexts [`Compressors`]. Payloads carry no length: the frame header
//!   carries `raw_len` (≤ [`MAX_RAW_BYTES`]) and decoding must produce exactly
//!   that many bytes.
//! * [`mode`] — [`Mode`], the `--compress` argument.
//! * [`policy`] — [`Policy`], one per sender thread: raw, lz4 or zstd per
//!   chunk, from a cheap probe of the chunk and running estimates of the
//!   codecs' speed and ratio against the link rate.
//!
//! Measured here (`cargo bench --bench compress`, release, one thread on the
//! shared 2-core dev VM, 2 MiB chunks, one reused context; medians, noisy:
//! compare within one run). "doc" is the first 64 MiB of the files under
//! /usr/share/doc in path order, as a tar holds them; about half of it is
//! already gzip-compressed, so it compresses less and faster than the design's
//! "tar of system files" (lz4 470 MB/s, zstd -1 310 MB/s, ratios 1.88 / 2.29).
//!
//! | data | codec | compress | ratio | decompress |
//! |---|---|---|---|---|
//! | doc | lz4 | 740 MB/s | 1.53 | 4.8 GB/s |
//! | doc | zstd -1 | 790 MB/s | 2.06 | 2.2 GB/s |
//! | doc | zstd -3 | 400 MB/s | 2.22 | 3.1 GB/s |
//! | doc | zstd -9 | 120 MB/s | 2.27 | 1.9 GB/s |
//! | random | lz4 | 2.6 GB/s | 1.00 (+0.4 %) | — |
//! | random | zstd -1 | 1.9 GB/s | 1.00 | — |
//! | random | zstd -3 | 1.6 GB/s | 1.00 | — |
//! | random | zstd -9 | 1.2 GB/s | 1.00 | — |
//!
//! `auto` on an incompressible 2 MiB chunk: the probe (3 × 4 KiB with lz4)
//! and decision take 4.7 µs, 0.4 % of the 1.3 ms it takes to send 2 MiB over
//! loopback at 1.6 GB/s, and 1/170 of lz4 on the whole chunk (0.8 ms). When
//! no compressor can keep up with the link the decision takes 6 ns and
//! nothing is probed.
#![forbid(unsafe_code)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(missing_docs)]

pub mod codec;
pub mod mode;
pub mod policy;

pub use codec::{Compressors, compress, decompress, max_payload_bytes};
pub use mode::Mode;
pub use policy::{Choice, CodecEstimate, CompressStats, Estimates, LinkState, Policy, Reason};

/// The largest chunk that is compressed or decompressed (the NBD payload
/// bound): a peer's declared `raw_len` is never trusted beyond it.
pub const MAX_RAW_BYTES: usize = 32 * 1024 * 1024;
/// Lowest zstd level accepted.
pub const ZSTD_LEVEL_MIN: i32 = 1;
/// Highest zstd level accepted (higher ones need large windows and are slow).
pub const ZSTD_LEVEL_MAX: i32 = 19;
/// Level of `--compress zstd`.
pub const ZSTD_LEVEL_DEFAULT: i32 = 3;

/// The codec of a chunk: the wire protocol's type, so a frame's codec id
/// needs no conversion on its way to or from a compressor.
pub use crate::wire::Codec;

/// Errors of compression and decompression.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// A chunk over [`MAX_RAW_BYTES`].
    #[error(
        "chunk of {raw_len_bytes} bytes is over the {max_raw_bytes}-byte limit: \
         use a smaller --chunk-size (or the peer sent a corrupt frame)"
    )]
    RawTooLarge {
        /// The chunk's length.
        raw_len_bytes: usize,
        /// [`MAX_RAW_BYTES`].
        max_raw_bytes: usize,
    },
    /// The caller's output buffer is not the declared raw length.
    #[error(
        "output buffer of {out_len_bytes} bytes does not match the declared raw length \
         {raw_len_bytes}: this is a diskferry bug, please report it"
    )]
    OutputLen {
        /// The output buffer's length.
        out_len_bytes: usize,
        /// The declared raw length.
        raw_len_bytes: usize,
    },
    /// A payload longer than any encoding of its raw length.
    #[error(
        "{codec} payload of {payload_len_bytes} bytes is longer than any encoding of \
         {raw_len_bytes} raw bytes (at most {payload_max_bytes}): the peer sent a corrupt \
         frame; check that both sides run the same diskferry version"
    )]
    PayloadTooLarge {
        /// The payload's codec.
        codec: Codec,
        /// The payload's length.
        payload_len_bytes: usize,
        /// The declared raw length.
        raw_len_bytes: usize,
        /// The longest encoding of `raw_len_bytes` with `codec`.
        payload_max_bytes: usize,
    },
    /// A payload that decodes to another length than declared.
    #[error(
        "{codec} payload decodes to {decoded_len_bytes} bytes, not the declared \
         {raw_len_bytes}: the peer sent a corrupt frame; check that both sides run the \
         same diskferry version"
    )]
    LengthMismatch {
        /// The payload's codec.
        codec: Codec,
        /// What the payload decoded to.
        decoded_len_bytes: usize,
        /// The declared raw length.
        raw_len_bytes: usize,
    },
    /// A payload the codec cannot decode.
    #[error(
        "{codec} payload is corrupt ({detail}): the peer sent a corrupt frame; check \
         that both sides run the same diskferry version"
    )]
    Corrupt {
        /// The payload's codec.
        codec: Codec,
        /// The codec's own message.
        detail: String,
    },
    /// A zstd level outside [`ZSTD_LEVEL_MIN`]..=[`ZSTD_LEVEL_MAX`].
    #[error("zstd level {level} is outside 1..=19: pass --compress zstd:LEVEL with 1..=19")]
    ZstdLevel {
        /// The level asked for.
        level: i32,
    },
    /// The compressor failed.
    #[error("{codec} failed to compress a chunk ({detail}): retry with --compress none")]
    Compress {
        /// The codec that failed.
        codec: Codec,
        /// The codec's own message.
        detail: String,
    },
    /// No zstd context could be made.
    #[error("could not create a zstd context ({detail}): the host is out of memory")]
    Context {
        /// zstd's own message.
        detail: String,
    },
    /// A `--compress` value that is no mode.
    #[error("invalid compression mode {text:?}: use none, lz4, zstd, zstd:LEVEL (1..=19) or auto")]
    BadMode {
        /// The value given.
        text: String,
    },
}
