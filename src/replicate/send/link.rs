//! A stream's connection: dialing and the HELLO/WELCOME exchange, the
//! stall watch, how a failure is classified, and reconnecting with
//! back-off.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use super::*;

impl Watch {
    pub(super) fn new(sock: std::net::TcpStream) -> Watch {
        Watch {
            sock,
            busy_since_ms: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub(super) fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed()).saturating_add(1)
    }

    /// Runs a blocking call with the connection marked busy (two atomic
    /// stores: this is on the path of every frame).
    pub(super) fn busy<T>(&self, f: impl FnOnce() -> T) -> T {
        self.busy_since_ms.store(self.now_ms(), Ordering::Relaxed);
        let out = f();
        self.busy_since_ms.store(0, Ordering::Relaxed);
        out
    }

    /// Cuts the connection if it has been busy for `stall` with no byte
    /// acknowledged by the peer; true if it did.
    pub(super) fn check(&self, stall: Duration, stream: usize) -> bool {
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
        if idle_ms < millis(stall) {
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

pub(super) fn fatal_code(code: ErrorCode) -> bool {
    !matches!(
        code,
        ErrorCode::Busy | ErrorCode::Cancelled | ErrorCode::Timeout
    )
}

/// Classifies a stream error: network trouble is transient; a refusal
/// with a code that will not change, a certificate problem or a protocol
/// bug is fatal.
pub(super) fn classify(e: StreamError) -> Broken {
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

pub(super) fn refusal_error(code: ErrorCode, message: &str) -> CopyError {
    CopyError::TargetWrite(format!(
        "(replication): the receiver refused: {code:?}: {message}"
    ))
}

impl Connector {
    pub(super) fn hello_for(&self, stream_index: u16) -> Hello {
        Hello {
            stream_index,
            ..self.hello.clone()
        }
    }

    /// Dial, HELLO, WELCOME; the WELCOME's durable list is applied.
    pub(super) fn connect(&self, i: usize) -> Result<Conn, StreamError> {
        let _permit = DialPermit::take();
        let (mut stream, report) = self.dialer.dial()?;
        if let Stream::Tls(s) = &mut stream {
            s.conn
                .set_buffer_limit(Some(crate::replicate::stream::TLS_BUFFER_LIMIT_BYTES));
        }
        // At most wire::MAX_STREAMS streams (checked before any is started).
        let index = u16::try_from(i).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("stream index {i}"),
            )
        })?;
        let mut scratch = Vec::new();
        write_frame(
            &mut stream,
            &Frame::Hello(self.hello_for(index)),
            &mut scratch,
        )?;
        if let Some(plan) = &self.plan {
            write_frame(&mut stream, plan, &mut scratch)?;
        }
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
        self.job.push_replan(&w.replan);
        self.job.note_sync_id(w.sync_id);
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
            digests_open: 0,
            digests: VecDeque::new(),
            unbarriered_compared_bytes: 0,
        })
    }

    /// Connects with back-off until it works, a fatal refusal, `abort`,
    /// or `--retry-for` after `since`.
    pub(super) fn reconnect(
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

/// Connections this process has between dialling and the receiver's
/// WELCOME at once, over every disk of every job: a receiver closes the
/// connections one address has open before they authenticate beyond its
/// limit (8 by default), and the disks of a job dial together.
const DIALS_IN_FLIGHT: usize = 4;

static DIALS: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// One of the [`DIALS_IN_FLIGHT`] places, given back on drop.
struct DialPermit;

impl DialPermit {
    fn take() -> Self {
        let mut n = lock(&DIALS.0);
        while *n >= DIALS_IN_FLIGHT {
            n = DIALS
                .1
                .wait(n)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *n += 1;
        DialPermit
    }
}

impl Drop for DialPermit {
    fn drop(&mut self) {
        *lock(&DIALS.0) -= 1;
        DIALS.1.notify_one();
    }
}

/// A random duration in `[d/2, d]`.
pub(super) fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    crate::replicate::random_bytes(&mut b);
    let frac = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    d.mul_f64(0.5 + 0.5 * frac)
}

/// The first connection of stream `i`: refusals and network errors fail at
/// once (a wrong address or certificate should not wait for minutes),
/// except a receiver that is busy with this target or shutting down.
pub(super) fn connect_first(c: &Connector, i: usize) -> Result<Conn, CopyError> {
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

/// After a write failed, the receiver may have said why: read it briefly.
pub(super) fn explain(e: StreamError, c: &mut Conn) -> Broken {
    if matches!(e, StreamError::Io(_)) {
        let _ = c.stream.set_read_timeout(Some(Duration::from_millis(500)));
        if let Ok(Frame::Error(f)) = read_frame(&mut c.stream, &mut c.dec) {
            return classify(refused(f));
        }
    }
    classify(e)
}

/// `d` in whole milliseconds, saturating (u64 milliseconds are 584 million
/// years).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
