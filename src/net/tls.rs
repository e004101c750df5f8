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
//!
//! `config.rs` loads the files and builds the configurations; `handshake.rs`
//! runs the handshakes and maps their failures to [`TlsError`].
#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;

mod config;
mod handshake;

pub use config::{PREFERRED_SUITE, TlsDir, client_config, server_config};
pub use handshake::{accept, connect};

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
