"""stopper: a pid is signalled only while it names the process that started at the recorded time, and
the one SIGTERM-then-SIGKILL escalation. Also the runner's use of it: AdoptBinary refuses a reused pid."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from visor import protocol as p, stopper
from workers import runner

pytestmark = pytest.mark.timeout(20)

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); time.sleep(60)"


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ok"
    yield proc
    proc.kill()
    proc.wait()


def test_create_time_matches_psutil(child):
    import psutil
    assert stopper.same_start(stopper.create_time(child.pid), psutil.Process(child.pid).create_time())


def test_a_pid_with_another_start_time_is_not_pinned(child):
    assert stopper.pin(child.pid, stopper.create_time(child.pid) - 1.0) is None
    assert stopper.pin(child.pid, None) is None
    pinned = stopper.pin(child.pid, stopper.create_time(child.pid))
    assert pinned is not None and not pinned.ended()
    pinned.close()


def test_end_kills_what_ignores_sigterm_after_the_timeout_and_reaps_our_child(child):
    proc = stopper.pin(child.pid, stopper.create_time(child.pid))
    proc.popen = child
    assert stopper.end([proc], 0.2) == {child.pid: -signal.SIGKILL}


def test_adopt_binary_refuses_a_pid_that_started_at_another_time(child):
    msg = p.AdoptBinary(pid=child.pid, path="x", args=[], stop_timeout_s=1.0,
                        create_time=stopper.create_time(child.pid) + 5.0)
    held, report = runner.adopt("vega", msg)
    assert held is None and report == p.BinaryExited(name="vega", pid=child.pid, exitcode=runner.UNKNOWN_EXIT)
    held, report = runner.adopt("vega", p.AdoptBinary(pid=child.pid, path="x", args=[], stop_timeout_s=1.0,
                                                      create_time=stopper.create_time(child.pid)))
    assert held is not None and held.pid == child.pid and report is None
    held.proc.close()


def test_a_group_leader_gets_one_sigterm_not_two(child, monkeypatch):
    # regression: the signal went to the leader by pidfd and again to its group; a second SIGTERM is
    # "quit now, skip the clean shutdown" to many nodes (seen as two `stopped` lines of the fake node)
    sent = []
    monkeypatch.setattr(stopper.signal, "pidfd_send_signal", lambda fd, sig: sig and sent.append(("pidfd", sig)))
    monkeypatch.setattr(stopper.os, "killpg", lambda pgid, sig: sent.append(("group", sig)))
    pinned = stopper.pin(child.pid, stopper.create_time(child.pid))
    pinned.group = True
    pinned.signal(signal.SIGTERM)
    assert sent == [("group", signal.SIGTERM)]
    pinned.close()
