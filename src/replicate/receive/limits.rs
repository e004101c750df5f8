//! Bounds on what a peer can make the receiver hold.
//!
//! * Before authentication: [`HandshakeGate`] caps the connections one
//!   source address may have in their TLS handshake (or, in plaintext
//!   mode, waiting for their first byte), so a flood from one address
//!   cannot fill every connection slot and keep other senders out.
//! * After: [`PeerLimits::max_ranges_per_job`] caps the separate byte
//!   ranges a job keeps in memory (the connection driver enforces it).
//!
//! Refusals that a peer can repeat at will are logged through
//! [`RateLimitedLog`], so a flood does not flood the log too.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::sync::lock;
use crate::wire::MAX_ACK_RANGES;

/// Default of [`PeerLimits::max_handshakes_per_address`].
pub const HANDSHAKES_PER_ADDRESS_DEFAULT: usize = 8;
/// Default of [`PeerLimits::max_ranges_per_job`]: 2²⁰ ranges, the most a
/// journal holds. A sender writes whole chunk windows, so its ranges merge
/// into at most the journal's ranges (2¹⁶ by default) plus the windows in
/// flight; a legitimate job never comes near this.
pub const RANGES_PER_JOB_DEFAULT: usize = 1 << 20;
/// Most separate ranges one stream may write between two BARRIERs (one
/// ACK's worth). A sender barriers every 64 MiB or second, which is 16 Ki
/// windows at the smallest chunk size (4 KiB); a window and the holes
/// next to it merge into one range, so only a broken sender reaches this.
pub const RANGES_PER_STREAM_MAX: usize = MAX_ACK_RANGES as usize;
/// A stream whose HELLO has not arrived this long after its handshake (a
/// plaintext stream: after its first byte) is ended with ERROR(TIMEOUT):
/// a sender says HELLO at once.
pub const HELLO_TIMEOUT_MS: u64 = 5_000;
/// A refusal a peer can repeat is logged at most once per this interval
/// (with the number left out since).
pub const REFUSAL_LOG_INTERVAL_MS: u64 = 10_000;

/// Caps on what peers may hold; `serve` flags, with these defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    /// Connections one source address (an IPv6 address: its /64) may have
    /// before they are authenticated; more are closed at once.
    pub max_handshakes_per_address: usize,
    /// Separate byte ranges one job may hold in memory: its durable set
    /// (merged over every stream), and each stream's ranges written since
    /// its last BARRIER. A job's durable set costs about 40 bytes a range,
    /// held up to three times over (the set, the journal's copy, the
    /// WELCOME list), so the default bounds a job at about 120 MiB; each
    /// stream adds at most 2 × [`RANGES_PER_STREAM_MAX`] ranges (about
    /// 5 MiB). A stream that would pass the cap is ended with
    /// `ERROR(PROTOCOL)` and its job fails.
    pub max_ranges_per_job: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_handshakes_per_address: HANDSHAKES_PER_ADDRESS_DEFAULT,
            max_ranges_per_job: RANGES_PER_JOB_DEFAULT,
        }
    }
}

/// Counts unauthenticated connections per source address, and logs their
/// refusals rate-limited (a flood of them must not flood the log).
#[derive(Debug)]
pub struct HandshakeGate {
    max_per_address: usize,
    /// Only addresses with a connection in its handshake: at most one
    /// entry per open connection.
    counts: Mutex<HashMap<IpAddr, usize>>,
    over_cap_log: RateLimitedLog,
    refused_log: RateLimitedLog,
}

/// One connection's place in the [`HandshakeGate`]; gives it back when
/// dropped (when the handshake ended, either way).
#[derive(Debug)]
pub struct HandshakeSlot {
    gate: Arc<HandshakeGate>,
    key: IpAddr,
}

impl HandshakeGate {
    pub fn new(max_per_address: usize) -> Arc<Self> {
        Arc::new(HandshakeGate {
            max_per_address: max_per_address.max(1),
            counts: Mutex::default(),
            over_cap_log: RateLimitedLog::new(),
            refused_log: RateLimitedLog::new(),
        })
    }

    /// A slot for a connection from `peer`, or `None` (logged,
    /// rate-limited) when its address has
    /// [`PeerLimits::max_handshakes_per_address`] handshakes running.
    pub fn enter(self: &Arc<Self>, peer: SocketAddr) -> Option<HandshakeSlot> {
        let key = address_key(peer.ip());
        let mut counts = lock(&self.counts);
        let count = counts.entry(key).or_insert(0);
        if *count >= self.max_per_address {
            drop(counts);
            self.over_cap_log.warn(|| {
                format!(
                    "refusing connection from {peer}: {} connections from its address are not \
                     authenticated yet (a flood, or raise --max-handshakes-per-address)",
                    self.max_per_address
                )
            });
            return None;
        }
        *count += 1;
        Some(HandshakeSlot {
            gate: Arc::clone(self),
            key,
        })
    }

    /// Handshakes running from `ip`'s address (for tests and logs).
    pub fn in_progress(&self, ip: IpAddr) -> usize {
        lock(&self.counts)
            .get(&address_key(ip))
            .copied()
            .unwrap_or(0)
    }

    pub fn max_per_address(&self) -> usize {
        self.max_per_address
    }
}

impl HandshakeSlot {
    /// Logs (rate-limited) why this connection's handshake was refused.
    pub fn refused(&self, message: impl FnOnce() -> String) {
        self.gate.refused_log.warn(message);
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.gate.counts);
        if let Some(count) = counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// What counts as one source: an IPv4 address (also when it arrives
/// IPv4-mapped on an IPv6 socket), or an IPv6 /64 (one host usually has a
/// whole /64 to pick addresses from).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// A warning logged at most once per [`REFUSAL_LOG_INTERVAL_MS`]; the
/// next one says how many were left out.
#[derive(Debug)]
pub struct RateLimitedLog {
    state: Mutex<LogState>,
}

#[derive(Debug)]
struct LogState {
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitedLog {
    pub const fn new() -> Self {
        RateLimitedLog {
            state: Mutex::new(LogState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// At `now`: `Some(lines left out since the last one)` if a line may
    /// be logged, else `None` (and it is counted as left out).
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = lock(&self.state);
        let interval = Duration::from_millis(REFUSAL_LOG_INTERVAL_MS);
        if s.last
            .is_some_and(|last| now.saturating_duration_since(last) < interval)
        {
            s.suppressed += 1;
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.suppressed))
    }

    /// Logs `message` unless one was logged less than the interval ago.
    pub fn warn(&self, message: impl FnOnce() -> String) {
        let Some(suppressed) = self.admit(Instant::now()) else {
            return;
        };
        if suppressed > 0 {
            warn!(
                suppressed,
                "{} ({suppressed} more like it since the last such line, not logged)",
                message()
            );
        } else {
            warn!("{}", message());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_caps_each_address_and_gives_slots_back() {
        let gate = HandshakeGate::new(2);
        let a: SocketAddr = "127.0.0.2:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:1000".parse().unwrap();
        let a1 = gate.enter(a).unwrap();
        let _a2 = gate.enter(a).unwrap();
        assert!(
            gate.enter(a).is_none(),
            "a third handshake from one address"
        );
        let _b1 = gate.enter(b).expect("another address is not affected");
        drop(a1);
        assert_eq!(gate.in_progress(a.ip()), 1);
        let _a3 = gate.enter(a).expect("a slot given back can be taken again");
        assert!(gate.enter(a).is_none());
    }

    #[test]
    fn mapped_ipv4_is_ipv4_and_ipv6_counts_per_64() {
        let gate = HandshakeGate::new(1);
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 1000);
        let _v4 = gate.enter(at("192.0.2.1")).unwrap();
        assert!(gate.enter(at("::ffff:192.0.2.1")).is_none());
        assert!(gate.enter(at("::ffff:192.0.2.2")).is_some());
        let _v6 = gate.enter(at("2001:db8:1:2::1")).unwrap();
        assert!(gate.enter(at("2001:db8:1:2:ffff::9")).is_none());
        assert!(gate.enter(at("2001:db8:1:3::1")).is_some());
    }

    #[test]
    fn the_log_admits_one_line_per_interval_and_counts_the_rest() {
        let log = RateLimitedLog::new();
        let t0 = Instant::now();
        let interval = Duration::from_millis(REFUSAL_LOG_INTERVAL_MS);
        assert_eq!(log.admit(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.admit(t0 + interval / 10 * i), None);
        }
        assert_eq!(log.admit(t0 + interval), Some(5));
        assert_eq!(log.admit(t0 + interval + interval / 2), None);
        assert_eq!(log.admit(t0 + interval * 3), Some(1));
    }

    #[test]
    fn slots_are_dropped_from_the_map() {
        let gate = HandshakeGate::new(3);
        for i in 0..100u8 {
            let _slot = gate.enter(SocketAddr::from(([10, 0, 0, i], 1000))).unwrap();
        }
        assert!(lock(&gate.counts).is_empty());
    }
}
