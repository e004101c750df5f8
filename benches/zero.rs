//! Zero detection throughput (`cargo bench --bench zero`).
//!
//! Zero detection runs on every chunk that was read, so it must stay far
//! above disk and network speed: these report GB/s for an all-zero buffer
//! (worst case: every byte is looked at), a random buffer (best case: the
//! first stripe decides) and the granule scan of a half-zero buffer.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diskferry::pipeline::zero::{GRANULE_BYTES, Run, is_zero, runs};

const BUF_BYTES: usize = 1024 * 1024;

/// Deterministic pseudo-random bytes (xorshift64*), no zero words in practice.
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Alternating 16 KiB data / 16 KiB zero blocks: half the granules are zero.
fn half_zero_bytes(len: usize) -> Vec<u8> {
    let mut buf = random_bytes(len, 7);
    for block in buf.chunks_mut(16 * 1024).skip(1).step_by(2) {
        block.fill(0);
    }
    buf
}

fn bench_is_zero(c: &mut Criterion) {
    let zeros = vec![0u8; BUF_BYTES];
    let random = random_bytes(BUF_BYTES, 1);
    let mut group = c.benchmark_group("is_zero");
    group.throughput(Throughput::Bytes(BUF_BYTES as u64));
    group.bench_function("1MiB_all_zero", |b| b.iter(|| is_zero(black_box(&zeros))));
    group.bench_function("1MiB_random", |b| b.iter(|| is_zero(black_box(&random))));
    group.finish();
}

fn bench_runs(c: &mut Criterion) {
    let buf = half_zero_bytes(BUF_BYTES);
    let mut out: Vec<Run> = Vec::with_capacity(BUF_BYTES / GRANULE_BYTES);
    let mut group = c.benchmark_group("runs");
    group.throughput(Throughput::Bytes(BUF_BYTES as u64));
    group.bench_function("1MiB_half_zero_4KiB_granules", |b| {
        b.iter(|| {
            runs(black_box(&buf), GRANULE_BYTES, &mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench_is_zero, bench_runs);
criterion_main!(benches);
