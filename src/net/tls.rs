//! Mutual TLS 1.3 between sender and receiver (rustls, ring provider).
//!
//! * [`TlsDir`] loads the CA and this side's certificate and key from a
//!   directory written by `diskferry certs init`.
//! * [`server_config`] / [`client_config`] build TLS 1.3-only configurations
//!   that trust only that CA, require a client certificate and negotiate
//!   ALPN [`ALPN_PROTOCOL`].
//! * [`accept`] / [`connect`] run the whole handshake eagerly over a blocking
//!   `TcpStream`, bounded by a timeout, and turn failures into messages that
//!   say which side refused what, on both sides.
//!
//! In TLS 1.3 the client finishes its handshake before the server has checked
//! the client certificate, so a refused client would only learn it at its
//! first read. To make [`connect`] fail eagerly, [`accept`] sends one
//! application-data byte, [`SESSION_CONFIRM_BYTE`], once it has accepted the
//! client, and [`connect`] waits for it. The wire protocol starts after it.
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::ClientConnection;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig, StreamOwned};

use super::certs;

/// The one application protocol both sides negotiate.
pub const ALPN_PROTOCOL: &[u8] = b"diskferry/1";
/// Sent by the receiver right after it accepted the sender's certificate.
pub const SESSION_CONFIRM_BYTE: u8 = 0xD1;
/// A sensible bound for the whole handshake.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// First byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Which end of the connection this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRole {
    /// The receiver (`diskferry serve`): presents `server.pem`.
    Server,
    /// The sender (`diskferry send`): presents `client.pem`.
    Client,
}

/// Everything that can go wrong loading certificates or running a handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file is missing.
    #[error(
        "{} not found: create certificates with `diskferry certs init DIR` \
         and point the certs option at DIR",
        path.display()
    )]
    MissingFile {
        /// The file.
        path: PathBuf,
    },
    /// A file that is not the PEM expected.
    #[error("{}: {reason} (expected a PEM file as written by `diskferry certs init`)", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificates or keys.
    #[error("TLS configuration rejected: {0} (does the key file belong to the certificate?)")]
    Config(#[source] rustls::Error),
    /// A receiver name no certificate can be checked against.
    #[error(
        "{name:?} is not a host name or IP address the receiver's certificate can be checked against"
    )]
    BadServerName {
        /// The name.
        name: String,
    },
    /// The handshake took too long.
    #[error(
        "TLS handshake did not finish within {timeout_ms} ms (is the peer diskferry, and is the port right?)"
    )]
    Timeout {
        /// How long we waited.
        timeout_ms: u64,
    },
    /// The peer spoke plaintext.
    #[error(
        "peer spoke plaintext, not TLS (is it running with --insecure-plaintext?); first byte {first_byte:#04x}"
    )]
    Plaintext {
        /// The first byte the peer sent.
        first_byte: u8,
    },
    /// The receiver did not answer with TLS.
    #[error(
        "receiver did not answer with TLS (is it running with --insecure-plaintext, or is that port another service?)"
    )]
    NotTls,
    /// The sender presented no certificate.
    #[error(
        "peer presented no client certificate; the sender must use client.pem and \
         client.key from this receiver's certs directory"
    )]
    NoClientCertificate,
    /// The sender's certificate is not signed by our CA.
    #[error(
        "client certificate not signed by our CA ({reason}); copy ca.pem, client.pem \
         and client.key from this receiver's certs directory to the sender"
    )]
    ClientCertificateUntrusted {
        /// What is wrong.
        reason: String,
    },
    /// The receiver's certificate is not signed by our CA.
    #[error(
        "receiver's certificate is not signed by our CA ({reason}); the sender's ca.pem \
         must be the receiver's ca.pem"
    )]
    ServerCertificateUntrusted {
        /// What is wrong.
        reason: String,
    },
    /// The receiver's certificate does not hold the name dialled.
    #[error(
        "receiver's certificate is not valid for {name:?}; connect by a name it holds \
         or re-run `diskferry certs init --san {name}` on the receiver"
    )]
    ServerNameMismatch {
        /// The name.
        name: String,
    },
    /// The receiver refused the sender's certificate.
    #[error(
        "receiver refused our certificate (is client.pem signed by the receiver's CA?); alert {alert}"
    )]
    ReceiverRefusedOurCertificate {
        /// The TLS alert received.
        alert: String,
    },
    /// The sender refused the receiver's certificate.
    #[error(
        "sender refused our certificate (does the sender's ca.pem match ours, and does \
         server.pem name the host it connected to?); alert {alert}"
    )]
    SenderRefusedOurCertificate {
        /// The TLS alert received.
        alert: String,
    },
    /// The peers share no TLS version.
    #[error("TLS version mismatch ({detail}); diskferry uses TLS 1.3 only: upgrade the older side")]
    ProtocolVersion {
        /// What rustls said.
        detail: String,
    },
    /// The peer did not negotiate the diskferry protocol.
    #[error(
        "peer did not negotiate the diskferry/1 protocol (is it a compatible diskferry version?)"
    )]
    NoAlpn,
    /// The peer closed the connection during the handshake.
    #[error("peer closed the connection during the TLS handshake ({hint})")]
    Closed {
        /// What the peer was probably doing.
        hint: &'static str,
    },
    /// The receiver did not confirm the session.
    #[error(
        "receiver sent {got:#04x} instead of the session confirmation; is it a compatible diskferry?"
    )]
    BadConfirmation {
        /// The byte received.
        got: u8,
    },
    /// Any other TLS failure.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] rustls::Error),
    /// An I/O error during the handshake.
    #[error("network error during the TLS handshake: {0}")]
    Io(#[source] io::Error),
}

/// The CA plus this side's certificate chain and key.
pub struct TlsDir {
    role: TlsRole,
    ca_certs: Vec<CertificateDer<'static>>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
}

impl fmt::Debug for TlsDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsDir")
            .field("role", &self.role)
            .field("ca_certs", &self.ca_certs.len())
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl TlsDir {
    /// Loads `ca.pem` plus `server.{pem,key}` or `client.{pem,key}` from `dir`.
    pub fn load(dir: &Path, role: TlsRole) -> Result<Self, TlsError> {
        let (cert, key) = match role {
            TlsRole::Server => (certs::SERVER_CERT_FILE, certs::SERVER_KEY_FILE),
            TlsRole::Client => (certs::CLIENT_CERT_FILE, certs::CLIENT_KEY_FILE),
        };
        Self::from_files(
            role,
            &dir.join(certs::CA_CERT_FILE),
            &dir.join(cert),
            &dir.join(key),
        )
    }

    /// Loads the CA, certificate chain and key from explicit paths.
    pub fn from_files(role: TlsRole, ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let ca_certs = read_certs(ca)?;
        let cert_chain = read_certs(cert)?;
        require_file(key)?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
        Ok(TlsDir {
            role,
            ca_certs,
            cert_chain,
            key: key_der,
            cert_path: cert.to_path_buf(),
        })
    }

    /// Which side these files are for.
    pub fn role(&self) -> TlsRole {
        self.role
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.ca_certs {
            roots.add(ca.clone()).map_err(TlsError::Config)?;
        }
        Ok(roots)
    }
}

fn require_file(path: &Path) -> Result<(), TlsError> {
    if path.exists() {
        Ok(())
    } else {
        Err(TlsError::MissingFile {
            path: path.to_path_buf(),
        })
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    require_file(path)?;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block in it".into(),
        });
    }
    Ok(certs)
}

fn pem_error(path: &Path, err: pem::Error) -> TlsError {
    let reason = match err {
        pem::Error::NoItemsFound => "no matching PEM block in it".to_string(),
        other => other.to_string(),
    };
    TlsError::BadPem {
        path: path.to_path_buf(),
        reason,
    }
}

/// ring's provider with AES-128-GCM first. Both ends list it first, so it
/// is what a diskferry pair negotiates; AES-256-GCM and ChaCha20-Poly1305
/// stay for peers that ask for them. AES-128 runs 10 rounds to AES-256's
/// 14, and sealing and opening every byte on both ends is most of the CPU
/// a TLS stream costs (docs/benchmarks.md, session 5).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The TLS 1.3 cipher suite a diskferry sender and receiver agree on.
pub const PREFERRED_SUITE: rustls::CipherSuite = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;

/// Receiver configuration: TLS 1.3 only, client certificate signed by the CA
/// required, ALPN `diskferry/1`, no session tickets.
pub fn server_config(dir: &TlsDir) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(dir.roots()?), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(dir.cert_chain.clone(), dir.key.clone_key())
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Sender configuration: TLS 1.3 only, trusts only the CA, presents the
/// client certificate, ALPN `diskferry/1`.
pub fn client_config(dir: &TlsDir) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(dir.roots()?)
        .with_client_auth_cert(dir.cert_chain.clone(), dir.key.clone_key())
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    Ok(Arc::new(cfg))
}

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
