"""kill -9 of the broker, in steady state, during adoption and at each step of an upgrade, then a new
`visor run`: the runners outlive the broker and keep their binaries, the next run adopts them.

Each time: the node keeps its pid (its log shows one start and no signal), never two copies of it at
any sample (census), `current` stays a link to a folder with a run-config, no watcher runs on after
its broker, and the node is supervised again: a later crash is restarted by policy with its real code.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.faults.conftest import (ASSET, TAG, ask_status, kill9, node_log_says_one_at_a_time, wait_nothing_left,
                                   wait_running)
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


def lifecycle(home) -> list[str]:
    """The fake node's starts, stops and signals, in order (not its admin API chatter)."""
    return [e["event"] for e in home.node_events() if e["event"] in ("started", "stopped", "crashed", "sigterm-ignored")]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watchers_gone(workers: dict[str, int]) -> None:
    wait_until(lambda: not [pid for name, pid in workers.items() if not name.startswith("runner:") and alive(pid)],
               what="the killed broker's watchers to leave", timeout_s=5)


def kill_broker(daemon, home) -> dict[str, int]:
    """kill -9 of `visor run`; returns its workers as they were (name -> pid) once its watchers are gone."""
    workers = {name: w["pid"] for name, w in ask_status(home)[0]["workers"].items()}
    kill9(daemon.proc.pid)
    daemon.proc.wait(5)
    watchers_gone(workers)
    return workers


def test_steady_state_kill_then_run_adopts_the_same_node_and_supervises_it(home, daemon, events, census):
    daemon.start()
    first = wait_running(home)
    node, runner = first["binaries"]["vega"]["pid"], first["workers"]["runner:vega"]["pid"]
    kill_broker(daemon, home)
    assert alive(node) and alive(runner), "the runner and its node must outlive the broker"
    began = time.monotonic()
    daemon.start()
    status = wait_running(home)
    adopted_s = time.monotonic() - began
    assert status["binaries"]["vega"]["pid"] == node and status["workers"]["runner:vega"]["pid"] == runner
    assert status["binaries"]["vega"]["started_at"] == first["binaries"]["vega"]["started_at"]
    assert lifecycle(home) == ["started"], "the node was signalled or restarted"
    assert not events.of("binary.started", pid=node) or len(events.of("binary.started")) == 1
    assert adopted_s < 5, f"adoption took {adopted_s:.2f}s"
    # supervised again: a crash is restarted by policy, with its real exit code
    kill9(node)
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == -9
    events.wait_for("binary.restart_scheduled", restarts=1)
    assert home.wait_started(2) and wait_running(home)["restarts"]["count"] == 1
    assert daemon.stop() == 0
    wait_nothing_left(home, timeout_s=3)


def test_the_restart_count_is_carried_over(home, daemon, events, census):
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    kill9(node)
    events.wait_for("binary.restart_scheduled", restarts=1)
    node = wait_running(home)["binaries"]["vega"]["pid"]
    kill_broker(daemon, home)
    daemon.start()
    status = wait_running(home)
    assert status["binaries"]["vega"]["pid"] == node and status["restarts"]["count"] == 1


def test_a_binary_that_ends_while_no_broker_is_up_counts_as_a_failure(home, daemon, events, census):
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    kill_broker(daemon, home)
    os.kill(node, signal.SIGKILL)                     # its runner, still its parent, keeps the exit code
    wait_until(lambda: not alive(node), what="the node to end")
    daemon.start()
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == -9
    events.wait_for("binary.restart_scheduled", restarts=1)
    assert home.wait_started(2)
    assert wait_running(home)["restarts"]["count"] == 1


def test_a_binary_whose_runner_also_died_is_adopted_by_a_new_runner_not_stopped(home, daemon, events, census):
    """The data node's runner is killed while no broker is up: its node now belongs to init. The next run
    adopts both nodes as they are (a new runner for the data node, through a pidfd: never a healthy node
    stopped); a later end of the data node is reported (code unknown, -1) and the policy applies."""
    home.stage("genesis", "v0.72.1", data_node=["datanode", "start", "--log", str(home.root / "dn.log")])
    daemon.start()
    status = wait_running(home)
    vega, dn = status["binaries"]["vega"]["pid"], status["binaries"]["data_node"]["pid"]
    workers = kill_broker(daemon, home)
    kill9(workers["runner:data_node"])
    daemon.start()
    adopted = wait_running(home)
    assert (adopted["binaries"]["vega"]["pid"], adopted["binaries"]["data_node"]["pid"]) == (vega, dn)
    assert adopted["restarts"]["count"] == 0 and not events.of("binary.exited")
    kill9(dn)
    assert events.wait_for("binary.exited", name="data_node", pid=dn)["exitcode"] == -1
    events.wait_for("binary.restart_scheduled", restarts=1)
    restarted = wait_running(home)
    assert set(restarted["binaries"]) == {"vega", "data_node"} and census.most["datanode"] == 1


def test_killed_during_adoption_the_next_run_still_adopts(home, daemon, events, census):
    """The second broker dies while it waits for the runner (held stopped, so the wait lasts)."""
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    runner = kill_broker(daemon, home)["runner:vega"]
    os.kill(runner, signal.SIGSTOP)
    try:
        daemon.start()
        wait_until(lambda: f"visor.started pid={daemon.proc.pid}" in daemon.stderr, what="the second broker's start")
        kill9(daemon.proc.pid)
        daemon.proc.wait(5)
    finally:
        os.kill(runner, signal.SIGCONT)
    daemon.start()
    status = wait_running(home)
    assert status["binaries"]["vega"]["pid"] == node and status["workers"]["runner:vega"]["pid"] == runner
    assert lifecycle(home) == ["started"]


def test_a_runner_that_does_not_come_back_is_ended_with_its_node_before_a_new_one_starts(home, daemon, events,
                                                                                           census):
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    runner = kill_broker(daemon, home)["runner:vega"]
    os.kill(runner, signal.SIGSTOP)                   # it cannot say hello: the bound passes
    daemon.start()
    wait_until(lambda: not alive(runner) and not alive(node), what="the silent runner and its node ended",
               timeout_s=15)
    status = wait_running(home)
    assert status["binaries"]["vega"]["pid"] != node
    assert lifecycle(home)[:3] == ["started", "stopped", "started"]
    assert "runner:vega (pid %d) of the previous run did not come back" % runner in daemon.stderr
    node_log_says_one_at_a_time(home)


# --- at each step of an upgrade ------------------------------------------------------------------

def test_killed_with_a_release_accepted_but_not_ready(home, daemon, events, census):
    home.stage(TAG, TAG)
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    home.announce(TAG, 120)
    events.wait_for("upgrade.accepted", tag=TAG)
    kill_broker(daemon, home)
    assert alive(node) and home.current == "genesis"
    assert_current_valid(home)
    daemon.start()
    assert wait_running(home)["binaries"]["vega"]["pid"] == node
    home.announce(TAG, 120, ready=True)
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)
    assert home.current == TAG and home.wait_started(2)[-2:] == [SNAPSHOT_FLAG, "120"]
    node_log_says_one_at_a_time(home)


def test_killed_while_the_old_node_is_being_stopped(home, daemon, events, census):
    """The old node ignores SIGTERM; the broker dies in its stop timeout. The runner, broker-less, still
    SIGKILLs it at the deadline; the new run adopts, sees it end, and the upgrade completes: one copy."""
    home.stage("genesis", "v0.72.1", args=home.node_args("--ignore-sigterm"))
    home.stage(TAG, TAG)
    home.set_config(stopSignalTimeoutSeconds=2)
    daemon.start()
    old = wait_running(home)["binaries"]["vega"]["pid"]
    home.announce(TAG, 120, ready=True)
    wait_until(lambda: home.node_events("sigterm-ignored"), what="the old node to ignore SIGTERM")
    kill_broker(daemon, home)
    assert home.current == "genesis"
    assert_current_valid(home)
    daemon.start()
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=30)
    assert home.current == TAG and not alive(old)
    new = started_in(home, TAG)
    assert len(new) == 1 and new[0]["argv"][-2:] == [SNAPSHOT_FLAG, "120"]
    assert census.most["node"] == 1


def test_killed_after_the_switch_before_the_new_node_answers(home, daemon, events, census):
    home.stage(TAG, TAG, args=home.node_args("--serve-after", "2"))     # the new node is slow to serve
    daemon.start()
    wait_running(home)
    home.announce(TAG, 120, ready=True)
    new = started_in(home, TAG)[0]["pid"]
    kill_broker(daemon, home)
    assert home.current == TAG and alive(new)
    daemon.start()
    assert wait_running(home, timeout_s=15)["binaries"]["vega"]["pid"] == new
    assert len(home.node_events("started")) == 2
    node_log_says_one_at_a_time(home)


@pytest.fixture
def slow_release(server):
    """The release on the fake GitHub, its download throttled to take about 3 s."""
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.throttle_bytes_per_s = len(data) // 3
    return server


def test_killed_while_the_fetcher_downloads_a_new_run_completes_the_upgrade(home, slow_release, daemon, events,
                                                                             census):
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    home.announce(TAG, 120, ready=True)
    events.wait_for("upgrade.ready", tag=TAG)
    wait_until(lambda: [e for e in events.of("fetch.progress", tag=TAG) if 0 < e["bytes"] < e["total"]],
               what="the download under way")
    workers = kill_broker(daemon, home)               # the fetcher leaves with its broker, mid-download
    assert not alive(workers["fetcher"]) and alive(node)
    assert home.current == "genesis"
    assert_current_valid(home)
    slow_release.throttle_bytes_per_s = None          # the new run's download is quick
    daemon.start()
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)
    assert home.current == TAG and not partials(home)
    new = started_in(home, TAG)
    assert len(new) == 1 and new[0]["argv"][-2:] == [SNAPSHOT_FLAG, "120"]
    assert "Traceback" not in daemon.stderr, daemon.stderr[daemon.stderr.find("Traceback") - 200:][:600]
    node_log_says_one_at_a_time(home)


def test_nothing_but_the_runner_and_its_node_outlive_the_broker(home, daemon, census):
    daemon.start()
    status = wait_running(home)
    keep = {status["binaries"]["vega"]["pid"], status["workers"]["runner:vega"]["pid"]}
    kill_broker(daemon, home)
    left = {p.pid for p in processes_of(home.root)}
    for pid in keep:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not [pid for pid in keep if alive(pid)], what="the runner and its node to be gone")
    assert left == keep, f"running after the broker's kill: {left - keep} besides the runner and its node"


def test_a_binary_of_current_that_nothing_runs_is_a_failed_start_after_adoption(home, daemon, events, census):
    """Adopted in part (here the run-config gained a data node while no visor ran): what is missing is
    started with the rest by the restart policy, rather than never."""
    daemon.start()
    vega = wait_running(home)["binaries"]["vega"]["pid"]
    kill_broker(daemon, home)
    home.stage("genesis", "v0.72.1", data_node=["datanode", "start"])
    daemon.start()
    events.wait_for("binary.restart_scheduled", restarts=1)
    assert events.wait_for("binary.exited", pid=vega)["exitcode"] == 0
    status = wait_running(home)
    assert set(status["binaries"]) == {"vega", "data_node"} and "data_node not running when Visor started" in \
        status["reason"]
