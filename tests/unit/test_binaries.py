"""visor.binaries.find_orphan: the node a runner started and died before reporting is found."""

import subprocess
import sys

import psutil
import pytest

from visor.binaries import find_orphan

ARGS = ["-c", "import time; time.sleep(30)"]


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, *ARGS], stdin=subprocess.DEVNULL)
    yield proc
    proc.kill()
    proc.wait()


def test_a_child_running_the_binary_is_found(child):
    assert find_orphan(sys.executable, ARGS, set()).pid == child.pid


def test_a_known_pid_is_not_an_orphan(child):
    assert find_orphan(sys.executable, ARGS, {child.pid}) is None


def test_a_child_caught_in_the_middle_of_its_exec_is_waited_for(child, monkeypatch):
    """Right after Popen returns, a loaded machine can show the child with no command line yet: the
    kernel has replaced its memory but not laid out its arguments. It once cost a second node."""
    real, reads = psutil.Process.cmdline, []

    def cmdline(proc):
        if proc.pid != child.pid:
            return real(proc)
        reads.append(proc.pid)
        return [] if len(reads) == 1 else real(proc)
    monkeypatch.setattr(psutil.Process, "cmdline", cmdline)
    assert find_orphan(sys.executable, ARGS, set()).pid == child.pid and len(reads) == 2
