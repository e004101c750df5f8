//! `diskferry certs init DIR`: a private CA plus one server and one client
//! certificate, enough for a quick start with mutual TLS.
//!
//! Keys are ECDSA P-256 (PKCS#8 PEM). The CA is valid for 10 years, the leaf
//! certificates for 825 days. Key files are written 0600, the directory is
//! created 0700. Every file is written to a temporary name first and renamed
//! into place, so a crash never leaves half a key behind.
#![forbid(unsafe_code)]

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate inside a certs directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (keep it offline once the leafs exist).
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the receiver's certificate.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the receiver's private key.
pub const SERVER_KEY_FILE: &str = "server.key";
/// File name of the sender's certificate.
pub const CLIENT_CERT_FILE: &str = "client.pem";
/// File name of the sender's private key.
pub const CLIENT_KEY_FILE: &str = "client.key";
/// Common name of the client certificate.
pub const CLIENT_COMMON_NAME: &str = "diskferry-client";

const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 825;
/// Backdate `notBefore` so that peers with a slightly slow clock accept it.
const CLOCK_SKEW_ALLOWANCE_MINUTES: i64 = 60;
/// Longest DNS name accepted as a subject alternative name.
const MAX_DNS_NAME_BYTES: usize = 253;

/// Where [`init`] wrote each file, and the names the server certificate is
/// valid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// `ca.pem`: the CA both sides trust.
    pub ca_cert: PathBuf,
    /// `ca.key`: the CA's key (keep it off the peers).
    pub ca_key: PathBuf,
    /// `server.pem`: the receiver's certificate.
    pub server_cert: PathBuf,
    /// `server.key`: the receiver's key.
    pub server_key: PathBuf,
    /// `client.pem`: the sender's certificate.
    pub client_cert: PathBuf,
    /// `client.key`: the sender's key.
    pub client_key: PathBuf,
    /// Subject alternative names of `server.pem` (DNS names and IPs).
    pub server_sans: Vec<String>,
}

impl CertPaths {
    /// The paths of the six files in `dir` (whether or not they exist).
    pub fn in_dir(dir: &Path) -> Self {
        CertPaths {
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            server_cert: dir.join(SERVER_CERT_FILE),
            server_key: dir.join(SERVER_KEY_FILE),
            client_cert: dir.join(CLIENT_CERT_FILE),
            client_key: dir.join(CLIENT_KEY_FILE),
            server_sans: Vec::new(),
        }
    }

    fn files(&self) -> [&Path; 6] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
            &self.client_cert,
            &self.client_key,
        ]
    }
}

/// Everything that can go wrong creating certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A target file exists and `force` was not given.
    #[error(
        "{} already exists; refusing to overwrite certificates or keys \
         (pass --force to replace all six files, or choose another directory)",
        path.display()
    )]
    Exists {
        /// The file that exists.
        path: PathBuf,
    },
    /// A subject alternative name given by the user is neither an IP address
    /// nor a DNS name.
    #[error(
        "{name:?} is neither an IP address nor a DNS name; \
         pass --san with a host name (letters, digits, '-', '.') or an IP address"
    )]
    BadSan {
        /// The name as given.
        name: String,
    },
    /// Creating the directory or writing a file failed.
    #[error("cannot write {}: {source} (check that the directory is writable)", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// rcgen could not build a key or a certificate.
    #[error("generating certificates failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Writes a private CA and server + client certificates into `dir`.
///
/// The server certificate names `localhost`, `127.0.0.1`, `::1`, this host's
/// name and every entry of `sans` (IP addresses or DNS names). Existing files
/// are an error unless `force` is true. Nothing is written unless all six
/// files can be generated.
pub fn init(dir: &Path, sans: &[String], force: bool) -> Result<CertPaths, CertError> {
    let mut paths = CertPaths::in_dir(dir);
    let server_sans = server_names(sans)?;
    if !force && let Some(existing) = paths.files().into_iter().find(|p| p.exists()) {
        return Err(CertError::Exists {
            path: existing.to_path_buf(),
        });
    }

    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::minutes(CLOCK_SKEW_ALLOWANCE_MINUTES);

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    // A unique name per CA: two CAs of the same name would make a foreign
    // certificate fail as "bad signature" instead of "unknown issuer".
    let ca_id: String = ca_params
        .key_identifier(&ca_key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    ca_params.distinguished_name =
        common_name(&format!("diskferry CA {} {ca_id}", this_host_name()));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params = leaf_params(not_before, now, ExtendedKeyUsagePurpose::ServerAuth);
    server_params.distinguished_name = common_name(&server_sans[0]);
    server_params.subject_alt_names = server_sans
        .iter()
        .map(|name| san_type(name))
        .collect::<Result<_, _>>()?;
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client_params = leaf_params(not_before, now, ExtendedKeyUsagePurpose::ClientAuth);
    client_params.distinguished_name = common_name(CLIENT_COMMON_NAME);
    let client_cert = client_params.signed_by(&client_key, &issuer)?;

    create_private_dir(dir)?;
    write_file(&paths.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write_file(&paths.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&paths.server_cert, server_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &paths.server_key,
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&paths.client_cert, client_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &paths.client_key,
        client_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    paths.server_sans = server_sans;
    Ok(paths)
}

/// `localhost`, the loopback addresses, this host's name and the user's
/// names, deduplicated, in that order.
fn server_names(extra: &[String]) -> Result<Vec<String>, CertError> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let host = this_host_name();
    if is_dns_name(&host) {
        names.push(host);
    }
    for name in extra {
        let name = name.trim();
        let canonical = match name.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) if is_dns_name(name) => name.to_ascii_lowercase(),
            Err(_) => {
                return Err(CertError::BadSan {
                    name: name.to_string(),
                });
            }
        };
        names.push(canonical);
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    Ok(names)
}

/// This machine's host name, or "localhost" when it cannot be read.
fn this_host_name() -> String {
    let from_proc = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string());
    from_proc
        .filter(|s| !s.is_empty())
        .or_else(|| hostname::get().ok().and_then(|s| s.into_string().ok()))
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_else(|| "localhost".into())
}

/// A DNS name (optionally with a leading `*.` wildcard label): labels of
/// letters, digits and hyphens, not starting or ending with a hyphen.
fn is_dns_name(name: &str) -> bool {
    let body = name.strip_prefix("*.").unwrap_or(name);
    !body.is_empty()
        && name.len() <= MAX_DNS_NAME_BYTES
        && body.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn san_type(name: &str) -> Result<SanType, CertError> {
    Ok(match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into()?),
    })
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn leaf_params(
    not_before: OffsetDateTime,
    now: OffsetDateTime,
    usage: ExtendedKeyUsagePurpose,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
    params
}

fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `bytes` to `path` with `mode`, through a temporary file renamed
/// into place (which also replaces an existing file's permissions).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let io_err = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    // The umask may have cleared bits of `mode`; keys must end up exactly so.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err)?;
    file.write_all(bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_are_checked() {
        assert!(is_dns_name("backup-1.example.com"));
        assert!(is_dns_name("*.example.com"));
        assert!(!is_dns_name("-bad.example"));
        assert!(!is_dns_name("spaces are bad"));
        assert!(!is_dns_name("a..b"));
        assert!(!is_dns_name(""));
    }

    #[test]
    fn server_names_include_loopback_and_user_names_once() {
        let names = server_names(&["10.0.0.7".into(), "Dst.Example".into(), "::1".into()])
            .expect("valid names");
        assert_eq!(&names[..3], ["localhost", "127.0.0.1", "::1"]);
        assert!(names.contains(&"10.0.0.7".to_string()));
        assert!(names.contains(&"dst.example".to_string()));
        assert_eq!(names.iter().filter(|n| *n == "::1").count(), 1);
        let err = server_names(&["not a name".into()]).unwrap_err();
        assert!(err.to_string().contains("--san"), "{err}");
    }
}
