//! Network transport between `diskferry send` and `diskferry serve`.
//!
//! * [`certs`]: `diskferry certs init DIR`, a private CA with server and
//!   client certificates (rcgen, ECDSA P-256).
//! * [`tls`]: mutual TLS 1.3 configurations (rustls) and blocking
//!   handshake helpers whose errors say which side refused what.
//! * [`socket`]: TCP sockets tuned for bulk transfer (BBR, buffers sized for
//!   the bandwidth-delay product, `TCP_NOTSENT_LOWAT`), with a report of
//!   what the kernel really applied.
//! * [`rate`]: `--rate` parsing and the token bucket shared by all streams.
//!
//! Host-side kernel settings that go with this live in `tuning/`.
#![forbid(unsafe_code)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(missing_docs)]

pub mod certs;
pub mod rate;
pub mod socket;
pub mod tls;

pub use certs::{CertError, CertPaths};
pub use rate::{RateLimiter, parse_rate};
pub use socket::{
    NetError, SocketTuning, TuningReport, connect_tuned, listen_tuned, tune_accepted,
};
pub use tls::{
    ALPN_PROTOCOL, TlsDir, TlsError, TlsRole, accept, client_config, connect, server_config,
};
