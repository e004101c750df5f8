//! The checks of every frame, run before encoding and after parsing.

use super::{ByteRange, Codec, DataHead, Frame, HelloFlags, PassMode};
use crate::wire::header::FrameType;
use crate::wire::pass::{
    MAX_DIGEST_SPAN_BYTES, MAX_PLAN_RANGES, MAX_REPLAN_RANGES, NO_SYNC_ID, digest_count,
    is_valid_block_size,
};
use crate::wire::{
    MAX_ACK_RANGES, MAX_CHUNK_BYTES, MAX_RESUME_RANGES, MAX_STREAMS, MAX_STRING_BYTES, WireError,
};

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

pub(crate) fn bad(frame: &'static str, field: &'static str, why: &'static str) -> WireError {
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
            Frame::Plan(_) => FrameType::Plan,
            Frame::DigestRequest { .. } => FrameType::DigestRequest,
            Frame::Digests { .. } => FrameType::Digests,
        }
    }

    /// Checks every field against the protocol's bounds; run before
    /// encoding and after parsing.
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Frame::Hello(h) => h.validate(),
            Frame::Welcome(w) => {
                if w.sync_id == NO_SYNC_ID {
                    return Err(bad("WELCOME", "sync_id", "is all zero"));
                }
                check_ranges("WELCOME durable", &w.durable, MAX_RESUME_RANGES)?;
                check_ranges("WELCOME replan", &w.replan, MAX_REPLAN_RANGES)
            }
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
            Frame::Plan(ranges) => check_ranges("PLAN", ranges, MAX_PLAN_RANGES),
            Frame::DigestRequest {
                offset,
                len_bytes,
                block_bytes,
            } => check_digest_request(*offset, *len_bytes, *block_bytes),
            Frame::Digests {
                offset,
                block_bytes,
                digests,
            } => check_digests(*offset, *block_bytes, digests.len()),
            Frame::Barrier { .. }
            | Frame::Done { .. }
            | Frame::VerifyResult { .. }
            | Frame::Ping { .. }
            | Frame::Pong { .. } => Ok(()),
        }
    }
}

impl super::Hello {
    /// Checks the HELLO's fields, the v2 pass fields among them.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.chunk_size_bytes == 0 || self.chunk_size_bytes > MAX_CHUNK_BYTES {
            return Err(bad("HELLO", "chunk_size", "must be 1 byte ..= 32 MiB"));
        }
        if self.stream_count == 0 || self.stream_count > MAX_STREAMS {
            return Err(bad("HELLO", "stream_count", "must be 1 ..= 64"));
        }
        if self.stream_index >= self.stream_count {
            return Err(bad("HELLO", "stream_index", "must be below stream_count"));
        }
        HelloFlags::check(self.flags.0)?;
        if self.sync_id == NO_SYNC_ID {
            return Err(bad("HELLO", "sync_id", "is all zero"));
        }
        if self.mode == PassMode::Incremental {
            if self.base_sync_id == NO_SYNC_ID {
                return Err(bad(
                    "HELLO",
                    "base_sync_id",
                    "is all zero for an incremental pass",
                ));
            }
        } else if self.base_sync_id != NO_SYNC_ID || self.plan_digest != [0; 32] {
            return Err(bad(
                "HELLO",
                "base_sync_id / plan_digest",
                "must be all zero unless the pass is incremental",
            ));
        }
        check_string("HELLO target", &self.target)?;
        check_string("HELLO source_identity", &self.source_identity)?;
        check_string("HELLO change_id", &self.change_id)
    }
}

/// A DIGEST_REQUEST's span and block size.
fn check_digest_request(offset: u64, len_bytes: u32, block_bytes: u32) -> Result<(), WireError> {
    const FRAME: &str = "DIGEST_REQUEST";
    if len_bytes == 0 || len_bytes > MAX_DIGEST_SPAN_BYTES {
        return Err(bad(FRAME, "len", "must be 1 byte ..= 32 MiB"));
    }
    if !is_valid_block_size(block_bytes) {
        return Err(bad(
            FRAME,
            "block",
            "must be a power of two in 4 KiB ..= 1 MiB",
        ));
    }
    if offset.checked_add(u64::from(len_bytes)).is_none() {
        return Err(bad(FRAME, "offset + len", "overflows 64 bits"));
    }
    Ok(())
}

/// A DIGESTS frame's geometry: at least one digest, no more than the
/// longest span holds in blocks of this size, no overflow.
fn check_digests(offset: u64, block_bytes: u32, count: usize) -> Result<(), WireError> {
    const FRAME: &str = "DIGESTS";
    if !is_valid_block_size(block_bytes) {
        return Err(bad(
            FRAME,
            "block",
            "must be a power of two in 4 KiB ..= 1 MiB",
        ));
    }
    let max = digest_count(MAX_DIGEST_SPAN_BYTES, block_bytes);
    if count as u64 > u64::from(max) {
        return Err(WireError::ListTooLong {
            field: "DIGESTS digests",
            count: count as u64,
            max: u64::from(max),
        });
    }
    if count == 0 {
        return Err(bad(FRAME, "digests", "is empty"));
    }
    // The last block may be short: only its start must be addressable.
    let last_block_start = (count as u64 - 1) * u64::from(block_bytes);
    if offset.checked_add(last_block_start).is_none() {
        return Err(bad(FRAME, "offset of the last block", "overflows 64 bits"));
    }
    Ok(())
}
