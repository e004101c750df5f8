"""The plots of docs/bench/*.svg, each made from the results by gnuplot
(scripts/lib/report_gnuplot.py). `render(docs, out_dir)` draws every plot
the results have data for and returns {plot name: caption}, which the
markdown links below the matching table."""

from __future__ import annotations

from pathlib import Path

import report_cpu
from report_data import colour, gib, progress_rates, ran, trace_rates
from report_gnuplot import Bar, Series, bar_panels, line_plot

TIME_PLOTS = ("local", "net", "sparse", "sparse-fragmented", "link", "local-job", "net-job", "net-incremental")


def _panel_title(g: dict) -> str:
    if g.get("link"):
        return f"{g['image']} over {g['link']}"
    size = g.get("size_bytes")
    return f"{g['image']} ({gib(size)})" if size else g["image"]


def times(name: str, doc: dict, out: Path, preview: Path | None) -> str | None:
    """Median wall time per tool, one panel per image, min–max bars."""
    panels = []
    for g in doc.get("images", []):
        bars = [Bar(t, s["median_s"], s.get("min_s"), s.get("max_s"), colour(t))
                for t, s in g.get("tools", {}).items() if ran(s)]
        panels.append((_panel_title(g), bars))
    if not any(b for _, b in panels):
        return None
    title = f"{name}: wall time per tool (median of {doc.get('config', {}).get('runs', '?')}, bars min–max)"
    # the sparse disk and the dense file of its data are compared by eye: one scale
    bar_panels(out / f"time-{name}.svg", title, "wall time, s", panels, preview,
               shared_y=name.startswith("sparse"))
    return f"time-{name}.svg"


def rates(name: str, doc: dict, column: str, out: Path, preview: Path | None) -> str | None:
    """Rate over time during the traced run of every tool on the dense
    image: the disk read (copy) or loopback tx (send) rate sampled from
    outside, and diskferry's own progress events dashed."""
    series = []
    for g in doc.get("images", []):
        if g.get("image") != "dense":
            continue
        for t, s in g.get("tools", {}).items():
            tr = s.get("trace")
            if not tr:
                continue
            pts = trace_rates(tr, column)
            if pts and any(v > 0 for _, v in pts):  # nbdcopy-local sends nothing on lo
                series.append(Series(f"{t} ({'disk read' if column == 'read_bytes' else 'lo tx'})",
                                     colour(t), pts))
            prog = progress_rates(tr)
            if prog:
                series.append(Series(f"{t} (progress events)", colour(t), prog, dashed=True))
    if not series:
        return None
    what = "disk read rate" if column == "read_bytes" else "loopback tx rate"
    line_plot(out / f"rate-{name}.svg", f"{name}: {what} during one traced run per tool (dense image)",
              "time since start, s", "MB/s (10^6 bytes/s)", series, preview)
    return f"rate-{name}.svg"


def cpu(net: dict, out: Path, preview: Path | None) -> str | None:
    """CPU seconds per GiB, one panel per side (sender, receiver, source)."""
    table = report_cpu.per_gib(net)
    if not table:
        return None
    panels = []
    for side, title in (("sender", "sender"), ("receiver", "receiver"), ("source", "source qemu-nbd")):
        panels.append((title, [Bar(t, c[side], colour=colour(t)) for t, c in table.items() if c[side] is not None]))
    bar_panels(out / "cpu-per-gib.svg", "CPU seconds (user+sys) per GiB, dense image over loopback",
               "CPU s per GiB", panels, preview)
    return "cpu-per-gib.svg"


def memory(docs: dict[str, dict], out: Path, preview: Path | None) -> str | None:
    """Peak RSS: solid on the small dense disk, hatched on the large sparse one."""
    small, large = report_cpu.sizes(docs)
    bars = []
    for what, tool, a, b in report_cpu.memory_rows(docs):
        label = f"{tool} {what.replace('send: ', '').split(' (')[0]}"
        if a is not None:
            bars.append(Bar(label, a, colour=colour(tool)))
        if b is not None:
            bars.append(Bar(label if a is None else "", b, colour=colour(tool), hatched=True))
    if not bars:
        return None
    bar_panels(out / "memory.svg", "Peak RSS per process", "peak RSS, MiB", [("", bars)], preview,
               legend=[(small, False), (large, True)])
    return "memory.svg"


def sweep(docs: dict[str, dict], names: list[str], out_name: str, out: Path, preview: Path | None) -> str | None:
    """GB/s against the swept value, min–max bars (size / max, size / min);
    several sweeps of the same flag share the axes (send and copy chunk)."""
    series, xtics = [], None
    for n in names:
        doc = docs.get(n)
        if not doc:
            continue
        g = doc["images"][0]
        vals = list(g["tools"])
        xtics = xtics or vals
        pts, lo, hi = [], [], []
        for v in vals:
            s = g["tools"][v]
            if ran(s) and v in xtics:
                pts.append((xtics.index(v), s["gb_per_s_size"]))
                lo.append(g["size_bytes"] / s["max_s"] / 1e9)
                hi.append(g["size_bytes"] / s["min_s"] / 1e9)
        sw = doc.get("sweep", {})
        series.append(Series(f"diskferry {sw.get('command', '?')}", colour(
            "diskferry" if sw.get("command") == "send" else "diskferry-plain"), pts, lo, hi))
    if not series or xtics is None:
        return None
    flag = docs[names[0]].get("sweep", {}).get("flag", "?") if names[0] in docs else "?"
    line_plot(out / out_name, f"Throughput against {flag} (dense image, median, bars min–max)", flag,
              "GB/s (10^9 bytes/s)", series, preview, xtics=xtics)
    return out_name


def render(docs: dict[str, dict], out: Path, preview: Path | None = None) -> dict[str, list[str]]:
    """Every plot there is data for: {section: [svg names]}."""
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = {}

    def add(section: str, name: str | None) -> None:
        if name:
            made.setdefault(section, []).append(name)

    for name in TIME_PLOTS:
        if name in docs:
            add(name, times(name, docs[name], out, preview))
    if "local" in docs:
        add("local", rates("local", docs["local"], "read_bytes", out, preview))
    if "net" in docs:
        add("net", rates("net", docs["net"], "tx_bytes", out, preview))
        add("cpu", cpu(docs["net"], out, preview))
    add("memory", memory(docs, out, preview))
    add("sweep-streams", sweep(docs, ["sweep-streams"], "sweep-streams.svg", out, preview))
    add("sweep-chunk", sweep(docs, ["sweep-chunk", "sweep-copy-chunk"], "sweep-chunk.svg", out, preview))
    return made
