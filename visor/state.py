"""The one function that changes the broker's state: step(state, fact, cfg, now).

Pure: no sockets, no clock (the broker passes `now`, a monotonic time), no os. Facts come in (worker
reports, timers, signals; see visor.facts and visor.protocol); a new state and a list of actions come
out, and the broker carries them out. tests/unit/test_model.py walks every order of facts it can.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType
from typing import Any

from visor import protocol as p
from visor.config import VisorConfig
from visor.facts import (Action, Boot, Emit, Exit, Launching, Phase, Prefetch, Prepare,  # noqa: F401
                         QuerySegment, Result, RunHook, Schedule, StartBinaries, State, Step, StopBinaries,
                         StopRequested, SwitchCurrent, Timer, Upgrade)

UPGRADE_RETRY_S = 3              # a blocked upgrade (folder or hook) is tried again this often
PREFETCH_BACKOFF_S = (5, 10, 20, 40, 80, 160, 300)
RETRY_SPACING_S = 2.0            # the Go visor's delay between status calls: a retry budget of N is N·2 s
IN_FLIGHT = (Step.STOPPING, Step.AFTER_STOP, Step.STARTING, Step.ANSWERING)   # recorded durably (in_flight)
RPC_COUNTS = (None, Step.PREPARING, Step.BEFORE_STOP, Step.ANSWERING, Step.AFTER_START)  # the node should answer


def step(s: State, fact: Any, cfg: VisorConfig, now: float) -> Result:
    """The only way the broker's state changes."""
    u = s.upgrade
    match fact:
        case Boot():
            return _boot(s, fact, cfg, now)
        case StopRequested(signal=sig) if s.phase is not Phase.STOPPING:
            # any phase -> STOPPING: a clean stop, exit 0 once every binary is down
            s = replace(s, phase=Phase.STOPPING, exit_code=0, reason=f"received {sig}", upgrade=None)
            state, actions = _stop_all(s, cfg, now)
            return state, [Emit.of("visor.stopping"), *actions]
        case Launching(names=names):
            return replace(s, expected=names, launching=s.launching | names), []
        case p.BinaryStarted() if fact.name in s.launching:
            return _on_started(s, fact, cfg, now)
        case p.BinaryExited() if s.running.get(fact.name) == fact.pid:
            return _on_exited(s, fact, cfg, now)
        case p.StartFailed(name=name) if name in s.launching or not s.launching:
            s = replace(s, launching=s.launching - {name})
            if _winding_down(s):         # this attempt has failed already, or we are leaving: one failure
                return _stop_all(s, cfg, now)
            return _on_failure(s, f"{name} could not start: {fact.error}", cfg, now)
        case p.UpgradeStatus():
            return _on_status(s, fact, cfg, now)
        case p.RpcFailed(error=error) if s.phase in (Phase.STARTING, Phase.RUNNING, Phase.BLOCKED) \
                and (u.step if u else None) in RPC_COUNTS:
            return _on_rpc_failed(s, error, cfg, now)
        case p.FolderReady(tag=tag) if u and u.tag == tag and u.step is Step.PREPARING:
            return _on_folder_ready(s, cfg, now)
        case p.FolderBlocked(tag=tag, reason=why) if u and u.tag == tag and u.step is Step.PREPARING:
            return _blocked(s, why)      # UPGRADING -> BLOCKED: nothing was stopped
        case p.FolderBlocked(tag=tag) if s.accepted and s.accepted[0] == tag and not u:
            delay = PREFETCH_BACKOFF_S[min(s.prefetch_failures, len(PREFETCH_BACKOFF_S) - 1)]
            return replace(s, prefetch_failures=s.prefetch_failures + 1, accepted_ready=False), \
                [Schedule("prefetch", delay)]
        case p.FolderReady(tag=tag) if s.accepted and s.accepted[0] == tag and not u:
            return replace(s, accepted_ready=True), []
        case p.HookFinished() if u and u.step.value == fact.hook:
            return _on_hook_finished(s, fact, cfg, now)
        case Timer(name="retry-upgrade") if s.phase is Phase.BLOCKED and u and u.step is Step.PREPARING:
            return s, [Prepare(u.tag, u.folder, cfg.auto_install)]
        case Timer(name="retry-hook") if s.phase is Phase.BLOCKED and u and u.step is Step.AFTER_STOP:
            return _after_stop(replace(s, phase=Phase.UPGRADING), cfg, now)
        case Timer(name="prefetch") if s.accepted and not u:
            tag = s.accepted[0]
            return s, [Prefetch(tag, cfg.folder_for(tag))]
        case Timer(name="stop") if u and u.step is Step.WAITING:
            return _stop_all(replace(s, upgrade=replace(u, step=Step.STOPPING)), cfg, now)
        case Timer(name="restart") if s.phase is Phase.RESTARTING and not (s.running or s.launching):
            if "data_node" in s.expected:
                return s, [QuerySegment()]
            return _start(s, s.folder, None)
        case p.Segment(height=height, error=error) if s.phase is Phase.RESTARTING \
                and not (s.running or s.launching):
            if error:
                return _on_failure(s, f"data node history segment: {error}", cfg, now)
            return _start(s, s.folder, height)
    return s, []                 # any other fact changes nothing


def in_flight(s: State) -> dict | None:
    """The upgrade a broker killed now must resume: from its first stop until the new node answers.
    The broker writes it down (durably) before carrying out the actions of the step that began it."""
    u = s.upgrade
    if not (u and u.step in IN_FLIGHT):
        return None
    pending = {"tag": u.tag, "folder": u.folder, "height": u.height, "source": u.source}
    if u.step is Step.AFTER_STOP and u.down_at is not None:   # a slow step anyway: its fsync costs nothing
        pending["down_at"] = u.down_at   # so that a resumed upgrade's downtime starts at the real stop
    return pending


def _winding_down(s: State) -> bool:
    u = s.upgrade
    return s.phase in (Phase.STOPPING, Phase.RESTARTING) or bool(u and u.step is Step.STOPPING)


def _boot(s: State, b: Boot, cfg: VisorConfig, now: float) -> Result:
    s = replace(s, folder=b.folder, restarts=b.restarts, first_budget=b.restarts == 0,
                last_upgrade=MappingProxyType(dict(b.last_upgrade)) if b.last_upgrade else None)
    up = b.upgrade
    if up and up["folder"] != b.folder:
        # the previous run was stopping the old binaries for this upgrade: go on from there
        u = Upgrade(up["tag"], up["height"], up["folder"], source=b.folder, step=Step.STOPPING,
                    down_at=up.get("down_at"))
        s = replace(s, phase=Phase.UPGRADING, upgrade=u, running=MappingProxyType(dict(b.adopted)),
                    expected=b.expected or frozenset(b.adopted))
        return _stop_all(s, cfg, now)
    if not b.adopted:
        height = up["height"] if up else b.snapshot_height
        if up:                   # switched before the crash, the new node had not answered: its first start
            s = replace(s, upgrade=Upgrade(up["tag"], up["height"], up["folder"], source=up.get("source", ""),
                                           step=Step.STARTING, down_at=up.get("down_at")))
        return _start(s, b.folder, height)
    # what the previous run left is adopted: nothing is started, nothing signalled
    s = replace(s, phase=Phase.RUNNING, running=MappingProxyType(dict(b.adopted)),
                expected=b.expected or frozenset(b.adopted))
    if up:                       # the new binaries run (upgrade.completed was said): the node's answer is due
        s = replace(s, upgrade=Upgrade(up["tag"], up["height"], up["folder"], source=up.get("source", ""),
                                       step=Step.ANSWERING))
        if not (s.last_upgrade and s.last_upgrade["tag"] == up["tag"]):   # the state file missed its end
            s = replace(s, last_upgrade=MappingProxyType({"tag": up["tag"], "height": up["height"],
                                                          "folder": up["folder"], "downtime_ms": None}))
    if missing := s.expected - s.running.keys():
        return _on_failure(s, f"{', '.join(sorted(missing))} not running when Visor started", cfg, now)
    return s, []


def _start(s: State, folder: str, snapshot_height: int | None) -> Result:
    # RESTARTING -> STARTING (or UPGRADING stays, its step now STARTING)
    phase = Phase.UPGRADING if s.upgrade else Phase.STARTING
    return replace(s, phase=phase, folder=folder, rpc_failures=0, rpc_counted_at=None,
                   first_budget=bool(s.upgrade) or s.first_budget and s.restarts == 0), \
        [StartBinaries(folder, snapshot_height)]


def _stop_all(s: State, cfg: VisorConfig, now: float) -> Result:
    if s.running:
        return s, [StopBinaries()]
    if s.launching:
        return s, []             # one is being started: it is stopped as soon as it reports
    return _all_down(s, cfg, now)


def _all_down(s: State, cfg: VisorConfig, now: float) -> Result:
    """Every binary has stopped: what comes next depends on why they were stopped."""
    if s.phase is Phase.STOPPING:
        return s, [Exit(s.exit_code or 0, s.reason)]
    if s.phase is Phase.RESTARTING:
        return s, [Schedule("restart", cfg.restarts_delay_s)]
    if s.upgrade and s.upgrade.step is Step.STOPPING:
        return _after_stop(s, cfg, now)
    return s, []


def _after_stop(s: State, cfg: VisorConfig, now: float) -> Result:
    if cfg.hook("afterStop"):    # UPGRADING: old binaries gone; the hook runs before anything changes
        return _run_hook(s, "afterStop", now)
    return _switch(s)


def _run_hook(s: State, hook: str, now: float) -> Result:
    u = replace(s.upgrade, step=Step(hook), hook_at=now)
    return replace(s, upgrade=u), [RunHook(hook, u.tag, u.height, u.source, u.folder)]


def _on_hook_finished(s: State, fact: p.HookFinished, cfg: VisorConfig, now: float) -> Result:
    u = s.upgrade
    hook = cfg.hook(fact.hook)
    if u.step is Step.AFTER_START:
        return replace(s, upgrade=None), []          # only reported: the upgrade is over
    if not fact.ok and (hook is None or hook.required):
        if u.step is Step.BEFORE_STOP:               # nothing was stopped: held like a blocked folder
            return _blocked(replace(s, upgrade=replace(u, step=Step.PREPARING, hook_at=None)),
                            f"beforeStop hook failed: {fact.error}")
        # afterStop: the old binaries are down and stay down (a required backup did not happen)
        why = f"afterStop hook failed: {fact.error}"
        emit = [Emit.of("upgrade.blocked", tag=u.tag, reason=why)] if why != s.blocked_reason else []
        return replace(s, phase=Phase.BLOCKED, blocked_reason=why), [*emit, Schedule("retry-hook", UPGRADE_RETRY_S)]
    s = replace(s, phase=Phase.UPGRADING, blocked_reason="", upgrade=replace(u, hook_at=None))
    if u.step is Step.BEFORE_STOP:
        return _stop_after_delay(s, cfg, now)
    return _switch(s)            # afterStop passed (or may fail): switch and start


def _switch(s: State) -> Result:
    # UPGRADING: old binaries gone -> switch `current` and start the new ones from the upgrade block
    u = replace(s.upgrade, step=Step.STARTING, hook_at=None)
    state, actions = _start(replace(s, upgrade=u), u.folder, u.height)
    return state, [SwitchCurrent(u.folder), *actions]


def _blocked(s: State, why: str) -> Result:
    # UPGRADING -> BLOCKED: try again until an operator fixes what is wrong
    emit = [Emit.of("upgrade.blocked", tag=s.upgrade.tag, reason=why)] if why != s.blocked_reason else []
    return replace(s, phase=Phase.BLOCKED, blocked_reason=why), [*emit, Schedule("retry-upgrade", UPGRADE_RETRY_S)]


def _on_started(s: State, fact: p.BinaryStarted, cfg: VisorConfig, now: float) -> Result:
    s = replace(s, running=MappingProxyType({**s.running, fact.name: fact.pid}),
                launching=s.launching - {fact.name})
    actions: list[Action] = [Emit.of("binary.started", name=fact.name, pid=fact.pid, path=fact.path,
                                     args=list(fact.args))]
    if _winding_down(s):
        return s, [*actions, StopBinaries()]    # it started as we were stopping or restarting: stop it too
    u = s.upgrade
    if u and u.step is Step.STARTING and u.downtime_ms is None and u.down_at is not None:
        s = replace(s, upgrade=replace(u, downtime_ms=round((now - u.down_at) * 1000, 3)))
        u = s.upgrade
    if not s.expected <= s.running.keys():
        return s, actions
    if u and u.step is Step.STARTING:
        # UPGRADING -> RUNNING: the upgrade is done; a success resets the restart count
        last = {"tag": u.tag, "height": u.height, "folder": u.folder, "downtime_ms": u.downtime_ms}
        done = Emit.of("upgrade.completed", tag=u.tag, height=u.height, downtime_ms=u.downtime_ms)
        return replace(s, phase=Phase.RUNNING, upgrade=replace(u, step=Step.ANSWERING), restarts=0,
                       blocked_reason="", accepted=None, last_upgrade=MappingProxyType(last)), [*actions, done]
    if s.phase is Phase.STARTING:
        return replace(s, phase=Phase.RUNNING), actions     # STARTING -> RUNNING
    return s, actions


def _on_exited(s: State, fact: p.BinaryExited, cfg: VisorConfig, now: float) -> Result:
    running = MappingProxyType({k: v for k, v in s.running.items() if k != fact.name})
    s = replace(s, running=running)
    emit = Emit.of("binary.exited", name=fact.name, pid=fact.pid, exitcode=fact.exitcode)
    u = s.upgrade
    if _winding_down(s):
        if u and u.step is Step.STOPPING and not running:
            s = replace(s, upgrade=replace(u, down_at=now))
        state, actions = _stop_all(s, cfg, now) if not running else (s, [])
        return state, [emit, *[a for a in actions if not isinstance(a, StopBinaries)]]
    # nobody asked it to stop: a failure
    state, actions = _on_failure(s, f"{fact.name} exited with code {fact.exitcode}", cfg, now)
    return state, [emit, *actions]


def _on_failure(s: State, why: str, cfg: VisorConfig, now: float) -> Result:
    if s.restarts >= cfg.max_restarts:
        # -> STOPPING: give up; exit non-zero once everything is down
        why = f"{why}; all {cfg.max_restarts} restarts used"
        return _stop_all(replace(s, phase=Phase.STOPPING, exit_code=1, reason=why, upgrade=None), cfg, now)
    # -> RESTARTING: every binary goes down, then all come back together after the delay
    n = s.restarts + 1
    s = replace(s, phase=Phase.RESTARTING, restarts=n, upgrade=None, blocked_reason="", reason=why,
                first_budget=False)
    emit = Emit.of("binary.restart_scheduled", delay_s=cfg.restarts_delay_s, restarts=n,
                   max_restarts=cfg.max_restarts)
    state, actions = _stop_all(s, cfg, now)
    return state, [emit, *actions]


def _on_status(s: State, fact: p.UpgradeStatus, cfg: VisorConfig, now: float) -> Result:
    s = replace(s, rpc_failures=0, rpc_counted_at=None)
    actions: list[Action] = []
    u = s.upgrade
    if u and u.step is Step.ANSWERING:
        # the new node answered: the upgrade is over; afterStart is only reported
        if cfg.hook("afterStart"):
            s, actions = _run_hook(s, "afterStart", now)
        else:
            s = replace(s, upgrade=None)
    done = s.last_upgrade["tag"] if s.last_upgrade else None
    if not fact.tag:
        s = replace(s, accepted=None)                # nothing accepted (any more)
    elif s.accepted != (fact.tag, fact.height) and fact.tag != done:
        s = replace(s, accepted=(fact.tag, fact.height), prefetch_failures=0, accepted_ready=False)
        actions.append(Emit.of("upgrade.accepted", tag=fact.tag, height=fact.height))
        if not fact.ready:       # fetch it (auto-install) or verify it now, long before the height
            actions.append(Prefetch(fact.tag, cfg.folder_for(fact.tag)))
    target = cfg.folder_for(fact.tag) if fact.tag else ""
    if fact.ready and target and target != s.folder and s.phase is Phase.RUNNING and not s.upgrade:
        # RUNNING -> UPGRADING: make the folder ready before anything is stopped
        s = replace(s, phase=Phase.UPGRADING, upgrade=Upgrade(fact.tag, fact.height, target, source=s.folder))
        actions += [Emit.of("upgrade.ready", tag=fact.tag, height=fact.height),
                    Prepare(fact.tag, target, cfg.auto_install)]
    return s, actions


def _on_rpc_failed(s: State, error: str, cfg: VisorConfig, now: float) -> Result:
    budget = cfg.max_first_retries if s.first_budget else cfg.max_restart_retries
    # Every failed call is reported; calls within RETRY_SPACING_S of the last counted one belong to the
    # same Go-visor attempt: a budget means time, whatever upgradeStatusIntervalMilliseconds is.
    if s.rpc_counted_at is None or now - s.rpc_counted_at >= RETRY_SPACING_S * 0.95:
        s = replace(s, rpc_failures=s.rpc_failures + 1, rpc_counted_at=now)
    n = s.rpc_failures
    emit = Emit.of("rpc.unreachable", attempt=n, max=budget, error=error)
    if n <= budget:
        return s, [emit]
    # -> STOPPING: the node never answered; stop it and exit non-zero
    why = f"core node did not answer upgrade-status calls for {(n - 1) * RETRY_SPACING_S:g} s ({n} attempts): {error}"
    state, actions = _stop_all(replace(s, phase=Phase.STOPPING, exit_code=1, reason=why, upgrade=None), cfg, now)
    return state, [emit, *actions]


def _on_folder_ready(s: State, cfg: VisorConfig, now: float) -> Result:
    s = replace(s, phase=Phase.UPGRADING, accepted_ready=bool(s.accepted and s.accepted[0] == s.upgrade.tag))
    if cfg.hook("beforeStop"):   # the folder is ready and verified; the old binaries still run
        return _run_hook(s, "beforeStop", now)
    return _stop_after_delay(replace(s, blocked_reason=""), cfg, now)


def _stop_after_delay(s: State, cfg: VisorConfig, now: float) -> Result:
    """Nothing holds the upgrade back any more: it starts (stopDelaySeconds, then the first SIGTERM)."""
    u = s.upgrade
    started = Emit.of("upgrade.started", tag=u.tag, height=u.height, folder=u.folder)
    if cfg.stop_delay_s > 0:
        return replace(s, upgrade=replace(u, step=Step.WAITING)), [started, Schedule("stop", cfg.stop_delay_s)]
    state, actions = _stop_all(replace(s, upgrade=replace(u, step=Step.STOPPING)), cfg, now)
    return state, [started, *actions]
