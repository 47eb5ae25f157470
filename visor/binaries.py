"""The broker's table of running node binaries, and what the broker does to them directly.

psutil is imported where it is used: most starts never need it before the first binary runs.

Runners start and stop binaries; this table records what they reported, so the broker can give a
binary to a new runner when its runner dies, reap it as a child subreaper, notice one that vanished
with nobody left to report it, kill one that outlives its stop, and, at start-up, end binaries a
killed broker left behind. It decides nothing: what happens next is state.step's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from dataclasses import dataclass

from visor import protocol as p

log = logging.getLogger("visor")
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Binary:                    # a running node binary, as the broker knows it
    name: str
    pid: int
    path: str
    args: list[str]
    started_at: float
    runner_pid: int              # the runner that started or adopted it
    stop_sent: bool = False

    def row(self) -> dict:
        return {"pid": self.pid, "path": self.path, "args": self.args, "started_at": self.started_at}


class Binaries(dict[str, Binary]):
    def started(self, msg: p.BinaryStarted, runner_pid: int) -> None:
        self[msg.name] = Binary(msg.name, msg.pid, msg.path, list(msg.args), msg.started_at, runner_pid)

    def forget(self, msg: p.BinaryExited) -> bool:
        """Removes the binary an exit report is about; False if it was already reported."""
        if (b := self.get(msg.name)) is None or b.pid != msg.pid:
            return False
        del self[msg.name]
        return True

    def reap_orphans(self, worker_pids: set[int]) -> list[p.BinaryExited]:
        """Binaries whose runner died are our children now (subreaper): reap the ones that ended."""
        import psutil
        exits = []
        for b in list(self.values()):
            try:
                pid, status = os.waitpid(b.pid, os.WNOHANG)
            except ChildProcessError:
                continue                             # still its runner's child
            if pid:
                exits.append(p.BinaryExited(name=b.name, pid=pid, exitcode=os.waitstatus_to_exitcode(status)))
        for child in psutil.Process().children():    # other orphans (a dead worker's `vega version`...)
            if child.pid not in worker_pids and child.pid not in {b.pid for b in self.values()}:
                try:
                    os.waitpid(child.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        return exits

    def vanished(self, live_runner_pids: set[int]) -> list[p.BinaryExited]:
        """Binaries gone with no runner left to report them (their exit code is lost)."""
        import psutil
        exits = []
        for b in self.values():
            if b.runner_pid not in live_runner_pids and not psutil.pid_exists(b.pid):
                log.warning("%s (pid %d) ended while its runner was down; exit code unknown", b.name, b.pid)
                exits.append(p.BinaryExited(name=b.name, pid=b.pid, exitcode=-1))
        return exits

    def kill_stopped(self) -> None:
        """SIGKILL for every binary told to stop that is still up (its runner did not finish the job)."""
        import psutil
        for b in self.values():
            if b.stop_sent and psutil.pid_exists(b.pid):
                log.warning("%s (pid %d) still up after stop: killing it", b.name, b.pid)
                for kill in (os.killpg, os.kill):
                    try:
                        kill(b.pid, signal.SIGKILL)
                        break
                    except (ProcessLookupError, PermissionError):
                        continue

    def memory(self) -> dict:
        """For state.json: pid and start time, so a later start can tell the process is still the same."""
        import psutil
        remembered = {}
        for b in self.values():
            try:
                remembered[b.name] = {"pid": b.pid, "create_time": psutil.Process(b.pid).create_time()}
            except psutil.Error:
                continue
        return remembered


def end_leftovers(remembered: dict, timeout_s: float) -> None:
    """Binaries a killed broker left running are stopped before ours start: never two copies."""
    if not remembered:
        return
    import psutil
    procs = []
    for name, seen in remembered.items():
        try:
            proc = psutil.Process(seen["pid"])
            if abs(proc.create_time() - seen["create_time"]) < 0.01:
                log.warning("%s (pid %d) from the previous run is still up: stopping it", name, proc.pid)
                proc.terminate()
                procs.append(proc)
        except (psutil.Error, KeyError, TypeError):
            continue
    _gone, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=5)


def become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot become a child subreaper: a binary whose runner dies will not be reaped")
