//! What an NBD source saw: the reads nbdkit's `log` filter recorded, and the
//! source's allocation map as `nbdinfo --map` reports it.
//!
//! Include with `#[path = "support/nbdlog.rs"] mod nbdlog;` next to `mod common;`.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Reads of one copy as nbdkit's log filter saw them: (offset, count) in
/// the order they arrived.
pub fn logged_reads(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap();
    let hex = |line: &str, key: &str| {
        let v = line.split(key).nth(1)?.split_whitespace().next()?;
        u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
    };
    text.lines()
        .filter(|l| l.contains(" Read id="))
        .map(|l| (hex(l, "offset=").unwrap(), hex(l, "count=").unwrap()))
        .collect()
}

/// One extent of `nbdinfo --map` (base:allocation).
#[derive(Debug, Clone, Copy)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// NBD_STATE_HOLE: not allocated.
    pub is_hole: bool,
    /// NBD_STATE_ZERO: reads as zeros.
    pub is_zero: bool,
}

/// The allocation map of the export at `uri` (every byte, in order).
pub fn nbd_map(uri: &str) -> Vec<Extent> {
    let out = Command::new("nbdinfo")
        .args(["--map", "--json", uri])
        .output()
        .expect("nbdinfo runs (install libnbd-bin)");
    assert!(
        out.status.success(),
        "nbdinfo --map {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let map: Vec<Extent> = v
        .as_array()
        .expect("nbdinfo --map --json prints an array")
        .iter()
        .map(|e| {
            let ty = e["type"].as_u64().unwrap();
            Extent {
                offset: e["offset"].as_u64().unwrap(),
                length: e["length"].as_u64().unwrap(),
                is_hole: ty & 1 != 0,
                is_zero: ty & 2 != 0,
            }
        })
        .collect();
    let mut at = 0;
    for e in &map {
        assert_eq!(e.offset, at, "nbdinfo map has a gap: {map:?}");
        at += e.length;
    }
    map
}

/// Sorted, coalesced `(offset, len)` ranges of the extents `keep` selects.
pub fn ranges_where(map: &[Extent], keep: impl Fn(&Extent) -> bool) -> Vec<(u64, u64)> {
    coalesce(
        map.iter()
            .filter(|e| keep(e))
            .map(|e| (e.offset, e.length))
            .collect(),
    )
}

/// Sorts and merges touching or overlapping ranges.
pub fn coalesce(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, n) in v {
        match out.last_mut() {
            Some((lo, ln)) if *lo + *ln >= o => *ln = (*ln).max(o + n - *lo),
            _ => out.push((o, n)),
        }
    }
    out
}

/// Whether `[o, o+n)` lies inside one of the sorted, coalesced `ranges`.
pub fn inside(ranges: &[(u64, u64)], o: u64, n: u64) -> bool {
    let i = ranges.partition_point(|&(ro, _)| ro <= o);
    i > 0 && {
        let (ro, rn) = ranges[i - 1];
        o + n <= ro + rn
    }
}
