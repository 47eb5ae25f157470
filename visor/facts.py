"""What goes into state.step besides worker reports (facts) and what comes out of it (actions).

Plain frozen data, no behaviour: the broker builds facts from what it sees (a timer, a signal, the
previous run's state file) and carries out actions. Worker reports (visor.protocol) are facts too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
