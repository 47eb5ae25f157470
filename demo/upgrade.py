"""The live upgrade demo: a simulated core node reaches an upgrade height while Visor runs it.

Sets up a fresh home in /tmp with the fake core node as genesis, serves release v0.73.0 from a local
fake GitHub (with a checksums file), starts `visor run`, and plays the chain: the validators accept
the release at block 100 for block 120, Visor prefetches it, the chain reaches 120, Visor upgrades,
running the operator's hooks: an announcement before the stop, a backup of the node's state while it
is down (etc/hooks/backup). Every event is printed as it happens. Then Visor restarts itself in place
(`visor restart`) while the node keeps running, and the recorded history tells the story again
(`visor events --since`). The demo ends by itself with a summary and cleans up.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fakes import read_log  # noqa: E402
from tests.fakes.release_server import ReleaseServer  # noqa: E402
from tests.fakes.zips import release_zip_with_fake_vega  # noqa: E402
from tests.helpers import Events, TestHome, run_cli, wait_until  # noqa: E402
from visor.control import render_event, render_status  # noqa: E402
from visor.home import init_home  # noqa: E402

OLD, NEW, ACCEPT_AT, UPGRADE_AT = "v0.72.1", "v0.73.0", 100, 120
BLOCK_S = 0.15                   # the simulated chain's block time


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def setup(root: Path, server: ReleaseServer) -> TestHome:
    init_home(root)
    home = TestHome(root)
    home.stage("genesis", OLD)
    asset = release_zip_with_fake_vega(NEW)
    sums = f"{hashlib.sha256(asset).hexdigest()}  vega-linux-amd64.zip\n".encode()
    server.add_release(NEW, {"vega-linux-amd64.zip": asset, "SHA256SUMS": sums})
    home.set_config(upgradeStatusIntervalMilliseconds=200, restartsDelaySeconds=1, stopSignalTimeoutSeconds=5,
                    **{"autoInstall.enabled": True, "autoInstall.apiUrl": server.url,
                       "autoInstall.asset.checksumsName": "SHA256SUMS"})
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "announce").write_text('#!/bin/sh\necho "hook: upgrading to $VISOR_UPGRADE_TAG at block '
                                    '$VISOR_UPGRADE_HEIGHT"\n')
    (hooks / "announce").chmod(0o755)
    (root / "node-state").mkdir()
    (root / "node-state" / "snapshot.db").write_bytes(b"\0" * 4096)
    home.set_config(**{"upgradeHooks.beforeStop.path": "hooks/announce",
                       "upgradeHooks.afterStop.path": str(REPO / "etc" / "hooks" / "backup"),
                       "upgradeHooks.afterStop.args": ["--source", str(root / "node-state"),
                                                       "--dest-root", str(root / "backups")]})
    home.announce()
    return home


def show_events(events: Events, shown: int) -> int:
    for event in events.received[shown:]:
        if event["type"] != "fetch.progress":
            print("   event  " + render_event(event), flush=True)
    return len(events.received)


def play_chain(home: TestHome, events: Events) -> float:
    """Blocks tick by; returns the monotonic time the node first said it is ready to upgrade."""
    shown, ready_at = 0, 0.0
    for height in range(ACCEPT_AT - 5, UPGRADE_AT + 1):
        if height == ACCEPT_AT:
            say(f"block {height}: validators accept release {NEW}, to upgrade at block {UPGRADE_AT}")
            home.announce(NEW, UPGRADE_AT, ready=False)
        if height == UPGRADE_AT:
            say(f"block {height}: the core node stops at the upgrade height and reports ReadyToUpgrade")
            home.announce(NEW, UPGRADE_AT, ready=True)
            ready_at = time.monotonic()
        time.sleep(BLOCK_S)
        shown = show_events(events, shown)
    events.wait_for("upgrade.completed", timeout_s=30, tag=NEW)
    show_events(events, shown)
    return ready_at


def summary(home: TestHome, events: Events, ready_at_wall: float) -> None:
    done = events.of("upgrade.completed")[0]
    started = events.of("upgrade.started")[0]
    fetched = events.of("fetch.completed")
    ready = events.of("upgrade.ready")[0]
    log = wait_until(lambda: (log := read_log(home.log)) and log[-1]["event"] != "stopped" and log,
                     what="the new node's log")
    say("summary")
    print(f"   release {NEW} prefetched and verified before the upgrade height: "
          f"{'yes, sha256 ' + fetched[0]['sha256'][:16] + '…' if fetched else 'no'}")
    if fetched:
        print(f"   prefetch finished {ready['ts'] - fetched[0]['ts']:.2f} s before the node was ready")
    print(f"   ReadyToUpgrade → upgrade.started: {(started['ts'] - ready_at_wall) * 1000:.0f} ms "
          f"(status interval 200 ms)")
    print(f"   upgrade downtime (last old binary gone → first new binary started, the afterStop backup "
          f"included): {done['downtime_ms']:.1f} ms")
    argv = [e for e in log if e["event"] == "started"][-1]["argv"]
    print(f"   new node started with: ... {' '.join(argv[-2:])}")
    print(f"   `current` now points at: {home.current}")
    hooks = [f"{e['hook']} {e['duration_ms']:.0f} ms" for e in events.of("hook.completed")]
    print(f"   hooks: {', '.join(hooks)}; backup: {', '.join(p.name for p in (home.root / 'backups').iterdir())}")


def restart_in_place(root: Path) -> None:
    before = json.loads(run_cli("status", "--home", root, "--json").stdout)
    say("visor restart: Visor replaces its own processes; the node keeps running")
    print("   " + run_cli("restart", "--home", root).stdout.strip())
    after = json.loads(run_cli("status", "--home", root, "--json").stdout)
    print(f"   visor pid {before['visor']['pid']} -> {after['visor']['pid']}, node pid "
          f"{before['binaries']['vega']['pid']} -> {after['binaries']['vega']['pid']}, runner pid "
          f"{before['workers']['runner:vega']['pid']} -> {after['workers']['runner:vega']['pid']}")


def history(root: Path) -> None:
    say("the morning after: visor events --since 10m --no-follow (upgrade and hook events)")
    out = run_cli("events", "--home", root, "--since", "10m", "--no-follow").stdout.splitlines()
    for line in out:
        if " upgrade." in line or " hook." in line:
            print("   " + line)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="visor-demo-", dir="/tmp"))
    root = tmp / "home"
    daemon = None
    with ReleaseServer() as server:
        home = setup(root, server)
        say(f"home {root}: genesis runs the fake core node {OLD}; release {NEW} waits on {server.url}")
        events = Events(f"ipc://{root}/.visor/events.sock")
        try:
            daemon = subprocess.Popen([sys.executable, str(REPO / "bin" / "visor"), "run", "--home", str(root)],
                                      stdout=subprocess.DEVNULL, stderr=open(tmp / "visor.log", "wb"))
            say("visor run started; waiting for the node")
            wait_until(lambda: run_cli("status", "--home", root).returncode == 0, what="visor", timeout_s=15)
            ready_mono = play_chain(home, events)
            ready_wall = time.time() - (time.monotonic() - ready_mono)
            say("visor status")
            print(render_status(json.loads(run_cli("status", "--home", root, "--json").stdout)))
            summary(home, events, ready_wall)
            restart_in_place(root)
            history(root)
            say("stopping visor (SIGTERM)")
            daemon.send_signal(signal.SIGTERM)
            print(f"   visor exited with code {daemon.wait(30)}; its own log is in {tmp / 'visor.log'}")
            return 0
        finally:
            if daemon and daemon.poll() is None:
                daemon.kill()
            events.close()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
