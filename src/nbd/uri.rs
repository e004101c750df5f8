//! libnbd-style NBD URIs: `nbd://host[:port][/export]`,
//! `nbd+unix:///export?socket=PATH`, `nbds://…` / `nbds+unix://…` (TLS, not
//! yet supported by the copy engine: parsed, then refused with a clear error).
//!
//! What is accepted (a subset of libnbd's `nbd_connect_uri`):
//!
//! * schemes `nbd`, `nbds`, `nbd+tcp`, `nbds+tcp` (TCP) and `nbd+unix`,
//!   `nbds+unix` (Unix socket); the `nbds` forms set [`NbdUri::tls`];
//! * TCP: `host` is a name, an IPv4 address or a bracketed IPv6 address
//!   (`[::1]`); an empty host means `localhost`; the port defaults to 10809
//!   and must be 1–65535;
//! * Unix: no host, and the `socket=PATH` query parameter is required;
//! * the path (minus its leading `/`) is the export name; it and the socket
//!   path are percent-decoded;
//! * a `user@` part (the TLS user name in libnbd) is accepted and ignored;
//! * `tls-*` query parameters (`tls-certificates`, `tls-verify-peer`,
//!   `tls-psk-file`, `tls-hostname`, …) are accepted and ignored for now,
//!   because TLS to NBD servers is not implemented yet.
//!
//! Refused with a message saying what is wrong: unknown schemes, `nbd+vsock`,
//! missing `socket=`, bad ports, unknown query parameters, fragments,
//! malformed percent escapes, URIs longer than [`MAX_URI_BYTES`].

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Default NBD TCP port (IANA).
pub const DEFAULT_PORT: u16 = 10809;
/// Longest URI accepted.
pub const MAX_URI_BYTES: usize = 8192;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `nbd://host:port`.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// TCP port (10809 by default).
        port: u16,
    },
    /// `nbd+unix:///export?socket=PATH`.
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// How to reach the server.
    pub transport: Transport,
    /// Export name (percent-decoded; empty = default export).
    pub export: String,
    /// An `nbds` scheme: TLS asked for (copy refuses it for now).
    pub tls: bool,
}

/// A connected stream to an NBD server.
#[derive(Debug)]
pub enum NbdStream {
    /// Over TCP.
    Tcp(std::net::TcpStream),
    /// Over a Unix socket.
    Unix(std::os::unix::net::UnixStream),
}

/// The scheme part of `s` (before `://`) if it is syntactically a scheme.
fn scheme_of(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    let valid = first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

/// True if `s` looks like an NBD URI (scheme `nbd`, `nbds`, `nbd+unix`, …).
///
/// Any `SCHEME://` whose scheme starts with `nbd` counts, so that
/// [`parse`] can refuse unsupported ones (`nbd+vsock://`) with a precise
/// message instead of treating them as file names.
pub fn is_nbd_uri(s: &str) -> bool {
    scheme_of(s).is_some_and(|scheme| scheme.to_ascii_lowercase().starts_with("nbd"))
}

/// Decode `%XX` escapes; the error names the bad escape.
fn percent_decode(s: &str, what: &str) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
            let Some(hex) = hex else {
                return Err(format!(
                    "{what} has a malformed percent escape at byte {i} (use %XX with two hex digits)"
                ));
            };
            let digit = |b: u8| {
                let d = char::from(b).to_digit(16).unwrap_or(0);
                u8::try_from(d).unwrap_or(0) // a hex digit is below 16
            };
            let value = digit(hex[0]) * 16 + digit(hex[1]);
            out.push(value);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Percent-encode everything outside the RFC 3986 unreserved set (and `/`
/// where `keep_slash`).
fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Split `host[:port]` (host may be `[v6]`).
fn parse_host_port(authority: &str) -> Result<(String, u16), String> {
    let (host, port_text) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| "IPv6 address is missing its closing ']'".to_string())?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{v6:?} is not an IPv6 address"));
        }
        match after {
            "" => (v6.to_string(), None),
            _ => match after.strip_prefix(':') {
                Some(p) => (v6.to_string(), Some(p)),
                None => return Err(format!("unexpected {after:?} after the IPv6 address")),
            },
        }
    } else if authority.matches(':').count() > 1 {
        return Err(format!(
            "host {authority:?} looks like an IPv6 address; write it in brackets: [::1]"
        ));
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if !authority.starts_with('[') && host.contains(['[', ']']) {
        return Err(format!(
            "host {host:?} is malformed (write IPv6 addresses as [::1])"
        ));
    }
    let port = match port_text {
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port > 0 && p.bytes().all(|b| b.is_ascii_digit()) => port,
            _ => return Err(format!("port {p:?} is not a number from 1 to 65535")),
        },
    };
    let host = if host.is_empty() {
        "localhost".to_string()
    } else {
        host
    };
    Ok((host, port))
}

/// Parse a URI; the error says what is wrong with it.
pub fn parse(s: &str) -> Result<NbdUri, String> {
    if s.len() > MAX_URI_BYTES {
        return Err(format!(
            "URI is {} bytes, longer than the {MAX_URI_BYTES}-byte limit",
            s.len()
        ));
    }
    let scheme = scheme_of(s).ok_or_else(|| "not a URI (expected SCHEME://…)".to_string())?;
    let rest = &s[scheme.len() + 3..];
    let (tls, unix) = match scheme.to_ascii_lowercase().as_str() {
        "nbd" | "nbd+tcp" => (false, false),
        "nbds" | "nbds+tcp" => (true, false),
        "nbd+unix" => (false, true),
        "nbds+unix" => (true, true),
        "nbd+vsock" | "nbds+vsock" => {
            return Err(
                "vsock transport (nbd+vsock) is not supported; use nbd:// or nbd+unix://".into(),
            );
        }
        other => {
            return Err(format!(
                "unknown scheme {other:?}; use nbd://, nbds://, nbd+unix:// or nbds+unix://"
            ));
        }
    };
    if rest.contains('#') {
        return Err("URI fragments ('#…') are not supported".into());
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    // Drop a `user@` part (TLS user name in libnbd; ignored for now).
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let export_bytes = percent_decode(path.strip_prefix('/').unwrap_or(path), "export name")?;
    let export = String::from_utf8(export_bytes)
        .map_err(|_| "export name is not valid UTF-8".to_string())?;
    if export.len() > crate::nbd::MAX_STRING_BYTES as usize {
        return Err(format!(
            "export name is longer than {} bytes",
            crate::nbd::MAX_STRING_BYTES
        ));
    }

    let mut socket: Option<PathBuf> = None;
    for param in query
        .into_iter()
        .flat_map(|q| q.split(['&', ';']))
        .filter(|p| !p.is_empty())
    {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        if key == "socket" && unix {
            if socket.is_some() {
                return Err("socket= is given more than once".into());
            }
            let path = percent_decode(value, "socket path")?;
            if path.is_empty() {
                return Err("socket= is empty; give the path of the server's Unix socket".into());
            }
            socket = Some(PathBuf::from(std::ffi::OsString::from_vec(path)));
        } else if key.starts_with("tls-") {
            // Accepted and ignored until TLS to NBD servers is implemented.
        } else if key == "socket" {
            return Err("socket= only applies to nbd+unix:// URIs".into());
        } else {
            return Err(format!("unsupported query parameter {key:?}"));
        }
    }

    let transport = if unix {
        if !authority.is_empty() {
            return Err(format!(
                "nbd+unix URIs take no host (got {authority:?}); write nbd+unix:///EXPORT?socket=PATH"
            ));
        }
        let path = socket.ok_or_else(|| {
            "nbd+unix URI is missing ?socket=PATH (write nbd+unix:///EXPORT?socket=PATH)"
                .to_string()
        })?;
        Transport::Unix { path }
    } else {
        let (host, port) = parse_host_port(authority)?;
        Transport::Tcp { host, port }
    };
    Ok(NbdUri {
        transport,
        export,
        tls,
    })
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

/// The URI in canonical libnbd form; [`parse`] gives back an equal value.
impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "s" } else { "" };
        let export = percent_encode(self.export.as_bytes(), true);
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{host}]:{port}/{export}")
            }
            Transport::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{export}"),
            Transport::Unix { path } => {
                let socket = percent_encode(path.as_os_str().as_bytes(), true);
                write!(f, "nbd{s}+unix:///{export}?socket={socket}")
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp(host: &str, port: u16, export: &str, tls: bool) -> NbdUri {
        NbdUri {
            transport: Transport::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls,
        }
    }

    fn unix(path: &str, export: &str, tls: bool) -> NbdUri {
        NbdUri {
            transport: Transport::Unix { path: path.into() },
            export: export.into(),
            tls,
        }
    }

    #[test]
    fn tcp_forms() {
        assert_eq!(
            parse("nbd://example.com"),
            Ok(tcp("example.com", 10809, "", false))
        );
        assert_eq!(
            parse("nbd://example.com/"),
            Ok(tcp("example.com", 10809, "", false))
        );
        assert_eq!(
            parse("nbd://127.0.0.1:10810/disk0"),
            Ok(tcp("127.0.0.1", 10810, "disk0", false))
        );
        assert_eq!(
            parse("nbd://[::1]:2000/a/b"),
            Ok(tcp("::1", 2000, "a/b", false))
        );
        assert_eq!(parse("nbd://[::1]/x"), Ok(tcp("::1", 10809, "x", false)));
        assert_eq!(parse("nbd:///"), Ok(tcp("localhost", 10809, "", false)));
        assert_eq!(parse("NBD://h//abs"), Ok(tcp("h", 10809, "/abs", false)));
        assert_eq!(
            parse("nbds://alice@h:1/e?tls-psk-file=k.psk"),
            Ok(tcp("h", 1, "e", true))
        );
        assert_eq!(parse("nbd+tcp://h:7"), Ok(tcp("h", 7, "", false)));
    }

    #[test]
    fn unix_forms_and_percent_decoding() {
        assert_eq!(
            parse("nbd+unix:///?socket=/tmp/s.sock"),
            Ok(unix("/tmp/s.sock", "", false))
        );
        assert_eq!(
            parse("nbd+unix:///my%20disk?socket=/tmp/a%26b.sock"),
            Ok(unix("/tmp/a&b.sock", "my disk", false))
        );
        assert_eq!(
            parse("nbds+unix:///e?socket=s&tls-certificates=/c"),
            Ok(unix("s", "e", true))
        );
        assert_eq!(
            parse("nbd://h/%e2%82%ac"),
            Ok(tcp("h", 10809, "\u{20ac}", false))
        );
    }

    #[track_caller]
    fn refused(uri: &str, needle: &str) {
        let why = parse(uri).expect_err(uri);
        assert!(
            why.contains(needle),
            "{uri}: {why:?} should mention {needle:?}"
        );
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        refused("http://h/", "unknown scheme");
        refused("nbd+vsock://2:10809", "vsock");
        refused("nbd+unix:///e", "missing ?socket");
        refused("nbd+unix:///e?socket=", "empty");
        refused("nbd+unix://host/e?socket=/s", "no host");
        refused("nbd://h:0/", "port");
        refused("nbd://h:65536/", "port");
        refused("nbd://h:+1/", "port");
        refused("nbd://h:x/", "port");
        refused("nbd://h/?foo=1", "unsupported query parameter");
        refused("nbd://h/?socket=/s", "only applies");
        refused("nbd://h/a%zz", "percent escape");
        refused("nbd://h/a%4", "percent escape");
        refused("nbd://h/%ff", "UTF-8");
        refused("nbd://h/#frag", "fragment");
        refused("nbd://[::1/", "closing");
        refused("nbd://[nope]/", "IPv6");
        refused("nbd://::1/", "IPv6");
        refused("/dev/sda", "not a URI");
        refused(&format!("nbd://h/{}", "a".repeat(MAX_URI_BYTES)), "limit");
        refused(&format!("nbd://h/{}", "a".repeat(4097)), "longer than 4096");
    }

    #[test]
    fn recognises_nbd_uris_only() {
        assert!(is_nbd_uri("nbd://h"));
        assert!(is_nbd_uri("NBDS+unix:///?socket=x"));
        assert!(is_nbd_uri("nbd+vsock://1"));
        assert!(!is_nbd_uri("/tmp/nbd://x"));
        assert!(!is_nbd_uri("disk.qcow2"));
        assert!(!is_nbd_uri("http://h"));
        assert!(!is_nbd_uri("nbd:foo"));
    }

    #[test]
    fn connect_sets_nodelay_and_names_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = tcp("127.0.0.1", port, "", false).connect().unwrap();
        let NbdStream::Tcp(ref tcp_stream) = stream else {
            panic!("expected TCP")
        };
        assert!(tcp_stream.nodelay().unwrap());
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"NBDMAGIC").unwrap();
        let mut reader = stream.try_clone().unwrap();
        let mut magic = [0u8; 8];
        reader.read_exact(&mut magic).unwrap();
        assert_eq!(&magic, b"NBDMAGIC");
        stream.shutdown(Shutdown::Both).unwrap();
        assert_eq!(
            server.read(&mut magic).unwrap(),
            0,
            "peer should see EOF after shutdown"
        );
        drop(listener);
        let err = tcp("127.0.0.1", port, "", false).connect().unwrap_err();
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
        let err = unix("/nonexistent/dir/s.sock", "", false)
            .connect()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/dir/s.sock"), "{err}");
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = parse(&s);
            let _ = is_nbd_uri(&s);
        }

        #[test]
        fn parse_never_panics_on_nbd_like(
            scheme in "(nbd|nbds|nbd\\+unix|nbds\\+unix|nbd\\+vsock)",
            rest in "[a-z0-9:/?&=%\\[\\]@.#-]{0,40}",
        ) {
            let _ = parse(&format!("{scheme}://{rest}"));
        }

        #[test]
        fn display_round_trips(
            host in "[a-z][a-z0-9.-]{0,15}",
            port in 1u16..,
            export in "\\PC{0,20}",
            socket in "/[^\\x00]{1,30}",
            tls: bool,
        ) {
            let a = tcp(&host, port, &export, tls);
            prop_assert_eq!(parse(&a.to_string()), Ok(a));
            let b = unix(&socket, &export, tls);
            prop_assert_eq!(parse(&b.to_string()), Ok(b));
            let c = tcp("::1", port, &export, tls);
            prop_assert_eq!(parse(&c.to_string()), Ok(c));
        }
    }
}
