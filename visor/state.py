"""The broker's state and the one function that changes it: step(state, fact, cfg, now).

Pure: no sockets, no clock (the broker passes `now`, a monotonic time), no os. Facts come in (worker
reports, timers, signals); a new state and a list of actions come out, and the broker carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Mapping

from visor import protocol as p
from visor.config import VisorConfig

UPGRADE_RETRY_S = 3              # a blocked upgrade is tried again this often
PREFETCH_BACKOFF_S = (5, 10, 20, 40, 80, 160, 300)


class Phase(StrEnum):            # exactly the values `visor status` shows
    STARTING = "starting"
    RUNNING = "running"
    UPGRADING = "upgrading"
    RESTARTING = "restarting"
    BLOCKED = "blocked"
    STOPPING = "stopping"


class Step(StrEnum):             # where an upgrade is
    PREPARING = "preparing"      # the fetcher makes the folder ready and verifies it
    WAITING = "waiting"          # stopDelaySeconds
    STOPPING = "stopping"        # old binaries going down
    STARTING = "starting"        # `current` switched; new binaries coming up


@dataclass(frozen=True)
class Upgrade:
    tag: str
    height: int
    folder: str                  # folder name inside the home
    step: Step = Step.PREPARING
    down_at: float | None = None         # when the last old binary was gone
    downtime_ms: float | None = None     # set when the first new binary started


@dataclass(frozen=True)
class State:
    phase: Phase = Phase.STARTING
    folder: str = "genesis"      # the folder `current` points at
    expected: frozenset[str] = frozenset()                  # binaries of the current run-config
    running: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # name -> pid, up
    launching: frozenset[str] = frozenset()                 # told to start, not yet started or failed
    restarts: int = 0
    exit_code: int | None = None     # decided early, applied once every binary is down
    reason: str = ""
    # Failed upgrade-status calls count against maxNumberOfFirstConnectionRetries from a start or an
    # upgrade (a node loading a snapshot can be slow) until the node answers; against the restart
    # budget after it has answered or after a crash-restart, as the Go visor does.
    first_budget: bool = True
    rpc_failures: int = 0        # failed calls in a row, since the last answer or start
    accepted: tuple[str, int] | None = None
    upgrade: Upgrade | None = None
    blocked_reason: str = ""
    last_upgrade: Mapping[str, Any] | None = None
    prefetch_failures: int = 0


# --- facts the broker feeds in (besides worker reports from protocol) ---------------------------

@dataclass(frozen=True)
class Boot:
    folder: str                          # what `current` points at
    snapshot_height: int | None = None   # an upgrade switched `current` just before a crash
    adopted: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # name -> pid left running
    expected: frozenset[str] = frozenset()              # binaries of the current run-config
    restarts: int = 0                    # carried over from the state file
    upgrade: dict | None = None          # the "pending" record {"tag", "folder", "height"} in flight


@dataclass(frozen=True)
class Launching:                 # the broker has sent StartBinary for these names
    names: frozenset[str]


@dataclass(frozen=True)
class Timer:
    name: str                    # "restart", "stop", "retry-upgrade", "prefetch"


@dataclass(frozen=True)
class StopRequested:
    signal: str


# --- actions the broker carries out ----------------------------------------------------------

@dataclass(frozen=True)
class StartBinaries:
    folder: str
    snapshot_height: int | None = None


@dataclass(frozen=True)
class StopBinaries:
    pass


@dataclass(frozen=True)
class SwitchCurrent:
    folder: str


@dataclass(frozen=True)
class Prepare:                   # ask the fetcher to make the folder ready (and verify it)
    tag: str
    folder: str
    fetch: bool


@dataclass(frozen=True)
class Prefetch:                  # like Prepare, ahead of the upgrade height; nothing waits on it
    tag: str
    folder: str


@dataclass(frozen=True)
class QuerySegment:
    pass


@dataclass(frozen=True)
class Schedule:
    name: str
    after_s: float


@dataclass(frozen=True)
class Emit:
    type: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, type_: str, **fields) -> Emit:
        return cls(type_, fields)


@dataclass(frozen=True)
class Exit:
    code: int
    reason: str


Action = StartBinaries | StopBinaries | SwitchCurrent | Prepare | Prefetch | QuerySegment | Schedule | Emit | Exit
Result = tuple[State, list[Action]]


def step(s: State, fact: Any, cfg: VisorConfig, now: float) -> Result:
    """The only way the broker's state changes."""
    match fact:
        case Boot(folder=folder, adopted=adopted) if adopted:
            # (issue 12, minimal; the lead owns the full semantics) STARTING -> RUNNING with what still runs
            return replace(s, folder=folder, phase=Phase.RUNNING, running=MappingProxyType(dict(adopted)),
                           expected=fact.expected or frozenset(adopted), restarts=fact.restarts), []
        case Boot(folder=folder, snapshot_height=height):
            return replace(s, folder=folder, restarts=fact.restarts), [StartBinaries(folder, height)]
        case StopRequested(signal=sig) if s.phase is not Phase.STOPPING:
            # any phase -> STOPPING: a clean stop, exit 0 once every binary is down
            s = replace(s, phase=Phase.STOPPING, exit_code=0, reason=f"received {sig}", upgrade=None)
            state, actions = _stop_all(s, cfg)
            return state, [Emit.of("visor.stopping"), *actions]
        case Launching(names=names):
            return replace(s, expected=names, launching=names), []
        case p.BinaryStarted():
            return _on_started(s, fact, now)
        case p.BinaryExited() if s.running.get(fact.name) == fact.pid:
            return _on_exited(s, fact, cfg, now)
        case p.StartFailed(name=name) if s.phase is Phase.STOPPING:
            s = replace(s, launching=s.launching - {name})
            return _stop_all(s, cfg)
        case p.StartFailed(name=name, error=error):
            s = replace(s, launching=s.launching - {name})
            return _on_failure(s, f"{name} could not start: {error}", cfg, now)
        case p.UpgradeStatus():
            return _on_status(s, fact, cfg)
        case p.RpcFailed(error=error) if s.phase in (Phase.STARTING, Phase.RUNNING, Phase.BLOCKED):
            return _on_rpc_failed(s, error, cfg, now)
        case p.FolderReady(tag=tag) if s.upgrade and s.upgrade.tag == tag and s.upgrade.step is Step.PREPARING:
            return _on_folder_ready(s, cfg)
        case p.FolderBlocked(tag=tag, reason=why) if s.upgrade and s.upgrade.tag == tag \
                and s.upgrade.step is Step.PREPARING:
            # UPGRADING -> BLOCKED: nothing was stopped; try again until an operator fixes the folder
            emit = [Emit.of("upgrade.blocked", tag=tag, reason=why)] if why != s.blocked_reason else []
            return replace(s, phase=Phase.BLOCKED, blocked_reason=why), \
                [*emit, Schedule("retry-upgrade", UPGRADE_RETRY_S)]
        case p.FolderBlocked(tag=tag) if s.accepted and s.accepted[0] == tag and not s.upgrade:
            delay = PREFETCH_BACKOFF_S[min(s.prefetch_failures, len(PREFETCH_BACKOFF_S) - 1)]
            return replace(s, prefetch_failures=s.prefetch_failures + 1), [Schedule("prefetch", delay)]
        case Timer(name="retry-upgrade") if s.phase is Phase.BLOCKED and s.upgrade:
            return s, [Prepare(s.upgrade.tag, s.upgrade.folder, cfg.auto_install)]
        case Timer(name="prefetch") if s.accepted and not s.upgrade:
            tag = s.accepted[0]
            return s, [Prefetch(tag, folder_name(tag, cfg))]
        case Timer(name="stop") if s.upgrade and s.upgrade.step is Step.WAITING:
            return _stop_all(replace(s, upgrade=replace(s.upgrade, step=Step.STOPPING)), cfg)
        case Timer(name="restart") if s.phase is Phase.RESTARTING and not s.running:
            if "data_node" in s.expected:
                return s, [QuerySegment()]
            return _start(s, s.folder, None)
        case p.Segment(height=height, error=error) if s.phase is Phase.RESTARTING and not s.running:
            if error:
                return _on_failure(s, f"data node history segment: {error}", cfg, now)
            return _start(s, s.folder, height)
    return s, []                 # any other fact changes nothing


def folder_name(tag: str, cfg: VisorConfig) -> str:
    return cfg.upgrade_folders.get(tag, tag)


def _start(s: State, folder: str, snapshot_height: int | None) -> Result:
    # RESTARTING -> STARTING (or UPGRADING stays, its step now STARTING)
    phase = Phase.UPGRADING if s.upgrade else Phase.STARTING
    return replace(s, phase=phase, folder=folder, rpc_failures=0, first_budget=bool(s.upgrade)), \
        [StartBinaries(folder, snapshot_height)]


def _stop_all(s: State, cfg: VisorConfig) -> Result:
    if s.running:
        return s, [StopBinaries()]
    if s.launching:
        return s, []             # one is being started: it is stopped as soon as it reports
    return _all_down(s, cfg)


def _all_down(s: State, cfg: VisorConfig) -> Result:
    """Every binary has stopped: what comes next depends on why they were stopped."""
    if s.phase is Phase.STOPPING:
        return s, [Exit(s.exit_code or 0, s.reason)]
    if s.phase is Phase.RESTARTING:
        return s, [Schedule("restart", cfg.restarts_delay_s)]
    if s.upgrade and s.upgrade.step is Step.STOPPING:
        u = s.upgrade
        # UPGRADING: old binaries gone -> switch `current` and start the new ones from the upgrade block
        s = replace(s, upgrade=replace(u, step=Step.STARTING))
        state, actions = _start(s, u.folder, u.height)
        return state, [SwitchCurrent(u.folder), *actions]
    return s, []


def _on_started(s: State, fact: p.BinaryStarted, now: float) -> Result:
    s = replace(s, running=MappingProxyType({**s.running, fact.name: fact.pid}),
                launching=s.launching - {fact.name})
    actions: list[Action] = [Emit.of("binary.started", name=fact.name, pid=fact.pid, path=fact.path,
                                     args=list(fact.args))]
    if s.phase is Phase.STOPPING:
        return s, [*actions, StopBinaries()]    # it started as we were stopping: stop it too
    u = s.upgrade
    if u and u.step is Step.STARTING and u.downtime_ms is None:
        u = replace(u, downtime_ms=round((now - (u.down_at or now)) * 1000, 3))
        s = replace(s, upgrade=u)
    if not s.expected <= s.running.keys():
        return s, actions
    if u and u.step is Step.STARTING:
        # UPGRADING -> RUNNING: the upgrade is done; a success resets the restart count
        last = {"tag": u.tag, "height": u.height, "folder": u.folder, "downtime_ms": u.downtime_ms}
        done = Emit.of("upgrade.completed", tag=u.tag, height=u.height, downtime_ms=u.downtime_ms)
        return replace(s, phase=Phase.RUNNING, upgrade=None, restarts=0, blocked_reason="",
                       last_upgrade=MappingProxyType(last)), [*actions, done]
    if s.phase is Phase.STARTING:
        return replace(s, phase=Phase.RUNNING), actions     # STARTING -> RUNNING
    return s, actions


def _on_exited(s: State, fact: p.BinaryExited, cfg: VisorConfig, now: float) -> Result:
    running = MappingProxyType({k: v for k, v in s.running.items() if k != fact.name})
    s = replace(s, running=running)
    emit = Emit.of("binary.exited", name=fact.name, pid=fact.pid, exitcode=fact.exitcode)
    u = s.upgrade
    if s.phase is Phase.STOPPING or s.phase is Phase.RESTARTING or (u and u.step is Step.STOPPING):
        if u and u.step is Step.STOPPING and not running:
            s = replace(s, upgrade=replace(u, down_at=now))
        state, actions = _stop_all(s, cfg) if not running else (s, [])
        return state, [emit, *[a for a in actions if not isinstance(a, StopBinaries)]]
    # nobody asked it to stop: a failure
    state, actions = _on_failure(s, f"{fact.name} exited with code {fact.exitcode}", cfg, now)
    return state, [emit, *actions]


def _on_failure(s: State, why: str, cfg: VisorConfig, now: float) -> Result:
    if s.restarts >= cfg.max_restarts:
        # -> STOPPING: give up; exit non-zero once everything is down
        why = f"{why}; all {cfg.max_restarts} restarts used"
        return _stop_all(replace(s, phase=Phase.STOPPING, exit_code=1, reason=why, upgrade=None), cfg)
    # -> RESTARTING: every binary goes down, then all come back together after the delay
    n = s.restarts + 1
    s = replace(s, phase=Phase.RESTARTING, restarts=n, upgrade=None, blocked_reason="", reason=why)
    emit = Emit.of("binary.restart_scheduled", delay_s=cfg.restarts_delay_s, restarts=n,
                   max_restarts=cfg.max_restarts)
    state, actions = _stop_all(s, cfg)
    return state, [emit, *actions]


def _on_status(s: State, fact: p.UpgradeStatus, cfg: VisorConfig) -> Result:
    s = replace(s, first_budget=False, rpc_failures=0)
    actions: list[Action] = []
    if fact.tag and s.accepted != (fact.tag, fact.height):
        s = replace(s, accepted=(fact.tag, fact.height), prefetch_failures=0)
        actions.append(Emit.of("upgrade.accepted", tag=fact.tag, height=fact.height))
        if not fact.ready:       # fetch it (auto-install) or verify it now, long before the height
            actions.append(Prefetch(fact.tag, folder_name(fact.tag, cfg)))
    target = folder_name(fact.tag, cfg) if fact.tag else ""
    if fact.ready and target and target != s.folder and s.phase is Phase.RUNNING and not s.upgrade:
        # RUNNING -> UPGRADING: make the folder ready before anything is stopped
        s = replace(s, phase=Phase.UPGRADING, upgrade=Upgrade(fact.tag, fact.height, target))
        actions += [Emit.of("upgrade.ready", tag=fact.tag, height=fact.height),
                    Prepare(fact.tag, target, cfg.auto_install)]
    return s, actions


def _on_rpc_failed(s: State, error: str, cfg: VisorConfig, now: float) -> Result:
    budget = cfg.max_first_retries if s.first_budget else cfg.max_restart_retries
    n = s.rpc_failures + 1
    s = replace(s, rpc_failures=n)
    emit = Emit.of("rpc.unreachable", attempt=n, max=budget, error=error)
    if n <= budget:
        return s, [emit]
    # -> STOPPING: the node never answered; stop it and exit non-zero
    why = f"core node did not answer {n} upgrade-status calls in a row: {error}"
    state, actions = _stop_all(replace(s, phase=Phase.STOPPING, exit_code=1, reason=why, upgrade=None), cfg)
    return state, [emit, *actions]


def _on_folder_ready(s: State, cfg: VisorConfig) -> Result:
    u = s.upgrade
    started = Emit.of("upgrade.started", tag=u.tag, height=u.height, folder=u.folder)
    s = replace(s, phase=Phase.UPGRADING, blocked_reason="")
    if cfg.stop_delay_s > 0:
        return replace(s, upgrade=replace(u, step=Step.WAITING)), [started, Schedule("stop", cfg.stop_delay_s)]
    state, actions = _stop_all(replace(s, upgrade=replace(u, step=Step.STOPPING)), cfg)
    return state, [started, *actions]
