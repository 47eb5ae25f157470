"""Runs the operator's upgrade hooks when the broker says so, one at a time, and reports how each
ended: HookStarted once it runs, then exactly one HookFinished per RunHook, in the order they came.
Decides nothing: whether a failed hook holds the upgrade, and when to retry it, is the broker's call.

A RunHook that comes while a hook runs supersedes it: the broker asks for a hook only when the upgrade
waits on it, so the running one belongs to an upgrade that was given up (its node crashed and was
restarted). That one is ended as at a timeout (SIGTERM to its group, SIGKILL KILL_AFTER_S later) and
reported, then the new one starts. Never refused: a refusal would leave the new upgrade waiting on a
hook that nobody runs.

A hook runs in the folder and with the environment RunHook gives (added to Visor's own), with Visor's
stdout/stderr and no stdin. It leads a process group of its own (pgid == its pid, the pid HookStarted
carries), and the whole group is what ends with it: at its timeout the group gets SIGTERM, then
SIGKILL KILL_AFTER_S later; when the hook exits on its own, whatever it left running in its group
(a backgrounded child) is killed at once. If this worker dies mid-hook, the broker kills that group
by the pid it was told. While a hook runs, this worker keeps serving its link, so heartbeats go on.

It is a worker of its own rather than a job of the fetcher: a hook may take its whole timeout (300 s
by default) and a prefetch must not wait behind it; and a dead hooks worker then means one thing only,
a failed hook.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from collections import deque

from visor import protocol
from visor.worker import BrokerGone, BrokerLink, Readable, parse_worker_args

log = logging.getLogger(__name__)

KILL_AFTER_S = 5.0               # SIGTERM at the timeout, SIGKILL this much later (SPEC §7)
# Told to leave mid-hook: a shorter grace, because the pool kills a worker that has not left 3 s after
# Shutdown, and this one must be there to SIGKILL a hook that ignores SIGTERM.
SHUTDOWN_GRACE_S = 2.0


class Running:
    """The one hook that runs now: our child, leader of its own process group."""

    def __init__(self, cmd: protocol.RunHook, popen: subprocess.Popen, started: float):
        self.hook, self.popen, self.pid, self.started = cmd.hook, popen, popen.pid, started
        self.pidfd = os.pidfd_open(popen.pid)      # readable once the hook itself has exited
        self.timeout_s = cmd.timeout_s
        self.term_at, self.kill_at = started + cmd.timeout_s, float("inf")
        self.why = ""                              # why we ended it, once we have begun to

    def deadline(self) -> float:
        return min(self.term_at, self.kill_at)

    def on_deadline(self, now: float) -> None:
        if now >= self.kill_at:                    # it ignored SIGTERM
            self.signal(signal.SIGKILL)
            self.kill_at = float("inf")
        elif now >= self.term_at:
            log.warning("hook %s (pid %d) still runs after %g s: stopping its process group",
                        self.hook, self.pid, self.timeout_s)
            self.end(now, f"timed out after {self.timeout_s:g} s")

    def end(self, now: float, why: str) -> None:
        """SIGTERM to the group now, SIGKILL KILL_AFTER_S later (unless already on its way out)."""
        if self.why:
            return
        self.signal(signal.SIGTERM)
        self.term_at, self.kill_at, self.why = float("inf"), now + KILL_AFTER_S, why

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass                                   # nothing of the group is left
        except PermissionError:                    # a member we may not signal (setuid): not ours to end
            log.warning("hook %s: cannot signal all of process group %d", self.hook, self.pid)

    def finish(self, error: str = "") -> protocol.HookFinished:
        """The hook has exited (or `error` says why it was ended): kills what is left of its group,
        reaps it and says how it went."""
        # Before the leader is reaped its pid stays taken, so the group id cannot name anyone else.
        self.signal(signal.SIGKILL)
        code = self.popen.wait()
        os.close(self.pidfd)
        duration_ms = (time.monotonic() - self.started) * 1000
        error = error or self.why
        if error:
            return protocol.HookFinished(hook=self.hook, ok=False, duration_ms=duration_ms, error=error)
        return protocol.HookFinished(hook=self.hook, ok=code == 0, duration_ms=duration_ms, exitcode=code,
                                     error=exited(code))

    def stop_now(self, why: str) -> protocol.HookFinished:
        """SIGTERM to the group; SIGKILL once the hook has left or SHUTDOWN_GRACE_S has passed. Blocks:
        only when we are leaving."""
        self.signal(signal.SIGTERM)
        select.select([self.pidfd], [], [], SHUTDOWN_GRACE_S)     # readable once it has exited; not reaped
        return self.finish(error=why)


def exited(code: int) -> str:
    """Why an exit code is a failure ("" for 0); negative codes are signals, as Popen reports them."""
    if code >= 0:
        return f"exited with code {code}" if code else ""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"exited with code {code} (killed by {name})"


def start(cmd: protocol.RunHook) -> tuple[Running | None, protocol.Message]:
    """Starts the hook: (Running, HookStarted), or (None, HookFinished) when it cannot be started."""
    started = time.monotonic()
    try:
        popen = subprocess.Popen([cmd.path, *cmd.args], cwd=cmd.cwd, env={**os.environ, **cmd.env},
                                 start_new_session=True, stdin=subprocess.DEVNULL)
    except OSError as err:
        # err.filename tells a missing program from a missing working folder
        what = f"{err.filename}: " if err.filename not in (None, cmd.path) else ""
        return None, protocol.HookFinished(hook=cmd.hook, ok=False, duration_ms=(time.monotonic() - started) * 1000,
                                           error=f"cannot start {cmd.path}: {what}{err.strerror or err}")
    log.info("hook %s: running %s (pid %d)", cmd.hook, cmd.path, popen.pid)
    return Running(cmd, popen, started), protocol.HookStarted(hook=cmd.hook, pid=popen.pid)


def start_next(link: BrokerLink, waiting: deque[protocol.RunHook]) -> Running | None:
    """Starts the latest hook asked for; older ones still waiting are reported superseded, unstarted."""
    while waiting:
        cmd = waiting.popleft()
        if waiting:
            link.send(protocol.HookFinished(hook=cmd.hook, ok=False, duration_ms=0.0,
                                            error="superseded by a later hook before it started"))
            continue
        running, report = start(cmd)
        link.send(report)
        return running
    return None


def main(argv: list[str] | None = None) -> int:
    opts = parse_worker_args("hooks", argv)
    running: Running | None = None
    waiting: deque[protocol.RunHook] = deque()     # asked for while a hook still runs
    with BrokerLink(opts.endpoint, opts.name, opts.broker_pid, opts.identity, opts.first) as link:
        try:
            while True:
                until = running.deadline() if running else float("inf")
                match link.receive(until=until, watch=(running.pidfd,) if running else ()):
                    case protocol.Shutdown():
                        if running is not None:
                            link.send(running.stop_now("stopped: Visor is shutting down"))
                        return 0
                    case protocol.RunHook() as cmd:
                        waiting.append(cmd)
                        if running is None:
                            running = start_next(link, waiting)
                        else:
                            log.warning("hook %s (pid %d) is superseded by %s: stopping it", running.hook,
                                        running.pid, cmd.hook)
                            running.end(time.monotonic(), f"stopped: superseded by {cmd.hook}")
                    case Readable():               # the hook has exited
                        link.send(running.finish())
                        running = start_next(link, waiting)
                    case None if running is not None:
                        running.on_deadline(time.monotonic())
        except BrokerGone:
            if running is not None:                # nobody is left to hear of it: end it, leave nothing
                running.stop_now("the broker is gone")
            raise
