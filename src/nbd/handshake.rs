//! Fixed-newstyle handshake over a blocking stream.

use super::NbdError;

/// What was negotiated for one export.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub block_min: u32,
    pub block_pref: u32,
    pub block_max: u32,
    pub structured_replies: bool,
    /// (context name, context id) for each meta context the server accepted.
    pub meta_contexts: Vec<(String, u32)>,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        todo!()
    }
    pub fn can_flush(&self) -> bool {
        todo!()
    }
    pub fn can_multi_conn(&self) -> bool {
        todo!()
    }
    pub fn can_write_zeroes(&self) -> bool {
        todo!()
    }
    pub fn can_fast_zero(&self) -> bool {
        todo!()
    }
    pub fn can_trim(&self) -> bool {
        todo!()
    }
    /// Context id of `name` if negotiated.
    pub fn context_id(&self, _name: &str) -> Option<u32> {
        todo!()
    }
}

/// Negotiate `export` on `stream`, asking for structured replies and the
/// given meta contexts (e.g. `base:allocation`). Every server-sent length is
/// bounded before allocation.
pub fn negotiate<S: std::io::Read + std::io::Write>(
    _stream: &mut S,
    _export: &str,
    _meta_contexts: &[&str],
) -> Result<ExportInfo, NbdError> {
    todo!()
}
