//! Sans-IO transmission phase: see the module docs of [`crate::nbd`].
//! (Implementation owned by the NBD work stream.)

use super::NbdError;

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

/// See module docs.
pub struct ClientConn {
    _private: (),
}

impl ClientConn {
    /// New state machine after a successful handshake.
    pub fn new(_info: &super::handshake::ExportInfo) -> Self {
        todo!()
    }
    /// Encode `cmd` under `cookie` into `out` (28-byte request header) and
    /// register it as in flight. Refuses requests the server's limits forbid.
    pub fn encode_request(
        &mut self,
        _cookie: u64,
        _cmd: Cmd,
        _out: &mut [u8; 28],
    ) -> Result<(), NbdError> {
        todo!()
    }
    /// Number of commands awaiting a reply.
    pub fn in_flight(&self) -> usize {
        todo!()
    }
    /// Where the next received bytes go.
    pub fn recv_target(&self) -> RecvTarget {
        todo!()
    }
    /// The unfilled part of the scratch area for [`RecvTarget::Scratch`].
    pub fn scratch_mut(&mut self) -> &mut [u8] {
        todo!()
    }
    /// The driver received `n` bytes into the current target. Returns the
    /// events completed by those bytes (pushed onto `events`).
    pub fn advance(&mut self, _n: usize, _events: &mut Vec<ReplyEvent>) -> Result<(), NbdError> {
        todo!()
    }
}
