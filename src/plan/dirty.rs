//! The plan of a pass from an NBD dirty bitmap.
//!
//! qemu exports a persistent dirty bitmap as the meta context
//! `qemu:dirty-bitmap:NAME` (qemu-nbd `-B NAME`; qemu's
//! docs/interop/nbd.txt): status bit 0 set means the extent was written
//! (or discarded) since the bitmap was created or last cleared. It is
//! negotiated next to `base:allocation` in one `NBD_OPT_SET_META_CONTEXT`,
//! and each BLOCK_STATUS reply then carries one extent list per context,
//! decoded and bounded by [`crate::nbd::conn`]. The mapping walks the disk
//! with the blocking client and returns a [`PassPlan`]:
//!
//! * dirty and data → [`PassKind::Copy`](super::PassKind::Copy);
//! * dirty and `NBD_STATE_ZERO` (reads as zeros) →
//!   [`PassKind::Zero`](super::PassKind::Zero);
//! * not dirty → [`PassKind::Unchanged`](super::PassKind::Unchanged).
//!
//! A dirty hole *without* `NBD_STATE_ZERO` is Copy: the NBD spec says a
//! client must not take a hole to read as zeros (a qcow2 hole may show its
//! backing file). qemu-nbd reports discarded qcow2 clusters with both bits,
//! so they become Zero. The bitmap's extents are aligned to its granularity
//! (qcow2's default: 64 KiB), so a write of a few bytes marks a granule.

use std::io::{Read, Write};

use super::{PassPlan, PlanError};
use crate::nbd::blocking::Client;
use crate::nbd::conn::Extent;
use crate::nbd::handshake::ExportInfo;
use crate::nbd::{MAX_STRING_BYTES, NbdError};

/// The allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of qemu's dirty-bitmap contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `base:allocation`: the extent reads as zeros.
const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty.
const STATE_DIRTY: u32 = 1;
/// Largest BLOCK_STATUS request (64 KiB-aligned, like the allocation map).
const MAX_REQUEST_BYTES: u64 = 1 << 30;
/// Most dirty (or data) ranges kept for one plan, 16 bytes each: a 64 KiB
/// bitmap over 1 TiB alternating dirty and clean is 8 Mi ranges. Bounds
/// what a server answering in tiny extents can make the client hold.
pub const MAX_RANGES: usize = 16 * 1024 * 1024;

/// Why a dirty-bitmap plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DirtyMapError {
    /// The bitmap name cannot be a meta context name.
    #[error("dirty bitmap name {name:?} {why}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Negotiating the connection failed.
    #[error("negotiating the NBD connection: {0}")]
    Handshake(#[source] NbdError),
    /// Without structured replies there is no block status.
    #[error("the NBD server did not accept structured replies, so it cannot report a dirty bitmap")]
    NoStructuredReplies,
    /// The server did not accept `base:allocation`.
    #[error("the NBD server did not accept the meta context base:allocation")]
    NoAllocation,
    /// The server does not export the bitmap.
    #[error(
        "the NBD server does not export dirty bitmap {name:?} (meta context qemu:dirty-bitmap:{name}); \
         export it with `qemu-nbd -B {name}` (QEMU: block-export-add with bitmaps: [\"{name}\"]), \
         and check the image has it (`qemu-img info`)"
    )]
    BitmapMissing {
        /// The bitmap's name.
        name: String,
    },
    /// A BLOCK_STATUS request failed or was answered against the protocol.
    #[error("block status at offset {offset}: {source}")]
    Nbd {
        /// The request's offset.
        offset: u64,
        /// What went wrong.
        #[source]
        source: NbdError,
    },
    /// The server reported more ranges than [`MAX_RANGES`].
    #[error(
        "the NBD server reported more than {max} separate dirty or data ranges (at offset {offset}); \
         refusing to hold a plan that fragmented"
    )]
    TooFragmented {
        /// Where the limit was passed.
        offset: u64,
        /// The limit.
        max: usize,
    },
    /// The extents do not make a plan (a bug, or a server lying in a way
    /// the decoder cannot see).
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// The meta context of bitmap `name`.
pub fn bitmap_context(name: &str) -> Result<String, DirtyMapError> {
    let bad = |why| DirtyMapError::BadName {
        name: name.chars().take(256).collect(),
        why,
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    let context = format!("{DIRTY_BITMAP_PREFIX}{name}");
    if context.len() > MAX_STRING_BYTES as usize {
        return Err(bad("is too long for an NBD meta context (4096 bytes)"));
    }
    Ok(context)
}

/// The context ids of `base:allocation` and of bitmap `name` in `info`,
/// or the error saying which is missing.
pub fn negotiated_ids(info: &ExportInfo, name: &str) -> Result<(u32, u32), DirtyMapError> {
    let context = bitmap_context(name)?;
    if !info.structured_replies {
        return Err(DirtyMapError::NoStructuredReplies);
    }
    let bitmap = info
        .context_id(&context)
        .ok_or_else(|| DirtyMapError::BitmapMissing { name: name.into() })?;
    let allocation = info
        .context_id(BASE_ALLOCATION)
        .ok_or(DirtyMapError::NoAllocation)?;
    Ok((allocation, bitmap))
}

/// Negotiate `export` on `stream` with `base:allocation` and bitmap
/// `name` (one `NBD_OPT_SET_META_CONTEXT` with both), refusing a server
/// that lacks either.
pub fn connect<S: Read + Write>(
    stream: S,
    export: &str,
    name: &str,
) -> Result<Client<S>, DirtyMapError> {
    let context = bitmap_context(name)?;
    let client = Client::connect(stream, export, &[BASE_ALLOCATION, &context])
        .map_err(DirtyMapError::Handshake)?;
    negotiated_ids(client.info(), name)?;
    Ok(client)
}

/// The plan of a pass over the whole export of `client` (negotiated with
/// both contexts, e.g. by [`connect`]) from bitmap `name`.
pub fn map_pass<S: Read + Write>(
    client: &mut Client<S>,
    name: &str,
) -> Result<PassPlan, DirtyMapError> {
    let (allocation_id, bitmap_id) = negotiated_ids(client.info(), name)?;
    let size_bytes = client.info().size_bytes;
    let mut dirty = Ranges::default();
    let mut data = Ranges::default();
    let mut offset = 0;
    while offset < size_bytes {
        let ask = u32::try_from((size_bytes - offset).min(MAX_REQUEST_BYTES))
            .expect("bounded by MAX_REQUEST_BYTES");
        let nbd = |source| DirtyMapError::Nbd { offset, source };
        let replies = client.block_status_all(offset, ask).map_err(nbd)?;
        let of = |id: u32, what: &str| {
            replies
                .iter()
                .find(|(cid, _)| *cid == id)
                .map(|(_, e)| e.as_slice())
                .ok_or_else(|| nbd(NbdError::Protocol(format!("no extents for {what}"))))
        };
        let allocation = of(allocation_id, BASE_ALLOCATION)?;
        let bitmap = of(bitmap_id, "the dirty bitmap")?;
        // The two lists may end at different offsets: take what both cover.
        let covered = span_end(offset, allocation).min(span_end(offset, bitmap));
        if covered <= offset {
            return Err(nbd(NbdError::Protocol("no extents returned".into())));
        }
        data.add_flagged(offset, covered, allocation, |f| f & STATE_ZERO == 0);
        dirty.add_flagged(offset, covered, bitmap, |f| f & STATE_DIRTY != 0);
        if dirty.0.len() > MAX_RANGES || data.0.len() > MAX_RANGES {
            return Err(DirtyMapError::TooFragmented {
                offset,
                max: MAX_RANGES,
            });
        }
        offset = covered;
    }
    Ok(PassPlan::from_changed(&dirty.0, &data.0, size_bytes)?)
}

/// Where a list of extents starting at `offset` ends.
fn span_end(offset: u64, extents: &[Extent]) -> u64 {
    extents
        .iter()
        .fold(offset, |pos, e| pos.saturating_add(u64::from(e.len)))
}

/// Sorted, disjoint, merged `(offset, len)` ranges.
#[derive(Default)]
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// Add the extents (starting at `offset`, cut at `end`) whose flags
    /// satisfy `keep`.
    fn add_flagged(
        &mut self,
        offset: u64,
        end: u64,
        extents: &[Extent],
        keep: impl Fn(u32) -> bool,
    ) {
        let mut pos = offset;
        for e in extents {
            let e_end = pos.saturating_add(u64::from(e.len)).min(end);
            if e_end <= pos {
                break;
            }
            if keep(e.flags) {
                match self.0.last_mut() {
                    Some((o, l)) if *o + *l == pos => *l += e_end - pos,
                    _ => self.0.push((pos, e_end - pos)),
                }
            }
            pos = e_end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u32, flags: u32) -> Extent {
        Extent { len, flags }
    }

    #[test]
    fn ranges_cut_at_the_common_end_and_merge() {
        let mut r = Ranges::default();
        r.add_flagged(100, 130, &[ext(10, 1), ext(10, 1), ext(20, 1)], |f| {
            f & 1 != 0
        });
        r.add_flagged(130, 150, &[ext(5, 0), ext(15, 1)], |f| f & 1 != 0);
        assert_eq!(r.0, vec![(100, 30), (135, 15)]);
    }

    #[test]
    fn bitmap_names_are_checked() {
        assert_eq!(bitmap_context("b0").unwrap(), "qemu:dirty-bitmap:b0");
        assert!(bitmap_context("").is_err());
        let long = "x".repeat(4096);
        let e = bitmap_context(&long).unwrap_err().to_string();
        assert!(e.contains("too long"), "{e}");
    }

    #[test]
    fn missing_bitmap_error_names_it_and_how_to_export_it() {
        let info = ExportInfo {
            structured_replies: true,
            meta_contexts: vec![(BASE_ALLOCATION.into(), 0)],
            ..ExportInfo::default()
        };
        let e = negotiated_ids(&info, "nightly").unwrap_err().to_string();
        assert!(
            e.contains("\"nightly\"") && e.contains("qemu-nbd -B nightly"),
            "{e}"
        );
        let info = ExportInfo {
            structured_replies: true,
            meta_contexts: vec![("qemu:dirty-bitmap:nightly".into(), 1)],
            ..ExportInfo::default()
        };
        assert!(matches!(
            negotiated_ids(&info, "nightly"),
            Err(DirtyMapError::NoAllocation)
        ));
        let info = ExportInfo::default();
        assert!(matches!(
            negotiated_ids(&info, "nightly"),
            Err(DirtyMapError::NoStructuredReplies)
        ));
    }
}
