//! Stopping the receiver: run() returns promptly with connections open,
//! after telling each attached sender and flushing its target.

mod serve_support;

use std::time::Duration;

use diskferry::replicate::receive::serve::{ServeError, ServeOptions, Server};
use diskferry::wire::{Codec, ErrorCode};
use serve_support::*;

const MIB: u64 = 1 << 20;

#[test]
fn stop_returns_promptly_with_connections_open() {
    let mut h = Harness::start(false);
    let mut attached = h.connect();
    attached.welcome(&hello(1, "busy.img", MIB, 0, 1));
    let raw = random_bytes(64 * 1024, 1);
    attached.data(0, &raw, Codec::None);
    attached.ping(1); // the DATA frame was handled
    let _mid_handshake = h.tcp(); // connected, never starts TLS
    let _plain_idle = h.connect(); // TLS up, no HELLO yet
    let took = h.stop();
    assert!(took < Duration::from_secs(2), "run() took {took:?} to stop");
    let (code, message) = attached.expect_error();
    assert_eq!(code, ErrorCode::Cancelled, "{message}");
    assert_eq!(
        &std::fs::read(h.root.join("busy.img")).unwrap()[..raw.len()],
        &raw[..]
    );
}

#[test]
fn bind_checks_its_options() {
    let dir = tempfile::tempdir().unwrap();
    let opts = |tls: bool, plain: bool, root: &str| ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        target_root: dir.path().join(root),
        tls_dir: tls.then(|| dir.path().join("certs")),
        state_dir: None,
        checkpoint_interval: diskferry::journal::CHECKPOINT_INTERVAL_DEFAULT,
        checkpoint_bytes: diskferry::journal::CHECKPOINT_BYTES_DEFAULT,
        insecure_plaintext: plain,
        allow: Vec::new(),
        limits: Default::default(),
        target_mode: diskferry::replicate::receive::serve::TARGET_MODE_DEFAULT,
    };
    std::fs::create_dir(dir.path().join("root")).unwrap();
    assert!(matches!(
        Server::bind(opts(false, false, "root")),
        Err(ServeError::TlsRequired)
    ));
    assert!(matches!(
        Server::bind(opts(true, true, "root")),
        Err(ServeError::ConflictingTransport)
    ));
    assert!(matches!(
        Server::bind(opts(true, false, "root")),
        Err(ServeError::Tls(_))
    ));
    assert!(matches!(
        Server::bind(opts(false, true, "missing")),
        Err(ServeError::TargetRoot { .. })
    ));
    let mut relative = opts(false, true, "root");
    relative.allow.push(("d".into(), "relative/path".into()));
    assert!(matches!(
        Server::bind(relative),
        Err(ServeError::BadAllow { .. })
    ));
    let server = Server::bind(opts(false, true, "root")).unwrap();
    assert_ne!(server.local_addr().port(), 0);
}
