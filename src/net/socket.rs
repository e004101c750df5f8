//! TCP sockets tuned for bulk transfer: BBR where the kernel allows it,
//! buffers sized for the bandwidth-delay product, `TCP_NOTSENT_LOWAT`,
//! `TCP_NODELAY`. Every setting is read back, so the caller can log what is
//! really in effect ([`TuningReport`]); a setting the kernel refuses is a
//! note in the report, never an error.
#![forbid(unsafe_code)]

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Smallest buffer [`SocketTuning::for_link`] asks for.
const BUFFER_BYTES_MIN: usize = 256 * 1024;
/// Largest buffer [`SocketTuning::for_link`] asks for.
const BUFFER_BYTES_MAX: usize = 256 * 1024 * 1024;
const LISTEN_BACKLOG: i32 = 128;

/// What to set on each data socket. `None` leaves the kernel default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketTuning {
    /// Congestion control to ask for (`"bbr"`).
    pub congestion: Option<String>,
    /// `SO_SNDBUF` request (the kernel doubles it and caps it at
    /// `net.core.wmem_max`). Setting it turns off send autotuning.
    pub send_buffer_bytes: Option<usize>,
    /// `SO_RCVBUF` request (capped at `net.core.rmem_max`). Setting it turns
    /// off receive autotuning and fixes the window scale, so it is set
    /// before `connect` / `listen`.
    pub recv_buffer_bytes: Option<usize>,
    /// `TCP_NOTSENT_LOWAT`: how much unsent data the kernel keeps queued;
    /// small keeps latency and memory low while the pipe stays full.
    pub notsent_lowat_bytes: Option<u32>,
    /// `TCP_NODELAY`: no Nagle delay for the small frames between chunks.
    pub nodelay: bool,
}

/// Default `TCP_NOTSENT_LOWAT`. 1 MiB is 10 ms of a 100 MB/s link, so
/// control frames still wait little, while a sender blocked on a full socket
/// is woken once per MiB drained instead of once per 128 KiB: on loopback
/// that cut the sender's system time by about a sixth (0.9 → 0.75 s for
/// 2 GiB; commit 1556b70; session 3 in
/// docs/bench/history.md#tls-and-the-network-path).
pub const NOTSENT_LOWAT_BYTES: u32 = 1024 * 1024;

impl Default for SocketTuning {
    /// BBR, 4 MiB buffers, 1 MiB `TCP_NOTSENT_LOWAT`, no Nagle.
    fn default() -> Self {
        SocketTuning {
            congestion: Some("bbr".into()),
            send_buffer_bytes: Some(4 * 1024 * 1024),
            recv_buffer_bytes: Some(4 * 1024 * 1024),
            notsent_lowat_bytes: Some(NOTSENT_LOWAT_BYTES),
            nodelay: true,
        }
    }
}

impl SocketTuning {
    /// Defaults with buffers of twice the bandwidth-delay product of a link
    /// of `rate_bytes_per_s` and `rtt_ms` (clamped to 256 KiB..256 MiB).
    pub fn for_link(rate_bytes_per_s: u64, rtt_ms: u64) -> Self {
        let bdp_bytes = u128::from(rate_bytes_per_s) * u128::from(rtt_ms) / 1000;
        let want_bytes = usize::try_from(bdp_bytes.saturating_mul(2)).unwrap_or(usize::MAX);
        let buffer_bytes = want_bytes.clamp(BUFFER_BYTES_MIN, BUFFER_BYTES_MAX);
        SocketTuning {
            send_buffer_bytes: Some(buffer_bytes),
            recv_buffer_bytes: Some(buffer_bytes),
            ..Self::default()
        }
    }
}

/// What is really in effect on a socket after tuning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TuningReport {
    /// Congestion control in effect (read back), e.g. `"bbr"` or `"cubic"`.
    pub congestion: String,
    /// Why the requested congestion control is not in effect, if it is not.
    pub congestion_fallback: Option<String>,
    /// `SO_SNDBUF` as read back (the kernel reports twice the usable size).
    pub send_buffer_bytes: usize,
    /// `SO_RCVBUF` as read back.
    pub recv_buffer_bytes: usize,
    /// `TCP_NOTSENT_LOWAT` as read back (0 = kernel default, unlimited).
    pub notsent_lowat_bytes: u32,
    /// `TCP_NODELAY` as read back.
    pub nodelay: bool,
    /// Settings the kernel refused or capped, each saying what to do.
    pub notes: Vec<String>,
}

impl TuningReport {
    /// One line for the log, e.g.
    /// `congestion=bbr sndbuf=8388608 rcvbuf=8388608 notsent_lowat=1048576 nodelay=true`.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "congestion={} sndbuf={} rcvbuf={} notsent_lowat={} nodelay={}",
            self.congestion,
            self.send_buffer_bytes,
            self.recv_buffer_bytes,
            self.notsent_lowat_bytes,
            self.nodelay
        );
        if let Some(why) = &self.congestion_fallback {
            line.push_str(&format!(" ({why})"));
        }
        for note in &self.notes {
            line.push_str("; ");
            line.push_str(note);
        }
        line
    }
}

/// Errors opening sockets. Tuning itself never fails (see [`TuningReport`]).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// socket(2) failed.
    #[error("cannot create a TCP socket for {addr}: {source}")]
    Socket {
        /// The address the socket was for.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// connect(2) failed.
    #[error(
        "cannot connect to {addr}: {source} (is `diskferry serve` running there, \
         and does the firewall allow the port?)"
    )]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// connect(2) did not finish in time.
    #[error(
        "connecting to {addr} timed out after {timeout_ms} ms \
         (is the host reachable, or is a firewall dropping packets?)"
    )]
    ConnectTimeout {
        /// The peer.
        addr: SocketAddr,
        /// How long we waited.
        timeout_ms: u64,
    },
    /// bind(2) or listen(2) failed.
    #[error(
        "cannot listen on {addr}: {source} (is another process using the port? \
         pick another with --listen)"
    )]
    Listen {
        /// The address to listen on.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// Opens a TCP connection to `addr` with `t` applied (buffers before the
/// handshake, so the window scale fits them).
pub fn connect_tuned(
    addr: SocketAddr,
    t: &SocketTuning,
    timeout_ms: u64,
) -> Result<(TcpStream, TuningReport), NetError> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|source| NetError::Socket { addr, source })?;
    let mut notes = Vec::new();
    apply_buffers(&SockRef::from(&socket), t, &mut notes);
    match socket.connect_timeout(&addr.into(), Duration::from_millis(timeout_ms.max(1))) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            return Err(NetError::ConnectTimeout { addr, timeout_ms });
        }
        Err(source) => return Err(NetError::Connect { addr, source }),
    }
    let stream = TcpStream::from(socket);
    let mut report = tune_accepted(&stream, t);
    notes.append(&mut report.notes);
    report.notes = dedup(notes);
    Ok((stream, report))
}

/// Binds and listens on `addr` with `t` applied to the listening socket, so
/// accepted connections inherit the buffers and congestion control. Call
/// [`tune_accepted`] on each accepted stream for the rest and the report.
pub fn listen_tuned(addr: SocketAddr, t: &SocketTuning) -> Result<TcpListener, NetError> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|source| NetError::Socket { addr, source })?;
    let listen_err = |source| NetError::Listen { addr, source };
    socket.set_reuse_address(true).map_err(listen_err)?;
    let mut ignored_notes = Vec::new();
    let sock = SockRef::from(&socket);
    apply_buffers(&sock, t, &mut ignored_notes);
    if let Some(cc) = &t.congestion {
        // Best effort: accepted sockets inherit it; tune_accepted reports.
        let _ = sock.set_tcp_congestion(cc.as_bytes());
    }
    socket.bind(&addr.into()).map_err(listen_err)?;
    socket.listen(LISTEN_BACKLOG).map_err(listen_err)?;
    Ok(TcpListener::from(socket))
}

/// Applies `t` to a connected stream and reports what is in effect.
pub fn tune_accepted(stream: &TcpStream, t: &SocketTuning) -> TuningReport {
    let sock = SockRef::from(stream);
    let mut notes = Vec::new();
    apply_buffers(&sock, t, &mut notes);
    let congestion_fallback = t
        .congestion
        .as_deref()
        .and_then(|cc| set_congestion(&sock, cc).err());
    if let Some(lowat) = t.notsent_lowat_bytes
        && let Err(e) = sock.set_tcp_notsent_lowat(lowat)
    {
        notes.push(format!("TCP_NOTSENT_LOWAT={lowat} refused: {e}"));
    }
    if let Err(e) = sock.set_tcp_nodelay(t.nodelay) {
        notes.push(format!("TCP_NODELAY refused: {e}"));
    }
    let report = TuningReport {
        congestion: read_congestion(&sock),
        congestion_fallback,
        send_buffer_bytes: sock.send_buffer_size().unwrap_or(0),
        recv_buffer_bytes: sock.recv_buffer_size().unwrap_or(0),
        notsent_lowat_bytes: sock.tcp_notsent_lowat().unwrap_or(0),
        nodelay: sock.tcp_nodelay().unwrap_or(false),
        notes: Vec::new(),
    };
    check_buffer_caps(&report, t, &mut notes);
    TuningReport {
        notes: dedup(notes),
        ..report
    }
}

fn apply_buffers(sock: &SockRef<'_>, t: &SocketTuning, notes: &mut Vec<String>) {
    if let Some(bytes) = t.send_buffer_bytes
        && let Err(e) = sock.set_send_buffer_size(bytes)
    {
        notes.push(format!("SO_SNDBUF={bytes} refused: {e}"));
    }
    if let Some(bytes) = t.recv_buffer_bytes
        && let Err(e) = sock.set_recv_buffer_size(bytes)
    {
        notes.push(format!("SO_RCVBUF={bytes} refused: {e}"));
    }
}

/// The kernel doubles a buffer request unless `*mem_max` caps it; a read
/// back value below the request means the cap bit.
fn check_buffer_caps(report: &TuningReport, t: &SocketTuning, notes: &mut Vec<String>) {
    let checks = [
        (
            "send",
            t.send_buffer_bytes,
            report.send_buffer_bytes,
            "net.core.wmem_max",
        ),
        (
            "receive",
            t.recv_buffer_bytes,
            report.recv_buffer_bytes,
            "net.core.rmem_max",
        ),
    ];
    for (what, wanted, got, sysctl) in checks {
        if let Some(wanted) = wanted
            && got < wanted.saturating_mul(2)
        {
            notes.push(format!(
                "{what} buffer capped at {} bytes by {sysctl} (asked {wanted}); \
                 raise it, see tuning/README.md",
                got / 2
            ));
        }
    }
}

/// Sets `cc`; on failure says why and which algorithm stays in effect.
fn set_congestion(sock: &SockRef<'_>, cc: &str) -> Result<(), String> {
    match sock.set_tcp_congestion(cc.as_bytes()) {
        Ok(()) => {
            let now = read_congestion(sock);
            if now == cc {
                Ok(())
            } else {
                Err(format!("{cc} requested but the kernel reports {now}"))
            }
        }
        Err(e) => {
            let why = match e.raw_os_error() {
                Some(libc::ENOENT) => {
                    format!("{cc} unavailable (kernel module not loaded: modprobe tcp_{cc})")
                }
                Some(libc::EPERM) => format!(
                    "{cc} not allowed (add it to net.ipv4.tcp_allowed_congestion_control \
                     or run with CAP_NET_ADMIN)"
                ),
                _ => format!("{cc} refused ({e})"),
            };
            Err(format!("{why}; using {}", read_congestion(sock)))
        }
    }
}

fn read_congestion(sock: &SockRef<'_>) -> String {
    match sock.tcp_congestion() {
        Ok(name) => String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

fn dedup(mut notes: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_link_sizes_buffers_to_twice_the_bdp_within_bounds() {
        // 1 Gbit/s (125 MB/s) at 40 ms: BDP 5 MB, buffers 10 MB.
        let t = SocketTuning::for_link(125_000_000, 40);
        assert_eq!(t.send_buffer_bytes, Some(10_000_000));
        assert_eq!(t.recv_buffer_bytes, Some(10_000_000));
        assert_eq!(
            SocketTuning::for_link(1_000, 1).send_buffer_bytes,
            Some(BUFFER_BYTES_MIN)
        );
        assert_eq!(
            SocketTuning::for_link(u64::MAX, u64::MAX).recv_buffer_bytes,
            Some(BUFFER_BYTES_MAX)
        );
        assert_eq!(t.congestion.as_deref(), Some("bbr"));
    }
}
