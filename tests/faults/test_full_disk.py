"""A full disk: the home on a 2 MiB tmpfs (root only; skipped otherwise, with the reason).

A release bigger than the free space: fetch.failed naming the problem ("No space left on device"),
upgrade.blocked, nothing stopped, no partial folder left. And a disk that is already full when the
node crashes: Visor, which writes its state file in the home, must still restart the node."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.faults.conftest import ASSET, TAG, wait_running
from tests.fakes.zips import make_zip, release_zip_with_fake_vega
from tests.helpers import TestHome as Home, end_leftovers, wait_until
from visor.home import init_home

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def home():
    """Like the suite's `home`, but on a size-limited tmpfs; the fake node logs outside it."""
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a size-limited tmpfs, and mounting one needs root")
    base = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp"))
    mount = base / "m"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(base)
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        root = mount / "h"
        init_home(root)
        h = Home(root)
        h.log = base / "node.log"                     # the node's own log is not what fills up here
        h.stage("genesis", "v0.72.1")
        h.set_config(restartsDelaySeconds=0, stopSignalTimeoutSeconds=5, upgradeStatusIntervalMilliseconds=100)
        h.announce()
        yield h
        end_leftovers(root)
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def fill(folder: Path) -> Path:
    """Writes a file until the disk is full; returns it."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return filler


def partials(home) -> list[str]:
    return [name for name in os.listdir(home.root) if ".partial-" in name]


def test_a_release_bigger_than_the_free_space_blocks_the_upgrade_and_stops_nothing(home, server, daemon, events):
    big = make_zip({"vega": (release_zip_with_fake_vega(TAG), 0o755), "padding": os.urandom(3 << 20)})
    server.add_release(TAG, {ASSET: big})
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    home.announce(TAG, 120, ready=True)
    failed = events.wait_for("fetch.failed", tag=TAG, asset=ASSET, timeout_s=15)
    assert "No space left on device" in failed["error"]
    blocked = events.wait_for("upgrade.blocked", tag=TAG)
    assert "No space left on device" in blocked["reason"]
    status = daemon.status()
    assert status["visor"]["state"] == "blocked" and status["binaries"]["vega"]["pid"] == node
    assert not events.of("binary.exited") and home.current == "genesis"
    assert not os.path.lexists(home.root / TAG) and not partials(home)
    assert shutil.disk_usage(home.root).free > 1 << 20          # what the fetch wrote is gone again
    assert "Traceback" not in daemon.stderr


def test_a_node_crash_on_a_full_disk_is_still_restarted(home, daemon, events):
    home.set_config(maxNumberOfRestartConnectionRetries=100000)
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    filler = fill(home.root)
    try:
        os.kill(node, signal.SIGKILL)
        restarted = lambda: [e for e in events.of("binary.started") if e["pid"] != node]   # noqa: E731
        wait_until(lambda: restarted() or daemon.proc.poll() is not None, what="a restart, or the end of Visor")
        assert daemon.proc.poll() is None, f"visor exited {daemon.proc.returncode}: {daemon.stderr[-300:]}"
        assert events.of("binary.restart_scheduled", restarts=1)
        assert daemon.status()["binaries"]["vega"]["pid"] == restarted()[0]["pid"]
        assert not [n for n in os.listdir(home.root / ".visor") if n.endswith(".tmp")]   # no half-written file
    finally:
        filler.unlink()
