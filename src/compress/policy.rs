//! The per-chunk choice of `--compress auto`.
//!
//! A sender thread owns one [`Policy`]. For each chunk it asks
//! [`Policy::choose`], compresses with the answer (timing it), and reports
//! back through [`Policy::record`], which keeps exponentially weighted running
//! estimates of each candidate's throughput on this machine and its ratio on
//! recent data.
//!
//! The pipeline overlaps compression and sending, so a chunk of `n` raw bytes
//! coded with candidate `k` is expected to cost
//! `max(n / (cores × speed_k), n / (ratio_k × link))` and raw costs
//! `n / link`. The cheapest wins; ties go to raw. Before that:
//!
//! * if even the fastest compressor cannot keep up with the link (loopback,
//!   an unknown link rate), the chunk goes raw without being looked at;
//! * otherwise a probe compresses three 4 KiB slices with lz4; if they do not
//!   shrink by [`PROBE_MIN_SAVING`], the chunk is incompressible and goes raw.
//!   The probe's ratio also scales the expected ratios to this chunk.
//!
//! After every [`Policy::with_explore_every`] chunks, the next chunk that
//! passes the probe goes to a candidate in turn, so estimates of codecs that are not being chosen
//! still track the machine and the data.

use std::time::Duration;

use lz4_flex::block::{CompressTable, compress_into_with_table};
use serde::Serialize;

use super::codec::lz4_bound_bytes;
use super::{Codec, Mode};

/// Bytes of each probe slice.
pub const PROBE_SLICE_BYTES: usize = 4096;
/// Number of probe slices, spread over the chunk.
pub const PROBE_SLICES: usize = 3;
/// A chunk is worth compressing when the probe saves at least this fraction.
pub const PROBE_MIN_SAVING: f64 = 0.10;
/// Default number of chunks between two exploration chunks.
pub const EXPLORE_EVERY_CHUNKS_DEFAULT: u64 = 128;

/// Weight of the newest sample in the running estimates.
const EWMA_WEIGHT: f64 = 0.2;
/// Throughput samples from chunks smaller than this are timer noise.
const MIN_TIMED_BYTES: usize = 64 * 1024;
/// The probe-based correction of expected ratios stays within this factor.
const PROBE_SCALE_MAX: f64 = 4.0;

/// The codecs `auto` chooses among, fastest first.
pub const AUTO_CANDIDATES: [(Codec, i32); 4] = [
    (Codec::Lz4, 0),
    (Codec::Zstd, 1),
    (Codec::Zstd, 3),
    (Codec::Zstd, 9),
];

/// What the sender knows about the link, refreshed as often as it likes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkState {
    /// Rate the link drains in wire bytes/s, all streams together: the rate
    /// limit, or the send rate measured while the send queues were full.
    /// `None` (unknown) counts as faster than any compressor.
    pub link_bytes_per_s: Option<f64>,
    /// Cores compressing in parallel (sender threads); fractions allowed.
    pub cores_for_compression: f64,
}

/// Running estimate for one candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecEstimate {
    /// Raw bytes compressed per second on one core.
    pub bytes_per_s: f64,
    /// Raw bytes / compressed bytes on recent chunks.
    pub ratio: f64,
}

/// Starting estimates for [`AUTO_CANDIDATES`], in that order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimates {
    /// lz4.
    pub lz4: CodecEstimate,
    /// zstd at level 1.
    pub zstd1: CodecEstimate,
    /// zstd at level 3.
    pub zstd3: CodecEstimate,
    /// zstd at level 9.
    pub zstd9: CodecEstimate,
}

impl Default for Estimates {
    /// Measured on the development machines (see the module figures in
    /// `compress/mod.rs`); the running estimates replace them quickly.
    fn default() -> Self {
        Self {
            lz4: CodecEstimate {
                bytes_per_s: 470e6,
                ratio: 1.88,
            },
            zstd1: CodecEstimate {
                bytes_per_s: 310e6,
                ratio: 2.29,
            },
            zstd3: CodecEstimate {
                bytes_per_s: 150e6,
                ratio: 2.45,
            },
            zstd9: CodecEstimate {
                bytes_per_s: 40e6,
                ratio: 2.65,
            },
        }
    }
}

impl Estimates {
    fn to_array(self) -> [CodecEstimate; 4] {
        [self.lz4, self.zstd1, self.zstd3, self.zstd9]
    }
}

/// Why a chunk got its codec (for stats and debugging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `--compress` named a codec (or `none`).
    Fixed,
    /// No compressor can keep up with the link (or its rate is unknown).
    LinkFaster,
    /// The probe did not shrink by [`PROBE_MIN_SAVING`].
    Incompressible,
    /// The cheapest expected time per chunk.
    Cheapest,
    /// A periodic measurement of a candidate.
    Explore,
}

/// What to do with one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// [`Codec::None`] means send raw.
    pub codec: Codec,
    /// zstd level; 0 for other codecs.
    pub level: i32,
    /// Why this codec.
    pub reason: Reason,
}

impl Choice {
    const fn raw(reason: Reason) -> Self {
        Self {
            codec: Codec::None,
            level: 0,
            reason,
        }
    }
}

/// Counters for the `done` event; sum the threads' with [`CompressStats::add`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CompressStats {
    /// Chunks sent raw.
    pub chunks_raw: u64,
    /// Chunks sent lz4-compressed.
    pub chunks_lz4: u64,
    /// Chunks sent zstd-compressed (any level).
    pub chunks_zstd: u64,
    /// Raw bytes of all chunks.
    pub raw_bytes: u64,
    /// Payload bytes of all chunks (raw ones count their raw length).
    pub payload_bytes: u64,
    /// Chunks whose compressibility was probed (`auto`).
    pub probes: u64,
    /// Probes that found the chunk incompressible (sent raw).
    pub probes_incompressible: u64,
    /// Chunks coded with a candidate other than the best, to refresh its
    /// estimates.
    pub chunks_explored: u64,
}

impl CompressStats {
    /// Adds `other`'s counters to these.
    pub fn add(&mut self, other: &CompressStats) {
        self.chunks_raw += other.chunks_raw;
        self.chunks_lz4 += other.chunks_lz4;
        self.chunks_zstd += other.chunks_zstd;
        self.raw_bytes += other.raw_bytes;
        self.payload_bytes += other.payload_bytes;
        self.probes += other.probes;
        self.probes_incompressible += other.probes_incompressible;
        self.chunks_explored += other.chunks_explored;
    }

    fn count_raw(&mut self, raw_len: usize) {
        self.chunks_raw += 1;
        self.raw_bytes += raw_len as u64;
        self.payload_bytes += raw_len as u64;
    }
}

/// The per-thread compression policy.
pub struct Policy {
    mode: Mode,
    estimates: [CodecEstimate; 4],
    /// Running lz4 ratio of the probe on chunks that passed it.
    probe_ratio: f64,
    explore_every_chunks: u64,
    chunks_since_explore: u64,
    next_explore: usize,
    probe_table: CompressTable,
    probe_out: Vec<u8>,
    stats: CompressStats,
}

impl Policy {
    /// A policy seeded with [`Estimates::default`].
    pub fn new(mode: Mode) -> Self {
        Self::with_estimates(mode, Estimates::default())
    }

    /// A policy seeded with `estimates` (tests inject them so decisions do
    /// not depend on the speed of the machine).
    pub fn with_estimates(mode: Mode, estimates: Estimates) -> Self {
        let estimates = estimates.to_array().map(|e| CodecEstimate {
            bytes_per_s: sane(e.bytes_per_s, 1e3),
            ratio: sane(e.ratio, 1.0),
        });
        Self {
            mode,
            estimates,
            // Probe slices are short, so they compress less than a chunk;
            // start by assuming they see the lz4 chunk ratio.
            probe_ratio: estimates[0].ratio,
            explore_every_chunks: EXPLORE_EVERY_CHUNKS_DEFAULT,
            chunks_since_explore: 0,
            next_explore: 0,
            probe_table: CompressTable::small(),
            probe_out: vec![0; lz4_bound_bytes(PROBE_SLICE_BYTES)],
            stats: CompressStats::default(),
        }
    }

    /// After every `chunks` chunks, send the next compressible one with a
    /// candidate in turn to refresh its estimates; 0 turns exploration off.
    pub fn with_explore_every(mut self, chunks: u64) -> Self {
        self.explore_every_chunks = chunks;
        self
    }

    /// The `--compress` mode this policy follows.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// This thread's counters so far.
    pub fn stats(&self) -> &CompressStats {
        &self.stats
    }

    /// Current running estimates, in [`AUTO_CANDIDATES`] order.
    pub fn estimates(&self) -> Estimates {
        let [lz4, zstd1, zstd3, zstd9] = self.estimates;
        Estimates {
            lz4,
            zstd1,
            zstd3,
            zstd9,
        }
    }

    /// Decide how to send `raw`. A raw answer is counted in the stats here;
    /// a codec is counted when the caller reports it through [`Self::record`].
    pub fn choose(&mut self, raw: &[u8], link: &LinkState) -> Choice {
        let choice = match self.mode {
            Mode::None => Choice::raw(Reason::Fixed),
            Mode::Lz4 => Choice {
                codec: Codec::Lz4,
                level: 0,
                reason: Reason::Fixed,
            },
            Mode::Zstd(level) => Choice {
                codec: Codec::Zstd,
                level,
                reason: Reason::Fixed,
            },
            Mode::Auto => self.choose_auto(raw, link),
        };
        if choice.codec == Codec::None {
            self.stats.count_raw(raw.len());
        }
        choice
    }

    fn choose_auto(&mut self, raw: &[u8], link: &LinkState) -> Choice {
        if raw.is_empty() {
            return Choice::raw(Reason::LinkFaster);
        }
        let cores = sane(link.cores_for_compression, 0.05).min(1024.0);
        let link_bytes_per_s = link.link_bytes_per_s.filter(|r| r.is_finite() && *r > 0.0);
        self.chunks_since_explore = self.chunks_since_explore.saturating_add(1);
        let explore_due =
            self.explore_every_chunks > 0 && self.chunks_since_explore >= self.explore_every_chunks;

        // Even with an infinite ratio a codec costs its compress time: when the
        // fastest one is no quicker than sending raw, do not look at the data.
        let fastest_bytes_per_s = self
            .estimates
            .iter()
            .map(|e| e.bytes_per_s * cores)
            .fold(0.0, f64::max);
        let link_is_faster = link_bytes_per_s.is_none_or(|l| fastest_bytes_per_s <= l);
        if link_is_faster && !explore_due {
            return Choice::raw(Reason::LinkFaster);
        }

        self.stats.probes += 1;
        let probe_ratio = self.probe(raw);
        if probe_ratio * (1.0 - PROBE_MIN_SAVING) < 1.0 {
            self.stats.probes_incompressible += 1;
            return Choice::raw(Reason::Incompressible);
        }
        self.probe_ratio = ewma(self.probe_ratio, probe_ratio);

        if explore_due {
            let (codec, level) = AUTO_CANDIDATES[self.next_explore];
            // On a link faster than every compressor only the fastest codec
            // could flip the decision: measure that one alone.
            self.next_explore = if link_is_faster {
                0
            } else {
                (self.next_explore + 1) % AUTO_CANDIDATES.len()
            };
            self.stats.chunks_explored += 1;
            self.chunks_since_explore = 0;
            return Choice {
                codec,
                level,
                reason: Reason::Explore,
            };
        }

        let Some(link) = link_bytes_per_s else {
            return Choice::raw(Reason::LinkFaster);
        };
        let scale = (probe_ratio / self.probe_ratio).clamp(1.0 / PROBE_SCALE_MAX, PROBE_SCALE_MAX);
        let raw_len = raw.len() as f64;
        let mut best = Choice::raw(Reason::Cheapest);
        let mut best_s = raw_len / link;
        for (estimate, (codec, level)) in self.estimates.iter().zip(AUTO_CANDIDATES) {
            let ratio = (estimate.ratio * scale).max(1.0);
            let compress_s = raw_len / (estimate.bytes_per_s * cores);
            let wire_s = raw_len / (ratio * link);
            let chunk_s = compress_s.max(wire_s);
            if chunk_s < best_s {
                best_s = chunk_s;
                best = Choice {
                    codec,
                    level,
                    reason: Reason::Cheapest,
                };
            }
        }
        best
    }

    /// lz4 ratio of [`PROBE_SLICES`] slices spread over `raw` (the whole of
    /// `raw` when it is shorter than the slices together).
    fn probe(&mut self, raw: &[u8]) -> f64 {
        let span_bytes = PROBE_SLICE_BYTES * PROBE_SLICES;
        let (slices, step) = if raw.len() <= span_bytes {
            (raw.len().div_ceil(PROBE_SLICE_BYTES), PROBE_SLICE_BYTES)
        } else {
            (
                PROBE_SLICES,
                (raw.len() - PROBE_SLICE_BYTES) / (PROBE_SLICES - 1),
            )
        };
        let (mut in_bytes, mut out_bytes) = (0usize, 0usize);
        for i in 0..slices {
            let start = i * step;
            let slice = &raw[start..(start + PROBE_SLICE_BYTES).min(raw.len())];
            in_bytes += slice.len();
            // The scratch is sized for a full slice, so this cannot fail; if
            // it did, count the slice as incompressible.
            out_bytes +=
                compress_into_with_table(slice, &mut self.probe_out, &mut self.probe_table)
                    .unwrap_or(slice.len());
        }
        in_bytes as f64 / out_bytes.max(1) as f64
    }

    /// Report a chunk compressed with `codec`/`level` in `elapsed`. Updates
    /// the running estimates (for the [`AUTO_CANDIDATES`]) and the stats. A
    /// payload that is not smaller than the chunk is sent raw by the caller
    /// and counted here as raw.
    pub fn record(
        &mut self,
        codec: Codec,
        level: i32,
        raw_len: usize,
        compressed_len: usize,
        elapsed: Duration,
    ) {
        if codec == Codec::None || compressed_len >= raw_len {
            self.stats.count_raw(raw_len);
        } else {
            match codec {
                Codec::Lz4 => self.stats.chunks_lz4 += 1,
                _ => self.stats.chunks_zstd += 1,
            }
            self.stats.raw_bytes += raw_len as u64;
            self.stats.payload_bytes += compressed_len as u64;
        }
        let Some(index) = AUTO_CANDIDATES
            .iter()
            .position(|&(c, l)| c == codec && (codec != Codec::Zstd || l == level))
        else {
            return;
        };
        if raw_len == 0 {
            return;
        }
        let estimate = &mut self.estimates[index];
        let ratio = raw_len as f64 / compressed_len.max(1) as f64;
        estimate.ratio = ewma(estimate.ratio, ratio.max(1.0));
        let secs = elapsed.as_secs_f64();
        if raw_len >= MIN_TIMED_BYTES && secs > 0.0 {
            estimate.bytes_per_s = ewma(estimate.bytes_per_s, raw_len as f64 / secs);
        }
    }
}

fn ewma(old: f64, sample: f64) -> f64 {
    old + EWMA_WEIGHT * (sample - old)
}

/// `value` if it is a finite number ≥ `min`, else `min`.
fn sane(value: f64, min: f64) -> f64 {
    if value.is_finite() && value >= min {
        value
    } else {
        min
    }
}
