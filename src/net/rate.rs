//! Bandwidth limits: parsing `--rate` values and one token bucket shared by
//! every stream of a job.
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Smallest burst a limiter allows: one 64 KiB piece must always fit.
pub const BURST_BYTES_MIN: u64 = 64 * 1024;
/// Longest single sleep inside [`RateLimiter::acquire`], so that a rate
/// change is noticed quickly.
const SLEEP_SLICE_MAX: Duration = Duration::from_millis(20);

/// Parses a rate in bytes per second.
///
/// Units: none = bytes/s; `k`/`K`, `M`, `G`, `T` are SI powers of 1000 (of
/// bytes); `Ki`, `Mi`, `Gi`, `Ti` powers of 1024; a `bit` suffix (`250Mbit`,
/// `100kbit`) counts bits. A `B` after the prefix (`100MB`, `64MiB`) and a
/// trailing `/s` are allowed, so are decimals (`1.5G`). Zero is refused.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let body = text.strip_suffix("/s").unwrap_or(text).trim_end();
    let digits_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, unit) = body.split_at(digits_end);
    let unit = unit.trim_start();
    let (unit, is_bits) = match unit.strip_suffix("bit") {
        Some(prefix) => (prefix, true),
        None => (unit.strip_suffix('B').unwrap_or(unit), false),
    };
    let multiplier: u128 = match unit {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use e.g. 100M (bytes/s), 64Mi, 250Mbit or 1Gbit"
            ));
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(format!("{s:?}: no number; use e.g. 100M or 250Mbit"));
    }
    if fraction.contains('.') || fraction.len() > 9 || whole.len() > 30 {
        return Err(format!("{s:?} is not a number this tool can use as a rate"));
    }
    let parse = |digits: &str| -> u128 { digits.parse().unwrap_or(0) };
    let fraction_scale = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(0));
    let numerator = parse(whole)
        .checked_mul(fraction_scale)
        .and_then(|n| n.checked_add(parse(fraction)))
        .and_then(|n| n.checked_mul(multiplier));
    let bits_divisor: u128 = if is_bits { 8 } else { 1 };
    let bytes_per_s = numerator
        .map(|n| n / fraction_scale / bits_divisor)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    let bytes_per_s = u64::try_from(bytes_per_s).map_err(|_| format!("{s:?} is too large"))?;
    if bytes_per_s == 0 {
        return Err(format!(
            "{s:?} is zero bytes per second; leave the rate limit out for no limit"
        ));
    }
    Ok(bytes_per_s)
}

/// A token bucket shared (through an `Arc`) by all streams of a job.
///
/// Tokens are bytes; they accrue at the rate up to `burst_bytes`. A caller
/// asking for more than the burst waits until a full bucket is there and
/// leaves it in debt, so any piece size works and the long-run rate holds.
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// 0 = unlimited.
    rate_bytes_per_s: u64,
    burst_bytes: u64,
    /// May go negative (debt) after a piece larger than the burst.
    tokens_bytes: f64,
    refilled_at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed_s = now.duration_since(self.refilled_at).as_secs_f64();
        self.refilled_at = now;
        self.tokens_bytes = (self.tokens_bytes + elapsed_s * self.rate_bytes_per_s as f64)
            .min(self.burst_bytes as f64);
    }
}

/// The burst [`RateLimiter::with_rate`] uses: 1/20 s of traffic, at least
/// [`BURST_BYTES_MIN`].
pub fn default_burst_bytes(rate_bytes_per_s: u64) -> u64 {
    (rate_bytes_per_s / 20).max(BURST_BYTES_MIN)
}

impl RateLimiter {
    /// A limiter at `rate_bytes_per_s` (0 = unlimited) that lets at most
    /// `burst_bytes` through at once after an idle period. It starts full.
    pub fn new(rate_bytes_per_s: u64, burst_bytes: u64) -> Self {
        let burst_bytes = burst_bytes.max(1);
        RateLimiter {
            state: Mutex::new(Bucket {
                rate_bytes_per_s,
                burst_bytes,
                tokens_bytes: burst_bytes as f64,
                refilled_at: Instant::now(),
            }),
        }
    }

    /// A limiter at `rate_bytes_per_s` with [`default_burst_bytes`].
    pub fn with_rate(rate_bytes_per_s: u64) -> Self {
        Self::new(rate_bytes_per_s, default_burst_bytes(rate_bytes_per_s))
    }

    /// A limiter that never waits (until [`RateLimiter::set_rate`]).
    pub fn unlimited() -> Self {
        Self::new(0, BURST_BYTES_MIN)
    }

    /// Changes the rate for every stream, effective within 20 ms; 0 lifts
    /// the limit. The burst stays as configured.
    pub fn set_rate(&self, rate_bytes_per_s: u64) {
        let mut bucket = self.lock();
        bucket.refill(Instant::now());
        if bucket.rate_bytes_per_s == 0 {
            // Coming from unlimited: start from a full bucket, not from a
            // pile of tokens (or debt) of the unlimited period.
            bucket.tokens_bytes = bucket.burst_bytes as f64;
        }
        bucket.rate_bytes_per_s = rate_bytes_per_s;
    }

    /// The current rate; `None` when unlimited.
    pub fn rate_bytes_per_s(&self) -> Option<u64> {
        Some(self.lock().rate_bytes_per_s).filter(|&r| r != 0)
    }

    /// Blocks (sleeping) until `n_bytes` may be sent.
    pub fn acquire(&self, n_bytes: u64) {
        loop {
            let wait = {
                let mut bucket = self.lock();
                if bucket.rate_bytes_per_s == 0 {
                    return;
                }
                bucket.refill(Instant::now());
                let needed_bytes = n_bytes.min(bucket.burst_bytes) as f64;
                if bucket.tokens_bytes >= needed_bytes {
                    bucket.tokens_bytes -= n_bytes as f64;
                    return;
                }
                let missing_bytes = needed_bytes - bucket.tokens_bytes;
                Duration::from_secs_f64(missing_bytes / bucket.rate_bytes_per_s as f64)
            };
            std::thread::sleep(wait.min(SLEEP_SLICE_MAX));
        }
    }

    /// Take `n_bytes` now if the bucket allows it (the same rule as
    /// [`RateLimiter::acquire`]: enough tokens for `n_bytes` or a whole
    /// burst, the balance may go below zero); otherwise take nothing and
    /// say how long to wait before asking again. For threads that must not
    /// sleep here (a worker polls its engine meanwhile).
    pub fn try_acquire(&self, n_bytes: u64) -> Result<(), Duration> {
        let mut bucket = self.lock();
        if bucket.rate_bytes_per_s == 0 {
            return Ok(());
        }
        bucket.refill(Instant::now());
        let needed_bytes = n_bytes.min(bucket.burst_bytes) as f64;
        if bucket.tokens_bytes >= needed_bytes {
            bucket.tokens_bytes -= n_bytes as f64;
            return Ok(());
        }
        let missing_bytes = needed_bytes - bucket.tokens_bytes;
        Err(Duration::from_secs_f64(
            missing_bytes / bucket.rate_bytes_per_s as f64,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        crate::sync::lock(&self.state)
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::unlimited()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let limiter = RateLimiter::unlimited();
        let start = Instant::now();
        for _ in 0..10_000 {
            limiter.acquire(1 << 30);
        }
        assert!(start.elapsed() < Duration::from_millis(200));
        assert_eq!(limiter.rate_bytes_per_s(), None);
    }

    #[test]
    fn piece_larger_than_burst_goes_into_debt() {
        // 1 MB/s, 64 KiB burst: a 256 KiB piece passes at once (full
        // bucket), the next small piece waits for the debt to clear.
        let limiter = RateLimiter::new(1_000_000, 64 * 1024);
        let start = Instant::now();
        limiter.acquire(256 * 1024);
        assert!(start.elapsed() < Duration::from_millis(50));
        limiter.acquire(1);
        let waited = start.elapsed();
        // Debt of 192 KiB at 1 MB/s is about 197 ms.
        assert!(waited >= Duration::from_millis(180), "{waited:?}");
        assert!(waited < Duration::from_millis(400), "{waited:?}");
    }

    #[test]
    fn try_acquire_takes_or_names_the_wait() {
        let limiter = RateLimiter::new(1_000_000, 64 * 1024);
        assert_eq!(limiter.try_acquire(256 * 1024), Ok(()));
        let wait = limiter.try_acquire(1).unwrap_err();
        // 192 KiB of debt plus one byte at 1 MB/s.
        assert!(wait >= Duration::from_millis(180), "{wait:?}");
        assert!(wait < Duration::from_millis(220), "{wait:?}");
        assert_eq!(RateLimiter::unlimited().try_acquire(1 << 40), Ok(()));
    }
}
