"""The output of scripts/bench-net --sparse (runs: bench_sparse.py): the
cost of the holes per tool (`sparse_over_packed`), the markdown tables and
sparse.json in the shape of the results contract."""

from __future__ import annotations

import json
import statistics

from bench_common import bl
from bench_sparse import DEFAULT_RUNS, SEED, TARGET_EXTRA, TOOLS

fmt = bl.fmt
# Issue 17: the copy and the send of the sparse disk take at most this many
# times the time of the same data as a dense file.
BAR_RATIO = 1.2


def _counted_times(summary: dict) -> dict[int, float]:
    """{round: wall_s} of a tool's counted, successful runs."""
    return {r["round"]: r["wall_s"] for r in summary.get("runs", [])
            if not r["warmup"] and r["exit_code"] == 0}


def sparse_over_packed(groups: list[dict]) -> dict[str, dict]:
    """Per tool: its median time on the sparse image over its median on the
    packed one, and the median over rounds of the same ratio taken within
    each round (the two ran seconds apart, so the machine's slow spells
    weigh on both)."""
    by_name = {g["image"]: g for g in groups}
    if "sparse" not in by_name or "packed" not in by_name:
        return {}
    out = {}
    for tool in TOOLS:
        s, p = by_name["sparse"]["tools"].get(tool, {}), by_name["packed"]["tools"].get(tool, {})
        entry: dict = {"ratio_of_medians": None, "paired_ratio_median": None, "paired_rounds": 0}
        if "median_s" in s and "median_s" in p and not s.get("error") and not p.get("error"):
            entry["ratio_of_medians"] = s["median_s"] / p["median_s"]
            ts, tp = _counted_times(s), _counted_times(p)
            ratios = [ts[r] / tp[r] for r in ts if r in tp]
            if ratios:
                entry["paired_ratio_median"] = statistics.median(ratios)
                entry["paired_rounds"] = len(ratios)
        out[tool] = entry
    return out


def markdown_table(groups: list[dict], runs: int) -> str:
    """Every (image, tool): times, rates, both sides' CPU and memory, the
    source's CPU and how much of the target got allocated."""
    rows = [
        "| image | size GiB | data MiB | tool | runs | median s | min s | max s | GB/s (data) "
        "| peak RSS MiB (sender) | peak RSS MiB (receiver) | CPU s (sender) | CPU s (receiver) "
        "| CPU s (source qemu-nbd) | target alloc MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in groups:
        for tool, s in g["tools"].items():
            talloc = s.get("target_allocated_bytes_max")
            cells = [
                g["image"], fmt(g["size_bytes"] / 2**30), fmt(g["data_bytes"] / 2**20, 1), tool,
                "FAILED" if s.get("error") else f"{s.get('n', 0)}/{runs}",
                fmt(s.get("median_s")), fmt(s.get("min_s")), fmt(s.get("max_s")),
                fmt(None if "median_s" not in s else g["data_bytes"] / s["median_s"] / 1e9),
                fmt(s.get("peak_rss_mib"), 0), fmt(s.get("receiver_peak_rss_mib"), 0),
                fmt(s.get("cpu_s_median")), fmt(s.get("receiver_cpu_s_median")),
                fmt(s.get("source_cpu_s_median")), fmt(None if talloc is None else talloc / 2**20, 1),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ratio_table(groups: list[dict], ratios: dict[str, dict]) -> str:
    """The figure of the issue: per tool, the sparse disk's time over the
    packed data's, against the bar of 1.2."""
    by_name = {g["image"]: g for g in groups}
    rows = [
        "| tool | median s (sparse) | median s (packed) | sparse / packed | paired ratio | rounds "
        f"| ≤ {BAR_RATIO} |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for tool, r in ratios.items():
        ms = by_name["sparse"]["tools"][tool].get("median_s")
        mp = by_name["packed"]["tools"][tool].get("median_s")
        judged = r["paired_ratio_median"] if r["paired_ratio_median"] is not None else r["ratio_of_medians"]
        verdict = "—" if judged is None else ("yes" if judged <= BAR_RATIO else "no")
        rows.append(f"| {tool} | {fmt(ms)} | {fmt(mp)} | {fmt(r['ratio_of_medians'])} "
                    f"| {fmt(r['paired_ratio_median'])} | {r['paired_rounds']} | {verdict} |")
    return "\n".join(rows)


def report(args, machine: dict, versions: dict, groups: list[dict]) -> int:
    """Print the machine, the commands and both tables; write sparse.json;
    1 if a tool failed."""
    machine["loadavg_end"] = bl.loadavg()
    if getattr(args, "sparse_diskferry_version", None):
        versions.setdefault("diskferry", args.sparse_diskferry_version)
    ratios = sparse_over_packed(groups)
    print()
    print(f"## bench-net --sparse, {machine['date_utc']}")
    print()
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_gib']} GiB RAM, "
          f"kernel {machine['kernel']}, scratch on {machine['scratch_fs']}, "
          f"TCP congestion control {machine.get('tcp_congestion_control', '?')}; all traffic on 127.0.0.1")
    for name, ver in versions.items():
        print(f"- {name}: {ver}")
    if groups:
        sp, pk = groups[0], groups[-1]
        print(f"- sparse: `{sp['made_by']}`: {sp['size_bytes'] / 2**30:.2f} GiB, "
              f"{sp['data_bytes'] / 2**20:.1f} MiB of data in {sp['data_extents']} extents "
              f"({sp['allocated_bytes'] / 2**20:.1f} MiB allocated)")
        print(f"- packed: {pk['made_by']}: {pk['size_bytes'] / 2**20:.1f} MiB, "
              f"{pk['allocated_bytes'] / 2**20:.1f} MiB allocated")
        print(f"- sources: `{' '.join(sp['server_command'][:-6])} -k SOCK --fork IMG`")
        for tool, s in sp["tools"].items():
            print(f"- {tool}: `{s.get('display_command', '')}`; receiver: {s.get('display_receiver', '')}")
    print()
    print(f"{args.runs} counted rounds after one warm-up of each (tool, image) pair; all eight pairs alternate "
          "in one schedule; times are wall seconds; GB = 10^9 bytes of data (the holes are not counted); "
          "CPU = user+sys seconds (median); sparse / packed is the ratio of the medians, paired ratio the "
          f"median of the per-round ratios (the bar of issue 17: ≤ {BAR_RATIO}, judged on the paired ratio). "
          f"nbdcopy-tcp's qemu-nbd target has {' '.join(TARGET_EXTRA)} so that the holes stay holes.")
    print()
    print(ratio_table(groups, ratios) if groups else "")
    print()
    print(markdown_table(groups, args.runs))
    failures = [(g["image"], t, s["error"]) for g in groups for t, s in g["tools"].items() if s.get("error")]
    for image, tool, err in failures:
        print(f"\n{image} / {tool} FAILED: {err}")

    out = {
        "machine": machine,
        "versions": versions,
        "config": {"runs": args.runs, "runs_default": DEFAULT_RUNS, "sparse": True,
                   "sparse_size": args.sparse_size, "sparse_size_bytes": args.sparse_size_bytes,
                   "sparse_percent": args.sparse_percent, "sparse_seed": SEED,
                   "images": args.image_list, "tools": args.tool_list,
                   "diskferry_args": args.diskferry_args, "nbdcopy_args": args.nbdcopy_args,
                   "qemu_nbd_target_args": [*args.qemu_target_args, *TARGET_EXTRA],
                   "verify_first_run_of_each_pair": args.verify},
        "images": groups,
        "sparse_over_packed": ratios,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nJSON: {args.json_out}")
    return 1 if failures else 0
