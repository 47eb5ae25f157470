"""The broker's side of upgrade hooks: the command for the hooks worker, the hooks it runs, their events.

state.step decides when a hook runs and what its end means; this module only turns a RunHook action
into the worker's command (program, args, timeout, SPEC §7 environment), remembers the hooks sent
(for `visor status` and the hook.* events, which carry the upgrade's tag), and, if the hooks worker
dies mid-hook, kills the hook's process group (it leads one: pgid == pid) and reports a failed hook,
so that an upgrade is never left waiting on a hook nobody runs.

Usually one hook is out at a time. A second is sent when state.step gave up the upgrade the first
belonged to (a crash-restart) and a new upgrade needs its own: the worker ends the first and runs the
second, and reports on both in the order they were sent. Only the last one's end is news for state.step.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from visor import protocol as p
from visor.binaries import orphans
from visor.config import VisorConfig
from visor.facts import RunHook

log = logging.getLogger("visor")


@dataclass
class Running:
    hook: str
    tag: str
    pid: int | None = None       # known once the worker says HookStarted
    started_at: float = 0.0      # wall time, for status


class Hooks:
    def __init__(self, home: Path):
        self.home = home
        self.sent: list[Running] = []    # sent to the hooks worker, not yet reported finished; oldest first

    @property
    def running(self) -> Running | None:
        """The hook the worker runs now (reports come in the order of `sent`)."""
        return self.sent[0] if self.sent else None

    def command(self, action: RunHook, cfg: VisorConfig) -> p.RunHook | p.HookFinished:
        """The worker's command; a HookFinished (passed) when the hook is no longer configured."""
        hook = cfg.hook(action.hook)
        if hook is None:         # removed by a reload between the decision and now: nothing to run
            return p.HookFinished(hook=action.hook, ok=True, duration_ms=0.0)
        self.sent.append(Running(action.hook, action.tag, started_at=time.time()))
        env = {"VISOR_HOOK": action.hook, "VISOR_HOME": str(self.home), "VISOR_UPGRADE_TAG": action.tag,
               "VISOR_UPGRADE_HEIGHT": str(action.height), "VISOR_FROM_FOLDER": str(self.home / action.source),
               "VISOR_TO_FOLDER": str(self.home / action.folder)}
        return p.RunHook(hook=action.hook, path=str(hook.program(self.home)), args=list(hook.args),
                         timeout_s=float(hook.timeout_s), env=env, cwd=str(self.home))

    def started(self, msg: p.HookStarted) -> dict | None:
        """hook.started's fields, or None for a report about no hook we run."""
        run = self.running
        if run is None or run.hook != msg.hook or run.pid is not None:
            return None
        run.pid = msg.pid
        return {"hook": msg.hook, "tag": run.tag, "pid": msg.pid}

    def finished(self, msg: p.HookFinished) -> tuple[str, dict, bool] | None:
        """(event type, fields, whether state.step waits on it) for the end of the oldest hook sent;
        None for a stray report."""
        run = self.running
        if run is None or run.hook != msg.hook:
            return None
        self.sent.pop(0)
        fields = {"hook": msg.hook, "tag": run.tag, "duration_ms": round(msg.duration_ms, 3)}
        if msg.ok:
            return "hook.completed", fields, not self.sent
        return "hook.failed", {**fields, "exitcode": msg.exitcode, "error": msg.error}, not self.sent

    def worker_died(self, exitcode: int, known_pids: set[int]) -> list[p.HookFinished]:
        """The hooks worker is gone: each hook sent to it has failed, the running one's group is killed.
        known_pids: our workers' (never taken for a hook)."""
        for run in self.sent:
            pid = run.pid if run.pid is not None else _orphaned(run, known_pids)
            if pid is None:
                continue
            try:
                os.killpg(pid, signal.SIGKILL)       # the hook is now our child (subreaper): reaped as an orphan
            except (ProcessLookupError, PermissionError):
                pass
        why = f"the hooks worker died (exit code {exitcode})"
        for run in self.sent:
            log.warning("%s while %s was out: the hook failed", why, run.hook)
        return [p.HookFinished(hook=run.hook, ok=False, error=why,
                               duration_ms=round((time.time() - run.started_at) * 1000, 3)) for run in self.sent]

    def status(self) -> dict | None:
        run = self.running
        if run is None:
            return None
        return {"name": run.hook, "pid": run.pid, "running_s": round(time.time() - run.started_at, 1)}


def _orphaned(run: Running, known_pids: set[int]) -> int | None:
    """The pid of a hook whose HookStarted died with its worker (killed right after starting it, or
    between its fork and its exec). It is our child now (we are a subreaper), a group leader, and its
    environment says which hook it is; the newest such, since something an earlier run of that hook
    detached (setsid) can match too."""
    def matches(child, _cmdline) -> bool:
        env = child.environ()
        return env.get("VISOR_HOOK") == run.hook and env.get("VISOR_UPGRADE_TAG") == run.tag \
            and os.getpgid(child.pid) == child.pid
    found = [(child.create_time(), child.pid) for child in orphans(matches, known_pids)]
    return max(found)[1] if found else None


def end_leftovers(home: Path) -> list[int]:
    """Hooks a killed broker's hooks worker may still be ending (it gives a hook a few seconds after
    SIGTERM): their groups are killed at start, before this run can start the same hook again."""
    import psutil
    ended = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if env.get("VISOR_HOOK") and env.get("VISOR_HOME") == str(home) and os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
                ended.append(proc.pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    if ended:
        log.warning("ended %d hook(s) of the previous run still running: %s", len(ended), ended)
    return ended
