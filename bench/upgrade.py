"""Visor's upgrade with a prepared folder: detection latency and downtime, several upgrades in one run.

The fake node (tests/fakes/vega.py) runs from genesis; each release folder v0.73.0, v0.74.0 ... is
staged ahead (prepared folder, auto-install off). For each, the bench waits a random part of the
status interval (so the announcement falls at any phase of the watcher's poll), sets ReadyToUpgrade,
and follows the event stream. Downtime is read twice: `downtime_ms` of upgrade.completed (the
broker's clock: last old binary reported gone -> first new binary reported started), and the fake
node's own log (t_mono of the old node's "stopped" -> the new node's "started").
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

from contenders import ENV, kill_leftovers
from measure import wait_for
from tests.helpers import Events, TestHome, stop_process

CONFIG = {"restartsDelaySeconds": 0, "autoInstall.enabled": False}


def configure(folder: Path, count: int, interval_ms: int) -> tuple[TestHome, list[str], str]:
    from visor.home import init_home
    init_home(folder / "h")
    home = TestHome(folder / "h")
    home.stage("genesis", "v0.72.1")
    tags = [f"v0.{73 + i}.0" for i in range(count)]
    for tag in tags:
        home.stage(tag, tag)                 # prepared ahead: the fetcher only verifies it
    keys = {**CONFIG, "upgradeStatusIntervalMilliseconds": interval_ms}
    home.set_config(**keys)
    home.announce()
    text = "config.toml: visor-init defaults, with\n" + "\n".join(f"  {k} = {v!r}" for k, v in keys.items())
    text += "\n" + (home.root / "genesis" / "run-config.toml").read_text()
    return home, tags, text


def _node_gap(home: TestHome, tag: str, timeout_s: float = 5.0) -> float | None:
    """ms between the last old node's "stopped" and the first new node's "started" (fake node's clock;
    the new node logs "started" once its interpreter is up, some ms after Visor saw it start)."""
    def started():
        return [e for e in home.node_events() if e["event"] == "started" and Path(e["folder"]).name == tag]
    new = wait_for(started, timeout_s)
    log = home.node_events()
    if not new:
        return None
    stops = [e for e in log if e["event"] == "stopped" and e["t_mono"] <= new[0]["t_mono"]]
    return (new[0]["t_mono"] - stops[-1]["t_mono"]) * 1000 if stops else None


def run(folder: Path, py: str, visor_root: Path, count: int, interval_ms: int, seed: int = 7) -> dict:
    home, tags, config = configure(folder, count, interval_ms)
    result: dict = {"runs": [], "config": config, "interval_ms": interval_ms}
    if not (visor_root / "workers" / "fetcher.py").exists():
        result["note"] = "workers/fetcher.py is not in this checkout yet: nothing verifies the folder, " \
                         "so no upgrade can start (re-run when it lands)"
    events = Events(f"ipc://{home.root}/.visor/events.sock")
    err = open(folder / "visor.err", "wb")
    proc = subprocess.Popen([py, str(visor_root / "bin" / "visor"), "run", "--home", str(home.root)],
                            stdout=err, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True, env=ENV)
    rng = random.Random(seed)
    try:
        events.wait_for("binary.started", timeout_s=20)
        time.sleep(interval_ms / 1000 * 1.5)     # the watcher has heard "nothing to do" at least once
        for i, tag in enumerate(tags):
            time.sleep(rng.uniform(0, interval_ms / 1000))
            home.announce(tag, height=100 * (i + 1), ready=True)
            t_set = time.time()                      # the rename that made it visible has happened
            row: dict = {"tag": tag}
            try:
                ready = events.wait_for("upgrade.ready", tag=tag, timeout_s=interval_ms / 1000 + 10)
                row["detect_ready_ms"] = (ready["ts"] - t_set) * 1000
                started = events.wait_for("upgrade.started", tag=tag, timeout_s=10)
                row["detect_started_ms"] = (started["ts"] - t_set) * 1000
                done = events.wait_for("upgrade.completed", tag=tag, timeout_s=30)
            except AssertionError as why:
                row["error"] = str(why).splitlines()[0][:200]
                blocked = events.of("upgrade.blocked", tag=tag)
                if blocked:
                    row["error"] += f" (upgrade.blocked: {blocked[-1].get('reason')})"
                result["runs"].append(row)
                print(f"    upgrade {tag}: {row['error']}", flush=True)
                break
            row["downtime_ms"] = done["downtime_ms"]
            row["total_ms"] = (done["ts"] - t_set) * 1000
            row["node_gap_ms"] = _node_gap(home, tag)
            result["runs"].append(row)
            print(f"    upgrade {tag}: detected in {row['detect_started_ms']:.0f} ms, downtime "
                  f"{row['downtime_ms']:.1f} ms (node's clock {row['node_gap_ms'] or float('nan'):.1f} ms)",
                  flush=True)
    except AssertionError as why:
        result["note"] = f"{result.get('note', '')} {str(why).splitlines()[0][:200]}".strip()
    finally:
        stop_process(proc)
        events.close()
        err.close()
        kill_leftovers(folder)
    return result
