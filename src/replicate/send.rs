//! `diskferry send`: the source side of a replication job.
//!
//! The same planner and pinned workers as `copy` read the source and find
//! zero runs; instead of writing, each worker lends its read windows to the
//! sink. One sender thread per stream takes windows from the sink, chooses a
//! codec per run (adaptive policy), frames them, waits for the shared rate
//! limiter, and writes them into its TLS stream; then it hands the slot
//! back. At the end every stream asks the receiver for a durability barrier
//! and says DONE; `--verify` then compares whole-image digests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::compress::{self, Compressors, LinkState, Mode, Policy};
use crate::engine::{self, EngineKind};
use crate::net::rate::RateLimiter;
use crate::net::socket::SocketTuning;
use crate::pipeline::CopyError;
use crate::pipeline::open::open_source;
use crate::pipeline::run::{DstPlan, Pipeline, PipelineConfig, TICK};
use crate::pipeline::sink::{Sink, SinkChunk};
use crate::pipeline::stats::{Snapshot, Stats};
use crate::wire::{
    self, ByteRange, DataHead, Features, Frame, FrameDecoder, Hello, HelloFlags, ImageDigest,
};

use super::stream::{Dialer, Stream, StreamError, read_frame, unexpected, write_frame};
use crate::net::socket::TuningReport;

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
    pub requests: u32,
    pub chunk_bytes: u32,
    pub threads: Option<u32>,
    pub engine: Option<EngineKind>,
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
}

/// Counters of the sender threads.
#[derive(Default)]
struct WireStats {
    bytes_on_wire: AtomicU64,
}

fn fail_msg(e: impl std::fmt::Display) -> CopyError {
    CopyError::TargetWrite(format!("(replication): {e}"))
}

fn random_job_id() -> [u8; 16] {
    use std::io::Read;
    let mut id = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_ok();
    if !ok {
        let seed = format!("{:?}{}", Instant::now(), std::process::id());
        id.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..16]);
    }
    id
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
    let (kind, why) = engine::choose(opts.engine).map_err(CopyError::Engine)?;
    if let Some(why) = why {
        tracing::warn!("{why}");
    }
    let tuning = SocketTuning::default();
    let dialer =
        Dialer::new(&opts.to, opts.tls_dir.as_deref(), tuning).map_err(CopyError::Usage)?;
    let source = open_source(&opts.source, opts.connections)?;
    let size_bytes = source.size_bytes;
    let job_id = random_job_id();
    let hello = |i: u32| Hello {
        job_id,
        size_bytes,
        chunk_size_bytes: opts.chunk_bytes,
        features: Features(Features::LZ4.0 | Features::ZSTD.0 | Features::BLAKE3.0),
        stream_index: i as u16,
        stream_count: opts.streams as u16,
        flags: HelloFlags(0),
        target: opts.target.clone(),
        source_identity: format!("size={size_bytes}"),
    };
    // Stream 0 first (its WELCOME is authoritative), then the others at once.
    let open = |i: u32| -> Result<(Stream, FrameDecoder, Features, TuningReport), CopyError> {
        let (mut s, report) = dialer.dial().map_err(fail_msg)?;
        let mut scratch = Vec::new();
        write_frame(&mut s, &Frame::Hello(hello(i)), &mut scratch).map_err(fail_msg)?;
        let mut dec = FrameDecoder::new();
        match read_frame(&mut s, &mut dec).map_err(fail_msg)? {
            Frame::Welcome(w) if w.features.contains(Features::BLAKE3) => {
                Ok((s, dec, w.features, report))
            }
            Frame::Welcome(_) => Err(fail_msg("the receiver does not check BLAKE3 digests")),
            other => Err(fail_msg(unexpected(other))),
        }
    };
    let first = open(0)?;
    let congestion = first.3.congestion.clone();
    if let Some(why) = &first.3.congestion_fallback {
        tracing::info!("{why}");
    }
    let rest: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..opts.streams)
            .map(|i| scope.spawn(move || open(i)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CopyError::Internal("a dial thread panicked".into())))
            })
            .collect()
    });
    let mut streams = vec![(first.0, first.1, first.2)];
    for r in rest {
        let (s, dec, f, _) = r?;
        streams.push((s, dec, f));
    }
    tracing::info!(
        source = %source.display,
        to = %opts.to,
        target = %opts.target,
        size_bytes,
        data_bytes = source.extents.data_bytes(),
        streams = streams.len(),
        congestion = %congestion,
        engine = %kind,
        "send starting"
    );

    let cfg = PipelineConfig {
        threads: opts.threads,
        connections: opts.connections.max(opts.streams),
        requests: opts.requests,
        chunk_bytes: opts.chunk_bytes,
        kind,
        read_retries: crate::pipeline::retry::READ_RETRIES_DEFAULT,
    };
    let display = source.display.clone();
    let child = source.child;
    let mut pipe = Pipeline::start(
        &cfg,
        source.access,
        source.extents,
        size_bytes,
        DstPlan::Sink {
            window_digests: opts.verify,
        },
    )?;
    let sink = pipe.sink().expect("sink pipeline");
    let shared = Arc::clone(pipe.shared());
    let image = Arc::new(Mutex::new(
        ImageDigest::new(size_bytes, opts.chunk_bytes)
            .map_err(|e| CopyError::Internal(e.to_string()))?,
    ));
    let limiter = Arc::new(match opts.rate_bytes_per_s {
        Some(r) => RateLimiter::with_rate(r),
        None => RateLimiter::unlimited(),
    });
    let wire_stats = Arc::new(WireStats::default());
    let n_streams = streams.len();
    let cpus = engine::pin::online_cpus().max(1) as f64;
    let mut senders = Vec::new();
    for (i, (stream, dec, features)) in streams.into_iter().enumerate() {
        let ctx = SenderCtx {
            index: i,
            sink: Arc::clone(&sink),
            shared: Arc::clone(&shared),
            image: Arc::clone(&image),
            limiter: Arc::clone(&limiter),
            wire: Arc::clone(&wire_stats),
            mode: allowed_mode(opts.compress, features),
            chunk_bytes: opts.chunk_bytes,
            verify: opts.verify,
            // Compression shares the cores with reading, digests and TLS:
            // count on half of each stream's share.
            cores_per_stream: (cpus / n_streams as f64 / 2.0).max(0.1),
            rate_per_stream: opts.rate_bytes_per_s.map(|r| r as f64 / n_streams as f64),
        };
        let h = std::thread::Builder::new()
            .name(format!("sender-{i}"))
            .spawn(move || sender_thread(ctx, stream, dec))
            .map_err(|e| CopyError::Internal(format!("spawning sender {i}: {e}")))?;
        senders.push(h);
    }

    // Control loop.
    let mut last_report = Instant::now();
    progress(&shared.stats.snapshot(), started.elapsed());
    let mut producers_done = false;
    while !senders.iter().all(|h| h.is_finished()) {
        std::thread::sleep(TICK);
        pipe.tick();
        if !producers_done && pipe.finished() {
            sink.set_producers_done();
            producers_done = true;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress(&shared.stats.snapshot(), started.elapsed());
            last_report = Instant::now();
        }
    }
    sink.set_producers_done();
    let mut finished = Vec::new();
    let mut comp_stats = compress::Stats::default();
    for h in senders {
        match h.join() {
            Ok(Some((stream, dec, stats, done))) => {
                comp_stats.add(&stats);
                finished.push((stream, dec, done));
            }
            Ok(None) => {}
            Err(_) => shared.fail(CopyError::Internal("a sender thread panicked".into())),
        }
    }
    let joined = pipe.join();
    let snap = joined.result?;
    if finished.len() != n_streams {
        return Err(CopyError::Internal(
            "a stream ended without its final acknowledgement".into(),
        ));
    }
    drop(joined.keep);
    drop(child);

    // Verify: the receiver reads the target back.
    let mut image_digest = None;
    let mut verified = false;
    if opts.verify {
        let want = image
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish()
            .map_err(|e| CopyError::Internal(e.to_string()))?;
        let (stream, dec, _) = &mut finished[0];
        let mut scratch = Vec::new();
        write_frame(
            stream,
            &Frame::VerifyRequest {
                window_bytes: opts.chunk_bytes,
            },
            &mut scratch,
        )
        .map_err(fail_msg)?;
        match read_frame(stream, dec).map_err(fail_msg)? {
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
    // Every stream is durable (and verified): say DONE and close.
    let mut scratch = Vec::new();
    for (s, dec, done) in &mut finished {
        write_frame(s, done, &mut scratch).map_err(fail_msg)?;
        s.flush().map_err(|e| fail_msg(StreamError::Io(e)))?;
        // A PING after DONE: its PONG proves the receiver accepted DONE
        // (frames are handled in order; a refusal would be an ERROR).
        write_frame(s, &Frame::Ping { nonce: 0xD0_4E }, &mut scratch).map_err(fail_msg)?;
        s.flush().map_err(|e| fail_msg(StreamError::Io(e)))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        match read_frame(s, dec) {
            Ok(Frame::Pong { .. }) | Err(StreamError::Closed) => {}
            Ok(Frame::Error(e)) => {
                return Err(fail_msg(format!(
                    "the receiver refused DONE: {:?}: {}",
                    e.code, e.message
                )));
            }
            Ok(other) => return Err(fail_msg(unexpected(other))),
            Err(e) => return Err(fail_msg(format!("no answer to DONE: {e}"))),
        }
        s.close();
    }
    let on_wire = wire_stats.bytes_on_wire.load(Ordering::Relaxed);
    progress(&snap, started.elapsed());
    Ok(SendReport {
        source: display,
        target: opts.target.clone(),
        size_bytes,
        bytes_planned: snap.bytes_planned,
        bytes_read: snap.bytes_read,
        bytes_written: snap.bytes_written,
        bytes_zeroed: snap.bytes_zeroed,
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
    })
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
    wire: Arc<WireStats>,
    mode: Mode,
    chunk_bytes: u32,
    verify: bool,
    cores_per_stream: f64,
    rate_per_stream: Option<f64>,
}

/// A stream whose data is all durable, with the DONE frame still to send.
type Finished = Option<(Stream, FrameDecoder, compress::Stats, Frame)>;

/// One stream's sender: takes lent windows from the sink until the workers
/// are done, then a final barrier and DONE. On any failure the job fails
/// and the thread keeps handing slots back so the workers can finish.
fn sender_thread(ctx: SenderCtx, mut stream: Stream, mut dec: FrameDecoder) -> Finished {
    let mut s = StreamSender {
        policy: Policy::new(ctx.mode),
        comps: Compressors::new(),
        out: Vec::with_capacity(ctx.chunk_bytes as usize + 4096),
        scratch: Vec::with_capacity(64),
        link_bytes_per_s: None,
        last_sample: None,
        written_bytes: 0,
        frames: 0,
        payload_bytes: 0,
    };
    let mut failed = false;
    let mut idle = 0u32;
    loop {
        let Some(chunk) = ctx.sink.queue.pop() else {
            if ctx.sink.producers_done() && ctx.sink.queue.is_empty() {
                break;
            }
            idle = idle.saturating_add(1);
            if idle > 64 {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                std::thread::yield_now();
            }
            continue;
        };
        idle = 0;
        let (worker, slot) = chunk.owner();
        if !failed
            && !ctx.shared.aborted()
            && let Err(e) = s.send_chunk(&ctx, &mut stream, &chunk)
        {
            {
                failed = true;
                let msg = explain(e, &mut stream, &mut dec);
                ctx.shared.fail(CopyError::TargetWrite(format!(
                    "(stream {}): {msg}",
                    ctx.index
                )));
            }
        }
        drop(chunk);
        ctx.sink.release(worker, slot);
    }
    if failed || ctx.shared.aborted() {
        stream.close();
        return None;
    }
    match s.finish(&mut stream, &mut dec) {
        Ok(done) => Some((stream, dec, *s.policy.stats(), done)),
        Err(e) => {
            let msg = explain(e, &mut stream, &mut dec);
            ctx.shared.fail(CopyError::TargetWrite(format!(
                "(stream {}) at the final barrier: {msg}",
                ctx.index
            )));
            stream.close();
            None
        }
    }
}

/// After a write failed, the receiver may have said why: read it briefly.
fn explain(e: StreamError, stream: &mut Stream, dec: &mut FrameDecoder) -> String {
    if matches!(e, StreamError::Io(_)) {
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if let Ok(Frame::Error(f)) = read_frame(stream, dec) {
            return format!("the receiver refused: {:?}: {}", f.code, f.message);
        }
    }
    e.to_string()
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
    frames: u64,
    /// DATA payload bytes as sent (compressed size): DONE reports them.
    payload_bytes: u64,
}

impl StreamSender {
    fn send_chunk(
        &mut self,
        ctx: &SenderCtx,
        stream: &mut Stream,
        chunk: &SinkChunk,
    ) -> Result<(), StreamError> {
        match chunk {
            SinkChunk::Zero { offset, len, .. } => {
                self.zero(ctx, stream, *offset, *len)?;
                if ctx.verify {
                    let mut img = ctx.image.lock().unwrap_or_else(|p| p.into_inner());
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
                        self.zero(ctx, stream, at, u64::from(r.len))?;
                        continue;
                    }
                    let raw = &bytes[r.rel as usize..(r.rel + r.len) as usize];
                    self.data(ctx, stream, at, raw, r.digest)?;
                }
                if let Some(d) = window_digest {
                    let i = offset / u64::from(ctx.chunk_bytes);
                    ctx.image
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .set_window(i, *d)?;
                }
            }
        }
        Ok(())
    }

    fn zero(
        &mut self,
        ctx: &SenderCtx,
        stream: &mut Stream,
        offset: u64,
        len: u64,
    ) -> Result<(), StreamError> {
        let n = write_frame(
            stream,
            &Frame::Zero(ByteRange {
                offset,
                len_bytes: len,
            }),
            &mut self.scratch,
        )?;
        self.account(ctx, n as u64);
        Ok(())
    }

    fn data(
        &mut self,
        ctx: &SenderCtx,
        stream: &mut Stream,
        offset: u64,
        raw: &[u8],
        digest: [u8; 32],
    ) -> Result<(), StreamError> {
        // Until a backlog shows the link's rate, the link counts as fast
        // (raw); a slow link shows itself after the first frame or two.
        let link = LinkState {
            link_bytes_per_s: ctx.rate_per_stream.or(self.link_bytes_per_s),
            cores_for_compression: ctx.cores_per_stream,
        };
        let choice = self.policy.choose(raw, &link);
        let mut codec = wire::Codec::None;
        let mut payload: &[u8] = raw;
        if choice.codec != compress::Codec::None {
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
        stream.write_all(&header)?;
        stream.write_all(payload)?;
        // How fast this stream drains: bytes the receiver acknowledged per
        // second, sampled only over intervals that began with a backlog in
        // flight (so an idle stream, waiting for the source, does not look
        // like a slow link; and a large socket buffer swallowing a write does
        // not look like a fast one).
        self.written_bytes += frame_bytes;
        let now = Instant::now();
        if let Ok(acked) = crate::engine::tcpinfo::bytes_acked(stream.tcp()) {
            if let Some((t0, acked0, written0)) = self.last_sample {
                let dt = now.duration_since(t0).as_secs_f64();
                if written0.saturating_sub(acked0) >= BACKLOG_MIN_BYTES && dt >= 0.005 {
                    let rate = acked.saturating_sub(acked0) as f64 / dt;
                    tracing::debug!(
                        rate,
                        dt,
                        backlog = written0.saturating_sub(acked0),
                        "link sample"
                    );
                    self.link_bytes_per_s = Some(match self.link_bytes_per_s {
                        Some(old) => old * 0.7 + rate * 0.3,
                        None => rate,
                    });
                }
            }
            self.last_sample = Some((now, acked, self.written_bytes));
        } else {
            tracing::debug!("no TCP_INFO");
        }
        let payload_len = payload.len() as u64;
        self.account(ctx, frame_bytes);
        self.payload_bytes += payload_len;
        Stats::add(&ctx.shared.stats.bytes_written, raw.len() as u64);
        Ok(())
    }

    fn account(&mut self, ctx: &SenderCtx, n: u64) {
        self.frames += 1;
        ctx.wire.bytes_on_wire.fetch_add(n, Ordering::Relaxed);
    }

    /// Final barrier: returns once everything sent on this stream is
    /// durable; the DONE frame is returned for the coordinator to send.
    fn finish(
        &mut self,
        stream: &mut Stream,
        dec: &mut FrameDecoder,
    ) -> Result<Frame, StreamError> {
        let seq = 1;
        write_frame(stream, &Frame::Barrier { seq }, &mut self.scratch)?;
        stream.flush()?;
        loop {
            match read_frame(stream, dec)? {
                Frame::Ack(a) if a.seq == seq => break,
                Frame::Ack(_) | Frame::Pong { .. } => continue,
                other => return Err(unexpected(other)),
            }
        }
        Ok(Frame::Done {
            total_bytes_sent: self.payload_bytes,
            frames: self.frames,
        })
    }
}

use std::io::Write;
