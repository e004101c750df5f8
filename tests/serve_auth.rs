//! Who may talk to the receiver: only senders with a client certificate of
//! its CA over TLS; plaintext only when both sides say so.

mod serve_support;

use std::io::{Read, Write};
use std::sync::Arc;

use diskferry::net::{self, TlsDir, TlsRole};
use diskferry::wire::{Codec, Frame};
use serve_support::*;

const MIB: u64 = 1 << 20;

fn hello_bytes(target: &str) -> Vec<u8> {
    let mut out = Vec::new();
    Frame::Hello(hello(1, target, MIB, 0, 1))
        .encode(&mut out)
        .unwrap();
    out
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let h = Harness::start(false);
    let other = tempfile::tempdir().unwrap();
    net::certs::init(other.path(), &[], false).unwrap();
    // Trusts the receiver's CA, but presents a certificate of another CA.
    let dir = TlsDir::from_files(
        TlsRole::Client,
        &h.certs.join("ca.pem"),
        &other.path().join("client.pem"),
        &other.path().join("client.key"),
    )
    .unwrap();
    let cfg = net::client_config(&dir).unwrap();
    let result = net::connect(h.tcp(), cfg, "localhost", 5_000);
    let err = result.expect_err("a foreign client certificate was accepted");
    assert!(
        matches!(err, net::TlsError::ReceiverRefusedOurCertificate { .. }),
        "unexpected error: {err}"
    );
    assert!(std::fs::read_dir(&h.root).unwrap().next().is_none());
}

#[test]
fn no_client_certificate_is_refused() {
    let h = Harness::start(false);
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(h.certs.join("ca.pem")).unwrap();
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![net::ALPN_PROTOCOL.to_vec()];
    let result = net::connect(h.tcp(), Arc::new(cfg), "localhost", 5_000);
    assert!(
        result.is_err(),
        "a sender without a certificate was accepted"
    );
    assert!(std::fs::read_dir(&h.root).unwrap().next().is_none());
}

#[test]
fn plaintext_sender_against_a_tls_receiver_is_refused() {
    let h = Harness::start(false);
    let mut tcp = h.tcp();
    tcp.write_all(&hello_bytes("plain.img")).unwrap();
    let mut reply = Vec::new();
    // The receiver closes without answering (EOF or reset).
    let _ = tcp.read_to_end(&mut reply);
    assert!(
        !reply.starts_with(b"DFRY"),
        "the receiver answered plaintext"
    );
    assert!(!h.root.join("plain.img").exists());
}

#[test]
fn plaintext_mode_works_end_to_end_and_refuses_tls_senders() {
    let h = Harness::start(true);
    let mut c = h.connect();
    c.welcome(&hello(1, "plain.img", MIB, 0, 1));
    let raw = text_bytes(MIB as usize, 1);
    c.data(0, &raw, Codec::Zstd);
    assert_eq!(c.barrier(1).bytes_durable_total, MIB);
    c.done();
    c.send(&Frame::VerifyRequest {
        window_bytes: 256 * 1024,
    });
    match c.recv() {
        Some(Frame::VerifyResult { digest, bytes_read }) => {
            assert_eq!(bytes_read, MIB);
            assert_eq!(digest, image_digest(&raw, 256 * 1024));
        }
        other => panic!("expected VERIFY_RESULT, got {other:?}"),
    }
    assert_eq!(std::fs::read(h.root.join("plain.img")).unwrap(), raw);

    // A TLS sender against the plaintext receiver fails its handshake.
    let dir = TlsDir::load(&h.certs, TlsRole::Client).unwrap();
    let cfg = net::client_config(&dir).unwrap();
    assert!(net::connect(h.tcp(), cfg, "localhost", 5_000).is_err());
}
