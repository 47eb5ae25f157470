"""The measurements every contender goes through: launch, restart, output, idle footprint.

Each one sets a contender up in a fresh folder, runs it, and stops it; every wait is bounded in
count and in time. Times come from the child's own CLOCK_MONOTONIC marks (bench/child.py), never
from the bench's polling, except where a relay's last byte lands in the file after the child wrote it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from contenders import BENCH, Contender, Visor, kill_leftovers
from tests.fakes import install_fake_vega, write_upgrade_state
from tests.helpers import TestHome

CHILD = str(BENCH / "child.py")
SETTLE_MS = 1500                             # the writer waits this long: the daemon's own start-up is over
WARMUP = 1                                   # restarts not counted at the start of each run


def marks(log: Path) -> list[tuple[str, int, float]]:
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), float(parts[2])))
    return out


def wait_for(check, timeout_s: float, poll_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            return None
        time.sleep(poll_s)
    return result


def launch(c: Contender, folder: Path, py: str, linger_s: float = 0.0) -> float | None:
    """ms from just before the Popen of the daemon to the child's first line; then it runs linger_s."""
    log = folder / "child.log"
    c.setup(folder, [py, "-S", CHILD, "idle", log])
    t0 = c.launch()
    try:
        first = wait_for(lambda: [m for m in marks(log) if m[0] == "s"], timeout_s=20)
        time.sleep(linger_s)
    finally:
        c.stop()
    return (first[0][2] - t0) * 1000 if first else None


def restart(c: Contender, folder: Path, py: str, count: int, limit_s: float, life_ms: int) -> list[float]:
    """ms from a crashed child's last mark to its successor's first, for up to `count` restarts; each
    child lives a random 0..life_ms first (0: it crashes at once)."""
    log = folder / "child.log"
    c.setup(folder, [py, "-S", CHILD, "crash", log, life_ms])
    c.launch()
    try:
        if wait_for(lambda: marks(log), timeout_s=20):
            wait_for(lambda: sum(m[0] == "s" for m in marks(log)) > count + WARMUP,
                     timeout_s=limit_s, poll_s=0.05)
    finally:
        c.stop()
    seq = marks(log)
    gaps = [(b[2] - a[2]) * 1000 for a, b in zip(seq, seq[1:]) if a[0] == "e" and b[0] == "s"]
    return gaps[WARMUP:WARMUP + count]


def output(c: Contender, folder: Path, py: str, mib: int, passes: int,
           limit_s: float) -> tuple[list[float], str]:
    """MB/s of each pass, from the child's first write until the file holds every byte of the pass;
    and what the child's stdout is (the output file itself, or a pipe to its supervisor). Passes not
    done limit_s after the launch are not waited for (a slow relay gets fewer samples)."""
    log, out = folder / "child.log", folder / "out"
    c.setup(folder, [py, "-S", CHILD, "write", log, mib, SETTLE_MS, passes], stdout_to=out)
    total = mib << 20
    c.launch()
    last_short = [time.monotonic()] * (passes + 1)     # [k]: last poll that saw fewer than k passes' bytes
    size, stdout_is, deadline = 0, "?", time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            try:
                size = os.stat(out).st_size
            except FileNotFoundError:
                size = 0
            if size >= passes * total:
                break
            for k in range(size // total + 1, passes + 1):
                last_short[k] = now
            if stdout_is == "?":
                stdout_is = _stdout_of(log, out)
            time.sleep(0.002)
        done_passes = min(passes, size // total)
        if done_passes:                          # the file size can beat the child's own mark
            wait_for(lambda: any(m[0] == f"w{done_passes}" for m in marks(log)), timeout_s=5)
        seq = {m[0]: m[2] for m in marks(log)}
    finally:
        c.stop()
        out.unlink(missing_ok=True)
    rates = []
    for k in range(1, done_passes + 1):
        if f"b{k}" not in seq or f"w{k}" not in seq:
            break
        # Pass-through: the bytes are in the file when the child's last write returns (wK). Relayed: they
        # land after it, between the last poll that saw the file short and the first that saw it whole;
        # the earlier bound is taken, which favours the relaying peer by at most one poll (2 ms).
        done = max(seq[f"w{k}"], last_short[k])
        rates.append(total / (done - seq[f"b{k}"]) / 1e6)
    if not rates:
        print(f"    {c.name}: not one pass of {mib} MiB arrived within {limit_s:g}s", flush=True)
    return rates, stdout_is


def _stdout_of(log: Path, out: Path) -> str:
    """'the output file' when the child's fd 1 is that very file, else what it is (pipe:[...])."""
    started = [m for m in marks(log) if m[0] == "s"]
    if not started:
        return "?"
    try:
        target = os.readlink(f"/proc/{started[0][1]}/fd/1")
    except OSError:
        return "?"
    return "the output file itself" if target == str(out) else target.split("[")[0].rstrip(":") or target


def cpu_ms(pid: int) -> float:
    """CPU time of every thread of pid (ZeroMQ's I/O threads included), ms to the microsecond, from
    the scheduler's sum_exec_runtime; psutil's cpu_times count whole 10 ms clock ticks."""
    total = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/sched") as f:
                for line in f:
                    if line.startswith("se.sum_exec_runtime"):
                        total += float(line.split(":")[1])
                        break
        except FileNotFoundError:
            continue                         # a thread that has just ended
    return total


def _where(proc: psutil.Process, top: int = 4) -> list[tuple[str, float]]:
    """Private (USS) pages by mapping: the heap, anonymous arenas, and the libraries that were written to."""
    sums: dict[str, float] = {}
    for m in proc.memory_maps(grouped=True):
        path = m.path or "[anon]"
        label = path if path.startswith("[") else os.path.basename(path)
        if label.startswith("[anon:"):
            label = "[anon]"
        sums[label] = sums.get(label, 0.0) + (m.private_clean + m.private_dirty) / 2**20
    return sorted(sums.items(), key=lambda kv: -kv[1])[:top]


def idle(contenders: list[Contender], base: Path, py: str, window_s: float, settle_s: float = 3.0) -> dict:
    """All contenders at once, each running the fake node (Visor polls its admin socket at the default
    1 s): after settle_s, CPU of each own process over window_s (scaled to 30 s), then USS/PSS/RSS."""
    result: dict = {}
    try:
        for c in contenders:
            folder = base / f"idle-{c.name}"
            node = TestHome(folder)          # only its paths: admin socket, upgrade file, node log
            exe = install_fake_vega(base / f"bin-{c.name}", "v0.72.1")
            c.setup(folder, [exe, *node.node_args()])
            write_upgrade_state(node.upgrade_file)
            c.launch()
        for c in contenders:
            if not wait_for(lambda: TestHome(c.dir).node_events("serving"), timeout_s=20):
                raise RuntimeError(f"{c.name}: the fake node never served its admin socket")
        time.sleep(settle_s)
        procs = {c.name: {label: psutil.Process(pid) for label, pid in c.own_pids().items()} for c in contenders}
        time.sleep(0.5)                      # `visor status` was an answer to give; let it pass
        before = {(n, l): (p.cpu_times(), cpu_ms(p.pid)) for n, ps in procs.items() for l, p in ps.items()}
        t0 = time.monotonic()
        time.sleep(window_s)
        span = time.monotonic() - t0
        for name, ps in procs.items():
            rows, uss, pss, cpu, ticks = {}, 0.0, 0.0, 0.0, 0.0
            for label, p in ps.items():
                (a, a_ms), b = before[(name, label)], p.cpu_times()
                by_ticks = ((b.user - a.user) + (b.system - a.system)) * 1000 * 30 / span
                exact = (cpu_ms(p.pid) - a_ms) * 30 / span
                mem = p.memory_full_info()
                rows[label] = {"pid": p.pid, "uss": mem.uss / 2**20, "pss": mem.pss / 2**20,
                               "rss": mem.rss / 2**20, "cpu_ms_30s": exact, "cpu_ms_30s_ticks": by_ticks}
                uss, pss = uss + mem.uss / 2**20, pss + mem.pss / 2**20
                cpu, ticks = cpu + exact, ticks + by_ticks
            result[name] = {"procs": rows, "uss": uss, "pss": pss, "cpu_ms_30s": cpu, "cpu_ms_30s_ticks": ticks,
                            "window_s": span}
            if name == "visor":
                result[name]["where"] = {label: _where(p) for label, p in ps.items()}
    finally:
        for c in contenders:
            c.stop()
        kill_leftovers(base)
    return result
