//! `TCP_INFO` readings the senders use to see how fast a stream really
//! drains (bytes the peer acknowledged, not bytes the socket buffer took).

use std::os::fd::AsRawFd;

/// Bytes of this connection the peer has acknowledged (`tcpi_bytes_acked`).
pub fn bytes_acked(sock: &impl AsRawFd) -> std::io::Result<u64> {
    // SAFETY: tcp_info is plain old data (integers only), so the all-zero
    // bit pattern is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .map_err(|_| std::io::Error::other("tcp_info does not fit a socklen_t"))?;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is a
    // live, writable tcp_info of exactly that size; `len` is a valid
    // socklen_t the kernel may update.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Kernels older than 4.2 return a shorter struct without the field.
    let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + std::mem::size_of::<u64>();
    if (len as usize) < end {
        return Err(std::io::Error::other("kernel reports no tcpi_bytes_acked"));
    }
    Ok(info.tcpi_bytes_acked)
}

/// Bytes waiting in the socket's receive queue (`FIONREAD`): lets a
/// sender look for acknowledgements without blocking.
pub fn bytes_readable(sock: &impl AsRawFd) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into `n`, a live, writable c_int.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    #[test]
    fn acked_bytes_grow_with_what_the_peer_received() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let before = super::bytes_acked(&c).unwrap();
        c.write_all(&[7u8; 100_000]).unwrap();
        let mut buf = vec![0u8; 100_000];
        s.read_exact(&mut buf).unwrap();
        let mut after = super::bytes_acked(&c).unwrap();
        for _ in 0..100 {
            if after >= before + 100_000 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            after = super::bytes_acked(&c).unwrap();
        }
        assert!(after >= before + 100_000, "acked {before} -> {after}");
    }
}
