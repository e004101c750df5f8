//! Connecting to the server a URI names, and the connected stream
//! ([`NbdStream`]): TCP or a Unix socket, with timeouts that name the peer.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::{NbdUri, Transport};

/// A connected stream to an NBD server.
#[derive(Debug)]
pub enum NbdStream {
    /// Over TCP.
    Tcp(std::net::TcpStream),
    /// Over a Unix socket.
    Unix(std::os::unix::net::UnixStream),
}

impl NbdUri {
    /// Connect (TCP_NODELAY on TCP), waiting at most `io_timeout` for the
    /// TCP connection, and leave `io_timeout` as the stream's read and
    /// write timeout, so a server that accepts and then says nothing fails
    /// the handshake (and blocking requests) with [`io::ErrorKind::TimedOut`]
    /// instead of hanging. Errors name the address.
    pub fn connect_timeout(&self, io_timeout: std::time::Duration) -> io::Result<NbdStream> {
        let stream = self.connect_with(Some(io_timeout))?;
        stream.set_io_timeout(Some(io_timeout))?;
        Ok(stream)
    }

    /// Connect (TCP_NODELAY on TCP) with no timeouts. Errors name the address.
    pub fn connect(&self) -> io::Result<NbdStream> {
        self.connect_with(None)
    }

    fn connect_with(&self, timeout: Option<std::time::Duration>) -> io::Result<NbdStream> {
        match &self.transport {
            Transport::Unix { path } => {
                UnixStream::connect(path).map(NbdStream::Unix).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("connecting to NBD socket {}: {e}", path.display()),
                    )
                })
            }
            Transport::Tcp { host, port } => {
                let named = |e: io::Error| {
                    io::Error::new(
                        e.kind(),
                        format!("connecting to NBD server {host}:{port}: {e}"),
                    )
                };
                let mut last_error =
                    io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
                for addr in (host.as_str(), *port).to_socket_addrs().map_err(named)? {
                    let connected = match timeout {
                        Some(t) => TcpStream::connect_timeout(&addr, t),
                        None => TcpStream::connect(addr),
                    };
                    match connected {
                        Ok(stream) => {
                            stream.set_nodelay(true).map_err(named)?;
                            return Ok(NbdStream::Tcp(stream));
                        }
                        Err(e) => last_error = e,
                    }
                }
                Err(named(last_error))
            }
        }
    }
}

impl NbdStream {
    /// A second handle on the same connection (e.g. one reader thread, one writer).
    pub fn try_clone(&self) -> io::Result<NbdStream> {
        match self {
            NbdStream::Tcp(s) => s.try_clone().map(NbdStream::Tcp),
            NbdStream::Unix(s) => s.try_clone().map(NbdStream::Unix),
        }
    }

    /// Shut down the read, write or both halves.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => s.shutdown(how),
            NbdStream::Unix(s) => s.shutdown(how),
        }
    }

    /// Read timeout for blocking use (`None` = block forever).
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => s.set_read_timeout(timeout),
            NbdStream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    /// Read and write timeout for blocking use (`None` = block forever).
    /// A blocking read or write that times out fails with
    /// [`io::ErrorKind::TimedOut`] and a message naming the timeout.
    pub fn set_io_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            NbdStream::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    /// Who is at the other end: `nbd://ADDR` or the Unix socket's path.
    pub fn peer(&self) -> String {
        match self {
            NbdStream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "an NBD server".into(), |a| format!("nbd://{a}")),
            NbdStream::Unix(s) => s
                .peer_addr()
                .ok()
                .and_then(|a| {
                    a.as_pathname()
                        .map(|p| format!("NBD socket {}", p.display()))
                })
                .unwrap_or_else(|| "an NBD server".into()),
        }
    }

    /// A timed-out blocking call (EAGAIN with a socket timeout set) as
    /// [`io::ErrorKind::TimedOut`] saying how long the server was silent.
    fn explain_timeout(
        &self,
        e: io::Error,
        timeout: io::Result<Option<std::time::Duration>>,
    ) -> io::Error {
        match (e.kind(), timeout) {
            (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Ok(Some(t))) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not answer within the I/O timeout ({} s)",
                    self.peer(),
                    t.as_secs_f64()
                ),
            ),
            _ => e,
        }
    }

    fn read_timeout(&self) -> io::Result<Option<std::time::Duration>> {
        match self {
            NbdStream::Tcp(s) => s.read_timeout(),
            NbdStream::Unix(s) => s.read_timeout(),
        }
    }

    fn write_timeout(&self) -> io::Result<Option<std::time::Duration>> {
        match self {
            NbdStream::Tcp(s) => s.write_timeout(),
            NbdStream::Unix(s) => s.write_timeout(),
        }
    }
}

impl Read for NbdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let out = match self {
            NbdStream::Tcp(s) => s.read(buf),
            NbdStream::Unix(s) => s.read(buf),
        };
        out.map_err(|e| self.explain_timeout(e, self.read_timeout()))
    }
}

impl Write for NbdStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let out = match self {
            NbdStream::Tcp(s) => s.write(buf),
            NbdStream::Unix(s) => s.write(buf),
        };
        out.map_err(|e| self.explain_timeout(e, self.write_timeout()))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let out = match self {
            NbdStream::Tcp(s) => s.write_vectored(bufs),
            NbdStream::Unix(s) => s.write_vectored(bufs),
        };
        out.map_err(|e| self.explain_timeout(e, self.write_timeout()))
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => s.flush(),
            NbdStream::Unix(s) => s.flush(),
        }
    }
}

impl AsRawFd for NbdStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            NbdStream::Tcp(s) => s.as_raw_fd(),
            NbdStream::Unix(s) => s.as_raw_fd(),
        }
    }
}
