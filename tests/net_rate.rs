//! `--rate` parsing and the shared token bucket's accuracy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use diskferry::net::rate::{RateLimiter, parse_rate};

#[test]
fn parse_rate_table() {
    let ok: &[(&str, u64)] = &[
        ("100M", 100_000_000),
        ("1G", 1_000_000_000),
        ("500k", 500_000),
        ("500K", 500_000),
        ("64Mi", 64 << 20),
        ("1Gi", 1 << 30),
        ("2Ki", 2048),
        ("250Mbit", 31_250_000),
        ("1Gbit", 125_000_000),
        ("100kbit", 12_500),
        ("12345", 12_345),
        ("100M/s", 100_000_000),
        ("64MiB/s", 64 << 20),
        ("100MB", 100_000_000),
        (" 1.5G ", 1_500_000_000),
        ("0.5Mi", 512 * 1024),
        ("8bit", 1),
        ("18446744073709551615", u64::MAX),
    ];
    for &(text, want) in ok {
        assert_eq!(parse_rate(text), Ok(want), "{text}");
    }
    let bad = [
        "",
        "0",
        "0M",
        "0.0G",
        "M",
        "abc",
        "100X",
        "100 Mbps",
        "1.2.3M",
        "-5M",
        "1e9",
        "18446744073709551616",
        "99999999999999999999T",
        "4bit",
        "100m",
        "/s",
    ];
    for text in bad {
        let err = parse_rate(text).expect_err(text);
        assert!(!err.is_empty(), "{text}");
    }
    assert!(parse_rate("0").unwrap_err().contains("zero"));
    assert!(parse_rate("100X").unwrap_err().contains("250Mbit"));
}

/// `threads` threads acquiring 64 KiB pieces for `run`; bytes per second.
fn measure(limiter: &Arc<RateLimiter>, threads: usize, run: Duration) -> f64 {
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let limiter = Arc::clone(limiter);
            let sent_bytes = Arc::clone(&sent_bytes);
            thread::spawn(move || {
                while start.elapsed() < run {
                    limiter.acquire(64 * 1024);
                    sent_bytes.fetch_add(64 * 1024, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("join");
    }
    sent_bytes.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[test]
fn four_threads_share_20_mb_per_s_within_5_percent() {
    let limiter = Arc::new(RateLimiter::with_rate(20_000_000));
    let achieved = measure(&limiter, 4, Duration::from_secs(2));
    let error = achieved / 20e6 - 1.0;
    eprintln!("achieved {achieved:.0} B/s ({:+.2} %)", error * 100.0);
    assert!(
        error.abs() < 0.05,
        "achieved {achieved:.0} B/s ({:+.1} %)",
        error * 100.0
    );
}

#[test]
fn set_rate_takes_effect_while_threads_wait() {
    // Start slow, so the threads are sleeping in acquire, then speed up.
    let limiter = Arc::new(RateLimiter::with_rate(2_000_000));
    let slow = measure(&limiter, 2, Duration::from_millis(500));
    assert!((slow / 2e6 - 1.0).abs() < 0.25, "slow phase {slow:.0} B/s");
    limiter.set_rate(10_000_000);
    assert_eq!(limiter.rate_bytes_per_s(), Some(10_000_000));
    let fast = measure(&limiter, 2, Duration::from_secs(1));
    assert!((fast / 10e6 - 1.0).abs() < 0.10, "fast phase {fast:.0} B/s");

    // Unlimited, then limited again.
    limiter.set_rate(0);
    assert_eq!(limiter.rate_bytes_per_s(), None);
    let start = Instant::now();
    for _ in 0..1000 {
        limiter.acquire(1 << 20);
    }
    assert!(start.elapsed() < Duration::from_millis(100));
    limiter.set_rate(1_000_000);
    let start = Instant::now();
    for _ in 0..4 {
        limiter.acquire(64 * 1024);
    }
    // The burst (100 kB, set for 2 MB/s) is free; the other 162 kB of the
    // 256 KiB need about 162 ms at 1 MB/s.
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(140), "{waited:?}");
    assert!(waited < Duration::from_millis(400), "{waited:?}");
}
