//! libnbd-style NBD URIs: `nbd://host[:port][/export]`,
//! `nbd+unix:///export?socket=PATH`, `nbds://…` / `nbds+unix://…` (TLS, not
//! yet supported by the copy engine: parsed, then refused with a clear error).

use std::path::PathBuf;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    /// Export name (percent-decoded; empty = default export).
    pub export: String,
    pub tls: bool,
}

/// A connected stream to an NBD server.
#[derive(Debug)]
pub enum NbdStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// True if `s` looks like an NBD URI (scheme `nbd`, `nbds`, `nbd+unix`, …).
pub fn is_nbd_uri(_s: &str) -> bool {
    todo!()
}

/// Parse a URI; the error says what is wrong with it.
pub fn parse(_s: &str) -> Result<NbdUri, String> {
    todo!()
}

impl NbdUri {
    /// Connect (TCP_NODELAY on TCP). Errors name the address.
    pub fn connect(&self) -> std::io::Result<NbdStream> {
        todo!()
    }
}
