//! What each side trusts and presents: the CA, certificate and key loaded
//! from files ([`TlsDir`]), and the TLS 1.3-only rustls configurations built
//! from them.

#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::{ALPN_PROTOCOL, TlsError, TlsRole};
use crate::net::certs;

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
/// a TLS stream costs (docs/bench/history.md#tls-and-the-network-path).
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
