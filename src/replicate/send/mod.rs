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
//! This file is the job and its rounds; `link.rs` dials and re-dials a
//! stream's connection and classifies its failures; `sender.rs` is the
//! sender threads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::compress::{self, Compressors, LinkState, Mode, Policy};
use crate::endpoint::open::open_source;
use crate::engine::{self, EngineKind};
use crate::journal::RangeSet;
use crate::net::rate::RateLimiter;
use crate::net::socket::SocketTuning;
use crate::pipeline::CopyError;
use crate::pipeline::control::JobControl;
use crate::pipeline::exits::Exits;
use crate::pipeline::run::{DstPlan, Pipeline, PipelineConfig, Requests, TICK};
use crate::pipeline::sink::{Sink, SinkChunk};
use crate::pipeline::stats::{Snapshot, Stats};
use crate::plan::windows::whole_windows;
use crate::runtime::{Engine, EngineOptions};
use crate::wire::{
    self, ByteRange, DataHead, ErrorCode, Features, Frame, FrameDecoder, Hello, HelloFlags,
    ImageDigest,
};

use super::stream::{
    Dialer, Stream, StreamError, printable, read_frame, refused, unexpected, write_frame,
};
use crate::net::socket::TuningReport;
use crate::sync::lock;

mod hooks;
mod link;
mod sender;

use link::connect_first;
use sender::sender_thread;

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
/// every image 10–25 % more time (docs/benchmarks.md, session 4).
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
    /// Regions of the disk read side by side ([`crate::pipeline::lanes`]).
    pub lanes: u32,
    /// How long an NBD source may leave a connection attempt, the
    /// handshake or a request unanswered before the job fails.
    pub io_timeout: Duration,
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
            lanes: crate::pipeline::lanes::LANES_DEFAULT,
            io_timeout: crate::pipeline::run::IO_TIMEOUT_DEFAULT,
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
    pub compression: compress::Stats,
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
}

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
    /// The stall watchdog's view of each stream's current connection.
    watches: Mutex<Vec<Option<Arc<Watch>>>>,
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

/// Run a send to completion (every byte durable on the receiver) or to
/// its first error.
pub fn run(
    opts: &SendOptions,
    progress: &mut dyn FnMut(&Snapshot, Duration),
) -> Result<SendReport, CopyError> {
    let started = Instant::now();
    hooks::announce();
    match (&opts.tls_dir, opts.insecure_plaintext) {
        (None, false) => {
            return Err(CopyError::Usage(
                "--tls-dir is required (or --insecure-plaintext on both sides)".into(),
            ));
        }
        (Some(_), true) => {
            return Err(CopyError::Usage(
                "both --tls-dir and --insecure-plaintext given: choose one (TLS unless the network is trusted)"
                    .into(),
            ));
        }
        (None, true) => warn!(
            "--insecure-plaintext: sending without TLS; anyone on the network can read or alter \
             the disk on its way. Use --tls-dir unless the network is trusted"
        ),
        (Some(_), false) => {}
    }
    if opts.io_timeout.is_zero() {
        return Err(CopyError::Usage("--io-timeout must be more than 0".into()));
    }
    if opts.streams == 0 || opts.streams > u32::from(wire::MAX_STREAMS) {
        return Err(CopyError::Usage(format!(
            "--streams must be 1..={}",
            wire::MAX_STREAMS
        )));
    }
    Requests::check_flags(opts.connections, opts.requests, opts.lanes)?;
    // This job's own engine, for now (send jobs on a shared engine come
    // next); the job runs on every worker or, from a server on this host,
    // half of them (see `Pipeline::start`).
    let runtime = Engine::start(&EngineOptions {
        threads: opts.threads,
        kind: opts.engine,
        ..EngineOptions::default()
    })?;
    let kind = runtime.kind();
    let control = Arc::new(JobControl::default());
    let tuning = SocketTuning::default();
    let dialer =
        Dialer::new(&opts.to, opts.tls_dir.as_deref(), tuning).map_err(CopyError::Usage)?;
    let mut source = open_source(
        &opts.source,
        opts.source_format,
        opts.connections,
        opts.io_timeout,
    )?;
    debug!(elapsed = ?started.elapsed(), "source open and mapped");
    let size_bytes = source.size_bytes;
    let identity = match &opts.source_id {
        Some(id) => id.clone(),
        None => super::source::identity(&mut source)?,
    };
    debug!(elapsed = ?started.elapsed(), %identity, "source identity");
    let mut job_id = [0u8; 16];
    super::random_bytes(&mut job_id);
    let job = Arc::new(JobShared {
        acked: Mutex::new(Acked::default()),
        sent: Mutex::new(RangeSet::new()),
        bytes_resent: AtomicU64::new(0),
        bytes_on_wire: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        data_frames: AtomicU64::new(0),
        watches: Mutex::new(vec![None; opts.streams as usize]),
    });
    let connector = Arc::new(Connector {
        dialer,
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
            source_identity: identity.clone(),
        },
        stall_timeout: opts.stall_timeout,
        retry_for: opts.retry_for,
        job: Arc::clone(&job),
    });

    let mut conns = connect_all(&connector, opts.streams as usize)?;
    debug!(elapsed = ?started.elapsed(), "streams connected");
    let congestion = conns[0].report.congestion.clone();
    if let Some(why) = &conns[0].report.congestion_fallback {
        tracing::info!("{why}");
    }
    let n_streams = conns.len();
    let loopback = connector.dialer.addr.ip().is_loopback();
    if loopback && matches!(opts.compress, Mode::Auto) && opts.rate_bytes_per_s.is_none() {
        info!("the receiver is on this host: --compress auto sends chunks raw");
    }
    // Every stream of a job gets the same answer; stream 0's decides.
    let run_digest = crate::wire::ChunkDigest::for_features(conns[0].features);
    let resumed_bytes = job.covered();
    let resumed = resumed_bytes > 0;
    let data_bytes = source.extents.data_bytes();
    info!(
        source = %source.display,
        to = %opts.to,
        target = %opts.target,
        size_bytes,
        data_bytes,
        durable_on_receiver = resumed_bytes,
        streams = n_streams,
        congestion = %congestion,
        chunk_digest = run_digest.name(),
        engine = %kind,
        "send starting"
    );

    let image = Arc::new(Mutex::new(
        ImageDigest::new(size_bytes, opts.chunk_bytes)
            .map_err(|e| CopyError::Internal(e.to_string()))?,
    ));
    let limiter = Arc::new(match opts.rate_bytes_per_s {
        Some(r) => RateLimiter::with_rate(r),
        None => RateLimiter::unlimited(),
    });
    let cpus = engine::pin::online_cpus().max(1) as f64;
    let display = source.display.clone();
    let mut totals = Snapshot::default();
    let mut comp_stats = compress::Stats::default();
    let mut rounds = 0u32;
    let mut stuck = 0u32;
    // Data the receiver holds already (whole windows of it) is skipped.
    let bytes_resumed_skipped = data_bytes
        - source.extents.data_bytes_within(&whole_windows(
            &job.missing(size_bytes),
            size_bytes,
            opts.chunk_bytes,
        ));
    let mut source = Some(source);
    let mut last_report = Instant::now();
    progress(&totals, started.elapsed());
    loop {
        let missing = job.missing(size_bytes);
        if missing.is_empty() {
            break;
        }
        let spans = whole_windows(&missing, size_bytes, opts.chunk_bytes);
        let src = match source.take() {
            Some(s) => s,
            None => open_source(
                &opts.source,
                opts.source_format,
                opts.connections,
                opts.io_timeout,
            )?,
        };
        let covered_before = job.covered();
        rounds += 1;
        if rounds > 1 {
            info!(
                round = rounds,
                missing_bytes = missing.iter().map(|r| r.1).sum::<u64>(),
                "sending what is not acknowledged yet"
            );
        }
        let cfg = PipelineConfig {
            threads: opts.threads,
            connections: opts.connections.max(opts.streams),
            requests: Requests::from_flag(opts.requests, REQUESTS_NEAR, REQUESTS_FAR),
            chunk_bytes: opts.chunk_bytes,
            spans: (covered_before > 0).then_some(spans),
            read_retries: crate::pipeline::retry::READ_RETRIES_DEFAULT,
            lanes: opts.lanes,
            io_timeout: opts.io_timeout,
        };
        let child = src.child;
        let mut pipe = Pipeline::start(
            &runtime,
            Arc::clone(&control),
            &cfg,
            src.access,
            src.extents,
            size_bytes,
            DstPlan::Sink {
                window_digests: opts.verify,
                run_digest,
            },
        )?;
        let sink = pipe.sink().expect("sink pipeline");
        let shared = Arc::clone(pipe.shared());
        let mut senders = Vec::new();
        let sender_exits = Exits::new(None);
        for (i, conn) in std::mem::take(&mut conns).into_iter().enumerate() {
            let ctx = SenderCtx {
                index: i,
                sink: Arc::clone(&sink),
                shared: Arc::clone(&shared),
                image: Arc::clone(&image),
                limiter: Arc::clone(&limiter),
                job: Arc::clone(&job),
                connector: Arc::clone(&connector),
                mode: allowed_mode(opts.compress, conn.features),
                chunk_bytes: opts.chunk_bytes,
                verify: opts.verify,
                // Compression shares the cores with reading, digests and
                // TLS: count on half of each stream's share.
                cores_per_stream: (cpus / n_streams as f64 / 2.0).max(0.1),
                rate_per_stream: opts.rate_bytes_per_s.map(|r| r as f64 / n_streams as f64),
                loopback,
            };
            let exit = sender_exits.enter();
            let h = std::thread::Builder::new()
                .name(format!("sender-{i}"))
                .spawn(move || {
                    let _exit = exit;
                    sender_thread(ctx, conn)
                })
                .map_err(|e| CopyError::Internal(format!("spawning sender {i}: {e}")))?;
            senders.push(h);
        }
        // The pipeline's last worker tells the sink that production ended
        // (see `Pipeline::start`).
        while !sender_exits.wait_all(TICK) {
            pipe.tick();
            for (i, w) in lock(&job.watches).iter().enumerate() {
                if let Some(w) = w {
                    w.check(opts.stall_timeout, i);
                }
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                progress(&add(&totals, &shared.stats.snapshot()), started.elapsed());
                last_report = Instant::now();
            }
        }
        sink.set_producers_done();
        for h in senders {
            match h.join() {
                Ok(Some((conn, stats))) => {
                    comp_stats.add(&stats);
                    conns.push(conn);
                }
                Ok(None) => {}
                Err(_) => shared.fail(CopyError::Internal("a sender thread panicked".into())),
            }
        }
        let joined = pipe.join();
        let snap = joined.result?;
        drop(joined.keep);
        drop(child);
        if conns.len() != n_streams {
            return Err(CopyError::Internal(
                "a stream ended without its final acknowledgement".into(),
            ));
        }
        totals = add(&totals, &snap);
        if job.covered() <= covered_before {
            stuck += 1;
            if stuck >= MAX_STUCK_ROUNDS {
                return Err(CopyError::Interrupted(format!(
                    "{stuck} rounds in a row made no progress"
                )));
            }
        } else {
            stuck = 0;
        }
    }

    // Every stream is durable: say DONE (the receiver completes the job).
    say_done(&mut conns)?;
    // Verify (the receiver allows it only after DONE): it reads the target back.
    let image_digest = if opts.verify {
        Some(verify_target(opts, &image, &mut source, &mut conns[0])?)
    } else {
        None
    };
    let verified = image_digest.is_some();
    drop(source);
    for c in &mut conns {
        c.stream.close();
    }
    let on_wire = job.bytes_on_wire.load(Ordering::Relaxed);
    progress(&totals, started.elapsed());
    Ok(SendReport {
        source: display,
        target: opts.target.clone(),
        size_bytes,
        bytes_planned: totals.bytes_planned,
        bytes_read: totals.bytes_read,
        bytes_written: totals.bytes_written,
        bytes_zeroed: totals.bytes_zeroed,
        bytes_on_wire: on_wire,
        compression_ratio: if comp_stats.payload_bytes > 0 {
            comp_stats.raw_bytes as f64 / comp_stats.payload_bytes as f64
        } else {
            1.0
        },
        elapsed_s: started.elapsed().as_secs_f64(),
        engine: kind,
        streams: n_streams,
        congestion_control: congestion,
        image_digest,
        verified,
        compression: comp_stats,
        bytes_resumed_skipped,
        bytes_resent: job.bytes_resent.load(Ordering::Relaxed),
        resumed,
        reconnects: job.reconnects.load(Ordering::Relaxed),
        rounds,
        source_identity: identity,
    })
}

/// Stream 0 first (it creates or resumes the job on the receiver), then
/// the others at once. A receiver still busy with this target (the
/// previous run's connections not yet closed) is waited for.
fn connect_all(connector: &Connector, streams: usize) -> Result<Vec<Conn>, CopyError> {
    let first = connect_first(connector, 0)?;
    let rest: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..streams)
            .map(|i| scope.spawn(move || connect_first(connector, i)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CopyError::Internal("a dial thread panicked".into())))
            })
            .collect()
    });
    let mut conns = vec![first];
    for r in rest {
        conns.push(r?);
    }
    Ok(conns)
}

/// Ask the receiver, on `c`, to read the whole target back and compare its
/// digest with the source's (windows the receiver already held before this
/// run are read from the source first). The digest, in hex, if they match.
fn verify_target(
    opts: &SendOptions,
    image: &Mutex<ImageDigest>,
    source: &mut Option<crate::pipeline::open::Source>,
    c: &mut Conn,
) -> Result<String, CopyError> {
    let mut img = lock(image);
    if img.missing_windows() > 0 {
        let mut src = match source.take() {
            Some(s) => s,
            None => open_source(&opts.source, opts.source_format, 1, opts.io_timeout)?,
        };
        let read = super::source::digest_missing_windows(&mut src, &mut img)?;
        debug!(read, "digested the windows the receiver already had");
    }
    let want = img
        .finish()
        .map_err(|e| CopyError::Internal(e.to_string()))?;
    drop(img);
    let mut scratch = Vec::new();
    write_frame(
        &mut c.stream,
        &Frame::VerifyRequest {
            window_bytes: opts.chunk_bytes,
        },
        &mut scratch,
    )
    .map_err(fail_msg)?;
    c.stream.flush().map_err(|e| fail_msg(StreamError::Io(e)))?;
    // Reading a whole disk back takes a while: no stall timeout here.
    let _ = c.stream.set_read_timeout(None);
    let answer = loop {
        match read_frame(&mut c.stream, &mut c.dec).map_err(fail_msg)? {
            Frame::Ack(_) | Frame::Pong { .. } => continue,
            f => break f,
        }
    };
    match answer {
        Frame::VerifyResult { digest, bytes_read } => {
            if digest != want {
                return Err(CopyError::TargetWrite(format!(
                    "(verify): the target's digest {} differs from the source's {} after reading {bytes_read} bytes",
                    hex(&digest),
                    hex(&want)
                )));
            }
            Ok(hex(&want))
        }
        other => Err(fail_msg(unexpected(other))),
    }
}

/// Say DONE on every stream and wait for the receiver to accept it; the
/// streams stay open (for the verify pass).
fn say_done(conns: &mut [Conn]) -> Result<(), CopyError> {
    let mut scratch = Vec::new();
    for c in conns {
        let done = Frame::Done {
            total_bytes_sent: c.payload_bytes,
            frames: c.frames,
        };
        let s = &mut c.stream;
        write_frame(s, &done, &mut scratch).map_err(fail_msg)?;
        // A PING after DONE: its PONG proves the receiver accepted DONE
        // (frames are handled in order; a refusal would be an ERROR).
        write_frame(s, &Frame::Ping { nonce: 0xD0_4E }, &mut scratch).map_err(fail_msg)?;
        s.flush().map_err(|e| fail_msg(StreamError::Io(e)))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        loop {
            match read_frame(s, &mut c.dec) {
                Ok(Frame::Pong { .. }) | Err(StreamError::Closed) => break,
                Ok(Frame::Ack(_)) => continue,
                Ok(Frame::Error(e)) => {
                    return Err(fail_msg(format!(
                        "the receiver refused DONE: {:?}: {}",
                        e.code,
                        printable(&e.message)
                    )));
                }
                Ok(other) => return Err(fail_msg(unexpected(other))),
                Err(e) => return Err(fail_msg(format!("no answer to DONE: {e}"))),
            }
        }
    }
    Ok(())
}

fn add(a: &Snapshot, b: &Snapshot) -> Snapshot {
    Snapshot {
        bytes_planned: a.bytes_planned + b.bytes_planned,
        planning_done: b.planning_done,
        bytes_done: a.bytes_done + b.bytes_done,
        bytes_read: a.bytes_read + b.bytes_read,
        bytes_written: a.bytes_written + b.bytes_written,
        bytes_zeroed: a.bytes_zeroed + b.bytes_zeroed,
        read_retries: a.read_retries + b.read_retries,
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

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes in flight at the start of an interval for it to say something
/// about the link's drain rate.
const BACKLOG_MIN_BYTES: u64 = 64 << 10;

struct SenderCtx {
    index: usize,
    sink: Arc<Sink>,
    shared: Arc<crate::pipeline::Shared>,
    image: Arc<Mutex<ImageDigest>>,
    limiter: Arc<RateLimiter>,
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
