//! Unauthenticated floods: connections that never finish a handshake are
//! capped per source address and dropped after the handshake deadline, so
//! a flood from one address cannot keep a real sender out.
//!
//! The flood comes from 127.0.0.2 (a client socket bound there), the real
//! sender from 127.0.0.1; both are loopback addresses.

#[path = "support/rx.rs"]
mod rx;
mod serve_support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diskferry::replicate::receive::limits::{
    HANDSHAKES_PER_ADDRESS_DEFAULT, HELLO_TIMEOUT_MS, REFUSAL_LOG_INTERVAL_MS,
};
use diskferry::replicate::receive::serve::{HANDSHAKE_TIMEOUT_MS, MAX_CONNECTIONS};
use diskferry::wire::{ErrorCode, Frame};
use serve_support::Harness;

const FLOOD_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A TCP connection from `FLOOD_ADDR` that never sends a byte.
fn idle_connection(to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((FLOOD_ADDR, 0)).into())
        .unwrap_or_else(|e| panic!("cannot bind a client socket to {FLOOD_ADDR}: {e}"));
    sock.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("flood connection to {to}: {e}"));
    sock.into()
}

/// True once the receiver closed `tcp` (EOF or reset); never blocks.
fn is_closed(tcp: &TcpStream) -> bool {
    tcp.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let closed = match (&*tcp).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("the receiver sent bytes to a peer that never spoke"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    tcp.set_nonblocking(false).unwrap();
    closed
}

/// Opens `n` idle connections; returns when each was closed, measured
/// from the moment the last one was opened (`None`: still open at
/// `watch_for`).
fn idle_flood(to: SocketAddr, n: usize, watch_for: Duration) -> Vec<Option<Duration>> {
    let conns: Vec<TcpStream> = (0..n).map(|_| idle_connection(to)).collect();
    let opened = Instant::now();
    let mut closed_at: Vec<Option<Duration>> = vec![None; n];
    while opened.elapsed() < watch_for && closed_at.iter().any(Option::is_none) {
        for (i, c) in conns.iter().enumerate() {
            if closed_at[i].is_none() && is_closed(c) {
                closed_at[i] = Some(opened.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    closed_at
}

fn check_cap_and_deadline(plaintext: bool) {
    let h = Harness::start(plaintext);
    let n = HANDSHAKES_PER_ADDRESS_DEFAULT + 12;
    let deadline = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let closed_at = idle_flood(h.addr, n, deadline + Duration::from_secs(5));
    let at_once: Vec<_> = closed_at
        .iter()
        .filter(|t| t.is_some_and(|t| t < Duration::from_secs(1)))
        .collect();
    assert_eq!(
        at_once.len(),
        n - HANDSHAKES_PER_ADDRESS_DEFAULT,
        "connections over the per-address cap must be closed at once: {closed_at:?}"
    );
    let held: Vec<Duration> = closed_at
        .iter()
        .flatten()
        .copied()
        .filter(|t| *t >= Duration::from_secs(1))
        .collect();
    assert_eq!(
        held.len(),
        HANDSHAKES_PER_ADDRESS_DEFAULT,
        "the connections within the cap must be dropped after the handshake deadline: \
         {closed_at:?}"
    );
    for t in held {
        assert!(
            t >= deadline - Duration::from_millis(500) && t <= deadline + Duration::from_secs(3),
            "an idle connection was dropped after {t:?}, the deadline is {deadline:?}"
        );
    }
    // The gate gave the slots back: a real client gets in.
    let mut c = h.connect();
    c.welcome(&serve_support::hello(1, "after-flood.img", 1 << 20, 0, 1));
}

#[test]
fn tls_handshakes_are_capped_per_address_and_idle_ones_dropped_at_the_deadline() {
    check_cap_and_deadline(false);
}

#[test]
fn plaintext_first_bytes_are_capped_per_address_and_idle_ones_dropped_at_the_deadline() {
    check_cap_and_deadline(true);
}

#[test]
fn plaintext_peers_count_against_their_address_until_their_hello() {
    let h = Harness::start(true);
    let cap = HANDSHAKES_PER_ADDRESS_DEFAULT;
    let mut hello_bytes = Vec::new();
    Frame::Hello(serve_support::hello(1, "trickle.img", 1 << 20, 0, 1))
        .encode(&mut hello_bytes)
        .unwrap();
    // `cap` peers that trickle a HELLO a byte at a time and never finish it.
    let mut conns: Vec<TcpStream> = (0..cap).map(|_| idle_connection(h.addr)).collect();
    let opened = Instant::now();
    for c in &mut conns {
        c.write_all(&hello_bytes[..1]).unwrap();
    }
    // Past its first byte a plaintext peer still counts against its
    // address: one more is closed at once, though it spoke.
    let mut extra = idle_connection(h.addr);
    extra.write_all(&hello_bytes[..1]).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut byte = [0u8; 1];
    // (Closed with our byte unread, so a reset rather than a FIN.)
    let got = extra.read(&mut byte);
    assert!(
        matches!(&got, Ok(0)) || matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "a connection over the cap must be closed at once, without an answer: {got:?}"
    );
    let deadline = Duration::from_millis(HELLO_TIMEOUT_MS);
    let mut sent = 1;
    while opened.elapsed() < deadline - Duration::from_millis(1000) {
        std::thread::sleep(Duration::from_millis(200));
        for c in &mut conns {
            c.write_all(&hello_bytes[sent..sent + 1]).unwrap();
        }
        sent += 1;
    }
    assert!(
        sent < hello_bytes.len(),
        "the trickle must not finish the HELLO"
    );
    for c in conns {
        let tcp = c.try_clone().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut client = serve_support::Client::new(Box::new(c), tcp);
        let (code, message) = client.expect_error();
        let after = opened.elapsed();
        assert_eq!(code, ErrorCode::Timeout, "{message}");
        assert!(message.contains("no HELLO"), "{message}");
        assert!(
            after >= deadline - Duration::from_millis(500)
                && after <= deadline + Duration::from_secs(3),
            "a HELLO never finished was ended after {after:?}, the deadline is {deadline:?}"
        );
    }
    // The slots were given back: a peer from that address that says HELLO
    // at once is served.
    let tcp = idle_connection(h.addr);
    let clone = tcp.try_clone().unwrap();
    clone
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut c = serve_support::Client::new(Box::new(tcp), clone);
    c.welcome(&serve_support::hello(2, "prompt.img", 1 << 20, 0, 1));
}

fn check_many_streams_from_one_address(plaintext: bool) {
    let h = Harness::start(plaintext);
    let streams = 3 * HANDSHAKES_PER_ADDRESS_DEFAULT as u16;
    // All open at once, from 127.0.0.1: the cap is on connections not yet
    // authenticated (plaintext: not past HELLO), not on a sender's streams.
    let conns: Vec<_> = (0..streams)
        .map(|i| {
            let mut c = h.connect();
            c.welcome(&serve_support::hello(9, "wide.img", 1 << 20, i, streams));
            c
        })
        .collect();
    assert_eq!(conns.len(), usize::from(streams));
}

#[test]
fn many_tls_streams_from_one_address_are_served() {
    check_many_streams_from_one_address(false);
}

#[test]
fn many_plaintext_streams_from_one_address_are_served() {
    check_many_streams_from_one_address(true);
}

/// Keeps `count` idle connections from `FLOOD_ADDR` open to `to`,
/// reopening every one the receiver closes, until `stop`; counts the
/// connections it opened in `opened`. Returns how many of the first
/// `count` were still open at the first look.
fn flood(
    to: SocketAddr,
    count: usize,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Option<usize>> {
    std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = Vec::new();
        let mut first_look = None;
        while !stop.load(Ordering::Relaxed) {
            conns.retain(|c| !is_closed(c));
            if first_look.is_none() && !conns.is_empty() {
                first_look = Some(conns.len());
            }
            while conns.len() < count && !stop.load(Ordering::Relaxed) {
                conns.push(idle_connection(to));
                opened.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        first_look
    })
}

#[test]
fn a_flood_from_one_address_does_not_keep_a_real_sender_out() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 4;
    let rx = rx::Rx::start(
        dir.path(),
        &["--max-handshakes-per-address", &cap.to_string()],
    );
    let addr: SocketAddr = rx.addr.parse().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, serve_support::random_bytes(8 << 20, 7)).unwrap();

    // More idle connections than the receiver serves in all: without the
    // per-address cap they would hold every slot for a whole deadline.
    let count = MAX_CONNECTIONS + 44;
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flood_started = Instant::now();
    let flooder = flood(addr, count, Arc::clone(&stop), Arc::clone(&opened));
    // Opened, and reopened once: the receiver closes what is over the cap.
    while opened.load(Ordering::Relaxed) < 2 * count {
        assert!(
            flood_started.elapsed() < Duration::from_secs(20),
            "the flood did not get going: {} connections opened",
            opened.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let sent_at = Instant::now();
    let out = rx.send(src.to_str().unwrap(), "flooded.img", &["--verify"]);
    let took = sent_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let held = flooder.join().unwrap();
    let flood_lasted = flood_started.elapsed();
    rx::done(&out);
    assert_eq!(
        held,
        Some(cap),
        "the receiver must hold exactly --max-handshakes-per-address idle connections of the flood"
    );
    assert!(
        took < Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
        "the send took {took:?} under the flood, longer than a handshake deadline"
    );
    assert_eq!(
        std::fs::read(rx.target("flooded.img")).unwrap(),
        std::fs::read(&src).unwrap()
    );
    // Hundreds of refusals, a handful of log lines.
    let log = rx.log_text();
    let refusals = log
        .lines()
        .filter(|l| l.contains("not authenticated yet"))
        .count();
    assert!(refusals >= 1, "no refusal logged; log:\n{log}");
    let intervals = flood_lasted.as_millis() as usize / REFUSAL_LOG_INTERVAL_MS as usize;
    assert!(
        refusals <= intervals + 1,
        "{refusals} refusal lines in {flood_lasted:?} of flood: the log is not rate-limited"
    );
    let handshakes_refused = log
        .lines()
        .filter(|l| l.contains("refused connection from"))
        .count();
    assert!(
        handshakes_refused <= intervals + 1,
        "{handshakes_refused} lines of refused handshakes: the log is not rate-limited"
    );
}
