//! `diskferry serve`: the receiver. [`Server::bind`] checks the options and
//! listens; [`Server::run`] accepts connections until a stop flag is set,
//! each on its own thread (TLS 1.3 with client certificates, or plain TCP
//! behind `--insecure-plaintext`), then lets every stream end cleanly.
//!
//! Before a peer is authenticated it is bounded three ways: at most
//! [`MAX_CONNECTIONS`] connections in all, at most
//! [`PeerLimits::max_handshakes_per_address`] still in their handshake per
//! source address (more are closed at once), and [`HANDSHAKE_TIMEOUT_MS`]
//! for the handshake (plaintext: for the first byte, and then
//! [`super::limits::HELLO_TIMEOUT_MS`] for the HELLO, still counted against
//! the address until it came).

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tracing::{debug, info, warn};

use super::conn::{ConnContext, serve_connection};
use super::job::{JournalPolicy, Registry};
use super::limits::{HandshakeGate, HandshakeSlot, PeerLimits, RateLimitedLog};
pub use super::target::TARGET_MODE_DEFAULT;
use super::target::Targets;
use super::transport::{POLL_INTERVAL_MS, PeerStream, is_timeout};
use crate::journal::JournalStore;
use crate::net::{self, NetError, SocketTuning, TlsDir, TlsError, TlsRole};
use crate::sync::lock;

/// Most connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 256;
/// How often the accept loop looks at the stop flag.
pub const ACCEPT_POLL_MS: u64 = 50;
/// Bound on a TLS handshake (or, in plaintext mode, on the first byte): a
/// TLS 1.3 handshake is two round trips, so this leaves room for slow
/// links while a connection that says nothing gives its slot back soon.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// After a stop, how long streams get to end by themselves before their
/// sockets are shut down under them.
pub const SHUTDOWN_GRACE_MS: u64 = 3_000;
/// The state directory under the target root when none is given.
pub const DEFAULT_STATE_DIR: &str = ".diskferry-state";
/// First byte of a TLS ClientHello record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What `diskferry serve` is told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Targets are files below this directory.
    pub target_root: PathBuf,
    /// Directory written by `diskferry certs init` (ca.pem, server.pem,
    /// server.key); `None` only with `insecure_plaintext`.
    pub tls_dir: Option<PathBuf>,
    /// Where job journals live (resume); created if missing. Default:
    /// `.diskferry-state` under the target root (never a writable target).
    pub state_dir: Option<PathBuf>,
    /// Journal checkpoints: at least this often while data arrives …
    pub checkpoint_interval: Duration,
    /// … or after this many new durable bytes, whichever comes first.
    pub checkpoint_bytes: u64,
    /// Plain TCP, no authentication, no encryption.
    pub insecure_plaintext: bool,
    /// `NAME=PATH`: target names that map to block devices or files
    /// outside the root.
    pub allow: Vec<(String, PathBuf)>,
    /// Caps on what one peer may hold (handshakes per address, ranges per job).
    pub limits: PeerLimits,
    /// Permission bits of the target files the receiver creates (default
    /// [`TARGET_MODE_DEFAULT`], 0600).
    pub target_mode: u32,
}

/// Why the receiver cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "no TLS directory given: pass --tls-dir DIR (create it with `diskferry certs init DIR`), \
         or --insecure-plaintext on a trusted network only"
    )]
    TlsRequired,
    #[error(
        "both --tls-dir and --insecure-plaintext given: choose one (TLS unless the network is trusted)"
    )]
    ConflictingTransport,
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("target root {}: {source} (create the directory, or pass another --target-root)", path.display())]
    TargetRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("target root {} is not a directory: pass a directory to --target-root", path.display())]
    TargetRootNotDir { path: PathBuf },
    #[error("state directory {}: {source} (check that it can be created and written)", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    StateDirUnsafe(#[source] crate::journal::JournalError),
    #[error("target mode {mode:o} is not permission bits (0 to 0777, e.g. 0640)")]
    BadTargetMode { mode: u32 },
    #[error("--allow {name}={}: {why}", path.display())]
    BadAllow {
        name: String,
        path: PathBuf,
        why: &'static str,
    },
    #[error("{0}")]
    Listen(#[from] NetError),
    #[error("cannot read the listening address: {0}")]
    LocalAddr(#[source] io::Error),
}

/// A bound receiver, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
    registry: Arc<Registry>,
    tuning: SocketTuning,
    limits: PeerLimits,
}

impl Server {
    /// Checks the options (root, certificates, allow list), then listens.
    pub fn bind(opts: ServeOptions) -> Result<Server, ServeError> {
        let tls = match (&opts.tls_dir, opts.insecure_plaintext) {
            (Some(_), true) => return Err(ServeError::ConflictingTransport),
            (None, false) => return Err(ServeError::TlsRequired),
            (None, true) => None,
            (Some(dir), false) => Some(net::server_config(&TlsDir::load(dir, TlsRole::Server)?)?),
        };
        let root = opts
            .target_root
            .canonicalize()
            .map_err(|source| ServeError::TargetRoot {
                path: opts.target_root.clone(),
                source,
            })?;
        if !root.is_dir() {
            return Err(ServeError::TargetRootNotDir {
                path: opts.target_root,
            });
        }
        check_allow(&opts.allow)?;
        if opts.target_mode > 0o777 {
            return Err(ServeError::BadTargetMode {
                mode: opts.target_mode,
            });
        }
        let state_dir = opts
            .state_dir
            .clone()
            .unwrap_or_else(|| root.join(DEFAULT_STATE_DIR));
        let uid = effective_uid();
        let state_err = |e: crate::journal::JournalError| match e {
            crate::journal::JournalError::Io { .. } => ServeError::StateDir {
                path: state_dir.clone(),
                source: io::Error::other(e.to_string()),
            },
            other => ServeError::StateDirUnsafe(other),
        };
        // Created and checked first (as named: a symbolic link is
        // refused), then named canonically so that a target path can be
        // checked against it.
        JournalStore::open_checked(&state_dir, uid).map_err(state_err)?;
        let canonical = state_dir
            .canonicalize()
            .map_err(|source| ServeError::StateDir {
                path: state_dir.clone(),
                source,
            })?;
        let store = JournalStore::open_checked(&canonical, uid).map_err(state_err)?;
        let targets =
            Targets::new(root, opts.allow, opts.target_mode, canonical).map_err(|source| {
                ServeError::TargetRoot {
                    path: opts.target_root.clone(),
                    source,
                }
            })?;
        let journals = JournalPolicy {
            store,
            interval: opts.checkpoint_interval,
            bytes: opts.checkpoint_bytes.max(1),
        };
        let tuning = SocketTuning::default();
        let listener = net::listen_tuned(opts.listen, &tuning)?;
        let local_addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
        // A blocking accept with a receive timeout (Linux applies
        // SO_RCVTIMEO to accept): a connection is taken at once, and the
        // stop flag is still looked at every ACCEPT_POLL_MS.
        socket2::SockRef::from(&listener)
            .set_read_timeout(Some(Duration::from_millis(ACCEPT_POLL_MS)))
            .map_err(ServeError::LocalAddr)?;
        Ok(Server {
            listener,
            local_addr,
            tls,
            registry: Arc::new(Registry::new(targets, journals)),
            tuning,
            limits: opts.limits,
        })
    }

    /// The address really listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until `stop` is set; then stops accepting, lets
    /// every stream end (each flushes its target and tells its sender),
    /// shuts down sockets still open after [`SHUTDOWN_GRACE_MS`], joins
    /// every thread and returns.
    pub fn run(self, stop: Arc<AtomicBool>) -> Result<(), ServeError> {
        info!(
            addr = %self.local_addr,
            root = %self.registry.root().display(),
            transport = if self.tls.is_some() { "TLS 1.3, client certificates required" }
                        else { "PLAINTEXT (--insecure-plaintext): no encryption, no authentication" },
            "receiver listening"
        );
        let ctx = Arc::new(ConnContext {
            registry: Arc::clone(&self.registry),
            stop: Arc::clone(&stop),
            max_ranges_per_job: self.limits.max_ranges_per_job,
            verifying: Default::default(),
        });
        let gate = HandshakeGate::new(self.limits.max_handshakes_per_address);
        let full_log = RateLimitedLog::new();
        let sockets: Arc<Mutex<Sockets>> = Arc::default();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut next_id = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let (tcp, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_timeout(&e) && e.kind() != ErrorKind::Interrupted {
                        warn!("accept failed: {e}; retrying");
                        thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
                    }
                    continue;
                }
            };
            reap(&mut threads);
            if threads.len() >= MAX_CONNECTIONS {
                full_log.warn(|| {
                    format!(
                        "refusing connection from {peer}: {MAX_CONNECTIONS} connections are open \
                         already"
                    )
                });
                continue;
            }
            let Some(slot) = gate.enter(peer) else {
                continue;
            };
            next_id += 1;
            match self.spawn_connection(tcp, peer, next_id, slot, &ctx, &sockets) {
                Ok(handle) => threads.push(handle),
                Err(e) => warn!(%peer, "cannot start a connection thread: {e}; closing it"),
            }
        }
        drop(self.listener);
        info!(
            connections = threads.len(),
            "stopping: no new connections; ending streams"
        );
        // A handshake cannot look at the stop flag: cut those now.
        for (tcp, serving) in lock(&sockets).values() {
            if !serving {
                let _ = tcp.shutdown(Shutdown::Both);
            }
        }
        let deadline = Instant::now() + Duration::from_millis(SHUTDOWN_GRACE_MS);
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
        }
        for (tcp, _) in lock(&sockets).values() {
            let _ = tcp.shutdown(Shutdown::Both);
        }
        for t in threads {
            if t.join().is_err() {
                warn!("a connection thread panicked (a bug): its stream was dropped");
            }
        }
        info!(
            jobs_unfinished = self.registry.job_count(),
            "receiver stopped"
        );
        Ok(())
    }

    fn spawn_connection(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        id: u64,
        slot: HandshakeSlot,
        ctx: &Arc<ConnContext>,
        sockets: &Arc<Mutex<Sockets>>,
    ) -> io::Result<JoinHandle<()>> {
        tcp.set_nonblocking(false)?;
        lock(sockets).insert(id, (tcp.try_clone()?, false));
        let tls = self.tls.clone();
        let tuning = self.tuning.clone();
        let ctx = Arc::clone(ctx);
        let sockets_for_thread = Arc::clone(sockets);
        let spawned = thread::Builder::new()
            .name(format!("serve-conn-{id}"))
            .spawn(move || {
                let report = net::tune_accepted(&tcp, &tuning);
                debug!(%peer, "connection accepted: {}", report.summary());
                let transport = open_transport(tcp, peer, tls, &slot, &ctx.stop);
                // A TLS peer is authenticated now; a plaintext one counts
                // against its address until its HELLO.
                let unauthenticated = match &transport {
                    Some(PeerStream::Plain(_)) => Some(slot),
                    _ => {
                        drop(slot);
                        None
                    }
                };
                if let Some(transport) = transport {
                    if let Some(entry) = lock(&sockets_for_thread).get_mut(&id) {
                        entry.1 = true;
                    }
                    serve_connection(transport, peer, unauthenticated, &ctx);
                }
                lock(&sockets_for_thread).remove(&id);
            });
        if spawned.is_err() {
            lock(sockets).remove(&id);
        }
        spawned
    }
}

/// Each connection's socket (a clone, to shut it down at stop) and whether
/// its stream is being served (past the handshake: it watches the stop flag).
type Sockets = HashMap<u64, (TcpStream, bool)>;

/// The receiver's effective uid (the owner its state directory must have).
fn effective_uid() -> u32 {
    crate::engine::sys::geteuid()
}

/// Joins threads that have ended.
fn reap(threads: &mut Vec<JoinHandle<()>>) {
    let (done, running): (Vec<_>, Vec<_>) = threads.drain(..).partition(|t| t.is_finished());
    *threads = running;
    for t in done {
        if t.join().is_err() {
            warn!("a connection thread panicked (a bug): its stream was dropped");
        }
    }
}

fn check_allow(allow: &[(String, PathBuf)]) -> Result<(), ServeError> {
    for (i, (name, path)) in allow.iter().enumerate() {
        let bad = |why| ServeError::BadAllow {
            name: name.clone(),
            path: path.clone(),
            why,
        };
        if name.is_empty() || name.len() > crate::wire::MAX_STRING_BYTES || name.contains('\0') {
            return Err(bad("the name must be 1 to 4096 bytes without NUL"));
        }
        if !path.is_absolute() {
            return Err(bad("the path must be absolute"));
        }
        if allow[..i].iter().any(|(other, _)| other == name) {
            return Err(bad("the name is listed twice"));
        }
    }
    Ok(())
}

/// The TLS handshake (client certificate required), or in plaintext mode a
/// check that the peer is not trying TLS. `None`: refused (logged, at most
/// once per [`super::limits::REFUSAL_LOG_INTERVAL_MS`]: an unauthenticated
/// peer can repeat a refusal at will).
fn open_transport(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
    slot: &HandshakeSlot,
    stop: &AtomicBool,
) -> Option<PeerStream> {
    if let Some(cfg) = tls {
        return match net::accept(tcp, cfg, HANDSHAKE_TIMEOUT_MS) {
            Ok(stream) => Some(PeerStream::Tls(Box::new(stream))),
            Err(e) => {
                slot.refused(|| format!("refused connection from {peer}: {e}"));
                None
            }
        };
    }
    match first_byte(&tcp, stop) {
        Ok(Some(TLS_HANDSHAKE_RECORD)) => {
            slot.refused(|| {
                format!(
                    "refused connection from {peer}: the peer started a TLS handshake, but this \
                     receiver runs with --insecure-plaintext; run both sides with TLS \
                     (--tls-dir) or both plaintext"
                )
            });
            None
        }
        Ok(Some(_)) => Some(PeerStream::Plain(tcp)),
        Ok(None) => {
            debug!(%peer, "connection closed before sending anything");
            None
        }
        Err(e) => {
            slot.refused(|| format!("refused connection from {peer}: {e}"));
            None
        }
    }
}

/// Peeks the first byte, waking up to look at `stop`; `None` on EOF or stop.
fn first_byte(tcp: &TcpStream, stop: &AtomicBool) -> io::Result<Option<u8>> {
    tcp.set_read_timeout(Some(Duration::from_millis(POLL_INTERVAL_MS)))?;
    let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let mut byte = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        match tcp.peek(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(byte[0])),
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        ErrorKind::TimedOut,
                        format!("the peer sent nothing for {HANDSHAKE_TIMEOUT_MS} ms"),
                    ));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// A stop flag set by SIGTERM or SIGINT; a second signal while stopping
/// exits at once (status 128 + signal).
pub fn install_stop_signals() -> Arc<AtomicBool> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        // The conditional exit must be registered first: it looks at the
        // flag before the second handler sets it.
        let registered = signal_hook::flag::register_conditional_shutdown(
            signal,
            128 + signal,
            Arc::clone(&stop),
        )
        .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&stop)));
        if let Err(e) = registered {
            warn!(
                "cannot install the handler for signal {signal}: {e}; it will end the receiver abruptly"
            );
        }
    }
    stop
}
