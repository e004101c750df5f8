//! The copy pipeline.
