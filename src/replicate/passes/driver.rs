//! Running a series of passes: ask for the changes, run the pass, record
//! it in the [`Convergence`] model, and end with a cut-over, a "ready"
//! or a "not converging".

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::model::{Convergence, PassFigures, Verdict};
use crate::replicate::send::pass::{SyncId, sync_id_hex};
use crate::replicate::send::{ChangedSource, PassRequest, SendError, SendOptions, SendReport};

/// Where each pass's changes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeSource {
    /// Every pass compares block digests with the target (no tracking).
    Delta {
        /// Block size of the comparison.
        block_bytes: u32,
    },
    /// A shell command run before each pass prints what to send: `full`,
    /// `dirty-bitmap:NAME` or `changed-areas:FILE`.
    Command(String),
}

/// How a series runs.
#[derive(Debug, Clone)]
pub struct PassesOptions {
    /// The final pass must fit this.
    pub max_downtime: Duration,
    /// Passes before giving up (the final one not counted).
    pub max_passes: u32,
    /// Where the changes come from.
    pub changes: ChangeSource,
    /// Stops or quiesces the source before the final pass; without it the
    /// series ends when the source is ready for cut-over.
    pub final_cmd: Option<String>,
    /// The base of the first pass when the command's first answer is an
    /// incremental (the target's last sync id).
    pub first_base: Option<SyncId>,
}

/// What the series reports as it goes.
#[derive(Debug)]
pub enum PassEvent<'a> {
    /// A pass finished.
    Pass {
        /// What it did.
        figures: PassFigures,
        /// `full`, `incremental` or `delta`.
        mode: &'static str,
        /// Its report.
        report: &'a SendReport,
        /// How long the next pass should take.
        predicted_next: Duration,
    },
    /// The next pass fits the budget (no final command: the series ends).
    ReadyForCutover {
        /// Passes run.
        passes: u32,
        /// The predicted length of the final pass.
        predicted_downtime: Duration,
        /// The last complete sync: the base of the final pass.
        sync_id: SyncId,
    },
    /// The final pass is durable.
    Cutover {
        /// From the final command's start to the final pass durable.
        downtime: Duration,
        /// What the model had predicted.
        predicted_downtime: Duration,
        /// The final pass's report.
        report: &'a SendReport,
    },
    /// The passes do not get short enough.
    NotConverging {
        /// Passes run.
        passes: u32,
        /// Why.
        reason: &'a str,
    },
}

/// How a series ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassesOutcome {
    /// Ready for cut-over (no final command was given).
    Ready,
    /// The final pass ran.
    CutOver,
    /// Given up: the source changes too fast.
    NotConverging,
}

/// Why a series failed.
#[derive(Debug, thiserror::Error)]
pub enum PassesError {
    /// A pass failed.
    #[error("pass {pass}: {source}")]
    Pass {
        /// Its number.
        pass: u32,
        /// What failed.
        #[source]
        source: SendError,
    },
    /// The change or final command failed or could not be run.
    #[error("pass {pass}: the command {cmd:?} {why}")]
    Command {
        /// The pass it ran before.
        pass: u32,
        /// The command.
        cmd: String,
        /// What went wrong.
        why: String,
    },
    /// The change command printed something that is not a change spec.
    #[error(
        "pass {pass}: the change command printed {printed:?}; expected `full`, \
         `dirty-bitmap:NAME` or `changed-areas:FILE`"
    )]
    BadSpec {
        /// The pass.
        pass: u32,
        /// What it printed.
        printed: String,
    },
    /// An incremental pass with no base: the first pass of a series that
    /// starts incremental needs the target's last sync id.
    #[error("pass {pass}: an incremental pass needs a base sync id (the target's last sync)")]
    NoBase {
        /// The pass.
        pass: u32,
    },
}

/// Largest output read from a change command.
const CMD_OUTPUT_MAX_BYTES: u64 = 64 * 1024;

/// Runs passes until the model says ready (then the final pass, if there
/// is a final command) or not converging. `run_pass` runs one send.
pub fn run_passes(
    base: &SendOptions,
    opts: &PassesOptions,
    run_pass: &mut dyn FnMut(&SendOptions) -> Result<SendReport, SendError>,
    events: &mut dyn FnMut(PassEvent<'_>),
) -> Result<PassesOutcome, PassesError> {
    let mut model = Convergence::new(opts.max_downtime, opts.max_passes);
    let series_start = Instant::now();
    let mut last_sync = opts.first_base;
    let mut pass = 0u32;
    loop {
        pass += 1;
        let started = series_start.elapsed();
        let t0 = Instant::now();
        let request = next_request(opts, pass, last_sync, false)?;
        let pass_opts = pass_options(base, request, false);
        let report = run_pass(&pass_opts).map_err(|source| PassesError::Pass { pass, source })?;
        last_sync = Some(report.sync_id);
        let figures = PassFigures {
            pass,
            bytes_changed: report.bytes_changed,
            bytes_on_wire: report.bytes_on_wire,
            started,
            duration: t0.elapsed(),
        };
        let verdict = model.record(figures);
        let predicted_next = match &verdict {
            Verdict::Another { predicted_next } | Verdict::NotConverging { predicted_next, .. } => {
                *predicted_next
            }
            Verdict::Ready { predicted_downtime } => *predicted_downtime,
        };
        events(PassEvent::Pass {
            figures,
            mode: mode_name(&pass_opts.pass),
            report: &report,
            predicted_next,
        });
        match verdict {
            Verdict::Another { .. } => continue,
            Verdict::NotConverging { reason, .. } => {
                events(PassEvent::NotConverging {
                    passes: pass,
                    reason: &reason,
                });
                return Ok(PassesOutcome::NotConverging);
            }
            Verdict::Ready { predicted_downtime } => {
                let Some(final_cmd) = &opts.final_cmd else {
                    events(PassEvent::ReadyForCutover {
                        passes: pass,
                        predicted_downtime,
                        sync_id: report.sync_id,
                    });
                    return Ok(PassesOutcome::Ready);
                };
                let down_since = Instant::now();
                pass += 1;
                run_command(final_cmd, pass, last_sync, true)?;
                let request = next_request(opts, pass, last_sync, true)?;
                let final_opts = pass_options(base, request, true);
                let report =
                    run_pass(&final_opts).map_err(|source| PassesError::Pass { pass, source })?;
                events(PassEvent::Cutover {
                    downtime: down_since.elapsed(),
                    predicted_downtime,
                    report: &report,
                });
                return Ok(PassesOutcome::CutOver);
            }
        }
    }
}

/// The options of one pass: the series' with this pass's request; only
/// the final pass verifies (the others read a source that is changing).
fn pass_options(base: &SendOptions, pass: PassRequest, is_final: bool) -> SendOptions {
    let mut o = base.clone();
    o.pass = pass;
    o.verify = base.verify && is_final;
    o
}

fn mode_name(pass: &PassRequest) -> &'static str {
    match pass {
        PassRequest::Full => "full",
        PassRequest::Incremental { .. } => "incremental",
        PassRequest::Delta { .. } => "delta",
    }
}

/// What pass `pass` sends: a delta, or what the change command says.
fn next_request(
    opts: &PassesOptions,
    pass: u32,
    base: Option<SyncId>,
    is_final: bool,
) -> Result<PassRequest, PassesError> {
    match &opts.changes {
        ChangeSource::Delta { block_bytes } => Ok(PassRequest::Delta {
            block_bytes: *block_bytes,
        }),
        ChangeSource::Command(cmd) => {
            let printed = run_command(cmd, pass, base, is_final)?;
            parse_spec(&printed, pass, base)
        }
    }
}

/// `full`, `dirty-bitmap:NAME` or `changed-areas:FILE` (the last non-empty
/// line the command printed).
fn parse_spec(printed: &str, pass: u32, base: Option<SyncId>) -> Result<PassRequest, PassesError> {
    let line = printed
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    let bad = || PassesError::BadSpec {
        pass,
        printed: line.chars().take(200).collect(),
    };
    if line == "full" {
        return Ok(PassRequest::Full);
    }
    let changed: ChangedSource = line.parse().map_err(|_| bad())?;
    let base = base.ok_or(PassesError::NoBase { pass })?;
    Ok(PassRequest::Incremental { changed, base })
}

/// Runs `cmd` with `sh -c`, the pass number, the base sync id and whether
/// this is the final pass in its environment; returns what it printed.
fn run_command(
    cmd: &str,
    pass: u32,
    base: Option<SyncId>,
    is_final: bool,
) -> Result<String, PassesError> {
    let fail = |why: String| PassesError::Command {
        pass,
        cmd: cmd.to_owned(),
        why,
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("DISKFERRY_PASS", pass.to_string())
        .env(
            "DISKFERRY_BASE_SYNC_ID",
            base.map(|b| sync_id_hex(&b)).unwrap_or_default(),
        )
        .env("DISKFERRY_FINAL", if is_final { "1" } else { "0" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("could not be started: {e}")))?;
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        stdout
            .take(CMD_OUTPUT_MAX_BYTES)
            .read_to_end(&mut out)
            .map_err(|e| fail(format!("could not be read: {e}")))?;
    }
    let status = child
        .wait()
        .map_err(|e| fail(format!("could not be waited for: {e}")))?;
    if !status.success() {
        return Err(fail(format!("failed ({status})")));
    }
    String::from_utf8(out).map_err(|_| fail("printed something that is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_specs_parse_to_requests() {
        let base = Some([7u8; 16]);
        assert_eq!(parse_spec("full\n", 1, None).unwrap(), PassRequest::Full);
        assert_eq!(
            parse_spec("log line\ndirty-bitmap:b1\n\n", 2, base).unwrap(),
            PassRequest::Incremental {
                changed: ChangedSource::DirtyBitmap("b1".into()),
                base: [7; 16]
            }
        );
        assert!(matches!(
            parse_spec("changed-areas:/tmp/x.json", 2, None),
            Err(PassesError::NoBase { pass: 2 })
        ));
        for bad in ["", "bitmap:b1", "dirty-bitmap:", "changed-areas:"] {
            assert!(
                matches!(parse_spec(bad, 3, base), Err(PassesError::BadSpec { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn commands_see_the_pass_and_base_and_a_failure_is_an_error() {
        let out = run_command(
            "echo $DISKFERRY_PASS-$DISKFERRY_BASE_SYNC_ID-$DISKFERRY_FINAL",
            4,
            Some([0xab; 16]),
            true,
        )
        .unwrap();
        assert_eq!(out.trim(), format!("4-{}-1", "ab".repeat(16)));
        let e = run_command("exit 3", 1, None, false).unwrap_err();
        assert!(e.to_string().contains("failed"), "{e}");
    }
}
