//! NBD protocol constants and sans-IO codecs.
//!
//! Everything here is a pure function over byte slices: encoders build the
//! exact bytes the client sends, decoders check magics and bound every length
//! the server sends *before* anything is allocated. Numbers follow
//! `doc/proto.md` of the NBD project (fixed newstyle, no extended headers).

use super::{MAX_PAYLOAD_BYTES, MAX_STRING_BYTES, NbdError};

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

/// Length of a client-supplied string as a u32, refusing strings longer than
/// [`MAX_STRING_BYTES`] (the server would refuse them anyway).
fn string_len(s: &str, what: &str) -> Result<u32, NbdError> {
    match u32::try_from(s.len()) {
        Ok(len) if len <= MAX_STRING_BYTES => Ok(len),
        _ => Err(NbdError::Refused {
            what: what.to_string(),
            message: format!(
                "the name is {} bytes, longer than the {MAX_STRING_BYTES}-byte limit",
                s.len()
            ),
        }),
    }
}

/// A count or length of option data as the integer the protocol carries;
/// more is refused before anything is sent.
fn option_field<T: TryFrom<usize>>(n: usize, what: &str) -> Result<T, NbdError> {
    T::try_from(n).map_err(|_| NbdError::Invalid(format!("{n} {what} do not fit an NBD option")))
}

// ------------------------------------------------------------- handshake

/// Decode the server greeting; returns the handshake flags.
pub fn decode_greeting(b: &[u8; GREETING_BYTES]) -> Result<u16, NbdError> {
    let init = be_u64(b, 0);
    if init != INIT_MAGIC {
        return Err(proto_err(format!(
            "greeting starts with {init:#018x}, not NBDMAGIC: is this an NBD server?"
        )));
    }
    let opts = be_u64(b, 8);
    if opts == OLDSTYLE_MAGIC {
        return Err(NbdError::Unsupported(
            "oldstyle negotiation (only newstyle is implemented)",
        ));
    }
    if opts != OPTS_MAGIC {
        return Err(proto_err(format!(
            "greeting has magic {opts:#018x}, not IHAVEOPT"
        )));
    }
    Ok(be_u16(b, 16))
}

/// Encode an option: IHAVEOPT, option, length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Result<Vec<u8>, NbdError> {
    let len: u32 = option_field(data.len(), "bytes of option data")?;
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(data);
    Ok(v)
}

/// Data of NBD_OPT_GO / NBD_OPT_INFO: export name and the info types asked for.
pub fn encode_go_data(export: &str, infos: &[u16]) -> Result<Vec<u8>, NbdError> {
    let len = string_len(export, "export name")?;
    let mut v = Vec::with_capacity(6 + export.len() + 2 * infos.len());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    let count: u16 = option_field(infos.len(), "info requests")?;
    v.extend_from_slice(&count.to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    Ok(v)
}

/// Data of NBD_OPT_SET_META_CONTEXT / LIST_META_CONTEXT.
pub fn encode_meta_context_data(export: &str, queries: &[&str]) -> Result<Vec<u8>, NbdError> {
    let len = string_len(export, "export name")?;
    let mut v = Vec::new();
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    let count: u32 = option_field(queries.len(), "meta context queries")?;
    v.extend_from_slice(&count.to_be_bytes());
    for q in queries {
        let qlen = string_len(q, "meta context name")?;
        v.extend_from_slice(&qlen.to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    Ok(v)
}

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReplyHeader {
    /// The option answered.
    pub option: u32,
    /// `REP_*`.
    pub reply_type: u32,
    /// Bytes of payload that follow.
    pub len_bytes: u32,
}

impl OptReplyHeader {
    /// Whether this is an error reply (`REP_ERR_*`).
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
}

/// Decode an option reply header, checking the magic, that it answers
/// `expected_option`, and that its length is within bounds (non-error
/// replies <= [`MAX_OPT_REPLY_BYTES`], error replies <=
/// [`MAX_OPT_ERROR_REPLY_BYTES`]).
pub fn decode_opt_reply_header(
    b: &[u8; OPT_REPLY_HEADER_BYTES],
    expected_option: u32,
) -> Result<OptReplyHeader, NbdError> {
    let magic = be_u64(b, 0);
    if magic != OPT_REPLY_MAGIC {
        return Err(proto_err(format!(
            "option reply has magic {magic:#018x}, expected {OPT_REPLY_MAGIC:#018x}"
        )));
    }
    let h = OptReplyHeader {
        option: be_u32(b, 8),
        reply_type: be_u32(b, 12),
        len_bytes: be_u32(b, 16),
    };
    if h.option != expected_option {
        return Err(proto_err(format!(
            "reply to option {} ({}) while {} ({}) was sent",
            h.option,
            option_name(h.option),
            expected_option,
            option_name(expected_option)
        )));
    }
    let max = if h.is_error() {
        MAX_OPT_ERROR_REPLY_BYTES
    } else {
        MAX_OPT_REPLY_BYTES
    };
    if h.len_bytes > max {
        return Err(proto_err(format!(
            "{} reply to {} is {} bytes long, more than the {max}-byte limit",
            reply_type_name(h.reply_type),
            option_name(h.option),
            h.len_bytes
        )));
    }
    Ok(h)
}

/// A decoded NBD_REP_INFO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `INFO_EXPORT`.
    Export {
        /// The export's size.
        size_bytes: u64,
        /// `TFLAG_*`.
        transmission_flags: u16,
    },
    /// `INFO_NAME`: the canonical name.
    Name(String),
    /// `INFO_DESCRIPTION`.
    Description(String),
    /// `INFO_BLOCK_SIZE`.
    BlockSize {
        /// Smallest request size the server accepts.
        min_bytes: u32,
        /// Preferred request size.
        pref_bytes: u32,
        /// Largest request payload.
        max_bytes: u32,
    },
    /// An info type this client does not know (ignored).
    Unknown(u16),
}

fn info_string(b: &[u8]) -> Result<String, NbdError> {
    if b.len() > MAX_STRING_BYTES as usize {
        return Err(proto_err(format!(
            "info string is {} bytes, more than the {MAX_STRING_BYTES}-byte limit",
            b.len()
        )));
    }
    Ok(String::from_utf8_lossy(b).into_owned())
}

/// Decode the payload of an NBD_REP_INFO reply.
pub fn decode_info(b: &[u8]) -> Result<Info, NbdError> {
    if b.len() < 2 {
        return Err(proto_err(format!(
            "NBD_REP_INFO of {} bytes has no info type",
            b.len()
        )));
    }
    let ty = be_u16(b, 0);
    let body = &b[2..];
    let want = |n: usize, name: &str| -> Result<(), NbdError> {
        if body.len() != n {
            return Err(proto_err(format!(
                "{name} info is {} bytes, expected {n}",
                body.len()
            )));
        }
        Ok(())
    };
    match ty {
        INFO_EXPORT => {
            want(10, "NBD_INFO_EXPORT")?;
            let size_bytes = be_u64(body, 0);
            if size_bytes > MAX_EXPORT_SIZE_BYTES {
                return Err(proto_err(format!(
                    "export size {size_bytes} bytes is absurd"
                )));
            }
            Ok(Info::Export {
                size_bytes,
                transmission_flags: be_u16(body, 8),
            })
        }
        INFO_NAME => Ok(Info::Name(info_string(body)?)),
        INFO_DESCRIPTION => Ok(Info::Description(info_string(body)?)),
        INFO_BLOCK_SIZE => {
            want(12, "NBD_INFO_BLOCK_SIZE")?;
            let (min_bytes, pref_bytes, max_bytes) =
                (be_u32(body, 0), be_u32(body, 4), be_u32(body, 8));
            check_block_sizes(min_bytes, pref_bytes, max_bytes)?;
            Ok(Info::BlockSize {
                min_bytes,
                pref_bytes,
                max_bytes,
            })
        }
        other => Ok(Info::Unknown(other)),
    }
}

/// The spec's constraints on advertised block sizes.
fn check_block_sizes(min: u32, pref: u32, max: u32) -> Result<(), NbdError> {
    let bad = |why: &str| {
        Err(proto_err(format!(
            "block sizes min {min} pref {pref} max {max} are invalid: {why}"
        )))
    };
    if !min.is_power_of_two() || min > 64 * 1024 {
        return bad("minimum must be a power of two <= 64 KiB");
    }
    if !pref.is_power_of_two() || pref < min {
        return bad("preferred must be a power of two >= minimum");
    }
    if max < min || (max != u32::MAX && !max.is_multiple_of(min)) {
        return bad("maximum must be >= minimum and a multiple of it");
    }
    Ok(())
}

/// Decode the payload of an NBD_REP_META_CONTEXT reply: (id, name).
pub fn decode_meta_context(b: &[u8]) -> Result<(u32, String), NbdError> {
    if b.len() < 5 {
        return Err(proto_err(format!(
            "NBD_REP_META_CONTEXT of {} bytes is too short for an id and a name",
            b.len()
        )));
    }
    Ok((be_u32(b, 0), info_string(&b[4..])?))
}

/// Decode the reply to NBD_OPT_EXPORT_NAME (size, flags; the 124 zero bytes
/// that may follow are not part of `b`).
pub fn decode_export_name_reply(b: &[u8; 10]) -> Result<(u64, u16), NbdError> {
    let size_bytes = be_u64(b, 0);
    if size_bytes > MAX_EXPORT_SIZE_BYTES {
        return Err(proto_err(format!(
            "export size {size_bytes} bytes is absurd"
        )));
    }
    Ok((size_bytes, be_u16(b, 8)))
}

// ---------------------------------------------------------- transmission

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

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
