//! The copy pipeline.
pub mod plan;
pub mod pool;
pub mod stats;
pub mod zero;
