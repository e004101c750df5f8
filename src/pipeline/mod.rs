//! The copy pipeline.
pub mod zero;
