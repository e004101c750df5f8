//! The eager handshakes ([`connect`], [`accept`]): bounded by a timeout,
//! ended by the session confirmation byte, with failures turned into
//! messages that say which side refused what.

#![forbid(unsafe_code)]

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::ClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::ServerConnection;
use rustls::{ClientConfig, ServerConfig, StreamOwned};

use super::{ALPN_PROTOCOL, SESSION_CONFIRM_BYTE, TLS_HANDSHAKE_RECORD, TlsError, TlsRole};

/// Runs the client handshake on `tcp` and waits for the receiver's session
/// confirmation. `server_name` is a DNS name or an IP address that must be
/// in the receiver's certificate.
pub fn connect(
    tcp: TcpStream,
    cfg: Arc<ClientConfig>,
    server_name: &str,
    handshake_timeout_ms: u64,
) -> Result<StreamOwned<ClientConnection, TcpStream>, TlsError> {
    let name =
        ServerName::try_from(server_name.trim_matches(['[', ']']).to_string()).map_err(|_| {
            TlsError::BadServerName {
                name: server_name.to_string(),
            }
        })?;
    let conn = ClientConnection::new(cfg, name).map_err(TlsError::Config)?;
    let mut stream = StreamOwned::new(conn, tcp);
    let hs = Handshake::new(TlsRole::Client, handshake_timeout_ms, server_name);
    hs.drive(&mut stream.sock, |sock| {
        stream.conn.complete_io(sock)?;
        Ok(stream.conn.is_handshaking())
    })?;
    hs.set_timeouts(&stream.sock)?;
    let mut confirm = [0u8; 1];
    stream
        .read_exact(&mut confirm)
        .map_err(|e| hs.classify(e))?;
    if confirm[0] != SESSION_CONFIRM_BYTE {
        return Err(TlsError::BadConfirmation { got: confirm[0] });
    }
    if stream.conn.alpn_protocol() != Some(ALPN_PROTOCOL) {
        return Err(TlsError::NoAlpn);
    }
    clear_timeouts(&stream.sock)?;
    Ok(stream)
}

/// Runs the server handshake on an accepted `tcp`, checks the client
/// certificate and sends the session confirmation.
pub fn accept(
    tcp: TcpStream,
    cfg: Arc<ServerConfig>,
    handshake_timeout_ms: u64,
) -> Result<StreamOwned<ServerConnection, TcpStream>, TlsError> {
    let hs = Handshake::new(TlsRole::Server, handshake_timeout_ms, "");
    hs.set_timeouts(&tcp)?;
    let mut first = [0u8; 1];
    let peeked = loop {
        match tcp.peek(&mut first) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => break other.map_err(|e| hs.classify(e))?,
        }
    };
    if peeked == 0 {
        return Err(TlsError::Closed {
            hint: "it sent nothing; a port scanner or a health check?",
        });
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        return Err(TlsError::Plaintext {
            first_byte: first[0],
        });
    }
    let conn = ServerConnection::new(cfg).map_err(TlsError::Config)?;
    let mut stream = StreamOwned::new(conn, tcp);
    hs.drive(&mut stream.sock, |sock| {
        stream.conn.complete_io(sock)?;
        Ok(stream.conn.is_handshaking())
    })?;
    if stream.conn.alpn_protocol() != Some(ALPN_PROTOCOL) {
        stream.conn.send_close_notify();
        let _ = stream.conn.complete_io(&mut stream.sock);
        return Err(TlsError::NoAlpn);
    }
    hs.set_timeouts(&stream.sock)?;
    stream
        .write_all(&[SESSION_CONFIRM_BYTE])
        .and_then(|()| stream.flush())
        .map_err(|e| hs.classify(e))?;
    clear_timeouts(&stream.sock)?;
    Ok(stream)
}

/// One handshake's deadline and the side it runs on, for error mapping.
struct Handshake<'a> {
    role: TlsRole,
    timeout_ms: u64,
    deadline: Instant,
    server_name: &'a str,
}

impl<'a> Handshake<'a> {
    fn new(role: TlsRole, timeout_ms: u64, server_name: &'a str) -> Self {
        Handshake {
            role,
            timeout_ms,
            deadline: Instant::now() + Duration::from_millis(timeout_ms),
            server_name,
        }
    }

    /// Bounds every blocking read and write by the time left.
    fn set_timeouts(&self, tcp: &TcpStream) -> Result<(), TlsError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                timeout_ms: self.timeout_ms,
            });
        }
        tcp.set_read_timeout(Some(left)).map_err(TlsError::Io)?;
        tcp.set_write_timeout(Some(left)).map_err(TlsError::Io)
    }

    /// Calls `step` (one `complete_io`) until it reports the handshake done.
    fn drive(
        &self,
        tcp: &mut TcpStream,
        mut step: impl FnMut(&mut TcpStream) -> io::Result<bool>,
    ) -> Result<(), TlsError> {
        loop {
            self.set_timeouts(tcp)?;
            match step(tcp) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.classify(e)),
            }
        }
    }

    fn classify(&self, err: io::Error) -> TlsError {
        match err.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                return TlsError::Timeout {
                    timeout_ms: self.timeout_ms,
                };
            }
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                return TlsError::Closed {
                    hint: match self.role {
                        TlsRole::Client => "the receiver hung up; its log says why",
                        TlsRole::Server => "the sender hung up; its log says why",
                    },
                };
            }
            _ => {}
        }
        if err
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            if let Some(Ok(tls)) = err.into_inner().map(|e| e.downcast::<rustls::Error>()) {
                return self.classify_tls(*tls);
            }
            return TlsError::Tls(rustls::Error::General("unreadable TLS error".into()));
        }
        TlsError::Io(err)
    }

    fn classify_tls(&self, err: rustls::Error) -> TlsError {
        use rustls::AlertDescription as A;
        use rustls::CertificateError as C;
        use rustls::Error as E;
        match (self.role, err) {
            (TlsRole::Server, E::NoCertificatesPresented) => TlsError::NoClientCertificate,
            (TlsRole::Server, E::InvalidCertificate(c)) => TlsError::ClientCertificateUntrusted {
                reason: describe_cert_error(&c),
            },
            (TlsRole::Client, E::InvalidCertificate(C::NotValidForName))
            | (TlsRole::Client, E::InvalidCertificate(C::NotValidForNameContext { .. })) => {
                TlsError::ServerNameMismatch {
                    name: self.server_name.to_string(),
                }
            }
            (TlsRole::Client, E::InvalidCertificate(c)) => TlsError::ServerCertificateUntrusted {
                reason: describe_cert_error(&c),
            },
            (
                role,
                E::AlertReceived(
                    alert @ (A::BadCertificate
                    | A::UnknownCA
                    | A::CertificateUnknown
                    | A::CertificateRequired
                    | A::CertificateExpired
                    | A::CertificateRevoked
                    | A::UnsupportedCertificate
                    | A::AccessDenied
                    | A::DecryptError),
                ),
            ) => {
                let alert = format!("{alert:?}");
                match role {
                    TlsRole::Client => TlsError::ReceiverRefusedOurCertificate { alert },
                    TlsRole::Server => TlsError::SenderRefusedOurCertificate { alert },
                }
            }
            (role, E::AlertReceived(A::ProtocolVersion)) => TlsError::ProtocolVersion {
                detail: match role {
                    TlsRole::Client => "the receiver refused our TLS version".into(),
                    TlsRole::Server => "the sender refused our TLS version".into(),
                },
            },
            (_, E::AlertReceived(A::NoApplicationProtocol)) | (_, E::NoApplicationProtocol) => {
                TlsError::NoAlpn
            }
            (_, E::PeerIncompatible(p)) => TlsError::ProtocolVersion {
                detail: describe_incompatible(&p),
            },
            (TlsRole::Client, E::InvalidMessage(_) | E::InappropriateMessage { .. }) => {
                TlsError::NotTls
            }
            (_, other) => TlsError::Tls(other),
        }
    }
}

fn describe_cert_error(err: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match err {
        C::UnknownIssuer => "unknown issuer".into(),
        C::BadSignature => "bad signature: a different CA of the same name?".into(),
        C::Expired | C::ExpiredContext { .. } => "expired; re-run `diskferry certs init`".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet; check both clocks".into(),
        other => format!("{other:?}"),
    }
}

fn describe_incompatible(p: &rustls::PeerIncompatible) -> String {
    use rustls::PeerIncompatible as P;
    match p {
        P::Tls12NotOffered
        | P::Tls12NotOfferedOrEnabled
        | P::SupportedVersionsExtensionRequired => "the sender offers only TLS 1.2 or older".into(),
        P::ServerDoesNotSupportTls12Or13 | P::ServerTlsVersionIsDisabledByOurConfig => {
            "the receiver does not offer TLS 1.3".into()
        }
        other => format!("peer is incompatible: {other:?}"),
    }
}

fn clear_timeouts(tcp: &TcpStream) -> Result<(), TlsError> {
    tcp.set_read_timeout(None).map_err(TlsError::Io)?;
    tcp.set_write_timeout(None).map_err(TlsError::Io)
}
