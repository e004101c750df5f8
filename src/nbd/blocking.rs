//! Blocking driver for [`super::conn::ClientConn`]. It waits as long as
//! its stream lets it: streams from [`super::uri::NbdUri::connect_timeout`]
//! carry the I/O timeout, so a silent server fails a request with
//! `TimedOut` instead of hanging.
//!
//! One request at a time over any `Read + Write` stream: handshake-time
//! work (block-status planning, flush), tests and simple tools. The copy
//! engine drives [`ClientConn`] itself with many requests in flight.
//! On TCP, set `TCP_NODELAY` (the URI connector does) so small requests are
//! not held back by Nagle's algorithm.

use std::io::{ErrorKind, Read, Write};

use super::NbdError;
use super::conn::{ClientConn, Cmd, Extent, RecvTarget, ReplyEvent};
use super::handshake::{self, ExportInfo};
use super::proto;

/// Writes up to this size go out in one `write` together with their header.
const COALESCE_WRITE_BYTES: usize = 64 * 1024;
/// Largest WRITE_ZEROES / TRIM request (those carry no payload).
const MAX_NO_PAYLOAD_REQUEST_BYTES: u32 = 1 << 30;

/// A connected, negotiated NBD client doing one request at a time.
pub struct Client<S: Read + Write> {
    stream: S,
    conn: ClientConn,
    info: ExportInfo,
    next_cookie: u64,
    events: Vec<ReplyEvent>,
}

impl<S: Read + Write> Client<S> {
    /// Negotiate `export` on `stream`, asking for the `meta` contexts.
    pub fn connect(mut stream: S, export: &str, meta: &[&str]) -> Result<Self, NbdError> {
        let info = handshake::negotiate(&mut stream, export, meta)?;
        let conn = ClientConn::new(&info);
        Ok(Client {
            stream,
            conn,
            info,
            next_cookie: 1,
            events: Vec::new(),
        })
    }

    /// Drive a connection negotiated elsewhere (no request in flight).
    pub fn from_negotiated(stream: S, info: ExportInfo) -> Self {
        let conn = ClientConn::new(&info);
        Client {
            stream,
            conn,
            info,
            next_cookie: 1,
            events: Vec::new(),
        }
    }

    /// What was negotiated.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Read `buf.len()` bytes at `offset`; holes read as zeroes.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let step = self.info.block_max.max(1);
        let mut at = offset;
        for piece in buf.chunks_mut(step as usize) {
            let len = piece_len(piece)?;
            self.run(Cmd::Read { offset: at, len }, &[], piece)?;
            at += u64::from(len);
        }
        Ok(())
    }

    /// Write `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let step = self.info.block_max.max(1);
        let mut at = offset;
        for piece in data.chunks(step as usize) {
            let len = piece_len(piece)?;
            let cmd = Cmd::Write {
                offset: at,
                len,
                fua: false,
            };
            self.run(cmd, piece, &mut [])?;
            at += u64::from(len);
        }
        Ok(())
    }

    /// Make `len_bytes` at `offset` read as zeroes (NBD_CMD_WRITE_ZEROES).
    pub fn write_zeroes(&mut self, offset: u64, len_bytes: u64) -> Result<(), NbdError> {
        self.ranged(offset, len_bytes, |offset, len| Cmd::WriteZeroes {
            offset,
            len,
            no_hole: false,
            fast: false,
        })
    }

    /// Discard `len_bytes` at `offset` (NBD_CMD_TRIM).
    pub fn trim(&mut self, offset: u64, len_bytes: u64) -> Result<(), NbdError> {
        self.ranged(offset, len_bytes, |offset, len| Cmd::Trim { offset, len })
    }

    /// Make every completed write durable (NBD_CMD_FLUSH).
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.run(Cmd::Flush, &[], &mut []).map(drop)
    }

    /// One BLOCK_STATUS request; returns the extents of `context` starting
    /// at `offset`, possibly covering less than `len`.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        context: &str,
    ) -> Result<Vec<Extent>, NbdError> {
        let Some(id) = self.info.context_id(context) else {
            return Err(NbdError::Refused {
                what: format!("meta context {context:?}"),
                message: "the server did not accept it during the handshake".into(),
            });
        };
        let replies = self.run(Cmd::BlockStatus { offset, len }, &[], &mut [])?;
        replies
            .into_iter()
            .find(|(cid, _)| *cid == id)
            .map(|(_, extents)| extents)
            .ok_or_else(|| NbdError::Protocol(format!("no extents for context {context:?}")))
    }

    /// Tell the server we are leaving (NBD_CMD_DISC) and close.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        let mut hdr = [0u8; proto::REQUEST_BYTES];
        self.conn.encode_request(0, Cmd::Disconnect, &mut hdr)?;
        self.stream.write_all(&hdr)?;
        self.stream.flush()?;
        Ok(())
    }

    /// The stream, the transmission state machine and the negotiated info,
    /// for a driver that takes over (e.g. with many requests in flight).
    pub fn into_parts(self) -> (S, ClientConn, ExportInfo) {
        (self.stream, self.conn, self.info)
    }

    fn ranged(
        &mut self,
        offset: u64,
        len_bytes: u64,
        cmd: impl Fn(u64, u32) -> Cmd,
    ) -> Result<(), NbdError> {
        let min = self.info.block_min.max(1);
        let step = MAX_NO_PAYLOAD_REQUEST_BYTES - MAX_NO_PAYLOAD_REQUEST_BYTES % min;
        let mut done = 0u64;
        while done < len_bytes {
            let len = u32::try_from(len_bytes - done).map_or(step, |rest| rest.min(step));
            self.run(cmd(offset + done, len), &[], &mut [])?;
            done += u64::from(len);
        }
        Ok(())
    }

    /// Send one request and drive the reply to completion. Returns the
    /// block-status replies (context id, extents), if any.
    fn run(
        &mut self,
        cmd: Cmd,
        write_data: &[u8],
        read_buf: &mut [u8],
    ) -> Result<Vec<(u32, Vec<Extent>)>, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut hdr = [0u8; proto::REQUEST_BYTES];
        self.conn.encode_request(cookie, cmd, &mut hdr)?;
        if !write_data.is_empty() && write_data.len() <= COALESCE_WRITE_BYTES {
            let mut both = Vec::with_capacity(hdr.len() + write_data.len());
            both.extend_from_slice(&hdr);
            both.extend_from_slice(write_data);
            self.stream.write_all(&both)?;
        } else {
            self.stream.write_all(&hdr)?;
            self.stream.write_all(write_data)?;
        }
        self.stream.flush()?;

        let mut block_status = Vec::new();
        loop {
            let n = match self.conn.recv_target() {
                RecvTarget::Scratch { len: 0 } => 0,
                RecvTarget::Scratch { .. } => read_some(&mut self.stream, self.conn.scratch_mut())?,
                RecvTarget::Payload {
                    buf_offset, len, ..
                } => {
                    let start = buf_offset as usize;
                    let Some(dst) = read_buf.get_mut(start..start + len as usize) else {
                        return Err(NbdError::Protocol(format!(
                            "read data at buffer offset {start} length {len} does not fit the {}-byte buffer",
                            read_buf.len()
                        )));
                    };
                    read_some(&mut self.stream, dst)?
                }
            };
            self.conn.advance(n, &mut self.events)?;
            if n == 0 && self.events.is_empty() {
                return Err(NbdError::Protocol(
                    "the reply decoder asked for no bytes".into(),
                ));
            }
            for ev in self.events.drain(..) {
                match ev {
                    ReplyEvent::Hole {
                        buf_offset, len, ..
                    } => {
                        let start = buf_offset as usize;
                        if let Some(dst) = read_buf.get_mut(start..start + len as usize) {
                            dst.fill(0);
                        }
                    }
                    ReplyEvent::BlockStatus {
                        context_id,
                        extents,
                        ..
                    } => block_status.push((context_id, extents)),
                    ReplyEvent::Done { .. } => return Ok(block_status),
                    ReplyEvent::Failed { errno, message, .. } => {
                        return Err(command_error(cmd, errno, message));
                    }
                }
            }
        }
    }
}

/// Read at least one byte into `buf` (non-empty), mapping EOF to Closed.
fn read_some<S: Read>(s: &mut S, buf: &mut [u8]) -> Result<usize, NbdError> {
    loop {
        match s.read(buf) {
            Ok(0) => return Err(NbdError::Closed("in the middle of a reply")),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(NbdError::Io(e)),
        }
    }
}

fn command_error(cmd: Cmd, errno: u32, message: String) -> NbdError {
    let (command, offset, length) = match cmd {
        Cmd::Read { offset, len } => ("READ", offset, len),
        Cmd::Write { offset, len, .. } => ("WRITE", offset, len),
        Cmd::WriteZeroes { offset, len, .. } => ("WRITE_ZEROES", offset, len),
        Cmd::Trim { offset, len } => ("TRIM", offset, len),
        Cmd::Flush => ("FLUSH", 0, 0),
        Cmd::BlockStatus { offset, len } => ("BLOCK_STATUS", offset, len),
        Cmd::Disconnect => ("DISC", 0, 0),
    };
    NbdError::Command {
        command,
        offset,
        length: u64::from(length),
        errno,
        errno_name: proto::errno_name(errno),
        message: if message.is_empty() {
            "no message from the server".into()
        } else {
            message
        },
    }
}

/// A piece's length as the `u32` of a request. Pieces are cut at
/// `block_max` (a `u32`), so the error is a bug in the caller.
fn piece_len(piece: &[u8]) -> Result<u32, NbdError> {
    u32::try_from(piece.len())
        .map_err(|_| NbdError::Invalid(format!("a request of {} bytes", piece.len())))
}
