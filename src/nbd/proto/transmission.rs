//! Codecs of the transmission phase: request headers, simple replies and
//! structured reply chunk headers.

#![forbid(unsafe_code)]

use super::{
    REQUEST_BYTES, REQUEST_MAGIC, SIMPLE_REPLY_BYTES, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_BYTES,
    STRUCTURED_REPLY_MAGIC, be_u16, be_u32, be_u64, proto_err,
};
use crate::nbd::{MAX_PAYLOAD_BYTES, NbdError};

/// A request header as it goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `CMD_FLAG_*`.
    pub flags: u16,
    /// `CMD_*`.
    pub cmd_type: u16,
    /// Matches the reply to the request.
    pub cookie: u64,
    /// Where in the export.
    pub offset: u64,
    /// Bytes of the request.
    pub len_bytes: u32,
}

/// Encode a 28-byte request header.
pub fn encode_request_header(h: &RequestHeader, out: &mut [u8; REQUEST_BYTES]) {
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&h.flags.to_be_bytes());
    out[6..8].copy_from_slice(&h.cmd_type.to_be_bytes());
    out[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&h.offset.to_be_bytes());
    out[24..28].copy_from_slice(&h.len_bytes.to_be_bytes());
}

/// Decode a 28-byte request header (used by tests and test servers).
pub fn decode_request_header(b: &[u8; REQUEST_BYTES]) -> Result<RequestHeader, NbdError> {
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(proto_err(format!("request has magic {magic:#010x}")));
    }
    Ok(RequestHeader {
        flags: be_u16(b, 4),
        cmd_type: be_u16(b, 6),
        cookie: be_u64(b, 8),
        offset: be_u64(b, 16),
        len_bytes: be_u32(b, 24),
    })
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub reply_type: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Bytes of payload that follow.
    pub len_bytes: u32,
}

/// Decode the 20-byte structured reply header, refusing a length above
/// [`MAX_PAYLOAD_BYTES`] plus the 8-byte offset of OFFSET_DATA.
pub fn decode_chunk_header(b: &[u8; STRUCTURED_REPLY_BYTES]) -> Result<ChunkHeader, NbdError> {
    let magic = be_u32(b, 0);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(proto_err(format!(
            "structured reply has magic {magic:#010x}"
        )));
    }
    let h = ChunkHeader {
        flags: be_u16(b, 4),
        reply_type: be_u16(b, 6),
        cookie: be_u64(b, 8),
        len_bytes: be_u32(b, 16),
    };
    if h.len_bytes > MAX_PAYLOAD_BYTES + 8 {
        return Err(proto_err(format!(
            "reply chunk for cookie {} is {} bytes long, more than the {MAX_PAYLOAD_BYTES}-byte payload limit",
            h.cookie, h.len_bytes
        )));
    }
    Ok(h)
}

/// Encode a structured reply chunk header (for tests and test servers).
pub fn encode_chunk_header(h: &ChunkHeader) -> [u8; STRUCTURED_REPLY_BYTES] {
    let mut b = [0u8; STRUCTURED_REPLY_BYTES];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.reply_type.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..20].copy_from_slice(&h.len_bytes.to_be_bytes());
    b
}

/// Encode a simple reply header (for tests and test servers).
pub fn encode_simple_reply(errno: u32, cookie: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut b = [0u8; SIMPLE_REPLY_BYTES];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}
