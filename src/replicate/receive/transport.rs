//! The byte stream under one receiver connection: TLS 1.3 or (behind
//! `--insecure-plaintext`) plain TCP, with reads that wake up every
//! [`POLL_INTERVAL_MS`] so the stream notices a stop request.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use rustls::{ServerConnection, StreamOwned};

/// How often a blocked read wakes up to look at the stop flag.
pub const POLL_INTERVAL_MS: u64 = 100;
/// A write that makes no progress for this long ends the connection.
pub const WRITE_TIMEOUT_MS: u64 = 30_000;
/// After sending an ERROR, how long to keep reading (and discarding) so the
/// peer gets the frame instead of a reset.
const LINGER_MS: u64 = 500;
/// Most bytes discarded while lingering.
const LINGER_MAX_BYTES: usize = 64 * 1024 * 1024;

/// One accepted connection.
pub enum PeerStream {
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
    Plain(TcpStream),
}

impl PeerStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            PeerStream::Tls(s) => &s.sock,
            PeerStream::Plain(s) => s,
        }
    }

    /// Sets the poll-interval read timeout and the write timeout.
    pub fn set_timeouts(&self) -> io::Result<()> {
        let tcp = self.tcp();
        tcp.set_read_timeout(Some(Duration::from_millis(POLL_INTERVAL_MS)))?;
        tcp.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)))
    }

    /// Ends the connection politely: TLS close_notify (or a TCP FIN), then
    /// a short bounded drain so what we sent is not lost to a reset.
    pub fn close(mut self) {
        if let PeerStream::Tls(s) = &mut self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.tcp().shutdown(Shutdown::Write);
        let deadline = Instant::now() + Duration::from_millis(LINGER_MS);
        let mut scratch = [0u8; 16 * 1024];
        let mut drained_bytes = 0usize;
        while Instant::now() < deadline && drained_bytes < LINGER_MAX_BYTES {
            match self.read(&mut scratch) {
                Ok(0) => break,
                Ok(n) => drained_bytes += n,
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

/// A read timeout (the poll interval passed with nothing to read).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PeerStream::Tls(s) => s.read(buf),
            PeerStream::Plain(s) => s.read(buf),
        }
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            PeerStream::Tls(s) => s.write(buf),
            PeerStream::Plain(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            PeerStream::Tls(s) => s.flush(),
            PeerStream::Plain(s) => s.flush(),
        }
    }
}
