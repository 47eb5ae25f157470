"""kill -9 of the broker at each step of an upgrade, then a new `visor run`.

tests/process/test_upgrade.py already covers two steps: during the stop delay (before the switch) and
after the switch before the new node answers. Here: with a release accepted but not ready, while the
fetcher downloads the release, and while the old node is being stopped (it ignores SIGTERM). Each time:
no worker runs on after the broker is gone, the runner stops its binary itself, `current` stays a
link to a folder with a run-config, never two copies of the node, and the new run completes the upgrade.
"""

from __future__ import annotations

import os

import psutil
import pytest

from tests.faults.conftest import ASSET, TAG, kill9, node_log_says_one_at_a_time, wait_nothing_left, wait_running
from tests.fakes.zips import release_zip_with_fake_vega
from tests.helpers import processes_of, wait_until
from visor.args import SNAPSHOT_FLAG

pytestmark = pytest.mark.timeout(60)


def assert_current_valid(home) -> None:
    target = home.root / home.current
    assert target.is_dir() and (target / "run-config.toml").is_file(), f"current -> {home.current}"


def started_in(home, folder: str) -> list[dict]:
    """The fake node's `started` lines from runs out of HOME/folder, once there is one."""
    want = str(home.root / folder)
    return wait_until(lambda: [e for e in home.node_events("started") if e["folder"] == want],
                      what=f"the node to start from {want}")


def partials(home) -> list[str]:
    return [name for name in os.listdir(home.root) if ".partial-" in name]


def test_killed_with_a_release_accepted_but_not_ready(home, daemon, events, census):
    home.stage(TAG, TAG)
    daemon.start()
    wait_running(home)
    home.announce(TAG, 120)
    events.wait_for("upgrade.accepted", tag=TAG)
    kill9(daemon.proc.pid)
    wait_nothing_left(home, timeout_s=5)             # workers leave; the runner stops the node itself
    assert home.node_events()[-1]["event"] == "stopped" and home.node_events()[-1]["signal"] == 15
    assert home.current == "genesis"
    assert_current_valid(home)
    daemon.start()
    wait_running(home)
    assert home.current == "genesis" and SNAPSHOT_FLAG not in home.wait_started(2)
    home.announce(TAG, 120, ready=True)
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)
    assert home.current == TAG and home.wait_started(3)[-2:] == [SNAPSHOT_FLAG, "120"]
    node_log_says_one_at_a_time(home)


def test_killed_while_the_old_node_is_being_stopped(home, daemon, events, census):
    """The old node ignores SIGTERM; the broker dies in its stop timeout. The new run starts at once,
    while the orphaned runner is still stopping that node: the old node must be gone before a new one."""
    home.stage("genesis", "v0.72.1", args=home.node_args("--ignore-sigterm"))
    home.stage(TAG, TAG)
    home.set_config(stopSignalTimeoutSeconds=2)
    daemon.start()
    old = wait_running(home)["binaries"]["vega"]["pid"]
    old_workers = [w["pid"] for w in daemon.status()["workers"].values()]
    home.announce(TAG, 120, ready=True)
    wait_until(lambda: home.node_events("sigterm-ignored"), what="the old node to ignore SIGTERM")
    kill9(daemon.proc.pid)
    assert home.current == "genesis"
    assert_current_valid(home)
    home.set_config(stopSignalTimeoutSeconds=1)        # the new run ends the old node before the orphaned
    daemon.start()                                     # runner does (2 s); it starts at once, node still up
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=25)
    assert home.current == TAG
    new = started_in(home, TAG)
    assert len(new) == 1 and new[0]["argv"][-2:] == [SNAPSHOT_FLAG, "120"]
    assert old in census.pids and old not in census.running()["node"]
    assert f"vega (pid {old}) from the previous run is still up: stopping it" in daemon.stderr
    assert not [pid for pid in old_workers if psutil.pid_exists(pid) and
                psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], "a worker of the killed broker runs on"
    assert census.most["node"] == 1


@pytest.fixture
def slow_release(server):
    """The release on the fake GitHub, its download throttled to take about 3 s."""
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.throttle_bytes_per_s = len(data) // 3
    return server


def kill_during_download(home, daemon, events) -> dict[int, str]:
    """Returns the workers as they were just before the kill: pid -> name."""
    daemon.start()
    wait_running(home)
    home.announce(TAG, 120, ready=True)
    events.wait_for("upgrade.ready", tag=TAG)
    wait_until(lambda: [e for e in events.of("fetch.progress", tag=TAG) if 0 < e["bytes"] < e["total"]],
               what="the download under way")
    workers = {w["pid"]: name for name, w in daemon.status()["workers"].items()}
    kill9(daemon.proc.pid)
    return workers


def test_killed_while_the_fetcher_downloads_no_worker_runs_on(home, slow_release, daemon, events, census):
    slow_release.throttle_bytes_per_s = slow_release.throttle_bytes_per_s * 3 // 10     # about 10 s
    workers = kill_during_download(home, daemon, events)
    # The runner stops the node at once (it ignores nothing); every worker watches the broker's pidfd.
    try:
        wait_until(lambda: not processes_of(home.root), what="every process of the home to end", timeout_s=2)
    except AssertionError:
        left = processes_of(home.root)
        for proc in left:                             # an orphan would outlive the test by seconds
            proc.kill()
        names = sorted(workers.get(p.pid, f"pid {p.pid}") for p in left)
        raise AssertionError(f"still running 2 s after the broker was killed: {names}") from None
    assert home.node_events()[-1]["event"] == "stopped"


def test_killed_while_the_fetcher_downloads_it_leaves_without_a_traceback(home, slow_release, daemon, events):
    kill_during_download(home, daemon, events)
    wait_nothing_left(home, timeout_s=2)
    assert "Traceback" not in daemon.stderr, daemon.stderr[daemon.stderr.find("Traceback") - 200:][:600]


def test_killed_while_the_fetcher_downloads_a_new_run_completes_the_upgrade(home, slow_release, daemon, events,
                                                                             census):
    workers = kill_during_download(home, daemon, events)
    assert home.current == "genesis"
    assert_current_valid(home)
    slow_release.throttle_bytes_per_s = None          # the new run's download is quick
    daemon.start()                                    # at once, as systemd or an operator would
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)
    assert home.current == TAG and not partials(home)
    assert not [pid for pid in workers if psutil.pid_exists(pid) and
                psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], "a worker of the killed broker runs on"
    new = started_in(home, TAG)
    assert len(new) == 1 and new[0]["argv"][-2:] == [SNAPSHOT_FLAG, "120"]
    node_log_says_one_at_a_time(home)
