"""The daemon from genesis: start, status, events, stop, the restart policy, worker isolation."""

import json
import os
import select
import signal
import stat
import subprocess
import time

import psutil
import pytest

from tests.fakes import read_log
from tests.helpers import VISOR, run_cli, wait_until
from visor.custody import SAME_STOP_S
from visor.events import EVENTS

pytestmark = pytest.mark.timeout(60)


def test_first_start_links_genesis_and_status_shows_the_running_node(home, daemon, events):
    assert not os.path.lexists(home.root / "current")     # init leaves it to the first start
    daemon.start()
    status = daemon.wait_running()
    assert home.current == "genesis"
    assert stat.S_IMODE((home.root / ".visor").stat().st_mode) == 0o700
    vega = status["binaries"]["vega"]
    assert vega["pid"] == wait_until(lambda: home.node_events("started"), what="the node's log")[0]["pid"]
    assert vega["path"] == str(home.root / "genesis" / "vega") and vega["args"] == home.node_args()
    assert status["current"] == {"folder": "genesis", "name": "genesis"}
    assert set(status["workers"]) == {"upgrade-watcher", "config-watcher", "fetcher", "runner:vega"}
    assert all(w["alive"] and w["restarts"] == 0 for w in status["workers"].values())
    assert status["restarts"] == {"count": 0, "max": 3}
    assert status["upgrade"]["accepted"] is None and status["upgrade"]["last"] is None
    started = events.wait_for("binary.started", name="vega")
    assert started["pid"] == vega["pid"] and started["args"] == home.node_args()


def test_human_status_is_a_readable_table(home, daemon):
    daemon.start()
    pid = daemon.wait_running()["binaries"]["vega"]["pid"]
    done = run_cli("status", "--home", home.root)
    assert done.returncode == 0
    assert "RUNNING" in done.stdout and str(pid) in done.stdout and "runner:vega" in done.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_the_node_and_exits_zero(home, daemon, events, sig):
    daemon.start()
    daemon.wait_running()
    daemon.signal(sig)
    assert daemon.wait_exit(20) == 0
    stopped = home.node_events()[-1]
    assert stopped["event"] == "stopped" and stopped["signal"] == signal.SIGTERM    # the node was asked, not killed
    visor = {"pid": daemon.proc.pid, "home": str(home.root)}
    assert {k: events.wait_for("visor.stopped")[k] for k in visor} == visor
    assert events.of("visor.stopping")[0]["seq"] < events.of("binary.exited", name="vega")[0]["seq"] \
        < events.of("visor.stopped")[0]["seq"]


def test_group_sigterm_as_systemd_sends_it_still_stops_in_order(home, daemon, events):
    daemon.start()
    daemon.wait_running()
    os.killpg(daemon.proc.pid, signal.SIGTERM)        # every process of the group, workers included
    assert daemon.wait_exit(20) == 0
    assert home.node_events()[-1]["event"] == "stopped"
    assert not events.of("worker.exited", exitcode=-15)


def test_a_node_ignoring_sigterm_is_killed_after_the_timeout(home, daemon, events):
    home.stage("genesis", "v0.72.1", args=home.node_args("--ignore-sigterm"))
    home.set_config(stopSignalTimeoutSeconds=1)
    daemon.start()
    daemon.wait_running()
    home.wait_started(1)                              # its SIGTERM handler is in place
    daemon.signal()
    assert daemon.wait_exit(20) == 0
    assert events.wait_for("binary.exited", name="vega")["exitcode"] == -9


def test_a_crashing_node_is_restarted_until_the_restarts_are_used_up(home, daemon, events):
    home.stage("genesis", "v0.72.1", args=home.node_args("--crash-after", "0.3", "--exit-code", "7"))
    home.set_config(maxNumberOfRestarts=2)
    daemon.start()
    assert daemon.wait_exit(30) == 1
    assert len(home.node_events("started")) == 3
    scheduled = events.of("binary.restart_scheduled")
    assert [(e["restarts"], e["max_restarts"], e["delay_s"]) for e in scheduled] == [(1, 2, 0), (2, 2, 0)]
    failed = events.wait_for("visor.failed")
    assert failed["reason"] == "vega exited with code 7; all 2 restarts used"
    last_line = daemon.stderr.strip().splitlines()[-1]
    assert "all 2 restarts used" in last_line and "Traceback" not in daemon.stderr


def test_kill_9_of_the_node_restarts_it_after_the_delay(home, daemon, events):
    home.set_config(restartsDelaySeconds=1)
    daemon.start()
    pid = daemon.wait_running()["binaries"]["vega"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert events.wait_for("binary.exited", pid=pid)["exitcode"] == -9
    assert events.wait_for("binary.restart_scheduled")["delay_s"] == 1
    wait_until(lambda: [e for e in events.of("binary.started") if e["pid"] != pid], what="a new vega")
    assert daemon.wait_running()["restarts"]["count"] == 1


def test_the_data_node_and_core_node_are_restarted_together(home, daemon, events):
    home.stage("genesis", "v0.72.1", data_node=["datanode", "start", "--log", str(home.root / "dn.log")])
    daemon.start()
    status = daemon.wait_running()
    assert set(status["binaries"]) == {"vega", "data_node"} and "runner:data_node" in status["workers"]
    wait_until(lambda: read_log(home.root / "dn.log"), what="the data node to log its start")
    os.kill(status["binaries"]["data_node"]["pid"], signal.SIGKILL)
    events.wait_for("binary.exited", name="vega", pid=status["binaries"]["vega"]["pid"])
    wait_until(lambda: len(home.node_events("started")) == 2, what="vega started again")
    dn_starts = wait_until(lambda: len(s := [e for e in read_log(home.root / "dn.log") if e["event"] == "started"])
                           == 2 and s, what="the data node started again")
    assert dn_starts[1]["mode"] == "datanode"


@pytest.mark.parametrize("worker", ["upgrade-watcher", "config-watcher", "fetcher"])
def test_kill_9_of_a_watcher_never_touches_the_node(home, daemon, events, worker):
    daemon.start()
    status = daemon.wait_running()
    node = status["binaries"]["vega"]["pid"]
    os.kill(status["workers"][worker]["pid"], signal.SIGKILL)
    events.wait_for("worker.exited", worker=worker, exitcode=-9)
    after = wait_until(lambda: (s := daemon.status())["workers"][worker]["alive"] and
                       s["workers"][worker]["restarts"] == 1 and s, what=f"{worker} restarted")
    assert after["binaries"]["vega"]["pid"] == node and psutil.pid_exists(node)
    assert len(home.node_events("started")) == 1 and not home.node_events("stopped")


def test_kill_9_of_the_runner_keeps_the_node_and_a_new_runner_adopts_it(home, daemon, events):
    daemon.start()
    status = daemon.wait_running()
    node, runner = status["binaries"]["vega"]["pid"], status["workers"]["runner:vega"]["pid"]
    os.kill(runner, signal.SIGKILL)
    after = wait_until(lambda: (s := daemon.status())["workers"]["runner:vega"]["restarts"] == 1 and
                       s["workers"]["runner:vega"]["alive"] and s, what="runner restarted")
    assert after["binaries"]["vega"]["pid"] == node and len(home.node_events("started")) == 1
    os.kill(node, signal.SIGKILL)                     # still supervised: the policy restarts it
    assert events.wait_for("binary.exited", pid=node)["exitcode"] == -9
    wait_until(lambda: len(home.node_events("started")) == 2, what="the node restarted by policy")
    assert daemon.stop() == 0


def test_visor_events_prints_one_line_per_event_and_exits_zero_on_sigint(home, daemon):
    follower = subprocess.Popen([*VISOR, "events", "--home", str(home.root), "--json"], stdout=subprocess.PIPE,
                                text=True)
    try:
        daemon.start()
        daemon.wait_running()
        def printed():                                # a subscriber misses what came before it joined:
            fetcher = daemon.status()["workers"]["fetcher"]      # make new events until one arrives
            if fetcher["alive"]:
                os.kill(fetcher["pid"], signal.SIGKILL)
            return select.select([follower.stdout], [], [], 0.5)[0]
        wait_until(printed, what="visor events to print an event", timeout_s=20)
        line = json.loads(follower.stdout.readline())
        assert line["v"] == 1 and line["type"] in EVENTS and isinstance(line["seq"], int)
        follower.send_signal(signal.SIGINT)
        assert follower.wait(5) == 0
    finally:
        follower.kill()
        follower.wait()


def test_run_on_a_home_that_is_not_initialised_is_one_line(tmp_path):
    done = run_cli("run", "--home", tmp_path / "nope")
    assert done.returncode == 1
    assert done.stderr.strip() == f"visor: {tmp_path / 'nope'}: home folder not found " \
                                  f"(create it with `visor-init --home {tmp_path / 'nope'}`)"


def test_run_with_a_bad_config_is_one_line(home):
    (home.root / "config.toml").write_text("maxNumberOfRestarts = 'x'\n")
    done = run_cli("run", "--home", home.root)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("config.toml: maxNumberOfRestarts must be a whole number, got 'x'")


def test_run_with_no_admin_socket_in_the_run_config_is_one_line_and_starts_nothing(home):
    # it used to start the node and then fail every status call for days (EINVAL, no file named)
    path = home.root / "genesis" / "run-config.toml"
    path.write_text(path.read_text().replace(f'socketPath = "{home.socket}"', 'socketPath = ""'))
    done = run_cli("run", "--home", home.root)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"visor: {home.root / 'current' / 'run-config.toml'}: " \
                                  "vega.rpc.socketPath is empty; set it to the core node's admin socket"
    assert not home.node_events()


def test_a_second_daemon_on_the_same_home_is_refused(home, daemon):
    daemon.start()
    daemon.wait_running()
    done = run_cli("run", "--home", home.root)
    assert done.returncode == 1 and "already running" in done.stderr


def test_status_without_a_daemon_fails_within_two_seconds(home):
    done = run_cli("status", "--home", home.root, timeout_s=5)
    assert done.returncode == 1 and "no visor answered within 2s" in done.stderr


def test_init_creates_a_home_and_refuses_an_existing_one(tmp_path):
    done = subprocess.run([VISOR[0], VISOR[1] + "-init", "--home", str(tmp_path / "h"), "--with-data-node"],
                          capture_output=True, text=True)
    assert done.returncode == 0
    assert (tmp_path / "h" / "genesis" / "run-config.toml").read_text().count("[data_node.binary]") == 1
    assert (tmp_path / "h" / "vX.X.X" / "run-config.toml").exists()
    again = run_cli("init", "--home", tmp_path / "h")
    assert again.returncode == 1 and again.stderr.strip() == f"visor: {tmp_path / 'h'}: already exists; " \
                                                             f"refusing to overwrite it"


def test_version_prints_json():
    done = run_cli("version", "--output", "json")
    assert done.returncode == 0 and set(json.loads(done.stdout)) == {"version", "hash"}


def test_a_second_stop_signal_kills_a_node_that_ignores_sigterm_at_once(home, daemon, events):
    home.stage("genesis", "v0.72.1", args=home.node_args("--ignore-sigterm"))
    home.set_config(stopSignalTimeoutSeconds=30)
    daemon.start()
    daemon.wait_running()
    daemon.signal(signal.SIGINT)
    first = time.monotonic()
    wait_until(lambda: home.node_events("sigterm-ignored"), what="the node to ignore SIGTERM")
    wait_until(lambda: time.monotonic() - first >= SAME_STOP_S, what="a second press, not the same one")
    daemon.signal(signal.SIGINT)                      # the operator presses Ctrl-C again
    assert daemon.wait_exit(10) == 0
    assert events.wait_for("binary.exited", name="vega")["exitcode"] == -9


def test_a_stop_signal_sent_twice_at_once_is_one_stop_with_its_timeout(home, daemon, events):
    # `timeout 3 visor run`, or a kill to the process and one to its group: the node gets its
    # stopSignalTimeoutSeconds all the same, not a SIGKILL a millisecond after its SIGTERM
    home.stage("genesis", "v0.72.1", args=home.node_args("--ignore-sigterm"))
    home.set_config(stopSignalTimeoutSeconds=2)
    daemon.start()
    daemon.wait_running()
    home.wait_started(1)
    daemon.signal(signal.SIGTERM)
    stopping = events.wait_for("visor.stopping")          # the first one is being acted on
    os.killpg(daemon.proc.pid, signal.SIGTERM)
    assert daemon.wait_exit(20) == 0
    exited = events.wait_for("binary.exited", name="vega")
    assert exited["exitcode"] == -9 and exited["ts"] - stopping["ts"] >= 1.9
