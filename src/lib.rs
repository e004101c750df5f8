//! diskferry: a thread-per-core disk replication engine.
//!
//! Layout (see docs/ARCHITECTURE.md):
//! * [`nbd`]      — sans-IO NBD client codec plus a small blocking driver.
//! * [`engine`]   — I/O engines (io_uring, threaded fallback) behind one trait.
//! * [`endpoint`] — what a SRC / DST string means: NBD URIs, files, block
//!   devices, images opened through a qemu-nbd child.
//! * [`pipeline`] — extent planner, zero detection, buffer pool, workers.
//! * [`runtime`]  — the long-lived engine: pinned workers shared by every
//!   job, the memory budget, jobs as handles.
//! * [`jobfile`]  — the job file (a VM's disks, TOML), sans-IO.
//! * [`plan`]     — pass plans of incremental replication (dirty bitmaps,
//!   changed-areas lists); building blocks not yet used by `send`.
//! * [`progress`] — progress bar and newline-delimited JSON events.
//!
//! Unsafe code lives only in [`engine`] (the io_uring engine, the threaded
//! fallback and [`engine::sys`], the safe wrappers of every other system
//! call) and in the buffer pool ([`pipeline::pool`]). It is denied here for
//! every module, allowed in those two, and forbidden outright in each other
//! module root, so it cannot come back unnoticed.
#![deny(unsafe_code)]

pub mod cli;
pub mod compress;
pub mod endpoint;
pub mod engine;
pub mod jobfile;
pub mod journal;
pub mod nbd;
pub mod net;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod replicate;
pub mod runtime;
pub mod size;
pub mod sync;
pub mod wire;
