//! Unauthenticated floods: connections that never finish a handshake are
//! capped per source address and dropped after the handshake deadline, so
//! a flood from one address cannot keep a real sender out.
//!
//! The flood comes from 127.0.0.2 (a client socket bound there), the real
//! sender from 127.0.0.1; both are loopback addresses.

#[path = "support/rx.rs"]
mod rx;
mod serve_support;

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diskferry::replicate::limits::{HANDSHAKES_PER_ADDRESS_DEFAULT, REFUSAL_LOG_INTERVAL_MS};
use diskferry::replicate::serve::{HANDSHAKE_TIMEOUT_MS, MAX_CONNECTIONS};
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
