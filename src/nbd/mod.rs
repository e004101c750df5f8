//! Native NBD client.
//!
//! * [`proto`]: constants and sans-IO encoders/decoders of handshake
//!   messages and of transmission-phase requests.
//! * [`conn`]: [`conn::ClientConn`], the sans-IO transmission-phase state
//!   machine: it encodes requests, tracks what is in flight, and tells its
//!   driver where the next received bytes must go (scratch vs. straight into
//!   the caller's read buffer), validating every length the server sends.
//! * [`handshake`]: fixed-newstyle negotiation (`NBD_OPT_GO` with block-size
//!   info, structured replies, meta contexts) over a blocking stream.
//! * [`blocking`]: a small blocking driver of `ClientConn` used for the
//!   handshake-time work: block-status planning, tests, flush.
//! * [`uri`]: libnbd-style NBD URIs.
#![forbid(unsafe_code)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(missing_docs)]

pub mod blocking;
pub mod conn;
pub mod handshake;
pub mod proto;
pub mod uri;

/// Largest payload diskferry accepts from a server in one reply chunk.
pub const MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;
/// Largest string (export name, description, error message, context name).
pub const MAX_STRING_BYTES: u32 = 4096;

/// Everything that can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// I/O error on the connection.
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection.
    #[error("NBD server closed the connection {0}")]
    Closed(&'static str),
    /// The server broke the protocol (wrong magic, unknown cookie, bad length…).
    #[error("NBD server broke the protocol: {0}")]
    Protocol(String),
    /// The server refused an option or an export during the handshake.
    #[error("NBD server refused {what}: {message}")]
    Refused {
        /// What was refused.
        what: String,
        /// The server's message.
        message: String,
    },
    /// A server-side error reply to a command.
    #[error("NBD {command} at offset {offset} length {length} failed: {errno_name} ({message})")]
    Command {
        /// The command.
        command: &'static str,
        /// Where.
        offset: u64,
        /// How many bytes.
        length: u64,
        /// The NBD errno.
        errno: u32,
        /// The errno's name.
        errno_name: &'static str,
        /// The server's message.
        message: String,
    },
    /// The client refused to send a request that breaks the negotiated
    /// limits (a bug in the caller, not in the server).
    #[error("NBD request refused before sending: {0}")]
    Invalid(String),
    /// The server lacks a feature diskferry needs.
    #[error("NBD server does not support {0}")]
    Unsupported(&'static str),
}
