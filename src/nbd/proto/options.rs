//! Codecs of the handshake phase: the greeting, options and their replies,
//! `NBD_INFO_*` items and meta contexts. Every length the server sends is
//! bounded before anything is allocated.

#![forbid(unsafe_code)]

use super::{
    GREETING_BYTES, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, INIT_MAGIC,
    MAX_EXPORT_SIZE_BYTES, MAX_OPT_ERROR_REPLY_BYTES, MAX_OPT_REPLY_BYTES, OLDSTYLE_MAGIC,
    OPT_REPLY_HEADER_BYTES, OPT_REPLY_MAGIC, OPTS_MAGIC, REP_FLAG_ERROR, be_u16, be_u32, be_u64,
    option_name, proto_err, reply_type_name,
};
use crate::nbd::{MAX_STRING_BYTES, NbdError};

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
