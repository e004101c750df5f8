//! Allocation maps of opened sources: `SEEK_DATA`/`SEEK_HOLE` on a file's
//! fd and NBD `BLOCK_STATUS` with `base:allocation` over a negotiated
//! connection. Opening is [`crate::endpoint::open`]'s work; these take what
//! it opened ([`map_file`], [`map_nbd`]).

#![forbid(unsafe_code)]
use std::fs::File;

use super::windows::{ExtentMap, MapError, MapExtent};
use crate::nbd::blocking::Client;
use crate::nbd::uri::NbdStream;

/// NBD_STATE_ZERO: the range reads as zeros.
const NBD_STATE_ZERO: u32 = 2;
/// The NBD metadata context that says which ranges hold data.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Map the whole of an opened file or block device (`size_bytes` long)
/// through its fd.
pub fn map_file(file: &File, size_bytes: u64) -> Result<ExtentList, MapError> {
    ExtentList::collect(&mut FileMap { file }, size_bytes)
}

/// Map the whole of an NBD export (`size_bytes` long) over `client`, a
/// connection negotiated with the [`BASE_ALLOCATION`] context. The
/// connection is left idle, ready for the workers.
pub fn map_nbd(client: &mut Client<NbdStream>, size_bytes: u64) -> Result<ExtentList, MapError> {
    ExtentList::collect(&mut NbdMap { client }, size_bytes)
}

/// SEEK_DATA map of a file (block devices: all data).
pub struct FileMap<'a> {
    /// The opened source.
    pub file: &'a File,
}

impl ExtentMap for FileMap<'_> {
    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<MapExtent>) -> Result<(), MapError> {
        let mut data = Vec::new();
        crate::endpoint::file::data_extents(self.file, offset, len, &mut data)
            .map_err(|source| MapError::Io { offset, source })?;
        let mut pos = offset;
        for (o, l) in data {
            let (o, l) = (
                o.max(pos),
                (o + l).min(offset + len).saturating_sub(o.max(pos)),
            );
            if l == 0 {
                continue;
            }
            if o > pos {
                out.push(MapExtent {
                    offset: pos,
                    len: o - pos,
                    data: false,
                });
            }
            out.push(MapExtent {
                offset: o,
                len: l,
                data: true,
            });
            pos = o + l;
        }
        if pos < offset + len {
            out.push(MapExtent {
                offset: pos,
                len: offset + len - pos,
                data: false,
            });
        }
        Ok(())
    }
}

/// BLOCK_STATUS map over a negotiated NBD connection.
pub struct NbdMap<'a> {
    /// The connection, negotiated with [`BASE_ALLOCATION`].
    pub client: &'a mut Client<NbdStream>,
}

impl ExtentMap for NbdMap<'_> {
    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<MapExtent>) -> Result<(), MapError> {
        let ask = u32::try_from(len.min(u64::from(u32::MAX) & !0xFFFF).max(1).min(len))
            .unwrap_or(u32::MAX);
        let extents = self
            .client
            .block_status(offset, ask, BASE_ALLOCATION)
            .map_err(|source| MapError::Nbd { offset, source })?;
        let mut pos = offset;
        for e in extents {
            let l = u64::from(e.len).min(offset + len - pos);
            if l == 0 {
                break;
            }
            out.push(MapExtent {
                offset: pos,
                len: l,
                data: e.flags & NBD_STATE_ZERO == 0,
            });
            pos += l;
        }
        if pos == offset {
            return Err(MapError::BadMap {
                offset,
                why: "server returned no extents".into(),
            });
        }
        Ok(())
    }
}

/// The data extents of a whole source, collected once before copying
/// (16 bytes per extent; adjacent extents merged), replayed as a map.
pub struct ExtentList {
    data: Vec<(u64, u64)>,
    size_bytes: u64,
}

impl ExtentList {
    /// Walk `map` over `[0, size_bytes)`.
    pub fn collect(map: &mut dyn ExtentMap, size_bytes: u64) -> Result<Self, MapError> {
        let mut data: Vec<(u64, u64)> = Vec::new();
        let mut buf = Vec::new();
        let mut offset = 0;
        while offset < size_bytes {
            buf.clear();
            map.map(offset, (size_bytes - offset).min(1 << 30), &mut buf)?;
            if buf.is_empty() {
                return Err(MapError::BadMap {
                    offset,
                    why: "no extents returned".into(),
                });
            }
            for e in &buf {
                if e.offset != offset || e.len == 0 || e.len > size_bytes - offset {
                    return Err(MapError::BadMap {
                        offset,
                        why: "extents not contiguous".into(),
                    });
                }
                if e.data {
                    match data.last_mut() {
                        Some((o, l)) if *o + *l == e.offset => *l += e.len,
                        _ => data.push((e.offset, e.len)),
                    }
                }
                offset += e.len;
            }
        }
        Ok(Self { data, size_bytes })
    }

    /// A list of these data extents (sorted, disjoint, inside the disk).
    #[cfg(test)]
    pub fn from_data(data: Vec<(u64, u64)>, size_bytes: u64) -> Self {
        Self { data, size_bytes }
    }

    /// Bytes of data.
    pub fn data_bytes(&self) -> u64 {
        self.data.iter().map(|&(_, l)| l).sum()
    }

    /// Bytes of data inside `spans` (sorted, disjoint).
    pub fn data_bytes_within(&self, spans: &[(u64, u64)]) -> u64 {
        let mut total = 0;
        for &(start, len) in spans {
            let end = start.saturating_add(len);
            let first = self.data.partition_point(|&(o, l)| o + l <= start);
            for &(o, l) in &self.data[first..] {
                if o >= end {
                    break;
                }
                total += (o + l).min(end) - o.max(start);
            }
        }
        total
    }

    /// The first data byte at or after `offset`, if any.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        let i = self.data.partition_point(|&(o, l)| o + l <= offset);
        self.data.get(i).map(|&(o, _)| o.max(offset))
    }

    /// The data extents, sorted and merged.
    pub fn extents(&self) -> &[(u64, u64)] {
        &self.data
    }

    /// Number of data extents.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// No data at all.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl ExtentMap for ExtentList {
    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<MapExtent>) -> Result<(), MapError> {
        let end = (offset + len).min(self.size_bytes);
        // First data extent ending after `offset`.
        let mut i = self.data.partition_point(|&(o, l)| o + l <= offset);
        let mut pos = offset;
        while pos < end {
            match self.data.get(i) {
                Some(&(o, l)) if o < end => {
                    if o > pos {
                        out.push(MapExtent {
                            offset: pos,
                            len: o - pos,
                            data: false,
                        });
                        pos = o;
                    }
                    let e = (o + l).min(end);
                    out.push(MapExtent {
                        offset: pos,
                        len: e - pos,
                        data: true,
                    });
                    pos = e;
                    i += 1;
                }
                _ => {
                    out.push(MapExtent {
                        offset: pos,
                        len: end - pos,
                        data: false,
                    });
                    pos = end;
                }
            }
        }
        Ok(())
    }
}
