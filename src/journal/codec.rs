//! [`Journal`] and its binary encoding. Sans-IO: bytes in, bytes out.
//!
//! Layout (integers little-endian):
//!
//! | size | field |
//! |---:|---|
//! | 8 | magic `DFJOURNL` |
//! | 4 | `version` (1) |
//! | 4 | `flags`: bit 0 complete; other bits must be 0 |
//! | 8 | `size_bytes` |
//! | 4 | `chunk_size_bytes` |
//! | 16 | `job_id` |
//! | 8 | `updated_unix_s` |
//! | 4 + n | `target_name` (n ≤ 4096, UTF-8) |
//! | 4 + n | `target_path_hint` |
//! | 4 + n | `source_identity` |
//! | 4 | range count (≤ 2²⁰) |
//! | 16 each | ranges: `offset: u64`, `len_bytes: u64`; sorted, non-empty, non-adjacent, within `size_bytes` |
//! | 32 | BLAKE3 (derive-key mode, context below) of everything before it |
//!
//! A complete journal covers `[0, size_bytes)` exactly.

use super::JournalError;
use super::ranges::RangeSet;

/// First bytes of every journal file.
pub const MAGIC: [u8; 8] = *b"DFJOURNL";
/// The only version this build reads and writes.
pub const JOURNAL_VERSION: u32 = 1;
/// Longest string field.
pub const MAX_STRING_BYTES: usize = 4096;
/// Most ranges any journal may hold (the WELCOME bound of the wire protocol).
pub const MAX_RANGES_HARD: usize = 1 << 20;
/// Ranges kept by default before the smallest are dropped (1 MiB of ranges).
pub const MAX_RANGES_DEFAULT: usize = 65536;

const FLAG_COMPLETE: u32 = 1;
const CHECKSUM_LEN: usize = 32;
const RANGE_LEN: usize = 16;
const CHECKSUM_CONTEXT: &str = "diskferry journal v1 checksum";
/// magic, version, flags, size, chunk, job id, updated, 3 string lengths,
/// range count, checksum.
const MIN_LEN: usize = 8 + 4 + 4 + 8 + 4 + 16 + 8 + 3 * 4 + 4 + CHECKSUM_LEN;
/// Longest journal file there can be (every string and range at its bound):
/// a file read back is refused beyond this before it is read whole.
pub const MAX_JOURNAL_BYTES: usize = MIN_LEN + 3 * MAX_STRING_BYTES + MAX_RANGES_HARD * RANGE_LEN;

/// What the receiver knows about one target: which source it is being
/// filled from and which bytes of it are durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// Format version; [`JOURNAL_VERSION`] for journals this build writes.
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
}

impl Journal {
    /// A journal for a fresh copy: nothing durable yet.
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
        }
    }

    /// Encodes with at most [`MAX_RANGES_HARD`] ranges.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_capped(MAX_RANGES_HARD)
    }

    /// Encodes with at most `max_ranges` durable ranges (and never more than
    /// [`MAX_RANGES_HARD`]): beyond that the smallest are left out, so the
    /// file claims a subset of what is durable and those ranges are re-sent
    /// on resume. Strings longer than [`MAX_STRING_BYTES`] make a journal
    /// that [`Journal::decode`] refuses; the store checks by decoding.
    pub fn encode_capped(&self, max_ranges: usize) -> Vec<u8> {
        let max_ranges = max_ranges.min(MAX_RANGES_HARD);
        let strings_len =
            self.target_name.len() + self.target_path_hint.len() + self.source_identity.len();
        let kept = self.durable.len().min(max_ranges);
        let mut out = Vec::with_capacity(MIN_LEN + strings_len + kept * RANGE_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        let flags = if self.complete { FLAG_COMPLETE } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.size_bytes.to_le_bytes());
        out.extend_from_slice(&self.chunk_size_bytes.to_le_bytes());
        out.extend_from_slice(&self.job_id);
        out.extend_from_slice(&self.updated_unix_s.to_le_bytes());
        for s in [
            &self.target_name,
            &self.target_path_hint,
            &self.source_identity,
        ] {
            put_len(&mut out, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        if self.durable.len() > max_ranges {
            let ranges = self.durable.largest(max_ranges);
            put_ranges(&mut out, ranges.into_iter());
        } else {
            put_ranges(&mut out, self.durable.iter());
        }
        let digest = checksum(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Parses and checks a journal: magic, version, checksum, then every
    /// field's bound before it is allocated, then the ranges' order and
    /// bounds. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Journal, JournalError> {
        if bytes.len() < MIN_LEN {
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
        if version != JOURNAL_VERSION {
            return Err(JournalError::UnsupportedVersion { found: version });
        }
        if checksum(body) != digest {
            return Err(JournalError::ChecksumMismatch);
        }
        let flags = r.u32("flags")?;
        if flags & !FLAG_COMPLETE != 0 {
            return Err(JournalError::UnknownFlags { flags });
        }
        let size_bytes = r.u64("size_bytes")?;
        let chunk_size_bytes = r.u32("chunk_size_bytes")?;
        let job_id = r.array::<16>("job_id")?;
        let updated_unix_s = r.u64("updated_unix_s")?;
        let target_name = r.string("target_name")?;
        let target_path_hint = r.string("target_path_hint")?;
        let source_identity = r.string("source_identity")?;
        let durable = r.ranges(size_bytes)?;
        if !r.rest.is_empty() {
            return Err(JournalError::TrailingBytes {
                extra_bytes: r.rest.len(),
            });
        }
        let complete = flags & FLAG_COMPLETE != 0;
        if complete && durable.covered_bytes() != size_bytes {
            return Err(JournalError::CompleteButNotCovered {
                covered_bytes: durable.covered_bytes(),
                size_bytes,
            });
        }
        Ok(Journal {
            version,
            target_name,
            target_path_hint,
            source_identity,
            size_bytes,
            chunk_size_bytes,
            job_id,
            durable,
            complete,
            updated_unix_s,
        })
    }
}

fn checksum(body: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(CHECKSUM_CONTEXT);
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

/// A cursor that checks every length against what is left.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], JournalError> {
        if self.rest.len() < len {
            return Err(JournalError::Truncated { field });
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], JournalError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, JournalError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, JournalError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &'static str) -> Result<String, JournalError> {
        let len_bytes = self.u32(field)?;
        let len = usize::try_from(len_bytes).unwrap_or(usize::MAX);
        if len > MAX_STRING_BYTES {
            return Err(JournalError::StringTooLong {
                field,
                len_bytes: u64::from(len_bytes),
            });
        }
        let raw = self.take(len, field)?;
        let s = std::str::from_utf8(raw).map_err(|_| JournalError::StringNotUtf8 { field })?;
        Ok(s.to_owned())
    }

    fn ranges(&mut self, size_bytes: u64) -> Result<RangeSet, JournalError> {
        let count = self.u32("range count")?;
        let count_usize = usize::try_from(count).unwrap_or(usize::MAX);
        if count_usize > MAX_RANGES_HARD || count_usize > self.rest.len() / RANGE_LEN {
            return Err(JournalError::TooManyRanges {
                count: u64::from(count),
            });
        }
        let mut set = RangeSet::new();
        // The end of the previous range; the next must start strictly after
        // it (equal would be adjacent, i.e. not merged).
        let mut prev_end: Option<u64> = None;
        for index in 0..count_usize {
            let offset = self.u64("ranges")?;
            let len_bytes = self.u64("ranges")?;
            let end = offset.checked_add(len_bytes);
            let Some(end) = end.filter(|&e| len_bytes > 0 && e <= size_bytes) else {
                return Err(JournalError::RangeOutOfBounds {
                    index,
                    offset,
                    len_bytes,
                    size_bytes,
                });
            };
            if prev_end.is_some_and(|p| offset <= p) {
                return Err(JournalError::RangesNotCanonical { index });
            }
            prev_end = Some(end);
            set.insert(offset, len_bytes);
        }
        Ok(set)
    }
}
