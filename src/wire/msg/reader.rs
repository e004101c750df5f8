//! A bounds-checked little-endian cursor over a frame payload.

use crate::wire::header::RANGE_LEN;
use crate::wire::{MAX_STRING_BYTES, WireError};

use super::ByteRange;

pub(super) struct Reader<'a> {
    frame: &'static str,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(frame: &'static str, bytes: &'a [u8]) -> Self {
        Reader { frame, bytes }
    }

    fn take(&mut self, field: &'static str, len: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < len {
            return Err(WireError::FieldTruncated {
                frame: self.frame,
                field,
            });
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A u16-length-prefixed UTF-8 string of at most [`MAX_STRING_BYTES`].
    pub(super) fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let len_bytes = usize::from(self.u16(field)?);
        if len_bytes > MAX_STRING_BYTES {
            return Err(WireError::StringTooLong {
                field,
                len_bytes,
                max_bytes: MAX_STRING_BYTES,
            });
        }
        let bytes = self.take(field, len_bytes)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(WireError::StringNotUtf8 { field }),
        }
    }

    /// A u32-count-prefixed list of ranges; the count is checked against
    /// `max` and against the bytes present before anything is allocated.
    pub(super) fn ranges(
        &mut self,
        field: &'static str,
        max: u32,
    ) -> Result<Vec<ByteRange>, WireError> {
        let count = self.u32(field)?;
        if count > max {
            return Err(WireError::ListTooLong {
                field,
                count: u64::from(count),
                max: u64::from(max),
            });
        }
        let count = count as usize;
        let body = self.take(field, count * RANGE_LEN as usize)?;
        let mut out = Vec::with_capacity(count);
        for entry in body.chunks_exact(RANGE_LEN as usize) {
            let (offset, len_bytes) = entry.split_at(8);
            out.push(ByteRange {
                offset: u64::from_le_bytes(offset.try_into().unwrap_or_default()),
                len_bytes: u64::from_le_bytes(len_bytes.try_into().unwrap_or_default()),
            });
        }
        Ok(out)
    }

    /// A u32-count-prefixed list of 16-byte digests, bounded like
    /// [`Reader::ranges`].
    pub(super) fn digests(
        &mut self,
        field: &'static str,
        max: u32,
    ) -> Result<Vec<[u8; 16]>, WireError> {
        let count = self.u32(field)?;
        if count > max {
            return Err(WireError::ListTooLong {
                field,
                count: u64::from(count),
                max: u64::from(max),
            });
        }
        let count = count as usize;
        let body = self.take(field, count * 16)?;
        let mut out = Vec::with_capacity(count);
        for entry in body.chunks_exact(16) {
            out.push(entry.try_into().unwrap_or_default());
        }
        Ok(out)
    }

    /// Succeeds only if every byte was read.
    pub(super) fn finish(&self) -> Result<(), WireError> {
        if !self.bytes.is_empty() {
            return Err(WireError::TrailingBytes {
                frame: self.frame,
                extra_bytes: self.bytes.len(),
            });
        }
        Ok(())
    }
}
