"""The broker's table of running node binaries, and what the broker does to them directly.

psutil is imported where it is used: most starts never need it before the first binary runs.

Runners start and stop binaries; this table records what they reported, so the broker can give a
binary to a new runner when its runner dies, reap it as a child subreaper, find one a runner started
and died before reporting, notice one that vanished with nobody left to report it, kill one that
outlives its stop, and write down in the state file what runs (see adoption.py for its use). Every
signal goes through a pidfd checked against the binary's start time (stopper.pin). It decides
nothing: what happens next is state.step's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass

from visor import protocol as p, stopper

log = logging.getLogger("visor")
PR_SET_CHILD_SUBREAPER = 36
EXEC_WAIT_S = 0.2                # a forked child execs within microseconds; a loaded machine, milliseconds


@dataclass
class TrackedBinary:             # a running node binary, as the broker knows it
    name: str
    pid: int
    path: str
    args: list[str]
    started_at: float
    runner_pid: int              # the runner that started or adopted it
    create_time: float = 0.0     # with the pid, what names the process
    stop_sent: bool = False

    def row(self) -> dict:
        return {"pid": self.pid, "path": self.path, "args": self.args, "started_at": self.started_at}

    def record(self) -> dict:
        return {**self.row(), "create_time": self.create_time}

    def adopt_command(self, stop_timeout_s: float) -> p.AdoptBinary:
        return p.AdoptBinary(pid=self.pid, path=self.path, args=self.args, stop_timeout_s=stop_timeout_s,
                             create_time=self.create_time, started_at=self.started_at)


class Binaries(dict[str, TrackedBinary]):
    def started(self, msg: p.BinaryStarted, runner_pid: int) -> None:
        self[msg.name] = TrackedBinary(msg.name, msg.pid, msg.path, list(msg.args), msg.started_at, runner_pid,
                                       msg.create_time or stopper.create_time(msg.pid) or 0.0)

    def forget(self, msg: p.BinaryExited) -> bool:
        """Removes the binary an exit report is about; False if it was already reported."""
        if (b := self.get(msg.name)) is None or b.pid != msg.pid:
            return False
        del self[msg.name]
        return True

    def reaped(self, msg: p.BinaryExited) -> p.BinaryExited:
        """A runner's report of an exit it could not know the code of (not its child): the real code if the
        binary is ours (handed over by `visor restart`), reaped here; else the report as it is."""
        b = self[msg.name]
        return (_reap(b) or msg) if b.pid == msg.pid else msg     # init's (its parent died): nobody can know

    def reap_orphans(self, worker_pids: set[int]) -> list[p.BinaryExited]:
        """Binaries whose runner died are our children now (subreaper): reap the ones that ended."""
        import psutil
        exits = [exit_ for b in list(self.values()) if (exit_ := _reap(b)) is not None]
        for child in psutil.Process().children():    # other orphans (a dead worker's `vega version`...)
            if child.pid not in worker_pids and child.pid not in {b.pid for b in self.values()}:
                try:
                    os.waitpid(child.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        return exits

    def vanished(self, live_runner_pids: set[int]) -> list[p.BinaryExited]:
        """Binaries gone with no runner left to report them (their exit code is lost)."""
        exits = []
        for b in self.values():
            if b.runner_pid not in live_runner_pids and not stopper.same_start(stopper.create_time(b.pid),
                                                                                 b.create_time):
                log.warning("%s (pid %d) ended while its runner was down; exit code unknown", b.name, b.pid)
                exits.append(p.BinaryExited(name=b.name, pid=b.pid, exitcode=-1))
        return exits

    def kill_stopped(self) -> None:
        """SIGKILL for every binary told to stop that is still up (its runner did not finish the job)."""
        for b in self.values():
            if b.stop_sent and (proc := stopper.pin(b.pid, b.create_time, group=True)) is not None:
                if not proc.ended():
                    log.warning("%s (pid %d) still up after stop: killing it", b.name, b.pid)
                    proc.signal(signal.SIGKILL)
                proc.close()

    def records(self) -> dict:
        """For the state file: what names each binary (pid, start time) and how it was started."""
        return {b.name: b.record() for b in self.values()}


def _reap(b: TrackedBinary) -> p.BinaryExited | None:
    """Its exit, if it is our child and has ended; None if it runs or is not ours (its runner's, init's)."""
    try:
        pid, status = os.waitpid(b.pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return p.BinaryExited(name=b.name, pid=pid, exitcode=os.waitstatus_to_exitcode(status)) if pid else None


def runs(cmdline: list[str], path: str, args: list[str]) -> bool:
    """Whether a process's cmdline is `path` run with `args` (then maybe flags Visor appended). A
    script's cmdline starts with its interpreter (and an option or two), so `path` may come third."""
    want = [path, *args]
    return any(cmdline[k:k + len(want)] == want for k in range(3))


def find_orphan(path: str, args: list[str], known_pids: set[int]):
    """A child of ours (the subreaper) running [path, *args] that no runner reported: a runner started
    it and died before its report was handled. A psutil.Process, or None."""
    found = orphans(lambda _child, cmdline: runs(cmdline, path, args), known_pids)
    return found[0] if found else None


def orphans(matches, known_pids: set[int]) -> list:
    """Our children (we are their subreaper: a worker that started them died) for which `matches`
    (psutil.Process, its command line -> bool) holds, leaving out known_pids (our workers). A child still showing our own
    command line was forked by the worker and not yet executed, and one showing none is in the middle
    of its exec (the kernel has replaced its memory but not yet laid out its arguments; the worker's
    Popen returns from that point on): they are given EXEC_WAIT_S to become what they will be."""
    import psutil
    me = psutil.Process()
    mine = me.cmdline()
    deadline = time.monotonic() + EXEC_WAIT_S
    while True:
        found, forked = [], False
        for child in me.children():
            try:
                if child.pid in known_pids or child.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = child.cmdline()
                if not cmdline or cmdline == mine:
                    forked = True
                elif matches(child, cmdline):
                    found.append(child)
            except psutil.Error:
                continue
        if not forked or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def become_subreaper() -> None:
    """Orphaned descendants (a binary whose runner died) become our children instead of init's."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0    # -1 and errno: ctypes does not raise
        why = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as err:
        failed, why = True, str(err)
    if failed:
        log.warning("cannot become a child subreaper (%s): a binary whose runner dies will not be reaped", why)
