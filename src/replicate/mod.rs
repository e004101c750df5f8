#![forbid(unsafe_code)]
//! Network replication: `diskferry send` (the sender, [`send`]) and
//! `diskferry serve` (the receiver, [`serve`]). The protocol is `crate::wire`
//! (docs/wire-protocol.md); the transport is `crate::net`.
//!
//! Sender: [`send`] the coordinator and per-stream sender threads,
//! [`stream`] one TLS / TCP stream and frame I/O.
//! Receiver: [`serve`] accept loop and options, `conn` one stream's
//! protocol driver, `unpack` its DATA checks and decompression, `written` its
//! written ranges and their flushes, `verify` the read-back pass, `job` jobs,
//! `registry` the jobs in progress and their targets, `target` target names,
//! opening and I/O, `ranges` merged byte-range sets, [`limits`] the caps on
//! peers, `transport` the TLS / TCP byte stream.

mod conn;
mod job;
pub mod limits;
mod ranges;
mod registry;
pub mod send;
pub mod serve;
mod source;
pub mod stream;
mod target;
mod transport;
mod unpack;
mod verify;
mod written;

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
