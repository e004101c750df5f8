//! The entry points of a send: option checks (before anything is opened
//! or dialled), one disk on an engine of its own ([`run`]) or on a given
//! engine ([`run_on`]).

use std::time::{Duration, Instant};

use tracing::warn;

use super::{ChangedSource, PassRequest, SendError, SendOptions, SendReport};
use crate::pipeline::CopyError;
use crate::pipeline::run::Requests;
use crate::pipeline::stats::Snapshot;
use crate::runtime::{Engine, EngineOptions, JobPhase, JobSpec};
use crate::wire;

impl SendOptions {
    /// Refuse options out of range, before anything is opened or dialled.
    pub fn check(&self) -> Result<(), SendError> {
        match (&self.tls_dir, self.insecure_plaintext) {
            (None, false) => return Err(SendError::NoTransportSecurity),
            (Some(_), true) => return Err(SendError::TlsAndPlaintext),
            _ => {}
        }
        if self.io_timeout.is_zero() {
            return Err(SendError::ZeroIoTimeout);
        }
        if self.streams == 0 || self.streams > u32::from(wire::MAX_STREAMS) {
            return Err(SendError::Streams {
                got: self.streams,
                max: wire::MAX_STREAMS,
            });
        }
        self.check_pass()?;
        Ok(Requests::check_flags(
            self.connections,
            self.requests,
            self.lanes,
        )?)
    }
}

impl SendOptions {
    /// Refuse a pass request or change id out of range.
    fn check_pass(&self) -> Result<(), SendError> {
        use super::pass::{DELTA_BLOCK_MAX_BYTES, DELTA_BLOCK_MIN_BYTES, MAX_CHANGE_ID_BYTES};
        match &self.pass {
            PassRequest::Full => {}
            PassRequest::Incremental { changed, .. } => {
                let empty = match changed {
                    ChangedSource::DirtyBitmap(name) => name.is_empty(),
                    ChangedSource::ChangedAreas(path) => path.as_os_str().is_empty(),
                };
                if empty {
                    return Err(SendError::NoChangedSource);
                }
            }
            &PassRequest::Delta { block_bytes } => {
                let ok = block_bytes.is_power_of_two()
                    && (DELTA_BLOCK_MIN_BYTES..=DELTA_BLOCK_MAX_BYTES).contains(&block_bytes);
                if !ok {
                    return Err(SendError::DeltaBlock {
                        got: block_bytes,
                        min: DELTA_BLOCK_MIN_BYTES,
                        max: DELTA_BLOCK_MAX_BYTES,
                    });
                }
            }
        }
        if let Some(id) = &self.change_id
            && id.len() > MAX_CHANGE_ID_BYTES
        {
            return Err(SendError::ChangeIdTooLong {
                got: id.len(),
                max: MAX_CHANGE_ID_BYTES,
            });
        }
        Ok(())
    }
}

/// Warn that a send goes without TLS (once per command).
pub fn warn_plaintext() {
    warn!(
        "--insecure-plaintext: sending without TLS; anyone on the network can read or alter \
         the disk on its way. Use --tls-dir unless the network is trusted"
    );
}

/// Run a send to completion (every byte durable on the receiver) or to
/// its first error: one disk, on an engine of its own.
pub fn run(
    opts: &SendOptions,
    progress: &mut dyn FnMut(&Snapshot, Duration),
) -> Result<SendReport, SendError> {
    opts.test_hooks.announce();
    opts.check()?;
    if opts.insecure_plaintext {
        warn_plaintext();
    }
    // The job runs on every worker or, from a server on this host, half of
    // them (see `Pipeline::start`).
    let engine = Engine::start(&EngineOptions {
        threads: opts.threads,
        kind: opts.engine,
        ..EngineOptions::default()
    })
    .map_err(CopyError::from)?;
    run_on(&engine, opts, progress)
}

/// Run one send disk as a job on `engine`, reporting its counters about
/// every `opts.progress_every` once it runs, and once at the end.
pub fn run_on(
    engine: &Engine,
    opts: &SendOptions,
    progress: &mut dyn FnMut(&Snapshot, Duration),
) -> Result<SendReport, SendError> {
    let started = Instant::now();
    let handle = engine.submit(JobSpec {
        name: opts.target.clone(),
        disks: vec![opts.clone().into()],
        rate_bytes_per_s: opts.rate_bytes_per_s,
    });
    let mut last: Option<Instant> = None;
    while !handle.wait_timeout(opts.progress_every.min(Duration::from_millis(50))) {
        let p = handle.progress();
        let due = match last {
            None => p.state != JobPhase::Starting,
            Some(at) => at.elapsed() >= opts.progress_every,
        };
        if let (true, Some(d)) = (due, p.disks.first()) {
            progress(&d.counters, started.elapsed());
            last = Some(Instant::now());
        }
    }
    let mut report = handle.wait();
    let outcome = report.disks.remove(0);
    progress(&outcome.counters, started.elapsed());
    Ok(outcome.result?.into_send()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case = (SendOptions, fn(&SendError) -> bool);

    #[test]
    fn bad_options_are_typed_errors_that_name_no_flag() {
        let base = SendOptions::new("a.img", "127.0.0.1:1", "t.img");
        let mut tls = base.clone();
        tls.tls_dir = Some("tls".into());
        let cases: Vec<Case> = vec![
            (base.clone(), |e| {
                matches!(e, SendError::NoTransportSecurity)
            }),
            (
                SendOptions {
                    insecure_plaintext: true,
                    ..tls.clone()
                },
                |e| matches!(e, SendError::TlsAndPlaintext),
            ),
            (
                SendOptions {
                    io_timeout: Duration::ZERO,
                    ..tls.clone()
                },
                |e| matches!(e, SendError::ZeroIoTimeout),
            ),
            (
                SendOptions {
                    streams: 0,
                    ..tls.clone()
                },
                |e| matches!(e, SendError::Streams { got: 0, .. }),
            ),
            (
                SendOptions {
                    pass: PassRequest::Delta { block_bytes: 3000 },
                    ..tls.clone()
                },
                |e| matches!(e, SendError::DeltaBlock { got: 3000, .. }),
            ),
            (
                SendOptions {
                    pass: PassRequest::Delta {
                        block_bytes: 2 << 20,
                    },
                    ..tls.clone()
                },
                |e| matches!(e, SendError::DeltaBlock { .. }),
            ),
            (
                SendOptions {
                    pass: PassRequest::Incremental {
                        changed: ChangedSource::DirtyBitmap(String::new()),
                        base: [1; 16],
                    },
                    ..tls.clone()
                },
                |e| matches!(e, SendError::NoChangedSource),
            ),
            (
                SendOptions {
                    change_id: Some("x".repeat(4097)),
                    ..tls.clone()
                },
                |e| matches!(e, SendError::ChangeIdTooLong { got: 4097, .. }),
            ),
        ];
        for (opts, want) in cases {
            let e = opts.check().expect_err("refused");
            assert!(want(&e), "{e:?}");
            assert!(e.is_usage(), "{e:?}");
            assert!(!e.to_string().contains("--"), "names a flag: {e}");
        }
        assert!(tls.check().is_ok());
    }
}
