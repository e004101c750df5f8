//! Regenerates the seed corpus in `fuzz/corpus/` (committed; run this only
//! when a protocol changes): `cargo run --bin seeds`.
//!
//! * `wire_frame`: frames encoded by `diskferry::wire`, each file prefixed
//!   with the four piece-size bytes the target reads first.
//! * `nbd_reply`: hand-made simple and structured replies to
//!   [`diskferry_fuzz::REPLY_REQUESTS`], plus the bytes a real `qemu-nbd`
//!   sends in answer to those requests.
//! * `nbd_handshake`: the bytes real `qemu-nbd` and `nbdkit` servers send
//!   during `negotiate`.
//!
//! The `nbd_reply_bitmap` (two meta contexts) and `changed_areas` seeds are
//! hand-made and left as committed; `cargo test --lib` in fuzz/ checks the
//! bitmap seeds decode cleanly.
//!
//! The servers are started on private Unix sockets and killed at the end;
//! a missing server binary skips its seeds with a message.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use std::{env, fs, thread};

use diskferry::nbd::conn::{ClientConn, Cmd, RecvTarget};
use diskferry::nbd::handshake;
use diskferry::nbd::proto::{self, ChunkHeader};
use diskferry::wire::{
    Ack, ByteRange, Codec, Data, DataHead, ErrorCode, ErrorFrame, Features, Frame, Hello,
    HelloFlags, PassMode, Welcome, block_digest, chunk_digest, plan_digest,
};
use diskferry_fuzz::{REPLY_CONTEXT_ID, REPLY_EXPORT_SIZE_BYTES, REPLY_REQUESTS};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How long a started server gets to accept connections.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let work = env::temp_dir().join(format!("diskferry-seeds-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let result = (|| {
        wire_seeds(&corpus.join("wire_frame"))?;
        reply_seeds(&corpus.join("nbd_reply"))?;
        server_seeds(&corpus, &work)
    })();
    let _ = fs::remove_dir_all(&work);
    result
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)?;
    println!("{}: {} bytes", dir.join(name).display(), bytes.len());
    Ok(())
}

// ---- wire_frame -------------------------------------------------------

fn wire_frames() -> Vec<(&'static str, Frame)> {
    let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                job_id: *b"0123456789abcdef",
                size_bytes: 10 << 30,
                chunk_size_bytes: 2 << 20,
                features: Features::KNOWN,
                stream_index: 1,
                stream_count: 4,
                flags: HelloFlags::RESTART,
                target: "vm-disk0".into(),
                source_identity: "size=10737418240 gen=7".into(),
                mode: PassMode::Full,
                sync_id: *b"sync-id-0123456\x01",
                base_sync_id: [0; 16],
                plan_digest: [0; 32],
                change_id: String::new(),
            }),
        ),
        (
            "hello_incremental",
            Frame::Hello(Hello {
                job_id: *b"0123456789abcdef",
                size_bytes: 10 << 30,
                chunk_size_bytes: 2 << 20,
                features: Features::KNOWN,
                stream_index: 0,
                stream_count: 2,
                flags: HelloFlags::default(),
                target: "vm-disk0".into(),
                source_identity: "size=10737418240 gen=8".into(),
                mode: PassMode::Incremental,
                sync_id: *b"sync-id-0123456\x02",
                base_sync_id: *b"sync-id-0123456\x01",
                plan_digest: plan_digest(&seed_plan()),
                change_id: "CHG-2026-17".into(),
            }),
        ),
        ("plan", Frame::Plan(seed_plan())),
        (
            "digest_request",
            Frame::DigestRequest {
                offset: 4 << 20,
                len_bytes: 1 << 20,
                block_bytes: 64 << 10,
            },
        ),
        (
            "digests",
            Frame::Digests {
                offset: 4 << 20,
                block_bytes: 64 << 10,
                digests: vec![block_digest(&payload), block_digest(&[0; 4096])],
            },
        ),
        (
            "welcome",
            Frame::Welcome(Welcome {
                features: Features::BLAKE3.union(Features::RESUME),
                instance: 0x1234_5678_9abc_def0,
                sync_id: *b"sync-id-0123456\x01",
                replan: vec![ByteRange {
                    offset: 8 << 20,
                    len_bytes: 4096,
                }],
                durable: vec![
                    ByteRange {
                        offset: 0,
                        len_bytes: 1 << 20,
                    },
                    ByteRange {
                        offset: 4 << 20,
                        len_bytes: 2 << 20,
                    },
                ],
            }),
        ),
        (
            "data_raw",
            Frame::Data(Data {
                head: DataHead {
                    offset: 1 << 21,
                    raw_len_bytes: 4096,
                    codec: Codec::None,
                    raw_digest: chunk_digest(&payload),
                },
                payload: payload.clone(),
            }),
        ),
        (
            "data_zstd",
            Frame::Data(Data {
                head: DataHead {
                    offset: 0,
                    raw_len_bytes: 4096,
                    codec: Codec::Zstd,
                    raw_digest: chunk_digest(&payload),
                },
                payload: payload[..100].to_vec(),
            }),
        ),
        (
            "zero",
            Frame::Zero(ByteRange {
                offset: 8 << 20,
                len_bytes: 64 << 20,
            }),
        ),
        ("barrier", Frame::Barrier { seq: 3 }),
        (
            "ack",
            Frame::Ack(Ack {
                seq: 3,
                bytes_durable_total: 3 << 20,
                durable_added: vec![ByteRange {
                    offset: 1 << 21,
                    len_bytes: 4096,
                }],
            }),
        ),
        (
            "done",
            Frame::Done {
                total_bytes_sent: 3 << 20,
                frames: 12,
            },
        ),
        (
            "verify_request",
            Frame::VerifyRequest {
                window_bytes: 1 << 20,
            },
        ),
        (
            "verify_result",
            Frame::VerifyResult {
                digest: chunk_digest(b"image"),
                bytes_read: 10 << 30,
            },
        ),
        (
            "error",
            Frame::Error(ErrorFrame {
                code: ErrorCode::SourceMismatch,
                message: "journal written for another source".into(),
            }),
        ),
        (
            "error_base_mismatch",
            Frame::Error(ErrorFrame {
                code: ErrorCode::BaseMismatch,
                message: "the target's last sync is 73796e632d69642d3031323334353601".into(),
            }),
        ),
        ("ping", Frame::Ping { nonce: 42 }),
        ("pong", Frame::Pong { nonce: 42 }),
    ]
}

/// The changed set of the incremental seeds.
fn seed_plan() -> Vec<ByteRange> {
    vec![
        ByteRange {
            offset: 0,
            len_bytes: 64 << 10,
        },
        ByteRange {
            offset: 8 << 20,
            len_bytes: 4096,
        },
    ]
}

fn wire_seeds(dir: &Path) -> Result<()> {
    let mut session = vec![7, 1, 200, 33];
    for (name, frame) in wire_frames() {
        let mut bytes = vec![255, 255, 255, 255];
        frame.encode(&mut bytes)?;
        save(dir, name, &bytes)?;
        frame.encode(&mut session)?;
    }
    save(dir, "session_small_pieces", &session)
}

// ---- nbd_reply --------------------------------------------------------

fn chunk(flags: u16, reply_type: u16, cookie: u64, body: &[u8]) -> Vec<u8> {
    let h = ChunkHeader {
        flags,
        reply_type,
        cookie,
        len_bytes: u32::try_from(body.len()).expect("small body"),
    };
    let mut v = proto::encode_chunk_header(&h).to_vec();
    v.extend_from_slice(body);
    v
}

fn reply_seeds(dir: &Path) -> Result<()> {
    let done = proto::REPLY_FLAG_DONE;
    // Simple replies (a server without structured replies; BLOCK_STATUS is
    // left unanswered).
    let mut simple = proto::encode_simple_reply(0, 1).to_vec();
    simple.extend(std::iter::repeat_n(0xa5, 4096));
    simple.extend_from_slice(&proto::encode_simple_reply(0, 3));
    simple.extend_from_slice(&proto::encode_simple_reply(proto::NBD_EIO, 4));
    save(dir, "simple", &simple)?;

    let mut structured = Vec::new();
    let mut data = 0u64.to_be_bytes().to_vec();
    data.extend(std::iter::repeat_n(0x5a, 2048));
    structured.extend(chunk(0, proto::REPLY_TYPE_OFFSET_DATA, 1, &data));
    let mut hole = 2048u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&2048u32.to_be_bytes());
    structured.extend(chunk(done, proto::REPLY_TYPE_OFFSET_HOLE, 1, &hole));
    let mut bs = REPLY_CONTEXT_ID.to_be_bytes().to_vec();
    for (len, flags) in [(32768u32, 0u32), (32768, 3)] {
        bs.extend_from_slice(&len.to_be_bytes());
        bs.extend_from_slice(&flags.to_be_bytes());
    }
    structured.extend(chunk(done, proto::REPLY_TYPE_BLOCK_STATUS, 2, &bs));
    structured.extend(chunk(done, proto::REPLY_TYPE_NONE, 3, &[]));
    let msg = b"I/O error on the backing file";
    let mut err = proto::NBD_EIO.to_be_bytes().to_vec();
    err.extend_from_slice(&u16::try_from(msg.len())?.to_be_bytes());
    err.extend_from_slice(msg);
    structured.extend(chunk(done, proto::REPLY_TYPE_ERROR, 4, &err));
    save(dir, "structured", &structured)
}

// ---- real servers -----------------------------------------------------

/// Records every byte read from the server.
struct Recorder {
    stream: UnixStream,
    read: Vec<u8>,
}

impl Read for Recorder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.read.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// A server child process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(program: &str, args: &[&str], sock: &Path) -> Result<Option<Server>> {
    let child = match Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => Server(c),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            println!("{program} not installed: its seeds are skipped");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let deadline = Instant::now() + SERVER_START_TIMEOUT;
    while UnixStream::connect(sock).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{program} did not accept on {}", sock.display()).into());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(child))
}

fn connect(sock: &Path) -> Result<Recorder> {
    let stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(Recorder {
        stream,
        read: Vec::new(),
    })
}

fn server_seeds(corpus: &Path, work: &Path) -> Result<()> {
    let image = work.join("disk.raw");
    let mut content = vec![0u8; usize::try_from(REPLY_EXPORT_SIZE_BYTES)?];
    content[..2048].fill(0x11);
    fs::write(&image, &content)?;
    let sock: PathBuf = work.join("qemu.sock");
    let (sock_s, image_s) = (path_str(&sock)?, path_str(&image)?);
    let qemu = ["-t", "-k", sock_s, "-f", "raw", image_s];
    if let Some(_server) = start("qemu-nbd", &qemu, &sock)? {
        {
            // qemu-nbd serves one client at a time: close this one first.
            let mut c = connect(&sock)?;
            handshake::negotiate(&mut c, "", &["base:allocation"])?;
            save(&corpus.join("nbd_handshake"), "qemu-nbd", &c.read)?;
        }
        save(&corpus.join("nbd_reply"), "qemu-nbd", &real_replies(&sock)?)?;
    }
    let sock = work.join("nbdkit.sock");
    let nbdkit = ["-f", "-U", path_str(&sock)?, "memory", "1M"];
    if let Some(_server) = start("nbdkit", &nbdkit, &sock)? {
        let mut c = connect(&sock)?;
        handshake::negotiate(&mut c, "", &["base:allocation"])?;
        save(&corpus.join("nbd_handshake"), "nbdkit-memory", &c.read)?;
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| "non-UTF-8 temp path".into())
}

/// Sends [`REPLY_REQUESTS`] to the server on `sock` and returns every byte
/// of its replies (after the handshake).
fn real_replies(sock: &Path) -> Result<Vec<u8>> {
    let mut c = connect(sock)?;
    let info = handshake::negotiate(&mut c, "", &["base:allocation"])?;
    let Some(id) = info.context_id("base:allocation") else {
        return Err("server did not accept base:allocation".into());
    };
    if id != REPLY_CONTEXT_ID {
        println!("note: server chose context id {id}; the fuzz target assumes {REPLY_CONTEXT_ID}");
    }
    let mut conn = ClientConn::new(&info);
    let mut header = [0u8; proto::REQUEST_BYTES];
    for (cookie, cmd) in REPLY_REQUESTS {
        conn.encode_request(cookie, cmd, &mut header)?;
        c.write_all(&header)?;
        if let Cmd::Write { len, .. } = cmd {
            c.write_all(&vec![0x33; usize::try_from(len)?])?;
        }
    }
    c.flush()?;
    c.read.clear();
    let mut events = Vec::new();
    let mut payload = vec![0u8; 64 * 1024];
    while conn.in_flight() > 0 {
        let n = match conn.recv_target() {
            RecvTarget::Scratch { len } => c.read(&mut conn.scratch_mut()[..len])?,
            RecvTarget::Payload { len, .. } => {
                let len = usize::try_from(len)?.min(payload.len());
                c.read(&mut payload[..len])?
            }
        };
        if n == 0 {
            return Err("server closed the connection mid-reply".into());
        }
        conn.advance(n, &mut events)?;
    }
    Ok(c.read)
}
