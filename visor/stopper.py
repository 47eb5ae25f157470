"""Processes named by pid and start time, pinned by pidfds, and the one SIGTERM-then-SIGKILL escalation.

A pid alone can name another process once the first has been reaped, so nothing here signals a bare
pid: a process is first pinned with a pidfd (which keeps naming that one process for ever) and its
start time compared with the one recorded when it was started. The runner, the broker (adoption,
stop watchdog) and `visor stop` all end processes through `end`. It decides nothing: what to end and
when is the caller's.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger("visor")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
KILL_WAIT_S = 5.0                # after SIGKILL: only a process stuck in the kernel takes longer
_boot_time: float | None = None


def _boot() -> float:
    global _boot_time
    if _boot_time is None:
        with open("/proc/stat", "rb") as f:
            _boot_time = float(next(line for line in f if line.startswith(b"btime ")).split()[1])
    return _boot_time


def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat after the name: [state, ppid, ...] (proc(5) fields 3 on); None if there is no such
    process. Without psutil, which costs its import where it is not needed otherwise."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()      # the name, in parentheses, may hold spaces


def create_time(pid: int) -> float | None:
    """When `pid` started, in Unix seconds (psutil's create_time); None if there is no such process.
    A zombie keeps its start time until it is reaped."""
    fields = stat_fields(pid)
    return None if fields is None else _boot() + int(fields[19]) / CLOCK_TICKS


def same_start(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 0.5 / CLOCK_TICKS


@dataclass
class Proc:
    """One process pinned by a pidfd. group: it leads its own process group (a node binary), so a
    signal goes to the whole group, as a terminal's would. popen: when it is our child through Popen,
    it is reaped there (so Popen keeps its exit code)."""
    pid: int
    pidfd: int
    group: bool = False
    popen: subprocess.Popen | None = None

    def signal(self, sig: int) -> None:
        if self.pidfd < 0:
            return                                   # closed: it has ended and been dealt with
        try:
            signal.pidfd_send_signal(self.pidfd, 0)  # still ours? (the pidfd pins it until it is reaped)
            if self.group:   # while its leader is not reaped, the group id cannot name anything else
                try:         # once, through the group: a second SIGTERM is "quit now" to many nodes
                    os.killpg(self.pid, sig)
                    return
                except (ProcessLookupError, PermissionError):
                    pass     # its group is gone: the leader alone
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return                                   # it has exited and been reaped

    def ended(self) -> bool:
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def reap(self) -> int | None:
        """Its exit code once it has ended, if it is our child; None if it is not ours (or runs)."""
        if self.popen is not None:
            return self.popen.poll()
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status) if pid else None

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def pin(pid: int, started: float | None, group: bool = False) -> Proc | None:
    """The process `pid` if it is still the one that started at `started`; None if it is gone or the
    pid now names another process. (Opened first, checked second: the pidfd cannot change target.)"""
    try:
        fd = os.pidfd_open(pid)
    except OSError:                                  # ProcessLookupError, or no permission
        return None
    if not same_start(create_time(pid), started):
        os.close(fd)
        return None
    return Proc(pid, fd, group)


def wait_ended(procs: list[Proc], timeout_s: float) -> list[Proc]:
    """Waits on the pidfds until every process has ended or timeout_s passes; returns those still up."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in procs if not p.ended()]
    while left and (remaining := deadline - time.monotonic()) > 0:
        poller = select.poll()
        for p in left:
            poller.register(p.pidfd, select.POLLIN)
        poller.poll(remaining * 1000)
        left = [p for p in left if not p.ended()]
    return left


def end(procs: list[Proc], timeout_s: float, first: int | None = signal.SIGTERM,
        what: str = "") -> dict[int, int | None]:
    """SIGTERM (or nothing, first=None: they were asked already), then SIGKILL to whatever is still up
    after timeout_s. Blocks until all have ended; reaps those that are our children. Returns pid ->
    exit code (None where it is not ours to know). Closes the pidfds."""
    if first is not None:
        for p in procs:
            p.signal(first)
    stubborn = wait_ended(procs, timeout_s)
    for p in stubborn:
        log.warning("%s (pid %d) still up%s after %s: killing it", what or "process", p.pid,
                    f" {timeout_s:g}s" if timeout_s else "", signal.Signals(first).name if first else "it was told to leave")
        p.signal(signal.SIGKILL)
    wait_ended(stubborn, KILL_WAIT_S)
    codes = {p.pid: p.reap() for p in procs}
    for p in procs:
        p.close()
    return codes


def kill(procs: list[Proc]) -> None:
    """SIGKILL at once (workers, which ignore SIGTERM), wait until they are gone; closes the pidfds."""
    for p in procs:
        p.signal(signal.SIGKILL)
    wait_ended(procs, KILL_WAIT_S)
    for p in procs:
        p.reap()
        p.close()
