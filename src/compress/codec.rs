//! The codecs themselves: lz4 (block format, no size prefix) and zstd (one
//! frame per chunk), with reusable per-thread contexts.
//!
//! The raw length of a chunk travels in the frame header, never inside the
//! payload, so decoding writes into a buffer of exactly the declared length and
//! anything that decodes to another length is an error.

use std::io::Cursor;

use lz4_flex::block::{CompressTable, compress_into_with_table, decompress_into};

use super::{Codec, CompressError, MAX_RAW_BYTES, ZSTD_LEVEL_MAX, ZSTD_LEVEL_MIN};

/// The largest lz4 payload `raw_len` bytes can produce.
pub fn lz4_bound_bytes(raw_len: usize) -> usize {
    lz4_flex::block::get_maximum_output_size(raw_len)
}

/// The largest zstd payload `raw_len` bytes can produce.
pub fn zstd_bound_bytes(raw_len: usize) -> usize {
    zstd::zstd_safe::compress_bound(raw_len)
}

/// The largest payload a peer may send for a chunk of `raw_len` bytes coded
/// with `codec`. Frame decoders check this before reading the payload.
pub fn max_payload_bytes(codec: Codec, raw_len: usize) -> usize {
    match codec {
        Codec::None => raw_len,
        Codec::Lz4 => lz4_bound_bytes(raw_len),
        Codec::Zstd => zstd_bound_bytes(raw_len),
    }
}

/// Compression and decompression contexts owned by one thread.
///
/// The lz4 hash table and the zstd contexts are allocated on first use and
/// then reused for every chunk, which saves an allocation and a table reset of
/// hundreds of KiB per chunk.
#[derive(Default)]
pub struct Compressors {
    lz4_table: Option<CompressTable>,
    zstd_compressor: Option<zstd::bulk::Compressor<'static>>,
    zstd_level: i32,
    zstd_decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl Compressors {
    /// Contexts are created lazily; this allocates nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compress `raw` with `codec` (and `level`, used by zstd only: 1..=19).
    /// `out` is cleared and then holds the payload. The payload may be no
    /// smaller than `raw` (incompressible data); send raw in that case.
    pub fn compress(
        &mut self,
        codec: Codec,
        level: i32,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CompressError> {
        check_raw_len(raw.len())?;
        out.clear();
        match codec {
            Codec::None => out.extend_from_slice(raw),
            Codec::Lz4 => {
                let table = self.lz4_table.get_or_insert_with(CompressTable::large);
                out.resize(lz4_bound_bytes(raw.len()), 0);
                match compress_into_with_table(raw, out, table) {
                    Ok(written) => out.truncate(written),
                    Err(err) => {
                        out.clear();
                        return Err(CompressError::Compress {
                            codec,
                            detail: err.to_string(),
                        });
                    }
                }
            }
            Codec::Zstd => {
                check_zstd_level(level)?;
                let compressor = self.zstd_compressor(level)?;
                out.reserve(zstd_bound_bytes(raw.len()));
                let mut cursor = Cursor::new(out);
                compressor
                    .compress_to_buffer(raw, &mut cursor)
                    .map_err(|err| CompressError::Compress {
                        codec,
                        detail: err.to_string(),
                    })?;
            }
        }
        Ok(())
    }

    /// Decode `payload` into `out`, which must be exactly the declared raw
    /// length (≤ [`MAX_RAW_BYTES`]). A payload that is corrupt, too long for
    /// the declared length, or decodes to any other length is an error; this
    /// never panics on hostile input.
    pub fn decompress(
        &mut self,
        codec: Codec,
        payload: &[u8],
        raw_len: usize,
        out: &mut [u8],
    ) -> Result<(), CompressError> {
        check_raw_len(raw_len)?;
        if out.len() != raw_len {
            return Err(CompressError::OutputLen {
                out_len_bytes: out.len(),
                raw_len_bytes: raw_len,
            });
        }
        let payload_max_bytes = max_payload_bytes(codec, raw_len);
        if payload.len() > payload_max_bytes {
            return Err(CompressError::PayloadTooLarge {
                codec,
                payload_len_bytes: payload.len(),
                raw_len_bytes: raw_len,
                payload_max_bytes,
            });
        }
        let decoded_len = match codec {
            Codec::None => {
                if payload.len() == raw_len {
                    out.copy_from_slice(payload);
                }
                payload.len()
            }
            Codec::Lz4 => decompress_into(payload, out).map_err(|err| CompressError::Corrupt {
                codec,
                detail: err.to_string(),
            })?,
            Codec::Zstd => {
                let decompressor = match &mut self.zstd_decompressor {
                    Some(d) => d,
                    slot => slot.insert(zstd::bulk::Decompressor::new().map_err(|err| {
                        CompressError::Context {
                            detail: err.to_string(),
                        }
                    })?),
                };
                decompressor
                    .decompress_to_buffer(payload, out)
                    .map_err(|err| CompressError::Corrupt {
                        codec,
                        detail: err.to_string(),
                    })?
            }
        };
        if decoded_len != raw_len {
            return Err(CompressError::LengthMismatch {
                codec,
                decoded_len_bytes: decoded_len,
                raw_len_bytes: raw_len,
            });
        }
        Ok(())
    }

    fn zstd_compressor(
        &mut self,
        level: i32,
    ) -> Result<&mut zstd::bulk::Compressor<'static>, CompressError> {
        let context_error = |err: std::io::Error| CompressError::Context {
            detail: err.to_string(),
        };
        match &mut self.zstd_compressor {
            Some(compressor) => {
                if self.zstd_level != level {
                    compressor
                        .set_compression_level(level)
                        .map_err(context_error)?;
                    self.zstd_level = level;
                }
                Ok(compressor)
            }
            slot => {
                self.zstd_level = level;
                Ok(slot.insert(zstd::bulk::Compressor::new(level).map_err(context_error)?))
            }
        }
    }
}

/// One-shot [`Compressors::compress`] (allocates contexts: use a
/// [`Compressors`] per thread on the data path).
pub fn compress(
    codec: Codec,
    level: i32,
    raw: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CompressError> {
    Compressors::new().compress(codec, level, raw, out)
}

/// One-shot [`Compressors::decompress`] (allocates contexts: use a
/// [`Compressors`] per thread on the data path).
pub fn decompress(
    codec: Codec,
    payload: &[u8],
    raw_len: usize,
    out: &mut [u8],
) -> Result<(), CompressError> {
    Compressors::new().decompress(codec, payload, raw_len, out)
}

fn check_raw_len(raw_len: usize) -> Result<(), CompressError> {
    if raw_len > MAX_RAW_BYTES {
        return Err(CompressError::RawTooLarge {
            raw_len_bytes: raw_len,
            max_raw_bytes: MAX_RAW_BYTES,
        });
    }
    Ok(())
}

fn check_zstd_level(level: i32) -> Result<(), CompressError> {
    if !(ZSTD_LEVEL_MIN..=ZSTD_LEVEL_MAX).contains(&level) {
        return Err(CompressError::ZstdLevel { level });
    }
    Ok(())
}
