"""scripts/bench-net on one image: diskferry send/serve against the
nbdcopy peers (and the local reference), alternating rounds; the summary
and the markdown table."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from dataclasses import asdict
from pathlib import Path

from bench_common import bl
# Re-exported: other bench-net modules take them from here.
from net_rounds import (  # noqa: F401
    NetRun, NetToolResult, group, last_json_event, run_rounds, serve_target, timed_net, trace_runs,
)

log, fmt, tail = bl.log, bl.fmt, bl.tail
ALL_TOOLS = ("diskferry", "diskferry-plain", "nbdcopy-tcp", "nbdcopy-tls", "nbdcopy-tls-tuned", "nbdcopy-local")
# diskferry send to its own `diskferry serve`: TLS, and --insecure-plaintext.
DISKFERRY_TOOLS = {"diskferry", "diskferry-plain"}
# Peers that copy to a qemu-nbd target over the network (the others are
# diskferry itself and the local reference): whether they use TLS, and whether
# they take --nbdcopy-args / --qemu-nbd-target-args ("tuned") or run the
# design's command verbatim.
NET_PEERS = {
    "nbdcopy-tcp": {"tls": False, "tuned": True},
    "nbdcopy-tls": {"tls": True, "tuned": False},
    "nbdcopy-tls-tuned": {"tls": True, "tuned": True},
}


def add_args(ap: argparse.ArgumentParser) -> None:
    """--trace: the rate-over-time samples of the report's plots."""
    ap.add_argument("--trace", action="store_true",
                    help="after the counted runs, one extra traced run per tool (not counted): diskstats and "
                         "loopback tx sampled every 100 ms, diskferry with --json --progress-interval 100ms; "
                         "stored as the tool's `trace` (scripts/lib/bench_trace.py)")
    ap.add_argument("--trace-images", default="dense", help="images traced with --trace (default dense)")


def _placeholders(text: str, subst: dict[str, str]) -> str:
    for k, v in subst.items():
        text = text.replace(k, v)
    return text


def target_info(uri: str) -> dict | None:
    """What the qemu-nbd target advertises (multi-conn decides nbdcopy's -C)."""
    try:
        res = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=20)
        exp = json.loads(res.stdout)["exports"][0]
        return {k: exp.get(k) for k in ("export-size", "can_multi_conn", "can_flush", "can_fua",
                                        "can_zero", "can_trim", "is_read_only")}
    except (OSError, ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
        return None


def send_command(diskferry: Path, source_uri: str, name: str, serve, extra: list[str],
                 prefix: list[str] = ()) -> list[str]:
    """diskferry send to `serve`: TLS with its certificates, or plaintext;
    `prefix` runs it elsewhere (in --link's sender namespace)."""
    security = ["--insecure-plaintext"] if serve.plaintext else ["--tls-dir", str(serve.tls)]
    return [*prefix, str(diskferry), "send", source_uri, "--to", f"{serve.host}:{serve.port}",
            "--target", name, *security, "--no-progress", "--restart", *extra]


def _results(kind, name, tools, args, diskferry, serve, source, plain_serve=None) -> dict[str, NetToolResult]:
    results: dict[str, NetToolResult] = {}
    for t in tools:
        if t in DISKFERRY_TOOLS:
            srv = plain_serve if t == "diskferry-plain" else serve
            cmd = send_command(diskferry, source.uri, name, srv, args.diskferry_args)
            results[t] = NetToolResult(t, cmd, receiver=" ".join(srv.cmd))
            subst = {source.uri: "SRC_URI", f"{srv.host}:{srv.port}": f"{srv.host}:PORT",
                     str(srv.root): "ROOT", str(diskferry): "diskferry"}
            if srv.tls is not None:
                subst[str(srv.tls)] = "TLS"
            results[t].display = _placeholders(" ".join(cmd), subst)
            results[t].display_receiver = _placeholders(results[t].receiver, subst)
        else:
            results[t] = NetToolResult(t, [])  # the port changes per run
    return results


def _prepare(kind, name, tool, res, label, args, size_bytes, serve, peers, source, scratch, plain_serve=None):
    """Set up one run (not timed): (target path, receiver pid or None,
    command), or None after recording why the tool cannot run."""
    if tool in DISKFERRY_TOOLS:
        srv = plain_serve if tool == "diskferry-plain" else serve
        return serve_target(srv, name, res, f"{kind} {tool} {label}")
    if tool == "nbdcopy-local":
        out = scratch / f"local-{kind}.img"
        out.unlink(missing_ok=True)
        if not res.command:
            res.command = ["nbdcopy", "--flush", "SRC_URI", "LOCAL_FILE"]
            res.receiver = "none (a local file on the same disk)"
            res.display, res.display_receiver = " ".join(res.command), res.receiver
        return out, None, ["nbdcopy", "--flush", source.uri, str(out)]
    peer = peers[tool]
    try:
        peer.start(size_bytes)
    except (RuntimeError, OSError, ValueError) as e:
        res.error = f"target qemu-nbd: {e}"
        log(f"{kind} {tool} {label}: {res.error}")
        return None
    nbdcopy_args = args.nbdcopy_args if NET_PEERS[tool]["tuned"] else []
    if not res.command:
        res.command = ["nbdcopy", "--flush", *nbdcopy_args, "SRC_URI", peer.uri_template()]
        res.receiver = peer.describe()
        res.display, res.display_receiver = " ".join(res.command), res.receiver
        res.target_info = target_info(peer.uri())
    return peer.dst, peer.pid, ["nbdcopy", "--flush", *nbdcopy_args, source.uri, peer.uri()]


def bench_image(kind, image, size_bytes, tools, args, diskferry, serve, peers, workdir, scratch,
                plain_serve=None) -> dict:
    """Every tool on one image in alternating rounds; with --trace (and
    this image among --trace-images) one traced run per tool after them."""
    alloc_bytes = image.stat().st_blocks * 512
    log(f"{kind}: {image.name}, size {size_bytes / 2**30:.2f} GiB, allocated {alloc_bytes / 2**30:.2f} GiB")
    source = bl.QemuNbd(image, workdir)
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    disk = bl.disk_of(scratch)
    name = f"bench-{kind}.img"
    results = _results(kind, name, tools, args, diskferry, serve, source, plain_serve)
    traces: dict[str, dict] = {}

    def prepare(tool: str, res: NetToolResult, label: str):
        return _prepare(kind, name, tool, res, label, args, size_bytes, serve, peers, source, scratch, plain_serve)

    def after(tool: str) -> None:
        if tool in NET_PEERS:
            peers[tool].stop()  # after its CPU was read; the copy is flushed already

    try:
        run_rounds(kind, image, results, args, disk, logs, prepare, after, source.pid)
        if getattr(args, "trace", False) and kind in args.trace_image_list:
            traces = trace_runs(kind, results, args, disk, logs, prepare, after, DISKFERRY_TOOLS)
    finally:
        source.stop()
        for p in peers.values():
            p.stop()
            p.dst.unlink(missing_ok=True)
        for srv in (serve, plain_serve):
            if srv is not None:
                (srv.root / name).unlink(missing_ok=True)
    tools_out = {t: summarise(r, size_bytes, alloc_bytes) for t, r in results.items()}
    for t, trace in traces.items():
        tools_out[t]["trace"] = trace
    return group(kind, image, size_bytes, alloc_bytes, source, tools_out)


def summarise(res: NetToolResult, size_bytes: int, alloc_bytes: int) -> dict:
    """bench_measure's summary, plus the receiver's CPU and peak RSS, the
    bytes on the wire and the commands as the report shows them."""
    out = {"receiver_command": res.receiver, "display_command": res.display,
           "display_receiver": res.display_receiver, "target_info": res.target_info}
    out |= bl.summarise(res, size_bytes, alloc_bytes)
    counted = res.counted()
    if counted and not res.error:
        rcpu = [r.receiver_cpu_s for r in counted if r.receiver_cpu_s is not None]
        rrss = [r.receiver_peak_rss_kib for r in counted if r.receiver_peak_rss_kib is not None]
        wire = [r.wire_bytes for r in counted if r.wire_bytes is not None]
        out["receiver_cpu_s_median"] = statistics.median(rcpu) if rcpu else None
        out["receiver_peak_rss_mib"] = max(rrss) / 1024 if rrss else None
        out.setdefault("source_cpu_s_median", None)
        if wire:
            out["wire_bytes_median"] = statistics.median(wire)
    return out


def markdown_table(images: list[dict], runs: int) -> str:
    rows = [
        "| image | size GiB | alloc GiB | tool | runs | median s | min s | max s | GB/s (alloc) "
        "| GB/s (size) | peak RSS MiB (sender) | peak RSS MiB (receiver) | CPU s (sender) "
        "| CPU s (receiver) | CPU s (source qemu-nbd) | diskferry / tool |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for img in images:
        df = img["tools"].get("diskferry", {})
        for tool, s in img["tools"].items():
            ratio = None
            if tool != "diskferry" and "median_s" in s and "median_s" in df:
                ratio = df["median_s"] / s["median_s"]
            cells = [
                img["image"], fmt(img["size_bytes"] / 2**30), fmt(img["allocated_bytes"] / 2**30), tool,
                "FAILED" if s.get("error") else f"{s.get('n', 0)}/{runs}",
                fmt(s.get("median_s")), fmt(s.get("min_s")), fmt(s.get("max_s")),
                fmt(s.get("gb_per_s_allocated")), fmt(s.get("gb_per_s_size")),
                fmt(s.get("peak_rss_mib"), 0), fmt(s.get("receiver_peak_rss_mib"), 0),
                fmt(s.get("cpu_s_median")), fmt(s.get("receiver_cpu_s_median")),
                fmt(s.get("source_cpu_s_median")),
                "—" if tool == "diskferry" else fmt(ratio),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)

