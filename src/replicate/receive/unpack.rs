//! A DATA frame's payload turned into the bytes to write: the chunk size
//! and codec checked against what the job and WELCOME allow, the payload
//! decompressed, and its digest checked before anything is written.

use crate::compress::{self, Compressors};
use crate::wire::{ChunkDigest, Codec, Data, ErrorCode, Features, StreamingChunkDigest};

use super::job::Refusal;

/// Why a chunk is not written.
#[derive(Debug)]
pub(super) enum UnpackError {
    /// The frame breaks the rules of the stream: end it.
    Refuse(Refusal),
    /// The chunk is damaged (it does not decompress or match its
    /// digest): the job fails.
    Damaged(Refusal),
}

/// The bytes to write for a checked chunk.
#[derive(Debug)]
pub(super) enum Chunk {
    /// The payload as sent (a raw chunk).
    AsSent,
    /// The chunk decompressed into this buffer (exactly its raw length),
    /// lent out until [`Unpacker::give_back`].
    Decompressed(Vec<u8>),
}

/// One stream's decompression state and buffers.
pub(super) struct Unpacker {
    /// XXH3 of the raw DATA payload being received, taken read by read
    /// while the bytes are still in cache; used instead of a second pass
    /// over the chunk when it covers the whole payload.
    hot_digest: StreamingChunkDigest,
    compressors: Compressors,
    /// Decompressed chunk (at most the job's chunk size).
    raw: Vec<u8>,
}

impl Unpacker {
    pub(super) fn new() -> Self {
        Unpacker {
            hot_digest: StreamingChunkDigest::new(),
            compressors: Compressors::new(),
            raw: Vec::new(),
        }
    }

    /// Bytes of a raw DATA payload just read, `got_before` of it read
    /// before them (0: a new payload starts).
    pub(super) fn hash_arriving(&mut self, got_before: usize, bytes: &[u8]) {
        if got_before == 0 {
            self.hot_digest.reset();
        }
        self.hot_digest.update(bytes);
    }

    /// A decompression buffer lent out in [`Chunk::Decompressed`] comes
    /// back for the next chunk.
    pub(super) fn give_back(&mut self, buf: Vec<u8>) {
        if buf.capacity() > self.raw.capacity() {
            self.raw = buf;
        }
    }

    /// The chunk's raw bytes, checked: nothing is returned for a chunk
    /// whose digest does not match.
    pub(super) fn unpack(
        &mut self,
        data: &Data,
        features: Features,
        chunk_size_bytes: u32,
    ) -> Result<Chunk, UnpackError> {
        let head = &data.head;
        let raw_len = head.raw_len_bytes as usize;
        let refuse = |code, message: String| UnpackError::Refuse(Refusal::new(code, message));
        if head.raw_len_bytes > chunk_size_bytes {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "DATA chunk of {} bytes is larger than the job's chunk size {chunk_size_bytes}",
                    head.raw_len_bytes
                ),
            ));
        }
        let negotiated = match head.codec {
            Codec::None => true,
            Codec::Lz4 => features.contains(Features::LZ4),
            Codec::Zstd => features.contains(Features::ZSTD),
        };
        if !negotiated {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "DATA uses codec {:?}, which was not negotiated in WELCOME",
                    head.codec
                ),
            ));
        }
        if head.codec != Codec::None {
            let codec = compress::Codec::from_u8(head.codec as u8)
                .map_err(|e| refuse(ErrorCode::Protocol, e.to_string()))?;
            self.raw.resize(raw_len, 0);
            if let Err(e) =
                self.compressors
                    .decompress(codec, &data.payload, raw_len, &mut self.raw[..raw_len])
            {
                return Err(UnpackError::Damaged(Refusal::new(
                    ErrorCode::DigestMismatch,
                    format!(
                        "chunk at offset {}: {e}; nothing was written for it",
                        head.offset
                    ),
                )));
            }
        }
        let raw: &[u8] = match head.codec {
            Codec::None => &data.payload,
            _ => &self.raw[..raw_len],
        };
        let kind = ChunkDigest::for_features(features);
        // The streamed digest counts only if it saw exactly this payload:
        // it restarts at the first payload byte of every raw DATA frame.
        let hot = head.codec == Codec::None
            && kind == ChunkDigest::Xxh3
            && self.hot_digest.len_bytes() == raw.len();
        let digest = if hot {
            self.hot_digest.finish()
        } else {
            kind.digest(raw)
        };
        self.hot_digest.reset();
        if digest != head.raw_digest {
            return Err(UnpackError::Damaged(Refusal::new(
                ErrorCode::DigestMismatch,
                format!(
                    "chunk at offset {} ({raw_len} bytes) does not match its {} digest: it was \
                     corrupted in flight or in the sender's memory; nothing was written for it",
                    head.offset,
                    kind.name()
                ),
            )));
        }
        Ok(match head.codec {
            Codec::None => Chunk::AsSent,
            _ => Chunk::Decompressed(std::mem::take(&mut self.raw)),
        })
    }
}
