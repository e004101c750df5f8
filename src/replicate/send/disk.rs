//! One send disk on the engine: a job context whose target is a sink. Its
//! coordinator (the job's `disk-N` thread) opens the source, dials the
//! receiver, and runs rounds — each one a pipeline on the engine's shared
//! workers whose windows the sender threads drain into the streams — until
//! the receiver holds every byte; then DONE and, if asked, verify.

use super::incremental::{RoundPlan, open_for_pass};
use super::verify::{say_done, verify_target};
use super::*;
use crate::endpoint::open::Source;
use crate::runtime::job::DiskHooks;
use crate::wire::ChunkDigest;

use super::delta_sender::{DELTA_ASKED_MAX, DeltaCtx};

/// Requests in flight per source connection in a delta pass from a source
/// on this host: room for every stream's [`DELTA_ASKED_MAX`] windows
/// waiting for their digests, and reads going on meanwhile.
const DELTA_REQUESTS_NEAR: u32 = 2 * DELTA_ASKED_MAX as u32;

/// What every round of one disk shares.
struct Disk<'a> {
    opts: &'a SendOptions,
    engine: &'a Engine,
    hooks: &'a DiskHooks<'a>,
    job: Arc<JobShared>,
    connector: Arc<Connector>,
    image: Arc<Mutex<ImageDigest>>,
    run_digest: ChunkDigest,
    n_streams: usize,
    loopback: bool,
    size_bytes: u64,
}

/// What the rounds add up.
#[derive(Default)]
struct Tally {
    totals: Snapshot,
    comp_stats: compress::CompressStats,
    rounds: u32,
}

/// Run one send disk to completion (every byte durable on the receiver)
/// or to its first error, on `engine`'s workers.
pub(crate) fn run_disk(
    engine: &Engine,
    opts: &SendOptions,
    hooks: &DiskHooks<'_>,
) -> Result<SendReport, CopyError> {
    let started = Instant::now();
    let tuning = SocketTuning::default();
    let dialer =
        Dialer::new(&opts.to, opts.tls_dir.as_deref(), tuning).map_err(CopyError::Usage)?;
    let (mut source, pass) = open_for_pass(opts)?;
    debug!(elapsed = ?started.elapsed(), "source open and mapped");
    let size_bytes = source.size_bytes;
    let identity = match &opts.source_id {
        Some(id) => id.clone(),
        None => crate::replicate::source::identity(&mut source)?,
    };
    debug!(elapsed = ?started.elapsed(), %identity, "source identity");
    let job = Arc::new(JobShared::new(opts.streams as usize, pass));
    let connector = Arc::new(Connector::new(
        dialer,
        opts,
        size_bytes,
        identity.clone(),
        &job,
    ));
    let mut conns = connect_all(&connector, opts.streams as usize)?;
    debug!(elapsed = ?started.elapsed(), "streams connected");
    let congestion = conns[0].report.congestion.clone();
    if let Some(why) = &conns[0].report.congestion_fallback {
        tracing::info!("{why}");
    }
    let loopback = connector.dialer.addr.ip().is_loopback();
    let capped = hooks.control().is_rate_capped();
    if loopback && matches!(opts.compress, Mode::Auto) && !capped {
        info!("the receiver is on this host: --compress auto sends chunks raw");
    }
    // Every stream of a job gets the same answer; stream 0's decides.
    let run_digest = ChunkDigest::for_features(conns[0].features);
    let resumed_bytes = job.covered();
    let data_bytes = source.extents.data_bytes();
    info!(
        source = %source.display,
        to = %opts.to,
        target = %opts.target,
        size_bytes,
        data_bytes,
        durable_on_receiver = resumed_bytes,
        streams = conns.len(),
        congestion = %congestion,
        chunk_digest = run_digest.name(),
        engine = %engine.kind(),
        "send starting"
    );
    // Data the receiver holds already (whole windows of it; of a pass,
    // its copy extents) is skipped.
    let bytes_resumed_skipped = match job.pass_copy_bytes_held(size_bytes) {
        Some(held) => held,
        None => {
            data_bytes
                - source.extents.data_bytes_within(&whole_windows(
                    &job.missing(size_bytes),
                    size_bytes,
                    opts.chunk_bytes,
                ))
        }
    };
    let display = source.display.clone();
    let disk = Disk {
        opts,
        engine,
        hooks,
        image: Arc::new(Mutex::new(
            ImageDigest::new(size_bytes, opts.chunk_bytes)
                .map_err(|e| CopyError::Internal(e.to_string()))?,
        )),
        job,
        connector,
        run_digest,
        n_streams: conns.len(),
        loopback,
        size_bytes,
    };
    let mut source = Some(source);
    let tally = disk.rounds(&mut source, &mut conns)?;

    // Every stream is durable: say DONE (the receiver completes the job).
    say_done(&mut conns)?;
    // Verify (the receiver allows it only after DONE): it reads the target back.
    let image_digest = if opts.verify {
        Some(verify_target(
            opts,
            &disk.image,
            &mut source,
            &mut conns[0],
        )?)
    } else {
        None
    };
    let verified = image_digest.is_some();
    drop(source);
    for c in &mut conns {
        c.stream.close();
    }
    let job = &disk.job;
    let totals = tally.totals;
    let comp_stats = tally.comp_stats;
    Ok(SendReport {
        source: display,
        target: opts.target.clone(),
        size_bytes,
        bytes_planned: totals.bytes_planned,
        bytes_read: totals.bytes_read,
        bytes_written: totals.bytes_written,
        // A delta pass zeroes only where the target held data.
        bytes_zeroed: match opts.pass {
            PassRequest::Delta { .. } => job.delta_zeroed_bytes.load(Ordering::Relaxed),
            _ => totals.bytes_zeroed,
        },
        bytes_on_wire: job.bytes_on_wire.load(Ordering::Relaxed),
        compression_ratio: if comp_stats.payload_bytes > 0 {
            comp_stats.raw_bytes as f64 / comp_stats.payload_bytes as f64
        } else {
            1.0
        },
        elapsed_s: started.elapsed().as_secs_f64(),
        engine: engine.kind(),
        streams: disk.n_streams,
        congestion_control: congestion,
        image_digest,
        verified,
        compression: comp_stats,
        bytes_resumed_skipped,
        bytes_resent: job.bytes_resent.load(Ordering::Relaxed),
        resumed: resumed_bytes > 0,
        reconnects: job.reconnects.load(Ordering::Relaxed),
        rounds: tally.rounds,
        source_identity: identity,
        sync_id: job.sync_id_or(disk.connector.sync_id),
        base_sync_id: match &opts.pass {
            PassRequest::Incremental { base, .. } => Some(*base),
            PassRequest::Full | PassRequest::Delta { .. } => None,
        },
        change_id: opts.change_id.clone(),
        bytes_changed: match opts.pass {
            PassRequest::Delta { .. } => job.bytes_changed.load(Ordering::Relaxed),
            _ => job.pass_changed_bytes().unwrap_or(data_bytes),
        },
    })
}

impl Disk<'_> {
    /// Rounds until the receiver has acknowledged every byte: each plans
    /// the whole windows it does not hold yet.
    fn rounds(
        &self,
        source: &mut Option<Source>,
        conns: &mut Vec<Conn>,
    ) -> Result<Tally, CopyError> {
        let opts = self.opts;
        let mut tally = Tally::default();
        let mut stuck = 0u32;
        let reopen = || {
            open_source(
                &opts.source,
                opts.source_format,
                opts.connections,
                opts.io_timeout,
            )
        };
        loop {
            // Ranges a WELCOME asked for are planned from the source's
            // allocation now, before the round that sends them.
            if self.job.has_replan() && source.is_none() {
                *source = Some(reopen()?);
            }
            if let Some(src) = source.as_ref() {
                self.job.apply_replan(src)?;
            }
            let Some((plan, missing_bytes)) =
                self.job.next_round(self.size_bytes, opts.chunk_bytes)
            else {
                return Ok(tally);
            };
            if self.hooks.control().is_cancelled() {
                return Err(CopyError::Cancelled);
            }
            let src = match source.take() {
                Some(s) => s,
                None => reopen()?,
            };
            let covered_before = self.job.covered();
            tally.rounds += 1;
            if tally.rounds > 1 {
                info!(
                    round = tally.rounds,
                    missing_bytes, "sending what is not acknowledged yet"
                );
            }
            let snap = self.round(src, plan, conns, &mut tally.comp_stats)?;
            tally.totals = tally.totals.plus(&snap);
            self.hooks.round_over(tally.totals);
            if self.job.covered() <= covered_before {
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
    }

    /// One round: a pipeline on the engine reads `spans` (everything when
    /// `None`) into the sink, one sender thread per stream drains it.
    fn round(
        &self,
        src: Source,
        plan: RoundPlan,
        conns: &mut Vec<Conn>,
        comp_stats: &mut compress::CompressStats,
    ) -> Result<Snapshot, CopyError> {
        let opts = self.opts;
        let (spans, exact) = match plan {
            RoundPlan::Windows(spans) => (spans, None),
            RoundPlan::Exact(items) => (None, Some(items)),
        };
        let cfg = PipelineConfig {
            exact,
            threads: opts.threads,
            connections: opts.connections.max(opts.streams),
            requests: match opts.pass {
                // Each stream holds windows until their digests came.
                PassRequest::Delta { .. } => {
                    Requests::from_flag(opts.requests, DELTA_REQUESTS_NEAR, REQUESTS_FAR)
                }
                _ => Requests::from_flag(opts.requests, REQUESTS_NEAR, REQUESTS_FAR),
            },
            chunk_bytes: opts.chunk_bytes,
            spans,
            read_retries: crate::pipeline::retry::READ_RETRIES_DEFAULT,
            lanes: opts.lanes,
            io_timeout: opts.io_timeout,
        };
        let child = src.child;
        let mut pipe = Pipeline::start(
            self.engine,
            Arc::clone(self.hooks.control()),
            &cfg,
            src.access,
            src.extents,
            self.size_bytes,
            DstPlan::Sink {
                window_digests: self.image_windows(),
                // A delta pass digests only what differs, as it sends it.
                run_digest: match opts.pass {
                    PassRequest::Delta { .. } => None,
                    _ => Some(self.run_digest),
                },
            },
        )?;
        self.hooks.started(pipe.shared());
        let sink = pipe.sink().expect("sink pipeline");
        let shared = Arc::clone(pipe.shared());
        let sender_exits = Exits::new(None);
        let mut senders = Vec::new();
        for (i, conn) in std::mem::take(conns).into_iter().enumerate() {
            let ctx = self.sender_ctx(i, &sink, &shared, conn.features);
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
            for (i, w) in lock(&self.job.watches).iter().enumerate() {
                if let Some(w) = w {
                    w.check(opts.stall_timeout, i);
                }
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
        if conns.len() != self.n_streams {
            return Err(CopyError::Internal(
                "a stream ended without its final acknowledgement".into(),
            ));
        }
        Ok(snap)
    }

    /// Whether the rounds feed the image digest window by window: only
    /// a full pass, whose items are whole windows. A `--verify` after an
    /// incremental pass reads the whole source for it instead.
    fn image_windows(&self) -> bool {
        self.opts.verify && self.job.pass.is_none()
    }

    fn sender_ctx(
        &self,
        index: usize,
        sink: &Arc<Sink>,
        shared: &Arc<crate::pipeline::Shared>,
        features: Features,
    ) -> SenderCtx {
        let opts = self.opts;
        let cpus = engine::pin::online_cpus().max(1) as f64;
        let n_streams = self.n_streams as f64;
        SenderCtx {
            index,
            sink: Arc::clone(sink),
            shared: Arc::clone(shared),
            image: Arc::clone(&self.image),
            control: Arc::clone(self.hooks.control()),
            job: Arc::clone(&self.job),
            connector: Arc::clone(&self.connector),
            mode: allowed_mode(opts.compress, features),
            chunk_bytes: opts.chunk_bytes,
            verify: self.image_windows(),
            // Compression shares the cores with reading, digests and
            // TLS: count on half of each stream's share.
            cores_per_stream: (cpus / n_streams / 2.0).max(0.1),
            rate_per_stream: (self.hooks.control().rate_bytes_per_s())
                .map(|r| r as f64 / n_streams),
            loopback: self.loopback,
            test_hooks: opts.test_hooks,
            delta: match opts.pass {
                PassRequest::Delta { block_bytes } => Some(DeltaCtx {
                    block_bytes,
                    run_digest: self.run_digest,
                }),
                _ => None,
            },
        }
    }
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
