//! Network replication: `diskferry send` (the sender, [`send`]) and
//! `diskferry serve` (the receiver, [`serve`]). The protocol is `crate::wire`
//! (docs/wire-protocol.md); the transport is `crate::net`.
//!
//! Sender: [`send`] the coordinator and per-stream sender threads,
//! [`stream`] one TLS / TCP stream and frame I/O.
//! Receiver: [`serve`] accept loop and options, `conn` one stream's
//! protocol driver, `job` jobs and their registry, `target` target names,
//! opening and I/O, `ranges` merged byte-range sets, `transport` the
//! TLS / TCP byte stream.

mod conn;
mod job;
mod ranges;
pub mod send;
pub mod serve;
pub mod stream;
mod target;
mod transport;
