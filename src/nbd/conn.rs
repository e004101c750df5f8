//! Sans-IO transmission phase: see the module docs of [`crate::nbd`].
//!
//! [`ClientConn`] never touches a socket. The driver encodes requests with
//! [`ClientConn::encode_request`], sends them (plus the WRITE payload), and
//! then loops: ask [`ClientConn::recv_target`] where the next bytes go, read
//! at most that many into [`ClientConn::scratch_mut`] or into the caller's
//! read buffer, and report them with [`ClientConn::advance`]. Read data is
//! never copied by the decoder. After a protocol error the connection is
//! poisoned: `recv_target` asks for nothing and every call returns the error.

use std::collections::HashMap;

use super::handshake::ExportInfo;
use super::proto::{self, ChunkHeader};
use super::{MAX_PAYLOAD_BYTES, MAX_STRING_BYTES, NbdError};

/// Most disjoint pieces a READ's coverage may be split into before the
/// reply is refused (in-order chunks merge into one piece).
pub const MAX_READ_FRAGMENTS: usize = 4096;
/// Largest error chunk: error, message length, a 64 KiB message, offset.
const MAX_ERROR_CHUNK_BYTES: u32 = 6 + u16::MAX as u32 + 8;
/// Scratch kept allocated between replies; a larger one is freed after use.
const SCRATCH_KEEP_BYTES: usize = 64 * 1024;

/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Read {
        offset: u64,
        len: u32,
    },
    /// The payload (len bytes) is sent by the driver right after the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// `no_hole`: NBD_CMD_FLAG_NO_HOLE; `fast`: NBD_CMD_FLAG_FAST_ZERO.
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
        fast: bool,
    },
    Trim {
        offset: u64,
        len: u32,
    },
    Flush,
    /// Block status for one negotiated meta context (by id) or for all
    /// negotiated contexts when `context_id` is None.
    BlockStatus {
        offset: u64,
        len: u32,
    },
    Disconnect,
}

/// Where the driver must put the next bytes it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvTarget {
    /// Fill [`ClientConn::scratch_mut`] (exactly `len` more bytes are needed;
    /// the driver may deliver fewer and call [`ClientConn::advance`] again).
    Scratch { len: usize },
    /// Read data for READ `cookie`: the next `len` bytes go to the caller's
    /// read buffer at `buf_offset` (offset relative to the READ's start).
    Payload {
        cookie: u64,
        buf_offset: u32,
        len: u32,
    },
}

/// An extent from BLOCK_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// Something the server finished telling us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyEvent {
    /// A region of READ `cookie`'s buffer the server reported as a hole:
    /// the driver must zero it (it was not sent).
    Hole {
        cookie: u64,
        buf_offset: u32,
        len: u32,
    },
    /// Block status extents for `cookie` in meta context `context_id`
    /// (already checked: non-zero lengths, not past the request).
    BlockStatus {
        cookie: u64,
        context_id: u32,
        extents: Vec<Extent>,
    },
    /// Command `cookie` finished successfully (for READ: every byte of the
    /// buffer has been delivered as payload or reported as a hole).
    Done { cookie: u64 },
    /// Command `cookie` failed on the server with NBD error `errno`
    /// (NBD_EPERM, NBD_EIO, …) and the server's message, if any.
    Failed {
        cookie: u64,
        errno: u32,
        message: String,
    },
}

/// A command awaiting its reply.
#[derive(Debug)]
struct Pending {
    cmd_type: u16,
    offset: u64,
    len: u32,
    /// READ: disjoint, sorted, merged [start, end) pieces already covered.
    covered: Vec<(u32, u32)>,
    covered_bytes: u64,
    /// BLOCK_STATUS: contexts already answered.
    contexts_seen: Vec<u32>,
    /// First error chunk (errno, message).
    error: Option<(u32, String)>,
}

impl Pending {
    /// Record [start, end) of a READ as covered, refusing overlaps.
    fn cover(&mut self, start: u32, end: u32) -> Result<(), String> {
        let i = self.covered.partition_point(|&(s, _)| s < start);
        if i > 0 && self.covered[i - 1].1 > start {
            return Err(format!(
                "chunk at buffer offset {start} overlaps an earlier chunk"
            ));
        }
        if i < self.covered.len() && self.covered[i].0 < end {
            return Err(format!(
                "chunk at buffer offset {start} overlaps a later chunk"
            ));
        }
        let merge_prev = i > 0 && self.covered[i - 1].1 == start;
        let merge_next = i < self.covered.len() && self.covered[i].0 == end;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.covered[i - 1].1 = self.covered[i].1;
                self.covered.remove(i);
            }
            (true, false) => self.covered[i - 1].1 = end,
            (false, true) => self.covered[i].0 = start,
            (false, false) => {
                if self.covered.len() >= MAX_READ_FRAGMENTS {
                    return Err(format!(
                        "READ reply split into more than {MAX_READ_FRAGMENTS} disjoint pieces"
                    ));
                }
                self.covered.insert(i, (start, end));
            }
        }
        self.covered_bytes += u64::from(end - start);
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{} at offset {} length {}",
            proto::command_name(self.cmd_type),
            self.offset,
            self.len
        )
    }
}

/// Decoder state: what the bytes being received are.
#[derive(Debug, Clone, Copy)]
enum State {
    /// First 16 bytes of a reply (a whole simple reply header).
    Header,
    /// The last 4 bytes of a structured chunk header.
    ChunkHeaderRest,
    /// Simple reply data of a READ.
    SimplePayload {
        cookie: u64,
        buf_offset: u32,
        end: u32,
    },
    /// The whole payload of a non-data chunk, into scratch.
    ChunkBody { hdr: ChunkHeader },
    /// The 8-byte offset of an OFFSET_DATA chunk.
    DataOffset { hdr: ChunkHeader },
    /// OFFSET_DATA bytes, straight into the caller's buffer.
    DataPayload {
        hdr: ChunkHeader,
        buf_offset: u32,
        end: u32,
    },
}

/// See module docs.
pub struct ClientConn {
    info: ExportInfo,
    in_flight: HashMap<u64, Pending>,
    state: State,
    scratch: Vec<u8>,
    scratch_filled: usize,
    broken: Option<String>,
    disconnected: bool,
}

impl ClientConn {
    /// New state machine after a successful handshake.
    pub fn new(info: &super::handshake::ExportInfo) -> Self {
        let mut conn = ClientConn {
            info: info.clone(),
            in_flight: HashMap::new(),
            state: State::Header,
            scratch: Vec::new(),
            scratch_filled: 0,
            broken: None,
            disconnected: false,
        };
        conn.expect_scratch(proto::SIMPLE_REPLY_BYTES);
        conn
    }

    /// What was negotiated.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Encode `cmd` under `cookie` into `out` (28-byte request header) and
    /// register it as in flight. Refuses requests the server's limits forbid.
    ///
    /// `block_max` bounds READ and WRITE (the commands with a payload);
    /// offsets and lengths must be multiples of `block_min` unless the
    /// request ends at the end of the export. Requests past the end of the
    /// export are sent: the server answers them with an error.
    pub fn encode_request(
        &mut self,
        cookie: u64,
        cmd: Cmd,
        out: &mut [u8; 28],
    ) -> Result<(), NbdError> {
        if let Some(why) = &self.broken {
            return Err(NbdError::Protocol(why.clone()));
        }
        if self.disconnected {
            return Err(NbdError::Invalid(
                "the connection was already told to disconnect".into(),
            ));
        }
        if self.in_flight.contains_key(&cookie) {
            return Err(NbdError::Invalid(format!(
                "cookie {cookie} is already in flight"
            )));
        }
        let (cmd_type, flags, offset, len) = self.check(cmd)?;
        let h = proto::RequestHeader {
            flags,
            cmd_type,
            cookie,
            offset,
            len_bytes: len,
        };
        proto::encode_request_header(&h, out);
        if cmd == Cmd::Disconnect {
            self.disconnected = true;
            return Ok(());
        }
        let pending = Pending {
            cmd_type,
            offset,
            len,
            covered: Vec::new(),
            covered_bytes: 0,
            contexts_seen: Vec::new(),
            error: None,
        };
        self.in_flight.insert(cookie, pending);
        Ok(())
    }

    /// Validate `cmd`; returns (type, flags, offset, length).
    fn check(&self, cmd: Cmd) -> Result<(u16, u16, u64, u32), NbdError> {
        let i = &self.info;
        let (ty, flags, offset, len) = match cmd {
            Cmd::Read { offset, len } => (proto::CMD_READ, 0, offset, len),
            Cmd::Write { offset, len, fua } => {
                if fua && !i.can_fua() {
                    return Err(NbdError::Unsupported("FUA writes (NBD_FLAG_SEND_FUA)"));
                }
                (
                    proto::CMD_WRITE,
                    if fua { proto::CMD_FLAG_FUA } else { 0 },
                    offset,
                    len,
                )
            }
            Cmd::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
            } => {
                if !i.can_write_zeroes() {
                    return Err(NbdError::Unsupported("NBD_CMD_WRITE_ZEROES"));
                }
                if fast && !i.can_fast_zero() {
                    return Err(NbdError::Unsupported(
                        "fast zeroes (NBD_FLAG_SEND_FAST_ZERO)",
                    ));
                }
                let mut f = 0;
                if no_hole {
                    f |= proto::CMD_FLAG_NO_HOLE;
                }
                if fast {
                    f |= proto::CMD_FLAG_FAST_ZERO;
                }
                (proto::CMD_WRITE_ZEROES, f, offset, len)
            }
            Cmd::Trim { offset, len } => {
                if !i.can_trim() {
                    return Err(NbdError::Unsupported("NBD_CMD_TRIM"));
                }
                (proto::CMD_TRIM, 0, offset, len)
            }
            Cmd::Flush => {
                if !i.can_flush() {
                    return Err(NbdError::Unsupported("NBD_CMD_FLUSH"));
                }
                return Ok((proto::CMD_FLUSH, 0, 0, 0));
            }
            Cmd::BlockStatus { offset, len } => {
                if !i.structured_replies || i.meta_contexts.is_empty() {
                    return Err(NbdError::Unsupported(
                        "BLOCK_STATUS: no meta context was negotiated",
                    ));
                }
                (proto::CMD_BLOCK_STATUS, 0, offset, len)
            }
            Cmd::Disconnect => return Ok((proto::CMD_DISC, 0, 0, 0)),
        };
        let name = proto::command_name(ty);
        if matches!(
            ty,
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES | proto::CMD_TRIM
        ) && i.read_only()
        {
            return Err(NbdError::Invalid(format!("{name} on a read-only export")));
        }
        if len == 0 {
            return Err(NbdError::Invalid(format!(
                "{name} of 0 bytes at offset {offset}"
            )));
        }
        let Some(end) = offset.checked_add(u64::from(len)) else {
            return Err(NbdError::Invalid(format!(
                "{name} at offset {offset} length {len} overflows"
            )));
        };
        if matches!(ty, proto::CMD_READ | proto::CMD_WRITE) && len > i.block_max {
            return Err(NbdError::Invalid(format!(
                "{name} of {len} bytes exceeds the server's maximum block size {}",
                i.block_max
            )));
        }
        let min = u64::from(i.block_min.max(1));
        if offset % min != 0 || (u64::from(len) % min != 0 && end != i.size_bytes) {
            return Err(NbdError::Invalid(format!(
                "{name} at offset {offset} length {len} is not aligned to the server's minimum block size {min}"
            )));
        }
        Ok((ty, flags, offset, len))
    }

    /// Number of commands awaiting a reply.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Where the next received bytes go. After a protocol error this is
    /// `Scratch { len: 0 }` and [`Self::advance`] returns the error.
    pub fn recv_target(&self) -> RecvTarget {
        if self.broken.is_some() {
            return RecvTarget::Scratch { len: 0 };
        }
        match self.state {
            State::SimplePayload {
                cookie,
                buf_offset,
                end,
            } => RecvTarget::Payload {
                cookie,
                buf_offset,
                len: end - buf_offset,
            },
            State::DataPayload {
                hdr,
                buf_offset,
                end,
            } => RecvTarget::Payload {
                cookie: hdr.cookie,
                buf_offset,
                len: end - buf_offset,
            },
            _ => RecvTarget::Scratch {
                len: self.scratch.len() - self.scratch_filled,
            },
        }
    }

    /// The unfilled part of the scratch area for [`RecvTarget::Scratch`].
    pub fn scratch_mut(&mut self) -> &mut [u8] {
        let filled = self.scratch_filled;
        &mut self.scratch[filled..]
    }

    /// The driver received `n` bytes into the current target. Returns the
    /// events completed by those bytes (pushed onto `events`).
    pub fn advance(&mut self, n: usize, events: &mut Vec<ReplyEvent>) -> Result<(), NbdError> {
        if let Some(why) = &self.broken {
            return Err(NbdError::Protocol(why.clone()));
        }
        self.step(n, events).map_err(|why| {
            self.broken = Some(why.clone());
            NbdError::Protocol(why)
        })
    }

    fn expect_scratch(&mut self, len: usize) {
        if self.scratch.capacity() > SCRATCH_KEEP_BYTES && len <= SCRATCH_KEEP_BYTES {
            self.scratch = Vec::new();
        }
        // Callers bound `len` (<= MAX_PAYLOAD_BYTES + 8) before calling.
        self.scratch.clear();
        self.scratch.resize(len, 0);
        self.scratch_filled = 0;
    }

    fn step(&mut self, n: usize, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let (cookie, buf_offset, end, done) = match self.state {
            State::SimplePayload {
                cookie,
                buf_offset,
                end,
            } => (cookie, buf_offset, end, true),
            State::DataPayload {
                hdr,
                buf_offset,
                end,
            } => (
                hdr.cookie,
                buf_offset,
                end,
                hdr.flags & proto::REPLY_FLAG_DONE != 0,
            ),
            _ => return self.step_scratch(n, events),
        };
        let left = (end - buf_offset) as usize;
        if n > left {
            return Err(format!(
                "driver delivered {n} payload bytes where {left} were expected"
            ));
        }
        // n <= left <= u32::MAX.
        let now = buf_offset + n as u32;
        match &mut self.state {
            State::SimplePayload { buf_offset, .. } | State::DataPayload { buf_offset, .. } => {
                *buf_offset = now
            }
            _ => unreachable!("payload state matched above"),
        }
        if now < end {
            return Ok(());
        }
        self.expect_header();
        if done {
            self.finish(cookie, events)
        } else {
            Ok(())
        }
    }

    fn step_scratch(&mut self, n: usize, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let left = self.scratch.len() - self.scratch_filled;
        if n > left {
            return Err(format!(
                "driver delivered {n} bytes where {left} were expected"
            ));
        }
        self.scratch_filled += n;
        if n == 0 || self.scratch_filled < self.scratch.len() {
            return Ok(());
        }
        self.scratch_complete(events)
    }

    fn expect_header(&mut self) {
        self.state = State::Header;
        self.expect_scratch(proto::SIMPLE_REPLY_BYTES);
    }

    fn pending(&mut self, cookie: u64) -> Result<&mut Pending, String> {
        self.in_flight
            .get_mut(&cookie)
            .ok_or_else(|| format!("reply for unknown cookie {cookie} (no such request in flight)"))
    }

    fn scratch_complete(&mut self, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        match self.state {
            State::Header => self.on_header(events),
            State::ChunkHeaderRest => self.on_chunk_header(events),
            State::DataOffset { hdr } => self.on_data_offset(hdr),
            State::ChunkBody { hdr } => {
                self.on_chunk_body(hdr, events)?;
                self.expect_header();
                if hdr.flags & proto::REPLY_FLAG_DONE != 0 {
                    self.finish(hdr.cookie, events)?;
                }
                Ok(())
            }
            State::SimplePayload { .. } | State::DataPayload { .. } => {
                unreachable!("payload states do not use scratch")
            }
        }
    }

    fn on_header(&mut self, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let magic = proto::be_u32(&self.scratch, 0);
        match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                let errno = proto::be_u32(&self.scratch, 4);
                let cookie = proto::be_u64(&self.scratch, 8);
                let p = self.pending(cookie)?;
                if errno != 0 {
                    p.error = Some((errno, String::new()));
                    self.expect_header();
                    return self.finish(cookie, events);
                }
                match p.cmd_type {
                    proto::CMD_READ => {
                        let end = p.len;
                        p.covered = vec![(0, end)];
                        p.covered_bytes = u64::from(end);
                        self.state = State::SimplePayload {
                            cookie,
                            buf_offset: 0,
                            end,
                        };
                        Ok(())
                    }
                    proto::CMD_BLOCK_STATUS => {
                        Err(format!("simple reply without extents to {}", p.describe()))
                    }
                    _ => {
                        self.expect_header();
                        self.finish(cookie, events)
                    }
                }
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                if !self.info.structured_replies {
                    return Err(
                        "structured reply although structured replies were not negotiated".into(),
                    );
                }
                self.state = State::ChunkHeaderRest;
                self.scratch.resize(proto::STRUCTURED_REPLY_BYTES, 0);
                Ok(())
            }
            other => Err(format!(
                "reply magic {other:#010x} is neither simple ({:#010x}) nor structured ({:#010x})",
                proto::SIMPLE_REPLY_MAGIC,
                proto::STRUCTURED_REPLY_MAGIC
            )),
        }
    }

    fn on_chunk_header(&mut self, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let mut b = [0u8; proto::STRUCTURED_REPLY_BYTES];
        b.copy_from_slice(&self.scratch[..proto::STRUCTURED_REPLY_BYTES]);
        let hdr = proto::decode_chunk_header(&b).map_err(|e| match e {
            NbdError::Protocol(m) => m,
            other => other.to_string(),
        })?;
        let p = self.pending(hdr.cookie)?;
        let cmd_type = p.cmd_type;
        let ty = hdr.reply_type;
        let len = hdr.len_bytes;
        let bad_len = |p: &Pending, what: &str| {
            format!(
                "{} chunk of {len} bytes for {}: {what}",
                type_name(ty),
                p.describe()
            )
        };
        let body_len = match ty {
            proto::REPLY_TYPE_NONE => {
                if len != 0 {
                    return Err(bad_len(p, "must be empty"));
                }
                if hdr.flags & proto::REPLY_FLAG_DONE == 0 {
                    return Err(format!(
                        "NONE chunk without the DONE flag for {}",
                        p.describe()
                    ));
                }
                self.expect_header();
                return self.finish(hdr.cookie, events);
            }
            proto::REPLY_TYPE_OFFSET_DATA | proto::REPLY_TYPE_OFFSET_HOLE
                if cmd_type != proto::CMD_READ =>
            {
                return Err(format!(
                    "{} chunk in the reply to {}",
                    type_name(ty),
                    p.describe()
                ));
            }
            proto::REPLY_TYPE_OFFSET_DATA => {
                if len < 9 {
                    return Err(bad_len(p, "must be at least 9"));
                }
                self.state = State::DataOffset { hdr };
                self.expect_scratch(8);
                return Ok(());
            }
            proto::REPLY_TYPE_OFFSET_HOLE if len != 12 => return Err(bad_len(p, "must be 12")),
            proto::REPLY_TYPE_OFFSET_HOLE => len,
            proto::REPLY_TYPE_BLOCK_STATUS if cmd_type != proto::CMD_BLOCK_STATUS => {
                return Err(format!(
                    "BLOCK_STATUS chunk in the reply to {}",
                    p.describe()
                ));
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                if len < 12 || (len - 4) % 8 != 0 || len > MAX_PAYLOAD_BYTES {
                    return Err(bad_len(
                        p,
                        "must be 4 + a positive multiple of 8, within the payload limit",
                    ));
                }
                len
            }
            t if t & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                if !(6..=MAX_ERROR_CHUNK_BYTES).contains(&len) {
                    return Err(bad_len(p, "an error chunk must be 6 to 65549 bytes"));
                }
                len
            }
            _ => {
                return Err(format!(
                    "unknown reply chunk type {ty} for {}",
                    p.describe()
                ));
            }
        };
        self.state = State::ChunkBody { hdr };
        self.expect_scratch(body_len as usize);
        Ok(())
    }

    fn on_data_offset(&mut self, hdr: ChunkHeader) -> Result<(), String> {
        let offset = proto::be_u64(&self.scratch, 0);
        let data_len = hdr.len_bytes - 8;
        let p = self.pending(hdr.cookie)?;
        let (start, end) = range_in_request(p, offset, u64::from(data_len), "OFFSET_DATA")?;
        p.cover(start, end)?;
        self.state = State::DataPayload {
            hdr,
            buf_offset: start,
            end,
        };
        Ok(())
    }

    fn on_chunk_body(
        &mut self,
        hdr: ChunkHeader,
        events: &mut Vec<ReplyEvent>,
    ) -> Result<(), String> {
        let b = &self.scratch;
        let cookie = hdr.cookie;
        let p = self.in_flight.get_mut(&cookie).ok_or("request vanished")?;
        match hdr.reply_type {
            proto::REPLY_TYPE_OFFSET_HOLE => {
                let offset = proto::be_u64(b, 0);
                let hole_len = proto::be_u32(b, 8);
                if hole_len == 0 {
                    return Err(format!(
                        "empty OFFSET_HOLE in the reply to {}",
                        p.describe()
                    ));
                }
                let (start, end) = range_in_request(p, offset, u64::from(hole_len), "OFFSET_HOLE")?;
                p.cover(start, end)?;
                events.push(ReplyEvent::Hole {
                    cookie,
                    buf_offset: start,
                    len: end - start,
                });
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                let context_id = proto::be_u32(b, 0);
                if self.info.context_name(context_id).is_none() {
                    return Err(format!(
                        "BLOCK_STATUS for meta context id {context_id}, which was not negotiated"
                    ));
                }
                if p.contexts_seen.contains(&context_id) {
                    return Err(format!(
                        "two BLOCK_STATUS chunks for context id {context_id} in one reply"
                    ));
                }
                p.contexts_seen.push(context_id);
                let extents = parse_extents(&b[4..], p)?;
                events.push(ReplyEvent::BlockStatus {
                    cookie,
                    context_id,
                    extents,
                });
            }
            ty => {
                let errno = proto::be_u32(b, 0);
                let msg_len = usize::from(proto::be_u16(b, 4));
                let fixed_tail = if ty == proto::REPLY_TYPE_ERROR_OFFSET {
                    8
                } else {
                    0
                };
                if 6 + msg_len + fixed_tail > b.len() {
                    return Err(format!(
                        "error chunk message of {msg_len} bytes does not fit its {}-byte chunk",
                        b.len()
                    ));
                }
                if errno == 0 {
                    return Err(format!(
                        "error chunk with error value 0 for {}",
                        p.describe()
                    ));
                }
                if ty == proto::REPLY_TYPE_ERROR_OFFSET {
                    let offset = proto::be_u64(b, 6 + msg_len);
                    range_in_request(p, offset, 1, "ERROR_OFFSET")?;
                }
                let msg = &b[6..6 + msg_len.min(MAX_STRING_BYTES as usize)];
                if p.error.is_none() {
                    p.error = Some((errno, String::from_utf8_lossy(msg).into_owned()));
                }
            }
        }
        Ok(())
    }

    /// The final chunk of `cookie` arrived (scratch already reset).
    fn finish(&mut self, cookie: u64, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let p = self.in_flight.remove(&cookie).ok_or("request vanished")?;
        if let Some((errno, message)) = p.error {
            events.push(ReplyEvent::Failed {
                cookie,
                errno,
                message,
            });
            return Ok(());
        }
        if p.cmd_type == proto::CMD_READ && p.covered_bytes != u64::from(p.len) {
            return Err(format!(
                "{} finished successfully with only {} of its bytes sent",
                p.describe(),
                p.covered_bytes
            ));
        }
        if p.cmd_type == proto::CMD_BLOCK_STATUS {
            for (name, id) in &self.info.meta_contexts {
                if !p.contexts_seen.contains(id) {
                    return Err(format!(
                        "{} finished without extents for context {name:?}",
                        p.describe()
                    ));
                }
            }
        }
        events.push(ReplyEvent::Done { cookie });
        Ok(())
    }
}

fn type_name(ty: u16) -> &'static str {
    match ty {
        proto::REPLY_TYPE_NONE => "NONE",
        proto::REPLY_TYPE_OFFSET_DATA => "OFFSET_DATA",
        proto::REPLY_TYPE_OFFSET_HOLE => "OFFSET_HOLE",
        proto::REPLY_TYPE_BLOCK_STATUS => "BLOCK_STATUS",
        proto::REPLY_TYPE_ERROR => "ERROR",
        proto::REPLY_TYPE_ERROR_OFFSET => "ERROR_OFFSET",
        _ => "unknown",
    }
}

/// Check [offset, offset+len) lies inside the request; returns it relative
/// to the request start.
fn range_in_request(p: &Pending, offset: u64, len: u64, what: &str) -> Result<(u32, u32), String> {
    let req_end = p.offset + u64::from(p.len);
    let end = offset.checked_add(len);
    match end {
        Some(end) if offset >= p.offset && end <= req_end => {
            Ok(((offset - p.offset) as u32, (end - p.offset) as u32))
        }
        _ => Err(format!(
            "{what} at offset {offset} length {len} lies outside the request ({})",
            p.describe()
        )),
    }
}

/// Parse BLOCK_STATUS descriptors (length already checked: n * 8 bytes,
/// n >= 1, within MAX_PAYLOAD_BYTES). The last extent may be truncated to
/// the request end; any other extent past it is refused.
fn parse_extents(b: &[u8], p: &Pending) -> Result<Vec<Extent>, String> {
    let count = b.len() / 8;
    let mut extents = Vec::with_capacity(count);
    let req_len = u64::from(p.len);
    let mut pos = 0u64;
    for i in 0..count {
        let len = proto::be_u32(b, i * 8);
        let flags = proto::be_u32(b, i * 8 + 4);
        if len == 0 {
            return Err(format!(
                "zero-length extent #{i} in the reply to {}",
                p.describe()
            ));
        }
        if pos >= req_len {
            return Err(format!(
                "extent #{i} starts at offset {} past the end of the request ({})",
                p.offset + pos,
                p.describe()
            ));
        }
        let mut len = len;
        if pos + u64::from(len) > req_len {
            if i + 1 != count {
                return Err(format!(
                    "extent #{i} reaches past the end of the request ({})",
                    p.describe()
                ));
            }
            len = (req_len - pos) as u32;
        }
        pos += u64::from(len);
        extents.push(Extent { len, flags });
    }
    Ok(extents)
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
