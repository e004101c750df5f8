//! scripts/bench-report: the report renders from saved results with every
//! section, table and plot (real gnuplot), the committed report is what its
//! results render, and a `--quick` run of every harness scenario (real
//! qemu-nbd, nbdkit, nbdcopy, qemu-img, rsync, network namespaces) writes
//! every results file and renders.
//!
//! Needs gnuplot (gnuplot-nox) and the harnesses' tools: scripts/test
//! installs them (scripts/lib/deps.sh ensure_deps). Nothing is skipped.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The committed results of the last full `scripts/bench-report` run.
const RESULTS: &str = "docs/bench/results";
/// Their rendering, committed: what `--from RESULTS` must give.
const REPORT: &str = "docs/benchmarks.md";

const SCENARIOS: [&str; 11] = [
    "local",
    "net",
    "sparse",
    "sparse-fragmented",
    "sweep-streams",
    "sweep-chunk",
    "sweep-copy-chunk",
    "link",
    "local-job",
    "net-job",
    "net-incremental",
];

const SECTIONS: [&str; 13] = [
    "## At a glance",
    "## Local copies",
    "## Sends over loopback",
    "## A large sparse disk",
    "## Memory",
    "## CPU cost per GiB and a projection",
    "## Streams and chunk size",
    "## Slow links",
    "## Several disks at once (copy --job)",
    "## Several disks at once (send --job)",
    "## Incremental and delta against rsync",
    "## The peers and their commands",
    "**Projection, not a measurement**",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bench_report(args: &[&str]) -> std::process::Output {
    let out = Command::new(repo().join("scripts/bench-report"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run scripts/bench-report");
    assert!(
        out.status.success(),
        "scripts/bench-report {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The plots a report links to, as `bench/NAME.svg` paths.
fn linked_plots(md: &str) -> Vec<String> {
    md.match_indices("](bench/")
        .filter_map(|(i, _)| {
            let rest = &md[i + 2..];
            rest.find(')').map(|end| rest[..end].to_string())
        })
        .filter(|p| p.ends_with(".svg"))
        .collect()
}

/// A complete SVG document with drawn paths (gnuplot draws bars, lines and
/// axes as <path d="...">); a truncated or empty plot fails here.
fn assert_drawn_svg(path: &Path) {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.trim_start().starts_with("<?xml"),
        "{}: not an XML document",
        path.display()
    );
    assert!(
        text.contains("<svg"),
        "{}: no <svg> element",
        path.display()
    );
    assert!(
        text.trim_end().ends_with("</svg>"),
        "{}: the document is not closed",
        path.display()
    );
    assert_eq!(
        text.matches("<svg").count(),
        text.matches("</svg>").count(),
        "{}: unbalanced <svg> elements",
        path.display()
    );
    let paths = text.matches("<path").count();
    assert!(
        paths >= 10,
        "{}: only {paths} <path> elements drawn",
        path.display()
    );
    assert!(
        text.contains(" d='M") || text.contains(" d=\"M"),
        "{}: paths without data",
        path.display()
    );
}

/// Every section and table, ≤ 200 lines, every linked plot a drawn SVG.
fn check_report(root: &Path, expect_every_scenario: bool) -> String {
    let md =
        fs::read_to_string(root.join("docs/benchmarks.md")).expect("docs/benchmarks.md written");
    let lines = md.lines().count();
    assert!(lines <= 200, "the report has {lines} lines (at most 200)");
    for s in SECTIONS {
        assert!(md.contains(s), "the report lacks {s:?}:\n{md}");
    }
    assert!(md.contains("bench/history.md"), "no link to the history");
    let tables = md.lines().filter(|l| l.starts_with("|---")).count();
    assert!(tables >= 12, "only {tables} tables:\n{md}");
    if expect_every_scenario {
        assert!(!md.contains("Not measured"), "a scenario is missing:\n{md}");
    }
    let plots = linked_plots(&md);
    let unique: BTreeSet<_> = plots.iter().collect();
    assert!(
        unique.len() >= 11,
        "only {} plots linked: {plots:?}",
        unique.len()
    );
    for p in &plots {
        assert_drawn_svg(&root.join("docs").join(p));
    }
    md
}

#[test]
fn report_from_saved_results_has_every_section_table_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();
    bench_report(&["--from", RESULTS, "--out", out, "--skip-deps"]);
    check_report(tmp.path(), true);
    for s in SCENARIOS {
        assert!(
            tmp.path()
                .join(format!("docs/bench/results/{s}.json"))
                .exists(),
            "{s}.json not copied into docs/bench/results"
        );
    }
    let svgs = fs::read_dir(tmp.path().join("docs/bench")).unwrap().count();
    assert!(svgs >= 13, "{svgs} entries in docs/bench");
}

/// The committed report is exactly what its committed results render (no
/// hand edits), and its plots are the ones those results draw.
#[test]
fn committed_report_is_what_its_results_render() {
    let (results, report) = (RESULTS, REPORT);
    let tmp = tempfile::tempdir().unwrap();
    bench_report(&[
        "--from",
        results,
        "--out",
        tmp.path().to_str().unwrap(),
        "--skip-deps",
    ]);
    let rendered = fs::read_to_string(tmp.path().join("docs/benchmarks.md")).unwrap();
    let committed = fs::read_to_string(repo().join(report)).unwrap();
    assert!(
        rendered == committed,
        "{report} differs from `scripts/bench-report --from {results}`: rerun it and commit the result"
    );
    let svgs = |dir: &Path| -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".svg"))
            .collect()
    };
    let drawn = svgs(&tmp.path().join("docs/bench"));
    assert_eq!(
        drawn,
        svgs(&repo().join("docs/bench")),
        "docs/bench/*.svg are not the plots the results draw"
    );
    for name in &drawn {
        let fresh = fs::read(tmp.path().join("docs/bench").join(name)).unwrap();
        let committed = fs::read(repo().join("docs/bench").join(name)).unwrap();
        assert!(
            fresh == committed,
            "docs/bench/{name} differs from what `--from {results}` draws: rerun it and commit the result"
        );
    }
}

/// Every harness scenario at tiny sizes (`--quick`: one round), with this
/// build's diskferry: each results file exists with the commit, the date
/// and counted runs of every tool, and the report renders from them.
#[test]
fn quick_run_of_every_scenario_writes_results_and_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let scratch = tmp.path().join("scratch");
    bench_report(&[
        "--quick",
        "--out",
        root.to_str().unwrap(),
        "--scratch",
        scratch.to_str().unwrap(),
        "--diskferry-bin",
        env!("CARGO_BIN_EXE_diskferry"),
        "--skip-deps",
    ]);
    for s in SCENARIOS {
        let path = root.join(format!("docs/bench/results/{s}.json"));
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let machine = &doc["machine"];
        let commit = machine["commit"].as_str().unwrap_or("");
        assert!(
            commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{s}: machine.commit {commit:?}"
        );
        assert!(
            machine["date_utc"]
                .as_str()
                .is_some_and(|d| d.ends_with('Z')),
            "{s}: no date"
        );
        let groups = doc["images"]
            .as_array()
            .unwrap_or_else(|| panic!("{s}: no images"));
        assert!(!groups.is_empty(), "{s}: no groups");
        for g in groups {
            let tools = g["tools"]
                .as_object()
                .unwrap_or_else(|| panic!("{s}: a group without tools"));
            assert!(!tools.is_empty(), "{s}: a group without tools");
            for (tool, summary) in tools {
                assert!(
                    summary["error"].is_null(),
                    "{s} / {tool}: {}",
                    summary["error"]
                );
                assert!(
                    summary["n"].as_u64().unwrap_or(0) >= 1,
                    "{s} / {tool}: no counted run"
                );
                let counted = summary["runs"]
                    .as_array()
                    .map(|r| r.iter().filter(|r| r["warmup"] == false).count())
                    .unwrap_or(0);
                assert!(counted >= 1, "{s} / {tool}: no counted run recorded");
            }
        }
    }
    check_report(&root, true);
}
