//! Windows: the extent planner turns what the source says about its allocation into
//! work items, never asking for a byte the source reports as a hole or zero.
//!
//! The disk is cut into windows of `chunk_bytes` aligned to the chunk size.
//! A window holding any data becomes one [`Work::Copy`] listing its data
//! runs (the rest of the window is known zero and is never read). Runs of
//! windows with no data become [`Work::Zero`] items, or nothing at all when
//! the target is known to read as zeros already.

#![forbid(unsafe_code)]
/// One extent as reported by a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapExtent {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// False when the source says the range is a hole or reads as zeros.
    pub data: bool,
}

/// Errors while mapping the source.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// `SEEK_DATA`/`SEEK_HOLE` on the source's fd failed.
    #[error("mapping source allocation at offset {offset}: {source}")]
    Io {
        /// Where the map was asked.
        offset: u64,
        /// What failed.
        source: std::io::Error,
    },
    /// The NBD server failed `BLOCK_STATUS`.
    #[error("mapping source allocation at offset {offset}: {source}")]
    Nbd {
        /// Where the map was asked.
        offset: u64,
        /// What failed.
        source: crate::nbd::NbdError,
    },
    /// The source's answer does not describe the disk.
    #[error("source allocation map is inconsistent at offset {offset}: {why}")]
    BadMap {
        /// Where the map was asked.
        offset: u64,
        /// What is wrong with it.
        why: String,
    },
}

/// Something that can say which parts of a source hold data.
pub trait ExtentMap: Send {
    /// Append extents that start at `offset`, are contiguous, and cover at
    /// least one byte and at most `len` bytes.
    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<MapExtent>) -> Result<(), MapError>;
}

/// A source without allocation information: everything is data.
pub struct AllData;

impl ExtentMap for AllData {
    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<MapExtent>) -> Result<(), MapError> {
        out.push(MapExtent {
            offset,
            len,
            data: true,
        });
        Ok(())
    }
}

/// A unit of work for the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Read `data` runs (offset relative to `offset`, length) of the window
    /// `[offset, offset + len)`; the rest of the window is zero.
    Copy {
        /// First byte of the window.
        offset: u64,
        /// Bytes in the window.
        len: u32,
        /// The data runs: (offset in the window, length).
        data: Vec<(u32, u32)>,
    },
    /// Make `[offset, offset + len)` read as zeros on the target.
    Zero {
        /// First byte.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

/// Largest span asked of the source map in one call.
const MAP_QUERY_BYTES: u64 = 1 << 30;
/// Largest single zero item.
pub const ZERO_ITEM_MAX_BYTES: u64 = 1 << 30;

/// Walk the map of `[0, size_bytes)` and call `emit` for each work item in
/// ascending offset order (zero items too: a caller whose target already
/// reads as zeros just counts them).
/// Returns the number of data bytes planned.
pub fn plan(
    map: &mut dyn ExtentMap,
    size_bytes: u64,
    chunk_bytes: u32,
    emit: &mut dyn FnMut(Work) -> Result<(), MapError>,
) -> Result<u64, MapError> {
    plan_span(map, 0, size_bytes, size_bytes, chunk_bytes, emit)
}

/// Like [`plan`], but only for the chunk windows inside `spans` (sorted,
/// disjoint; each `[start, start + len)` begins on a chunk boundary and
/// ends on one or at the disk's end). Nothing outside is read or zeroed:
/// a resumed job plans only what the receiver does not hold yet. Whole
/// windows keep every window's digest and zero runs exact.
pub fn plan_windows(
    map: &mut dyn ExtentMap,
    spans: &[(u64, u64)],
    size_bytes: u64,
    chunk_bytes: u32,
    emit: &mut dyn FnMut(Work) -> Result<(), MapError>,
) -> Result<u64, MapError> {
    let chunk = u64::from(chunk_bytes.max(1));
    let mut planned = 0;
    for &(start, len) in spans {
        let end = start.saturating_add(len).min(size_bytes);
        assert!(
            start % chunk == 0 && (end % chunk == 0 || end == size_bytes),
            "span {start}+{len} is not made of whole windows"
        );
        planned += plan_span(map, start, end, size_bytes, chunk_bytes, emit)?;
    }
    Ok(planned)
}

/// Windows of `chunk_bytes` covering `ranges` (merged, clipped to the disk).
pub fn whole_windows(ranges: &[(u64, u64)], size_bytes: u64, chunk_bytes: u32) -> Vec<(u64, u64)> {
    let chunk = u64::from(chunk_bytes.max(1));
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(offset, len) in ranges {
        if len == 0 || offset >= size_bytes {
            continue;
        }
        let start = offset - offset % chunk;
        let end = offset
            .saturating_add(len)
            .min(size_bytes)
            .div_ceil(chunk)
            .saturating_mul(chunk)
            .min(size_bytes);
        match out.last_mut() {
            Some((s, l)) if *s + *l >= start => *l = (*s + *l).max(end) - *s,
            _ => out.push((start, end - start)),
        }
    }
    out
}

/// Plans `[start, end)` of a disk of `size_bytes`; `start` is on a window
/// boundary.
pub(super) fn plan_span(
    map: &mut dyn ExtentMap,
    start: u64,
    end: u64,
    size_bytes: u64,
    chunk_bytes: u32,
    emit: &mut dyn FnMut(Work) -> Result<(), MapError>,
) -> Result<u64, MapError> {
    assert!(chunk_bytes > 0);
    let chunk = u64::from(chunk_bytes);
    let mut builder = WindowBuilder {
        size_bytes,
        chunk,
        window: None,
        data: Vec::new(),
        done_to: start,
        planned: 0,
    };
    let mut extents = Vec::new();
    let mut offset = start;
    while offset < end {
        extents.clear();
        let want = (end - offset).min(MAP_QUERY_BYTES);
        map.map(offset, want, &mut extents)?;
        if extents.is_empty() {
            return Err(MapError::BadMap {
                offset,
                why: "no extents returned".into(),
            });
        }
        for e in &extents {
            if e.offset != offset || e.len == 0 || e.len > end - offset {
                return Err(MapError::BadMap {
                    offset,
                    why: format!(
                        "extent {}+{} is not contiguous or overruns the disk",
                        e.offset, e.len
                    ),
                });
            }
            if e.data {
                builder.add_data(e.offset, e.len, emit)?;
            }
            offset += e.len;
        }
    }
    builder.finish(end, emit)?;
    Ok(builder.planned)
}

/// Cuts data extents into windows and zero items, in ascending order.
struct WindowBuilder {
    size_bytes: u64,
    chunk: u64,
    /// Start of the window being filled.
    window: Option<u64>,
    data: Vec<(u32, u32)>,
    /// Everything below this offset has been emitted.
    done_to: u64,
    planned: u64,
}

pub(super) type Emit<'a> = &'a mut dyn FnMut(Work) -> Result<(), MapError>;

impl WindowBuilder {
    fn add_data(&mut self, mut offset: u64, len: u64, emit: Emit<'_>) -> Result<(), MapError> {
        let end = offset + len;
        while offset < end {
            let w = offset - offset % self.chunk;
            if self.window != Some(w) {
                self.close_window(emit)?;
                self.zero_until(w, emit)?;
                self.window = Some(w);
            }
            let piece_end = end.min(w + self.chunk);
            let rel = u32::try_from(offset - w).expect("inside a chunk");
            let piece = u32::try_from(piece_end - offset).expect("inside a chunk");
            match self.data.last_mut() {
                Some((r, l)) if *r + *l == rel => *l += piece,
                _ => self.data.push((rel, piece)),
            }
            self.planned += u64::from(piece);
            offset = piece_end;
        }
        Ok(())
    }

    fn close_window(&mut self, emit: Emit<'_>) -> Result<(), MapError> {
        if let Some(w) = self.window.take() {
            let len = self.chunk.min(self.size_bytes - w);
            emit(Work::Copy {
                offset: w,
                len: u32::try_from(len).expect("chunk fits u32"),
                data: std::mem::take(&mut self.data),
            })?;
            self.done_to = w + len;
        }
        Ok(())
    }

    fn zero_until(&mut self, to: u64, emit: Emit<'_>) -> Result<(), MapError> {
        while self.done_to < to {
            let len = (to - self.done_to).min(ZERO_ITEM_MAX_BYTES);
            emit(Work::Zero {
                offset: self.done_to,
                len,
            })?;
            self.done_to += len;
        }
        Ok(())
    }

    fn finish(&mut self, end: u64, emit: Emit<'_>) -> Result<(), MapError> {
        self.close_window(emit)?;
        self.zero_until(end, emit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Fixed(Vec<MapExtent>);
    impl ExtentMap for Fixed {
        fn map(&mut self, offset: u64, len: u64, out: &mut Vec<MapExtent>) -> Result<(), MapError> {
            for e in &self.0 {
                let end = e.offset + e.len;
                if end <= offset || e.offset >= offset + len {
                    continue;
                }
                let s = e.offset.max(offset);
                out.push(MapExtent {
                    offset: s,
                    len: end.min(offset + len) - s,
                    data: e.data,
                });
            }
            Ok(())
        }
    }

    fn collect(map: &mut dyn ExtentMap, size: u64, chunk: u32) -> (u64, Vec<Work>) {
        let mut v = Vec::new();
        let planned = plan(map, size, chunk, &mut |w| {
            v.push(w);
            Ok(())
        })
        .unwrap();
        (planned, v)
    }

    #[test]
    fn plan_windows_covers_only_its_spans() {
        let extents = vec![
            MapExtent {
                offset: 0,
                len: 5000,
                data: true,
            },
            MapExtent {
                offset: 5000,
                len: 20_000,
                data: false,
            },
            MapExtent {
                offset: 25_000,
                len: 7000,
                data: true,
            },
        ];
        let size = 32_000;
        let spans = whole_windows(&[(4095, 2), (20_000, 100), (31_000, 5)], size, 4096);
        assert_eq!(spans, vec![(0, 8192), (16_384, 4096), (28_672, 3328)]);
        let mut got = Vec::new();
        let planned = plan_windows(&mut Fixed(extents.clone()), &spans, size, 4096, &mut |w| {
            got.push(w);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            got,
            vec![
                Work::Copy {
                    offset: 0,
                    len: 4096,
                    data: vec![(0, 4096)]
                },
                Work::Copy {
                    offset: 4096,
                    len: 4096,
                    data: vec![(0, 904)]
                },
                Work::Zero {
                    offset: 16_384,
                    len: 4096
                },
                Work::Copy {
                    offset: 28_672,
                    len: 3328,
                    data: vec![(0, 3328)]
                },
            ]
        );
        assert_eq!(planned, 4096 + 904 + 3328);
        // The whole disk as one span is the same as `plan`.
        let all = whole_windows(&[(0, size)], size, 4096);
        let (p1, v1) = collect(&mut Fixed(extents.clone()), size, 4096);
        let mut v2 = Vec::new();
        let p2 = plan_windows(&mut Fixed(extents), &all, size, 4096, &mut |w| {
            v2.push(w);
            Ok(())
        })
        .unwrap();
        assert_eq!((p1, v1), (p2, v2));
    }

    #[test]
    fn all_data_tail_window_is_short() {
        let (planned, v) = collect(&mut AllData, 10_000, 4096);
        assert_eq!(planned, 10_000);
        assert_eq!(v.len(), 3);
        assert_eq!(
            v[2],
            Work::Copy {
                offset: 8192,
                len: 1808,
                data: vec![(0, 1808)]
            }
        );
    }

    #[test]
    fn holes_become_zero_items() {
        let ext = vec![
            MapExtent {
                offset: 0,
                len: 100,
                data: true,
            },
            MapExtent {
                offset: 100,
                len: 20_000,
                data: false,
            },
            MapExtent {
                offset: 20_100,
                len: 100,
                data: true,
            },
        ];
        let (planned, v) = collect(&mut Fixed(ext), 20_200, 4096);
        assert_eq!(planned, 200);
        assert_eq!(
            v,
            vec![
                Work::Copy {
                    offset: 0,
                    len: 4096,
                    data: vec![(0, 100)]
                },
                Work::Zero {
                    offset: 4096,
                    len: 16384 - 4096
                },
                Work::Copy {
                    offset: 16384,
                    len: 3816,
                    data: vec![(3716, 100)]
                },
            ]
        );
    }

    proptest! {
        /// Items tile the disk in order; data runs are exactly the data extents.
        #[test]
        fn items_tile_disk(lens in proptest::collection::vec((1u64..50_000, any::<bool>()), 1..40), chunk in 1u32..9000) {
            let mut ext = Vec::new();
            let mut off = 0;
            for (l, d) in lens { ext.push(MapExtent { offset: off, len: l, data: d }); off += l; }
            let size = off;
            let want: u64 = ext.iter().filter(|e| e.data).map(|e| e.len).sum();
            let (planned, v) = collect(&mut Fixed(ext.clone()), size, chunk);
            prop_assert_eq!(planned, want);
            let mut pos = 0u64;
            let mut data_bytes = 0u64;
            for w in &v {
                match w {
                    Work::Copy { offset, len, data } => {
                        prop_assert_eq!(*offset, pos);
                        prop_assert!(!data.is_empty());
                        for &(r, l) in data {
                            prop_assert!(r + l <= *len);
                            let abs = offset + u64::from(r);
                            let end = abs + u64::from(l);
                            let covered: u64 = ext.iter().filter(|e| e.data)
                                .map(|e| (e.offset + e.len).min(end).saturating_sub(e.offset.max(abs)))
                                .sum();
                            prop_assert_eq!(covered, u64::from(l));
                            data_bytes += u64::from(l);
                        }
                        pos += u64::from(*len);
                    }
                    Work::Zero { offset, len } => {
                        prop_assert_eq!(*offset, pos);
                        prop_assert!(*len > 0);
                        pos += len;
                    }
                }
            }
            prop_assert_eq!(pos, size);
            prop_assert_eq!(data_bytes, want);
        }
    }
}
