//! The stream's state machine frame by frame, without sockets or files:
//! each test feeds frames and completions and checks the actions. The data
//! path is in `frames.rs`, DONE / VERIFY / the endings in `ending.rs`, the
//! property test in `props.rs`; the rig they share is here.

use std::io;
use std::time::{Duration, Instant};

use super::super::events::{Action, ActionResult, End, Health, Input, JobInfo};
use super::Session;
use crate::wire::{
    ByteRange, ChunkDigest, Codec, Data, DataHead, ErrorFrame, Features, Frame, Hello, HelloFlags,
    PassMode,
};

mod delta;
mod ending;
mod frames;
mod pass;
mod props;

pub(super) const SIZE: u64 = 1 << 20;
const CHUNK: u32 = 64 * 1024;

pub(super) fn hello() -> Hello {
    Hello {
        job_id: [7; 16],
        size_bytes: SIZE,
        chunk_size_bytes: CHUNK,
        features: Features(Features::BLAKE3.0 | Features::LZ4.0),
        stream_index: 0,
        stream_count: 1,
        flags: HelloFlags::default(),
        target: "vm1/disk0.img".into(),
        source_identity: "test".into(),
        mode: PassMode::Full,
        sync_id: [5; 16],
        base_sync_id: [0; 16],
        plan_digest: [0; 32],
        change_id: String::new(),
    }
}

pub(super) fn job_info() -> JobInfo {
    JobInfo {
        target_name: "vm1/disk0.img".into(),
        size_bytes: SIZE,
        chunk_size_bytes: CHUNK,
        stream_count: 1,
        checkpoint_interval: Duration::from_secs(3600),
        checkpoint_bytes: 1 << 40,
        instance: 42,
        durable: vec![ByteRange {
            offset: 0,
            len_bytes: 4096,
        }],
        mode: PassMode::Full,
        sync_id: [5; 16],
        replan: vec![],
        planned: None,
    }
}

/// A raw DATA frame of `raw` at `offset`, its BLAKE3 digest right or not.
pub(super) fn data(offset: u64, raw: &[u8], is_digest_right: bool) -> Frame {
    let mut raw_digest = ChunkDigest::Blake3.digest(raw);
    if !is_digest_right {
        raw_digest[0] ^= 1;
    }
    Frame::Data(Data {
        head: DataHead {
            offset,
            raw_len_bytes: raw.len() as u32,
            codec: Codec::None,
            raw_digest,
        },
        payload: raw.to_vec(),
    })
}

pub(super) fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// A session with a clock of its own.
pub(super) struct Rig {
    pub(super) s: Session,
    pub(super) t0: Instant,
    pub(super) now: Instant,
}

impl Rig {
    pub(super) fn new(max_ranges_per_job: usize) -> Self {
        let t0 = Instant::now();
        Rig {
            s: Session::new(max_ranges_per_job, t0),
            t0,
            now: t0,
        }
    }

    /// Attached, WELCOME sent.
    pub(super) fn attached() -> Self {
        let mut rig = Rig::new(1 << 20);
        rig.frame(Frame::Hello(hello()));
        assert!(matches!(rig.next(), Some(Action::Attach(_))));
        rig.done(ActionResult::Attached(Box::new(job_info())));
        assert!(matches!(rig.next(), Some(Action::Send(Frame::Welcome(_)))));
        rig.done(ActionResult::Sent(Ok(())));
        assert!(!rig.s.is_busy());
        rig
    }

    pub(super) fn frame(&mut self, frame: Frame) {
        self.s.input(Input::Frame(frame, Health::Ok), self.now);
    }

    pub(super) fn next(&mut self) -> Option<Action> {
        self.s.poll_action()
    }

    pub(super) fn done(&mut self, completion: ActionResult) {
        self.s.complete(completion, self.now);
    }

    /// Every action left, answering each that needs it with `answer`.
    pub(super) fn run(&mut self, mut answer: impl FnMut(&Action) -> ActionResult) -> Vec<Action> {
        let mut seen = Vec::new();
        while let Some(action) = self.next() {
            let completion = action.needs_completion().then(|| answer(&action));
            seen.push(action);
            if let Some(c) = completion {
                self.done(c);
            }
        }
        seen
    }

    /// Writes `len` bytes at `offset` with flush number 1.
    pub(super) fn write(&mut self, offset: u64, len: usize) {
        self.frame(data(offset, &vec![0xab; len], true));
        let Some(Action::Write { buf, .. }) = self.next() else {
            panic!("no write");
        };
        self.done(ActionResult::Written { buf, result: Ok(1) });
        assert!(matches!(self.next(), Some(Action::Recycle(_))));
        assert!(self.next().is_none());
    }
}

/// Answers every action as a healthy target would.
pub(super) fn healthy(action: &Action) -> ActionResult {
    match action {
        Action::Write { buf, .. } => ActionResult::Written {
            buf: buf.clone(),
            result: Ok(1),
        },
        Action::Zero { .. } => ActionResult::Zeroed(Ok(1)),
        Action::Flush { .. } => ActionResult::Flushed(Ok(())),
        Action::MakeDurable { ranges, .. } => {
            ActionResult::MadeDurable(Ok(ranges.iter().map(|r| r.1).sum()))
        }
        Action::FinishStream => ActionResult::StreamFinished(Ok(())),
        Action::ReadBack { .. } => ActionResult::ReadBack(Ok(([3; 32], SIZE))),
        Action::SyncForStop => ActionResult::Synced(Ok(())),
        Action::Attach(_) => ActionResult::Attached(Box::new(job_info())),
        _ => ActionResult::Sent(Ok(())),
    }
}

/// The ERROR frames sent among `actions`.
pub(super) fn errors(actions: &[Action]) -> Vec<ErrorFrame> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(Frame::Error(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn closed_with(actions: &[Action]) -> Option<&End> {
    match actions.last() {
        Some(Action::Close(end)) => Some(end),
        _ => None,
    }
}
