"""scripts/bench-net --sweep streams|chunk|copy-chunk: diskferry's
throughput against one setting, for the plots of scripts/bench-report.

One image (dense unless --images names another), one pseudo-tool per value
of the setting ("1", "2", ... or "64k", "128k", ...), all in ONE
alternating schedule (bench_measure.schedule: a warm-up each, then --runs
rounds, default 3), so the values share the machine's slow and fast
spells. `streams` and `chunk` run `diskferry send` (mutual TLS) to the
run's `diskferry serve` with --streams N / --chunk-size X; `copy-chunk`
runs `diskferry copy SRC_URI FILE --chunk-size X` to a file in the
scratch folder (no receiver). The JSON's top level says what was swept:
`sweep: {name, flag, command, values}`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench_common import bl
from bench_net_image import NetToolResult, group, run_rounds, send_command, summarise

log, fmt, tail = bl.log, bl.fmt, bl.tail
CHUNK_SIZES = ["64k", "128k", "256k", "512k", "1M", "4M"]
SWEEPS: dict[str, dict] = {
    "streams": {"flag": "--streams", "command": "send", "values": ["1", "2", "4", "8"]},
    "chunk": {"flag": "--chunk-size", "command": "send", "values": CHUNK_SIZES},
    "copy-chunk": {"flag": "--chunk-size", "command": "copy", "values": CHUNK_SIZES},
}
DEFAULT_RUNS = 3


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sweep", choices=sorted(SWEEPS),
                    help="diskferry's time against one setting on one image (default dense; --images picks): "
                         "send --streams 1,2,4,8 | send --chunk-size 64k..4M | copy --chunk-size 64k..4M, "
                         f"alternating (--runs defaults to {DEFAULT_RUNS}; scripts/lib/bench_sweep.py)")
    ap.add_argument("--sweep-values", default="", help="the values to sweep instead, e.g. 1,2,4")


def configure(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Check --sweep's arguments; the image and the pseudo-tools."""
    spec = SWEEPS[args.sweep]
    values = [v for v in args.sweep_values.split(",") if v] or list(spec["values"])
    if len(set(values)) != len(values):
        ap.error("--sweep-values: a value is given twice")
    if len(args.image_list) != 1:
        ap.error("--sweep takes one image (--images dense, sparse or ext4)")
    args.sweep_value_list = values
    args.tool_list = values


def meta(args: argparse.Namespace) -> dict:
    """The JSON's top-level `sweep`."""
    spec = SWEEPS[args.sweep]
    return {"name": args.sweep, "flag": spec["flag"], "command": spec["command"], "values": args.sweep_value_list}


def needs_serve(args: argparse.Namespace) -> bool:
    return bool(args.sweep) and SWEEPS[args.sweep]["command"] == "send"


def bench(args, diskferry: Path, serve, workdir: Path, scratch: Path) -> dict:
    """Every value in one schedule on one image: the image's group."""
    spec = SWEEPS[args.sweep]
    kind = args.image_list[0]
    image = bl.make_image(kind, bl.parse_size(args.size_map[kind]), args.size_map[kind], scratch)
    size_bytes, alloc_bytes = image.stat().st_size, image.stat().st_blocks * 512
    log(f"--sweep {args.sweep}: {spec['command']} {spec['flag']} {','.join(args.sweep_value_list)} on "
        f"{image.name}, size {size_bytes / 2**30:.2f} GiB, allocated {alloc_bytes / 2**30:.2f} GiB")
    source = bl.QemuNbd(image, workdir)
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    name = f"sweep-{kind}.img"
    out = serve.root / name if spec["command"] == "send" else scratch / f"sweep-copy-{kind}.img"
    results: dict[str, NetToolResult] = {}
    for value in args.sweep_value_list:
        setting = [spec["flag"], value]
        if spec["command"] == "send":
            cmd = send_command(diskferry, source.uri, name, serve, [*args.diskferry_args, *setting])
            res = NetToolResult(value, cmd, receiver=" ".join(serve.cmd))
            res.display = (" ".join(["diskferry", *cmd[1:]]).replace(source.uri, "SRC_URI")
                           .replace(f"{serve.host}:{serve.port}", f"{serve.host}:PORT")
                           .replace(str(serve.tls), "TLS"))
            res.display_receiver = (" ".join(["diskferry", *serve.cmd[1:]]).replace(str(serve.root), "ROOT")
                                    .replace(f"{serve.host}:0", f"{serve.host}:PORT")
                                    .replace(str(serve.tls), "TLS"))
        else:
            cmd = [str(diskferry), "copy", source.uri, str(out), "--no-progress", *args.diskferry_args, *setting]
            res = NetToolResult(value, cmd, receiver="none (a local file on the same disk)")
            res.display = " ".join(["diskferry", "copy", "SRC_URI", "FILE", *cmd[4:]])
            res.display_receiver = res.receiver
        results[value] = res

    def prepare(value: str, res: NetToolResult, label: str):
        if spec["command"] == "send" and not serve.alive():
            res.error = f"diskferry serve exited; log {serve.log_path}"
            log(f"sweep {value} {label}: {res.error}\n{tail(serve.log_path)}")
            return None
        out.unlink(missing_ok=True)
        return out, serve.pid if spec["command"] == "send" else None, res.command

    try:
        run_rounds(f"sweep-{args.sweep}", image, results, args, bl.disk_of(scratch), logs, prepare,
                   lambda _value: None, source.pid)
    finally:
        source.stop()
        out.unlink(missing_ok=True)
    return group(kind, image, size_bytes, alloc_bytes, source,
                 {v: summarise(r, size_bytes, alloc_bytes) for v, r in results.items()})


def markdown_table(group: dict, sweep: dict, runs: int) -> str:
    """One row per value; `time / best` is the value's median over the
    fastest value's median."""
    medians = [s["median_s"] for s in group["tools"].values() if "median_s" in s]
    best = min(medians) if medians else None
    rows = [
        f"| {sweep['flag']} | runs | median s | min s | max s | GB/s (alloc) | GB/s (size) | CPU s (sender) "
        "| CPU s (receiver) | CPU s (source qemu-nbd) | peak RSS MiB (sender) | peak RSS MiB (receiver) "
        "| time / best |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for value, s in group["tools"].items():
        cells = [
            value, "FAILED" if s.get("error") else f"{s.get('n', 0)}/{runs}",
            fmt(s.get("median_s")), fmt(s.get("min_s")), fmt(s.get("max_s")),
            fmt(s.get("gb_per_s_allocated")), fmt(s.get("gb_per_s_size")),
            fmt(s.get("cpu_s_median")), fmt(s.get("receiver_cpu_s_median")), fmt(s.get("source_cpu_s_median")),
            fmt(s.get("peak_rss_mib"), 0), fmt(s.get("receiver_peak_rss_mib"), 0),
            fmt(s["median_s"] / best) if best and "median_s" in s else "—",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
