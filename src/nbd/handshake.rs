//! Fixed-newstyle handshake over a blocking stream.
//!
//! Sequence: greeting, client flags, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT` (if contexts were asked for and structured
//! replies were accepted), then `NBD_OPT_GO` asking for block sizes. A server
//! without `NBD_OPT_GO` (or without fixed newstyle) gets
//! `NBD_OPT_EXPORT_NAME`. Every length the server sends is bounded by the
//! decoders in [`super::proto`] before anything is allocated.

use std::io::{Read, Write};

use super::proto::{self, Info, OptReplyHeader};
use super::{MAX_PAYLOAD_BYTES, MAX_STRING_BYTES, NbdError};

/// Minimum block size assumed when the server advertises none.
pub const DEFAULT_BLOCK_MIN_BYTES: u32 = 1;
/// Preferred block size assumed when the server advertises none.
pub const DEFAULT_BLOCK_PREF_BYTES: u32 = 4096;
/// Maximum block size assumed when the server advertises none.
pub const DEFAULT_BLOCK_MAX_BYTES: u32 = MAX_PAYLOAD_BYTES;
/// Most meta contexts accepted from one SET_META_CONTEXT.
pub const MAX_META_CONTEXTS: usize = 256;
/// Most replies accepted to one option (bounds a server that never ACKs).
const MAX_REPLIES_PER_OPTION: usize = 1024;

/// What was negotiated for one export.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    /// The export's size.
    pub size_bytes: u64,
    /// `TFLAG_*`.
    pub transmission_flags: u16,
    /// Smallest request size (bytes).
    pub block_min: u32,
    /// Preferred request size (bytes).
    pub block_pref: u32,
    /// Largest READ/WRITE payload; the server's maximum clamped to
    /// [`MAX_PAYLOAD_BYTES`] and rounded down to a multiple of `block_min`.
    pub block_max: u32,
    /// The server agreed to structured replies.
    pub structured_replies: bool,
    /// (context name, context id) for each meta context the server accepted.
    pub meta_contexts: Vec<(String, u32)>,
}

impl ExportInfo {
    fn flag(&self, f: u16) -> bool {
        self.transmission_flags & proto::TFLAG_HAS_FLAGS != 0 && self.transmission_flags & f != 0
    }
    /// The export is read-only.
    pub fn read_only(&self) -> bool {
        self.flag(proto::TFLAG_READ_ONLY)
    }
    /// FLUSH is supported.
    pub fn can_flush(&self) -> bool {
        self.flag(proto::TFLAG_SEND_FLUSH)
    }
    /// The FUA command flag is supported.
    pub fn can_fua(&self) -> bool {
        self.flag(proto::TFLAG_SEND_FUA)
    }
    /// Several connections see each other's writes.
    pub fn can_multi_conn(&self) -> bool {
        self.flag(proto::TFLAG_CAN_MULTI_CONN)
    }
    /// WRITE_ZEROES is supported.
    pub fn can_write_zeroes(&self) -> bool {
        self.flag(proto::TFLAG_SEND_WRITE_ZEROES)
    }
    /// The FAST_ZERO command flag is supported.
    pub fn can_fast_zero(&self) -> bool {
        self.flag(proto::TFLAG_SEND_FAST_ZERO)
    }
    /// TRIM is supported.
    pub fn can_trim(&self) -> bool {
        self.flag(proto::TFLAG_SEND_TRIM)
    }
    /// Context id of `name` if negotiated.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.meta_contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }
    /// Name of the context with id `id`, if negotiated.
    pub fn context_name(&self, id: u32) -> Option<&str> {
        self.meta_contexts
            .iter()
            .find(|(_, i)| *i == id)
            .map(|(n, _)| n.as_str())
    }
}

fn read_exact_or_closed<S: Read>(
    s: &mut S,
    buf: &mut [u8],
    during: &'static str,
) -> Result<(), NbdError> {
    s.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            NbdError::Closed(during)
        } else {
            NbdError::Io(e)
        }
    })
}

/// One option reply: header plus its (bounded) payload.
struct OptReply {
    header: OptReplyHeader,
    payload: Vec<u8>,
}

/// Read one reply to `option`. Error replies keep at most
/// [`MAX_STRING_BYTES`] of their message; the rest is discarded unread into a
/// fixed buffer.
fn read_opt_reply<S: Read>(s: &mut S, option: u32) -> Result<OptReply, NbdError> {
    let mut hb = [0u8; proto::OPT_REPLY_HEADER_BYTES];
    read_exact_or_closed(s, &mut hb, "during the handshake (reading an option reply)")?;
    let header = proto::decode_opt_reply_header(&hb, option)?;
    // Bounded by decode_opt_reply_header (<= MAX_OPT_ERROR_REPLY_BYTES).
    let keep = if header.is_error() {
        header.len_bytes.min(MAX_STRING_BYTES) as usize
    } else {
        header.len_bytes as usize
    };
    let mut payload = vec![0u8; keep];
    read_exact_or_closed(
        s,
        &mut payload,
        "during the handshake (reading an option reply)",
    )?;
    let mut rest = header.len_bytes as usize - keep;
    let mut sink = [0u8; 1024];
    while rest > 0 {
        let n = rest.min(sink.len());
        read_exact_or_closed(
            s,
            &mut sink[..n],
            "during the handshake (reading an option reply)",
        )?;
        rest -= n;
    }
    Ok(OptReply { header, payload })
}

fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) -> Result<(), NbdError> {
    s.write_all(&proto::encode_option(option, data)?)?;
    s.flush()?;
    Ok(())
}

/// The Refused error for an error reply.
fn refused(what: String, reply: &OptReply) -> NbdError {
    let server_msg = String::from_utf8_lossy(&reply.payload);
    let kind = proto::reply_type_name(reply.header.reply_type);
    let message = if server_msg.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {server_msg}")
    };
    NbdError::Refused { what, message }
}

fn unexpected(reply: &OptReply) -> NbdError {
    NbdError::Protocol(format!(
        "unexpected {} ({}) reply to {}",
        proto::reply_type_name(reply.header.reply_type),
        reply.header.reply_type,
        proto::option_name(reply.header.option)
    ))
}

/// Negotiate `export` on `stream`, asking for structured replies and the
/// given meta contexts (e.g. `base:allocation`). Every server-sent length is
/// bounded before allocation.
pub fn negotiate<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    export: &str,
    meta_contexts: &[&str],
) -> Result<ExportInfo, NbdError> {
    let mut g = [0u8; proto::GREETING_BYTES];
    read_exact_or_closed(stream, &mut g, "before sending its greeting")?;
    let server_flags = proto::decode_greeting(&g)?;
    let fixed = server_flags & proto::FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = 0u32;
    if fixed {
        client_flags |= proto::FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    stream.write_all(&client_flags.to_be_bytes())?;

    let mut info = ExportInfo {
        block_min: DEFAULT_BLOCK_MIN_BYTES,
        block_pref: DEFAULT_BLOCK_PREF_BYTES,
        block_max: DEFAULT_BLOCK_MAX_BYTES,
        ..ExportInfo::default()
    };
    if !fixed {
        // Plain newstyle: options other than EXPORT_NAME make the server hang up.
        export_name(stream, export, no_zeroes, &mut info)?;
        return Ok(info);
    }

    info.structured_replies = structured_reply(stream)?;
    if info.structured_replies && !meta_contexts.is_empty() {
        info.meta_contexts = set_meta_context(stream, export, meta_contexts)?;
    }
    let went = go(stream, export, &mut info).inspect_err(|e| {
        if matches!(e, NbdError::Refused { .. }) {
            // Best effort: tell the server we are leaving rather than hang up.
            let _ = send_option(stream, proto::OPT_ABORT, &[]);
        }
    })?;
    if !went {
        export_name(stream, export, no_zeroes, &mut info)?;
    }
    Ok(info)
}

fn structured_reply<S: Read + Write>(s: &mut S) -> Result<bool, NbdError> {
    send_option(s, proto::OPT_STRUCTURED_REPLY, &[])?;
    let r = read_opt_reply(s, proto::OPT_STRUCTURED_REPLY)?;
    match r.header.reply_type {
        proto::REP_ACK if r.header.len_bytes == 0 => Ok(true),
        proto::REP_ACK => Err(NbdError::Protocol(format!(
            "NBD_REP_ACK to NBD_OPT_STRUCTURED_REPLY carries {} bytes, expected 0",
            r.header.len_bytes
        ))),
        _ if r.header.is_error() => Ok(false),
        _ => Err(unexpected(&r)),
    }
}

fn set_meta_context<S: Read + Write>(
    s: &mut S,
    export: &str,
    queries: &[&str],
) -> Result<Vec<(String, u32)>, NbdError> {
    let data = proto::encode_meta_context_data(export, queries)?;
    send_option(s, proto::OPT_SET_META_CONTEXT, &data)?;
    let mut contexts = Vec::new();
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let r = read_opt_reply(s, proto::OPT_SET_META_CONTEXT)?;
        match r.header.reply_type {
            proto::REP_META_CONTEXT => {
                if contexts.len() >= MAX_META_CONTEXTS {
                    return Err(NbdError::Protocol(format!(
                        "server accepted more than {MAX_META_CONTEXTS} meta contexts"
                    )));
                }
                let (id, name) = proto::decode_meta_context(&r.payload)?;
                contexts.push((name, id));
            }
            proto::REP_ACK => return Ok(contexts),
            proto::REP_ERR_UNSUP => return Ok(Vec::new()),
            _ if r.header.is_error() => {
                return Err(refused(format!("meta contexts {queries:?}"), &r));
            }
            _ => return Err(unexpected(&r)),
        }
    }
    Err(NbdError::Protocol(format!(
        "more than {MAX_REPLIES_PER_OPTION} replies to NBD_OPT_SET_META_CONTEXT"
    )))
}

/// NBD_OPT_GO. Returns false if the server does not know the option.
fn go<S: Read + Write>(s: &mut S, export: &str, info: &mut ExportInfo) -> Result<bool, NbdError> {
    let data = proto::encode_go_data(export, &[proto::INFO_BLOCK_SIZE])?;
    send_option(s, proto::OPT_GO, &data)?;
    let mut got_export = false;
    let mut block_sizes = None;
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let r = read_opt_reply(s, proto::OPT_GO)?;
        match r.header.reply_type {
            proto::REP_INFO => match proto::decode_info(&r.payload)? {
                Info::Export {
                    size_bytes,
                    transmission_flags,
                } => {
                    info.size_bytes = size_bytes;
                    info.transmission_flags = transmission_flags;
                    got_export = true;
                }
                Info::BlockSize {
                    min_bytes,
                    pref_bytes,
                    max_bytes,
                } => {
                    block_sizes = Some((min_bytes, pref_bytes, max_bytes));
                }
                Info::Name(_) | Info::Description(_) | Info::Unknown(_) => {}
            },
            proto::REP_ACK => {
                if !got_export {
                    return Err(NbdError::Protocol(
                        "NBD_OPT_GO succeeded without NBD_INFO_EXPORT (size and flags)".into(),
                    ));
                }
                if let Some((min, pref, max)) = block_sizes {
                    info.block_min = min;
                    info.block_pref = pref;
                    let clamped = max.min(MAX_PAYLOAD_BYTES);
                    info.block_max = clamped - clamped % min;
                }
                return Ok(true);
            }
            proto::REP_ERR_UNSUP => return Ok(false),
            _ if r.header.is_error() => return Err(refused(format!("export {export:?}"), &r)),
            _ => return Err(unexpected(&r)),
        }
    }
    Err(NbdError::Protocol(format!(
        "more than {MAX_REPLIES_PER_OPTION} replies to NBD_OPT_GO"
    )))
}

fn export_name<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    info: &mut ExportInfo,
) -> Result<(), NbdError> {
    if export.len() > MAX_STRING_BYTES as usize {
        return Err(NbdError::Refused {
            what: "export name".into(),
            message: format!("longer than the {MAX_STRING_BYTES}-byte limit"),
        });
    }
    send_option(s, proto::OPT_EXPORT_NAME, export.as_bytes())?;
    let mut b = [0u8; 10];
    read_exact_or_closed(
        s,
        &mut b,
        "after NBD_OPT_EXPORT_NAME: the export probably does not exist",
    )?;
    let (size_bytes, flags) = proto::decode_export_name_reply(&b)?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        read_exact_or_closed(s, &mut zeroes, "during NBD_OPT_EXPORT_NAME")?;
    }
    info.size_bytes = size_bytes;
    info.transmission_flags = flags;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A stream that replays `input` and swallows writes.
    struct Replay {
        input: std::io::Cursor<Vec<u8>>,
    }
    impl Read for Replay {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Replay {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn greeting() -> Vec<u8> {
        let mut v = proto::INIT_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&proto::OPTS_MAGIC.to_be_bytes());
        v.extend_from_slice(&3u16.to_be_bytes());
        v
    }

    fn reply(option: u32, ty: u32, data: &[u8]) -> Vec<u8> {
        let mut v = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn full_negotiation_from_bytes() {
        let mut v = greeting();
        v.extend(reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]));
        let mut mc = 7u32.to_be_bytes().to_vec();
        mc.extend_from_slice(b"base:allocation");
        v.extend(reply(
            proto::OPT_SET_META_CONTEXT,
            proto::REP_META_CONTEXT,
            &mc,
        ));
        v.extend(reply(proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]));
        let mut ex = vec![0, 0];
        ex.extend_from_slice(&(1u64 << 20).to_be_bytes());
        ex.extend_from_slice(&(proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH).to_be_bytes());
        v.extend(reply(proto::OPT_GO, proto::REP_INFO, &ex));
        let mut bs = vec![0, 3];
        for x in [512u32, 4096, u32::MAX] {
            bs.extend_from_slice(&x.to_be_bytes());
        }
        v.extend(reply(proto::OPT_GO, proto::REP_INFO, &bs));
        v.extend(reply(proto::OPT_GO, proto::REP_ACK, &[]));
        let mut s = Replay {
            input: std::io::Cursor::new(v),
        };
        let info = negotiate(&mut s, "", &["base:allocation"]).unwrap();
        assert_eq!(info.size_bytes, 1 << 20);
        assert!(info.can_flush() && !info.read_only() && info.structured_replies);
        assert_eq!(info.context_id("base:allocation"), Some(7));
        assert_eq!(
            (info.block_min, info.block_pref, info.block_max),
            (512, 4096, MAX_PAYLOAD_BYTES)
        );
    }

    #[test]
    fn go_error_includes_server_message() {
        let mut v = greeting();
        v.extend(reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]));
        v.extend(reply(
            proto::OPT_GO,
            proto::REP_ERR_UNKNOWN,
            b"no export named nope",
        ));
        let mut s = Replay {
            input: std::io::Cursor::new(v),
        };
        let e = negotiate(&mut s, "nope", &[]).unwrap_err();
        assert!(matches!(e, NbdError::Refused { .. }));
        assert!(e.to_string().contains("no export named nope"), "{e}");
    }

    proptest! {
        /// Arbitrary server bytes after a valid greeting end in an error or a
        /// result, never a panic or a huge allocation (lengths are bounded).
        #[test]
        fn arbitrary_server_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut v = greeting();
            v.extend(tail);
            let mut s = Replay { input: std::io::Cursor::new(v) };
            let _ = negotiate(&mut s, "", &["base:allocation"]);
        }

        #[test]
        fn arbitrary_replies_after_valid_header(ty: u32, len in 0u32..64, body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut v = greeting();
            let mut r = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&proto::OPT_STRUCTURED_REPLY.to_be_bytes());
            r.extend_from_slice(&ty.to_be_bytes());
            r.extend_from_slice(&len.to_be_bytes());
            r.extend(body);
            v.extend(r);
            let mut s = Replay { input: std::io::Cursor::new(v) };
            let _ = negotiate(&mut s, "", &[]);
        }
    }
}
