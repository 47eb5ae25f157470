"""state.step, fed facts by hand: every decision the broker makes, with no process and no clock."""

from dataclasses import replace

import pytest

from visor import protocol as p
from visor.config import VisorConfig
from visor.state import (Boot, Emit, Exit, Launching, Phase, Prefetch, Prepare, QuerySegment, RunHook, Schedule,
                         StartBinaries, State, Step, StopBinaries, StopRequested, SwitchCurrent, Timer, in_flight,
                         step)

CFG = VisorConfig(max_restarts=2, restarts_delay_s=5, max_first_retries=3, max_restart_retries=1,
                  auto_install=True)


def run(facts, s=None, cfg=CFG, now=100.0):
    """Feeds facts in order; returns the last state and every action, in order."""
    s = s or State()
    actions = []
    for fact in facts:
        s, more = step(s, fact, cfg, now)
        actions += more
    return s, actions


def emitted(actions, type_=None):
    return [a for a in actions if isinstance(a, Emit) and (type_ is None or a.type == type_)]


def started(name="vega", pid=10):
    return p.BinaryStarted(name=name, pid=pid, path=f"/h/genesis/{name}", args=["node"], started_at=1.0)


def exited(name="vega", pid=10, code=1):
    return p.BinaryExited(name=name, pid=pid, exitcode=code)


def up(names=("vega",), pids=(10,)):
    """A state where every binary runs."""
    s, _ = run([Boot("genesis"), Launching(frozenset(names)), *[started(n, pid) for n, pid in zip(names, pids)]])
    assert s.phase is Phase.RUNNING
    return s


def test_boot_starts_the_current_folder_with_the_remembered_snapshot():
    s, actions = run([Boot("v2", snapshot_height=77)])
    assert actions == [StartBinaries("v2", 77)]
    assert s.phase is Phase.STARTING and s.folder == "v2"


def test_running_once_every_expected_binary_started():
    s, _ = run([Boot("genesis"), Launching(frozenset({"vega", "data_node"})), started("vega", 10)])
    assert s.phase is Phase.STARTING
    s, actions = step(s, started("data_node", 11), CFG, 1)
    assert s.phase is Phase.RUNNING
    assert emitted(actions, "binary.started")[0].fields["name"] == "data_node"


def test_a_failure_stops_every_binary_and_restarts_all_after_the_delay():
    s, actions = run([exited("vega", 10)], up(("vega", "data_node"), (10, 11)))
    assert s.phase is Phase.RESTARTING and s.restarts == 1
    assert StopBinaries() in actions
    assert emitted(actions, "binary.restart_scheduled")[0].fields == {"delay_s": 5, "restarts": 1, "max_restarts": 2}
    s, actions = step(s, exited("data_node", 11, -15), CFG, 1)
    assert actions[-1] == Schedule("restart", 5)          # the delay starts once all are down
    s, actions = step(s, Timer("restart"), CFG, 1)
    assert actions == [QuerySegment()]                    # a data node is asked for its segment first
    s, actions = step(s, p.Segment(height=500), CFG, 1)
    assert actions == [StartBinaries("genesis", 500)]


def test_without_a_data_node_a_restart_starts_at_once_after_the_delay():
    s, actions = run([exited(), Timer("restart")], up())
    assert actions[-1] == StartBinaries("genesis", None)
    assert s.phase is Phase.STARTING


def test_no_history_segment_means_no_snapshot_flag_and_a_failed_query_counts_as_a_failure():
    s, _ = run([exited("vega", 10), exited("data_node", 11), Timer("restart")], up(("vega", "data_node"), (10, 11)))
    _, actions = step(s, p.Segment(height=None), CFG, 1)
    assert actions == [StartBinaries("genesis", None)]
    s, actions = step(s, p.Segment(height=None, error="database locked"), CFG, 1)
    assert s.restarts == 2 and actions[-1] == Schedule("restart", 5)


def test_the_failure_after_the_last_restart_stops_visor_non_zero():
    s = replace(up(), restarts=2)
    s, actions = step(s, exited(code=3), CFG, 1)
    assert s.phase is Phase.STOPPING
    assert actions[-1] == Exit(1, "vega exited with code 3; all 2 restarts used")


def test_sigterm_stops_everything_and_exits_zero_once_all_are_down():
    s, actions = run([StopRequested("SIGTERM")], up())
    assert s.phase is Phase.STOPPING and StopBinaries() in actions
    assert emitted(actions, "visor.stopping")
    s, actions = step(s, exited(code=0), CFG, 1)
    assert actions[-1] == Exit(0, "received SIGTERM")


def test_an_exit_of_an_unknown_pid_changes_nothing():
    s = up()
    assert step(s, exited(pid=999), CFG, 1) == (s, [])


def test_accepted_release_is_announced_once_and_prefetched():
    s, actions = run([p.UpgradeStatus("v2", 120, False), p.UpgradeStatus("v2", 120, False)], up())
    assert [a.fields for a in emitted(actions, "upgrade.accepted")] == [{"tag": "v2", "height": 120}]
    assert actions.count(Prefetch("v2", "v2")) == 1


def test_an_accepted_release_is_verified_early_even_without_auto_install():
    _, actions = run([p.UpgradeStatus("v2", 120, False)], up(), replace(CFG, auto_install=False))
    assert Prefetch("v2", "v2") in actions


def test_ready_prepares_the_folder_before_stopping_anything():
    s, actions = run([p.UpgradeStatus("v2", 120, True)], up())
    assert s.phase is Phase.UPGRADING and s.upgrade.step is Step.PREPARING
    assert Prepare("v2", "v2", True) in actions and StopBinaries() not in actions


def test_upgrade_folders_map_a_tag_to_another_folder():
    cfg = replace(CFG, upgrade_folders={"v2": "custom"})
    _, actions = run([p.UpgradeStatus("v2", 120, True)], up(), cfg)
    assert Prepare("v2", "custom", True) in actions


def test_a_whole_upgrade_switches_current_and_starts_from_the_upgrade_height():
    s = replace(up(), restarts=1)
    s, _ = run([p.UpgradeStatus("v2", 120, True)], s)
    s, actions = step(s, p.FolderReady("v2", "/h/v2"), CFG, 10.0)
    assert emitted(actions, "upgrade.started")[0].fields == {"tag": "v2", "height": 120, "folder": "v2"}
    assert StopBinaries() in actions and s.upgrade.step is Step.STOPPING
    s, actions = step(s, exited(code=0), CFG, 10.5)
    assert actions[1:] == [SwitchCurrent("v2"), StartBinaries("v2", 120)]
    s, _ = step(s, Launching(frozenset({"vega"})), CFG, 10.5)
    s, actions = step(s, started(pid=20), CFG, 10.53)
    done = emitted(actions, "upgrade.completed")[0].fields
    assert done["tag"] == "v2" and done["downtime_ms"] == pytest.approx(30, abs=0.01)
    assert s.phase is Phase.RUNNING and s.restarts == 0 and s.folder == "v2"
    assert s.last_upgrade["tag"] == "v2"


def test_ready_for_the_folder_already_running_is_ignored():
    s = replace(up(), folder="v2")
    assert step(s, p.UpgradeStatus("v2", 120, True), CFG, 1)[0].phase is Phase.RUNNING


def test_stop_delay_waits_before_stopping():
    cfg = replace(CFG, stop_delay_s=4)
    s, _ = run([p.UpgradeStatus("v2", 120, True)], up(), cfg)
    s, actions = step(s, p.FolderReady("v2", "/h/v2"), cfg, 1)
    assert Schedule("stop", 4) in actions and StopBinaries() not in actions
    s, actions = step(s, Timer("stop"), cfg, 1)
    assert actions == [StopBinaries()]


def test_a_blocked_upgrade_stops_nothing_and_retries_until_the_folder_is_fixed():
    s, _ = run([p.UpgradeStatus("v2", 120, True)], up())
    s, actions = step(s, p.FolderBlocked("v2", "/h/v2", "folder missing"), CFG, 1)
    assert s.phase is Phase.BLOCKED and s.blocked_reason == "folder missing"
    assert emitted(actions, "upgrade.blocked")[0].fields == {"tag": "v2", "reason": "folder missing"}
    assert StopBinaries() not in actions and actions[-1] == Schedule("retry-upgrade", 3)
    s, actions = step(s, Timer("retry-upgrade"), CFG, 1)
    assert actions == [Prepare("v2", "v2", True)]
    s, actions = step(s, p.FolderBlocked("v2", "/h/v2", "folder missing"), CFG, 1)
    assert not emitted(actions, "upgrade.blocked")        # the same reason is not repeated
    s, actions = step(s, p.FolderReady("v2", "/h/v2"), CFG, 1)
    assert s.phase is Phase.UPGRADING and StopBinaries() in actions


def test_a_crash_while_blocked_restarts_the_old_binaries_and_forgets_the_upgrade():
    s, _ = run([p.UpgradeStatus("v2", 120, True), p.FolderBlocked("v2", "/h/v2", "missing")], up())
    s, _ = step(s, exited(), CFG, 1)
    assert s.phase is Phase.RESTARTING and s.upgrade is None


def fail_calls(s, times, cfg=CFG):
    """Feeds a failed status call at each of these times; returns the state and the actions."""
    actions = []
    for t in times:
        s, more = step(s, p.RpcFailed("refused"), cfg, t)
        actions += more
    return s, actions


def test_a_retry_budget_means_seconds_as_in_the_go_visor_whatever_the_poll_interval():
    # ten failed calls 100 ms apart are one Go-visor attempt (2 s apart), not ten
    s, actions = fail_calls(up(), [100 + i / 10 for i in range(10)])
    assert [a.fields["attempt"] for a in emitted(actions, "rpc.unreachable")] == [1] * 10
    assert s.phase is Phase.RUNNING
    # the first budget (3) lasts about 2·3 s: the fourth attempt, 6 s after the first, stops the node
    s, actions = fail_calls(s, [102, 104])
    assert s.phase is Phase.RUNNING and s.rpc_failures == 3
    s, actions = fail_calls(s, [106])
    assert s.phase is Phase.STOPPING and actions[-1] == StopBinaries()
    assert "for 6 s (4 attempts)" in s.reason


def test_a_node_that_answered_keeps_the_first_budget_until_a_crash_restart():
    # a busy node after its first answer is not stopped by the small restart budget (1)
    s, _ = run([p.UpgradeStatus("", 0, False)], up())
    s, _ = fail_calls(s, [100, 102, 104])
    assert s.phase is Phase.RUNNING and s.rpc_failures == 3
    s, _ = step(s, p.UpgradeStatus("", 0, False), CFG, 105)
    assert s.rpc_failures == 0


def test_after_a_crash_restart_the_restart_budget_applies():
    s, _ = run([exited(), Timer("restart"), Launching(frozenset({"vega"})), started(pid=11)], up())
    assert s.phase is Phase.RUNNING and not s.first_budget
    s, actions = fail_calls(s, [100])
    assert s.phase is Phase.RUNNING and emitted(actions, "rpc.unreachable")[0].fields["max"] == 1
    s, _ = fail_calls(s, [102])
    assert s.phase is Phase.STOPPING                      # restart budget: 1


def test_rpc_failures_while_binaries_are_down_do_not_count():
    s, _ = run([exited(), p.RpcFailed("refused"), p.RpcFailed("refused")], up())
    assert s.rpc_failures == 0 and s.phase is Phase.RESTARTING


def test_a_binary_that_cannot_start_counts_as_a_failure():
    s, _ = run([Boot("genesis"), Launching(frozenset({"vega"})), p.StartFailed("vega", "no such file")])
    assert s.phase is Phase.RESTARTING and "could not start" in s.reason


def test_a_binary_started_while_stopping_is_stopped_before_visor_exits():
    s, actions = run([Boot("genesis"), Launching(frozenset({"vega"})), StopRequested("SIGINT")])
    assert not [a for a in actions if isinstance(a, Exit)]        # vega is being launched: wait for it
    s, actions = step(s, started(), CFG, 1)
    assert StopBinaries() in actions
    s, actions = step(s, exited(code=0), CFG, 1)
    assert actions[-1] == Exit(0, "received SIGINT")


def test_a_binary_that_fails_to_start_while_stopping_lets_visor_exit():
    s, _ = run([Boot("genesis"), Launching(frozenset({"vega"})), StopRequested("SIGINT")])
    _, actions = step(s, p.StartFailed("vega", "no such file"), CFG, 1)
    assert actions == [Exit(0, "received SIGINT")]


def test_a_core_binary_that_cannot_start_while_the_data_node_starts_is_one_failure_and_restarts():
    # regression (issue 11): the data node reported its start after vega's failure was counted, and
    # RESTARTING waited for it forever
    both = frozenset({"vega", "data_node"})
    s, actions = run([Boot("genesis"), Launching(both), p.StartFailed("vega", "no such file")])
    assert s.phase is Phase.RESTARTING and s.restarts == 1
    s, actions = step(s, started("data_node", 11), CFG, 1)
    assert StopBinaries() in actions                      # started too late: stopped at once
    s, actions = step(s, exited("data_node", 11, -15), CFG, 1)
    assert actions[-1] == Schedule("restart", 5) and s.restarts == 1


def test_two_start_failures_in_one_attempt_are_one_failure():
    both = frozenset({"vega", "data_node"})
    s, actions = run([Boot("genesis"), Launching(both), p.StartFailed("vega", "gone"),
                      p.StartFailed("data_node", "gone")])
    assert s.restarts == 1 and actions[-1] == Schedule("restart", 5)
    assert len(emitted(actions, "binary.restart_scheduled")) == 1


def test_the_accepted_release_leaves_status_once_the_upgrade_is_done():
    s = up()
    s, _ = run([p.UpgradeStatus("v2", 50, True), p.FolderReady("v2", "/h/v2"), exited(code=0),
                Launching(frozenset({"vega"})), started(pid=12)], s)
    assert s.phase is Phase.RUNNING and s.accepted is None and s.last_upgrade["tag"] == "v2"
    s, actions = step(s, p.UpgradeStatus("v2", 50, False), CFG, 1)   # the new node still names it
    assert s.accepted is None and not emitted(actions)
    s, _ = step(s, p.UpgradeStatus("", 0, False), CFG, 1)
    assert s.upgrade is None


def test_a_run_killed_while_stopping_for_an_upgrade_resumes_the_upgrade():
    pending = {"tag": "v2", "folder": "v2", "height": 50}
    s, actions = run([Boot("genesis", upgrade=pending)])             # nothing left running
    assert actions == [SwitchCurrent("v2"), StartBinaries("v2", 50)]
    s, actions = run([Boot("genesis", adopted={"vega": 10}, expected=frozenset({"vega"}), upgrade=pending)])
    assert actions == [StopBinaries()] and s.upgrade.step is Step.STOPPING
    s, actions = step(s, exited(code=0), CFG, 1)
    assert SwitchCurrent("v2") in actions


def test_adopted_binaries_are_running_and_a_lost_one_is_a_failure():
    s, actions = run([Boot("genesis", adopted={"vega": 10}, expected=frozenset({"vega"}), restarts=2)])
    assert s.phase is Phase.RUNNING and actions == [] and s.restarts == 2 and not s.first_budget
    s, actions = run([Boot("genesis", adopted={"vega": 10}, expected=frozenset({"vega", "data_node"}))])
    assert s.phase is Phase.RESTARTING and "data_node not running when Visor started" in s.reason


def test_after_start_after_a_broker_restart_knows_the_folder_upgraded_from():
    # regression (issue 13, found by tests/process/test_hooks.py's review): a broker killed after the switch
    # resumed the upgrade with no source folder, so afterStart's VISOR_FROM_FOLDER was the home itself
    cfg = replace(CFG, upgrade_hooks={"afterStart": {"path": "h", "args": [], "timeout_s": 5, "required": True}})
    s, _ = run([p.UpgradeStatus("v2", 50, True), p.FolderReady("v2", "/h/v2"), exited(code=0)], up(), cfg)
    pending = in_flight(s)                                   # switched; the new node not yet up
    for facts in ([Boot("v2", upgrade=pending), Launching(frozenset({"vega"})), started(pid=12)],
                  [Boot("v2", adopted={"vega": 12}, expected=frozenset({"vega"}), upgrade=pending)]):
        s, _ = run(facts, cfg=cfg)
        s, actions = step(s, p.UpgradeStatus("v2", 50, False), cfg, 1)
        assert RunHook("afterStart", "v2", 50, "genesis", "v2") in actions


def test_an_upgrade_resumed_with_its_new_node_running_is_not_accepted_again_and_keeps_its_downtime():
    s, _ = run([p.UpgradeStatus("v2", 50, True), p.FolderReady("v2", "/h/v2"), exited(code=0),
                Launching(frozenset({"vega"})), started(pid=12)], up(), now=100.0)
    pending, last = in_flight(s), dict(s.last_upgrade)       # the new node runs, and has not answered
    s, _ = run([Boot("v2", adopted={"vega": 12}, expected=frozenset({"vega"}), upgrade=pending, last_upgrade=last)])
    assert dict(s.last_upgrade) == last                      # as the state file kept it
    s2, _ = run([Boot("v2", adopted={"vega": 12}, expected=frozenset({"vega"}), upgrade=pending)])
    assert s2.last_upgrade["tag"] == "v2" and s2.last_upgrade["downtime_ms"] is None   # a record that missed it
    s, actions = step(s, p.UpgradeStatus("v2", 50, True), CFG, 1)    # the new node still names it
    assert not emitted(actions, "upgrade.accepted") and s.upgrade is None and s.phase is Phase.RUNNING


def test_the_last_upgrade_survives_a_restart_of_visor_and_is_not_accepted_again():
    last = {"tag": "v2", "height": 50, "folder": "v2", "downtime_ms": 4.2}
    s, _ = run([Boot("v2", adopted={"vega": 12}, expected=frozenset({"vega"}), last_upgrade=last)])
    assert dict(s.last_upgrade) == last
    s, actions = step(s, p.UpgradeStatus("v2", 50, False), CFG, 1)
    assert not emitted(actions) and s.accepted is None
