"""What a new `visor run` does with what the previous run left running, before it starts anything.

The state file (home.state_file, written by the broker) lists the previous run's runners (pid,
start time, secret socket identity) and binaries (pid, start time, path, args). Runners outlive
their broker (workers/runner.py): `adopt` waits a bounded time for the recorded ones still alive
to say hello on the worker socket, welcomes them, and takes their binaries on as they are: same
pids, no signal. Whatever does not come back is ended cleanly (stopper.end: SIGTERM, SIGKILL after
stopSignalTimeoutSeconds) before anything is started:
- a recorded runner that stays silent, or speaks another protocol version (it cannot be commanded),
  and its binary;
- nothing else recorded: a recorded binary whose runner was already gone (our child after `visor restart`, or init's
  when its runner died too) is adopted by a new runner, never stopped for that;
- a process running a binary of the current run-config that nothing records (a runner and its
  broker both killed between the start and its record): looked for only after an unclean end.
Never two copies. A pid is never signalled unless its recorded start time matches (stopper.pin).

It reads the state file and the worker socket and ends processes; it writes nothing and decides
nothing about what runs next: the broker writes the state file and feeds Boot to state.step.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import zmq

from visor import protocol as p, stopper
from visor.binaries import TrackedBinary, runs

log = logging.getLogger("visor")
ADOPT_WAIT_S = 3.0               # a live runner says hello within ~0.6 s (100 ms reconnect + 0.5 s hello)


@dataclass
class Found:
    binaries: dict[str, TrackedBinary] = field(default_factory=dict)   # held by runners that came back
    orphans: dict[str, TrackedBinary] = field(default_factory=dict)    # no runner: a new one adopts each
    exits: list[p.BinaryExited] = field(default_factory=list)          # ended while no broker was up

    def pids(self) -> dict[str, int]:
        return {name: b.pid for name, b in {**self.binaries, **self.orphans}.items()}


def unclean(record: dict) -> bool:
    """The previous run did not end cleanly: its state file still lists runners or binaries."""
    return bool(record.get("runners") or record.get("binaries"))


def adopt(record: dict, sockets, pool, stop_timeout_s: float, expected: dict[str, tuple[str, list[str]]]) -> Found:
    """expected: name -> (path, args) of the binaries the current run-config would start."""
    runners = {name: r for name, r in (record.get("runners") or {}).items() if isinstance(r, dict)}
    pinned = {name: proc for name, r in runners.items() if (proc := stopper.pin(r.get("pid", 0), r.get("create_time")))}
    holding, exits, foreign = _wait_for(sockets, {runners[n]["identity"]: n for n in pinned}, pinned)
    found = Found()
    to_kill, ended = [], set()                   # ended: binaries whose runner we end (so them too)
    for name, proc in pinned.items():
        r, h = runners[name], holding.get(name)
        if h is not None and name not in foreign and not proc.ended() and pool.adopt(
                name, r["pid"], r["identity"], r["create_time"]) is not None:
            found.binaries[h.name] = TrackedBinary(h.name, h.pid, h.path, list(h.args), h.started_at, r["pid"],
                                                   h.create_time)
            if name in exits:
                found.exits.append(exits[name])
            proc.close()
            continue
        if proc.ended() and name not in foreign:  # dead (a zombie init has not reaped): its binary is adopted
            proc.close()
            continue
        why = f"speaks protocol version {foreign[name]} (this visor: {p.VERSION}), so it cannot be commanded" \
            if name in foreign else f"did not come back within {ADOPT_WAIT_S:g}s"
        log.warning("%s (pid %d) of the previous run %s: ending it; its binary is stopped and started again",
                    name, proc.pid, why)
        to_kill.append(proc)                     # its binary is ended cleanly below, not through it
        ended.add(name.partition(":")[2])
    stopper.kill(to_kill)                        # gone before we ask who is whose parent
    held = {b.pid for b in found.binaries.values()}
    to_end = []
    for name, r in (record.get("binaries") or {}).items():
        if not isinstance(r, dict) or r.get("pid") in held:
            continue
        if (proc := stopper.pin(r.get("pid", 0), r.get("create_time"), group=True)) is None:
            continue
        if name in ended:
            log.warning("%s (pid %d) of the previous run: its runner did not come back; stopping it before "
                        "anything starts", name, proc.pid)
            to_end.append(proc)
            continue
        # handed over to us (`visor restart`), or init's (its runner and our predecessor both died): a
        # healthy node is never stopped for that; a new runner adopts it (init's: its exit code unknown)
        if _parent(proc.pid) != os.getpid():
            log.warning("%s (pid %d) of the previous run lost its runner and is no longer our child: a new "
                        "runner adopts it (its exit code will be unknown)", name, proc.pid)
        found.orphans[name] = TrackedBinary(name, proc.pid, r["path"], list(r["args"]), r["started_at"], 0,
                                            r["create_time"])
        proc.close()
    if unclean(record):
        known = {pr.pid for pr in to_end} | set(found.pids().values())
        for name, (path, args) in expected.items():
            if name not in found.binaries and name not in found.orphans:
                for proc in _running(path, args, known):
                    log.warning("%s (pid %d) runs with no record of a runner: stopping it before anything starts",
                                name, proc.pid)
                    to_end.append(proc)
    stopper.end(to_end, stop_timeout_s, what="binary of the previous run")
    if found.pids():
        _report_ended(record, found)
    return found


def _report_ended(record: dict, found: Found) -> None:
    """Something was adopted, so the node is not started afresh: every other recorded binary (ended
    while no broker was up, with nobody left to tell its code, or ended above) is reported as an exit
    with an unknown code (-1), so that it counts as a failure and the restart policy applies."""
    for name, r in (record.get("binaries") or {}).items():
        if isinstance(r, dict) and name not in found.binaries and name not in found.orphans:
            log.warning("%s (pid %s) of the previous run ended while no visor was up; exit code unknown",
                        name, r.get("pid"))
            found.binaries[name] = TrackedBinary(name, r["pid"], r["path"], list(r["args"]), r["started_at"], 0,
                                                 r["create_time"])
            found.exits.append(p.BinaryExited(name=name, pid=r["pid"], exitcode=-1))


def _wait_for(sockets, waiting: dict[str, str], pinned: dict[str, stopper.Proc]):
    """Reads the worker socket until every live recorded runner has said what it holds, or ADOPT_WAIT_S.
    Returns (name -> Holding, name -> BinaryExited, name -> protocol version of those we cannot command)."""
    holding: dict[str, p.Holding] = {}
    exits: dict[str, p.BinaryExited] = {}
    foreign: dict[str, int] = {}
    deadline = time.monotonic() + ADOPT_WAIT_S
    poller = zmq.Poller()
    poller.register(sockets.workers, zmq.POLLIN)
    while True:
        left = [n for n in waiting.values() if n not in holding and n not in foreign and not pinned[n].ended()]
        remaining_s = deadline - time.monotonic()
        if not left or remaining_s <= 0:
            return holding, exits, foreign
        if not poller.poll(min(remaining_s, 0.1) * 1000):
            continue                             # also a turn to notice a runner that left meanwhile
        for identity, msg in sockets.reports():
            name = waiting.get(identity)
            if name is None:
                continue                         # not a runner we recorded: not heard
            match msg:
                case p.Hello(proto=proto) if proto != p.VERSION:
                    foreign[name] = proto
                case p.Hello():
                    sockets.send(identity, p.Welcome(broker_pid=os.getpid()))
                case p.Holding() if msg.name == name.partition(":")[2]:
                    holding[name] = msg
                case p.BinaryExited() if msg.name == name.partition(":")[2]:
                    exits[name] = msg


def _parent(pid: int) -> int | None:
    fields = stopper.stat_fields(pid)
    return None if fields is None else int(fields[1])


def _running(path: str, args: list[str], known: set[int]) -> list[stopper.Proc]:
    """Processes running `path` with `args` (flags Visor appends allowed after them)."""
    import psutil
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        try:
            if proc.pid not in known and runs(proc.info["cmdline"] or [], path, args):
                if (pinned := stopper.pin(proc.pid, proc.info["create_time"], group=True)) is not None:
                    found.append(pinned)
        except psutil.Error:
            continue
    return found


# --- with no daemon: `visor stop` and `visor status` -----------------------------------------------

def still_running(record: dict) -> dict[str, list[tuple[str, int, float]]]:
    """What the state file records that still runs: {"runners"|"binaries": [(name, pid, started_at)]}."""
    out: dict[str, list[tuple[str, int, float]]] = {"runners": [], "binaries": []}
    for kind in out:
        for name, r in (record.get(kind) or {}).items():
            if isinstance(r, dict) and (proc := stopper.pin(r.get("pid", 0), r.get("create_time"))) is not None:
                if not proc.ended():
                    out[kind].append((name, proc.pid, r.get("started_at") or r["create_time"]))
                proc.close()
    return out


def end_all(record: dict, stop_timeout_s: float) -> int:
    """Ends what a dead daemon left: runners first (SIGKILL: they ignore SIGTERM and hold nothing the
    stop needs), then binaries (SIGTERM, SIGKILL after stop_timeout_s). Returns how many were up."""
    runners = [pr for r in (record.get("runners") or {}).values()
               if isinstance(r, dict) and (pr := stopper.pin(r.get("pid", 0), r.get("create_time")))]
    stopper.kill(runners)
    binaries = [pr for r in (record.get("binaries") or {}).values()
                if isinstance(r, dict) and (pr := stopper.pin(r.get("pid", 0), r.get("create_time"), group=True))]
    stopper.end(binaries, stop_timeout_s, what="binary")
    return len(runners) + len(binaries)
