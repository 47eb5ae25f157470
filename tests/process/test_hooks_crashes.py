"""Upgrade hooks when things around them go wrong (issue 13): the node crashing while a hook runs, the
broker killed in the middle of one, Visor stopped during one. Hooks as in test_hooks.py (hookkit.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.helpers import wait_until
from tests.process.hookkit import HEIGHT, TAG, calls, gone, no_hook_left, set_hooks, start, write_hook  # noqa: F401
from workers.hooks import SHUTDOWN_GRACE_S


def kill_broker_during(home, daemon, events, hook: str, body: str, timeout_s: float = 5.0) -> int:
    """Starts an upgrade whose `hook` runs `body` (which touches $VISOR_HOME/again, then hangs), kills
    `visor run` -9 while it runs, and waits for the orphaned hook to be ended. Returns the old node's pid."""
    set_hooks(home, **{hook: {"path": write_hook(home, hook, body)}})
    old = start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    pid = events.wait_for("hook.started", hook=hook)["pid"]
    wait_until(lambda: (home.root / "again").exists(), what="the hook to run")
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    wait_until(lambda: gone(pid), what="the orphaned hook to be ended by its worker", timeout_s=timeout_s)
    return old


@pytest.mark.timeout(60)
def test_a_hook_left_running_by_an_abandoned_upgrade_does_not_hold_the_next_one(home, daemon, events):
    # the new node crashes while its afterStart hook still runs: that upgrade is over (a restart follows),
    # and the next upgrade's beforeStop must run, not be refused because the stale hook still runs
    set_hooks(home, beforeStop={"path": write_hook(home, "record")},
              afterStart={"path": write_hook(home, "slow", "sleep 30"), "timeoutSeconds": 50})
    home.stage("v0.74.0", "v0.74.0")
    start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    stale = events.wait_for("hook.started", hook="afterStart", timeout_s=20)
    os.kill(daemon.status()["binaries"]["vega"]["pid"], signal.SIGKILL)
    events.wait_for("binary.restart_scheduled")
    daemon.wait_running()
    home.announce("v0.74.0", 200, ready=True)
    events.wait_for("upgrade.completed", timeout_s=20, tag="v0.74.0")
    assert [c["tag"] for c in calls(home, "beforeStop")] == [TAG, "v0.74.0"]
    failed = events.wait_for("hook.failed", hook="afterStart")            # ended, and said so
    assert (failed["tag"], failed["error"]) == (TAG, "stopped: superseded by beforeStop") and gone(stale["pid"])


@pytest.mark.timeout(60)
def test_a_broker_killed_during_after_stop_runs_it_again_at_the_next_start_with_the_node_still_down(
        home, daemon, events):
    # the first run hangs (and ignores SIGTERM); a run that finds the marker passes
    body = '[ -e "$VISOR_HOME/again" ] && exit 0\ntrap "" TERM\ntouch "$VISOR_HOME/again"\nsleep 1000\n'
    old = kill_broker_during(home, daemon, events, "afterStop", body, timeout_s=10)
    assert home.current == "genesis"
    restarted_at = time.time()
    daemon.start()
    completed = events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    assert [c["hook"] for c in calls(home)] == ["afterStop", "afterStop"] and home.current == TAG
    # the node was down from the old node's stop, through both runs: not unknown (null), not the second's alone
    stopped = [e for e in home.node_events() if e["event"] == "stopped" and e["pid"] == old][0]
    assert completed["downtime_ms"] is not None
    assert completed["downtime_ms"] >= (restarted_at - stopped["t"]) * 1000
    home.wait_started(2)
    lives = [(e["event"], e["pid"]) for e in home.node_events() if e["event"] in ("started", "stopped")]
    assert lives[:2] == [("started", old), ("stopped", old)] and len(lives) == 3      # never the old node again


@pytest.mark.timeout(60)
def test_visor_stops_cleanly_while_a_hook_runs(home, daemon, events):
    stubborn = 'trap "" TERM\ntouch "$VISOR_HOME/trapped"\nsleep 1000 & wait'
    set_hooks(home, beforeStop={"path": write_hook(home, "stubborn", stubborn)})
    start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    hook = events.wait_for("hook.started", hook="beforeStop")["pid"]
    wait_until(lambda: (home.root / "trapped").exists(), what="the hook to ignore SIGTERM")
    began = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - began >= SHUTDOWN_GRACE_S - 0.1     # SIGTERM ignored: SIGKILL after the grace
    assert gone(hook) and home.current == "genesis"
    assert "stopped" in [e["event"] for e in home.node_events()]


@pytest.mark.timeout(60)
def test_a_broker_killed_during_before_stop_begins_the_upgrade_again_with_the_hook(home, daemon, events):
    body = '[ -e "$VISOR_HOME/again" ] && exit 0\ntouch "$VISOR_HOME/again"\nsleep 1000\n'
    old = kill_broker_during(home, daemon, events, "beforeStop", body)
    daemon.start()
    events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    assert [(c["hook"], c["current"]) for c in calls(home)] == [("beforeStop", "genesis")] * 2
    assert home.current == TAG
    # nothing was switched or stopped: the next run adopted the old node (its runner kept it) and the hook
    # ran again beside it, before its one stop
    starts = wait_until(lambda: (e := home.node_events("started"))[1:] and e, what="the new node's start")
    assert [e["folder"] for e in starts] == [str(home.root / "genesis"), str(home.root / TAG)]
    assert starts[0]["pid"] == old
    second = calls(home)[1]["node_lines"]
    assert [e["event"] for e in home.node_events()[:second] if e["event"] in ("started", "stopped")] == \
        ["started"]


@pytest.mark.timeout(60)
def test_after_start_after_a_broker_killed_past_the_switch_still_knows_the_old_folder(home, daemon, events):
    set_hooks(home, afterStart={"path": write_hook(home, "record")})
    home.stage(TAG, TAG, args=home.node_args("--serve-after", "2"))     # the new node: slow to answer
    daemon.start()
    daemon.wait_running()
    home.announce(TAG, HEIGHT, ready=True)
    wait_until(lambda: home.current == TAG and len(home.node_events("started")) == 2, what="the switch")
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    daemon.start()
    events.wait_for("hook.completed", hook="afterStart", timeout_s=20)
    [call] = calls(home)
    assert (call["from"], call["to"]) == (f"{home.root}/genesis", f"{home.root}/{TAG}")
