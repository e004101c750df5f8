//! Socket tuning on loopback: what is asked, what the kernel applied, and
//! how a refusal is reported.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread;

use diskferry::net::socket::{self, NetError, SocketTuning};

fn kernel_file(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn listener(t: &SocketTuning) -> (TcpListener, SocketAddr) {
    let l = socket::listen_tuned("127.0.0.1:0".parse().expect("addr"), t).expect("listen");
    let addr = l.local_addr().expect("local addr");
    (l, addr)
}

#[test]
fn default_tuning_is_applied_and_reported_on_both_ends() {
    let t = SocketTuning::default();
    let (l, addr) = listener(&t);
    let server = thread::spawn(move || {
        let (mut stream, _) = l.accept().expect("accept");
        let report = socket::tune_accepted(&stream, &SocketTuning::default());
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).expect("read");
        (report, buf)
    });
    let (mut stream, client_report) = socket::connect_tuned(addr, &t, 2_000).expect("connect");
    stream.write_all(b"hello").expect("write");
    let (server_report, got) = server.join().expect("join");
    assert_eq!(&got, b"hello");

    let bbr_usable = kernel_file("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .split_whitespace()
        .any(|cc| cc == "bbr");
    for report in [&client_report, &server_report] {
        eprintln!("{}", report.summary());
        if bbr_usable && report.congestion_fallback.is_none() {
            assert_eq!(report.congestion, "bbr");
        } else {
            let why = report
                .congestion_fallback
                .as_deref()
                .expect("fallback reason");
            assert!(
                why.contains("bbr") && why.contains(&report.congestion),
                "{why}"
            );
        }
        assert!(report.nodelay);
        assert_eq!(
            report.notsent_lowat_bytes,
            diskferry::net::socket::NOTSENT_LOWAT_BYTES
        );
        // Either the kernel doubled the 4 MiB request or a note names the cap.
        assert!(
            report.send_buffer_bytes >= 8 * 1024 * 1024
                || report.notes.iter().any(|n| n.contains("wmem_max")),
            "{report:?}"
        );
        assert!(
            report.recv_buffer_bytes >= 8 * 1024 * 1024
                || report.notes.iter().any(|n| n.contains("rmem_max")),
            "{report:?}"
        );
    }
    if bbr_usable {
        // Root here, and bbr is loaded: nothing should have stopped it.
        assert_eq!(
            client_report.congestion,
            "bbr",
            "{}",
            client_report.summary()
        );
    }
}

#[test]
fn unknown_congestion_control_falls_back_with_a_reason() {
    let t = SocketTuning {
        congestion: Some("nosuchcc".into()),
        ..SocketTuning::default()
    };
    let (l, addr) = listener(&SocketTuning::default());
    let (_stream, report) = socket::connect_tuned(addr, &t, 2_000).expect("connect");
    drop(l);
    let why = report.congestion_fallback.expect("fallback reason");
    assert!(why.contains("nosuchcc unavailable"), "{why}");
    let default_cc = kernel_file("/proc/sys/net/ipv4/tcp_congestion_control");
    if !default_cc.is_empty() {
        assert_eq!(report.congestion, default_cc);
    }
    assert!(
        why.ends_with(&format!("using {}", report.congestion)),
        "{why}"
    );
}

#[test]
fn buffers_above_the_kernel_cap_are_noted() {
    let cap_bytes: usize = kernel_file("/proc/sys/net/core/wmem_max")
        .parse()
        .unwrap_or(0);
    if cap_bytes == 0 {
        eprintln!("no net.core.wmem_max here; skipped");
        return;
    }
    let t = SocketTuning {
        send_buffer_bytes: Some(cap_bytes * 4),
        recv_buffer_bytes: None,
        ..SocketTuning::default()
    };
    let (l, addr) = listener(&SocketTuning::default());
    let (_stream, report) = socket::connect_tuned(addr, &t, 2_000).expect("connect");
    drop(l);
    assert!(report.send_buffer_bytes <= cap_bytes * 2, "{report:?}");
    assert!(
        report.notes.iter().any(|n| n.contains("net.core.wmem_max")),
        "{report:?}"
    );
}

#[test]
fn connecting_to_a_closed_port_says_what_to_check() {
    // Bind then drop to find a port nobody listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let err = socket::connect_tuned(addr, &SocketTuning::default(), 2_000).unwrap_err();
    assert!(matches!(err, NetError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("diskferry serve"), "{err}");
}

#[test]
fn listening_twice_on_one_port_is_refused() {
    let (_l, addr) = listener(&SocketTuning::default());
    let err = socket::listen_tuned(addr, &SocketTuning::default()).unwrap_err();
    assert!(matches!(err, NetError::Listen { .. }), "{err:?}");
    assert!(err.to_string().contains("another process"), "{err}");
}
