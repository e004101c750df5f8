//! The `diskferry` binary: [`diskferry::cli`] behind a heap tuned for TLS.

#![forbid(unsafe_code)]
fn main() {
    keep_heap();
    std::process::exit(diskferry::cli::main());
}

/// Keep freed heap memory instead of handing it back to the kernel.
///
/// rustls seals every TLS record into a freshly allocated `Vec` and frees it
/// once the record is written. glibc trims the top of a heap as soon as
/// 128 KiB of it is free, so the next records fault those pages in again,
/// zeroed. A sparse send spent about 10 % of its samples in those faults
/// (`perf record`: `exc_page_fault` under `OutboundChunks::copy_to_vec`), and
/// sender system time was 2.5–2.9 s against 1.8–2.1 s with trimming off (same-run
/// A/B of session 4, commit dedbcfa; docs/bench/history.md#tls-and-the-network-path
/// has that session's full runs). The live heap is small (the buffer pool
/// is its own mapping), so what is kept is bounded by the peak.
///
/// Fixing the trim threshold also fixes the mmap threshold, which glibc
/// otherwise raises as large blocks are freed. Set it to the largest value
/// glibc accepts, so a large buffer comes from the heap and is reused rather
/// than mapped and faulted in afresh each time.
fn keep_heap() {
    diskferry::engine::sys::keep_heap(128 << 20, 32 << 20);
}
