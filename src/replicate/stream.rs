//! One transport stream of a job (TLS 1.3 with mutual authentication, or
//! plaintext TCP behind an explicit flag) and frame I/O over it.
#![forbid(unsafe_code)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::net::socket::{SocketTuning, TuningReport, connect_tuned};
use crate::net::tls::{self, TlsDir, TlsRole};
use crate::wire::{Frame, FrameDecoder, WireError};

/// Errors of a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Dialing failed.
    #[error("{0}")]
    Net(#[from] crate::net::socket::NetError),
    /// The TLS handshake failed.
    #[error("{0}")]
    Tls(#[from] crate::net::tls::TlsError),
    /// Reading or writing the stream failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A frame did not decode (or, a bug, encode).
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    /// The receiver closed the connection.
    #[error("the receiver closed the connection")]
    Closed,
    /// The receiver sent an ERROR frame.
    #[error("the receiver refused: {code:?}: {message}")]
    Refused {
        /// The frame's code.
        code: crate::wire::ErrorCode,
        /// The receiver's message.
        message: String,
    },
    /// A frame that has no place here.
    #[error("unexpected frame from the receiver: {0}")]
    Unexpected(String),
}

/// How to reach the receiver.
#[derive(Clone)]
pub struct Dialer {
    /// The receiver's address.
    pub addr: SocketAddr,
    /// Host name as the user wrote it (checked against the certificate).
    pub server_name: String,
    /// None = plaintext (only with `--insecure-plaintext`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Socket settings.
    pub tuning: SocketTuning,
    /// How long a connect may take.
    pub connect_timeout_ms: u64,
}

impl Dialer {
    /// Build from `HOST:PORT` and the TLS directory.
    pub fn new(to: &str, tls_dir: Option<&Path>, tuning: SocketTuning) -> Result<Self, String> {
        use std::net::ToSocketAddrs;
        let addr = to
            .to_socket_addrs()
            .map_err(|e| format!("--to {to}: {e} (expected HOST:PORT)"))?
            .next()
            .ok_or_else(|| format!("--to {to}: the name resolves to no address"))?;
        let server_name = match to.rsplit_once(':') {
            Some((host, _)) => host.trim_matches(['[', ']']).to_string(),
            None => to.to_string(),
        };
        let tls = match tls_dir {
            Some(dir) => {
                let d = TlsDir::load(dir, TlsRole::Client).map_err(|e| e.to_string())?;
                Some(tls::client_config(&d).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        Ok(Self {
            addr,
            server_name,
            tls,
            tuning,
            connect_timeout_ms: 10_000,
        })
    }

    /// Connect one stream (TCP tuned for the link, then TLS).
    pub fn dial(&self) -> Result<(Stream, TuningReport), StreamError> {
        let (tcp, report) = connect_tuned(self.addr, &self.tuning, self.connect_timeout_ms)?;
        let stream = match &self.tls {
            Some(cfg) => Stream::Tls(Box::new(tls::connect(
                tcp,
                Arc::clone(cfg),
                &self.server_name,
                self.connect_timeout_ms,
            )?)),
            None => Stream::Plain(tcp),
        };
        Ok((stream, report))
    }
}

/// A connected stream.
pub enum Stream {
    /// TLS 1.3 over TCP.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    /// Plaintext TCP (`--insecure-plaintext`).
    Plain(TcpStream),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tls(s) => s.get_ref(),
            Stream::Plain(s) => s,
        }
    }

    /// Sets the socket's read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.tcp().set_read_timeout(t)
    }

    /// Write the parts of one frame back to back and flush them. Over TLS
    /// the plaintext is sealed in pieces of [`SEAL_BATCH_BYTES`], each
    /// batch's records leaving in one `writev`: a frame header shares its
    /// record and syscall with the payload instead of taking its own, and a
    /// 2 MiB payload takes 8 syscalls, not 32, while the records are still
    /// in cache when the kernel copies them.
    pub fn write_parts(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => write_all_vectored(s, parts),
            Stream::Tls(s) => {
                let rustls::StreamOwned { conn, sock } = &mut **s;
                let mut batch = 0usize;
                for part in parts {
                    let mut rest = *part;
                    while !rest.is_empty() {
                        let take = rest.len().min(SEAL_BATCH_BYTES - batch);
                        let n = conn.writer().write(&rest[..take])?;
                        rest = &rest[n..];
                        batch += n;
                        if batch >= SEAL_BATCH_BYTES || n == 0 {
                            flush_tls(conn, sock)?;
                            batch = 0;
                        }
                    }
                }
                flush_tls(conn, sock)
            }
        }
    }

    /// Send a TLS close_notify (best effort) and shut the socket down.
    pub fn close(&mut self) {
        if let Stream::Tls(s) = self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.tcp().shutdown(std::net::Shutdown::Both);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tls(s) => s.read(buf),
            Stream::Plain(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tls(s) => s.write(buf),
            Stream::Plain(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Tls(s) => s.write_vectored(bufs),
            Stream::Plain(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush(),
            Stream::Plain(s) => s.flush(),
        }
    }
}

/// Plaintext sealed into TLS records before they are written out; the
/// connection's buffer limit ([`TLS_BUFFER_LIMIT_BYTES`]) leaves room for it.
pub const SEAL_BATCH_BYTES: usize = 256 * 1024;

/// rustls buffer limit for a data stream: one seal batch plus record
/// overhead (rustls' default, 64 KiB, would cut every batch in four).
pub const TLS_BUFFER_LIMIT_BYTES: usize = 2 * SEAL_BATCH_BYTES;

fn flush_tls(conn: &mut rustls::ClientConnection, sock: &mut TcpStream) -> std::io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

/// `write_all` over several buffers, with one `writev` where the socket
/// takes everything.
fn write_all_vectored(w: &mut impl Write, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> =
        parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
    let mut bufs = &mut slices[..];
    std::io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read one whole frame.
pub fn read_frame(r: &mut impl Read, dec: &mut FrameDecoder) -> Result<Frame, StreamError> {
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(f);
        }
        let buf = dec.buf_mut();
        if buf.is_empty() {
            return Err(StreamError::Unexpected(
                "decoder wants no bytes but has no frame".into(),
            ));
        }
        // A read with a timeout returns EINTR (instead of restarting)
        // when the thread is interrupted: read again.
        let n = match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        if n == 0 {
            return Err(StreamError::Closed);
        }
        dec.advance(n);
    }
}

/// Encode and write one frame.
pub fn write_frame(
    w: &mut impl Write,
    f: &Frame,
    scratch: &mut Vec<u8>,
) -> Result<usize, StreamError> {
    scratch.clear();
    f.encode(scratch)?;
    w.write_all(scratch)?;
    Ok(scratch.len())
}

/// Turn an ERROR frame into a [`StreamError::Refused`]; anything else
/// unexpected into [`StreamError::Unexpected`].
pub fn unexpected(f: Frame) -> StreamError {
    match f {
        Frame::Error(e) => refused(e),
        other => StreamError::Unexpected(format!("{:?}", other.frame_type())),
    }
}

/// An ERROR frame from the receiver as a refusal, its text made
/// [`printable`]: every message a peer sends reaches the sender's
/// terminal and log only through here.
pub fn refused(e: crate::wire::ErrorFrame) -> StreamError {
    StreamError::Refused {
        code: e.code,
        message: printable(&e.message),
    }
}

/// Text a peer sent, safe to print or log: every control character (C0
/// including newline and tab, DEL, C1) becomes U+FFFD, so a peer cannot
/// move the cursor, rewrite the screen or forge log lines. Everything else
/// is kept as it is.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_replaces_every_control_character() {
        let hostile = "refused\x1b[2J\x1b]0;owned\x07\r\nWARN fake\tline\x7f\u{85}\u{9b}31m";
        let shown = printable(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(
            shown,
            "refused\u{FFFD}[2J\u{FFFD}]0;owned\u{FFFD}\u{FFFD}\u{FFFD}WARN fake\u{FFFD}line\
             \u{FFFD}\u{FFFD}\u{FFFD}31m"
        );
        let plain = "target \"vm1/disk.img\" — déjà vu ✓";
        assert_eq!(printable(plain), plain);
    }

    #[test]
    fn refusals_from_the_receiver_are_made_printable() {
        let frame = crate::wire::ErrorFrame {
            code: crate::wire::ErrorCode::TargetNotAllowed,
            message: "no\x1b[1Away".into(),
        };
        match unexpected(Frame::Error(frame)) {
            StreamError::Refused { message, .. } => assert_eq!(message, "no\u{FFFD}[1Away"),
            other => panic!("{other:?}"),
        }
    }
}
