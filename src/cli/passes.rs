//! `send --passes auto`: converging passes to a cut-over
//! (`replicate::passes`), with their events and exit codes.

use std::time::Duration;

use super::{SendArgs, done_event, exit_code};
use crate::progress::Progress;
use crate::replicate::passes::driver::{
    ChangeSource, PassEvent, PassesError, PassesOptions, PassesOutcome, run_passes,
};
use crate::replicate::send::{SendError, SendOptions};

/// Exit code of a series that does not converge.
pub const EXIT_NOT_CONVERGING: i32 = 7;

/// The series' options from the command line, or the usage error.
pub(super) fn passes_options(a: &SendArgs) -> Result<PassesOptions, String> {
    let changes = match (&a.changed_cmd, a.delta) {
        (Some(cmd), false) => ChangeSource::Command(cmd.clone()),
        (None, true) => ChangeSource::Delta {
            block_bytes: a
                .delta_block
                .unwrap_or(crate::replicate::send::pass::DELTA_BLOCK_DEFAULT_BYTES),
        },
        (Some(_), true) => return Err("--passes: give --delta or --changed-cmd, not both".into()),
        (None, false) => {
            return Err("--passes auto needs --delta or --changed-cmd CMD (what changed)".into());
        }
    };
    if a.changed.is_some() || a.changed_areas.is_some() {
        return Err(
            "--passes takes the changes from --changed-cmd (or --delta), not --changed/--changed-areas"
                .into(),
        );
    }
    Ok(PassesOptions {
        max_downtime: a.max_downtime,
        max_passes: a.max_passes,
        changes,
        final_cmd: a.final_cmd.clone(),
        first_base: a.base,
    })
}

/// Runs the series; returns the exit code.
pub(super) fn run(a: &SendArgs, base: &SendOptions, series: &PassesOptions) -> i32 {
    let (json, quiet) = (a.json, a.no_progress);
    let mut run_pass = |o: &SendOptions| {
        let mut progress = Progress::new(json, quiet);
        let r = crate::replicate::send::run(o, &mut |s, el| progress.update(s, el));
        progress.finish(None);
        r
    };
    let mut on_event = |e: PassEvent<'_>| report(json, quiet, &e);
    match run_passes(base, series, &mut run_pass, &mut on_event) {
        Ok(PassesOutcome::Ready | PassesOutcome::CutOver) => 0,
        Ok(PassesOutcome::NotConverging) => EXIT_NOT_CONVERGING,
        Err(e) => {
            let code = match &e {
                PassesError::Pass { source, .. } => match source {
                    SendError::Copy(c) => exit_code(c),
                    _ => 2,
                },
                PassesError::Command { .. } => 1,
                PassesError::BadSpec { .. } | PassesError::NoBase { .. } => 2,
            };
            if json {
                crate::progress::emit_json(&serde_json::json!({
                    "event": "error", "message": e.to_string(), "exit_code": code,
                }));
            }
            eprintln!("diskferry: {e}");
            code
        }
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

use crate::replicate::send::pass::sync_id_hex as hex;

/// Prints one event: a JSON line, or a line for people on stderr.
fn report(json: bool, quiet: bool, e: &PassEvent<'_>) {
    let (value, line) = match e {
        PassEvent::Pass {
            figures,
            mode,
            report,
            predicted_next,
        } => (
            serde_json::json!({
                "event": "pass",
                "pass": figures.pass,
                "mode": mode,
                "bytes_changed": figures.bytes_changed,
                "bytes_sent": figures.bytes_on_wire,
                "duration_s": secs(figures.duration),
                "predicted_next_s": secs(*predicted_next),
                "sync_id": hex(&report.sync_id),
            }),
            format!(
                "pass {} ({mode}): {} bytes changed, {} on the wire, {:.2}s; next pass ≈ {:.2}s; sync {}",
                figures.pass,
                figures.bytes_changed,
                figures.bytes_on_wire,
                figures.duration.as_secs_f64(),
                predicted_next.as_secs_f64(),
                hex(&report.sync_id)
            ),
        ),
        PassEvent::ReadyForCutover {
            passes,
            predicted_downtime,
            sync_id,
        } => (
            serde_json::json!({
                "event": "ready_for_cutover",
                "passes": passes,
                "predicted_downtime_s": secs(*predicted_downtime),
                "sync_id": hex(sync_id),
            }),
            format!(
                "ready for cut-over after {passes} passes: the final pass should take about {:.2}s \
                 (base sync {})",
                predicted_downtime.as_secs_f64(),
                hex(sync_id)
            ),
        ),
        PassEvent::Cutover {
            downtime,
            predicted_downtime,
            report,
        } => {
            if json {
                crate::progress::emit_json(&done_event(*report));
            }
            (
                serde_json::json!({
                    "event": "cutover",
                    "downtime_s": secs(*downtime),
                    "predicted_downtime_s": secs(*predicted_downtime),
                    "sync_id": hex(&report.sync_id),
                }),
                format!(
                    "cut over: downtime {:.2}s (predicted {:.2}s), sync {}",
                    downtime.as_secs_f64(),
                    predicted_downtime.as_secs_f64(),
                    hex(&report.sync_id)
                ),
            )
        }
        PassEvent::NotConverging { passes, reason } => (
            serde_json::json!({
                "event": "not_converging",
                "passes": passes,
                "reason": reason,
            }),
            format!("not converging after {passes} passes: {reason}"),
        ),
    };
    if json {
        crate::progress::emit_json(&value);
    } else if !quiet || matches!(e, PassEvent::NotConverging { .. }) {
        eprintln!("{line}");
    }
}
