"""Fixtures: a temp home with the fake node, the daemon, its event stream; nothing may be left running."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.release_server import ReleaseServer  # noqa: E402
from tests.helpers import Daemon, Events, TestHome, end_leftovers, processes_of, wait_until  # noqa: E402
from visor.home import init_home  # noqa: E402


@pytest.fixture
def home():
    # short /tmp paths: ipc:// socket paths must stay under ~100 bytes
    root = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp")) / "h"
    init_home(root)
    h = TestHome(root)
    h.stage("genesis", "v0.72.1")
    h.set_config(restartsDelaySeconds=0, stopSignalTimeoutSeconds=5, upgradeStatusIntervalMilliseconds=100,
                 **{"autoInstall.enabled": False})
    h.announce()
    yield h
    try:
        end_leftovers(root)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


@pytest.fixture
def server(home):
    """The fake GitHub release server, with auto-install pointed at it."""
    with ReleaseServer() as s:
        home.set_config(**{"autoInstall.enabled": True, "autoInstall.apiUrl": s.url})
        yield s


@pytest.fixture
def events(home):
    ev = Events(f"ipc://{home.root}/.visor/events.sock")
    yield ev
    ev.close()


@pytest.fixture
def daemon(home):
    d = Daemon(home)
    yield d
    if d.proc and d.proc.poll() is None:
        d.signal()
        try:
            d.wait_exit(15)
        except Exception:
            d.kill()
    # workers leave when the broker does; give them a moment before the leftover check
    try:
        wait_until(lambda: not [p for p in processes_of(home.root) if "visor" in " ".join(p.info["cmdline"])],
                   what="visor's processes to end", timeout_s=5)
    except AssertionError:
        pass


# The model test (tests/unit/test_model.py): a fixed, derandomised budget in ./run-tests;
# `./run-tests tests/unit/test_model.py --hypothesis-profile=deep` walks much further, at random.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("default", max_examples=150, stateful_step_count=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=20000, stateful_step_count=80, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")
