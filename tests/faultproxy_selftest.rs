//! The fault-injection proxy itself: forwarding, delay, stall, reset, bit
//! flips, and that a flipped bit under TLS is an error, not corrupt data.

#[path = "support/faultproxy.rs"]
mod faultproxy;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use diskferry::net::certs;
use diskferry::net::tls::{self, TlsDir, TlsRole};
use faultproxy::{Direction, FaultProxy};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// An echo server; each connection reports how it ended (`Ok(())` on EOF,
/// or the error kind of the failed read/write).
fn echo_server() -> (SocketAddr, Receiver<Result<(), ErrorKind>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let tx = tx.clone();
            thread::spawn(move || {
                conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                let mut buf = [0u8; 4096];
                let end = loop {
                    match conn.read(&mut buf) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            if let Err(e) = conn.write_all(&buf[..n]) {
                                break Err(e.kind());
                            }
                        }
                        Err(e) => break Err(e.kind()),
                    }
                };
                let _ = tx.send(end);
            });
        }
    });
    (addr, rx)
}

fn client(proxy: &FaultProxy) -> TcpStream {
    let c = TcpStream::connect(proxy.addr()).expect("connect to proxy");
    c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    c
}

fn round_trip(c: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    c.write_all(msg).expect("write");
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).expect("read echo");
    got
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn forwards_both_ways_and_counts() {
    let (echo, _ends) = echo_server();
    let proxy = FaultProxy::start(echo);
    let mut c = client(&proxy);
    assert_eq!(round_trip(&mut c, b"hello"), b"hello");
    assert_eq!(proxy.connections(), 1);
    wait_for("10 bytes forwarded", || proxy.bytes_forwarded() == 10);
    let mut c2 = client(&proxy);
    assert_eq!(round_trip(&mut c2, b"again"), b"again");
    assert_eq!(proxy.connections(), 2);
}

#[test]
fn delay_adds_latency_per_chunk() {
    let (echo, _ends) = echo_server();
    let proxy = FaultProxy::start(echo);
    let mut c = client(&proxy);
    let start = Instant::now();
    round_trip(&mut c, b"x");
    let direct = start.elapsed();
    proxy.set_delay(Duration::from_millis(150));
    let start = Instant::now();
    assert_eq!(round_trip(&mut c, b"y"), b"y");
    let delayed = start.elapsed();
    // One chunk each way, 150 ms each.
    assert!(
        delayed >= Duration::from_millis(300),
        "delayed round trip took {delayed:?} (undelayed {direct:?})"
    );
    proxy.set_delay(Duration::ZERO);
    let start = Instant::now();
    round_trip(&mut c, b"z");
    assert!(start.elapsed() < Duration::from_millis(300));
}

#[test]
fn stall_holds_data_until_released() {
    let (echo, _ends) = echo_server();
    let proxy = FaultProxy::start(echo);
    let mut c = client(&proxy);
    round_trip(&mut c, b"warm");
    proxy.stall(true);
    c.write_all(b"held").expect("write while stalled");
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut got = [0u8; 4];
    let err = c
        .read(&mut got)
        .expect_err("nothing may arrive while stalled");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    assert_eq!(proxy.bytes_forwarded(), 8, "stalled bytes were forwarded");
    proxy.stall(false);
    c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    c.read_exact(&mut got).expect("released data arrives");
    assert_eq!(&got, b"held");
}

#[test]
fn reset_aborts_both_ends() {
    let (echo, ends) = echo_server();
    let proxy = FaultProxy::start(echo);
    let mut c = client(&proxy);
    round_trip(&mut c, b"before");
    proxy.reset_all();
    let mut buf = [0u8; 16];
    let client_saw = c.read(&mut buf);
    assert!(
        matches!(&client_saw, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "client saw {client_saw:?}, want ECONNRESET"
    );
    let server_saw = ends.recv_timeout(IO_TIMEOUT).expect("server end");
    assert_eq!(server_saw, Err(ErrorKind::ConnectionReset));
    // The proxy still accepts new connections.
    let mut c2 = client(&proxy);
    assert_eq!(round_trip(&mut c2, b"after"), b"after");
}

#[test]
fn reset_one_leaves_the_others() {
    let (echo, _ends) = echo_server();
    let proxy = FaultProxy::start(echo);
    let mut a = client(&proxy);
    let mut b = client(&proxy);
    round_trip(&mut a, b"a");
    round_trip(&mut b, b"b");
    proxy.reset_one(0);
    let mut buf = [0u8; 1];
    assert!(a.read(&mut buf).is_err(), "connection 0 survived its reset");
    assert_eq!(round_trip(&mut b, b"still"), b"still");
}

#[test]
fn bit_flip_changes_exactly_one_bit_of_the_next_connection() {
    let (echo, _ends) = echo_server();
    let proxy = FaultProxy::start(echo);
    proxy.flip_bit_after(5, Direction::ClientToServer);
    let msg: Vec<u8> = (0u8..32).collect();
    let mut c = client(&proxy);
    // Two writes: the flipped offset is counted across chunks.
    c.write_all(&msg[..3]).expect("write");
    thread::sleep(Duration::from_millis(50));
    c.write_all(&msg[3..]).expect("write");
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).expect("echo");
    let diff: Vec<(usize, u8)> = msg
        .iter()
        .zip(&got)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i, a ^ b))
        .collect();
    assert_eq!(diff, vec![(5, 0x01)]);
    let mut clean = client(&proxy);
    assert_eq!(round_trip(&mut clean, &msg), msg, "flip was not one-shot");
}

#[test]
fn flipped_bit_under_tls_is_an_error_not_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs::init(dir.path(), &[], false).expect("certs init");
    let server_cfg =
        tls::server_config(&TlsDir::load(dir.path(), TlsRole::Server).expect("server"))
            .expect("server config");
    let client_cfg =
        tls::client_config(&TlsDir::load(dir.path(), TlsRole::Client).expect("client"))
            .expect("client config");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("addr");
    const APP_BYTES: usize = 256 * 1024;
    let server = thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        let mut s = tls::accept(tcp, server_cfg, 5_000).expect("TLS accept");
        let mut got = vec![0u8; APP_BYTES];
        s.read_exact(&mut got).map(|()| got)
    });
    let proxy = FaultProxy::start(target);
    // The client's handshake is a few KiB; offset 64 KiB lands in an
    // application-data record.
    proxy.flip_bit_after(64 * 1024, Direction::ClientToServer);
    let tcp = TcpStream::connect(proxy.addr()).expect("connect");
    let mut c = tls::connect(tcp, client_cfg, "localhost", 5_000).expect("TLS connect");
    let _ = c.write_all(&vec![0x42u8; APP_BYTES]);
    let _ = c.flush();
    let result = server.join().expect("server thread");
    let err = match result {
        Ok(_) => panic!("the server read {APP_BYTES} bytes through a flipped bit"),
        Err(e) => e,
    };
    let tls_err = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    assert_eq!(
        tls_err,
        Some(&rustls::Error::DecryptError),
        "want a record authentication failure (bad_record_mac), got {err}"
    );
}
