//! `--compress MODE`: what the operator asked for.

use std::fmt;
use std::str::FromStr;

use super::{CompressError, ZSTD_LEVEL_DEFAULT, ZSTD_LEVEL_MAX, ZSTD_LEVEL_MIN};

/// The compression policy asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Send every chunk raw.
    None,
    /// lz4 on every chunk.
    Lz4,
    /// zstd at this level (1..=19) on every chunk.
    Zstd(i32),
    /// Per chunk: raw, lz4 or zstd, whichever moves the chunk soonest
    /// (see [`super::Policy`]).
    Auto,
}

impl FromStr for Mode {
    type Err = CompressError;

    /// Parses `none`, `lz4`, `zstd` (level 3), `zstd:LEVEL` (1..=19) and
    /// `auto`, case-insensitively.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || CompressError::BadMode {
            text: text.chars().take(64).collect(),
        };
        let lower = text.trim().to_ascii_lowercase();
        match lower.as_str() {
            "none" => return Ok(Mode::None),
            "lz4" => return Ok(Mode::Lz4),
            "zstd" => return Ok(Mode::Zstd(ZSTD_LEVEL_DEFAULT)),
            "auto" => return Ok(Mode::Auto),
            _ => {}
        }
        let digits = lower.strip_prefix("zstd:").ok_or_else(bad)?;
        if digits.is_empty() || digits.len() > 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let level: i32 = digits.parse().map_err(|_| bad())?;
        if !(ZSTD_LEVEL_MIN..=ZSTD_LEVEL_MAX).contains(&level) {
            return Err(bad());
        }
        Ok(Mode::Zstd(level))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::None => f.write_str("none"),
            Mode::Lz4 => f.write_str("lz4"),
            Mode::Zstd(level) => write!(f, "zstd:{level}"),
            Mode::Auto => f.write_str("auto"),
        }
    }
}
