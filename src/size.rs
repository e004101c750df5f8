//! Sizes.
//!
//! [`parse_size`] reads a byte count written by a human: a decimal integer
//! with an optional **binary** unit suffix, as qemu-img and dd do:
//!
//! | suffix (any case)          | multiplier |
//! |----------------------------|------------|
//! | none, `B`                  | 1          |
//! | `K`, `Ki`, `KiB`           | 1024       |
//! | `M`, `Mi`, `MiB`           | 1024²      |
//! | `G`, `Gi`, `GiB`           | 1024³      |
//! | `T`, `Ti`, `TiB`           | 1024⁴      |
//! | `P`, `Pi`, `PiB`           | 1024⁵      |
//! | `E`, `Ei`, `EiB`           | 1024⁶      |
//!
//! So `4k`, `4K`, `4Ki` and `4KiB` all mean 4096. Decimal SI forms (`KB`,
//! `MB`) are refused rather than guessed at, as are fractions (`1.5G`),
//! signs, embedded spaces and anything that overflows a `u64`.

#![forbid(unsafe_code)]
/// Longest input accepted (well above any real size).
const MAX_SIZE_TEXT_BYTES: usize = 64;

/// Parse a byte count such as `1048576`, `4k`, `64MiB` or `2G` (binary units,
/// see the module docs). The error says what is wrong with `s`.
///
/// ```
/// use diskferry::size::parse_size;
/// assert_eq!(parse_size("4k"), Ok(4096));
/// assert_eq!(parse_size("2MiB"), Ok(2 << 20));
/// assert!(parse_size("1.5G").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    if text.len() > MAX_SIZE_TEXT_BYTES {
        return Err(format!("size {s:?} is too long"));
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "size {s:?} must start with a number of bytes, e.g. 4096, 4k or 64MiB"
        ));
    }
    let shift_bits = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kib" => 10,
        "m" | "mi" | "mib" => 20,
        "g" | "gi" | "gib" => 30,
        "t" | "ti" | "tib" => 40,
        "p" | "pi" | "pib" => 50,
        "e" | "ei" | "eib" => 60,
        "kb" | "mb" | "gb" | "tb" | "pb" | "eb" => {
            return Err(format!(
                "size {s:?}: decimal units are ambiguous; write binary units such as K, KiB, M, MiB, G, GiB"
            ));
        }
        _ => {
            return Err(format!(
                "size {s:?} has an unknown unit {suffix:?}; use B, K/KiB, M/MiB, G/GiB, T/TiB, P/PiB or E/EiB"
            ));
        }
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("size {s:?} does not fit in 64 bits"))?;
    number
        .checked_mul(1u64 << shift_bits)
        .ok_or_else(|| format!("size {s:?} does not fit in 64 bits"))
}

/// Parse a duration such as `30s`, `500ms`, `10m`, `2h` or `1d`; a bare
/// number is seconds. Fractions and negative values are refused.
///
/// ```
/// use diskferry::size::parse_duration;
/// use std::time::Duration;
/// assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
/// assert!(parse_duration("1.5h").is_err());
/// ```
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let text = s.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() || text.len() > MAX_SIZE_TEXT_BYTES {
        return Err(format!(
            "duration {s:?} must be a whole number with a unit, e.g. 500ms, 30s, 10m, 2h"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("duration {s:?} is too large"))?;
    let ms_per = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "duration {s:?} has an unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(ms_per)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn plain_and_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512B"), Ok(512));
        for four_k in ["4k", "4K", "4Ki", "4KiB", "4kib", " 4k "] {
            assert_eq!(parse_size(four_k), Ok(4096), "{four_k}");
        }
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("3Ti"), Ok(3 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[track_caller]
    fn refused(s: &str, needle: &str) {
        let why = parse_size(s).expect_err(s);
        assert!(
            why.contains(needle),
            "{s}: {why:?} should mention {needle:?}"
        );
    }

    #[test]
    fn refuses_overflow_and_garbage() {
        refused("16E", "64 bits");
        refused("18446744073709551616", "64 bits");
        refused("99999999999999999999999", "64 bits");
        refused("17179869184G", "64 bits");
        refused("", "must start with a number");
        refused("k", "must start with a number");
        refused("-1", "must start with a number");
        refused("+1", "must start with a number");
        refused("1.5G", "unknown unit");
        refused("4 k", "unknown unit");
        refused("4x", "unknown unit");
        refused("4KiBB", "unknown unit");
        refused("4MB", "decimal units");
        refused(&"9".repeat(100), "too long");
    }
}
