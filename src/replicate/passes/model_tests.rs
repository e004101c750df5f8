use super::*;

const MB: f64 = 1e6;

/// Simulates passes over a link moving `rate` bytes/s with `fixed_s` of
/// set-up, while the source changes at `dirty(t)` bytes/s; returns every
/// verdict until one is not `Another`.
fn simulate(
    full_bytes: f64,
    rate: f64,
    fixed_s: f64,
    dirty: impl Fn(f64) -> f64,
    budget_s: f64,
    max_passes: u32,
) -> Vec<Verdict> {
    let mut model = Convergence::new(Duration::from_secs_f64(budget_s), max_passes);
    let mut t = 0.0;
    let mut changed = full_bytes;
    let mut verdicts = Vec::new();
    for pass in 1..=100 {
        let duration = fixed_s + changed / rate;
        let v = model.record(PassFigures {
            pass,
            bytes_changed: changed as u64,
            bytes_on_wire: changed as u64,
            started: Duration::from_secs_f64(t),
            duration: Duration::from_secs_f64(duration),
        });
        verdicts.push(v.clone());
        // What changed while this pass ran is the next pass's load.
        changed = dirty(t) * duration;
        t += duration;
        if !matches!(v, Verdict::Another { .. }) {
            break;
        }
    }
    verdicts
}

#[test]
fn a_slow_writer_converges_and_the_prediction_matches_the_final_pass() {
    // 8 GB at 100 MB/s, 1 s of set-up, the source changes at 5 MB/s.
    let v = simulate(8e9, 100.0 * MB, 1.0, |_| 5.0 * MB, 3.0, 10);
    let Some(Verdict::Ready { predicted_downtime }) = v.last() else {
        panic!("expected ready, got {v:?}");
    };
    assert!(v.len() >= 2, "{v:?}");
    // Pass 2 carried 81 s of changes (405 MB, 5.05 s); the final pass
    // carries 5.05 s of them: 1 + 25.25 MB / 100 MB/s.
    let real = 1.0 + 5.0 * MB * 5.05 / (100.0 * MB);
    let err = (predicted_downtime.as_secs_f64() - real).abs() / real;
    assert!(err < 0.05, "{predicted_downtime:?} vs {real}");
}

#[test]
fn a_writer_that_slows_down_gets_ready_later() {
    // Fast at first (60 MB/s), then 2 MB/s after 100 s.
    let v = simulate(
        6e9,
        100.0 * MB,
        0.5,
        |t| if t < 100.0 { 60.0 * MB } else { 2.0 * MB },
        2.0,
        20,
    );
    assert!(matches!(v.last(), Some(Verdict::Ready { .. })), "{v:?}");
    assert!(v.len() >= 4, "{v:?}");
}

#[test]
fn a_writer_faster_than_the_link_is_reported_not_converging() {
    let v = simulate(1e9, 50.0 * MB, 0.2, |_| 80.0 * MB, 2.0, 50);
    let Some(Verdict::NotConverging { reason, .. }) = v.last() else {
        panic!("expected not converging, got {v:?}");
    };
    assert!(reason.contains("not getting shorter"), "{reason}");
    // It gives up after the stalled passes, not at the pass bound.
    assert!(v.len() <= 1 + 1 + STALLED_PASSES_MAX as usize + 1, "{v:?}");
}

#[test]
fn a_fixed_cost_over_the_budget_never_converges() {
    // Delta passes read both disks: 20 s whatever changed.
    let v = simulate(1e9, 500.0 * MB, 20.0, |_| 1.0 * MB, 5.0, 50);
    assert!(
        matches!(v.last(), Some(Verdict::NotConverging { .. })),
        "{v:?}"
    );
}

#[test]
fn the_pass_bound_ends_the_series() {
    // Converging, but too slowly for a bound of 3 passes.
    let v = simulate(8e9, 100.0 * MB, 0.0, |_| 30.0 * MB, 0.001, 3);
    assert_eq!(v.len(), 3, "{v:?}");
    let Some(Verdict::NotConverging { reason, .. }) = v.last() else {
        panic!("{v:?}");
    };
    assert!(reason.contains("bound"), "{reason}");
}

#[test]
fn the_fit_recovers_fixed_cost_and_rate() {
    let pts: Vec<(f64, f64)> = [1e8, 3e8, 7e8]
        .iter()
        .map(|&b| (b, 2.0 + b / (50.0 * MB)))
        .collect();
    let (fixed, rate) = fit_line(&pts);
    assert!((fixed - 2.0).abs() < 1e-6, "{fixed}");
    assert!((rate / (50.0 * MB) - 1.0).abs() < 1e-6, "{rate}");
    // One point: through the origin.
    let (fixed, rate) = fit_line(&pts[..1]);
    assert_eq!(fixed, 0.0);
    assert!(rate > 0.0);
    // Bigger passes that were not slower: no negative slope.
    let (fixed, rate) = fit_line(&[(1e8, 5.0), (5e8, 4.0)]);
    assert!(fixed >= 0.0 && rate > 0.0);
}
