//! An in-process receiver and a small test sender speaking raw frames.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diskferry::net::{self, TlsDir, TlsRole};
use diskferry::replicate::receive::serve::{ServeError, ServeOptions, Server};
use diskferry::wire::{
    Codec, DataHead, ErrorCode, Features, Frame, FrameDecoder, Hello, HelloFlags, ImageDigest,
    PassMode, chunk_digest, encode_data_header,
};

pub const CLIENT_READ_TIMEOUT_MS: u64 = 15_000;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub certs: PathBuf,
    pub addr: SocketAddr,
    pub stop: Arc<AtomicBool>,
    pub plaintext: bool,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Harness {
    pub fn start(plaintext: bool) -> Harness {
        Self::start_with(plaintext, |_| {})
    }

    pub fn start_with(plaintext: bool, adjust: impl FnOnce(&mut ServeOptions)) -> Harness {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_max_level(tracing::Level::DEBUG)
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let certs = dir.path().join("certs");
        std::fs::create_dir(&root).unwrap();
        net::certs::init(&certs, &[], false).unwrap();
        let mut opts = ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            target_root: root.clone(),
            tls_dir: (!plaintext).then(|| certs.clone()),
            state_dir: Some(dir.path().join("state")),
            checkpoint_interval: diskferry::journal::CHECKPOINT_INTERVAL_DEFAULT,
            checkpoint_bytes: diskferry::journal::CHECKPOINT_BYTES_DEFAULT,
            insecure_plaintext: plaintext,
            allow: Vec::new(),
            limits: Default::default(),
            target_mode: diskferry::replicate::receive::serve::TARGET_MODE_DEFAULT,
        };
        adjust(&mut opts);
        let server = Server::bind(opts).unwrap();
        let addr = server.local_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_for_thread = Arc::clone(&stop);
        let thread = std::thread::spawn(move || server.run(stop_for_thread));
        Harness {
            dir,
            root,
            certs,
            addr,
            stop,
            plaintext,
            thread: Some(thread),
        }
    }

    /// Sets the stop flag, waits for run() and returns how long it took.
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        self.stop.store(true, Ordering::SeqCst);
        let result = self.thread.take().unwrap().join().unwrap();
        assert!(result.is_ok(), "run() failed: {result:?}");
        started.elapsed()
    }

    pub fn tcp(&self) -> TcpStream {
        let tcp = TcpStream::connect(self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(CLIENT_READ_TIMEOUT_MS)))
            .unwrap();
        tcp
    }

    /// A connected client (TLS with the harness's client certificate, or
    /// plain TCP for a plaintext receiver).
    pub fn connect(&self) -> Client {
        let tcp = self.tcp();
        let clone = tcp.try_clone().unwrap();
        if self.plaintext {
            return Client::new(Box::new(tcp), clone);
        }
        let dir = TlsDir::load(&self.certs, TlsRole::Client).unwrap();
        let cfg = net::client_config(&dir).unwrap();
        let tls = net::connect(tcp, cfg, "localhost", 5_000).unwrap();
        Client::new(Box::new(tls), clone)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct Client {
    pub io: Box<dyn Stream>,
    /// The TCP socket under `io`, for shutting it down.
    pub tcp: TcpStream,
    decoder: FrameDecoder,
    /// DATA payload bytes sent.
    pub payload_bytes: u64,
    pub frames: u64,
}

impl Client {
    pub fn new(io: Box<dyn Stream>, tcp: TcpStream) -> Client {
        Client {
            io,
            tcp,
            decoder: FrameDecoder::new(),
            payload_bytes: 0,
            frames: 0,
        }
    }

    pub fn send(&mut self, frame: &Frame) {
        let mut out = Vec::new();
        frame.encode(&mut out).unwrap();
        self.send_raw(&out);
        self.frames += 1;
    }

    /// Half-closes the connection (TCP FIN, no TLS close_notify).
    pub fn close_write(&mut self) {
        self.tcp.shutdown(std::net::Shutdown::Write).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).unwrap();
        self.io.flush().unwrap();
    }

    /// The next frame, or `None` when the receiver closed the connection.
    pub fn recv(&mut self) -> Option<Frame> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(e) => panic!("receiver sent a bad frame: {e}"),
            }
            match self.io.read(self.decoder.buf_mut()) {
                Ok(0) => return None,
                Ok(n) => self.decoder.advance(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::UnexpectedEof
                            | ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("client read failed: {e}"),
            }
        }
    }

    /// Expects an ERROR frame and then the end of the connection.
    pub fn expect_error(&mut self) -> (ErrorCode, String) {
        match self.recv() {
            Some(Frame::Error(e)) => {
                assert!(self.recv().is_none(), "the receiver must close after ERROR");
                (e.code, e.message)
            }
            other => panic!("expected ERROR, got {other:?}"),
        }
    }

    /// Sends HELLO and returns the reply.
    pub fn hello(&mut self, hello: &Hello) -> Frame {
        self.send(&Frame::Hello(hello.clone()));
        self.recv()
            .expect("receiver closed instead of answering HELLO")
    }

    /// Sends HELLO and expects WELCOME; returns the accepted features.
    pub fn welcome(&mut self, hello: &Hello) -> Features {
        match self.hello(hello) {
            Frame::Welcome(w) => {
                assert!(w.durable.is_empty());
                w.features
            }
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Sends one DATA frame of `raw` at `offset`, compressed with `codec`.
    pub fn data(&mut self, offset: u64, raw: &[u8], codec: Codec) {
        let payload = match codec {
            Codec::None => raw.to_vec(),
            Codec::Lz4 | Codec::Zstd => {
                let mut out = Vec::new();
                diskferry::compress::compress(codec, 1, raw, &mut out).unwrap();
                assert!(out.len() < raw.len(), "test data must compress");
                out
            }
        };
        self.data_raw(offset, raw.len() as u32, codec, chunk_digest(raw), &payload);
    }

    /// A DATA frame with explicit fields (for hostile cases).
    pub fn data_raw(
        &mut self,
        offset: u64,
        raw_len_bytes: u32,
        codec: Codec,
        raw_digest: [u8; 32],
        payload: &[u8],
    ) {
        let head = DataHead {
            offset,
            raw_len_bytes,
            codec,
            raw_digest,
        };
        let header = encode_data_header(&head, payload.len() as u32).unwrap();
        self.io.write_all(&header).unwrap();
        self.io.write_all(payload).unwrap();
        self.io.flush().unwrap();
        self.payload_bytes += payload.len() as u64;
        self.frames += 1;
    }

    /// BARRIER `seq`; returns the ACK.
    pub fn barrier(&mut self, seq: u64) -> diskferry::wire::Ack {
        self.send(&Frame::Barrier { seq });
        match self.recv() {
            Some(Frame::Ack(ack)) => {
                assert_eq!(ack.seq, seq);
                ack
            }
            other => panic!("expected ACK {seq}, got {other:?}"),
        }
    }

    /// DONE, then a PING round trip (so DONE was handled).
    pub fn done(&mut self) {
        let frames = self.frames;
        self.send(&Frame::Done {
            total_bytes_sent: self.payload_bytes,
            frames,
        });
        self.ping(7);
    }

    pub fn ping(&mut self, nonce: u64) {
        self.send(&Frame::Ping { nonce });
        assert_eq!(self.recv(), Some(Frame::Pong { nonce }));
    }
}

pub fn hello(job: u8, target: &str, size_bytes: u64, stream_index: u16, streams: u16) -> Hello {
    Hello {
        job_id: [job; 16],
        size_bytes,
        chunk_size_bytes: 1 << 20,
        features: Features(Features::BLAKE3.0 | Features::LZ4.0 | Features::ZSTD.0),
        stream_index,
        stream_count: streams,
        flags: HelloFlags::default(),
        target: target.to_string(),
        source_identity: "test-source".into(),
        mode: PassMode::Full,
        // Per job, never all zero.
        sync_id: [job | 0x80; 16],
        base_sync_id: [0; 16],
        plan_digest: [0; 32],
        change_id: String::new(),
    }
}

/// Deterministic pseudo-random bytes (incompressible).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Compressible bytes (text-like).
pub fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        b"disk ".as_slice(),
        b"ferry ",
        b"chunk ",
        b"zero ",
        b"block ",
    ];
    let mut out = Vec::with_capacity(len);
    let mut i = seed as usize;
    while out.len() < len {
        out.extend_from_slice(words[i % words.len()]);
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    out.truncate(len);
    out
}

/// The image digest of `image` in `window_bytes` windows.
pub fn image_digest(image: &[u8], window_bytes: u32) -> [u8; 32] {
    let mut d = ImageDigest::new(image.len() as u64, window_bytes).unwrap();
    for (i, w) in image.chunks(window_bytes as usize).enumerate() {
        d.hash_window(i as u64, w).unwrap();
    }
    d.finish().unwrap()
}

/// Bytes allocated on disk for `path`.
pub fn allocated_bytes(path: &Path) -> u64 {
    diskferry::endpoint::file::allocated_bytes(path)
}
