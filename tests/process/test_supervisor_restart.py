"""`visor restart` (re-exec in place, every worker replaced, the binaries untouched), `visor stop` with
and without a daemon, and `visor status` when only the binaries of a dead daemon still run."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil
import pytest

from tests.helpers import processes_of, run_cli, wait_until
from visor import protocol as p
from visor.control import ask
from visor.home import Home

pytestmark = pytest.mark.timeout(60)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def lifecycle(home) -> list[str]:
    return [e["event"] for e in home.node_events() if e["event"] in ("started", "stopped", "crashed", "sigterm-ignored")]


class StatusLoad:
    """Status requests in a loop from another thread, as dashboards and scrapers send them."""

    def __init__(self, home):
        self.home, self.answered, self.unanswered = Home(home.root), 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if ask(self.home, p.StatusRequest(), timeout_s=2.0) is None:
                self.unanswered += 1
            else:
                self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_restart_replaces_every_worker_keeps_the_main_pid_and_the_node(home, daemon, events):
    daemon.start()
    before = daemon.wait_running()
    node = before["binaries"]["vega"]["pid"]
    load = StatusLoad(home)
    try:
        wait_until(lambda: load.answered > 3, what="status calls answered")
        done = run_cli("restart", "--home", home.root)
        assert done.returncode == 0, done.stderr
        after = daemon.wait_running()
    finally:
        load.close()
    assert after["visor"]["pid"] == before["visor"]["pid"] == daemon.proc.pid
    assert after["visor"]["started_at"] != before["visor"]["started_at"]
    assert after["binaries"]["vega"]["pid"] == node and lifecycle(home) == ["started"]
    old_workers = {w["pid"] for w in before["workers"].values()}
    new_workers = {w["pid"] for w in after["workers"].values()}
    assert set(after["workers"]) == set(before["workers"]) and not old_workers & new_workers
    assert not [pid for pid in old_workers if alive(pid)], "a worker of the old code runs on"
    assert load.answered > 3 and load.unanswered == 0
    assert not events.of("binary.exited")         # and the subscriber hears the new code below
    # still supervised by the new code, with the real exit code of its child
    os.kill(node, signal.SIGKILL)
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == -9
    events.wait_for("binary.restart_scheduled", restarts=1)
    assert home.wait_started(2)
    assert daemon.stop() == 0
    assert not processes_of(home.root)


def test_restart_with_no_daemon_is_one_line(home):
    done = run_cli("restart", "--home", home.root)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no visor runs" in done.stderr


def test_restart_of_a_daemon_that_runs_but_does_not_answer_says_so(home, daemon):
    home.set_config(stopSignalTimeoutSeconds=1)       # how long a busy daemon may take to answer, plus 10 s
    daemon.start()
    daemon.wait_running()
    os.kill(daemon.proc.pid, signal.SIGSTOP)          # it holds the home's lock, and answers nothing
    try:
        done = run_cli("restart", "--home", home.root, timeout_s=40)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"visor: {home.root}/.visor/control.sock: the daemon of {home.root} runs but "
                                  "does not answer; "), done.stderr
    assert daemon.wait_running()["visor"]["pid"] == daemon.proc.pid      # untouched, once it runs again
    assert run_cli("stop", "--home", home.root).returncode == 0
    assert daemon.wait_exit(15) == 0


def test_stop_asks_the_daemon_and_waits_until_it_has_exited(home, daemon, events):
    daemon.start()
    daemon.wait_running()
    done = run_cli("stop", "--home", home.root)
    assert done.returncode == 0, done.stderr
    assert daemon.proc.poll() == 0 and not processes_of(home.root)
    assert lifecycle(home) == ["started", "stopped"] and events.wait_for("visor.stopped")


def test_with_no_daemon_status_names_what_runs_and_stop_ends_it(home, daemon):
    daemon.start()
    status = daemon.wait_running()
    node = status["binaries"]["vega"]["pid"]
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    wait_until(lambda: len(processes_of(home.root)) == 2, what="the watchers to leave")
    done = run_cli("status", "--home", home.root)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert f"its binaries do, unsupervised: vega (pid {node}, since " in done.stderr
    # as systemd's ExecStopPost after a crash: the restarted daemon is to adopt them
    done = run_cli("stop", "--home", home.root, "--unless-crashed", env={**os.environ, "SERVICE_RESULT": "signal"})
    assert done.returncode == 0 and alive(node)
    # ... and after a stop whose daemon had to be killed (hung): the node is stopped
    done = run_cli("stop", "--home", home.root, "--unless-crashed", env={**os.environ, "SERVICE_RESULT": "timeout"})
    assert done.returncode == 0, done.stderr
    assert not processes_of(home.root) and lifecycle(home) == ["started", "stopped"]
    done = run_cli("stop", "--home", home.root)           # nothing runs: still 0
    assert done.returncode == 0 and "nothing runs" in done.stdout
    assert "no visor answered" in run_cli("status", "--home", home.root).stderr


def test_restart_kills_a_runner_that_does_not_hand_over_and_adopts_its_node(home, daemon, events, monkeypatch):
    """A runner of older code does not know HandOver (VISOR_FAULT, visor/faults.py): it is killed after
    3 s; its node, the daemon's child by then, is adopted by the new code all the same."""
    monkeypatch.setenv("VISOR_FAULT", f"runner-ignores-handover:{home.root}/fault-fired")
    daemon.start()
    before = daemon.wait_running()
    node, runner = before["binaries"]["vega"]["pid"], before["workers"]["runner:vega"]["pid"]
    done = run_cli("restart", "--home", home.root)
    assert done.returncode == 0, done.stderr
    after = daemon.wait_running()
    assert after["binaries"]["vega"]["pid"] == node and after["workers"]["runner:vega"]["pid"] != runner
    assert f"worker (pid {runner}) still up" in daemon.stderr
    assert lifecycle(home) == ["started"] and not alive(runner)


def test_restart_after_a_crash_keeps_the_node_its_adopted_runner_still_holds(home, daemon, events):
    # regression: after a kill -9 and an adopting `visor run`, the runner is not the daemon's child, so
    # a binary it hands over goes to init, and the re-executed daemon stopped the node as unsupervised.
    # It keeps its pid (the node's parent) and executes the code now installed in place.
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    runner = daemon.wait_running()["workers"]["runner:vega"]["pid"]
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    daemon.start()
    wait_until(lambda: (s := daemon.status())["visor"]["state"] == "running" and s["binaries"]["vega"]["pid"] == node,
               what="the node adopted", timeout_s=10)
    done = run_cli("restart", "--home", home.root)
    assert done.returncode == 0, done.stderr
    after = daemon.wait_running()
    assert after["binaries"]["vega"]["pid"] == node and lifecycle(home) == ["started"]
    assert after["workers"]["runner:vega"]["pid"] == runner      # kept: it alone can reap the node,
    assert "workers.runner" in Path(f"/proc/{runner}/cmdline").read_bytes().decode()   # on the new code,
    assert "SigBlk:\t0000000000000000" in Path(f"/proc/{runner}/status").read_text()  # stop signals unblocked
    os.kill(node, signal.SIGKILL)                                  # still supervised, exit code kept
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == -9
    assert home.wait_started(2)
    assert daemon.stop() == 0


def test_a_node_handed_over_by_a_restart_stays_supervised_after_a_crash_of_visor(home, daemon, events):
    # regression: after `visor restart` the node is the daemon's child; once the daemon is killed -9 it is
    # init's, and its runner (which adopted it) said nothing when it ended: status said running for ever
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    assert run_cli("restart", "--home", home.root).returncode == 0
    daemon.wait_running()
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    daemon.start()
    wait_until(lambda: (s := daemon.status())["visor"]["state"] == "running" and s["binaries"]["vega"]["pid"] == node,
               what="the node adopted", timeout_s=10)
    os.kill(node, signal.SIGKILL)
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == -1       # init reaped it: code unknown
    events.wait_for("binary.restart_scheduled", restarts=1)
    assert home.wait_started(2) and daemon.stop() == 0


def test_a_restart_killed_after_the_hand_over_leaves_a_node_the_next_run_adopts_not_stops(
        home, daemon, events, monkeypatch):
    # regression: killed between the hand-over and its exec, the daemon left the node to init with no
    # runner, and the next run stopped it as "no runner": a healthy node stopped for a supervisor's crash
    monkeypatch.setenv("VISOR_FAULT", f"restart-dies-before-exec:{home.root}/fault-fired")
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    assert run_cli("restart", "--home", home.root).returncode == 1
    assert daemon.proc.wait(10) == 9
    daemon.start()
    wait_until(lambda: (s := daemon.status())["visor"]["state"] == "running" and s["binaries"]["vega"]["pid"] == node,
               what="the node adopted", timeout_s=10)
    assert lifecycle(home) == ["started"]
    os.kill(node, signal.SIGKILL)
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == -1       # init's now: code unknown
    assert home.wait_started(2) and daemon.stop() == 0


def test_a_sigterm_during_the_hand_over_of_a_restart_is_not_lost(home, daemon, events, monkeypatch):
    # regression: the old code took the signal and exec'd: the restarted daemon ran on (systemctl stop
    # during a reload was ignored). A runner ignoring HandOver holds the restart there for 3 s.
    monkeypatch.setenv("VISOR_FAULT", f"runner-ignores-handover:{home.root}/fault-fired")
    daemon.start()
    daemon.wait_running()
    restart = threading.Thread(target=run_cli, args=("restart", "--home", home.root), kwargs={"timeout_s": 30})
    restart.start()
    try:
        wait_until(lambda: "restarting in place" in daemon.stderr, what="the hand-over")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(30) == 0                      # the new code took it, and stopped in order
        assert lifecycle(home) == ["started", "stopped"]
    finally:
        restart.join(35)
