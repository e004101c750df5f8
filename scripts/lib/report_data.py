"""The results folder as scripts/bench-report reads it: one JSON per
scenario (the contract in issue 17), helpers that pick figures out of it,
and the rules that turn figures into words ("limited by the disk").

Everything the report says is derived here from the files, so that
`scripts/bench-report --from docs/bench/results` renders the same report
on any machine, at any time: nothing reads the clock or the host."""

from __future__ import annotations

import json
from pathlib import Path

GIB = 2**30

# The scenarios in report order: file stem -> a title. The runner in
# scripts/bench-report makes exactly these files.
SCENARIOS: dict[str, str] = {
    "local": "Local copies",
    "net": "Sends over loopback",
    "sparse": "A large sparse disk",
    "sparse-fragmented": "A large sparse disk in small extents",
    "sweep-streams": "Throughput against --streams",
    "sweep-chunk": "Throughput against --chunk-size (send)",
    "sweep-copy-chunk": "Throughput against --chunk-size (copy)",
    "link": "Slow links",
    "local-job": "Several disks at once (copy --job)",
    "net-job": "Several disks at once (send --job)",
    "net-incremental": "Incremental and delta against rsync",
}

# One colour per tool in every plot (a diskferry tool is blue, nbdcopy red
# or orange, qemu-img green, rsync purple), so a reader learns them once.
TOOL_COLOURS: dict[str, str] = {
    "diskferry": "#1f77b4", "diskferry-copy": "#1f77b4", "diskferry-send": "#1f77b4",
    "diskferry-plain": "#6baed6", "diskferry-none": "#6baed6", "diskferry-seq": "#9ecae1",
    "nbdcopy": "#d62728", "nbdcopy-copy": "#d62728", "nbdcopy-tcp": "#d62728", "nbdcopy-par": "#d62728",
    "nbdcopy-tls": "#ff7f0e", "nbdcopy-tls-tuned": "#8c564b", "nbdcopy-local": "#7f7f7f",
    "qemu-img": "#2ca02c", "rsync": "#9467bd",
    "full": "#1f77b4", "delta": "#17becf", "delta-same": "#9edae5",
    "incremental-bitmap": "#2ca02c", "incremental-changed": "#98df8a",
    "read-source": "#7f7f7f", "read-target": "#c7c7c7",
}
_SPARE = ["#e377c2", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#c49c94"]


def colour(tool: str) -> str:
    """The tool's fixed colour; a tool outside the table gets a stable one."""
    if tool in TOOL_COLOURS:
        return TOOL_COLOURS[tool]
    return _SPARE[sum(tool.encode()) % len(_SPARE)]


def load(folder: Path) -> dict[str, dict]:
    """{scenario: parsed JSON} for every scenario file present in `folder`."""
    out = {}
    for name in SCENARIOS:
        path = folder / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def is_diskferry(tool: str) -> bool:
    return tool.startswith("diskferry")


def ran(summary: dict) -> bool:
    """A tool with counted runs and no error."""
    return bool(summary) and not summary.get("error") and summary.get("median_s") is not None


def gib(n: float | None) -> str:
    """A size as people write it: GiB from 1 GiB up, MiB below."""
    if n is None:
        return "?"
    return f"{n / GIB:.3g} GiB" if n >= GIB else f"{n / 2**20:.3g} MiB"


def f2(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def baseline(tools: dict[str, dict]) -> str | None:
    """The diskferry tool the peers are compared with: `diskferry` where
    it ran, else the first diskferry-* tool (sparse.json's
    diskferry-copy), else None (a sweep has no peer)."""
    names = [t for t in tools if is_diskferry(t)]
    if "diskferry" in names:
        return "diskferry"
    return names[0] if names else None


def is_reference(tool: str, tools: dict[str, dict]) -> bool:
    """The rows the others are compared with (shown bold): the baseline,
    and in sparse.json also diskferry-send."""
    return tool == baseline(tools) or tool == "diskferry-send"


def peer_of(tool: str, tools: dict[str, dict]) -> str | None:
    """The diskferry tool a row is compared with: in sparse.json a copy
    with a copy and a send with a send (nbdcopy-copy / diskferry-copy,
    nbdcopy-tcp / diskferry-send), elsewhere the baseline — also for
    diskferry's own variants (diskferry / diskferry-plain, -none, -seq)."""
    if is_reference(tool, tools):
        return None
    if "diskferry-send" in tools and tool != "nbdcopy-copy":
        return "diskferry-send"
    return baseline(tools)


def ratio(tools: dict[str, dict], tool: str) -> float | None:
    """diskferry's median time over this peer's (< 1: diskferry faster)."""
    ref = peer_of(tool, tools)
    if ref is None or not ran(tools.get(ref, {})) or not ran(tools[tool]):
        return None
    return tools[ref]["median_s"] / tools[tool]["median_s"]


def spread(doc: dict) -> float | None:
    """The noisiest tool's max/min time over the scenario's counted runs."""
    xs = [s["max_s"] / s["min_s"] for g in doc.get("images", []) for s in g.get("tools", {}).values()
          if ran(s) and s.get("min_s")]
    return max(xs) if xs else None


def cpu_total_s(s: dict) -> float | None:
    """CPU seconds of every process of the run: the tool, its receiver and
    the source qemu-nbd, where measured."""
    parts = [s.get("cpu_s_median"), s.get("receiver_cpu_s_median"), s.get("source_cpu_s_median")]
    parts = [p for p in parts if p is not None]
    return sum(parts) if parts else None


def limited_by(s: dict, nproc: int, group: dict) -> str:
    """What set the pace, from the data alone: the disk when it had I/O in
    flight ≥ 90 % of the time; the cores when all processes together used
    ≥ 85 % of wall × cores; the link when the bytes on the wire reached
    ≥ 85 % of the shaped rate; else nothing saturated ("—")."""
    if not ran(s):
        return "—"
    wall = s["median_s"]
    found = []
    link_bps = group.get("link_bits_per_s")
    if link_bps and s.get("wire_bytes_median"):
        if s["wire_bytes_median"] * 8 / wall >= 0.85 * link_bps:
            found.append("link")
    if (s.get("disk_busy_median") or 0) >= 0.9:
        found.append("disk")
    cpu = cpu_total_s(s)
    if cpu is not None and nproc and cpu >= 0.85 * wall * nproc:
        found.append("cores")
    return ", ".join(found) or "—"


def group_size(g: dict) -> str:
    """`2 GiB (2 GiB data)` for a group: its size and allocated bytes."""
    size, alloc = g.get("size_bytes"), g.get("allocated_bytes")
    if size and alloc and abs(alloc - size) > 0.01 * size:
        return f"{gib(size)}, {gib(alloc)} allocated"
    return gib(size)


def loadavgs(docs: dict[str, dict]) -> tuple[list[float] | None, list[float] | None]:
    """The 1-minute load averages at the start of the first and the end of
    the last scenario, as (start triple, end triple)."""
    ms = [d["machine"] for d in docs.values() if d.get("machine")]
    ms.sort(key=lambda m: m.get("date_utc", ""))
    if not ms:
        return None, None
    return ms[0].get("loadavg_start"), ms[-1].get("loadavg_end")


def trace_rates(trace: dict, column: str) -> list[tuple[float, float]]:
    """[(t_s, MB/s)] from a trace's cumulative samples of `column`
    (read_bytes or tx_bytes), one point per sample interval."""
    cols = trace.get("columns") or ["t_s", "read_bytes", "written_bytes", "tx_bytes"]
    i = cols.index(column)
    pts, prev = [], None
    for row in trace.get("samples") or []:
        t, v = row[0], row[i]
        if v is None:
            continue
        if prev is not None and t > prev[0]:
            pts.append((t, (v - prev[1]) / (t - prev[0]) / 1e6))
        prev = (t, v)
    return pts


def progress_rates(trace: dict) -> list[tuple[float, float]]:
    """[(t_s, MB/s)] from diskferry's own progress events in a trace
    (from the start: the first event's rate counts from 0 bytes at 0 s)."""
    pts, prev = [], (0.0, 0)
    for t, done in trace.get("progress") or []:
        if prev is not None and t > prev[0]:
            pts.append((t, (done - prev[1]) / (t - prev[0]) / 1e6))
        prev = (t, done)
    return pts

