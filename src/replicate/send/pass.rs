//! What kind of pass a send runs (`SendOptions::pass`) and the sync ids a
//! report carries.
//!
//! * [`PassRequest::Full`]: every data byte of the source (as before).
//! * [`PassRequest::Incremental`]: only what changed since the sync named
//!   by `base`, taken from a dirty bitmap of the source or a changed-areas
//!   list ([`ChangedSource`]); the receiver refuses any other base.
//! * [`PassRequest::Delta`]: compare the target's block digests with the
//!   source and send only the blocks that differ.

use std::path::PathBuf;

/// A sync's id: 16 random bytes, shown as 32 lowercase hex characters.
pub use crate::wire::SyncId;

/// Where an incremental pass learns what changed since its base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangedSource {
    /// The NBD source's `qemu:dirty-bitmap:NAME` context (a qcow2 source:
    /// diskferry's qemu-nbd child exports bitmap NAME).
    DirtyBitmap(String),
    /// A changed-areas list in the JSON shape of VMware's
    /// `QueryChangedDiskAreas` ([`crate::plan::changed_areas`]).
    ChangedAreas(PathBuf),
}

impl std::str::FromStr for ChangedSource {
    type Err = String;

    /// `dirty-bitmap:NAME` or `changed-areas:FILE` (the `--changed` flag,
    /// and what a change command prints).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s}: expected dirty-bitmap:NAME or changed-areas:FILE");
        match s.split_once(':') {
            Some((_, "")) | None => Err(bad()),
            Some(("dirty-bitmap", name)) => Ok(ChangedSource::DirtyBitmap(name.to_string())),
            Some(("changed-areas", path)) => Ok(ChangedSource::ChangedAreas(path.into())),
            Some(_) => Err(bad()),
        }
    }
}

/// What one send pass does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PassRequest {
    /// Everything (a fresh copy, or resuming one).
    #[default]
    Full,
    /// What changed since the sync `base` (all-zero: none named; the
    /// receiver then refuses, naming its last sync).
    Incremental {
        /// Where the changes come from.
        changed: ChangedSource,
        /// The sync the target must be at.
        base: SyncId,
    },
    /// Blocks of `block_bytes` whose digests differ on the target.
    Delta {
        /// Bytes per compared block (power of two).
        block_bytes: u32,
    },
}

/// Smallest and largest delta block (the wire's DigestRequest bounds).
pub const DELTA_BLOCK_MIN_BYTES: u32 = crate::wire::pass::MIN_DIGEST_BLOCK_BYTES;
/// See [`DELTA_BLOCK_MIN_BYTES`].
pub const DELTA_BLOCK_MAX_BYTES: u32 = crate::wire::pass::MAX_DIGEST_BLOCK_BYTES;
/// `--delta-block`'s default.
pub const DELTA_BLOCK_DEFAULT_BYTES: u32 = 64 << 10;
/// Longest change id (the wire's bound on HELLO strings).
pub const MAX_CHANGE_ID_BYTES: usize = 4096;

/// A sync id as users see it: 32 lowercase hex characters.
pub fn sync_id_hex(id: &SyncId) -> String {
    crate::wire::pass::sync_id_hex(id)
}

/// Why a sync id given as text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncIdError {
    /// Not 32 hex characters.
    #[error("a sync id is 32 hex characters, not {got:?}")]
    NotHex {
        /// What was given (cut to 64 characters).
        got: String,
    },
    /// All zeros (no sync has that id).
    #[error("the all-zero sync id names no sync")]
    Zero,
}

/// Parse a sync id written as 32 hex characters (either case), saying
/// why one is refused.
pub fn parse_sync_id(s: &str) -> Result<SyncId, SyncIdError> {
    if let Some(id) = crate::wire::pass::parse_sync_id(s) {
        return Ok(id);
    }
    if s.len() == 32 && s.bytes().all(|b| b == b'0') {
        return Err(SyncIdError::Zero);
    }
    Err(SyncIdError::NotHex {
        got: s.chars().take(64).collect(),
    })
}

/// Serde: a sync id as its hex text.
pub(super) fn ser_sync_id<S: serde::Serializer>(id: &SyncId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&sync_id_hex(id))
}

/// Serde: an optional sync id as its hex text (the field is skipped when
/// `None`).
pub(super) fn ser_opt_sync_id<S: serde::Serializer>(
    id: &Option<SyncId>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => ser_sync_id(id, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_ids_round_trip_as_32_hex_characters() {
        let id = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0, 0, 0, 0, 0, 0, 0xfe, 0x10,
        ];
        let hex = sync_id_hex(&id);
        assert_eq!(hex, "0123456789abcdef000000000000fe10");
        assert_eq!(parse_sync_id(&hex), Ok(id));
        assert_eq!(parse_sync_id(&hex.to_uppercase()), Ok(id));
    }

    #[test]
    fn bad_sync_ids_are_refused() {
        for bad in ["", "abc", &"g".repeat(32), &"0".repeat(31), &"é".repeat(16)] {
            assert!(
                matches!(parse_sync_id(bad), Err(SyncIdError::NotHex { .. })),
                "{bad}"
            );
        }
        assert_eq!(parse_sync_id(&"0".repeat(32)), Err(SyncIdError::Zero));
        assert!(parse_sync_id(&format!("+{}", "1".repeat(31))).is_err());
    }
}
