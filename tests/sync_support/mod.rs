//! A `diskferry serve` process spoken to with raw v2 frames: a first full
//! sync by a real `diskferry send`, then incremental and delta openings by
//! hand (the hostile-peer client of `serve_support`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use diskferry::journal::Journal;
use diskferry::net::{self, TlsDir, TlsRole};
use diskferry::wire::{
    ByteRange, Frame, Hello, PassMode, SyncId, Welcome, plan_digest, sync_id_hex,
};

use crate::rx::{Rx, done};
use crate::serve_support::{self, Client};

pub const MIB: u64 = 1 << 20;
/// Size of the test image.
pub const SIZE: u64 = 4 * MIB;
pub const TARGET: &str = "disk.img";

/// A TLS client of `rx`, with the receiver's own client certificate.
pub fn connect(rx: &Rx) -> Client {
    let tcp = std::net::TcpStream::connect(&rx.addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_millis(
        serve_support::CLIENT_READ_TIMEOUT_MS,
    )))
    .unwrap();
    let clone = tcp.try_clone().unwrap();
    let dir = TlsDir::load(&rx.tls, TlsRole::Client).unwrap();
    let cfg = net::client_config(&dir).unwrap();
    let tls = net::connect(tcp, cfg, "localhost", 5_000).unwrap();
    Client::new(Box::new(tls), clone)
}

/// A receiver in `dir` whose target `TARGET` holds a complete full sync of
/// a random `SIZE`-byte source (sent by `diskferry send`); returns the
/// receiver, the source's bytes and the recorded sync id.
pub fn synced(dir: &Path) -> (Rx, Vec<u8>, SyncId) {
    synced_with(dir, "threads")
}

/// [`synced`], the full sync sent with I/O engine `engine`.
pub fn synced_with(dir: &Path, engine: &str) -> (Rx, Vec<u8>, SyncId) {
    let rx = Rx::start(dir, &[]);
    let src = dir.join("src.img");
    let bytes = serve_support::random_bytes(SIZE as usize, 1);
    std::fs::write(&src, &bytes).unwrap();
    let args = ["--streams", "1", "--io-engine", engine];
    let out = rx.send(src.to_str().unwrap(), TARGET, &args);
    done(&out);
    let j = journal(&rx, TARGET).expect("a journal after a full sync");
    assert!(j.complete);
    let sync_id = j.last_sync_id.expect("a complete sync records its id");
    (rx, bytes, sync_id)
}

/// A HELLO of a `mode` pass of `SIZE` bytes to `target`, one stream.
pub fn pass_hello(job: u8, target: &str, mode: PassMode, sync_id: SyncId) -> Hello {
    Hello {
        mode,
        sync_id,
        size_bytes: SIZE,
        source_identity: format!("source-after-{job}"),
        change_id: format!("CHG-{job}"),
        ..serve_support::hello(job, target, SIZE, 0, 1)
    }
}

/// An incremental HELLO on `base` for `plan`.
pub fn incremental_hello(job: u8, sync_id: SyncId, base: SyncId, plan: &[ByteRange]) -> Hello {
    Hello {
        base_sync_id: base,
        plan_digest: plan_digest(plan),
        ..pass_hello(job, TARGET, PassMode::Incremental, sync_id)
    }
}

/// Sends HELLO and PLAN; the receiver's answer.
pub fn open_incremental(c: &mut Client, hello: &Hello, plan: &[ByteRange]) -> Frame {
    c.send(&Frame::Hello(hello.clone()));
    c.send(&Frame::Plan(plan.to_vec()));
    c.recv().expect("the receiver closed instead of answering")
}

/// As [`open_incremental`], expecting WELCOME.
pub fn welcome_incremental(c: &mut Client, hello: &Hello, plan: &[ByteRange]) -> Welcome {
    match open_incremental(c, hello, plan) {
        Frame::Welcome(w) => w,
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

pub fn range(offset: u64, len_bytes: u64) -> ByteRange {
    ByteRange { offset, len_bytes }
}

/// Writes `bytes[r]` for each range as DATA frames (the new content).
pub fn send_ranges(c: &mut Client, bytes: &[u8], ranges: &[ByteRange]) {
    for r in ranges {
        let (start, end) = (r.offset as usize, (r.offset + r.len_bytes) as usize);
        c.data(r.offset, &bytes[start..end], diskferry::wire::Codec::None);
    }
}

/// BLAKE3 of a file, to show it is untouched.
pub fn checksum(path: &Path) -> [u8; 32] {
    *blake3::hash(&std::fs::read(path).unwrap()).as_bytes()
}

/// The source after a change: `base` with `ranges` overwritten by other
/// random bytes.
pub fn changed(base: &[u8], ranges: &[ByteRange], seed: u64) -> Vec<u8> {
    let mut out = base.to_vec();
    for r in ranges {
        let new = serve_support::random_bytes(r.len_bytes as usize, seed + r.offset);
        out[r.offset as usize..(r.offset + r.len_bytes) as usize].copy_from_slice(&new);
    }
    out
}

/// The journal of `name` read straight from the state directory:
/// `Rx::journal` opens a journal store, which removes the temporary files
/// of saves in progress, so it must not run beside a live receiver.
pub fn journal(rx: &Rx, name: &str) -> Option<Journal> {
    for entry in std::fs::read_dir(&rx.state).ok()? {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "journal") {
            let j = Journal::decode(&std::fs::read(&path).unwrap()).unwrap();
            if j.target_name == name {
                return Some(j);
            }
        }
    }
    None
}

/// Waits until the receiver's journal of `TARGET` satisfies `ok`.
pub fn wait_for_journal(rx: &Rx, ok: impl Fn(&Journal) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if journal(rx, TARGET).is_some_and(|j| ok(&j)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the journal never got there: {:?}\nreceiver log:\n{}",
            journal(rx, TARGET),
            rx.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The message of a refusal must name no receiver path.
pub fn assert_names_no_path(rx: &Rx, message: &str) {
    let root: PathBuf = rx.root.clone();
    assert!(
        !message.contains(root.to_str().unwrap()) && !message.contains(rx.state.to_str().unwrap()),
        "the message names a receiver path: {message}"
    );
}

pub fn hex(id: &SyncId) -> String {
    sync_id_hex(id)
}
