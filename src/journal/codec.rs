//! [`Journal`] and its binary encoding. Sans-IO: bytes in, bytes out.
//!
//! Layout of version 2, the one written (integers little-endian):
//!
//! | size | field |
//! |---:|---|
//! | 8 | magic `DFJOURNL` |
//! | 4 | `version` (2) |
//! | 4 | `flags`: bit 0 complete, bit 1 target stamp present; other bits must be 0 |
//! | 8 | `size_bytes` |
//! | 4 | `chunk_size_bytes` |
//! | 16 | `job_id` |
//! | 8 | `updated_unix_s` |
//! | 4 | `pass_mode`: 0 full, 1 incremental, 2 delta |
//! | 16 | `last_sync_id` (all zero: none) |
//! | 16 | `base_sync_id` (all zero unless an incremental pass is in progress) |
//! | 32 | `plan_digest` (likewise) |
//! | 8 + 8 + 8 | target stamp: `inode`, `mtime_ns` (i64), `size_bytes` (all zero without flag bit 1) |
//! | 4 + n | `target_name` (n ≤ 4096, UTF-8) |
//! | 4 + n | `target_path_hint` |
//! | 4 + n | `source_identity` |
//! | 4 + n | `change_id` |
//! | 4 + 16 each | durable ranges (≤ 2²⁰): `offset: u64`, `len_bytes: u64`; sorted, non-empty, non-adjacent, within `size_bytes` |
//! | 4 + 16 each | planned ranges (≤ 2²⁰), same rules; empty unless an incremental pass is in progress |
//! | 32 | BLAKE3 (derive-key mode, context below) of everything before it |
//!
//! A complete journal covers `[0, size_bytes)` exactly. An incremental pass
//! in progress names its base, which is also the last complete sync.
//!
//! Version 1 (no pass fields, no change id, no planned ranges; its own
//! checksum context) still decodes: it has no sync id, so it can never be
//! the base of an incremental pass.

use super::JournalError;
use super::ranges::RangeSet;
use super::reader::Reader;
use crate::wire::{PassMode, SyncId};

/// First bytes of every journal file.
pub const MAGIC: [u8; 8] = *b"DFJOURNL";
/// The version this build writes (it also reads version 1).
pub const JOURNAL_VERSION: u32 = 2;
/// Longest string field.
pub const MAX_STRING_BYTES: usize = 4096;
/// Most ranges any journal may hold in one list (the WELCOME and PLAN
/// bounds of the wire protocol).
pub const MAX_RANGES_HARD: usize = 1 << 20;
/// Ranges kept by default before the smallest are dropped (1 MiB of ranges).
pub const MAX_RANGES_DEFAULT: usize = 65536;

const FLAG_COMPLETE: u32 = 1;
const FLAG_STAMP: u32 = 2;
const CHECKSUM_LEN: usize = 32;
pub(super) const RANGE_LEN: usize = 16;
const CHECKSUM_CONTEXT_V1: &str = "diskferry journal v1 checksum";
const CHECKSUM_CONTEXT: &str = "diskferry journal v2 checksum";
/// v1: magic, version, flags, size, chunk, job id, updated, 3 string
/// lengths, range count, checksum.
const MIN_LEN_V1: usize = 8 + 4 + 4 + 8 + 4 + 16 + 8 + 3 * 4 + 4 + CHECKSUM_LEN;
/// v2: v1's fields, the pass fields and stamp, a fourth string length and
/// the planned range count.
const MIN_LEN: usize = MIN_LEN_V1 + 4 + 16 + 16 + 32 + 24 + 4 + 4;
/// Longest journal file there can be (every string and range at its bound):
/// a file read back is refused beyond this before it is read whole.
pub const MAX_JOURNAL_BYTES: usize =
    MIN_LEN + 4 * MAX_STRING_BYTES + 2 * MAX_RANGES_HARD * RANGE_LEN;

/// A regular-file target as it was when a job completed: an incremental
/// pass on top of that sync requires the file to be unchanged since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetStamp {
    /// The file's inode number.
    pub inode: u64,
    /// Its modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Its length.
    pub size_bytes: u64,
}

/// What the receiver knows about one target: which source it is being
/// filled from, which bytes of it are durable, and the last sync that
/// completed on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// Format version as read; journals are always written as
    /// [`JOURNAL_VERSION`].
    pub version: u32,
    /// The target name the sender asked for (the journal's key).
    pub target_name: String,
    /// What the name resolved to (file, device, export), for operators.
    pub target_path_hint: String,
    /// The sender's identity of the source (size + generation, or digest).
    pub source_identity: String,
    /// The source's size.
    pub size_bytes: u64,
    /// Informational: ranges are in bytes, so a resume may use another.
    pub chunk_size_bytes: u32,
    /// The job that last wrote this journal.
    pub job_id: [u8; 16],
    /// Merged, sorted, disjoint ranges durable on the target.
    pub durable: RangeSet,
    /// Every byte of the source is durable and the job finished.
    pub complete: bool,
    /// When it was last written (seconds since the Unix epoch).
    pub updated_unix_s: u64,
    /// The pass in progress, or the last one if complete.
    pub pass_mode: PassMode,
    /// The sync id of the last job that completed on the target, as long
    /// as the target still holds it (an incremental pass on top of it may
    /// be in progress); `None` after a full or delta pass started, and in
    /// version 1 journals.
    pub last_sync_id: Option<SyncId>,
    /// The change id of that sync (empty if none was given).
    pub change_id: String,
    /// A regular-file target as it was when that sync completed.
    pub target_stamp: Option<TargetStamp>,
    /// An incremental pass in progress: its base (= `last_sync_id`).
    pub base_sync_id: Option<SyncId>,
    /// An incremental pass in progress: the plan digest of its last HELLO.
    pub plan_digest: [u8; 32],
    /// An incremental pass in progress: every range it (or an interrupted
    /// pass on the same base before it) may change; it completes when
    /// these are durable. Never capped.
    pub planned: RangeSet,
}

impl Journal {
    /// A journal for a fresh full copy: nothing durable yet, no sync.
    pub fn new(
        target_name: &str,
        target_path_hint: &str,
        source_identity: &str,
        size_bytes: u64,
        chunk_size_bytes: u32,
        job_id: [u8; 16],
        updated_unix_s: u64,
    ) -> Self {
        Journal {
            version: JOURNAL_VERSION,
            target_name: target_name.to_owned(),
            target_path_hint: target_path_hint.to_owned(),
            source_identity: source_identity.to_owned(),
            size_bytes,
            chunk_size_bytes,
            job_id,
            durable: RangeSet::new(),
            complete: false,
            updated_unix_s,
            pass_mode: PassMode::Full,
            last_sync_id: None,
            change_id: String::new(),
            target_stamp: None,
            base_sync_id: None,
            plan_digest: [0; 32],
            planned: RangeSet::new(),
        }
    }

    /// Encodes with at most [`MAX_RANGES_HARD`] durable ranges.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_capped(MAX_RANGES_HARD)
    }

    /// Encodes (as [`JOURNAL_VERSION`]) with at most `max_ranges` durable
    /// ranges (and never more than [`MAX_RANGES_HARD`]): beyond that the
    /// smallest are left out, so the file claims a subset of what is
    /// durable and those ranges are re-sent on resume. Planned ranges are
    /// never left out (a smaller plan would claim too little): more than
    /// [`MAX_RANGES_HARD`] of them, like strings longer than
    /// [`MAX_STRING_BYTES`], make a journal that [`Journal::decode`]
    /// refuses; the store checks by decoding.
    pub fn encode_capped(&self, max_ranges: usize) -> Vec<u8> {
        let max_ranges = max_ranges.min(MAX_RANGES_HARD);
        let strings = [
            &self.target_name,
            &self.target_path_hint,
            &self.source_identity,
            &self.change_id,
        ];
        let strings_len: usize = strings.iter().map(|s| s.len()).sum();
        let kept = self.durable.len().min(max_ranges);
        let ranges_len = (kept + self.planned.len()) * RANGE_LEN;
        let mut out = Vec::with_capacity(MIN_LEN + strings_len + ranges_len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&JOURNAL_VERSION.to_le_bytes());
        let mut flags = if self.complete { FLAG_COMPLETE } else { 0 };
        if self.target_stamp.is_some() {
            flags |= FLAG_STAMP;
        }
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.size_bytes.to_le_bytes());
        out.extend_from_slice(&self.chunk_size_bytes.to_le_bytes());
        out.extend_from_slice(&self.job_id);
        out.extend_from_slice(&self.updated_unix_s.to_le_bytes());
        self.put_pass_fields(&mut out);
        for s in strings {
            put_len(&mut out, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        if self.durable.len() > max_ranges {
            let ranges = self.durable.largest(max_ranges);
            put_ranges(&mut out, ranges.into_iter());
        } else {
            put_ranges(&mut out, self.durable.iter());
        }
        put_ranges(&mut out, self.planned.iter());
        let digest = checksum(CHECKSUM_CONTEXT, &out);
        out.extend_from_slice(&digest);
        out
    }

    fn put_pass_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&u32::from(self.pass_mode.as_u8()).to_le_bytes());
        out.extend_from_slice(&self.last_sync_id.unwrap_or_default());
        out.extend_from_slice(&self.base_sync_id.unwrap_or_default());
        out.extend_from_slice(&self.plan_digest);
        let stamp = self.target_stamp.unwrap_or(TargetStamp {
            inode: 0,
            mtime_ns: 0,
            size_bytes: 0,
        });
        out.extend_from_slice(&stamp.inode.to_le_bytes());
        out.extend_from_slice(&stamp.mtime_ns.to_le_bytes());
        out.extend_from_slice(&stamp.size_bytes.to_le_bytes());
    }

    /// Parses and checks a journal: magic, version, checksum, then every
    /// field's bound before it is allocated, then the ranges' order and
    /// bounds and the pass fields' agreement. Never panics, whatever the
    /// bytes. Reads versions 1 and 2.
    pub fn decode(bytes: &[u8]) -> Result<Journal, JournalError> {
        if bytes.len() < MIN_LEN_V1 {
            return Err(
                if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
                    JournalError::BadMagic
                } else {
                    JournalError::TooShort {
                        len_bytes: bytes.len(),
                    }
                },
            );
        }
        let (body, digest) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        let mut r = Reader { rest: body };
        if r.array::<8>("magic")? != MAGIC {
            return Err(JournalError::BadMagic);
        }
        let version = r.u32("version")?;
        let context = match version {
            1 => CHECKSUM_CONTEXT_V1,
            JOURNAL_VERSION => CHECKSUM_CONTEXT,
            found => return Err(JournalError::UnsupportedVersion { found }),
        };
        if checksum(context, body) != digest {
            return Err(JournalError::ChecksumMismatch);
        }
        let journal = if version == 1 {
            decode_v1_body(&mut r)?
        } else {
            decode_v2_body(&mut r)?
        };
        if !r.rest.is_empty() {
            return Err(JournalError::TrailingBytes {
                extra_bytes: r.rest.len(),
            });
        }
        if journal.complete && journal.durable.covered_bytes() != journal.size_bytes {
            return Err(JournalError::CompleteButNotCovered {
                covered_bytes: journal.durable.covered_bytes(),
                size_bytes: journal.size_bytes,
            });
        }
        journal.check_pass_fields()?;
        Ok(journal)
    }

    /// An incremental pass in progress has a base equal to the last sync;
    /// nothing else has a base, a plan digest or planned ranges.
    fn check_pass_fields(&self) -> Result<(), JournalError> {
        let bad = |why| Err(JournalError::BadPassFields { why });
        let is_incremental_running = self.pass_mode == PassMode::Incremental && !self.complete;
        if is_incremental_running {
            if self.base_sync_id.is_none() {
                return bad("an incremental pass in progress without a base");
            }
            if self.base_sync_id != self.last_sync_id {
                return bad("an incremental pass in progress on another base than the last sync");
            }
        } else if self.base_sync_id.is_some()
            || self.plan_digest != [0; 32]
            || !self.planned.is_empty()
        {
            return bad("a base, plan digest or planned ranges without an incremental pass");
        }
        Ok(())
    }
}

/// Version 1: the fields after the version, up to the checksum.
fn decode_v1_body(r: &mut Reader<'_>) -> Result<Journal, JournalError> {
    let flags = r.u32("flags")?;
    if flags & !FLAG_COMPLETE != 0 {
        return Err(JournalError::UnknownFlags { flags });
    }
    let size_bytes = r.u64("size_bytes")?;
    let chunk_size_bytes = r.u32("chunk_size_bytes")?;
    let job_id = r.array::<16>("job_id")?;
    let updated_unix_s = r.u64("updated_unix_s")?;
    let mut j = Journal::new(
        &r.string("target_name")?,
        &r.string("target_path_hint")?,
        &r.string("source_identity")?,
        size_bytes,
        chunk_size_bytes,
        job_id,
        updated_unix_s,
    );
    j.version = 1;
    j.durable = r.ranges("durable ranges", size_bytes)?;
    j.complete = flags & FLAG_COMPLETE != 0;
    Ok(j)
}

/// Version 2: the fields after the version, up to the checksum.
fn decode_v2_body(r: &mut Reader<'_>) -> Result<Journal, JournalError> {
    let flags = r.u32("flags")?;
    if flags & !(FLAG_COMPLETE | FLAG_STAMP) != 0 {
        return Err(JournalError::UnknownFlags { flags });
    }
    let size_bytes = r.u64("size_bytes")?;
    let chunk_size_bytes = r.u32("chunk_size_bytes")?;
    let job_id = r.array::<16>("job_id")?;
    let updated_unix_s = r.u64("updated_unix_s")?;
    let mode = r.u32("pass_mode")?;
    let pass_mode = u8::try_from(mode)
        .ok()
        .and_then(|m| PassMode::from_u8(m).ok())
        .ok_or(JournalError::BadPassFields {
            why: "unknown pass mode",
        })?;
    let last_sync_id = sync_id(r.array::<16>("last_sync_id")?);
    let base_sync_id = sync_id(r.array::<16>("base_sync_id")?);
    let plan_digest = r.array::<32>("plan_digest")?;
    let stamp = TargetStamp {
        inode: r.u64("target stamp")?,
        mtime_ns: i64::from_le_bytes(r.array::<8>("target stamp")?),
        size_bytes: r.u64("target stamp")?,
    };
    let target_stamp = if flags & FLAG_STAMP != 0 {
        Some(stamp)
    } else if stamp.inode != 0 || stamp.mtime_ns != 0 || stamp.size_bytes != 0 {
        return Err(JournalError::BadPassFields {
            why: "a target stamp without its flag",
        });
    } else {
        None
    };
    let mut j = Journal::new(
        &r.string("target_name")?,
        &r.string("target_path_hint")?,
        &r.string("source_identity")?,
        size_bytes,
        chunk_size_bytes,
        job_id,
        updated_unix_s,
    );
    j.change_id = r.string("change_id")?;
    j.durable = r.ranges("durable ranges", size_bytes)?;
    j.planned = r.ranges("planned ranges", size_bytes)?;
    j.complete = flags & FLAG_COMPLETE != 0;
    j.pass_mode = pass_mode;
    j.last_sync_id = last_sync_id;
    j.base_sync_id = base_sync_id;
    j.plan_digest = plan_digest;
    j.target_stamp = target_stamp;
    Ok(j)
}

/// All zero is "none".
fn sync_id(raw: SyncId) -> Option<SyncId> {
    (raw != [0; 16]).then_some(raw)
}

fn checksum(context: &str, body: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(context);
    hasher.update(body);
    *hasher.finalize().as_bytes()
}

/// Lengths are bounded by the caller's data (strings, range counts) far
/// below `u32::MAX`; a longer one saturates and fails decoding, which the
/// store's read-back check turns into an error.
fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_ranges(out: &mut Vec<u8>, ranges: impl ExactSizeIterator<Item = (u64, u64)>) {
    put_len(out, ranges.len());
    for (offset, len_bytes) in ranges {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len_bytes.to_le_bytes());
    }
}
