//! One NBD connection as driven by a worker through an [`IoEngine`]: a queue
//! of encoded requests sent in batches with one `writev` in flight, and one
//! `recv` in flight whose destination the sans-IO [`ClientConn`] chooses
//! (its scratch area for headers, the caller's buffer for read payloads).
//!
//! Each connection has an [`IoWatch`] ([`super::silence`]): since when it
//! has waited for a reply and heard nothing.

#![forbid(unsafe_code)]
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use super::silence::IoWatch;

use crate::engine::iovec::IoVecs;
use crate::engine::{IoEngine, Op};
use crate::nbd::NbdError;
use crate::nbd::conn::{ClientConn, Cmd, RecvTarget, ReplyEvent};
use crate::nbd::handshake::ExportInfo;
use crate::nbd::uri::NbdStream;

/// Most requests gathered into one `writev`.
const SEND_BATCH_MAX: usize = 64;

struct Outgoing {
    header: [u8; 28],
    /// Address of the payload (an address only: the worker keeps it valid).
    payload_addr: usize,
    payload_len: u32,
}

/// See module docs. Always boxed: in-flight ops point into it.
pub struct NbdIo {
    pub stream: NbdStream,
    fd: RawFd,
    pub conn: ClientConn,
    pub info: ExportInfo,
    queue: VecDeque<Outgoing>,
    /// The batch being sent; capacity fixed at SEND_BATCH_MAX so the
    /// headers never move while the kernel reads them.
    batch: Vec<Outgoing>,
    iov: IoVecs,
    /// First iovec not yet fully sent.
    iov_pos: usize,
    pub send_in_flight: bool,
    pub recv_in_flight: bool,
    /// The connection failed: no more I/O is started on it.
    pub dead: bool,
    /// Length asked of the recv in flight.
    recv_len: usize,
    /// How long the server has been silent (see [`IoWatch`]).
    pub watch: Arc<IoWatch>,
    /// Timeout of the blocking requests at the end (flush, disconnect).
    io_timeout: Duration,
}

/// Where a read payload must land: resolved by the worker from a cookie.
pub type PayloadDest<'a> = &'a mut dyn FnMut(u64, u32, u32) -> Option<*mut u8>;

impl NbdIo {
    /// Take over a negotiated connection. The socket's own timeouts are
    /// cleared: the engines' blocking calls must end only by completing
    /// or by shutdown(2), and [`IoWatch`] times the server instead.
    pub fn new(stream: NbdStream, info: ExportInfo, io_timeout: Duration) -> Box<Self> {
        if let Err(e) = stream.set_io_timeout(None) {
            tracing::debug!("clearing the NBD socket's timeouts: {e}");
        }
        let fd = stream.as_raw_fd();
        let conn = ClientConn::new(&info);
        Box::new(Self {
            stream,
            fd,
            conn,
            info,
            queue: VecDeque::new(),
            batch: Vec::with_capacity(SEND_BATCH_MAX),
            iov: IoVecs::with_capacity(SEND_BATCH_MAX * 2),
            iov_pos: 0,
            send_in_flight: false,
            recv_in_flight: false,
            dead: false,
            recv_len: 0,
            watch: Arc::new(IoWatch::new()),
            io_timeout,
        })
    }

    /// Encode `cmd` and queue it; `payload` must stay valid until the
    /// command's reply arrives.
    pub fn request(
        &mut self,
        cookie: u64,
        cmd: Cmd,
        payload: *const u8,
        payload_len: u32,
    ) -> Result<(), NbdError> {
        let mut header = [0u8; 28];
        self.conn.encode_request(cookie, cmd, &mut header)?;
        self.queue.push_back(Outgoing {
            header,
            payload_addr: payload as usize,
            payload_len,
        });
        Ok(())
    }

    /// Start a `writev` of queued requests if none is in flight.
    pub fn kick_send(&mut self, engine: &mut dyn IoEngine, user_data: u64) -> std::io::Result<()> {
        if self.dead || self.send_in_flight || self.queue.is_empty() {
            return Ok(());
        }
        self.batch.clear();
        self.iov.clear();
        while self.batch.len() < SEND_BATCH_MAX {
            let Some(o) = self.queue.pop_front() else {
                break;
            };
            self.batch.push(o);
        }
        for o in &self.batch {
            self.iov.push(o.header.as_ptr() as usize, o.header.len());
            if o.payload_len > 0 {
                self.iov.push(o.payload_addr, o.payload_len as usize);
            }
        }
        self.iov_pos = 0;
        self.push_writev(engine, user_data)
    }

    fn push_writev(&mut self, engine: &mut dyn IoEngine, user_data: u64) -> std::io::Result<()> {
        let (iov, count) = self.iov.tail(self.iov_pos);
        let iovcnt = u32::try_from(count.min(1024)).expect("bounded");
        engine.push(
            user_data,
            Op::Writev {
                fd: self.fd,
                iov,
                iovcnt,
            },
        )?;
        self.send_in_flight = true;
        Ok(())
    }

    /// A `writev` completed with `result`; continues a partial send.
    pub fn on_send(
        &mut self,
        result: i32,
        engine: &mut dyn IoEngine,
        user_data: u64,
    ) -> Result<(), NbdError> {
        self.send_in_flight = false;
        if result < 0 {
            self.kill();
            return Err(NbdError::Io(std::io::Error::from_raw_os_error(-result)));
        }
        let mut sent = result.unsigned_abs() as usize; // result >= 0 here
        while sent > 0 && self.iov_pos < self.iov.len() {
            let len = self.iov.entry_len(self.iov_pos);
            if sent >= len {
                sent -= len;
                self.iov_pos += 1;
            } else {
                self.iov.advance_entry(self.iov_pos, sent);
                sent = 0;
            }
        }
        if self.iov_pos < self.iov.len() {
            self.push_writev(engine, user_data).map_err(NbdError::Io)?;
        } else {
            self.kick_send(engine, user_data).map_err(NbdError::Io)?;
        }
        Ok(())
    }

    /// Post a `recv` if replies are awaited and none is in flight.
    /// `dest(cookie, buf_offset, len)` resolves a read payload's address.
    pub fn kick_recv(
        &mut self,
        engine: &mut dyn IoEngine,
        user_data: u64,
        dest: PayloadDest<'_>,
    ) -> Result<(), NbdError> {
        if self.dead || self.recv_in_flight || self.conn.in_flight() == 0 {
            return Ok(());
        }
        let (ptr, len) = match self.conn.recv_target() {
            RecvTarget::Scratch { len } => {
                let scratch = self.conn.scratch_mut();
                if len == 0 || len > scratch.len() {
                    return Err(NbdError::Protocol(format!(
                        "decoder asked for {len} scratch bytes"
                    )));
                }
                (scratch.as_mut_ptr(), len)
            }
            RecvTarget::Payload {
                cookie,
                buf_offset,
                len,
            } => {
                let ptr = dest(cookie, buf_offset, len).ok_or_else(|| {
                    NbdError::Protocol(format!("read data for unknown request {cookie:#x}"))
                })?;
                (ptr, len as usize)
            }
        };
        let len32 =
            u32::try_from(len).map_err(|_| NbdError::Protocol("receive too large".into()))?;
        engine
            .push(
                user_data,
                Op::Recv {
                    fd: self.fd,
                    buf: ptr,
                    len: len32,
                    waitall: true,
                },
            )
            .map_err(NbdError::Io)?;
        self.recv_in_flight = true;
        self.recv_len = len;
        self.watch.waiting();
        Ok(())
    }

    /// A `recv` completed with `result`; decoded events go to `events`.
    pub fn on_recv(&mut self, result: i32, events: &mut Vec<ReplyEvent>) -> Result<(), NbdError> {
        self.recv_in_flight = false;
        if result < 0 {
            self.kill();
            return Err(NbdError::Io(std::io::Error::from_raw_os_error(-result)));
        }
        if result == 0 {
            self.kill();
            return Err(NbdError::Closed("while replies were outstanding"));
        }
        let n = (result.unsigned_abs() as usize).min(self.recv_len); // result > 0 here
        let out = self.conn.advance(n, events);
        self.watch.heard(self.conn.in_flight() > 0);
        if out.is_err() {
            self.kill();
        }
        out
    }

    /// Mark the connection failed and stop all I/O on it.
    pub fn kill(&mut self) {
        self.dead = true;
        self.shutdown();
    }

    /// Stop all I/O on the socket so blocked operations return.
    pub fn shutdown(&self) {
        let _ = match &self.stream {
            NbdStream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            NbdStream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Send one command and wait for its reply with blocking I/O. Only
    /// when nothing else is in flight (after the workers are done).
    pub fn roundtrip_blocking(&mut self, cookie: u64, cmd: Cmd) -> Result<(), NbdError> {
        use std::io::{Read, Write};
        assert!(!self.send_in_flight && !self.recv_in_flight && self.queue.is_empty());
        // No engine uses the socket now: blocking calls, bounded.
        self.stream.set_io_timeout(Some(self.io_timeout))?;
        let mut header = [0u8; 28];
        self.conn.encode_request(cookie, cmd, &mut header)?;
        self.stream.write_all(&header)?;
        if cmd == Cmd::Disconnect {
            return Ok(());
        }
        let mut events = Vec::new();
        loop {
            match self.conn.recv_target() {
                RecvTarget::Scratch { len } => {
                    let buf = &mut self.conn.scratch_mut()[..len];
                    let n = match self.stream.read(buf) {
                        // A read with a timeout is not restarted after a signal.
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        other => other?,
                    };
                    if n == 0 {
                        return Err(NbdError::Closed("while waiting for a reply"));
                    }
                    self.conn.advance(n, &mut events)?;
                }
                RecvTarget::Payload { .. } => {
                    return Err(NbdError::Protocol("unexpected data in reply".into()));
                }
            }
            if let Some(ev) = events.pop() {
                if !events.is_empty() {
                    return Err(NbdError::Protocol(format!("unexpected replies {events:?}")));
                }
                return match ev {
                    ReplyEvent::Done { cookie: c } if c == cookie => Ok(()),
                    ReplyEvent::Failed {
                        cookie: c,
                        errno,
                        message,
                    } if c == cookie => Err(NbdError::Protocol(format!(
                        "command failed with error {errno}: {message}"
                    ))),
                    other => Err(NbdError::Protocol(format!("unexpected reply {other:?}"))),
                };
            }
        }
    }
}
