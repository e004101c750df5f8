//! A fault-injecting TCP proxy for tests: `127.0.0.1:0` → `target`.
//!
//! Include it with `#[path = "support/faultproxy.rs"] mod faultproxy;`.
//! One pair of pump threads per accepted connection (client→server and
//! server→client). The test keeps the [`FaultProxy`] handle and changes the
//! link while data flows:
//!
//! * [`FaultProxy::set_delay`]: sleep before forwarding each chunk read.
//! * [`FaultProxy::stall`]: stop forwarding without closing; what was sent
//!   waits (in the pump and the kernel buffers) until `stall(false)`.
//! * [`FaultProxy::reset_one`] / [`FaultProxy::reset_all`]: abort both
//!   sockets of a connection with `SO_LINGER 0`, so both peers see
//!   `ECONNRESET` (or EOF if they had already been told of a close).
//! * [`FaultProxy::flip_bit_after`]: XOR 0x01 into the byte at offset
//!   `n_bytes` of one direction of the NEXT accepted connection only (one
//!   shot: a reconnect after the corruption gets a clean link).
//!
//! Everything is bounded: sockets have 20 ms timeouts so pumps notice
//! resets, stalls and the drop of the proxy; connecting to the target
//! times out after 2 s; pumps never panic (every error ends the pump and
//! closes that connection). Dropping the proxy stops the accept loop, resets
//! every connection and joins every thread.
#![allow(dead_code)] // each test crate uses part of the API

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Poll interval of every blocking call (accept, read, write, stall).
const POLL: Duration = Duration::from_millis(20);
/// Connecting to the target gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read per chunk by a pump.
const CHUNK_BYTES: usize = 64 * 1024;
/// Most connections one proxy accepts (bounds threads and the table).
const MAX_CONNECTIONS: usize = 1024;

/// Which way bytes flow through a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

/// One accepted connection: both sockets (until reset) and its "stop
/// now" flag.
struct Conn {
    sockets: Option<(TcpStream, TcpStream)>,
    closed: Arc<AtomicBool>,
}

impl Conn {
    /// Abort both sockets: `SO_LINGER 0` makes the last close send RST;
    /// this drops the table's descriptors and the pumps drop theirs within
    /// one poll interval (without a FIN first: see [`Pump::run`]).
    fn reset(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some((client, server)) = self.sockets.take() {
            for s in [&client, &server] {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
        }
    }
}

struct Shared {
    target: SocketAddr,
    stop: AtomicBool,
    stalled: AtomicBool,
    delay_us: AtomicU64,
    bytes_forwarded: AtomicU64,
    flip: Mutex<Option<(u64, Direction)>>,
    conns: Mutex<Vec<Conn>>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// See the module docs.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `target`.
    /// Panics (in the test) only if the listener cannot be set up.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("faultproxy: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("faultproxy: nonblocking listener");
        let addr = listener.local_addr().expect("faultproxy: local addr");
        let shared = Arc::new(Shared {
            target,
            stop: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            bytes_forwarded: AtomicU64::new(0),
            flip: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
            pumps: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("faultproxy-accept".into())
            .spawn(move || accept_loop(&listener, &s))
            .expect("faultproxy: spawn acceptor");
        FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted (and connected to the target) since start,
    /// including those already closed or reset.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Delay each forwarded chunk by `delay` (both directions).
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_us.store(us, Ordering::SeqCst);
    }

    /// `true`: stop forwarding (both directions) without closing anything;
    /// `false`: deliver what waited and carry on.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    /// Abort connection `index` (0 = first accepted). Unknown index: no-op.
    pub fn reset_one(&self, index: usize) {
        if let Some(c) = lock(&self.shared.conns).get_mut(index) {
            c.reset();
        }
    }

    /// Abort every connection accepted so far.
    pub fn reset_all(&self) {
        for c in lock(&self.shared.conns).iter_mut() {
            c.reset();
        }
    }

    /// Flip bit 0 of the byte at offset `n_bytes` (counted from the start
    /// of the connection, in `direction`) of the next connection accepted.
    /// Replaces an earlier flip that no connection has consumed yet.
    pub fn flip_bit_after(&self, n_bytes: u64, direction: Direction) {
        *lock(&self.shared.flip) = Some((n_bytes, direction));
    }

    /// Bytes written to either peer so far (both directions together).
    pub fn bytes_forwarded(&self) -> u64 {
        self.shared.bytes_forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        self.reset_all();
        let pumps = std::mem::take(&mut *lock(&self.shared.pumps));
        for p in pumps {
            let _ = p.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                if lock(&shared.conns).len() >= MAX_CONNECTIONS {
                    continue; // dropped: the client sees EOF
                }
                open_conn(client, shared);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Connects to the target and starts both pumps; a failed connect closes
/// the client with a reset.
fn open_conn(client: TcpStream, shared: &Arc<Shared>) {
    let server = match TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(_) => {
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
    };
    let setup = || -> std::io::Result<[TcpStream; 4]> {
        for s in [&client, &server] {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(POLL))?;
            s.set_write_timeout(Some(POLL))?;
        }
        Ok([
            client.try_clone()?,
            server.try_clone()?,
            server.try_clone()?,
            client.try_clone()?,
        ])
    };
    let Ok([c_read, s_write, s_read, c_write]) = setup() else {
        return;
    };
    let flip = lock(&shared.flip).take();
    let flip_for = |d: Direction| flip.filter(|(_, fd)| *fd == d).map(|(n, _)| n);
    let closed = Arc::new(AtomicBool::new(false));
    let index = {
        let mut conns = lock(&shared.conns);
        conns.push(Conn {
            sockets: Some((client, server)),
            closed: Arc::clone(&closed),
        });
        conns.len() - 1
    };
    let pumps = [
        (c_read, s_write, flip_for(Direction::ClientToServer), "c2s"),
        (s_read, c_write, flip_for(Direction::ServerToClient), "s2c"),
    ];
    for (from, to, flip_at, dir) in pumps {
        let pump = Pump {
            from,
            to,
            flip_at,
            shared: Arc::clone(shared),
            closed: Arc::clone(&closed),
        };
        let spawned = thread::Builder::new()
            .name(format!("faultproxy-{index}-{dir}"))
            .spawn(move || pump.run());
        match spawned {
            Ok(h) => lock(&shared.pumps).push(h),
            Err(_) => closed.store(true, Ordering::SeqCst),
        }
    }
}

/// One direction of one connection.
struct Pump {
    from: TcpStream,
    to: TcpStream,
    flip_at: Option<u64>,
    shared: Arc<Shared>,
    closed: Arc<AtomicBool>,
}

impl Pump {
    fn done(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || self.shared.stop.load(Ordering::SeqCst)
    }

    fn run(self) {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut pos = 0u64;
        while !self.done() {
            let n = match (&self.from).read(&mut buf) {
                Ok(0) => {
                    // Half-close: pass the FIN on, keep the other direction.
                    let _ = self.to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let chunk = &mut buf[..n];
            if let Some(at) = self.flip_at
                && at >= pos
                && at - pos < n as u64
            {
                chunk[(at - pos) as usize] ^= 0x01;
            }
            pos += n as u64;
            if !self.wait_delay_and_stall() || !self.write_all(chunk) {
                break;
            }
        }
        if self.closed.swap(true, Ordering::SeqCst) {
            // Reset (or the other pump already closed): just drop our
            // descriptors; a shutdown here would send FIN before the RST.
            return;
        }
        // An error on one side ends the whole connection.
        let _ = self.to.shutdown(Shutdown::Both);
        let _ = self.from.shutdown(Shutdown::Both);
    }

    /// Sleeps the configured delay, then waits out a stall. False if the
    /// connection ended meanwhile.
    fn wait_delay_and_stall(&self) -> bool {
        let delay = Duration::from_micros(self.shared.delay_us.load(Ordering::SeqCst));
        let mut slept = Duration::ZERO;
        while slept < delay {
            if self.done() {
                return false;
            }
            let step = (delay - slept).min(POLL);
            thread::sleep(step);
            slept += step;
        }
        while self.shared.stalled.load(Ordering::SeqCst) {
            if self.done() {
                return false;
            }
            thread::sleep(POLL);
        }
        !self.done()
    }

    fn write_all(&self, mut chunk: &[u8]) -> bool {
        let mut to = &self.to;
        while !chunk.is_empty() {
            if self.done() {
                return false;
            }
            match to.write(chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    chunk = &chunk[n..];
                    self.shared
                        .bytes_forwarded
                        .fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return false,
            }
        }
        true
    }
}
