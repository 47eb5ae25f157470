"""Runs one node binary: starts it, reports when it started and how it ended, stops it when told.

The binary gets its own process group and Visor's stdout/stderr (its output never passes through
Python). It does not die with this worker: if the runner is killed, the broker (a child subreaper)
inherits the binary and a new runner adopts it. Nor does it die with the broker: the runner stays
its parent (so its exit code is kept), goes on with a stop under way (SIGKILL at its deadline), and
says hello with what it holds until the next broker welcomes it; a binary that ends meanwhile is
held as a report for that broker. The runner leaves on its own only when it holds nothing: at once
if it held nothing when the broker died, or ORPHAN_LEAVE_S after its binary ended with no broker to
tell. Decides nothing: every start and stop is a command.

A runner told to Detach (`visor restart`, when the broker is not its parent and so could not inherit
its binary) executes the code now installed in place: same pid, still the binary's parent, born with
an AdoptBinary of it, and saying hello until the restarted broker welcomes it (exec_in_place).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import time

from visor import faults, protocol, stopper
from visor.errors import NodeError
from visor.worker import IDENTITY_ENV, STOP_SIGNALS, BrokerLink, BrokerLost, Readable, parse_worker_args

ORPHAN_LEAVE_S = 60.0            # a binary ended with no broker up: its report waits this long for one
UNKNOWN_EXIT = protocol.UNKNOWN_EXIT   # the exit code of a binary that was not our child (adopted) is not ours


class HeldBinary:
    """The binary this runner supervises: its child (proc.popen set) or adopted (the broker is its parent)."""

    def __init__(self, proc: stopper.Proc, path: str, args: list[str], started_at: float, create_time: float):
        self.proc, self.pid = proc, proc.pid
        self.path, self.args, self.started_at, self.create_time = path, list(args), started_at, create_time
        self.kill_at = float("inf")
        self.exitcode: int | None = None         # it ended while no broker could be told

    def holding(self, name: str) -> protocol.Holding:
        return protocol.Holding(name=name, pid=self.pid, path=self.path, args=self.args, started_at=self.started_at,
                                create_time=self.create_time, exitcode=self.exitcode,
                                stopping=self.kill_at != float("inf"))


def ensure_executable(path: str) -> None:
    """Turns on the three execute bits (a+x) if any is off, as the Go visor does before a start."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode | 0o111 != mode:
        os.chmod(path, mode | 0o111)


def start(name: str, path: str, args: list[str]) -> tuple[HeldBinary | None, protocol.Message]:
    try:
        ensure_executable(path)
        popen = subprocess.Popen([path, *args], start_new_session=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, protocol.StartFailed(name=name, error=f"{path}: binary not found")
    except PermissionError:
        return None, protocol.StartFailed(name=name, error=f"{path}: not executable (permission denied)")
    except OSError as err:
        return None, protocol.StartFailed(name=name, error=f"{path}: cannot start it ({err.strerror or err})")
    created = stopper.create_time(popen.pid)     # our unreaped child: its pid names it until we wait
    held = HeldBinary(stopper.Proc(popen.pid, os.pidfd_open(popen.pid), group=True, popen=popen),
                      path, args, time.time(), created or 0.0)
    if faults.fires("runner-exit-after-start"):
        os._exit(9)
    return held, protocol.BinaryStarted(name=name, pid=popen.pid, path=path, args=list(args),
                                        started_at=held.started_at, create_time=held.create_time)


def adopt(name: str, msg: protocol.AdoptBinary) -> tuple[HeldBinary | None, protocol.Message | None]:
    """Supervises a binary another runner started, if the pid still names it; else reports it gone."""
    proc = stopper.pin(msg.pid, msg.create_time, group=True)
    if proc is None:
        return None, protocol.BinaryExited(name=name, pid=msg.pid, exitcode=UNKNOWN_EXIT)
    return HeldBinary(proc, msg.path, msg.args, msg.started_at, msg.create_time), None


def query_segment(path: str, args: list[str]) -> protocol.Segment:
    from visor import nodeapi                    # http.client, email, ssl: kept off the way to the first start
    try:
        return protocol.Segment(height=nodeapi.latest_segment(path, args))
    except NodeError as err:
        return protocol.Segment(height=None, error=str(err))


class Runner:
    def __init__(self, name: str):
        self.name = name
        self.held: HeldBinary | None = None
        self.stop_timeout_s = 15.0
        self.leave_at = float("inf")             # set while no broker is up and nothing runs
        self.reload_code = False                 # told to Detach while holding a live binary

    def greeting(self) -> list[protocol.Message]:
        return [self.held.holding(self.name)] if self.held else []

    def on_exit(self, link: BrokerLink) -> None:
        """The binary has ended: report it, or hold the report for the next broker. An adopted binary is
        not our child: its code is unknown here (-1); the broker, if it is the parent, reaps the real one,
        and otherwise (init took it: a broker killed after a `visor restart`) -1 is all anyone can know."""
        held = self.held
        code = held.proc.reap()
        held.proc.close()
        held.kill_at = float("inf")              # nothing left to kill
        code = UNKNOWN_EXIT if code is None else code
        if link.broker_up and link.send(protocol.BinaryExited(self.name, held.pid, code)):
            self.held = None
            return
        held.exitcode = code
        self.leave_at = time.monotonic() + ORPHAN_LEAVE_S

    def step(self, link: BrokerLink, msg) -> int | None:
        """Carries out one command or event; an exit code when the runner must leave."""
        held = self.held
        match msg:
            case protocol.Shutdown():
                if held is not None and held.exitcode is None:   # the broker stops binaries first
                    stopper.end([held.proc], self.stop_timeout_s, what=self.name)
                return 0
            case protocol.HandOver() if not faults.fires("runner-ignores-handover"):   # (as older code would)
                if held is not None:             # no signal: the broker, its subreaper, inherits it
                    held.proc.close()
                return 0
            case protocol.Detach():
                link.detach()                    # the binary stays ours: the next broker adopts us with it
                # with a stop under way, the old code enforces its deadline (the broker refuses to restart
                # while stopping; this is the rare stop of an upgrade)
                self.reload_code = held is not None and held.exitcode is None and held.kill_at == float("inf")
            case protocol.Welcome() if held is not None and held.exitcode is not None:
                link.send(protocol.BinaryExited(name=self.name, pid=held.pid, exitcode=held.exitcode))
                self.held, self.leave_at = None, float("inf")
            case BrokerLost() if held is None:
                return 0                         # nothing to keep: the next broker starts afresh
            case protocol.StartBinary(path=path, args=args, stop_timeout_s=timeout_s):
                self.stop_timeout_s = timeout_s
                if held is not None and held.exitcode is None and held.proc.ended():
                    self.on_exit(link)           # ended just now; reported before anything new starts
                if self.held is not None:        # never two copies: the broker is told, and decides
                    link.send(protocol.StartFailed(name=self.name, error=f"pid {self.held.pid} still runs"))
                    return None
                self.held, report = start(self.name, path, args)
                link.send(report)
            case protocol.AdoptBinary(stop_timeout_s=timeout_s) if held is None:
                self.stop_timeout_s = timeout_s
                self.held, report = adopt(self.name, msg)
                if report is not None:
                    link.send(report)
            case protocol.StopBinary(timeout_s=timeout_s) if held is not None and held.exitcode is None:
                self.stop_timeout_s = timeout_s
                held.kill_at = time.monotonic() + timeout_s
                held.proc.signal(signal.SIGTERM)
            case protocol.QuerySegment(path=path, args=args):
                link.send(query_segment(path, args))
            case Readable():
                self.on_exit(link)
            case None if held is not None and time.monotonic() >= held.kill_at:
                held.proc.signal(signal.SIGKILL)  # ignored SIGTERM for stopSignalTimeoutSeconds
                held.kill_at = float("inf")
            case None if time.monotonic() >= self.leave_at:
                return 0                         # its report waited long enough; the next broker accounts
        return None


def exec_in_place(opts, runner: Runner) -> None:
    """Replaces this process's code with the code now installed; returns only if that fails (the old
    code goes on). The binary stays this pid's child, so its exit code is still ours to reap; the file
    descriptors (ZeroMQ's, the pidfd) close on exec. Stop signals stay blocked across the exec, pending
    until the new code has its handlers (BrokerLink)."""
    held, runner.reload_code = runner.held, False
    adopt_it = protocol.AdoptBinary(pid=held.pid, path=held.path, args=held.args, stop_timeout_s=runner.stop_timeout_s,
                                    create_time=held.create_time, started_at=held.started_at)
    argv = [sys.executable, "-m", "workers.runner", "--endpoint", opts.endpoint, "--name", opts.name,
            "--home", opts.home, "--log-level", opts.log_level, "--detached", "--first", protocol.encode(adopt_it).hex()]
    env = {**os.environ, IDENTITY_ENV: opts.identity}   # not in argv: /proc/PID/environ is the owner's only
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        os.execve(argv[0], argv, env)
    except OSError as err:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        logging.getLogger(opts.name).warning("cannot load the code now installed (%s: %s): %s keeps running the "
                                             "code it started with", argv[0], err.strerror or err, opts.name)


def main(argv: list[str] | None = None) -> int:
    opts = parse_worker_args("runner", argv)
    runner = Runner(opts.name.partition(":")[2])
    with BrokerLink(opts.endpoint, opts.name, opts.broker_pid, opts.identity, opts.first, outlive=True,
                    greeting=runner.greeting, detached=opts.detached) as link:
        while True:
            held = runner.held
            running = held is not None and held.exitcode is None
            until = min(held.kill_at if running else float("inf"), runner.leave_at)
            code = runner.step(link, link.receive(until=until, watch=(held.proc.pidfd,) if running else ()))
            if code is not None:
                return code
            if runner.reload_code:
                exec_in_place(opts, runner)


if __name__ == "__main__":                       # exec_in_place; forked runners enter at main()
    sys.exit(main())
