"""Runs one node binary: starts it, reports when it started and how it ended, stops it when told.

The binary gets its own process group and Visor's stdout/stderr (its output never passes through
Python). It does not die with this worker: if the runner is killed, the broker (a child subreaper)
inherits the binary and a new runner adopts it. Decides nothing: every start and stop is a command.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

from visor import protocol
from visor.errors import NodeError
from visor.worker import BrokerGone, BrokerLink, Readable, parse_worker_args


class Binary:
    """One running binary: our own child (popen set) or adopted from a dead runner (popen None)."""

    def __init__(self, pid: int, popen: subprocess.Popen | None):
        self.pid, self.popen = pid, popen
        self.pidfd = os.pidfd_open(pid)          # readable once the process has exited
        self.kill_at = float("inf")

    def signal(self, sig: int) -> None:
        """Signals the binary's process group (it leads it), or the binary alone if that fails."""
        try:
            os.killpg(self.pid, sig) if self.alive() else None
        except (ProcessLookupError, PermissionError):
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def alive(self) -> bool:
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
            return True
        except ProcessLookupError:
            return False

    def close(self) -> None:
        os.close(self.pidfd)


def ensure_executable(path: str) -> None:
    """Turns on the three execute bits (a+x) if any is off, as the Go visor does before a start."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode | 0o111 != mode:
        os.chmod(path, mode | 0o111)


def start(name: str, path: str, args: list[str]) -> tuple[Binary | None, protocol.Message]:
    try:
        ensure_executable(path)
        popen = subprocess.Popen([path, *args], start_new_session=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, protocol.StartFailed(name=name, error=f"{path}: binary not found")
    except PermissionError:
        return None, protocol.StartFailed(name=name, error=f"{path}: not executable (permission denied)")
    except OSError as err:
        return None, protocol.StartFailed(name=name, error=f"{path}: cannot start it ({err.strerror or err})")
    return Binary(popen.pid, popen), protocol.BinaryStarted(
        name=name, pid=popen.pid, path=path, args=list(args), started_at=time.time())


def stop_now(binary: Binary, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after timeout_s; blocks. Used only when we are leaving ourselves."""
    binary.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while binary.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
        if binary.popen is not None:
            binary.popen.poll()                  # reap, or alive() stays true for a zombie
    binary.signal(signal.SIGKILL)


def query_segment(path: str, args: list[str]) -> protocol.Segment:
    from visor import nodeapi                    # http.client, email, ssl: kept off the way to the first start
    try:
        return protocol.Segment(height=nodeapi.latest_segment(path, args))
    except NodeError as err:
        return protocol.Segment(height=None, error=str(err))


def main(argv: list[str] | None = None) -> int:
    opts = parse_worker_args("runner", argv)
    name = opts.name.partition(":")[2]
    binary: Binary | None = None
    stop_timeout_s = 15.0
    with BrokerLink(opts.endpoint, opts.name, opts.broker_pid, opts.identity, opts.first) as link:
        try:
            while True:
                until = binary.kill_at if binary else float("inf")
                match link.receive(until=until, watch=(binary.pidfd,) if binary else ()):
                    case protocol.Shutdown():
                        if binary is not None:   # the broker stops binaries first; never leave one unwatched
                            stop_now(binary, stop_timeout_s)
                        return 0
                    case protocol.StartBinary(path=path, args=args, stop_timeout_s=stop_timeout_s):
                        if binary is not None and binary.popen is None and not binary.alive():
                            binary.close()       # an adopted binary the broker reaped before we noticed
                            binary = None
                        if binary is not None:   # never two copies: the broker is told, and decides
                            link.send(protocol.StartFailed(name=name, error=f"pid {binary.pid} still runs"))
                            continue
                        binary, report = start(name, path, args)
                        link.send(report)
                    case protocol.AdoptBinary(pid=pid, stop_timeout_s=stop_timeout_s) if binary is None:
                        try:
                            binary = Binary(pid, None)
                        except ProcessLookupError:
                            pass                 # already gone: the broker reaps it and knows
                    case protocol.StopBinary(timeout_s=timeout_s) if binary is not None:
                        stop_timeout_s = timeout_s
                        binary.kill_at = time.monotonic() + timeout_s
                        binary.signal(signal.SIGTERM)
                    case protocol.QuerySegment(path=path, args=args):
                        link.send(query_segment(path, args))
                    case Readable():             # the binary has exited
                        if binary.popen is not None:   # an adopted one is reaped and reported by the broker
                            code = binary.popen.wait()
                            link.send(protocol.BinaryExited(name=name, pid=binary.pid, exitcode=code))
                        binary.close()
                        binary = None
                    case None if binary is not None and time.monotonic() >= binary.kill_at:
                        binary.signal(signal.SIGKILL)   # ignored SIGTERM for stopSignalTimeoutSeconds
                        binary.kill_at = float("inf")
        except BrokerGone:
            # nobody is left to supervise the binary: stop it rather than leave it unwatched
            if binary is not None:
                stop_now(binary, stop_timeout_s)
            raise
