"""Protocol upgrades with prepared folders: the upgrade watcher, the state machine, blocked upgrades,
connection retries, restarts with a data node, and a broker killed in the middle of an upgrade."""

import os
import signal
import time

import pytest

from tests.fakes import set_segment, segment_queries
from tests.helpers import wait_until
from visor.args import SNAPSHOT_FLAG

pytestmark = pytest.mark.timeout(60)


def upgrade(home, events, tag, height, **fields):
    home.announce(tag, height, ready=True)
    return events.wait_for("upgrade.completed", timeout_s=20, tag=tag, **fields)


def test_genesis_to_v2_to_v3_in_one_run(home, daemon, events):
    home.stage("v0.73.0", "v0.73.0")
    home.stage("v0.74.0", "v0.74.0")
    daemon.start()
    daemon.wait_running()
    home.announce("v0.73.0", 120)
    assert events.wait_for("upgrade.accepted")["height"] == 120
    first = upgrade(home, events, "v0.73.0", 120)
    assert home.current == "v0.73.0" and first["height"] == 120 and first["downtime_ms"] > 0
    assert daemon.status()["upgrade"]["last"] == {"tag": "v0.73.0", "height": 120, "folder": "v0.73.0",
                                                  "downtime_ms": first["downtime_ms"]}
    assert home.wait_started(2)[-2:] == [SNAPSHOT_FLAG, "120"]
    assert home.node_events("started")[-1]["folder"] == str(home.root / "v0.73.0")
    assert [e["type"] for e in events.received if e["type"].startswith("upgrade.")] == \
        ["upgrade.accepted", "upgrade.ready", "upgrade.started", "upgrade.completed"]
    upgrade(home, events, "v0.74.0", 200)
    assert home.current == "v0.74.0" and home.wait_started(3)[-2:] == [SNAPSHOT_FLAG, "200"]
    status = daemon.wait_running()
    assert status["current"] == {"folder": "v0.74.0", "name": "v0.74.0"}
    assert status["upgrade"]["last"]["tag"] == "v0.74.0"
    assert len(home.node_events("started")) == 3      # never two copies, never an extra restart
    stopped = [e for e in home.node_events() if e["event"] == "stopped"]
    assert len(stopped) == 2 and all(e["signal"] == 15 for e in stopped)


def test_a_successful_upgrade_resets_the_restart_count(home, daemon, events):
    home.stage("v0.73.0", "v0.73.0")
    daemon.start()
    os.kill(daemon.wait_running()["binaries"]["vega"]["pid"], signal.SIGKILL)
    wait_until(lambda: daemon.status()["restarts"]["count"] == 1, what="one restart")
    daemon.wait_running()
    upgrade(home, events, "v0.73.0", 120)
    assert daemon.wait_running()["restarts"]["count"] == 0


def test_upgrade_folders_name_the_folder_of_a_tag(home, daemon, events):
    home.stage("patched", "v0.73.0")
    home.set_config(upgradeFolders={"v0.73.0": "patched"})
    daemon.start()
    daemon.wait_running()
    assert upgrade(home, events, "v0.73.0", 120)["height"] == 120
    assert home.current == "patched"
    assert events.of("upgrade.started")[0]["folder"] == "patched"
    assert home.wait_started(2)[-2:] == [SNAPSHOT_FLAG, "120"]
    assert home.node_events("started")[-1]["folder"] == str(home.root / "patched")


def test_an_existing_snapshot_flag_is_not_added_twice(home, daemon, events):
    home.stage("v0.73.0", "v0.73.0", args=home.node_args(SNAPSHOT_FLAG, "7"))
    daemon.start()
    daemon.wait_running()
    upgrade(home, events, "v0.73.0", 120)
    argv = home.wait_started(2)
    assert argv.count(SNAPSHOT_FLAG) == 1 and argv[-1] == "7"


def test_a_version_mismatch_blocks_without_stopping_then_completes_once_fixed(home, daemon, events):
    home.stage("v0.73.0", "v0.72.9")
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    home.announce("v0.73.0", 120, ready=True)
    blocked = events.wait_for("upgrade.blocked", tag="v0.73.0")
    assert "v0.72.9" in blocked["reason"] and "v0.73.0" in blocked["reason"]
    status = wait_until(lambda: (s := daemon.status())["visor"]["state"] == "blocked" and s, what="blocked")
    assert status["upgrade"]["blocked"] == blocked["reason"]
    assert status["binaries"]["vega"]["pid"] == node and home.current == "genesis"
    (home.root / "v0.73.0" / "VERSION").write_text("v0.73.0\n")      # the operator drops in the right binary
    events.wait_for("upgrade.completed", timeout_s=20, tag="v0.73.0")
    assert home.current == "v0.73.0"


def test_a_missing_folder_blocks_until_it_is_dropped_in(home, daemon, events):
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    home.announce("v0.73.0", 120, ready=True)
    assert "missing" in events.wait_for("upgrade.blocked")["reason"]
    assert daemon.status()["binaries"]["vega"]["pid"] == node
    home.stage("v0.73.0", "v0.73.0")
    events.wait_for("upgrade.completed", timeout_s=20, tag="v0.73.0")


def test_first_connection_retries_spent_stop_the_node_and_exit_non_zero(home, daemon, events):
    home.stage("genesis", "v0.72.1", args=["node", "--log", str(home.log)])     # never serves the socket
    home.set_config(maxNumberOfFirstConnectionRetries=3)
    daemon.start()
    assert daemon.wait_exit(20) == 1
    assert [e["attempt"] for e in events.of("rpc.unreachable")][-1] == 4
    assert events.of("rpc.unreachable")[-1]["max"] == 3
    assert "did not answer upgrade-status calls for 6 s (4 attempts)" in events.wait_for("visor.failed")["reason"]
    assert home.node_events()[-1]["event"] == "stopped"


def test_a_busy_node_is_not_stopped_for_a_short_run_of_failed_calls(home, daemon, events):
    # regression (issue 11): 0.4 s of HTTP 500 at a 100 ms poll, with budgets of 3, stopped the validator
    home.set_config(maxNumberOfFirstConnectionRetries=3, maxNumberOfRestartConnectionRetries=3)
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    wait_until(lambda: home.node_events("rpc"), what="the node answered once")
    home.announce(reply="http500")
    wait_until(lambda: events.of("rpc.unreachable"), what="a failed call")
    failing_since = time.monotonic()
    wait_until(lambda: time.monotonic() - failing_since > 0.5, what="half a second of failed calls")
    home.announce()
    answered = len(home.node_events("rpc"))
    wait_until(lambda: len(home.node_events("rpc")) > answered + 2, what="the node answering again")
    assert daemon.proc.poll() is None and daemon.status()["binaries"]["vega"]["pid"] == node
    assert not events.of("visor.failed")
    assert {e["attempt"] for e in events.of("rpc.unreachable") if "HTTP 500" in e["error"]} == {1}   # one 2 s attempt


@pytest.mark.parametrize("reply, error", [("garbage", "reply is not JSON-RPC"),
                                          ("error", "protocolupgrade.UpgradeStatus failed"),
                                          ("http500", "HTTP 500 from /rpc"),
                                          ("close", "Remote end closed connection without response")])
def test_a_bad_reply_counts_as_a_failed_call(home, daemon, events, reply, error):
    home.set_config(maxNumberOfFirstConnectionRetries=2)
    home.announce(reply=reply)
    daemon.start()
    assert daemon.wait_exit(20) == 1
    unreachable = events.of("rpc.unreachable")
    assert error in unreachable[-1]["error"] and unreachable[-1]["max"] == 2   # what the node said, counted
    assert "did not answer" in events.wait_for("visor.failed")["reason"]
    assert home.node_events()[-1]["event"] == "stopped"


def test_after_a_crash_restart_the_small_retry_budget_applies(home, daemon, events):
    home.set_config(maxNumberOfRestartConnectionRetries=2)
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    wait_until(lambda: home.node_events("rpc"), what="the node answered once")
    home.announce(reply="garbage")
    os.kill(node, signal.SIGKILL)
    assert daemon.wait_exit(20) == 1
    assert events.of("rpc.unreachable")[-1]["max"] == 2


def test_a_restart_with_a_data_node_starts_vega_from_the_latest_segment(home, daemon, events):
    home.stage("genesis", "v0.72.1", data_node=["datanode", "start", "--home", str(home.root / "dn")])
    set_segment(home.root / "genesis", 500)
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    home.wait_started(1)
    os.kill(node, signal.SIGKILL)
    assert home.wait_started(2)[-2:] == [SNAPSHOT_FLAG, "500"]
    query = segment_queries(home.root / "genesis")[-1]["argv"]
    assert query == ["datanode", "network-history", "latest-history-segment", "--output=json",
                     "--home", str(home.root / "dn")]


def test_no_history_segment_restarts_vega_without_the_flag(home, daemon, events):
    home.stage("genesis", "v0.72.1", data_node=["datanode", "start"])
    daemon.start()
    os.kill(daemon.wait_running()["binaries"]["vega"]["pid"], signal.SIGKILL)
    assert SNAPSHOT_FLAG not in home.wait_started(2)


def test_a_failed_segment_query_counts_against_the_restarts(home, daemon, events):
    home.stage("genesis", "v0.72.1", data_node=["datanode", "start"])
    (home.root / "genesis" / "SEGMENT_FAIL").write_text("")
    home.set_config(maxNumberOfRestarts=1)
    daemon.start()
    daemon.wait_running()
    home.wait_started(1)
    os.kill(daemon.status()["binaries"]["vega"]["pid"], signal.SIGKILL)
    assert daemon.wait_exit(20) == 1
    assert "database locked" in events.wait_for("visor.failed")["reason"]
    assert len(home.node_events("started")) == 1


def test_broker_killed_after_the_switch_adopts_the_new_node(home, daemon, events):
    home.stage("v0.73.0", "v0.73.0", args=home.node_args("--serve-after", "2"))   # new node: slow to serve
    daemon.start()
    daemon.wait_running()
    home.announce("v0.73.0", 120, ready=True)
    wait_until(lambda: home.current == "v0.73.0" and len(home.node_events("started")) == 2, what="the switch")
    new = home.node_events("started")[-1]["pid"]
    os.kill(daemon.proc.pid, signal.SIGKILL)           # no orderly stop: the runner keeps the new node
    daemon.proc.wait(5)
    daemon.start()
    assert daemon.wait_running(timeout_s=15)["binaries"]["vega"]["pid"] == new
    assert home.current == "v0.73.0" and home.started_argv()[-1][-2:] == [SNAPSHOT_FLAG, "120"]
    running = [e for e in home.node_events() if e["event"] in ("started", "stopped")]
    assert [e["event"] for e in running] == ["started", "stopped", "started"]


def test_broker_killed_before_the_switch_adopts_the_old_node_and_upgrades_again(home, daemon, events):
    home.stage("v0.73.0", "v0.73.0")
    home.set_config(stopDelaySeconds=30)               # the kill lands between upgrade.started and the stop
    daemon.start()
    old = daemon.wait_running()["binaries"]["vega"]["pid"]
    home.announce("v0.73.0", 120, ready=True)
    events.wait_for("upgrade.started")
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    assert home.current == "genesis"
    home.set_config(stopDelaySeconds=0)
    daemon.start()
    events.wait_for("upgrade.completed", timeout_s=20, tag="v0.73.0")
    assert home.current == "v0.73.0" and home.wait_started(2)[-2:] == [SNAPSHOT_FLAG, "120"]
    assert [e["pid"] for e in home.node_events("stopped")] == [old]
