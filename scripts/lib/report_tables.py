"""The per-scenario tables of docs/benchmarks.md: medians, min–max, GB/s,
CPU, the ratio to diskferry and what limited each figure, all read from
the scenario's results (scripts/lib/report_data.py)."""

from __future__ import annotations

from report_data import baseline, f2, group_size, is_reference, limited_by, ran, ratio


def _status(s: dict, runs: int | None) -> str:
    err = s.get("error") or ""
    if err:
        return "not run" if err.startswith("unavailable") else "FAILED"
    return f"{s.get('n', 0)}" + (f"/{runs}" if runs else "")


def _cpu(s: dict) -> str:
    """Sender CPU, and the receiver's after a slash where there is one."""
    snd, rcv = s.get("cpu_s_median"), s.get("receiver_cpu_s_median")
    return f2(snd) + (f" / {f2(rcv)}" if rcv is not None else "")


def _rss(s: dict) -> str:
    snd, rcv = s.get("peak_rss_mib"), s.get("receiver_peak_rss_mib")
    return f2(snd, 0) + (f" / {f2(rcv, 0)}" if rcv is not None else "")


def tools_table(doc: dict, extra: list[tuple[str, callable]] | None = None) -> list[str]:
    """One row per (group, tool): the table of local, net, sparse, link and
    the job scenarios. `extra`: (header, cell function of (group, summary))
    columns appended before "limited by"."""
    nproc = doc.get("machine", {}).get("nproc") or 0
    runs = doc.get("config", {}).get("runs")
    extra = extra or []
    head = ["image", "tool", "runs", "median s", "min–max s", "GB/s", "CPU s", "peak RSS MiB",
            "diskferry / tool"] + [h for h, _ in extra] + ["limited by"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 3) + "---|"]
    for g in doc.get("images", []):
        label = g.get("link") and f"{g['image']} @ {g['link']}" or f"{g['image']} ({group_size(g)})"
        for tool, s in g.get("tools", {}).items():
            ok = ran(s)
            cells = [label, f"**{tool}**" if is_reference(tool, g["tools"]) else tool, _status(s, runs),
                     f2(s.get("median_s")) if ok else "—",
                     f"{f2(s.get('min_s'))}–{f2(s.get('max_s'))}" if ok else "—",
                     f2(s.get("gb_per_s_size")) if ok else "—",
                     _cpu(s) if ok else "—", _rss(s) if ok else "—", f2(ratio(g["tools"], tool))]
            cells += [fn(g, s) if ok else "—" for _, fn in extra]
            cells.append(limited_by(s, nproc, g))
            rows.append("| " + " | ".join(cells) + " |")
            label = ""
    return rows


def wire_cell(g: dict, s: dict) -> str:
    w = s.get("wire_bytes_median")
    return "—" if w is None else f"{w / 2**20:.0f}"


def link_rate_cell(g: dict, s: dict) -> str:
    """The wire's share of the shaped link over the run."""
    w, bps = s.get("wire_bytes_median"), g.get("link_bits_per_s")
    if w is None or not bps or not s.get("median_s"):
        return "—"
    return f"{w * 8 / s['median_s'] / bps:.0%}"


def sparse_ratio_line(doc: dict) -> str:
    """sparse.json's cost of the holes: each tool's sparse time over its
    time on the packed (dense) copy of the same data, against the 1.2 bar."""
    parts = []
    for tool, r in (doc.get("sparse_over_packed") or {}).items():
        rm, pr = r.get("ratio_of_medians"), r.get("paired_ratio_median")
        mark = "" if rm is None else (" ✓" if rm <= 1.2 else " ✗")
        parts.append(f"{tool} **{f2(rm)}**{mark} (paired per round {f2(pr)})")
    return ("Sparse over packed (time on the sparse disk over time on a dense file of the same data; "
            "the bar is ≤ 1.2): " + "; ".join(parts) + ".") if parts else "No sparse_over_packed figures."


def sparse_table(docs: list[dict]) -> list[str]:
    """The sparse scenarios (sparse.json, sparse-fragmented.json) in one
    table: per disk and tool, the time on the sparse disk and on the dense
    file of the same data, their ratio against the 1.2 bar (ratio of the
    medians, paired per round in brackets), and the sparse run's CPU, peak
    RSS and diskferry / tool."""
    rows = ["| sparse disk | tool | sparse: median s (min–max) | packed: median s (min–max) "
            "| sparse / packed (paired) | CPU s | peak RSS MiB | diskferry / tool |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]

    def cell(s: dict) -> str:
        return f"{f2(s.get('median_s'))} ({f2(s.get('min_s'))}–{f2(s.get('max_s'))})" if ran(s) else "—"

    for doc in docs:
        groups = {g.get("image"): g for g in doc.get("images", [])}
        sp, pk = groups.get("sparse", {}), groups.get("packed", {})
        label = f"{group_size(sp)} in {sp.get('data_extents', '?')} extents"
        sop = doc.get("sparse_over_packed") or {}
        for tool, s in sp.get("tools", {}).items():
            r = sop.get(tool, {})
            rm = r.get("ratio_of_medians")
            mark = "" if rm is None else (" ✓" if rm <= 1.2 else " ✗")
            rows.append("| " + " | ".join([
                label, f"**{tool}**" if is_reference(tool, sp["tools"]) else tool, cell(s),
                cell(pk.get("tools", {}).get(tool, {})),
                f"**{f2(rm)}**{mark} ({f2(r.get('paired_ratio_median'))})",
                _cpu(s) if ran(s) else "—", _rss(s) if ran(s) else "—", f2(ratio(sp["tools"], tool))]) + " |")
            label = ""
    return rows


def incremental_table(doc: dict) -> list[str]:
    """net-incremental.json: one row per pass, wire bytes and the ratios to
    the full send and to rsync."""
    g = (doc.get("images") or [{}])[0]
    t = g.get("tools", {})
    full = t.get("full", {}).get("median_s") if ran(t.get("full", {})) else None
    rsync = t.get("rsync", {}).get("median_s") if ran(t.get("rsync", {})) else None
    rows = ["| pass | runs | median s | min–max s | wire MiB | changed MiB | pass / full | pass / rsync | CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in t.items():
        ok, m = ran(s), s.get("median_s")
        reading = name in ("full", "read-source", "read-target")
        rows.append("| " + " | ".join([
            f"**{name}**" if name in ("delta", "incremental-bitmap", "incremental-changed") else name,
            _status(s, doc.get("config", {}).get("runs")),
            f2(m) if ok else "—", f"{f2(s.get('min_s'))}–{f2(s.get('max_s'))}" if ok else "—",
            wire_cell(g, s), f2((s.get("changed_bytes_median") or 0) / 2**20, 1) if s.get("changed_bytes_median")
            else "—",
            f2(m / full) if ok and full and not reading else "—",
            f2(m / rsync) if ok and rsync and name != "rsync" and not name.startswith("read") else "—",
            f2(s.get("cpu_s_median")) if ok else "—"]) + " |")
    return rows


def sweep_table(docs: list[dict]) -> list[str]:
    """Sweeps of one flag (send and copy chunk size share a table): one
    column per value, rows GB/s (of the median time) and sender CPU per
    command; the plot shows the min–max."""
    first = docs[0]
    vals = list(first["images"][0]["tools"])
    rows = [f"| `{first.get('sweep', {}).get('flag', '?')}` | " + " | ".join(vals) + " |",
            "|---|" + "---:|" * len(vals)]
    for doc in docs:
        t = doc["images"][0]["tools"]
        cmd = doc.get("sweep", {}).get("command", "?")
        for head, key in (("GB/s (median)", "gb_per_s_size"), ("CPU s", "cpu_s_median")):
            cells = [f2(t[v].get(key)) if v in t and ran(t[v]) else "FAILED" if v in t else "—" for v in vals]
            rows.append(f"| {cmd}: {head} | " + " | ".join(cells) + " |")
    return rows


def best_sweep_value(doc: dict) -> tuple[str, float] | None:
    """The sweep value with the highest GB/s and that rate."""
    g = (doc.get("images") or [{}])[0]
    best = [(v, s["gb_per_s_size"]) for v, s in g.get("tools", {}).items() if ran(s)]
    return max(best, key=lambda x: x[1]) if best else None


def ratio_summary(doc: dict, group: str | None = None) -> dict[str, float]:
    """{peer: diskferry / peer} of one group (the first when None)."""
    for g in doc.get("images", []):
        if group is None or g.get("image") == group:
            return {t: r for t in g.get("tools", {}) if (r := ratio(g["tools"], t)) is not None}
    return {}


def diskferry_summary(doc: dict, group: str) -> dict:
    for g in doc.get("images", []):
        if g.get("image") == group:
            b = baseline(g.get("tools", {}))
            return g["tools"].get(b, {}) if b else {}
    return {}
