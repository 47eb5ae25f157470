#!/usr/bin/env python3
"""Visor only: node unsupervised -> supervised again. kill -9 of `visor run`, then a new `visor run` at
once (as systemd's Restart= would, without its RestartSec), until `status` says `running` with the
adopted node: the same pid, never restarted. Repeated `count` times on one node.

    python3 bench/adopt.py [--count N]          (from a checkout whose ./run-tests has built .venv)

Two figures per round: launch -> running (the new process: Python start-up, adoption, first status
answer) and kill -> running (the whole time the node had no supervisor). Status is asked straight on
the control socket every few ms, so the figures are the daemon's, not the CLI's start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":                      # run from the checkout: visor and tests.* importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import TestHome, stop_process   # noqa: E402
from visor import protocol as p                    # noqa: E402
from visor.control import ask                      # noqa: E402
from visor.home import Home, init_home             # noqa: E402

CONFIG = {"restartsDelaySeconds": 0, "autoInstall.enabled": False}


def _running_with(home: Home, pid: int | None, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = ask(home, p.StatusRequest(), timeout_s=0.5)
        if reply is not None and reply.status["visor"]["state"] == "running":
            vega = reply.status["binaries"].get("vega")
            if vega and (pid is None or vega["pid"] == pid):
                return reply.status
        time.sleep(0.002)
    return None


def run(folder: Path, py: str, visor_root: Path, count: int) -> dict:
    init_home(folder / "h")
    test_home = TestHome(folder / "h")
    test_home.stage("genesis", "v0.72.1")
    test_home.set_config(**CONFIG)
    test_home.announce()
    home = Home(test_home.root)
    command = [py, str(visor_root / "bin" / "visor"), "run", "--home", str(home.root)]
    err = open(folder / "visor.err", "wb")
    result: dict = {"launch_to_running_ms": [], "kill_to_running_ms": [], "node_starts": 0}

    def launch() -> subprocess.Popen:
        return subprocess.Popen(command, stdout=err, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)

    proc = launch()
    try:
        status = _running_with(home, None, 20)
        if status is None:
            result["note"] = "the first `visor run` never reached running"
            return result
        node = status["binaries"]["vega"]["pid"]
        time.sleep(1.5)                              # its watchers are up: a steady state to kill
        for _ in range(count):
            t_kill = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            t_launch = time.monotonic()
            proc = launch()
            if _running_with(home, node, 20) is None:
                result["note"] = f"no `running` with the adopted node (pid {node}) within 20 s"
                break
            t_up = time.monotonic()
            result["launch_to_running_ms"].append((t_up - t_launch) * 1000)
            result["kill_to_running_ms"].append((t_up - t_kill) * 1000)
            time.sleep(1.0)                          # its watchers start; the next kill finds a steady state
    finally:
        stop_process(proc)
        err.close()
        result["node_starts"] = len(test_home.node_events("started"))
    return result


def summary(result: dict) -> str:
    lines = [f"{'node unsupervised -> supervised again (visor only)':52} {'n':>4} {'median':>9} {'max':>9}"]
    for title, key in (("launch of the new `visor run` -> running (ms)", "launch_to_running_ms"),
                       ("kill -9 of `visor run` -> running (ms)", "kill_to_running_ms")):
        xs = sorted(result.get(key, []))
        if xs:
            lines.append(f"{title:52} {len(xs):>4} {xs[len(xs) // 2]:>9.1f} {xs[-1]:>9.1f}")
    lines.append(f"node starts over the whole run: {result.get('node_starts')} (1: never restarted, same pid)")
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)


def main() -> int:
    import argparse
    import shutil
    import tempfile
    parser = argparse.ArgumentParser(prog="bench/adopt.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20)
    opts = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="vba", dir="/tmp"))
    try:
        print(summary(run(folder, sys.executable, Path(__file__).resolve().parent.parent, opts.count)))
    finally:
        for line in subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout.split():
            os.kill(int(line), signal.SIGKILL)       # the runner and node the last run left
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
