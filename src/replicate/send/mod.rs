//! `diskferry send`: the source side of a replication job.
//!
//! The same planner and pinned workers as `copy` read the source and find
//! zero runs; instead of writing, each worker lends its read windows to the
//! sink. One sender thread per stream takes windows from the sink, chooses a
//! codec per run (adaptive policy), frames them, waits for the shared rate
//! limiter, and writes them into its TLS stream; then it hands the slot
//! back.
//!
//! Resume and faults. The sender keeps the set of byte ranges the receiver
//! has acknowledged as durable ([`Acked`]): seeded by the WELCOME of each
//! connection (what the receiver's journal and flushes hold), grown by ACKs
//! of the BARRIERs each stream sends every [`BARRIER_BYTES`] or
//! [`BARRIER_INTERVAL`]. A job runs in *rounds*: each round plans the whole
//! chunk windows that are not acknowledged yet, so a rerun after any
//! interruption sends only what is missing, and a round after a stream
//! failure sends again only what that stream had not had acknowledged. A
//! stream that resets, or makes no progress for `--stall-timeout`,
//! reconnects by itself with exponential back-off and jitter while the
//! others go on; after `--retry-for` without success the job stops,
//! resumable. A WELCOME from a new receiver instance (it restarted from its
//! journal) replaces the acknowledged set, so anything acknowledged before
//! but not journaled there is sent again.
//!
//! A send disk is a job context on the shared engine
//! ([`crate::runtime`]) whose target is a sink. This file is its options,
//! the state its streams share and the one-disk entry point; `disk.rs` is
//! the disk's coordinator and its rounds; `link.rs` dials and re-dials a
//! stream's connection and classifies its failures; `sender_loop.rs` is the
//! sender threads and `sender.rs` what they do on a stream (frames,
//! barriers, replies); `delta.rs` and `delta_sender.rs` a delta pass's
//! comparison and digest requests; `verify.rs` is DONE and the read-back
//! check.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::compress::{self, Compressors, LinkState, Mode, Policy};
use crate::endpoint::open::open_source;
use crate::engine;
use crate::journal::RangeSet;
use crate::net::socket::SocketTuning;
use crate::pipeline::CopyError;
use crate::pipeline::control::JobControl;
use crate::pipeline::exits::Exits;
use crate::pipeline::run::{DstPlan, Pipeline, PipelineConfig, Requests, TICK};
use crate::pipeline::sink::{Sink, SinkChunk};
use crate::pipeline::stats::{Snapshot, Stats};
use crate::plan::windows::whole_windows;
use crate::runtime::Engine;
use crate::wire::{
    self, ByteRange, DataHead, ErrorCode, Features, Frame, FrameDecoder, Hello, HelloFlags,
    ImageDigest,
};

use super::stream::{
    Dialer, Stream, StreamError, printable, read_frame, refused, unexpected, write_frame,
};
use crate::net::socket::TuningReport;
use crate::sync::lock;

mod delta;
mod delta_sender;
mod disk;
mod error;
pub mod hooks;
mod incremental;
mod link;
mod options;
pub mod pass;
mod run;
mod sender;
mod sender_loop;
mod verify;

pub(crate) use disk::run_disk;
pub use error::SendError;
pub use hooks::TestHooks;
pub use options::{SendOptions, SendReport};
pub use pass::{ChangedSource, PassRequest, SyncId};
pub use run::{run, run_on, warn_plaintext};

use link::connect_first;
use sender_loop::sender_thread;

/// A stream asks for a durability barrier after this many bytes …
const BARRIER_BYTES: u64 = 64 << 20;
/// … or this long after its first unacknowledged frame.
const BARRIER_INTERVAL: Duration = Duration::from_millis(1000);
/// Barriers a stream may have unanswered before it waits for the oldest.
const MAX_OUTSTANDING_BARRIERS: usize = 4;

/// Bytes per chunk (`--chunk-size`): the unit read, hashed, compressed and
/// framed. With [`REQUESTS_NEAR`] and 4 connections, 4 MiB of buffers are in
/// flight, which stay in the cores' L2 caches from the read to the socket;
/// 2 MiB chunks (32 MiB in flight) cost the receiver a quarter more CPU and
/// every image 10–25 % more time
/// (docs/bench/history.md#queue-depth-and-working-set-session-4).
pub const CHUNK_BYTES_DEFAULT: u32 = 512 << 10;
/// Requests in flight per source connection when the source is on this
/// host (see [`crate::pipeline::run::Requests::Auto`]).
pub const REQUESTS_NEAR: u32 = 2;
/// Requests in flight per connection to a source across a network (8 MiB
/// per connection), and the most a slow source on this host grows to.
pub const REQUESTS_FAR: u32 = 16;

/// A stream with nothing to send looks at what the receiver sent (and
/// whether a barrier or a keepalive is due) this often.
const IDLE_SERVICE: Duration = Duration::from_millis(50);

/// Longest a sender with nothing to send stays parked before it looks at
/// its connection and the job again (an abort is seen within this).
const PARK_MAX: Duration = Duration::from_millis(5);
/// An idle stream sends a PING this often (the receiver ends streams
/// silent for minutes).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Reconnect back-off: first delay and cap (each try waits a random time
/// between half the delay and the delay; the delay doubles).
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Rounds in a row that make no progress before the job gives up.
const MAX_STUCK_ROUNDS: u32 = 5;

/// What the receiver has said is durable, and which receiver instance
/// said it.
#[derive(Debug, Default)]
struct Acked {
    ranges: RangeSet,
    instance: Option<u64>,
}

/// State every stream of the job shares, across rounds.
struct JobShared {
    acked: Mutex<Acked>,
    /// Data ranges sent at least once in this run.
    sent: Mutex<RangeSet>,
    bytes_resent: AtomicU64,
    bytes_on_wire: AtomicU64,
    reconnects: AtomicU64,
    /// DATA frames sent (for the test hook).
    data_frames: AtomicU64,
    /// A delta pass: bytes of the blocks that differed, and the bytes of
    /// them sent as ZERO.
    bytes_changed: AtomicU64,
    delta_zeroed_bytes: AtomicU64,
    /// The stall watchdog's view of each stream's current connection.
    watches: Mutex<Vec<Option<Arc<Watch>>>>,
    /// An incremental pass's changed extents (`None`: a full or delta
    /// pass, which covers the whole disk).
    pass: Option<Mutex<crate::plan::pass_work::PassWork>>,
    /// Ranges WELCOMEs asked to be sent too, not yet added to `pass`.
    replan: Mutex<Vec<(u64, u64)>>,
    /// The sync id the receiver's last WELCOME named: what it records
    /// when this job completes (for a target already complete, the id it
    /// recorded then).
    welcome_sync_id: Mutex<Option<SyncId>>,
}

impl JobShared {
    /// A WELCOME: from a new receiver instance, its list replaces what we
    /// believed; from the same one, it can only add.
    fn apply_welcome(&self, instance: u64, durable: &[ByteRange]) {
        let mut a = lock(&self.acked);
        if a.instance != Some(instance) {
            if a.instance.is_some() {
                info!(
                    "the receiver started the job again from its journal: {} bytes durable there",
                    durable.iter().map(|r| r.len_bytes).sum::<u64>()
                );
            }
            a.ranges = RangeSet::new();
            a.instance = Some(instance);
        }
        for r in durable {
            a.ranges.insert(r.offset, r.len_bytes);
        }
    }

    /// An ACK on a connection to `instance`; false if that instance is no
    /// longer current (its acknowledgements do not count).
    fn apply_ack(&self, instance: u64, ranges: &[ByteRange]) -> bool {
        let mut a = lock(&self.acked);
        if a.instance != Some(instance) {
            return false;
        }
        for r in ranges {
            a.ranges.insert(r.offset, r.len_bytes);
        }
        true
    }

    fn missing(&self, size_bytes: u64) -> Vec<(u64, u64)> {
        lock(&self.acked).ranges.missing(size_bytes)
    }

    fn covered(&self) -> u64 {
        lock(&self.acked).ranges.covered_bytes()
    }
}

/// How to (re)open stream `i`.
struct Connector {
    dialer: Dialer,
    hello: Hello,
    /// This run's sync id (random, never all-zero).
    sync_id: SyncId,
    /// An incremental pass's PLAN, sent right after HELLO on every
    /// stream: its changed ranges when the run began.
    plan: Option<Frame>,
    stall_timeout: Duration,
    retry_for: Duration,
    job: Arc<JobShared>,
}

/// One connected stream.
struct Conn {
    stream: Stream,
    dec: FrameDecoder,
    features: Features,
    /// The receiver instance this connection talks to.
    instance: u64,
    report: TuningReport,
    /// DATA payload bytes and frames on this connection (DONE says them).
    payload_bytes: u64,
    frames: u64,
    next_seq: u64,
    /// Barriers sent and not acknowledged: (seq, when).
    outstanding: VecDeque<(u64, Instant)>,
    /// Bytes written since the last barrier, and when the first was.
    unbarriered_bytes: u64,
    unbarriered_since: Option<Instant>,
    last_write: Instant,
    watch: Arc<Watch>,
    /// A delta pass: digest requests whose corrections are not all sent
    /// (no barrier goes out while there are any), the replies received
    /// and not handled yet, and the bytes compared since the last barrier.
    digests_open: usize,
    digests: VecDeque<delta_sender::DigestsReply>,
    unbarriered_compared_bytes: u64,
}

/// What the stall watchdog knows of one connection. A socket timeout alone
/// cannot see a stall: a blocked write that the kernel lets through 64 KiB
/// at a time returns a short count before the timeout and starts over.
/// So each blocking write or read marks the connection busy, and the
/// round's control loop ([`Watch::check`]) cuts a connection that has been
/// busy for `--stall-timeout` without the peer acknowledging a byte.
struct Watch {
    /// A clone of the connection's socket, to shut it down.
    sock: std::net::TcpStream,
    /// Milliseconds since `epoch` when the current blocking call began, or
    /// when the peer last acknowledged bytes during it; 0 when idle.
    busy_since_ms: AtomicU64,
    /// `tcpi_bytes_acked` at the last check (a change between two checks
    /// is progress).
    acked: AtomicU64,
    epoch: Instant,
}

/// Why a connection ended.
enum Broken {
    /// Worth reconnecting.
    Transient(String),
    /// The job cannot go on.
    Fatal(CopyError),
}

/// The HELLO flags `opts` ask for.
fn hello_flags(opts: &SendOptions) -> HelloFlags {
    let mut bits = 0;
    if opts.restart {
        bits |= HelloFlags::RESTART.0;
    }
    if opts.overwrite {
        bits |= HelloFlags::OVERWRITE.0;
    }
    HelloFlags(bits)
}

fn fail_msg(e: impl std::fmt::Display) -> CopyError {
    CopyError::TargetWrite(format!("(replication): {e}"))
}

impl JobShared {
    fn new(streams: usize, pass: Option<crate::plan::pass_work::PassWork>) -> Self {
        JobShared {
            pass: pass.map(Mutex::new),
            replan: Mutex::new(Vec::new()),
            welcome_sync_id: Mutex::new(None),
            acked: Mutex::new(Acked::default()),
            sent: Mutex::new(RangeSet::new()),
            bytes_resent: AtomicU64::new(0),
            bytes_on_wire: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            data_frames: AtomicU64::new(0),
            bytes_changed: AtomicU64::new(0),
            delta_zeroed_bytes: AtomicU64::new(0),
            watches: Mutex::new(vec![None; streams]),
        }
    }
}

impl Connector {
    /// How to dial the streams of a new run of `opts` (a fresh job id).
    fn new(
        dialer: Dialer,
        opts: &SendOptions,
        size_bytes: u64,
        source_identity: String,
        job: &Arc<JobShared>,
    ) -> Self {
        let mut job_id = [0u8; 16];
        super::random_bytes(&mut job_id);
        let sync_id = super::new_sync_id();
        let pass = incremental::PassHello::new(opts, job);
        Connector {
            dialer,
            sync_id,
            plan: pass.plan,
            hello: Hello {
                job_id,
                size_bytes,
                chunk_size_bytes: opts.chunk_bytes,
                features: Features(
                    Features::LZ4.0
                        | Features::ZSTD.0
                        | Features::BLAKE3.0
                        | Features::RESUME.0
                        | Features::XXH3.0,
                ),
                stream_index: 0,
                stream_count: opts.streams as u16,
                flags: hello_flags(opts),
                target: opts.target.clone(),
                source_identity,
                mode: pass.mode,
                sync_id,
                base_sync_id: pass.base_sync_id,
                plan_digest: pass.plan_digest,
                change_id: opts.change_id.clone().unwrap_or_default(),
            },
            stall_timeout: opts.stall_timeout,
            retry_for: opts.retry_for,
            job: Arc::clone(job),
        }
    }
}

/// Without the receiver's support for a codec, fall back to what it has.
fn allowed_mode(mode: Mode, features: Features) -> Mode {
    match mode {
        Mode::Lz4 if !features.contains(Features::LZ4) => Mode::None,
        Mode::Zstd(_) if !features.contains(Features::ZSTD) => Mode::None,
        m => m,
    }
}

/// Bytes in flight at the start of an interval for it to say something
/// about the link's drain rate.
const BACKLOG_MIN_BYTES: u64 = 64 << 10;

struct SenderCtx {
    index: usize,
    sink: Arc<Sink>,
    shared: Arc<crate::pipeline::Shared>,
    image: Arc<Mutex<ImageDigest>>,
    /// The job's control: its rate budget, shared by every stream of
    /// every disk of the job, is charged with the bytes each frame puts
    /// on the wire.
    control: Arc<JobControl>,
    job: Arc<JobShared>,
    connector: Arc<Connector>,
    mode: Mode,
    chunk_bytes: u32,
    verify: bool,
    cores_per_stream: f64,
    rate_per_stream: Option<f64>,
    /// The receiver is on this host (a loopback address): compressing
    /// saves no bandwidth there and takes CPU from the receiver, so `auto`
    /// does not treat a slow drain as a slow link.
    loopback: bool,
    /// Faults to inject (tests only).
    test_hooks: TestHooks,
    /// A delta pass: compare block digests before sending.
    delta: Option<delta_sender::DeltaCtx>,
}

struct StreamSender {
    policy: Policy,
    comps: Compressors,
    out: Vec<u8>,
    scratch: Vec<u8>,
    /// Observed drain rate of this stream (EWMA), bytes/s.
    link_bytes_per_s: Option<f64>,
    /// (when, bytes acked, bytes written) at the previous frame.
    last_sample: Option<(Instant, u64, u64)>,
    /// Frame bytes written into this stream.
    written_bytes: u64,
}

use std::io::Write;
