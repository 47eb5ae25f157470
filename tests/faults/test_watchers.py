"""kill -9 of the upgrade watcher, the config watcher and the fetcher: in steady state (again and
again), and in the middle of an upgrade. The node is never touched, each worker comes back (and
`status` counts it), and the work in hand is finished by the new one."""

from __future__ import annotations

import os

import pytest

from tests.faults.conftest import ASSET, TAG, ask_status, kill9, node_log_says_one_at_a_time, wait_running, worker_pid
from tests.fakes.zips import release_zip_with_fake_vega
from tests.helpers import wait_until
from visor.args import SNAPSHOT_FLAG

pytestmark = pytest.mark.timeout(60)
WATCHERS = ("upgrade-watcher", "config-watcher", "fetcher")
KILLS = 3


def restarted(home, name: str, times: int, old_pid: int) -> dict:
    def check():
        s = ask_status(home)[0]
        w = s["workers"][name]
        return s if w["alive"] and w["restarts"] == times and w["pid"] != old_pid else None
    return wait_until(check, what=f"{name} restarted {times} times", timeout_s=10)


def started_in(home, folder: str) -> list[dict]:
    want = str(home.root / folder)
    return wait_until(lambda: [e for e in home.node_events("started") if e["folder"] == want],
                      what=f"the node to start from {want}")


def test_repeated_kills_of_every_watcher_never_touch_the_node_and_polling_resumes(home, daemon, events, census):
    home.stage(TAG, TAG)
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    for n in range(1, KILLS + 1):                    # all three at once, then wait for all three
        pids = {name: worker_pid(home, name) for name in WATCHERS}
        for pid in pids.values():
            kill9(pid)
        for name, pid in pids.items():
            status = restarted(home, name, n, pid)
        assert status["binaries"]["vega"]["pid"] == node
    assert len(events.of("worker.exited", exitcode=-9)) == KILLS * len(WATCHERS)
    assert {w: s["restarts"] for w, s in daemon.status()["workers"].items()} == \
        {"upgrade-watcher": KILLS, "config-watcher": KILLS, "fetcher": KILLS, "runner:vega": 0}
    # the new watchers work: a config edit is applied, an upgrade announced now completes
    home.set_config(maxNumberOfRestarts=5)
    wait_until(lambda: ask_status(home)[0]["restarts"]["max"] == 5, what="the config edit applied")
    home.announce(TAG, 120, ready=True)
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)
    assert not [e for e in events.of("binary.exited") if e["pid"] != node]
    assert [e["pid"] for e in events.of("binary.exited")] == [node]     # stopped once, by the upgrade
    assert home.node_events("stopped")[0]["pid"] == node and home.node_events("stopped")[0]["signal"] == 15
    assert started_in(home, TAG)[0]["argv"][-2:] == [SNAPSHOT_FLAG, "120"]
    assert len(home.node_events("started")) == 2
    node_log_says_one_at_a_time(home)


def test_fetcher_killed_mid_download_the_upgrade_still_completes(home, server, daemon, events, census):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.throttle_bytes_per_s = len(data) // 3          # about 3 s: long enough to be caught in it
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    fetcher = worker_pid(home, "fetcher")
    home.announce(TAG, 120, ready=True)
    wait_until(lambda: [e for e in events.of("fetch.progress", tag=TAG) if 0 < e["bytes"] < e["total"]],
               what="the download under way")
    kill9(fetcher)
    server.throttle_bytes_per_s = None                    # the new fetcher's download is quick
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)
    restarted(home, "fetcher", 1, fetcher)
    assert home.current == TAG
    # the node was stopped once, by the upgrade, after the new fetcher's download: never by the kill
    exited = events.of("binary.exited")
    assert [e["pid"] for e in exited] == [node]
    assert exited[0]["seq"] > events.of("fetch.completed")[0]["seq"] > \
        events.wait_for("worker.exited", worker="fetcher", pid=fetcher)["seq"]
    assert not [name for name in os.listdir(home.root) if ".partial-" in name]
    assert len(events.of("fetch.started")) == 2 and len(events.of("fetch.completed")) == 1
    assert not events.of("upgrade.blocked")
    new = started_in(home, TAG)
    assert len(new) == 1 and new[0]["argv"][-2:] == [SNAPSHOT_FLAG, "120"]
    node_log_says_one_at_a_time(home)


def test_upgrade_watcher_killed_right_after_ready_the_upgrade_still_completes(home, daemon, events, census):
    home.stage(TAG, TAG)
    home.set_config(stopDelaySeconds=1)                   # the kill lands before anything is stopped
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    watcher = worker_pid(home, "upgrade-watcher")
    home.announce(TAG, 120, ready=True)
    events.wait_for("upgrade.ready", tag=TAG)
    kill9(watcher)
    events.wait_for("worker.exited", worker="upgrade-watcher", pid=watcher)
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)
    status = restarted(home, "upgrade-watcher", 1, watcher)
    assert home.current == TAG and status["current"]["folder"] == TAG
    assert len(events.of("upgrade.ready")) == 1 and len(events.of("upgrade.started")) == 1
    new = started_in(home, TAG)
    assert len(new) == 1 and new[0]["argv"][-2:] == [SNAPSHOT_FLAG, "120"]
    assert [e["pid"] for e in events.of("binary.exited")] == [node]
    node_log_says_one_at_a_time(home)
    # and the new watcher watches the new node: a later upgrade completes
    home.stage("v0.74.0", "v0.74.0")
    home.set_config(stopDelaySeconds=0)
    home.announce("v0.74.0", 200, ready=True)
    events.wait_for("upgrade.completed", tag="v0.74.0", timeout_s=20)
    assert home.current == "v0.74.0"
