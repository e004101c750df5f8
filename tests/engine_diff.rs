//! Differential property test: random sequences of file ops run through each
//! engine against a real file in a temp dir, and through an in-memory model;
//! every read, every result and the final file must match the model.
//!
//! Ops with pairwise disjoint byte ranges are put in flight together, so the
//! engines also see concurrency, while the outcome stays order-independent.

use diskferry::engine::{self, Completion, EngineKind, Op};
use proptest::prelude::*;
use std::os::fd::AsRawFd;

const FILE_SPAN_BYTES: u64 = 96 * 1024;
const OP_LEN_MAX_BYTES: u32 = 12 * 1024;
const BATCH_OPS_MAX: usize = 8;

#[derive(Debug, Clone)]
enum FileOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Read {
        offset: u64,
        len: u32,
    },
    PunchHole {
        offset: u64,
        len: u64,
    },
    ZeroRange {
        offset: u64,
        len: u64,
        keep_size: bool,
    },
    Allocate {
        offset: u64,
        len: u64,
    },
    Sync {
        datasync: bool,
    },
}

impl FileOp {
    /// Byte range touched; `None` for ops that must run alone.
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            FileOp::Write { offset, data } => Some((*offset, *offset + data.len() as u64)),
            FileOp::Read { offset, len } => Some((*offset, *offset + u64::from(*len))),
            FileOp::PunchHole { offset, len }
            | FileOp::ZeroRange { offset, len, .. }
            | FileOp::Allocate { offset, len } => Some((*offset, *offset + len)),
            FileOp::Sync { .. } => None,
        }
    }
}

fn file_op() -> impl Strategy<Value = FileOp> {
    let offset = 0..FILE_SPAN_BYTES;
    let len = 1..u64::from(OP_LEN_MAX_BYTES);
    prop_oneof![
        4 => (offset.clone(), prop::collection::vec(any::<u8>(), 1..OP_LEN_MAX_BYTES as usize))
            .prop_map(|(offset, data)| FileOp::Write { offset, data }),
        3 => (offset.clone(), 1..OP_LEN_MAX_BYTES)
            .prop_map(|(offset, len)| FileOp::Read { offset, len }),
        1 => (offset.clone(), len.clone()).prop_map(|(offset, len)| FileOp::PunchHole { offset, len }),
        1 => (offset.clone(), len.clone(), any::<bool>())
            .prop_map(|(offset, len, keep_size)| FileOp::ZeroRange { offset, len, keep_size }),
        1 => (offset, len).prop_map(|(offset, len)| FileOp::Allocate { offset, len }),
        1 => any::<bool>().prop_map(|datasync| FileOp::Sync { datasync }),
    ]
}

/// The reference: the file's bytes.
#[derive(Default)]
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn grow_to(&mut self, end: u64) {
        let end = usize::try_from(end).unwrap();
        if end > self.bytes.len() {
            self.bytes.resize(end, 0);
        }
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let start = usize::try_from(offset).unwrap().min(self.bytes.len());
        let end = usize::try_from(offset + len).unwrap().min(self.bytes.len());
        self.bytes[start..end].fill(0);
    }

    /// Apply `op`; returns the expected completion result and, for reads,
    /// the expected bytes.
    fn apply(&mut self, op: &FileOp) -> (i32, Vec<u8>) {
        match op {
            FileOp::Write { offset, data } => {
                self.grow_to(offset + data.len() as u64);
                let start = usize::try_from(*offset).unwrap();
                self.bytes[start..start + data.len()].copy_from_slice(data);
                (i32::try_from(data.len()).unwrap(), Vec::new())
            }
            FileOp::Read { offset, len } => {
                let start = usize::try_from(*offset).unwrap().min(self.bytes.len());
                let end = (start + *len as usize).min(self.bytes.len());
                let expected = self.bytes[start..end].to_vec();
                (i32::try_from(expected.len()).unwrap(), expected)
            }
            FileOp::PunchHole { offset, len } => {
                self.zero(*offset, *len);
                (0, Vec::new())
            }
            FileOp::ZeroRange {
                offset,
                len,
                keep_size,
            } => {
                if !keep_size {
                    self.grow_to(offset + len);
                }
                self.zero(*offset, *len);
                (0, Vec::new())
            }
            FileOp::Allocate { offset, len } => {
                self.grow_to(offset + len);
                (0, Vec::new())
            }
            FileOp::Sync { .. } => (0, Vec::new()),
        }
    }
}

/// Split `ops` into batches whose members touch disjoint ranges. A read
/// that reaches past the size the file had when its batch began runs alone:
/// a concurrent extension of the file would change how much it returns.
fn batches(ops: &[FileOp]) -> Vec<Vec<FileOp>> {
    let mut model_size_bytes = 0u64;
    let mut size_at_batch_start = 0u64;
    let mut out: Vec<Vec<FileOp>> = Vec::new();
    let mut current: Vec<FileOp> = Vec::new();
    for op in ops {
        let is_read = matches!(op, FileOp::Read { .. });
        let fits = match op.range() {
            None => false,
            Some((start, end)) => {
                current.len() < BATCH_OPS_MAX
                    && !(is_read && end > size_at_batch_start)
                    && current.iter().all(|other| {
                        let (o_start, o_end) = other.range().unwrap();
                        end <= o_start || o_end <= start
                    })
            }
        };
        if !fits && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            size_at_batch_start = model_size_bytes;
        }
        current.push(op.clone());
        let range = op.range();
        let alone = match range {
            None => true,
            Some((_, end)) => is_read && end > size_at_batch_start,
        };
        let extends = matches!(
            op,
            FileOp::Write { .. }
                | FileOp::Allocate { .. }
                | FileOp::ZeroRange {
                    keep_size: false,
                    ..
                }
        );
        if let (true, Some((_, end))) = (extends, range) {
            model_size_bytes = model_size_bytes.max(end);
        }
        if alone {
            out.push(std::mem::take(&mut current));
            size_at_batch_start = model_size_bytes;
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn to_engine_op(fd: i32, op: &FileOp, read_buf: &mut [u8]) -> Op {
    match op {
        FileOp::Write { offset, data } => Op::Write {
            fd,
            buf: data.as_ptr(),
            len: data.len() as u32,
            offset: *offset,
        },
        FileOp::Read { offset, len } => Op::Read {
            fd,
            buf: read_buf.as_mut_ptr(),
            len: *len,
            offset: *offset,
        },
        FileOp::PunchHole { offset, len } => Op::Fallocate {
            fd,
            mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset: *offset,
            len: *len,
        },
        FileOp::ZeroRange {
            offset,
            len,
            keep_size,
        } => Op::Fallocate {
            fd,
            mode: libc::FALLOC_FL_ZERO_RANGE
                | if *keep_size {
                    libc::FALLOC_FL_KEEP_SIZE
                } else {
                    0
                },
            offset: *offset,
            len: *len,
        },
        FileOp::Allocate { offset, len } => Op::Fallocate {
            fd,
            mode: 0,
            offset: *offset,
            len: *len,
        },
        FileOp::Sync { datasync } => Op::Fsync {
            fd,
            datasync: *datasync,
        },
    }
}

fn run_against_model(kind: EngineKind, ops: &[FileOp]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let fd = file.as_raw_fd();
    let mut engine = engine::build(kind, BATCH_OPS_MAX as u32).unwrap();
    let mut model = Model::default();

    for batch in batches(ops) {
        // Buffers stay alive (and unmoved) until the whole batch completed.
        let mut read_bufs: Vec<Vec<u8>> = batch
            .iter()
            .map(|_| vec![0xEE; OP_LEN_MAX_BYTES as usize])
            .collect();
        let mut expected = Vec::new();
        for (i, op) in batch.iter().enumerate() {
            engine
                .push(i as u64, to_engine_op(fd, op, &mut read_bufs[i]))
                .unwrap();
            expected.push(model.apply(op));
        }
        prop_assert_eq!(engine.in_flight(), batch.len());
        let mut done: Vec<Completion> = Vec::new();
        engine.wait(batch.len(), &mut done).unwrap();
        prop_assert_eq!(done.len(), batch.len());
        prop_assert_eq!(engine.in_flight(), 0);
        for c in &done {
            let i = c.user_data as usize;
            let (want_result, want_bytes) = &expected[i];
            prop_assert_eq!(c.result, *want_result, "{:?} on {:?}", batch[i], kind);
            if matches!(batch[i], FileOp::Read { .. }) {
                prop_assert_eq!(&read_bufs[i][..want_bytes.len()], &want_bytes[..]);
            }
        }
    }
    drop(engine);
    let on_disk = std::fs::read(&path).unwrap();
    prop_assert_eq!(on_disk.len(), model.bytes.len(), "file size on {:?}", kind);
    prop_assert!(
        on_disk == model.bytes,
        "file content differs from the model on {:?}",
        kind
    );
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn uring_matches_model(ops in prop::collection::vec(file_op(), 1..40)) {
        run_against_model(EngineKind::Uring, &ops)?;
    }

    #[test]
    fn threads_match_model(ops in prop::collection::vec(file_op(), 1..40)) {
        run_against_model(EngineKind::Threads, &ops)?;
    }
}

/// The batching itself must keep reads from racing with extensions and put
/// syncs alone, otherwise the property above would be flaky, not wrong.
#[test]
fn batches_are_disjoint_and_syncs_run_alone() {
    let ops = vec![
        FileOp::Write {
            offset: 0,
            data: vec![1; 100],
        },
        FileOp::Write {
            offset: 200,
            data: vec![2; 100],
        },
        FileOp::Read { offset: 0, len: 50 },
        FileOp::Sync { datasync: true },
        FileOp::Read { offset: 0, len: 50 },
        FileOp::Write {
            offset: 40,
            data: vec![3; 10],
        },
    ];
    let b = batches(&ops);
    let shapes: Vec<usize> = b.iter().map(Vec::len).collect();
    // [w, w] then read (beyond size at batch start 0) alone, sync alone,
    // read (inside size 300) alone because the write overlaps it.
    assert_eq!(shapes, vec![2, 1, 1, 1, 1]);

    // A read past the end must not share a batch with a later extension.
    let ops = vec![
        FileOp::Read {
            offset: 500,
            len: 100,
        },
        FileOp::Write {
            offset: 1000,
            data: vec![4; 10],
        },
        FileOp::Write {
            offset: 0,
            data: vec![5; 10],
        },
    ];
    let shapes: Vec<usize> = batches(&ops).iter().map(Vec::len).collect();
    assert_eq!(shapes, vec![1, 2]);
}
