//! Changed-areas lists in the JSON shape of VMware's
//! `QueryChangedDiskAreas` (a `DiskChangeInfo`), sans-IO: text in, a
//! validated, sorted, merged list out.
//!
//! ```json
//! {"startOffset": 0, "length": 1073741824, "changeId": "52 de … /17",
//!  "changedArea": [{"start": 65536, "length": 131072}, …]}
//! ```
//!
//! The file holds one such page or an array of them (one per query, as a
//! caller walks a disk). Each page says which range it describes
//! (`startOffset`, `length`); its areas must lie inside it, and pages must
//! not overlap each other. `changeId` is optional; when pages carry it
//! they must agree, and it is returned with the list. Offsets and lengths
//! are JSON non-negative integers (not strings, not fractions). Other
//! fields (e.g. `dynamicType` from a vSphere SDK) are ignored.
//!
//! Refused, with the page and area named: malformed JSON, a wrong type, a
//! missing field, overlapping areas or pages, an area outside its page, a
//! page beyond the disk, and **zero-length areas** (a query never returns
//! them, so one means a broken producer; refusing costs nothing and keeps
//! the list exactly what the tool reported). Areas may come in any order;
//! adjacent areas merge. Bounds: [`MAX_TEXT_BYTES`] of text and
//! [`MAX_AREAS`] areas.
//!
//! The text is parsed straight into typed pages (16 bytes per area; a tree
//! of `serde_json::Value` costs hundreds of bytes per area). When that
//! fails and the text is at most [`MAX_DETAILED_ERROR_BYTES`], it is
//! walked again as a `Value` to name the entry and field at fault; a larger
//! text gets serde's line and column.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{PassPlan, PlanError};

/// Largest changed-areas text accepted.
pub const MAX_TEXT_BYTES: usize = 64 * 1024 * 1024;
/// Most areas (over all pages) accepted: a vSphere query answers with at
/// most a few thousand per page.
pub const MAX_AREAS: usize = 1024 * 1024;
/// Largest text walked again to name the entry at fault when it does not
/// parse (the walk holds a `serde_json::Value` tree, many times the text).
pub const MAX_DETAILED_ERROR_BYTES: usize = 8 * 1024 * 1024;
/// Longest `changeId` accepted.
pub const MAX_CHANGE_ID_BYTES: usize = 4096;

/// Why a changed-areas list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChangedAreasError {
    /// Too much text.
    #[error("changed-areas list of {len_bytes} bytes is larger than the {max_bytes}-byte limit")]
    TooLarge {
        /// Its size.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// Not JSON.
    #[error("changed-areas list is not valid JSON: {0}")]
    Json(String),
    /// A field is missing, of the wrong type or out of range.
    #[error("changed-areas list, {at}: {why}")]
    Entry {
        /// Which entry and field, e.g. `page 0, changedArea[3].length`.
        at: String,
        /// What is wrong.
        why: String,
    },
    /// More areas than the bound ([`MAX_AREAS`]).
    #[error("changed-areas list has more than {max} areas")]
    TooManyAreas {
        /// The limit.
        max: usize,
    },
}

/// A validated changed-areas list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedAreas {
    /// Changed `(offset, len)` ranges: sorted, disjoint, non-empty,
    /// adjacent ones merged, inside the disk.
    pub areas: Vec<(u64, u64)>,
    /// The pages' `changeId`, if they carry one.
    pub change_id: Option<String>,
    /// The disk's size the list was checked against.
    pub size_bytes: u64,
}

impl ChangedAreas {
    /// Bytes changed.
    pub fn changed_bytes(&self) -> u64 {
        self.areas.iter().map(|&(_, l)| l).sum()
    }

    /// The plan of a pass: changed ∩ `data` → Copy, changed ∖ `data` →
    /// Zero, the rest Unchanged. `data` is the source's allocation now:
    /// `(offset, len)` ranges holding data, sorted, disjoint, non-empty,
    /// inside the disk.
    pub fn plan(&self, data: &[(u64, u64)]) -> Result<PassPlan, PlanError> {
        PassPlan::from_changed(&self.areas, data, self.size_bytes)
    }
}

/// One page as parsed, before its ranges are checked.
#[derive(Debug, Deserialize)]
struct RawPage {
    #[serde(rename = "startOffset")]
    start_offset: u64,
    length: u64,
    #[serde(rename = "changeId", default)]
    change_id: Option<String>,
    #[serde(rename = "changedArea")]
    changed_area: Vec<RawArea>,
}

/// One area as parsed.
#[derive(Debug, Deserialize)]
struct RawArea {
    start: u64,
    length: u64,
}

/// An area or page with where it came from, for errors after sorting.
#[derive(Clone, Copy)]
struct Located {
    start: u64,
    len: u64,
    page: usize,
    /// Index in the page's `changedArea`; `None` for the page itself.
    area: Option<usize>,
}

impl Located {
    fn end(&self) -> u64 {
        self.start + self.len
    }
    fn name(&self) -> String {
        match self.area {
            Some(a) => format!("page {}, changedArea[{a}]", self.page),
            None => format!("page {}", self.page),
        }
    }
}

fn entry(at: impl Into<String>, why: impl Into<String>) -> ChangedAreasError {
    ChangedAreasError::Entry {
        at: at.into(),
        why: why.into(),
    }
}

/// Parse and validate `text` against a disk of `size_bytes`, within
/// [`MAX_TEXT_BYTES`] and [`MAX_AREAS`].
pub fn parse(text: &str, size_bytes: u64) -> Result<ChangedAreas, ChangedAreasError> {
    parse_within(text, size_bytes, MAX_TEXT_BYTES, MAX_AREAS)
}

/// [`parse`] with other bounds (tests use small ones).
pub fn parse_within(
    text: &str,
    size_bytes: u64,
    max_text_bytes: usize,
    max_areas: usize,
) -> Result<ChangedAreas, ChangedAreasError> {
    if text.len() > max_text_bytes {
        return Err(ChangedAreasError::TooLarge {
            len_bytes: text.len(),
            max_bytes: max_text_bytes,
        });
    }
    let typed = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<RawPage>>(text)
    } else {
        serde_json::from_str::<RawPage>(text).map(|p| vec![p])
    };
    let pages = match typed {
        Ok(pages) => pages,
        Err(e) if text.len() <= MAX_DETAILED_ERROR_BYTES => {
            // Name the entry; a text the walk accepts (e.g. a duplicate
            // key) still gets serde's message.
            walk(text)?;
            return Err(ChangedAreasError::Json(e.to_string()));
        }
        Err(e) => return Err(ChangedAreasError::Json(e.to_string())),
    };
    validate(&pages, size_bytes, max_areas)
}

/// Check the pages' ranges and areas, then sort and merge the areas.
fn validate(
    pages: &[RawPage],
    size_bytes: u64,
    max_areas: usize,
) -> Result<ChangedAreas, ChangedAreasError> {
    let count = pages.iter().map(|p| p.changed_area.len()).sum::<usize>();
    if count > max_areas {
        return Err(ChangedAreasError::TooManyAreas { max: max_areas });
    }
    let mut page_ranges = Vec::with_capacity(pages.len());
    let mut areas = Vec::with_capacity(count);
    let mut change_id: Option<&str> = None;
    for (page, p) in pages.iter().enumerate() {
        let at = format!("page {page}");
        let range = located(p.start_offset, p.length, page, None)?;
        if range.end() > size_bytes {
            return Err(entry(
                &at,
                format!(
                    "range [{}, {}) reaches past the disk's {size_bytes} bytes",
                    range.start,
                    range.end()
                ),
            ));
        }
        page_ranges.push(range);
        if let Some(id) = p.change_id.as_deref() {
            check_change_id(id, change_id, &at)?;
            change_id = Some(id);
        }
        for (i, a) in p.changed_area.iter().enumerate() {
            areas.push(area_in_page(a, range, i)?);
        }
    }
    check_disjoint(&mut page_ranges, "pages")?;
    check_disjoint(&mut areas, "areas")?;
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(areas.len());
    for a in &areas {
        match merged.last_mut() {
            Some((o, l)) if *o + *l == a.start => *l += a.len,
            _ => merged.push((a.start, a.len)),
        }
    }
    Ok(ChangedAreas {
        areas: merged,
        change_id: change_id.map(str::to_string),
        size_bytes,
    })
}

/// `changeId` of a page: bounded, the same on every page that has one.
fn check_change_id(id: &str, earlier: Option<&str>, at: &str) -> Result<(), ChangedAreasError> {
    let field = format!("{at}, changeId");
    if id.len() > MAX_CHANGE_ID_BYTES {
        return Err(entry(
            &field,
            format!("longer than {MAX_CHANGE_ID_BYTES} bytes"),
        ));
    }
    match earlier {
        Some(prev) if prev != id => Err(entry(
            &field,
            format!(
                "{:?} differs from an earlier page's {prev:?}",
                short_str(id)
            ),
        )),
        _ => Ok(()),
    }
}

fn short_str(s: &str) -> String {
    s.chars().take(64).collect()
}

/// An area checked to be non-empty and inside its page.
fn area_in_page(a: &RawArea, page: Located, i: usize) -> Result<Located, ChangedAreasError> {
    let area = located(a.start, a.length, page.page, Some(i))?;
    let at = area.name();
    if area.len == 0 {
        return Err(entry(
            format!("{at}.length"),
            "is 0 (empty areas are refused)",
        ));
    }
    if area.start < page.start || area.end() > page.end() {
        return Err(entry(
            &at,
            format!(
                "[{}, {}) lies outside its page's range [{}, {})",
                area.start,
                area.end(),
                page.start,
                page.end()
            ),
        ));
    }
    Ok(area)
}

/// A range that does not overflow.
fn located(
    start: u64,
    len: u64,
    page: usize,
    area: Option<usize>,
) -> Result<Located, ChangedAreasError> {
    let l = Located {
        start,
        len,
        page,
        area,
    };
    if start.checked_add(len).is_none() {
        return Err(entry(
            l.name(),
            format!("{start} + {len} overflows 64 bits"),
        ));
    }
    Ok(l)
}

/// Walk text that did not parse as pages as a `Value`, to name the first
/// entry and field of the wrong shape.
fn walk(text: &str) -> Result<(), ChangedAreasError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| ChangedAreasError::Json(e.to_string()))?;
    let pages: Vec<&Value> = match &value {
        Value::Array(pages) => pages.iter().collect(),
        page @ Value::Object(_) => vec![page],
        _ => {
            return Err(entry(
                "top level",
                "expected an object or an array of objects",
            ));
        }
    };
    for (page, v) in pages.into_iter().enumerate() {
        let at = format!("page {page}");
        let obj = v
            .as_object()
            .ok_or_else(|| entry(&at, "expected an object"))?;
        number(obj, &at, "startOffset")?;
        number(obj, &at, "length")?;
        if let Some(id) = obj.get("changeId").filter(|v| !v.is_null()) {
            id.as_str()
                .ok_or_else(|| entry(format!("{at}, changeId"), "expected a string"))?;
        }
        let list = obj
            .get("changedArea")
            .ok_or_else(|| entry(&at, "missing field changedArea"))?
            .as_array()
            .ok_or_else(|| entry(format!("{at}, changedArea"), "expected an array"))?;
        for (i, v) in list.iter().enumerate() {
            let at = format!("{at}, changedArea[{i}]");
            let obj = v
                .as_object()
                .ok_or_else(|| entry(&at, "expected an object"))?;
            number(obj, &at, "start")?;
            number(obj, &at, "length")?;
        }
    }
    Ok(())
}

fn number(obj: &Map<String, Value>, at: &str, field: &str) -> Result<u64, ChangedAreasError> {
    let v = obj
        .get(field)
        .ok_or_else(|| entry(at, format!("missing field {field}")))?;
    v.as_u64().ok_or_else(|| {
        entry(
            format!("{at}.{field}"),
            format!("expected a non-negative integer, found {}", short(v)),
        )
    })
}

/// A value for an error message, at most 64 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 64 {
        s
    } else {
        format!("{}…", s.chars().take(64).collect::<String>())
    }
}

/// Sort `ranges` and refuse any two that overlap, naming both.
fn check_disjoint(ranges: &mut [Located], what: &str) -> Result<(), ChangedAreasError> {
    ranges.sort_by_key(|r| (r.start, r.len));
    for w in ranges.windows(2) {
        if w[1].start < w[0].end() {
            return Err(entry(
                w[1].name(),
                format!(
                    "{what} overlap: [{}, {}) overlaps {} [{}, {})",
                    w[1].start,
                    w[1].end(),
                    w[0].name(),
                    w[0].start,
                    w[0].end()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "changed_areas_tests.rs"]
mod tests;
