//! A bounds-checked little-endian cursor over a journal's body.

use super::JournalError;
use super::codec::{MAX_RANGES_HARD, MAX_STRING_BYTES, RANGE_LEN};
use super::ranges::RangeSet;

/// A cursor that checks every length against what is left.
pub(super) struct Reader<'a> {
    pub(super) rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn take(
        &mut self,
        len: usize,
        field: &'static str,
    ) -> Result<&'a [u8], JournalError> {
        if self.rest.len() < len {
            return Err(JournalError::Truncated { field });
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], JournalError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, JournalError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, JournalError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(super) fn string(&mut self, field: &'static str) -> Result<String, JournalError> {
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

    pub(super) fn ranges(
        &mut self,
        field: &'static str,
        size_bytes: u64,
    ) -> Result<RangeSet, JournalError> {
        let count = self.u32(field)?;
        let count_usize = usize::try_from(count).unwrap_or(usize::MAX);
        if count_usize > MAX_RANGES_HARD || count_usize > self.rest.len() / RANGE_LEN {
            return Err(JournalError::TooManyRanges {
                field,
                count: u64::from(count),
            });
        }
        let mut set = RangeSet::new();
        // The end of the previous range; the next must start strictly after
        // it (equal would be adjacent, i.e. not merged).
        let mut prev_end: Option<u64> = None;
        for index in 0..count_usize {
            let offset = self.u64(field)?;
            let len_bytes = self.u64(field)?;
            let end = offset.checked_add(len_bytes);
            let Some(end) = end.filter(|&e| len_bytes > 0 && e <= size_bytes) else {
                return Err(JournalError::RangeOutOfBounds {
                    field,
                    index,
                    offset,
                    len_bytes,
                    size_bytes,
                });
            };
            if prev_end.is_some_and(|p| offset <= p) {
                return Err(JournalError::RangesNotCanonical { field, index });
            }
            prev_end = Some(end);
            set.insert(offset, len_bytes);
        }
        Ok(set)
    }
}
