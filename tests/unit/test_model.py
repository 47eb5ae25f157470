"""A model of supervision: state.step driven by a simulated world, in every order Hypothesis finds.

The world is what the processes really do: runners that start a binary or fail to, report late or
never; binaries that exit (asked or not); timers; the core node's answers and failed calls; the
fetcher's ready or blocked folders; the data node's history segment; hooks that pass or fail; the
operator's stop. The broker's side of each action is simulated as the broker carries it out. After
every step the invariants below must hold; `never_stuck` drains what the world still owes and must
end with every expected binary running, or in Exit.

Runs derandomised with a fixed budget in ./run-tests; `--hypothesis-profile=deep` walks much further
(see tests/conftest.py). A counterexample is a bug: keep it as a plain test in test_state.py.
"""

from __future__ import annotations

import copy

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from visor import protocol as p
from visor.config import VisorConfig
from visor.facts import (Boot, Emit, Exit, Launching, Prefetch, Prepare, QuerySegment, RunHook, Schedule,
                         StartBinaries, StopBinaries, StopRequested, SwitchCurrent, Timer)
from visor.state import IN_FLIGHT, Phase, State, Step, in_flight, step

TAGS = ("", "v2", "v3")
HOOK = {"path": "/bin/true", "args": [], "timeout_s": 5, "required": True}
RECORDED_DOWN_AT = -1.0          # a crashed run's afterStop began 1 s before this one's clock starts


def config(restarts_delay_s: int, stop_delay_s: int, hooks: dict[str, bool]) -> VisorConfig:
    """hooks: name -> required."""
    return VisorConfig(max_restarts=2, restarts_delay_s=restarts_delay_s, stop_delay_s=stop_delay_s,
                       max_first_retries=3, max_restart_retries=1, auto_install=True,
                       upgrade_folders={"v3": "v3-patched"},
                       upgrade_hooks={name: {**HOOK, "required": req} for name, req in hooks.items()})


class World:
    """The processes, as they really are; the broker's side of every action."""

    def __init__(self, cfg: VisorConfig, names: frozenset[str]):
        self.cfg, self.names = cfg, names
        self.state, self.now = State(), 0.0
        self.alive: dict[str, int] = {}        # started and not yet reported gone: a runner holds it
        self.launching: set[str] = set()       # told to start, not yet reported
        self.timers: set[str] = set()
        self.folders_owed: set[str] = set()    # tags the fetcher was asked about
        self.segment_owed = False
        self.hook_owed: str | None = None
        self.hook_given_up = False             # the upgrade the owed hook belongs to was given up since
        self.ready: set[str] = set()           # folders reported ready
        self.current = "genesis"
        self.stop_requested = False
        self.exited: Exit | None = None
        self.restarts_this_attempt = 0
        self.next_pid = 100

    def clone(self) -> World:
        """A copy to drain: the state is immutable, the world's own tables are copied."""
        other = copy.copy(self)
        other.alive, other.launching, other.timers = dict(self.alive), set(self.launching), set(self.timers)
        other.folders_owed, other.ready = set(self.folders_owed), set(self.ready)
        return other

    def feed(self, fact) -> None:
        queue = [fact]
        while queue and self.exited is None:
            self.now += 0.01
            self.state, actions = step(self.state, queue.pop(0), self.cfg, self.now)
            self.hook_given_up |= bool(self.hook_owed) and self.state.upgrade is None
            for action in actions:
                queue += self.execute(action)

    def execute(self, a) -> list:
        """Carries out one action as the broker does; returns the facts it feeds back."""
        match a:
            case StartBinaries():
                both = (self.alive.keys() | self.launching) & self.names
                assert not both, f"two copies: {sorted(both)} started again"
                self.launching |= self.names
                self.restarts_this_attempt = 0
                return [Launching(self.names)]
            case StopBinaries():
                pass                               # runners SIGTERM theirs; exits are the world's to report
            case SwitchCurrent(folder=folder):
                assert not self.alive and not self.launching, f"current switched while {self.alive} run"
                assert folder in self.ready, f"current switched to {folder}, never reported ready"
                self.current = folder
            case Prepare(tag=tag) | Prefetch(tag=tag):
                self.folders_owed.add(tag)
            case QuerySegment():                  # a restart attempt begins with the data node's answer
                self.segment_owed = True
                self.restarts_this_attempt = 0
            case RunHook(hook=hook):
                # a hook still owed is legal only when its upgrade was given up (a crash-restart): the hooks
                # worker ends it for the new one, and its end never reaches step (visor/hookrun.py)
                assert self.hook_owed is None or self.hook_given_up, "two hooks at once in one upgrade"
                self.hook_owed, self.hook_given_up = hook, False
            case Schedule(name=name, after_s=after_s):
                if after_s <= 0:
                    return [Timer(name)]
                self.timers.add(name)
            case Emit(type="upgrade.completed", fields=fields):
                down = fields["downtime_ms"]           # measured, or unknown after a crash: never made up
                assert down is None or 0 <= down <= (self.now - RECORDED_DOWN_AT) * 1000 + 1e-6, f"downtime {down} ms"
            case Emit(type="binary.restart_scheduled", fields=fields):
                assert fields["restarts"] <= self.cfg.max_restarts
                self.restarts_this_attempt += 1
                assert self.restarts_this_attempt == 1, "one failed attempt cost two restarts"
            case Exit(code=code):
                assert not self.alive and not self.launching, f"exit while {self.alive or self.launching} run"
                assert code != 0 or self.stop_requested, "exit 0 without a stop request"
                self.exited = a
        return []

    # what the world can do next; each returns False when it cannot

    def start_reported(self, name: str, ok: bool) -> None:
        self.launching.discard(name)
        if ok:
            self.next_pid += 1
            self.alive[name] = self.next_pid
            self.feed(p.BinaryStarted(name=name, pid=self.next_pid, path=f"/h/{name}", args=[], started_at=0.0))
        else:
            self.feed(p.StartFailed(name=name, error="no such file"))

    def binary_exits(self, name: str, code: int) -> None:
        self.feed(p.BinaryExited(name=name, pid=self.alive.pop(name), exitcode=code))

    def folder_answered(self, tag: str, ok: bool) -> None:
        self.folders_owed.discard(tag)
        folder = self.cfg.folder_for(tag)
        if ok:
            self.ready.add(folder)
            self.feed(p.FolderReady(tag=tag, folder=folder))
        else:
            self.feed(p.FolderBlocked(tag=tag, folder=folder, reason="version mismatch"))

    def hook_finished(self, ok: bool) -> None:
        hook, self.hook_owed = self.hook_owed, None
        self.feed(p.HookFinished(hook=hook, ok=ok, duration_ms=1.0, error="" if ok else "exited with code 1"))

    def settled(self) -> bool:
        s = self.state
        return s.phase is Phase.RUNNING and not self.launching and self.names <= self.alive.keys() \
            and dict(s.running) == self.alive and (s.upgrade is None or s.upgrade.step is Step.PREPARING)

    def drain(self) -> None:
        """Delivers what the world owes, the happy way, until it settles or exits."""
        for _ in range(300):
            if self.exited is not None or self.settled():
                return
            s = self.state
            if self.launching:
                self.start_reported(sorted(self.launching)[0], True)
            elif self.hook_owed:
                self.hook_finished(True)
            elif self.folders_owed:
                self.folder_answered(sorted(self.folders_owed)[0], True)
            elif self.segment_owed:
                self.segment_owed = False
                self.feed(p.Segment(height=None))
            elif self.alive and (s.phase in (Phase.STOPPING, Phase.RESTARTING)
                                 or (s.upgrade and s.upgrade.step is Step.STOPPING)):
                self.binary_exits(sorted(self.alive)[0], 0)
            elif self.timers:
                self.feed(Timer(sorted(self.timers)[0]))
                self.timers.discard(sorted(self.timers)[0])
            elif "vega" in self.alive:
                self.feed(p.UpgradeStatus(tag="", height=0, ready=False))   # the node answers
            else:
                raise AssertionError(f"stuck: {s}")
        raise AssertionError(f"did not settle: {self.state}")


class Supervision(RuleBasedStateMachine):
    @initialize(names=st.sampled_from([frozenset({"vega"}), frozenset({"vega", "data_node"})]),
                delay=st.sampled_from([0, 5]), stop_delay=st.sampled_from([0, 2]),
                hooks=st.dictionaries(st.sampled_from(["beforeStop", "afterStop", "afterStart"]), st.booleans()),
                boot=st.sampled_from(["fresh", "adopted", "adopted-partly", "upgrading", "upgrading-adopted",
                                      "switched", "switched-adopted"]),
                restarts=st.integers(0, 2), last_done=st.booleans(), down_known=st.booleans())
    def boot(self, names, delay, stop_delay, hooks, boot, restarts, last_done, down_known):
        self.w = w = World(config(delay, stop_delay, hooks), names)
        pending = {"tag": "v2", "folder": "v2", "height": 50}
        if down_known:                             # killed in its afterStop hook: when the old node went down
            pending["down_at"] = RECORDED_DOWN_AT
        adopted = {}
        if boot in ("adopted", "upgrading-adopted", "switched-adopted"):
            adopted = {n: 10 + i for i, n in enumerate(sorted(names))}
        elif boot == "adopted-partly":
            adopted = {"vega": 10}
        w.alive = dict(adopted)
        w.ready.add("v2")                          # the previous run verified the folder it was upgrading to
        folder = "v2" if boot.startswith("switched") else "genesis"
        w.current = folder
        last = {"tag": "v2", "height": 50, "folder": "v2", "downtime_ms": 3.0} if last_done else None
        w.feed(Boot(folder, adopted=adopted, expected=names, restarts=restarts if adopted else 0,
                    upgrade=pending if boot.startswith(("upgrading", "switched")) else None, last_upgrade=last))

    @precondition(lambda self: self.w.exited is None and self.w.launching)
    @rule(data=st.data(), ok=st.booleans())
    def runner_reports_start(self, data, ok):
        self.w.start_reported(data.draw(st.sampled_from(sorted(self.w.launching))), ok)

    @precondition(lambda self: self.w.exited is None and self.w.alive)
    @rule(data=st.data(), code=st.integers(-9, 2))
    def binary_exits(self, data, code):
        self.w.binary_exits(data.draw(st.sampled_from(sorted(self.w.alive))), code)

    @precondition(lambda self: self.w.exited is None)
    @rule(name=st.sampled_from(["vega", "data_node"]), pid=st.integers(1, 5))
    def stale_report(self, name, pid):
        before = self.w.state
        self.w.feed(p.BinaryExited(name=name, pid=pid, exitcode=0))    # a pid that is not (any more) ours
        assert self.w.state == before

    @precondition(lambda self: self.w.exited is None and self.w.timers)
    @rule(data=st.data())
    def timer_fires(self, data):
        name = data.draw(st.sampled_from(sorted(self.w.timers)))
        self.w.timers.discard(name)
        self.w.feed(Timer(name))

    @rule(seconds=st.sampled_from([0.1, 1.0, 2.5, 30.0]))      # always possible, after Exit too
    def time_passes(self, seconds):
        self.w.now += seconds

    @precondition(lambda self: self.w.exited is None and "vega" in self.w.alive)
    @rule(tag=st.sampled_from(TAGS), ready=st.booleans())
    def node_answers(self, tag, ready):
        self.w.feed(p.UpgradeStatus(tag=tag, height=50 if tag else 0, ready=ready and bool(tag)))

    @precondition(lambda self: self.w.exited is None)
    @rule()
    def status_call_fails(self):
        self.w.now += 1.0
        self.w.feed(p.RpcFailed(error="connection refused"))

    @precondition(lambda self: self.w.exited is None and self.w.folders_owed)
    @rule(data=st.data(), ok=st.booleans())
    def fetcher_answers(self, data, ok):
        self.w.folder_answered(data.draw(st.sampled_from(sorted(self.w.folders_owed))), ok)

    @precondition(lambda self: self.w.exited is None and self.w.segment_owed)
    @rule(answer=st.sampled_from([(None, ""), (120, ""), (None, "exit status 1")]))
    def data_node_answers(self, answer):
        self.w.segment_owed = False
        self.w.feed(p.Segment(height=answer[0], error=answer[1]))

    @precondition(lambda self: self.w.exited is None and self.w.hook_owed)
    @rule(ok=st.booleans())
    def hook_finishes(self, ok):
        self.w.hook_finished(ok)

    @precondition(lambda self: self.w.exited is None)
    @rule(hooks=st.dictionaries(st.sampled_from(["beforeStop", "afterStop", "afterStart"]), st.booleans()))
    def operator_edits_the_hooks(self, hooks):     # a hot reload: a hook fixed, made optional or removed
        c = self.w.cfg
        self.w.cfg = config(c.restarts_delay_s, c.stop_delay_s, hooks)

    @precondition(lambda self: self.w.exited is None)
    @rule()
    def operator_stops(self):
        self.w.stop_requested = True
        self.w.feed(StopRequested("SIGTERM"))

    @invariant()
    def restarts_within_budget(self):
        assert self.w.state.restarts <= self.w.cfg.max_restarts

    @invariant()
    def the_state_knows_what_runs(self):
        s, w = self.w.state, self.w
        assert s.running.keys() <= w.alive.keys() | set()
        assert set(s.launching) == w.launching, f"state launching {s.launching}, world {w.launching}"

    @invariant()
    def a_crash_now_resumes_from_what_the_state_file_would_hold(self):
        s = self.w.state
        pending, u = in_flight(s), s.upgrade
        assert (pending is not None) == bool(u and u.step in IN_FLIGHT)
        if pending is not None:    # the old node's stop is recorded only while afterStop runs (a slow step)
            assert (pending["tag"], pending["folder"], pending["height"]) == (u.tag, u.folder, u.height)
            assert ("down_at" in pending) == (u.step is Step.AFTER_STOP and u.down_at is not None)

    @invariant()
    def never_stuck(self):
        self.w.clone().drain()


TestSupervision = Supervision.TestCase


def test_a_hook_of_an_upgrade_given_up_may_be_owed_when_the_next_upgrade_asks_for_its_own():
    # found by review (issue 13): the old node crashes while beforeStop runs, is restarted, and the upgrade
    # begins again; the model took the second RunHook for two hooks at once in one upgrade
    w = World(config(0, 0, {"beforeStop": True}), frozenset({"vega"}))
    w.feed(Boot("genesis"))
    w.start_reported("vega", True)
    for attempt in (1, 2):
        w.feed(p.UpgradeStatus(tag="v2", height=50, ready=True))
        w.folder_answered("v2", True)
        assert w.hook_owed == "beforeStop"
        if attempt == 1:
            w.binary_exits("vega", 1)                # restarted at once (restartsDelaySeconds = 0)
            w.start_reported("vega", True)
    w.drain()
    assert w.current == "v2"
