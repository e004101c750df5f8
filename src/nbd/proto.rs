//! NBD protocol constants and sans-IO codecs.
//!
//! Everything here is a pure function over byte slices: encoders build the
//! exact bytes the client sends, decoders check magics and bound every length
//! the server sends *before* anything is allocated. Numbers follow
//! `doc/proto.md` of the NBD project (fixed newstyle, no extended headers).
//!
//! This file holds the constants and names; `options.rs` the codecs of the
//! handshake phase, `transmission.rs` those of the transmission phase.

use super::{MAX_STRING_BYTES, NbdError};

mod options;
mod transmission;

pub use options::{
    Info, OptReplyHeader, decode_export_name_reply, decode_greeting, decode_info,
    decode_meta_context, decode_opt_reply_header, encode_go_data, encode_meta_context_data,
    encode_option,
};
pub use transmission::{
    ChunkHeader, RequestHeader, decode_chunk_header, decode_request_header, encode_chunk_header,
    encode_request_header, encode_simple_reply,
};

// ---------------------------------------------------------------- magics
/// "NBDMAGIC": first 8 bytes the server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the prefix of every client option.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation (not supported).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ------------------------------------------------------ handshake flags
/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: no 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// --------------------------------------------------------------- options
/// Option: choose an export, old style (no reply).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: ask about an export.
pub const OPT_INFO: u32 = 6;
/// Option: ask about an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (not used).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// --------------------------------------------------------- option replies
/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context and its id.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error option reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Error reply: option not supported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Error reply: forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Error reply: invalid request.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Error reply: not available on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Error reply: the server requires TLS.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Error reply: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Error reply: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Error reply: the client must ask for block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Error reply: the request is too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Error reply: extended headers required.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ------------------------------------------------------------ info types
/// Info: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info: export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------- transmission flags
/// Transmission flag: the flags are valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: FLUSH is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the FUA command flag is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export is on rotational media.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: TRIM is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: WRITE_ZEROES is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the DF command flag is supported.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see each other's writes.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: RESIZE is supported.
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: CACHE is supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the FAST_ZERO command flag is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// -------------------------------------------------------------- commands
/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush to stable storage.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: allocation status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must allocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment a READ reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: BLOCK_STATUS answers one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail WRITE_ZEROES unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ------------------------------------------------------ structured replies
/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a hole at an offset (reads as zeros).
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

// ------------------------------------------------------------ errno values
/// Operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// I/O error.
pub const NBD_EIO: u32 = 5;
/// Out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space left.
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Server shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ------------------------------------------------------------------ sizes
/// Server greeting: INIT_MAGIC, OPTS_MAGIC, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Option reply header: magic, option, reply type, length.
pub const OPT_REPLY_HEADER_BYTES: usize = 20;
/// Request header (compact, no extended headers).
pub const REQUEST_BYTES: usize = 28;
/// Simple reply header: magic, error, cookie.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Structured reply chunk header: magic, flags, type, cookie, length.
pub const STRUCTURED_REPLY_BYTES: usize = 20;
/// Largest non-error option reply accepted during the handshake: a string
/// plus the largest fixed fields that come with one (meta context id, info
/// type, length prefix).
pub const MAX_OPT_REPLY_BYTES: u32 = MAX_STRING_BYTES + 8;
/// Largest error option reply: its message is kept up to
/// [`MAX_STRING_BYTES`], the rest is read and discarded.
pub const MAX_OPT_ERROR_REPLY_BYTES: u32 = 64 * 1024;
/// Largest export size accepted (the protocol's offsets are signed in
/// practice: qemu and nbdkit cap exports at `i64::MAX`).
pub const MAX_EXPORT_SIZE_BYTES: u64 = i64::MAX as u64;

/// Name of an NBD errno value, for messages.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        0 => "success",
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown NBD error",
    }
}

/// Name of a command type, for messages.
pub fn command_name(cmd_type: u16) -> &'static str {
    match cmd_type {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// Name of an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Name of an option reply type, for messages.
pub fn reply_type_name(reply_type: u32) -> &'static str {
    match reply_type {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (not supported)",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (forbidden by server policy)",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID (invalid request)",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not available on this platform)",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (the server requires TLS)",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (server shutting down)",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD (extended headers required)",
        t if t & REP_FLAG_ERROR != 0 => "unknown option error",
        _ => "unknown option reply",
    }
}

// ------------------------------------------------------------ byte helpers
pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn proto_err(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
