//! `certs init`: the files it writes, their permissions, and overwrite
//! protection.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use diskferry::net::certs::{self, CertError};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn init_writes_six_files_with_private_keys_and_a_private_dir() {
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("certs/nested");
    let paths = certs::init(&dir, &["192.0.2.7".into()], false).expect("init");
    assert_eq!(mode(&dir), 0o700);
    for key in [&paths.ca_key, &paths.server_key, &paths.client_key] {
        assert_eq!(mode(key), 0o600, "{}", key.display());
        let text = fs::read_to_string(key).expect("read key");
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
    }
    for cert in [&paths.ca_cert, &paths.server_cert, &paths.client_cert] {
        let text = fs::read_to_string(cert).expect("read cert");
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{text}");
    }
    assert_eq!(paths.server_cert, dir.join("server.pem"));
    for name in ["localhost", "127.0.0.1", "::1", "192.0.2.7"] {
        assert!(
            paths.server_sans.iter().any(|s| s == name),
            "{name} missing"
        );
    }
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn init_refuses_to_overwrite_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = certs::init(dir.path(), &[], false).expect("first init");
    let ca_before = fs::read(&paths.ca_cert).expect("read");

    let err = certs::init(dir.path(), &[], false).unwrap_err();
    assert!(matches!(err, CertError::Exists { .. }), "{err:?}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(fs::read(&paths.ca_cert).expect("read"), ca_before);

    // One stray file is enough to refuse, and nothing else gets written.
    let other = tempfile::tempdir().expect("tempdir");
    fs::write(other.path().join("client.key"), "mine").expect("write");
    let err = certs::init(other.path(), &[], false).unwrap_err();
    assert!(err.to_string().contains("client.key"), "{err}");
    assert!(!other.path().join("ca.pem").exists());

    // Forced: new CA, keys still 0600 even if loosened in between.
    fs::set_permissions(&paths.server_key, fs::Permissions::from_mode(0o644)).expect("chmod");
    certs::init(dir.path(), &[], true).expect("forced init");
    assert_ne!(fs::read(&paths.ca_cert).expect("read"), ca_before);
    assert_eq!(mode(&paths.server_key), 0o600);
}

#[test]
fn init_rejects_names_that_are_neither_ip_nor_dns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = certs::init(dir.path(), &["bad name!".into()], false).unwrap_err();
    assert!(matches!(err, CertError::BadSan { .. }), "{err:?}");
    assert!(!dir.path().join("ca.pem").exists());
}
