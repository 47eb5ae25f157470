"""Statistics and the printed report: the machine, the table of medians and p90, the targets."""

from __future__ import annotations

import os
import platform
import sys

ORDER = ("direct", "visor", "supervisord", "circus")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def machine() -> dict:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": sys.version.split()[0], "load_1m_at_start": round(os.getloadavg()[0], 2)}


# metric key -> (title, unit, higher is better, tail percentile)
METRICS = {
    "restart_ms": ("restart, crash at once", "ms", False),
    "restart_random_ms": ("restart, crash at a random time", "ms", False),
    "first_exec_ms": ("launch -> first child exec", "ms", False),
    "output_mbps": ("output pass-through, 512 MiB", "MB/s", True),
    "idle_uss_mib": ("idle USS, own processes", "MiB", False),
    "idle_pss_mib": ("idle PSS, own processes", "MiB", False),
    "idle_cpu_ms_30s": ("idle CPU per 30 s", "ms", False),
    "idle_cpu_ticks_30s": ("idle CPU per 30 s, psutil ticks", "ms", False),
}


def _fmt(x: float) -> str:
    if x != x:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def table(samples: dict[str, dict[str, list[float]]], child_stdout: dict[str, str]) -> str:
    """samples[metric][contender] -> values. p90 is the worse tail: p10 where higher is better."""
    lines = [f"{'metric':34} {'contender':12} {'n':>4} {'median':>9} {'p90':>9} {'x direct':>9}",
             "-" * 81]
    for key, (title, unit, higher) in METRICS.items():
        per = samples.get(key, {})
        base = median(per.get("direct", []))
        label = f"{title} ({unit})"
        for name in ORDER:
            values = per.get(name, [])
            if not values:
                continue
            m, tail = median(values), percentile(values, 10 if higher else 90)
            ratio = m / base if base and base == base and base > 0 else float("nan")
            lines.append(f"{label:34} {name:12} {len(values):>4} {_fmt(m):>9} {_fmt(tail):>9} "
                         f"{_fmt(ratio) if ratio == ratio else '-':>9}")
            label = ""
    if child_stdout:
        lines.append("the child's stdout in the output test: " +
                     "; ".join(f"{n}: {child_stdout[n]}" for n in ORDER if n in child_stdout))
    return "\n".join(lines)


def upgrade_table(up: dict) -> str:
    lines = [f"{'upgrade (visor only)':48} {'n':>4} {'median':>9} {'p90':>9} {'max':>9}", "-" * 83]
    rows = [("detection: ready set -> upgrade.started (ms)", "detect_started_ms"),
            ("detection: ready set -> upgrade.ready (ms)", "detect_ready_ms"),
            ("downtime_ms of upgrade.completed (ms)", "downtime_ms"),
            ("downtime by the fake node: stopped -> started", "node_gap_ms"),
            ("ready set -> upgrade.completed (ms)", "total_ms")]
    for title, key in rows:
        xs = [r[key] for r in up.get("runs", []) if r.get(key) is not None]
        if xs:
            lines.append(f"{title:48} {len(xs):>4} {_fmt(median(xs)):>9} {_fmt(percentile(xs, 90)):>9} "
                         f"{_fmt(max(xs)):>9}")
    if up.get("note"):
        lines.append(f"note: {up['note']}")
    lines.append(f"Go visor, on paper (fixed 2 s poll; SIGTERM then a 100 ms stop-polling tick; the release is\n"
                 f"downloaded only at upgrade time, after the old binaries stopped): detection uniform 0-2000 ms\n"
                 f"(median ~1000); downtime >= 100 ms + `vega version` of the new binary + the download when\n"
                 f"auto-install fetches it (seconds to minutes for a ~100 MB release).")
    return "\n".join(lines)


def targets(samples: dict, up: dict, interval_ms: int) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met); met None when not measured."""
    def med(key, name):
        return median(samples.get(key, {}).get(name, []))

    out = []
    for key, how in (("restart_ms", "crash at once"), ("restart_random_ms", "crash at a random time")):
        d, v, s, c = (med(key, n) for n in ORDER)
        ok = v <= 1.5 * d and all(v < peer for peer in (s, c) if peer == peer)    # peers left out: not compared
        out.append((f"1. restart median <= 1.5x direct and below both peers ({how})",
                    f"visor {_fmt(v)} ms = {_fmt(v / d)}x direct ({_fmt(d)}); supervisord {_fmt(s)}, "
                    f"circus {_fmt(c)}", ok if v == v else None))
    runs = up.get("runs", [])
    down = [r["downtime_ms"] for r in runs if r.get("downtime_ms") is not None]
    det = [r["detect_started_ms"] for r in runs if r.get("detect_started_ms") is not None]
    out.append(("2a. upgrade downtime median < 50 ms", f"{_fmt(median(down))} ms (n={len(down)})",
                median(down) < 50 if down else None))
    out.append((f"2b. detection <= interval + 50 ms ({interval_ms + 50} ms), every upgrade",
                f"max {_fmt(max(det))} ms, median {_fmt(median(det))} ms" if det else "not measured",
                max(det) <= interval_ms + 50 if det else None))
    uss, cpu = med("idle_uss_mib", "visor"), med("idle_cpu_ms_30s", "visor")
    out.append(("3a. idle USS total <= 40 MiB", f"{_fmt(uss)} MiB", uss <= 40 if uss == uss else None))
    out.append(("3b. idle CPU <= 60 ms per 30 s", f"{_fmt(cpu)} ms", cpu <= 60 if cpu == cpu else None))
    od, ov = med("output_mbps", "direct"), med("output_mbps", "visor")
    out.append(("4. output >= 0.95x direct", f"visor {_fmt(ov)} MB/s = {_fmt(ov / od)}x direct ({_fmt(od)})",
                ov >= 0.95 * od if ov == ov else None))
    fe = med("first_exec_ms", "visor")
    out.append(("5. launch -> first exec < 150 ms", f"{_fmt(fe)} ms", fe < 150 if fe == fe else None))
    return out


def targets_text(rows) -> str:
    word = {True: "MET", False: "MISSED", None: "NOT MEASURED"}
    return "\n".join(f"{word[met]:13} {target}: {measured}" for target, measured, met in rows)


def footprint_text(idle: dict) -> str:
    """Per process USS/PSS/CPU of every contender, and where Visor's USS goes."""
    lines = [f"{'contender':12} {'process':18} {'pid':>7} {'USS MiB':>8} {'PSS MiB':>8} {'RSS MiB':>8} "
             f"{'CPU ms/30s':>10} {'(psutil)':>9}"]
    for name in ORDER:
        for label, p in idle.get(name, {}).get("procs", {}).items():
            lines.append(f"{name:12} {label:18} {p['pid']:>7} {p['uss']:>8.2f} {p['pss']:>8.2f} {p['rss']:>8.2f} "
                         f"{p['cpu_ms_30s']:>10.1f} {p['cpu_ms_30s_ticks']:>9.0f}")
    where = idle.get("visor", {}).get("where", {})
    if where:
        lines.append("\nwhere Visor's USS goes (private pages by mapping, MiB):")
        for label, parts in where.items():
            lines.append(f"  {label:18} " + ", ".join(f"{k} {v:.2f}" for k, v in parts))
    return "\n".join(lines)
