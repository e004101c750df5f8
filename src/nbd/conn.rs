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

use super::NbdError;
use super::handshake::ExportInfo;
use super::proto::{self, ChunkHeader};

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
    /// `CMD_READ`.
    Read {
        /// Where in the export.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// The payload (len bytes) is sent by the driver right after the header.
    Write {
        /// Where in the export.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// `no_hole`: NBD_CMD_FLAG_NO_HOLE; `fast`: NBD_CMD_FLAG_FAST_ZERO.
    WriteZeroes {
        /// Where in the export.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Allocate (`CMD_FLAG_NO_HOLE`).
        no_hole: bool,
        /// Fail unless fast (`CMD_FLAG_FAST_ZERO`).
        fast: bool,
    },
    /// `CMD_TRIM`.
    Trim {
        /// Where in the export.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// `CMD_FLUSH`.
    Flush,
    /// `CMD_BLOCK_STATUS`: extents of the range in every negotiated meta
    /// context.
    BlockStatus {
        /// Where in the export.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// `CMD_DISC`.
    Disconnect,
}

/// Where the driver must put the next bytes it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvTarget {
    /// Fill [`ClientConn::scratch_mut`] (exactly `len` more bytes are needed;
    /// the driver may deliver fewer and call [`ClientConn::advance`] again).
    Scratch {
        /// Bytes expected.
        len: usize,
    },
    /// Read data for READ `cookie`: the next `len` bytes go to the caller's
    /// read buffer at `buf_offset` (offset relative to the READ's start).
    Payload {
        /// The READ.
        cookie: u64,
        /// Where in the READ's buffer.
        buf_offset: u32,
        /// Bytes expected.
        len: u32,
    },
}

/// An extent from BLOCK_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes the extent covers.
    pub len: u32,
    /// The meta context's flags (`base:allocation`: hole 1, zero 2).
    pub flags: u32,
}

/// Something the server finished telling us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyEvent {
    /// A region of READ `cookie`'s buffer the server reported as a hole:
    /// the driver must zero it (it was not sent).
    Hole {
        /// The request.
        cookie: u64,
        /// Where in the READ's buffer.
        buf_offset: u32,
        /// Bytes of the hole.
        len: u32,
    },
    /// Block status extents for `cookie` in meta context `context_id`
    /// (already checked: non-zero lengths, not past the request).
    BlockStatus {
        /// The request.
        cookie: u64,
        /// The meta context.
        context_id: u32,
        /// The extents, in order.
        extents: Vec<Extent>,
    },
    /// Command `cookie` finished successfully (for READ: every byte of the
    /// buffer has been delivered as payload or reported as a hole).
    Done {
        /// The request.
        cookie: u64,
    },
    /// Command `cookie` failed on the server with NBD error `errno`
    /// (NBD_EPERM, NBD_EIO, …) and the server's message, if any.
    Failed {
        /// The request.
        cookie: u64,
        /// The NBD errno.
        errno: u32,
        /// The server's message.
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
}

#[path = "conn_decode.rs"]
mod decode;

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
