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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::compress::{self, Compressors, LinkState, Mode, Policy};
use crate::engine::{self, EngineKind};
use crate::journal::RangeSet;
use crate::net::rate::RateLimiter;
use crate::net::socket::SocketTuning;
use crate::pipeline::CopyError;
use crate::pipeline::exits::Exits;
use crate::pipeline::open::open_source;
use crate::pipeline::plan::whole_windows;
use crate::pipeline::run::{DstPlan, Pipeline, PipelineConfig, Requests, TICK};
use crate::pipeline::sink::{Sink, SinkChunk};
use crate::pipeline::stats::{Snapshot, Stats};
use crate::wire::{
    self, ByteRange, DataHead, ErrorCode, Features, Frame, FrameDecoder, Hello, HelloFlags,
    ImageDigest,
};

use super::stream::{Dialer, Stream, StreamError, read_frame, unexpected, write_frame};
use crate::net::socket::TuningReport;

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
    /// A stream with no progress for this long is reconnected.
    pub stall_timeout: Duration,
    /// How long to keep reconnecting before stopping (resumable).
    pub retry_for: Duration,
    /// Overrides the computed source identity (e.g. a snapshot id).
    pub source_id: Option<String>,
}

impl SendOptions {
    /// Options with the command line's defaults.
    pub fn new(source: &str, to: &str, target: &str) -> Self {
        SendOptions {
            source: source.to_string(),
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
            stall_timeout: Duration::from_secs(30),
            retry_for: Duration::from_secs(600),
            source_id: None,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

impl Watch {
    fn new(sock: std::net::TcpStream) -> Watch {
        Watch {
            sock,
            busy_since_ms: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Runs a blocking call with the connection marked busy (two atomic
    /// stores: this is on the path of every frame).
    fn busy<T>(&self, f: impl FnOnce() -> T) -> T {
        self.busy_since_ms.store(self.now_ms(), Ordering::Relaxed);
        let out = f();
        self.busy_since_ms.store(0, Ordering::Relaxed);
        out
    }

    /// Cuts the connection if it has been busy for `stall` with no byte
    /// acknowledged by the peer; true if it did.
    fn check(&self, stall: Duration, stream: usize) -> bool {
        let since = self.busy_since_ms.load(Ordering::Relaxed);
        if since == 0 {
            return false;
        }
        if let Ok(a) = crate::engine::tcpinfo::bytes_acked(&self.sock)
            && a != self.acked.swap(a, Ordering::Relaxed)
        {
            // Progress: the peer took bytes. Restart the clock (unless the
            // call ended meanwhile).
            let _ = self.busy_since_ms.compare_exchange(
                since,
                self.now_ms(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return false;
        }
        let idle_ms = self.now_ms().saturating_sub(since);
        if idle_ms < stall.as_millis() as u64 {
            return false;
        }
        warn!(
            stream,
            "no progress for {:.1} s (--stall-timeout): cutting the connection",
            idle_ms as f64 / 1000.0
        );
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.busy_since_ms.store(0, Ordering::Relaxed);
        true
    }
}

/// Why a connection ended.
enum Broken {
    /// Worth reconnecting.
    Transient(String),
    /// The job cannot go on.
    Fatal(CopyError),
}

fn fatal_code(code: ErrorCode) -> bool {
    !matches!(
        code,
        ErrorCode::Busy | ErrorCode::Cancelled | ErrorCode::Timeout
    )
}

/// Classifies a stream error: network trouble is transient; a refusal
/// with a code that will not change, a certificate problem or a protocol
/// bug is fatal.
fn classify(e: StreamError) -> Broken {
    use crate::net::tls::TlsError as T;
    match e {
        StreamError::Refused { code, message } if fatal_code(code) => {
            Broken::Fatal(refusal_error(code, &message))
        }
        StreamError::Refused { code, message } => {
            Broken::Transient(format!("the receiver said {code:?}: {message}"))
        }
        StreamError::Tls(t @ (T::Timeout { .. } | T::Closed { .. } | T::Io(_) | T::Tls(_))) => {
            Broken::Transient(t.to_string())
        }
        StreamError::Tls(t) => Broken::Fatal(fail_msg(t)),
        StreamError::Wire(w) => Broken::Fatal(CopyError::Internal(w.to_string())),
        StreamError::Unexpected(u) => Broken::Fatal(fail_msg(format!("unexpected frame: {u}"))),
        other => Broken::Transient(other.to_string()),
    }
}

fn refusal_error(code: ErrorCode, message: &str) -> CopyError {
    CopyError::TargetWrite(format!(
        "(replication): the receiver refused: {code:?}: {message}"
    ))
}

fn fail_msg(e: impl std::fmt::Display) -> CopyError {
    CopyError::TargetWrite(format!("(replication): {e}"))
}

impl Connector {
    fn hello_for(&self, i: usize) -> Hello {
        Hello {
            stream_index: i as u16,
            ..self.hello.clone()
        }
    }

    /// Dial, HELLO, WELCOME; the WELCOME's durable list is applied.
    fn connect(&self, i: usize) -> Result<Conn, StreamError> {
        let (mut stream, report) = self.dialer.dial()?;
        if let Stream::Tls(s) = &mut stream {
            s.conn
                .set_buffer_limit(Some(super::stream::TLS_BUFFER_LIMIT_BYTES));
        }
        let mut scratch = Vec::new();
        write_frame(&mut stream, &Frame::Hello(self.hello_for(i)), &mut scratch)?;
        stream.flush()?;
        let mut dec = FrameDecoder::new();
        let _ = stream.set_read_timeout(Some(self.stall_timeout));
        let w = match read_frame(&mut stream, &mut dec)? {
            Frame::Welcome(w) => w,
            other => return Err(unexpected(other)),
        };
        if !w.features.contains(Features::BLAKE3) {
            return Err(StreamError::Unexpected(
                "the receiver does not check BLAKE3 digests".into(),
            ));
        }
        // A write or read blocked this long is a stalled stream.
        stream.tcp().set_write_timeout(Some(self.stall_timeout))?;
        stream.tcp().set_read_timeout(Some(self.stall_timeout))?;
        self.job.apply_welcome(w.instance, &w.durable);
        let watch = Arc::new(Watch::new(stream.tcp().try_clone()?));
        lock(&self.job.watches)[i] = Some(Arc::clone(&watch));
        Ok(Conn {
            watch,
            stream,
            dec,
            features: w.features,
            instance: w.instance,
            report,
            payload_bytes: 0,
            frames: 0,
            next_seq: 1,
            outstanding: VecDeque::new(),
            unbarriered_bytes: 0,
            unbarriered_since: None,
            last_write: Instant::now(),
        })
    }

    /// Connects with back-off until it works, a fatal refusal, `abort`,
    /// or `--retry-for` after `since`.
    fn reconnect(
        &self,
        i: usize,
        since: Instant,
        abort: &dyn Fn() -> bool,
    ) -> Result<Conn, CopyError> {
        let mut delay = BACKOFF_FIRST;
        loop {
            if abort() {
                return Err(CopyError::Internal("aborted".into()));
            }
            match self.connect(i) {
                Ok(c) => {
                    info!(stream = i, "stream reconnected");
                    return Ok(c);
                }
                Err(e) => match classify(e) {
                    Broken::Fatal(e) => return Err(e),
                    Broken::Transient(why) => {
                        if since.elapsed() >= self.retry_for {
                            return Err(CopyError::Interrupted(format!(
                                "stream {i} could not reconnect for {:.0} s (--retry-for): {why}",
                                self.retry_for.as_secs_f64()
                            )));
                        }
                        let wait = jitter(delay);
                        debug!(stream = i, "reconnect failed: {why}; next try in {wait:?}");
                        let until = Instant::now() + wait;
                        while Instant::now() < until && !abort() {
                            std::thread::sleep(TICK);
                        }
                        delay = (delay * 2).min(BACKOFF_MAX);
                    }
                },
            }
        }
    }
}

/// A random duration in `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    super::random_bytes(&mut b);
    let frac = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    d.mul_f64(0.5 + 0.5 * frac)
}

/// Test hook: `DISKFERRY_TEST_CORRUPT_CHUNK=N` flips a bit in the N-th
/// DATA payload (counted from 1) after its digest was taken and before it
/// is sealed, as memory corruption would. The receiver's digest check
/// must catch it.
fn corrupt_chunk_at() -> Option<u64> {
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    *AT.get_or_init(|| {
        std::env::var("DISKFERRY_TEST_CORRUPT_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// Run a send to completion (every byte durable on the receiver) or to
/// its first error.
pub fn run(
    opts: &SendOptions,
    progress: &mut dyn FnMut(&Snapshot, Duration),
) -> Result<SendReport, CopyError> {
    let started = Instant::now();
    if opts.tls_dir.is_none() && !opts.insecure_plaintext {
        return Err(CopyError::Usage(
            "--tls-dir is required (or --insecure-plaintext on both sides)".into(),
        ));
    }
    if opts.streams == 0 || opts.streams > u32::from(wire::MAX_STREAMS) {
        return Err(CopyError::Usage(format!(
            "--streams must be 1..={}",
            wire::MAX_STREAMS
        )));
    }
    Requests::check_flags(opts.connections, opts.requests)?;
    let (kind, why) = engine::choose(opts.engine).map_err(CopyError::Engine)?;
    if let Some(why) = why {
        tracing::warn!("{why}");
    }
    let tuning = SocketTuning::default();
    let dialer =
        Dialer::new(&opts.to, opts.tls_dir.as_deref(), tuning).map_err(CopyError::Usage)?;
    let mut source = open_source(&opts.source, opts.connections)?;
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
            flags: HelloFlags(if opts.restart {
                HelloFlags::RESTART.0
            } else {
                0
            }),
            target: opts.target.clone(),
            source_identity: identity.clone(),
        },
        stall_timeout: opts.stall_timeout,
        retry_for: opts.retry_for,
        job: Arc::clone(&job),
    });

    // Stream 0 first (it creates or resumes the job on the receiver), then
    // the others at once. A receiver still busy with this target (the
    // previous run's connections not yet closed) is waited for.
    let first = connect_first(&connector, 0)?;
    debug!(elapsed = ?started.elapsed(), "stream 0 connected");
    let congestion = first.report.congestion.clone();
    if let Some(why) = &first.report.congestion_fallback {
        tracing::info!("{why}");
    }
    let rest: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..opts.streams as usize)
            .map(|i| {
                let c = &connector;
                scope.spawn(move || connect_first(c, i))
            })
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
            None => open_source(&opts.source, opts.connections)?,
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
            kind,
            spans: (covered_before > 0).then_some(spans),
            read_retries: crate::pipeline::retry::READ_RETRIES_DEFAULT,
        };
        let child = src.child;
        let mut pipe = Pipeline::start(
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

    // Verify: the receiver reads the target back.
    let mut image_digest = None;
    let mut verified = false;
    if opts.verify {
        let mut img = lock(&image);
        if img.missing_windows() > 0 {
            let mut src = match source.take() {
                Some(s) => s,
                None => open_source(&opts.source, 1)?,
            };
            let read = super::source::digest_missing_windows(&mut src, &mut img)?;
            debug!(read, "digested the windows the receiver already had");
        }
        let want = img
            .finish()
            .map_err(|e| CopyError::Internal(e.to_string()))?;
        drop(img);
        let c = &mut conns[0];
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
                verified = true;
                image_digest = Some(hex(&want));
            }
            other => return Err(fail_msg(unexpected(other))),
        }
    }
    drop(source);
    // Every stream is durable (and verified): say DONE and close.
    let mut scratch = Vec::new();
    for c in &mut conns {
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
                        e.code, e.message
                    )));
                }
                Ok(other) => return Err(fail_msg(unexpected(other))),
                Err(e) => return Err(fail_msg(format!("no answer to DONE: {e}"))),
            }
        }
        s.close();
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

/// The first connection of stream `i`: refusals and network errors fail at
/// once (a wrong address or certificate should not wait for minutes),
/// except a receiver that is busy with this target or shutting down.
fn connect_first(c: &Connector, i: usize) -> Result<Conn, CopyError> {
    let since = Instant::now();
    loop {
        match c.connect(i) {
            Ok(conn) => return Ok(conn),
            Err(StreamError::Refused { code, message })
                if !fatal_code(code) && since.elapsed() < c.retry_for =>
            {
                debug!(stream = i, "receiver busy ({code:?}: {message}); retrying");
                std::thread::sleep(jitter(Duration::from_millis(200)));
            }
            Err(StreamError::Refused { code, message }) => {
                return Err(refusal_error(code, &message));
            }
            Err(e) => return Err(fail_msg(e)),
        }
    }
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

/// One stream's sender for one round: takes lent windows from the sink
/// until the workers are done, then a final barrier. A broken connection
/// is reconnected (what it had not had acknowledged is left for the next
/// round); on a fatal error the job fails and the thread keeps handing
/// slots back so the workers can finish. Returns the connection, all of
/// its data acknowledged.
fn sender_thread(ctx: SenderCtx, conn: Conn) -> Option<(Conn, compress::Stats)> {
    let mut s = StreamSender {
        policy: Policy::new(ctx.mode),
        comps: Compressors::new(),
        out: Vec::with_capacity(ctx.chunk_bytes as usize + 4096),
        scratch: Vec::with_capacity(64),
        link_bytes_per_s: None,
        last_sample: None,
        written_bytes: 0,
    };
    let mut conn = Some(conn);
    let mut broken_since: Option<Instant> = None;
    let mut failed = false;
    let mut last_service = Instant::now();
    let abort = || ctx.shared.aborted();
    loop {
        if !failed && conn.is_none() {
            let since = *broken_since.get_or_insert_with(Instant::now);
            match ctx.connector.reconnect(ctx.index, since, &abort) {
                Ok(c) => {
                    conn = Some(c);
                    broken_since = None;
                    s.last_sample = None;
                }
                Err(e) => {
                    failed = true;
                    if !ctx.shared.aborted() {
                        ctx.shared.fail(e);
                    }
                }
            }
        }
        if let Some(c) = conn.as_mut()
            && !failed
            && let Err(b) = s.service(&ctx, c, false)
        {
            s.broken(&ctx, &mut conn, &mut failed, b);
        }
        let Some(chunk) = ctx.sink.pop() else {
            if ctx.sink.producers_done() && ctx.sink.is_empty() {
                break;
            }
            // Nothing to send: now and then read ACKs, send a barrier
            // that came due, keep an idle stream alive; otherwise park
            // until a worker hands over a chunk.
            if last_service.elapsed() >= IDLE_SERVICE {
                last_service = Instant::now();
                if let Some(c) = conn.as_mut()
                    && !failed
                    && let Err(b) = s.service(&ctx, c, true)
                {
                    s.broken(&ctx, &mut conn, &mut failed, b);
                }
            }
            ctx.sink.wait(PARK_MAX);
            continue;
        };
        let (worker, slot) = chunk.owner();
        if !failed && !ctx.shared.aborted() {
            match conn.as_mut() {
                Some(c) => {
                    if let Err(e) = s.send_chunk(&ctx, c, &chunk) {
                        let b = explain(e, c);
                        s.broken(&ctx, &mut conn, &mut failed, b);
                    }
                }
                None => {
                    // Reconnecting failed fatally; the job is failing.
                }
            }
        }
        drop(chunk);
        ctx.sink.release(worker, slot);
    }
    if failed || ctx.shared.aborted() {
        if let Some(mut c) = conn {
            c.stream.close();
        }
        return None;
    }
    // The round's end: everything this stream sent must be acknowledged.
    loop {
        let mut c = match conn.take() {
            Some(c) => c,
            None => {
                let since = *broken_since.get_or_insert_with(Instant::now);
                match ctx.connector.reconnect(ctx.index, since, &abort) {
                    Ok(c) => {
                        broken_since = None;
                        c
                    }
                    Err(e) => {
                        if !ctx.shared.aborted() {
                            ctx.shared.fail(e);
                        }
                        return None;
                    }
                }
            }
        };
        match s.final_barrier(&ctx, &mut c) {
            Ok(()) => return Some((c, *s.policy.stats())),
            Err(b) => {
                conn = Some(c);
                s.broken(&ctx, &mut conn, &mut failed, b);
                if failed {
                    return None;
                }
            }
        }
    }
}

/// After a write failed, the receiver may have said why: read it briefly.
fn explain(e: StreamError, c: &mut Conn) -> Broken {
    if matches!(e, StreamError::Io(_)) {
        let _ = c.stream.set_read_timeout(Some(Duration::from_millis(500)));
        if let Ok(Frame::Error(f)) = read_frame(&mut c.stream, &mut c.dec) {
            return classify(StreamError::Refused {
                code: f.code,
                message: f.message,
            });
        }
    }
    classify(e)
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

impl StreamSender {
    /// A connection broke: log, count, and leave it for reconnection (or
    /// fail the job).
    fn broken(&mut self, ctx: &SenderCtx, conn: &mut Option<Conn>, failed: &mut bool, b: Broken) {
        if let Some(mut c) = conn.take() {
            c.stream.close();
        }
        match b {
            Broken::Transient(why) => {
                ctx.job.reconnects.fetch_add(1, Ordering::Relaxed);
                warn!(
                    stream = ctx.index,
                    "stream lost: {why}; reconnecting (unacknowledged data will be sent again)"
                );
            }
            Broken::Fatal(e) => {
                *failed = true;
                ctx.shared.fail(match e {
                    CopyError::TargetWrite(m) => {
                        CopyError::TargetWrite(format!("(stream {}) {m}", ctx.index))
                    }
                    other => other,
                });
            }
        }
    }

    /// Reads what the receiver sent (ACKs, PONGs, an ERROR) without
    /// blocking, sends a barrier when one is due, keeps an `idle` stream
    /// alive, and notices a receiver that stopped answering.
    fn service(&mut self, ctx: &SenderCtx, c: &mut Conn, idle: bool) -> Result<(), Broken> {
        self.poll(ctx, c, false)?;
        let due = c.unbarriered_bytes >= BARRIER_BYTES
            || (c.unbarriered_bytes > 0
                && c.unbarriered_since
                    .is_some_and(|t| t.elapsed() >= BARRIER_INTERVAL));
        if due {
            self.barrier(c).map_err(classify)?;
        }
        while c.outstanding.len() > MAX_OUTSTANDING_BARRIERS {
            self.poll(ctx, c, true)?;
        }
        if let Some(&(seq, t)) = c.outstanding.front()
            && t.elapsed() > ctx.connector.stall_timeout
        {
            return Err(Broken::Transient(format!(
                "no acknowledgement of barrier {seq} for {:.1} s (--stall-timeout)",
                t.elapsed().as_secs_f64()
            )));
        }
        if idle && c.outstanding.is_empty() && c.last_write.elapsed() >= KEEPALIVE {
            write_frame(&mut c.stream, &Frame::Ping { nonce: 1 }, &mut self.scratch)
                .map_err(classify)?;
            c.stream.flush().map_err(|e| classify(e.into()))?;
            c.last_write = Instant::now();
        }
        Ok(())
    }

    fn barrier(&mut self, c: &mut Conn) -> Result<(), StreamError> {
        let seq = c.next_seq;
        c.next_seq += 1;
        let (stream, scratch) = (&mut c.stream, &mut self.scratch);
        c.watch.busy(|| -> Result<(), StreamError> {
            write_frame(stream, &Frame::Barrier { seq }, scratch)?;
            stream.flush()?;
            Ok(())
        })?;
        c.outstanding.push_back((seq, Instant::now()));
        c.unbarriered_bytes = 0;
        c.unbarriered_since = None;
        c.last_write = Instant::now();
        Ok(())
    }

    /// Handles frames from the receiver: those already buffered, and more
    /// if the socket has some; with `block`, waits (at most the stall
    /// timeout) until at least one frame was handled.
    fn poll(&mut self, ctx: &SenderCtx, c: &mut Conn, block: bool) -> Result<(), Broken> {
        let mut handled = false;
        loop {
            match c.dec.next_frame() {
                Ok(Some(frame)) => {
                    handle_reply(ctx, c, frame)?;
                    handled = true;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(classify(StreamError::Wire(e))),
            }
            let ready = (block && !handled)
                || plaintext_ready(&mut c.stream)
                || crate::engine::tcpinfo::bytes_readable(c.stream.tcp()).is_ok_and(|n| n > 0);
            if !ready {
                return Ok(());
            }
            let (stream, dec) = (&mut c.stream, &mut c.dec);
            let read = c.watch.busy(|| std::io::Read::read(stream, dec.buf_mut()));
            match read {
                Ok(0) => {
                    return Err(Broken::Transient(
                        "the receiver closed the connection".into(),
                    ));
                }
                Ok(n) => c.dec.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(classify(StreamError::Io(e))),
            }
        }
    }

    /// Barrier for everything sent, then wait until it is acknowledged.
    fn final_barrier(&mut self, ctx: &SenderCtx, c: &mut Conn) -> Result<(), Broken> {
        self.barrier(c).map_err(classify)?;
        while !c.outstanding.is_empty() {
            self.poll(ctx, c, true)?;
        }
        Ok(())
    }

    fn send_chunk(
        &mut self,
        ctx: &SenderCtx,
        c: &mut Conn,
        chunk: &SinkChunk,
    ) -> Result<(), StreamError> {
        match chunk {
            SinkChunk::Zero { offset, len, .. } => {
                self.zero(ctx, c, *offset, *len)?;
                if ctx.verify {
                    let mut img = lock(&ctx.image);
                    let w = u64::from(ctx.chunk_bytes);
                    for i in offset / w..(offset + len).div_ceil(w) {
                        img.zero_window(i)?;
                    }
                }
            }
            SinkChunk::Data {
                offset,
                lease,
                runs,
                window_digest,
                ..
            } => {
                let bytes = lease.bytes();
                for r in runs {
                    let at = offset + u64::from(r.rel);
                    if r.zero {
                        self.zero(ctx, c, at, u64::from(r.len))?;
                        continue;
                    }
                    let raw = &bytes[r.rel as usize..(r.rel + r.len) as usize];
                    self.data(ctx, c, at, raw, r.digest)?;
                }
                if let Some(d) = window_digest {
                    let i = offset / u64::from(ctx.chunk_bytes);
                    lock(&ctx.image).set_window(i, *d)?;
                }
            }
        }
        Ok(())
    }

    fn zero(
        &mut self,
        ctx: &SenderCtx,
        c: &mut Conn,
        offset: u64,
        len: u64,
    ) -> Result<(), StreamError> {
        let (stream, scratch) = (&mut c.stream, &mut self.scratch);
        let frame = Frame::Zero(ByteRange {
            offset,
            len_bytes: len,
        });
        let n = c.watch.busy(|| write_frame(stream, &frame, scratch))?;
        self.account(ctx, c, n as u64);
        Ok(())
    }

    fn data(
        &mut self,
        ctx: &SenderCtx,
        c: &mut Conn,
        offset: u64,
        raw: &[u8],
        digest: [u8; 32],
    ) -> Result<(), StreamError> {
        // Until a backlog shows the link's rate, the link counts as fast
        // (raw); a slow link shows itself after the first frame or two.
        let link = LinkState {
            link_bytes_per_s: ctx
                .rate_per_stream
                .or(self.link_bytes_per_s.filter(|_| !ctx.loopback)),
            cores_for_compression: ctx.cores_per_stream,
        };
        let choice = self.policy.choose(raw, &link);
        let mut codec = wire::Codec::None;
        let mut payload: &[u8] = raw;
        let frame_no = ctx.job.data_frames.fetch_add(1, Ordering::Relaxed) + 1;
        let corrupted;
        if corrupt_chunk_at() == Some(frame_no) {
            warn!(
                offset,
                "test hook: corrupting this chunk after its digest was taken"
            );
            let mut bad = raw.to_vec();
            bad[0] ^= 0x01;
            corrupted = bad;
            payload = &corrupted;
        } else if choice.codec != compress::Codec::None {
            let t = Instant::now();
            let ok = self
                .comps
                .compress(choice.codec, choice.level, raw, &mut self.out)
                .is_ok();
            let used = ok && !self.out.is_empty() && self.out.len() < raw.len();
            self.policy.record(
                if used {
                    choice.codec
                } else {
                    compress::Codec::None
                },
                choice.level,
                raw.len(),
                if used { self.out.len() } else { raw.len() },
                t.elapsed(),
            );
            if used {
                codec = match choice.codec {
                    compress::Codec::Lz4 => wire::Codec::Lz4,
                    compress::Codec::Zstd => wire::Codec::Zstd,
                    compress::Codec::None => wire::Codec::None,
                };
                payload = &self.out;
            }
        }
        let head = DataHead {
            offset,
            raw_len_bytes: raw.len() as u32,
            codec,
            raw_digest: digest,
        };
        let header = wire::encode_data_header(&head, payload.len() as u32)?;
        let frame_bytes = (header.len() + payload.len()) as u64;
        ctx.limiter.acquire(frame_bytes);
        let stream = &mut c.stream;
        c.watch.busy(|| stream.write_parts(&[&header, payload]))?;
        // How fast this stream drains: bytes the receiver acknowledged per
        // second, sampled only over intervals that began with a backlog in
        // flight (so an idle stream, waiting for the source, does not look
        // like a slow link; and a large socket buffer swallowing a write does
        // not look like a fast one).
        self.written_bytes += frame_bytes;
        let now = Instant::now();
        if let Ok(acked) = crate::engine::tcpinfo::bytes_acked(c.stream.tcp()) {
            if let Some((t0, acked0, written0)) = self.last_sample {
                let dt = now.duration_since(t0).as_secs_f64();
                if written0.saturating_sub(acked0) >= BACKLOG_MIN_BYTES && dt >= 0.005 {
                    let rate = acked.saturating_sub(acked0) as f64 / dt;
                    self.link_bytes_per_s = Some(match self.link_bytes_per_s {
                        Some(old) => old * 0.7 + rate * 0.3,
                        None => rate,
                    });
                }
            }
            self.last_sample = Some((now, acked, self.written_bytes));
        }
        c.payload_bytes += payload.len() as u64;
        self.account(ctx, c, frame_bytes);
        let len = raw.len() as u64;
        let new = lock(&ctx.job.sent).insert(offset, len);
        if new < len {
            ctx.job.bytes_resent.fetch_add(len - new, Ordering::Relaxed);
        }
        Stats::add(&ctx.shared.stats.bytes_written, len);
        Ok(())
    }

    fn account(&mut self, ctx: &SenderCtx, c: &mut Conn, n: u64) {
        c.frames += 1;
        c.unbarriered_bytes += n;
        c.unbarriered_since.get_or_insert_with(Instant::now);
        c.last_write = Instant::now();
        ctx.job.bytes_on_wire.fetch_add(n, Ordering::Relaxed);
    }
}

/// One frame from the receiver while sending.
fn handle_reply(ctx: &SenderCtx, c: &mut Conn, frame: Frame) -> Result<(), Broken> {
    match frame {
        Frame::Ack(a) => {
            while c.outstanding.front().is_some_and(|&(s, _)| s <= a.seq) {
                c.outstanding.pop_front();
            }
            if !ctx.job.apply_ack(c.instance, &a.durable_added) {
                return Err(Broken::Transient(
                    "acknowledgement from a receiver instance that has restarted since".into(),
                ));
            }
            Ok(())
        }
        Frame::Pong { .. } => Ok(()),
        Frame::Error(e) => Err(classify(StreamError::Refused {
            code: e.code,
            message: e.message,
        })),
        other => Err(classify(unexpected(other))),
    }
}

/// Plaintext rustls has decrypted but we have not read yet.
fn plaintext_ready(s: &mut Stream) -> bool {
    match s {
        Stream::Tls(t) => t
            .conn
            .process_new_packets()
            .is_ok_and(|st| st.plaintext_bytes_to_read() > 0),
        Stream::Plain(_) => false,
    }
}

use std::io::Write;
