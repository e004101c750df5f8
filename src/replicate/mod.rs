//! Network replication: `diskferry serve` (the receiver, [`serve`]) and
//! `diskferry send` (the sender). The protocol is `crate::wire`
//! (docs/wire-protocol.md); the transport is `crate::net`.
//!
//! Receiver layout: [`serve`] accept loop and options, `conn` one stream's
//! protocol driver, `job` jobs and their registry, `target` target names,
//! opening and I/O, `ranges` merged byte-range sets, `transport` the
//! TLS / TCP byte stream.

mod conn;
mod job;
mod ranges;
pub mod serve;
mod target;
mod transport;
