"""Drawing with gnuplot (Debian gnuplot-nox, `set terminal svg`): two
shapes of plot cover the report, bars in panels and lines.

    bar_panels(out, title, ylabel, panels)   # one panel per image/side
    line_plot(out, title, xlabel, ylabel, series)

The data travel inside the gnuplot script as datablocks, so a plot is one
gnuplot process and no temporary files. PNG previews (pngcairo) of the
same scripts are made with `preview=DIR`, for a human to look at."""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

FONT = "Sans,11"


@dataclass
class Bar:
    label: str
    value: float
    lo: float | None = None  # min–max bar; None: no bar
    hi: float | None = None
    colour: str = "#1f77b4"
    hatched: bool = False  # a second series beside a solid one (pattern fill)


@dataclass
class Series:
    name: str
    colour: str
    points: list[tuple[float, float]] = field(default_factory=list)
    lows: list[float] | None = None  # with highs: min–max bars at each point
    highs: list[float] | None = None
    dashed: bool = False


def _q(text: str) -> str:
    """A gnuplot double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rgb(hex_colour: str) -> int:
    return int(hex_colour.lstrip("#"), 16)


def _num(x: float | None) -> str:
    return "NaN" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


def _terminal(kind: str, width: int, height: int) -> str:
    if kind == "svg":
        return f"set terminal svg size {width},{height} dynamic enhanced font {_q(FONT)} background '#ffffff'"
    return f"set terminal pngcairo size {width},{height} enhanced font {_q(FONT)} background '#ffffff'"


def run(script: str, out: Path, width: int, height: int, preview: Path | None) -> None:
    """Render `script` (everything after the terminal) to the SVG `out`,
    and to preview/NAME.png when asked. A gnuplot error fails loudly."""
    jobs = [("svg", out)]
    if preview is not None:
        jobs.append(("png", preview / (out.stem + ".png")))
    for kind, path in jobs:
        text = f"{_terminal(kind, width, height)}\nset output {_q(str(path))}\n{script}\nunset output\n"
        res = subprocess.run(["gnuplot"], input=text, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            raise RuntimeError(f"gnuplot failed on {path.name}: {res.stderr.strip()}")


def bar_panels(out: Path, title: str, ylabel: str, panels: list[tuple[str, list[Bar]]],
               preview: Path | None = None, legend: list[tuple[str, bool]] | None = None,
               shared_y: bool = False) -> None:
    """Bars side by side in one panel per (panel title, bars), each panel
    with its own y range (a 16 GiB image's seconds would flatten a 2 GiB
    one's) unless `shared_y` (panels meant to be compared by eye). Min–max
    bars where given. `legend`: (text, hatched) entries explaining the
    fills; the tool names are the x labels."""
    panels = [(t, bars) for t, bars in panels if bars]
    if not panels:
        raise ValueError(f"{out.name}: nothing to plot")
    widest = max(len(bars) for _, bars in panels)
    width = max(700, min(1400, len(panels) * (120 + 70 * widest)))
    lines = [f"set multiplot layout 1,{len(panels)} title {_q(title)} font ',13'",
             "set style fill solid 0.85 border rgb '#333333'", "set boxwidth 0.7", "set grid ytics lc rgb '#dddddd'",
             "set yrange [0:*]", "set offsets 0,0,graph 0.12,0", "set xtics rotate by -35 nomirror font ',10'",
             "set ytics nomirror", "set border 3", "set lmargin 9", "set bmargin 8", "set rmargin 9"]
    if shared_y:
        top = max(max(b.hi if b.hi is not None else b.value for b in bars) for _, bars in panels)
        lines += [f"set yrange [0:{_num(top * 1.12)}]", "set offsets 0,0,0,0"]
    for i, (ptitle, bars) in enumerate(panels):
        lines.append(f"$P{i} << EOD")
        for j, b in enumerate(bars):
            lines.append(f"{j} {_q(b.label)} {_num(b.value)} {_rgb(b.colour)} {1 if b.hatched else 0}")
        lines.append("EOD")
        # min–max as plain vertical segments: a point style would mark the
        # median on every bar, even where no spread was measured
        lines.append(f"$E{i} << EOD")
        for j, b in enumerate(bars):
            if b.lo is not None and b.hi is not None:
                lines.append(f"{j} {_num(b.lo)} {_num(b.hi - b.lo)}")
        lines.append("EOD")
    for i, (ptitle, bars) in enumerate(panels):
        lines += [f"set title {_q(ptitle)}", f"set xrange [-0.6:{len(bars) - 0.4}]",
                  f"set ylabel {_q(ylabel)}" if i == 0 else "unset ylabel"]
        plots = [f"$P{i} using 1:($5==0?$3:NaN):(0.7):4:xtic(2) with boxes lc rgb variable notitle"]
        if any(b.hatched for b in bars):
            plots.append(f"$P{i} using 1:($5==1?$3:NaN):(0.7):4 with boxes fs pattern 2 lc rgb variable notitle")
        if any(b.lo is not None and b.hi is not None for b in bars):
            plots.append(f"$E{i} using 1:2:(0):3 with vectors heads size 0.08,90 lw 1.3 lc rgb '#222222' notitle")
        if legend and i == len(panels) - 1:
            lines.append("set key outside top right vertical font ',10'")
            for text, hatched in legend:
                fill = "fs pattern 2" if hatched else "fs solid 0.85"
                plots.append(f"keyentry with boxes {fill} lc rgb '#555555' title {_q(text)}")
        else:
            lines.append("unset key")
        lines.append("plot " + ", \\\n  ".join(plots))
    lines.append("unset multiplot")
    run("\n".join(lines), out, width, 460, preview)


def line_plot(out: Path, title: str, xlabel: str, ylabel: str, series: list[Series],
              preview: Path | None = None, xtics: list[str] | None = None, logx: bool = False) -> None:
    """Lines (with points when there are few) of each series, min–max bars
    where given, the legend outside the plot area so it hides nothing.
    `xtics`: labels for x = 0, 1, 2... (a sweep's values)."""
    series = [s for s in series if s.points]
    if not series:
        raise ValueError(f"{out.name}: nothing to plot")
    lines = [f"set title {_q(title)} font ',13'", f"set xlabel {_q(xlabel)}", f"set ylabel {_q(ylabel)}",
             "set grid lc rgb '#dddddd'", "set yrange [0:*]", "set border 3", "set xtics nomirror",
             "set ytics nomirror", "set key outside right top vertical font ',10'", "set offsets 0,0,graph 0.05,0"]
    if xtics:
        lines.append("set xtics (" + ", ".join(f"{_q(t)} {i}" for i, t in enumerate(xtics)) + ")")
        lines.append(f"set xrange [-0.3:{len(xtics) - 0.7}]")
    if logx:
        lines.append("set logscale x 2")
    plots = []
    for i, s in enumerate(series):
        lines.append(f"$S{i} << EOD")
        for k, (x, y) in enumerate(s.points):
            lo = s.lows[k] if s.lows else None
            hi = s.highs[k] if s.highs else None
            lines.append(f"{_num(x)} {_num(y)} {_num(lo)} {_num(hi)}")
        lines.append("EOD")
        dash = "dt 2" if s.dashed else "dt 1"
        style = "linespoints pt 7 ps 0.7" if len(s.points) <= 12 else "lines"
        plots.append(f"$S{i} using 1:2 with {style} lw 2 {dash} lc rgb '{s.colour}' title {_q(s.name)}")
        if s.lows and s.highs:
            plots.append(f"$S{i} using 1:3:(0):($4-$3) with vectors heads size 0.05,90 lc rgb '{s.colour}' notitle")
    lines.append("plot " + ", \\\n  ".join(plots))
    run("\n".join(lines), out, 900, 440, preview)
