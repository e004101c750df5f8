//! Both engines against real sockets and files: socket send/receive (whole
//! and partial), many ops in flight, the in-flight limit, errno results and
//! what dropping an engine with ops in flight does.

use diskferry::engine::threads::ThreadsEngine;
use diskferry::engine::uring::UringEngine;
use diskferry::engine::{self, Completion, EngineKind, IoEngine, Op};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

const KINDS: [EngineKind; 2] = [EngineKind::Uring, EngineKind::Threads];

fn pattern(len_bytes: usize, seed: u8) -> Vec<u8> {
    (0..len_bytes)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Wait until `count` completions arrived, in whatever batches they come.
fn wait_for(engine: &mut dyn IoEngine, count: usize) -> Vec<Completion> {
    let mut done = Vec::new();
    while done.len() < count {
        engine.wait(1, &mut done).unwrap();
    }
    assert_eq!(done.len(), count, "no more completions than ops");
    done
}

/// Send `payload` with one Writev (three uneven iovecs) through an engine of
/// `writer` kind and receive it with one waitall Recv through an engine of
/// `reader` kind, each on its own thread. The payload is larger than the
/// socket buffers, so both ops must make progress concurrently.
fn writev_to_waitall_recv(writer: EngineKind, reader: EngineKind, a: i32, b: i32) {
    let payload = pattern(3 << 20, 7);
    let total = payload.len();
    let sender = std::thread::spawn({
        let payload = payload.clone();
        move || {
            let mut engine = engine::build(writer, 4).unwrap();
            let cuts = [0, 1000, 700_000, payload.len()];
            let iovs: Vec<libc::iovec> = cuts
                .windows(2)
                .map(|w| libc::iovec {
                    iov_base: payload[w[0]..].as_ptr().cast_mut().cast(),
                    iov_len: w[1] - w[0],
                })
                .collect();
            engine
                .push(
                    1,
                    Op::Writev {
                        fd: a,
                        iov: iovs.as_ptr(),
                        iovcnt: 3,
                    },
                )
                .unwrap();
            let done = wait_for(engine.as_mut(), 1);
            // A short send must fail the test, not hang the receiver: close
            // our direction so a waiting Recv sees end of stream.
            // SAFETY: shutdown takes no pointers; `a` is still open (the
            // caller's stream outlives this thread, which it joins).
            unsafe { libc::shutdown(a, libc::SHUT_WR) };
            done
        }
    });
    let mut engine = engine::build(reader, 4).unwrap();
    let mut got = vec![0u8; total];
    let op = Op::Recv {
        fd: b,
        buf: got.as_mut_ptr(),
        len: total as u32,
        waitall: true,
    };
    engine.push(2, op).unwrap();
    let recv_done = wait_for(engine.as_mut(), 1);
    let send_done = sender.join().unwrap();
    assert_eq!(
        send_done,
        vec![Completion {
            user_data: 1,
            result: total as i32
        }]
    );
    assert_eq!(
        recv_done,
        vec![Completion {
            user_data: 2,
            result: total as i32
        }]
    );
    assert!(
        got == payload,
        "{writer} -> {reader}: received bytes differ"
    );
}

#[test]
fn writev_and_waitall_recv_over_unix_socketpair_all_engine_pairs() {
    for writer in KINDS {
        for reader in KINDS {
            let (a, b) = UnixStream::pair().unwrap();
            writev_to_waitall_recv(writer, reader, a.as_raw_fd(), b.as_raw_fd());
        }
    }
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

#[test]
fn writev_and_waitall_recv_over_tcp_all_engine_pairs() {
    for writer in KINDS {
        for reader in KINDS {
            let (a, b) = tcp_pair();
            writev_to_waitall_recv(writer, reader, a.as_raw_fd(), b.as_raw_fd());
        }
    }
}

/// Without waitall a Recv returns what is there (at least one byte, at most
/// `len`); reassembling the pieces gives back the stream.
#[test]
fn partial_recvs_reassemble_the_stream() {
    for kind in KINDS {
        let (mut a, b) = tcp_pair();
        let mut engine = engine::build(kind, 2).unwrap();
        let mut buf = vec![0u8; 64 * 1024];

        // Deterministic short read: 1000 bytes are queued, 64 KiB asked.
        a.write_all(&[9u8; 1000]).unwrap();
        let op = Op::Recv {
            fd: b.as_raw_fd(),
            buf: buf.as_mut_ptr(),
            len: 64 * 1024,
            waitall: false,
        };
        engine.push(77, op).unwrap();
        assert_eq!(
            wait_for(engine.as_mut(), 1),
            vec![Completion {
                user_data: 77,
                result: 1000
            }]
        );
        assert!(buf[..1000].iter().all(|&x| x == 9), "{kind}");

        let payload = pattern(1 << 20, 3);
        let writer = std::thread::spawn({
            let payload = payload.clone();
            move || {
                for piece in payload.chunks(10_000) {
                    a.write_all(piece).unwrap();
                }
            }
        });
        let mut got = Vec::with_capacity(payload.len());
        let mut recvs = 0u64;
        while got.len() < payload.len() {
            let op = Op::Recv {
                fd: b.as_raw_fd(),
                buf: buf.as_mut_ptr(),
                len: 64 * 1024,
                waitall: false,
            };
            engine.push(recvs, op).unwrap();
            let done = wait_for(engine.as_mut(), 1);
            assert_eq!(done[0].user_data, recvs);
            let n = usize::try_from(done[0].result).expect("recv failed");
            assert!((1..=buf.len()).contains(&n), "{kind}: recv returned {n}");
            got.extend_from_slice(&buf[..n]);
            recvs += 1;
        }
        writer.join().unwrap();
        assert!(got == payload, "{kind}: reassembled stream differs");
        assert!(
            recvs >= 16,
            "{kind}: 1 MiB cannot arrive in fewer than 16 64 KiB recvs"
        );
    }
}

#[test]
fn sixty_four_writes_in_flight_then_the_limit_refuses_the_next() {
    for kind in KINDS {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .unwrap();
        let fd = file.as_raw_fd();
        let mut engine = engine::build(kind, 64).unwrap();
        let blocks: Vec<Vec<u8>> = (0..64).map(|i| pattern(4096, i as u8)).collect();
        for (i, block) in blocks.iter().enumerate() {
            let offset = (63 - i as u64) * 4096; // backwards, to be order-sensitive
            engine
                .push(
                    1000 + i as u64,
                    Op::Write {
                        fd,
                        buf: block.as_ptr(),
                        len: 4096,
                        offset,
                    },
                )
                .unwrap();
        }
        assert_eq!(engine.in_flight(), 64);
        let extra = [0u8; 1];
        let err = engine
            .push(
                9,
                Op::Write {
                    fd,
                    buf: extra.as_ptr(),
                    len: 1,
                    offset: 0,
                },
            )
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{kind}");
        assert_eq!(
            engine.in_flight(),
            64,
            "{kind}: refused push must not count"
        );
        let err = engine.wait(65, &mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{kind}");

        let mut done = wait_for(engine.as_mut(), 64);
        assert_eq!(engine.in_flight(), 0);
        done.sort_by_key(|c| c.user_data);
        let want: Vec<Completion> = (0..64)
            .map(|i| Completion {
                user_data: 1000 + i,
                result: 4096,
            })
            .collect();
        assert_eq!(done, want, "{kind}");

        let on_disk = std::fs::read(dir.path().join("f")).unwrap();
        assert_eq!(on_disk.len(), 64 * 4096);
        for (i, block) in blocks.iter().enumerate() {
            let at = (63 - i) * 4096;
            assert!(
                on_disk[at..at + 4096] == block[..],
                "{kind}: block {i} misplaced"
            );
        }
    }
}

/// 64 receives that each block until their peer sends, all in flight at
/// once; the peers are fed in reverse order. An engine that ran fewer ops
/// at a time than it accepted would deadlock here.
fn sixty_four_blocked_recvs(engine: &mut dyn IoEngine) {
    let pairs: Vec<(UnixStream, UnixStream)> =
        (0..64).map(|_| UnixStream::pair().unwrap()).collect();
    let mut bufs = vec![[0u8; 100]; 64];
    for (i, ((_, b), buf)) in pairs.iter().zip(bufs.iter_mut()).enumerate() {
        let op = Op::Recv {
            fd: b.as_raw_fd(),
            buf: buf.as_mut_ptr(),
            len: 100,
            waitall: true,
        };
        engine.push(i as u64, op).unwrap();
    }
    let mut none_yet = Vec::new();
    engine.wait(0, &mut none_yet).unwrap();
    assert!(none_yet.is_empty(), "a recv completed before any peer sent");
    for (i, (a, _)) in pairs.iter().enumerate().rev() {
        // Two writes per peer, so waitall has to join them.
        (&*a).write_all(&[i as u8; 40]).unwrap();
        (&*a).write_all(&[!(i as u8); 60]).unwrap();
    }
    let done = wait_for(engine, 64);
    for c in &done {
        assert_eq!(c.result, 100);
        let i = c.user_data as usize;
        assert!(bufs[i][..40].iter().all(|&x| x == i as u8));
        assert!(bufs[i][40..].iter().all(|&x| x == !(i as u8)));
    }
}

#[test]
fn sixty_four_blocked_recvs_complete_on_uring() {
    sixty_four_blocked_recvs(&mut UringEngine::new(64).unwrap());
}

#[test]
fn sixty_four_blocked_recvs_complete_on_threads_which_spawn_lazily() {
    let mut engine = ThreadsEngine::new(64).unwrap();
    assert_eq!(engine.threads_spawned(), 0, "idle engine starts no thread");
    sixty_four_blocked_recvs(&mut engine);
    assert_eq!(engine.threads_spawned(), 64);

    let mut small = ThreadsEngine::new(64).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    for round in 0..5u8 {
        (&a).write_all(&[round]).unwrap();
        let mut byte = [0u8; 1];
        small
            .push(
                0,
                Op::Recv {
                    fd: b.as_raw_fd(),
                    buf: byte.as_mut_ptr(),
                    len: 1,
                    waitall: true,
                },
            )
            .unwrap();
        assert_eq!(wait_for(&mut small, 1)[0].result, 1);
        assert_eq!(byte[0], round);
    }
    assert_eq!(
        small.threads_spawned(),
        1,
        "one op at a time needs one thread"
    );
}

#[test]
fn read_on_a_bad_fd_reports_ebadf() {
    for kind in KINDS {
        let mut engine = engine::build(kind, 2).unwrap();
        let mut buf = [0u8; 16];
        let bad_fd = 1_000_000; // above any fd limit here, never open
        engine
            .push(
                5,
                Op::Read {
                    fd: bad_fd,
                    buf: buf.as_mut_ptr(),
                    len: 16,
                    offset: 0,
                },
            )
            .unwrap();
        engine
            .push(
                6,
                Op::Fsync {
                    fd: bad_fd,
                    datasync: true,
                },
            )
            .unwrap();
        let mut done = wait_for(engine.as_mut(), 2);
        done.sort_by_key(|c| c.user_data);
        assert_eq!(
            done,
            vec![
                Completion {
                    user_data: 5,
                    result: -libc::EBADF
                },
                Completion {
                    user_data: 6,
                    result: -libc::EBADF
                }
            ],
            "{kind}"
        );
    }
}

#[test]
fn writev_to_a_closed_peer_is_epipe_not_sigpipe() {
    for kind in KINDS {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut engine = engine::build(kind, 1).unwrap();
        let data = [1u8; 10];
        let iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: 10,
        };
        engine
            .push(
                1,
                Op::Writev {
                    fd: a.as_raw_fd(),
                    iov: &iov,
                    iovcnt: 1,
                },
            )
            .unwrap();
        assert_eq!(
            wait_for(engine.as_mut(), 1)[0].result,
            -libc::EPIPE,
            "{kind}"
        );
    }
}

/// Dropping a threaded engine with a Recv in flight waits for it: the buffer
/// is filled when drop returns.
#[test]
fn threads_drop_waits_for_ops_in_flight() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut buf = [0u8; 8];
    let mut engine = ThreadsEngine::new(1).unwrap();
    engine
        .push(
            1,
            Op::Recv {
                fd: b.as_raw_fd(),
                buf: buf.as_mut_ptr(),
                len: 8,
                waitall: true,
            },
        )
        .unwrap();
    let feeder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        (&a).write_all(b"diskferr").unwrap();
        a
    });
    drop(engine);
    assert_eq!(&buf, b"diskferr");
    feeder.join().unwrap();
}

/// Dropping an io_uring engine with a Recv in flight cancels it and waits
/// for the cancellation: drop returns, and data sent afterwards is still in
/// the socket, not swallowed into the freed buffer.
#[test]
fn uring_drop_cancels_a_pending_recv_and_waits() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let mut buf = [0u8; 8];
    let mut engine = UringEngine::new(1).unwrap();
    engine
        .push(
            1,
            Op::Recv {
                fd: b.as_raw_fd(),
                buf: buf.as_mut_ptr(),
                len: 8,
                waitall: true,
            },
        )
        .unwrap();
    engine.wait(0, &mut Vec::new()).unwrap(); // submitted, now blocked in the kernel
    drop(engine);
    (&a).write_all(b"afterward").unwrap();
    let mut got = [0u8; 9];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"afterward");
    assert_eq!(buf, [0u8; 8]);
}
