"""kill -9 of a runner worker: its binary keeps running, the broker keeps track of it (it is the
binary's subreaper) and a new runner adopts it; a stop or an upgrade in progress still completes.

tests/process/test_lifecycle.py covers one kill and a later kill -9 of the node; here: repeated kills,
a kill while the binary is being stopped (by `visor run` stopping, and by an upgrade), and a runner
whose main thread is slow to notice that its adopted binary has ended."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

import pytest

from tests.faults.conftest import TAG, ask_status, kill9, wait_nothing_left, wait_running, worker_pid
from tests.helpers import wait_until
from visor.args import SNAPSHOT_FLAG

pytestmark = pytest.mark.timeout(60)


def runner_restarted(home, times: int, old_pid: int) -> dict:
    def check():
        s = ask_status(home)[0]
        w = s["workers"]["runner:vega"]
        return s if w["alive"] and w["restarts"] == times and w["pid"] != old_pid else None
    return wait_until(check, what=f"runner:vega restarted {times} times", timeout_s=10)


def test_repeated_runner_kills_never_restart_the_node_and_it_stays_supervised(home, daemon, events, census):
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    for n in range(1, 3):
        runner = worker_pid(home, "runner:vega")
        kill9(runner)
        status = runner_restarted(home, n, runner)
        assert status["binaries"]["vega"]["pid"] == node and status["visor"]["state"] == "running"
    assert len(home.node_events("started")) == 1 and not events.of("binary.exited")
    # still supervised: the node ends on its own (a clean exit 0 nobody asked for) -> restarted by policy
    os.kill(node, signal.SIGTERM)
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == 0     # the broker reaped it: exact code
    events.wait_for("binary.restart_scheduled", restarts=1)
    assert home.wait_started(2) and wait_running(home)["restarts"]["count"] == 1
    assert daemon.stop() == 0
    wait_nothing_left(home, timeout_s=2)


def test_runner_killed_while_visor_stops_the_node(home, daemon, events, census):
    home.stage("genesis", "v0.72.1", args=home.node_args("--ignore-sigterm"))
    home.set_config(stopSignalTimeoutSeconds=2)
    daemon.start()
    status = wait_running(home)
    node, runner = status["binaries"]["vega"]["pid"], status["workers"]["runner:vega"]["pid"]
    daemon.signal(signal.SIGTERM)
    wait_until(lambda: home.node_events("sigterm-ignored"), what="the node to ignore SIGTERM")
    kill9(runner)                                    # the runner that was to SIGKILL it is gone
    assert daemon.wait_exit(15) == 0
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == -9
    assert events.wait_for("visor.stopped") and not events.of("visor.failed")
    wait_nothing_left(home, timeout_s=2)


def test_runner_killed_while_an_upgrade_stops_the_old_node(home, daemon, events, census):
    home.stage("genesis", "v0.72.1", args=home.node_args("--ignore-sigterm"))
    home.stage(TAG, TAG)
    home.set_config(stopSignalTimeoutSeconds=1)
    daemon.start()
    status = wait_running(home)
    node, runner = status["binaries"]["vega"]["pid"], status["workers"]["runner:vega"]["pid"]
    home.announce(TAG, 120, ready=True)
    wait_until(lambda: home.node_events("sigterm-ignored"), what="the old node to ignore SIGTERM")
    kill9(runner)
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)
    assert events.of("binary.exited", pid=node)[0]["exitcode"] == -9
    assert home.current == TAG and home.wait_started(2)[-2:] == [SNAPSHOT_FLAG, "120"]
    assert wait_running(home)["workers"]["runner:vega"]["restarts"] == 1


# --- a runner whose main thread is late ---------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH, WALL = 0x4206, 0x4207, 17, 0x40000000


@contextlib.contextmanager
def main_thread_held(pid: int):
    """Stops only the main thread of `pid` (ptrace), as a busy machine may not schedule it for a
    while; its ZeroMQ I/O thread keeps running, so messages still arrive in its queue."""
    if _libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
        pytest.skip(f"cannot ptrace: {os.strerror(ctypes.get_errno())}")
    try:
        assert _libc.ptrace(PTRACE_INTERRUPT, pid, None, None) == 0, os.strerror(ctypes.get_errno())
        os.waitpid(pid, WALL)
        yield
    finally:
        _libc.ptrace(PTRACE_DETACH, pid, None, None)


def holds_pidfd_of(holder: int, target: int) -> bool:
    """Whether process `holder` has a pidfd of `target` open: how a runner watches the binary it adopted.
    (/proc/PID/fdinfo shows a `Pid:` line for a pidfd.)"""
    folder = f"/proc/{holder}/fdinfo"
    try:
        fds = os.listdir(folder)
    except OSError:
        return False
    for fd in fds:
        try:
            with open(f"{folder}/{fd}") as f:
                if f"\nPid:\t{target}\n" in "\n" + f.read():
                    return True
        except OSError:
            continue
    return False


def test_an_adopting_runner_late_to_see_its_binary_end_still_starts_the_next_one(home, daemon, events, census):
    home.set_config(maxNumberOfRestartConnectionRetries=100000)   # keep the broker from giving up meanwhile
    daemon.start()
    status = wait_running(home)
    node, runner = status["binaries"]["vega"]["pid"], status["workers"]["runner:vega"]["pid"]
    kill9(runner)
    new_runner = runner_restarted(home, 1, runner)["workers"]["runner:vega"]["pid"]
    wait_until(lambda: holds_pidfd_of(new_runner, node), what="the new runner to adopt the node")
    try:
        with main_thread_held(new_runner):
            kill9(node)                                  # the broker reaps it and restarts at once (delay 0)
            events.wait_for("binary.exited", pid=node)
            wait_until(lambda: ask_status(home)[0]["visor"]["state"] == "starting", what="StartBinary sent")
            time.sleep(0.2)    # no outside sign for "in the runner's queue"; delivery takes well under 1 ms
        home.wait_started(2, timeout_s=2)
        assert wait_running(home)["binaries"]["vega"]["pid"] != node
    finally:
        if len(home.node_events("started")) < 2:
            daemon.kill()                            # it used to hang here, and would not stop either


# --- a runner killed between its start and its report -------------------------------------------

def test_a_runner_killed_between_its_start_and_its_report_never_makes_a_second_node(home, daemon, events, census,
                                                                                  monkeypatch):
    """VISOR_FAULT (workers/runner.py) ends the first runner right after it started the node, before its
    report. The broker, the node's subreaper now, finds it among its children and a new runner adopts
    it; before the fix the new runner was sent the same start and a second node ran."""
    fired = home.root / "fault-fired"
    monkeypatch.setenv("VISOR_FAULT", f"runner-exit-after-start:{fired}")
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    assert [e["pid"] for e in home.node_events("started")] == [node]
    assert fired.exists() and "runner:vega died before reporting that it started vega" in daemon.stderr
    new_runner = wait_until(lambda: (w := ask_status(home)[0]["workers"]["runner:vega"])["alive"] and w["pid"],
                            what="a new runner")
    wait_until(lambda: holds_pidfd_of(new_runner, node), what="the new runner to adopt the node")
    kill9(node)                                      # still supervised, with its real exit code
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == -9
    assert home.wait_started(2) and wait_running(home)["restarts"]["count"] == 1
