//! What a send is asked to do ([`SendOptions`]) and what it reports
//! ([`SendReport`], the `done` event's fields).

use std::time::Duration;

use super::pass::{self, PassRequest, SyncId};
use super::{CHUNK_BYTES_DEFAULT, TestHooks};
use crate::compress::{self, Mode};
use crate::engine::EngineKind;

/// What `diskferry send` was asked to do.
#[derive(Debug, Clone)]
pub struct SendOptions {
    pub source: String,
    /// The source file's format (`None`: its extension's, else raw).
    pub source_format: Option<crate::endpoint::ImageFormat>,
    /// `HOST:PORT` of the receiver.
    pub to: String,
    /// Target name on the receiver.
    pub target: String,
    /// None only with `insecure_plaintext`.
    pub tls_dir: Option<std::path::PathBuf>,
    pub insecure_plaintext: bool,
    pub streams: u32,
    pub compress: Mode,
    /// Bytes on the wire per second, for [`run`]; a disk of a job shares
    /// its job's budget ([`crate::runtime::JobSpec`]) instead.
    pub rate_bytes_per_s: Option<u64>,
    pub verify: bool,
    /// NBD connections to the source.
    pub connections: u32,
    /// Requests in flight per source connection (`None`:
    /// [`REQUESTS_NEAR`] or [`REQUESTS_FAR`], by where the source is).
    pub requests: Option<u32>,
    pub chunk_bytes: u32,
    pub threads: Option<u32>,
    pub engine: Option<EngineKind>,
    /// Discard the receiver's journal for this target and copy everything.
    pub restart: bool,
    /// Let a fresh copy replace an existing, non-empty target file the
    /// receiver has no journal for (HELLO flag `OVERWRITE`).
    pub overwrite: bool,
    /// A stream with no progress for this long is reconnected.
    pub stall_timeout: Duration,
    /// How long to keep reconnecting before stopping (resumable).
    pub retry_for: Duration,
    /// Overrides the computed source identity (e.g. a snapshot id).
    pub source_id: Option<String>,
    /// Regions of the disk read side by side ([`crate::plan::lanes`]).
    pub lanes: u32,
    /// How long an NBD source may leave a connection attempt, the
    /// handshake or a request unanswered before the job fails.
    pub io_timeout: Duration,
    /// Faults to inject, for tests (see [`hooks`]); none by default.
    pub test_hooks: TestHooks,
    /// What the pass sends: everything, what changed since a base, or
    /// the blocks that differ ([`PassRequest`]).
    pub pass: PassRequest,
    /// An external change id (e.g. VMware's changeId) the receiver
    /// records with the sync and the report echoes.
    pub change_id: Option<String>,
    /// How often [`run`](super::run) reports progress.
    pub progress_every: Duration,
}

impl SendOptions {
    /// Options with the command line's defaults.
    pub fn new(source: &str, to: &str, target: &str) -> Self {
        SendOptions {
            source: source.to_string(),
            source_format: None,
            to: to.to_string(),
            target: target.to_string(),
            tls_dir: None,
            insecure_plaintext: false,
            streams: 4,
            compress: Mode::Auto,
            rate_bytes_per_s: None,
            verify: false,
            connections: 4,
            requests: None,
            chunk_bytes: CHUNK_BYTES_DEFAULT,
            threads: None,
            engine: None,
            restart: false,
            overwrite: false,
            stall_timeout: Duration::from_secs(30),
            retry_for: Duration::from_secs(600),
            source_id: None,
            lanes: crate::plan::lanes::LANES_DEFAULT,
            io_timeout: crate::pipeline::run::IO_TIMEOUT_DEFAULT,
            test_hooks: TestHooks::default(),
            pass: PassRequest::Full,
            change_id: None,
            progress_every: Duration::from_secs(1),
        }
    }
}

/// The result of a successful send.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SendReport {
    pub source: String,
    pub target: String,
    pub size_bytes: u64,
    pub bytes_planned: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_on_wire: u64,
    pub compression_ratio: f64,
    pub elapsed_s: f64,
    pub engine: EngineKind,
    pub streams: usize,
    pub congestion_control: String,
    pub image_digest: Option<String>,
    pub verified: bool,
    pub compression: compress::CompressStats,
    /// Data bytes of the source the receiver already held when this run
    /// started (not sent again).
    pub bytes_resumed_skipped: u64,
    /// Data bytes sent more than once in this run (after stream failures,
    /// or acknowledged by a receiver instance that then lost them).
    pub bytes_resent: u64,
    /// The receiver had part of the job already.
    pub resumed: bool,
    /// Stream reconnections during the run.
    pub reconnects: u64,
    /// Planning rounds (1 without failures).
    pub rounds: u32,
    pub source_identity: String,
    /// The sync this run completed (for a target already complete, the
    /// sync it recorded then).
    #[serde(serialize_with = "pass::ser_sync_id")]
    pub sync_id: SyncId,
    /// The sync an incremental pass started from.
    #[serde(
        serialize_with = "pass::ser_opt_sync_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_sync_id: Option<SyncId>,
    /// The external change id given with the send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    /// The pass's changed bytes: incremental, its copy and zero extents;
    /// delta, the blocks that differed; full, the source's data bytes.
    pub bytes_changed: u64,
}
