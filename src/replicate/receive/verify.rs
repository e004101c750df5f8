//! The verify pass: after DONE, the receiver reads its target back and
//! answers with the image digest (`wire::ImageDigestStream`).
//!
//! Bounded whatever the peer asks: the window size only chooses how the
//! digest is cut (4 KiB ..= 32 MiB, checked by the digest), never a buffer
//! size; the target is read in [`VERIFY_READ_BYTES`] pieces into one
//! buffer, and the digest is taken front to back in constant memory. At
//! most one pass reads a target at a time ([`VerifyingTargets`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use tracing::info;

use super::job::{Job, Refusal};
use super::target::TargetKey;
use crate::sync::lock;
use crate::wire::{ErrorCode, ImageDigestStream, WireError};

/// Bytes read from the target at a time.
pub const VERIFY_READ_BYTES: usize = 1 << 20;

/// Why a verify pass gave no digest.
#[derive(Debug)]
pub enum VerifyError {
    /// The receiver is shutting down.
    Stopped,
    /// Send this ERROR, then close.
    Refused(Refusal),
}

/// Targets a verify pass is reading now.
#[derive(Debug, Default)]
pub struct VerifyingTargets(Mutex<HashSet<TargetKey>>);

/// A target's place in [`VerifyingTargets`]; freed when dropped.
struct Reading<'a> {
    set: &'a VerifyingTargets,
    key: TargetKey,
}

impl VerifyingTargets {
    fn lock(&self) -> MutexGuard<'_, HashSet<TargetKey>> {
        lock(&self.0)
    }

    /// The target `key` (named `name` to the peer) is read from now
    /// until the returned guard is dropped; refused while another pass
    /// reads it.
    fn start(&self, key: TargetKey, name: &str) -> Result<Reading<'_>, Refusal> {
        if !self.lock().insert(key) {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!(
                    "target {name:?} is being verified already; ask again when that pass ended"
                ),
            ));
        }
        Ok(Reading { set: self, key })
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

/// Reads `job`'s target back in `window_bytes` windows; the image digest
/// and the bytes read.
pub(super) fn read_back(
    job: &Job,
    window_bytes: u32,
    verifying: &VerifyingTargets,
    stop: &AtomicBool,
) -> Result<([u8; 32], u64), VerifyError> {
    let started = Instant::now();
    let refuse = |code, message: String| VerifyError::Refused(Refusal::new(code, message));
    let mut digest = ImageDigestStream::new(job.size_bytes, window_bytes).map_err(|e| {
        refuse(
            ErrorCode::BadRequest,
            format!("VERIFY_REQUEST refused: {e}"),
        )
    })?;
    let _reading = verifying
        .start(job.target.key(), &job.target_name)
        .map_err(VerifyError::Refused)?;
    let target_io = |what: &str, e: std::io::Error| {
        refuse(
            ErrorCode::TargetIo,
            format!("verify: {what} target {:?} failed: {e}", job.target_name),
        )
    };
    let mut buf = vec![0u8; VERIFY_READ_BYTES];
    let mut extents = Vec::new();
    let mut bytes_read = 0u64;
    // One window per iteration; the digest ends after its last window.
    while let Some((offset, len)) = digest.next_window() {
        if stop.load(Ordering::Relaxed) {
            return Err(VerifyError::Stopped);
        }
        job.target
            .data_extents(offset, u64::from(len), &mut extents)
            .map_err(|e| target_io("mapping", e))?;
        if extents.is_empty() {
            digest.zero_window().map_err(internal)?;
        } else {
            let mut done_bytes = 0u64;
            while done_bytes < u64::from(len) {
                let n = (u64::from(len) - done_bytes).min(VERIFY_READ_BYTES as u64) as usize;
                let piece = &mut buf[..n];
                job.target
                    .read_at(piece, offset + done_bytes)
                    .map_err(|e| target_io("reading", e))?;
                digest.update(piece).map_err(internal)?;
                done_bytes += n as u64;
            }
            digest.end_window().map_err(internal)?;
        }
        bytes_read += u64::from(len);
    }
    let digest = digest.finish().map_err(internal)?;
    info!(
        job = %job.id_hex(),
        target = %job.target_name,
        bytes_read,
        duration_s = format!("{:.3}", started.elapsed().as_secs_f64()),
        "verify pass done"
    );
    Ok((digest, bytes_read))
}

fn internal(e: WireError) -> VerifyError {
    VerifyError::Refused(Refusal::new(ErrorCode::Internal, format!("verify: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_per_target_at_a_time() {
        let set = VerifyingTargets::default();
        let a = TargetKey::File { dev: 1, ino: 7 };
        let first = set.start(a, "a.img").unwrap();
        let busy = set.start(a, "a.img").err().unwrap();
        assert_eq!(busy.code, ErrorCode::Busy);
        assert!(busy.message.contains("\"a.img\""), "{}", busy.message);
        let _other = set
            .start(TargetKey::File { dev: 1, ino: 8 }, "b.img")
            .unwrap();
        drop(first);
        set.start(a, "a.img")
            .expect("free again once the pass ended");
    }
}
