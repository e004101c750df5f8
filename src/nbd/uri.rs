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
//!
//! Connecting ([`NbdUri::connect`]) and the connected [`NbdStream`] are in
//! `stream.rs`.

use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

mod stream;

pub use stream::NbdStream;

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

#[cfg(test)]
mod tests;
