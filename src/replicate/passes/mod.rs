//! Converging passes: a full (or delta) pass while the source runs, then
//! smaller and smaller passes of what changed, until the next one fits the
//! downtime budget; then, if asked, stop the source and run the final pass.
//!
//! [`model`] decides (sans-IO); the driver runs the passes.
#![forbid(unsafe_code)]

pub mod driver;
pub mod model;
