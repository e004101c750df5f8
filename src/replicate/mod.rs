#![forbid(unsafe_code)]
//! Network replication: `diskferry send` (the sender, [`send`]) and
//! `diskferry serve` (the receiver, [`receive`]). The protocol is
//! `crate::wire` (docs/wire-protocol.md); the transport is `crate::net`.
//!
//! Sender: [`send`] the coordinator and per-stream sender threads,
//! [`stream`] one TLS / TCP stream and frame I/O.
//! Receiver: [`receive`] (accept loop, per-stream state machine and its I/O
//! loop, jobs, limits, and `receive::target`: target names, opening and I/O).

pub mod passes;
pub mod receive;
pub mod send;
mod source;
pub mod stream;

/// Random bytes from the kernel; should that fail, a hash of the clock and
/// the process id (unique enough for ids, never for keys).
pub(crate) fn random_bytes(out: &mut [u8]) {
    use std::io::Read;
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(out))
        .is_ok();
    if !ok {
        let seed = format!("{:?}{}", std::time::Instant::now(), std::process::id());
        let mut h = blake3::Hasher::new();
        h.update(seed.as_bytes());
        h.finalize_xof().fill(out);
    }
}

/// A fresh sync id for one send run: random, never all zero (all zero
/// means "none" on the wire).
pub(crate) fn new_sync_id() -> crate::wire::SyncId {
    let mut id = crate::wire::pass::NO_SYNC_ID;
    while id == crate::wire::pass::NO_SYNC_ID {
        random_bytes(&mut id);
    }
    id
}
