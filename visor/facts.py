"""The words of state.step: the state it changes, what goes in besides worker reports (facts) and
what comes out (actions).

Plain frozen data, no behaviour: the broker holds a State, builds facts from what it sees (a timer, a
signal, the previous run's state file) and carries out actions. Worker reports (visor.protocol) are
facts too. state.step alone makes a new State.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Mapping

# --- facts the broker feeds in (besides worker reports from protocol) ---------------------------


@dataclass(frozen=True)
class Boot:
    """The broker has started. What it found of a previous run comes with it."""
    folder: str                          # the folder `current` points at
    snapshot_height: int | None = None   # kept for callers that know only a height (see `upgrade`)
    adopted: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # name -> pid left running
    expected: frozenset[str] = frozenset()   # the binaries of the current run-config
    restarts: int = 0                    # the restart count, carried over
    last_upgrade: Mapping[str, Any] | None = None    # the last completed upgrade, for status (and not re-accepting it)
    # in_flight() of the previous run: {"tag", "folder", "height", "source"} (no "source" in older state files)
    upgrade: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Launching:                 # the broker has sent StartBinary for these names
    names: frozenset[str]


@dataclass(frozen=True)
class Timer:
    name: str                    # "restart", "stop", "retry-upgrade", "retry-hook", "prefetch"


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
class RunHook:                   # run an upgrade hook (config.toml [upgradeHooks.<hook>]) in the hooks worker
    hook: str                    # beforeStop | afterStop | afterStart
    tag: str
    height: int
    source: str                  # the folder upgraded from
    folder: str                  # the folder upgraded to


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


Action = StartBinaries | StopBinaries | SwitchCurrent | Prepare | Prefetch | QuerySegment | RunHook | Schedule \
    | Emit | Exit


# --- the state ---------------------------------------------------------------------------------

class Phase(StrEnum):            # exactly the values `visor status` shows
    STARTING = "starting"
    RUNNING = "running"
    UPGRADING = "upgrading"
    RESTARTING = "restarting"
    BLOCKED = "blocked"
    STOPPING = "stopping"


class Step(StrEnum):             # where an upgrade is, in order
    PREPARING = "preparing"      # the fetcher makes the folder ready and verifies it
    BEFORE_STOP = "beforeStop"   # the beforeStop hook runs; the old binaries still run
    WAITING = "waiting"          # stopDelaySeconds
    STOPPING = "stopping"        # old binaries going down
    AFTER_STOP = "afterStop"     # the afterStop hook runs; nothing runs, `current` not switched yet
    STARTING = "starting"        # `current` switched; new binaries coming up
    ANSWERING = "answering"      # the new binaries run (upgrade.completed); waiting for the node's first answer
    AFTER_START = "afterStart"   # the afterStart hook runs; only reported


@dataclass(frozen=True)
class Upgrade:
    tag: str
    height: int
    folder: str                  # folder name inside the home
    source: str = ""             # the folder upgraded from
    step: Step = Step.PREPARING
    down_at: float | None = None         # when the last old binary was gone
    downtime_ms: float | None = None     # set when the first new binary started
    hook_at: float | None = None         # when the running hook started (status shows it)


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
    # As the Go visor: failed upgrade-status calls count against maxNumberOfFirstConnectionRetries until
    # a crash-restart has happened since the start or the last upgrade, then against the restart budget.
    first_budget: bool = True
    rpc_failures: int = 0        # counted failures in a row, at most one per RETRY_SPACING_S
    rpc_counted_at: float | None = None
    accepted: tuple[str, int] | None = None
    upgrade: Upgrade | None = None
    blocked_reason: str = ""
    last_upgrade: Mapping[str, Any] | None = None
    prefetch_failures: int = 0
    accepted_ready: bool = False     # the accepted release's folder was made ready and verified


Result = tuple[State, list[Action]]
