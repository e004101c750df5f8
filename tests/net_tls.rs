//! Mutual TLS between a sender and a receiver over loopback: the happy path
//! and every way a peer can be refused, with the message each side prints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use diskferry::net::certs;
use diskferry::net::tls::{self, TlsDir, TlsError, TlsRole};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const TIMEOUT_MS: u64 = 5_000;

fn init_dir(dir: &Path, sans: &[String]) {
    certs::init(dir, sans, false).expect("certs init");
}

/// A receiver that accepts one connection, then reads `ping`, answers
/// `pong` and returns what it read (or the handshake error).
fn serve_one(
    dir: &Path,
    handshake_timeout_ms: u64,
) -> (SocketAddr, JoinHandle<Result<Vec<u8>, TlsError>>) {
    let cfg = tls::server_config(&TlsDir::load(dir, TlsRole::Server).expect("server files"))
        .expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        let mut tls = tls::accept(tcp, cfg, handshake_timeout_ms)?;
        let mut got = [0u8; 4];
        tls.read_exact(&mut got).expect("server read");
        tls.write_all(b"pong").expect("server write");
        tls.flush().expect("server flush");
        Ok(got.to_vec())
    });
    (addr, handle)
}

fn client_cfg(dir: &Path) -> Arc<rustls::ClientConfig> {
    tls::client_config(&TlsDir::load(dir, TlsRole::Client).expect("client files"))
        .expect("client config")
}

fn connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, TlsError> {
    tls::connect(
        TcpStream::connect(addr).expect("tcp connect"),
        cfg,
        name,
        TIMEOUT_MS,
    )
}

fn ping_pong(mut s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> Vec<u8> {
    s.write_all(b"ping").expect("client write");
    s.flush().expect("client flush");
    let mut got = [0u8; 4];
    s.read_exact(&mut got).expect("client read");
    got.to_vec()
}

fn roots(ca_pem: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("ca.pem") {
        roots.add(cert.expect("cert")).expect("add root");
    }
    roots
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A sender configuration built by hand (not by `tls::client_config`): the
/// client certificate of `dir`, its CA, ALPN, and the given provider and
/// protocol version.
fn custom_client_cfg(
    dir: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
    version: &'static rustls::SupportedProtocolVersion,
) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_root_certificates(roots(&dir.join("ca.pem")))
        .with_client_auth_cert(
            CertificateDer::pem_file_iter(dir.join("client.pem"))
                .expect("pem")
                .collect::<Result<Vec<_>, _>>()
                .expect("certs"),
            rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("client.key")).expect("key"),
        )
        .expect("client auth");
    cfg.alpn_protocols = vec![tls::ALPN_PROTOCOL.to_vec()];
    cfg
}

#[test]
fn mutual_tls_carries_bytes_both_ways_by_ip_and_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &["10.20.30.40".into(), "dst.example".into()]);
    for name in ["127.0.0.1", "localhost", "10.20.30.40", "dst.example"] {
        let (addr, server) = serve_one(dir.path(), TIMEOUT_MS);
        let stream = connect(addr, client_cfg(dir.path()), name).expect("client handshake");
        assert_eq!(stream.conn.alpn_protocol(), Some(tls::ALPN_PROTOCOL));
        assert_eq!(
            stream.conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            stream.conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(tls::PREFERRED_SUITE),
            "a diskferry pair agrees on AES-128-GCM"
        );
        assert_eq!(ping_pong(stream), b"pong", "connecting as {name}");
        assert_eq!(
            server.join().expect("join").expect("server handshake"),
            b"ping"
        );
    }
}

#[test]
fn mutual_tls_over_ipv6_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &[]);
    let cfg = tls::server_config(&TlsDir::load(dir.path(), TlsRole::Server).expect("files"))
        .expect("config");
    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let addr = listener.local_addr().expect("addr");
    let server = thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        tls::accept(tcp, cfg, TIMEOUT_MS).map(|_| ())
    });
    let client = connect(addr, client_cfg(dir.path()), "::1");
    assert!(client.is_ok(), "{:?}", client.err());
    server.join().expect("join").expect("server handshake");
}

#[test]
fn sender_from_another_ca_is_refused_on_both_sides() {
    let ours = tempfile::tempdir().expect("tempdir");
    let theirs = tempfile::tempdir().expect("tempdir");
    init_dir(ours.path(), &[]);
    init_dir(theirs.path(), &[]);

    // The sender uses a whole other certs directory: it does not trust us.
    let (addr, server) = serve_one(ours.path(), TIMEOUT_MS);
    let client_err = connect(addr, client_cfg(theirs.path()), "127.0.0.1").unwrap_err();
    let server_err = server.join().expect("join").unwrap_err();
    eprintln!("sender: {client_err}\nreceiver: {server_err}");
    assert!(
        client_err
            .to_string()
            .contains("receiver's certificate is not signed by our CA (unknown issuer)"),
        "{client_err}"
    );
    assert!(
        server_err
            .to_string()
            .contains("sender refused our certificate"),
        "{server_err}"
    );

    // The sender trusts our CA but presents a certificate of another CA.
    let mixed = TlsDir::from_files(
        TlsRole::Client,
        &ours.path().join("ca.pem"),
        &theirs.path().join("client.pem"),
        &theirs.path().join("client.key"),
    )
    .expect("mixed files");
    let (addr, server) = serve_one(ours.path(), TIMEOUT_MS);
    let client_err = connect(
        addr,
        tls::client_config(&mixed).expect("config"),
        "127.0.0.1",
    )
    .unwrap_err();
    let server_err = server.join().expect("join").unwrap_err();
    eprintln!("sender: {client_err}\nreceiver: {server_err}");
    assert!(
        server_err
            .to_string()
            .contains("client certificate not signed by our CA (unknown issuer)"),
        "{server_err}"
    );
    assert!(
        client_err
            .to_string()
            .contains("receiver refused our certificate"),
        "{client_err}"
    );
}

#[test]
fn sender_without_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &[]);
    let mut cfg = rustls::ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots(&dir.path().join("ca.pem")))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![tls::ALPN_PROTOCOL.to_vec()];
    let (addr, server) = serve_one(dir.path(), TIMEOUT_MS);
    let client_err = connect(addr, Arc::new(cfg), "127.0.0.1").unwrap_err();
    let server_err = server.join().expect("join").unwrap_err();
    eprintln!("sender: {client_err}\nreceiver: {server_err}");
    assert!(
        matches!(server_err, TlsError::NoClientCertificate),
        "{server_err:?}"
    );
    assert!(
        server_err.to_string().contains("no client certificate"),
        "{server_err}"
    );
    assert!(
        client_err
            .to_string()
            .contains("receiver refused our certificate"),
        "{client_err}"
    );
}

#[test]
fn plaintext_sender_is_told_apart_from_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &[]);
    let (addr, server) = serve_one(dir.path(), TIMEOUT_MS);
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.write_all(b"DFRY plaintext hello\n").expect("write");
    let server_err = server.join().expect("join").unwrap_err();
    eprintln!("receiver: {server_err}");
    assert!(
        server_err
            .to_string()
            .contains("peer spoke plaintext, not TLS (is it running with --insecure-plaintext?)"),
        "{server_err}"
    );
    let mut rest = Vec::new();
    tcp.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // The receiver hung up: EOF or a reset, never an answer.
    let n = tcp.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0);
}

#[test]
fn tls_sender_against_plaintext_receiver_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &[]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = thread::spawn(move || {
        let (mut tcp, _) = listener.accept().expect("accept");
        let mut hello = [0u8; 16];
        let _ = tcp.read(&mut hello);
        let _ = tcp.write_all(b"DFRY 1 plaintext receiver ready\n");
        thread::sleep(Duration::from_millis(200));
    });
    let err = connect(addr, client_cfg(dir.path()), "127.0.0.1").unwrap_err();
    assert!(matches!(err, TlsError::NotTls), "{err:?}");
    assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
    fake.join().expect("join");
}

#[test]
fn tls12_only_sender_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &[]);
    let client_files = TlsDir::load(dir.path(), TlsRole::Client).expect("files");
    drop(client_files);
    let cfg = custom_client_cfg(dir.path(), ring(), &rustls::version::TLS12);
    let (addr, server) = serve_one(dir.path(), TIMEOUT_MS);
    let client_err = connect(addr, Arc::new(cfg), "127.0.0.1").unwrap_err();
    let server_err = server.join().expect("join").unwrap_err();
    eprintln!("sender: {client_err}\nreceiver: {server_err}");
    assert!(
        matches!(server_err, TlsError::ProtocolVersion { .. }),
        "{server_err:?}"
    );
    assert!(
        server_err.to_string().contains("TLS 1.3 only"),
        "{server_err}"
    );
    assert!(
        matches!(client_err, TlsError::ProtocolVersion { .. }),
        "{client_err:?}"
    );
}

/// A sender configured with only AES-256-GCM (or only ChaCha20) still
/// gets through: the receiver prefers AES-128-GCM but accepts the others.
#[test]
fn a_sender_offering_only_another_tls13_suite_still_connects() {
    use rustls::crypto::ring::cipher_suite as cs;
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &[]);
    for suite in [
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let cfg = custom_client_cfg(dir.path(), Arc::new(provider), &rustls::version::TLS13);
        let (addr, server) = serve_one(dir.path(), TIMEOUT_MS);
        let stream = connect(addr, Arc::new(cfg), "127.0.0.1").expect("client handshake");
        assert_eq!(
            stream.conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(suite.suite())
        );
        assert_eq!(ping_pong(stream), b"pong");
        assert_eq!(server.join().expect("join").expect("server"), b"ping");
    }
}

#[test]
fn wrong_server_name_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &[]);
    let (addr, server) = serve_one(dir.path(), TIMEOUT_MS);
    let client_err = connect(addr, client_cfg(dir.path()), "backup.example").unwrap_err();
    let server_err = server.join().expect("join").unwrap_err();
    eprintln!("sender: {client_err}\nreceiver: {server_err}");
    assert!(
        matches!(client_err, TlsError::ServerNameMismatch { .. }),
        "{client_err:?}"
    );
    assert!(
        client_err.to_string().contains("--san backup.example"),
        "{client_err}"
    );
    assert!(
        server_err
            .to_string()
            .contains("sender refused our certificate"),
        "{server_err}"
    );
}

#[test]
fn silent_peer_times_out_within_the_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &[]);
    let (addr, server) = serve_one(dir.path(), 300);
    let _silent = TcpStream::connect(addr).expect("connect");
    let start = Instant::now();
    let err = server.join().expect("join").unwrap_err();
    assert!(
        matches!(err, TlsError::Timeout { timeout_ms: 300 }),
        "{err:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn missing_files_name_the_file_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = TlsDir::load(dir.path(), TlsRole::Server).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("ca.pem") && msg.contains("diskferry certs init"),
        "{msg}"
    );

    init_dir(dir.path(), &[]);
    std::fs::remove_file(dir.path().join("client.key")).expect("rm");
    assert!(TlsDir::load(dir.path(), TlsRole::Server).is_ok());
    let err = TlsDir::load(dir.path(), TlsRole::Client).unwrap_err();
    assert!(err.to_string().contains("client.key"), "{err}");

    std::fs::write(dir.path().join("client.key"), "not a key\n").expect("write");
    let err = TlsDir::load(dir.path(), TlsRole::Client).unwrap_err();
    assert!(matches!(err, TlsError::BadPem { .. }), "{err:?}");
}

#[test]
fn sender_without_alpn_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_dir(dir.path(), &[]);
    let mut cfg = (*client_cfg(dir.path())).clone();
    cfg.alpn_protocols.clear();
    let (addr, server) = serve_one(dir.path(), TIMEOUT_MS);
    let client_err = connect(addr, Arc::new(cfg), "127.0.0.1").unwrap_err();
    let server_err = server.join().expect("join").unwrap_err();
    eprintln!("sender: {client_err}\nreceiver: {server_err}");
    assert!(matches!(server_err, TlsError::NoAlpn), "{server_err:?}");
    assert!(
        server_err.to_string().contains("diskferry/1"),
        "{server_err}"
    );
    assert!(
        matches!(client_err, TlsError::Closed { .. }),
        "{client_err:?}"
    );
}
