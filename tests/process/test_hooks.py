"""Upgrade hooks end to end (issue 13, SPEC §4 [upgradeHooks], §5 hook.*, §7): the real daemon, the
hooks worker and the fake node. Each hook is a small bash script written into the home; it records how
it was called (its environment, folder, args, how many lines the fake node's log had, where `current`
pointed) as one JSON line in HOME/hooks.jsonl, then does what the test says."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest

from tests.helpers import REPO, run_cli, wait_until
from workers.hooks import SHUTDOWN_GRACE_S

TAG, HEIGHT = "v0.73.0", 120

RECORD = r"""#!/bin/bash
lines=$(wc -l < "$VISOR_HOME/node.log")
printf '{"hook":"%s","pid":%s,"t":%s,"node_lines":%s,"current":"%s","cwd":"%s","nargs":%s,"args":"%s",'\
'"tag":"%s","height":"%s","home":"%s","from":"%s","to":"%s"}\n' \
    "$VISOR_HOOK" $$ "$(date +%s.%N)" "$lines" "$(readlink "$VISOR_HOME/current")" "$PWD" $# "$*" \
    "$VISOR_UPGRADE_TAG" "$VISOR_UPGRADE_HEIGHT" "$VISOR_HOME" "$VISOR_FROM_FOLDER" "$VISOR_TO_FOLDER" \
    >> "$VISOR_HOME/hooks.jsonl"
echo "hook output: $VISOR_HOOK"
"""

# SIGTERM is noted and ignored; a background sleep is left in the group; the hook never ends by itself
HUNG = """trap 'echo term >> "$VISOR_HOME/hung.log"' TERM
sleep 1000 &
echo $! >> "$VISOR_HOME/hung.log"
while true; do sleep 0.1; done
"""


@pytest.fixture(autouse=True)
def no_hook_left(home):
    """After the daemon has stopped (autouse: set up before it, torn down after it), nothing a hook started
    may still run: found by the hooks' environment, since a `sleep` names no home on its command line."""
    yield
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("VISOR_HOME") == str(home.root) and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.Error:
            continue
    for proc in left:
        proc.kill()
    assert not left, f"hook processes left behind: {[proc.cmdline() for proc in left]}"


def write_hook(home, name: str, body: str = "exit 0") -> str:
    """HOME/hooks/<name>: RECORD, then body. Replaced by rename: bash reads a running script as it goes."""
    path = home.root / "hooks" / name
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{name}.new")
    tmp.write_text(RECORD + body + "\n")
    tmp.chmod(0o755)
    tmp.replace(path)
    return f"hooks/{name}"


def calls(home, hook: str | None = None) -> list[dict]:
    try:
        lines = (home.root / "hooks.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [c for c in map(json.loads, lines) if hook is None or c["hook"] == hook]


def set_hooks(home, **hooks: dict) -> None:
    home.set_config(**{f"upgradeHooks.{name}": table for name, table in hooks.items()})


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def untouched(home, pid: int) -> bool:
    """The node `pid` is the only one started, and it was never signalled, stopped or crashed."""
    lives = [e for e in home.node_events() if e["event"] not in ("rpc", "serving")]
    return [(e["event"], e["pid"]) for e in lives] == [("started", pid)]


def start(home, daemon) -> int:
    """Starts the daemon with v0.73.0 staged; the old node's pid once it runs."""
    home.stage(TAG, TAG)
    daemon.start()
    return daemon.wait_running()["binaries"]["vega"]["pid"]


@pytest.mark.timeout(60)
def test_three_hooks_run_in_order_with_their_context_and_downtime_includes_after_stop(home, daemon, events):
    path = write_hook(home, "record")
    slow = write_hook(home, "slow", "sleep 0.3")
    set_hooks(home, beforeStop={"path": path, "args": ["--channel", "two words"]},
              afterStop={"path": slow}, afterStart={"path": path})
    old = start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    completed = events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    events.wait_for("hook.completed", hook="afterStart", timeout_s=20)

    hooks = [(e["type"], e.get("hook")) for e in events.received if e["type"].startswith(("hook.", "upgrade."))]
    assert hooks == [("upgrade.accepted", None), ("upgrade.ready", None),
                     ("hook.started", "beforeStop"), ("hook.completed", "beforeStop"), ("upgrade.started", None),
                     ("hook.started", "afterStop"), ("hook.completed", "afterStop"), ("upgrade.completed", None),
                     ("hook.started", "afterStart"), ("hook.completed", "afterStart")]
    before, after, after_start = calls(home, "beforeStop")[0], calls(home, "afterStop")[0], calls(home, "afterStart")[0]
    new = home.node_events("started")[1]["pid"]
    seen = home.node_events()
    # beforeStop: the old node runs (it has not logged its stop), `current` is genesis
    assert not [e for e in seen[:before["node_lines"]] if e["event"] == "stopped"]
    assert before["current"] == "genesis"
    # afterStop: the old node stopped, the new one not started, `current` not switched
    assert [(e["event"], e["pid"]) for e in seen[:after["node_lines"]] if e["event"] in ("started", "stopped")] == \
        [("started", old), ("stopped", old)]
    assert after["current"] == "genesis"
    # afterStart: the new node has answered a status call
    assert any(e["event"] == "rpc" and e["pid"] == new for e in seen[:after_start["node_lines"]])
    assert after_start["current"] == TAG
    root = str(home.root)
    for call in (before, after, after_start):
        assert (call["tag"], call["height"], call["home"], call["cwd"]) == (TAG, str(HEIGHT), root, root)
        assert (call["from"], call["to"]) == (f"{root}/genesis", f"{root}/{TAG}")
    assert (before["nargs"], before["args"]) == (2, "--channel two words") and after_start["nargs"] == 0
    for name in ("beforeStop", "afterStop", "afterStart"):
        started = events.of("hook.started", hook=name)[0]
        assert started["tag"] == TAG and started["pid"] == calls(home, name)[0]["pid"]
        assert events.of("hook.completed", hook=name)[0]["tag"] == TAG
    assert events.of("hook.completed", hook="afterStop")[0]["duration_ms"] >= 300
    assert completed["downtime_ms"] >= 300
    wait_until(lambda: "hook output: afterStart" in daemon.stderr, what="the hooks' output in Visor's")
    assert "hook output: beforeStop" in daemon.stderr
    status = daemon.wait_running()
    assert status["upgrade"]["hook"] is None and status["upgrade"]["target"] is None


@pytest.mark.timeout(60)
def test_a_failing_required_before_stop_holds_the_old_node_and_is_retried_until_fixed(home, daemon, events):
    path = write_hook(home, "check", "exit 3")
    set_hooks(home, beforeStop={"path": path})
    old = start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    blocked = events.wait_for("upgrade.blocked", tag=TAG)
    assert "beforeStop" in blocked["reason"] and "exited with code 3" in blocked["reason"]
    failed = events.wait_for("hook.failed", hook="beforeStop")
    assert failed["exitcode"] == 3 and failed["tag"] == TAG and failed["duration_ms"] >= 0
    status = wait_until(lambda: (s := daemon.status())["visor"]["state"] == "blocked" and s, what="blocked")
    assert status["binaries"]["vega"]["pid"] == old and "beforeStop" in status["upgrade"]["blocked"]
    wait_until(lambda: len(events.of("hook.failed", hook="beforeStop")) >= 2, what="a retry", timeout_s=10)
    assert untouched(home, old)
    assert home.current == "genesis" and not events.of("upgrade.started")
    write_hook(home, "check")                            # the operator fixes the hook
    events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    assert home.current == TAG and len(events.of("upgrade.blocked")) == 1


@pytest.mark.timeout(60)
def test_a_hung_before_stop_is_killed_whole_at_its_timeout(home, daemon, events):
    set_hooks(home, beforeStop={"path": write_hook(home, "hung", HUNG), "timeoutSeconds": 1})
    old = start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    started = events.wait_for("hook.started", hook="beforeStop")
    failed = events.wait_for("hook.failed", hook="beforeStop", timeout_s=15)
    assert failed["error"] == "timed out after 1 s" and failed["duration_ms"] >= 5500   # SIGTERM ignored: SIGKILL
    background, *notes = (home.root / "hung.log").read_text().split()
    assert notes == ["term"]                           # it was asked first
    wait_until(lambda: gone(started["pid"]) and gone(int(background)),
               what="the hook and its background sleep to end")
    assert "beforeStop" in events.wait_for("upgrade.blocked")["reason"]
    assert daemon.status()["binaries"]["vega"]["pid"] == old and untouched(home, old)


@pytest.mark.timeout(60)
def test_a_failing_required_after_stop_keeps_the_node_down_until_a_reload_makes_it_optional(home, daemon, events):
    backup = {"path": write_hook(home, "backup", "exit 4")}
    set_hooks(home, afterStop=backup)
    old = start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    blocked = events.wait_for("upgrade.blocked", tag=TAG)
    assert "afterStop" in blocked["reason"] and "exited with code 4" in blocked["reason"]
    status = wait_until(lambda: (s := daemon.status())["visor"]["state"] == "blocked" and s, what="blocked")
    assert status["binaries"] == {} and home.current == "genesis"
    wait_until(lambda: len(events.of("hook.failed", hook="afterStop")) >= 2, what="a retry", timeout_s=10)
    lives = [(e["event"], e["pid"]) for e in home.node_events() if e["event"] in ("started", "stopped")]
    assert lives == [("started", old), ("stopped", old)] and home.current == "genesis"    # still down
    set_hooks(home, afterStop={**backup, "required": False})
    events.wait_for("config.reloaded")
    completed = events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    assert home.current == TAG and home.wait_started(2)
    assert len(events.of("upgrade.blocked")) == 1
    assert completed["downtime_ms"] >= 3000          # held down through at least one retry


@pytest.mark.timeout(60)
def test_optional_hooks_and_an_after_start_that_cannot_start_are_only_reported(home, daemon, events):
    failing = write_hook(home, "failing", "exit 5")
    set_hooks(home, beforeStop={"path": failing, "required": False}, afterStop={"path": failing, "required": False},
              afterStart={"path": "hooks/missing"})
    start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    failed = events.wait_for("hook.failed", hook="afterStart", timeout_s=10)
    assert failed["error"] == f"cannot start {home.root}/hooks/missing: No such file or directory"
    assert failed["exitcode"] is None and failed["tag"] == TAG
    assert [e["exitcode"] for e in events.of("hook.failed")][:2] == [5, 5]
    assert [e["hook"] for e in events.of("hook.failed")] == ["beforeStop", "afterStop", "afterStart"]
    new = daemon.wait_running()
    assert not events.of("upgrade.blocked") and new["upgrade"]["target"] is None and home.current == TAG
    answered = len(home.node_events("rpc"))
    wait_until(lambda: len(home.node_events("rpc")) > answered + 3, what="the new node answering on")
    assert len(home.node_events("started")) == 2 and len(events.of("hook.failed")) == 3
    assert daemon.status()["binaries"]["vega"]["pid"] == new["binaries"]["vega"]["pid"]


@pytest.mark.timeout(60)
def test_status_shows_the_running_hook_and_a_killed_hooks_worker_fails_it_and_is_retried(home, daemon, events):
    set_hooks(home, beforeStop={"path": write_hook(home, "wait", 'sleep 1000 & echo $! > "$VISOR_HOME/bg.pid"; wait')})
    old = start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    started = events.wait_for("hook.started", hook="beforeStop")
    status = daemon.status()
    assert status["upgrade"]["hook"]["name"] == "beforeStop" and status["upgrade"]["hook"]["pid"] == started["pid"]
    assert status["upgrade"]["hook"]["running_s"] >= 0 and status["visor"]["state"] == "upgrading"
    human = run_cli("status", "--home", home.root)
    assert human.returncode == 0 and "hook      beforeStop running for " in human.stdout
    background = int(wait_until(lambda: (home.root / "bg.pid").read_text().strip() if (home.root / "bg.pid").exists()
                                else "", what="the hook's background sleep"))
    os.kill(status["workers"]["hooks"]["pid"], signal.SIGKILL)
    failed = events.wait_for("hook.failed", hook="beforeStop")
    assert "hooks worker died" in failed["error"] and failed["tag"] == TAG
    wait_until(lambda: gone(started["pid"]) and gone(background), what="the hook's process group to end")
    assert "beforeStop" in events.wait_for("upgrade.blocked")["reason"] and untouched(home, old)
    write_hook(home, "wait")                             # the next run passes
    events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    assert len(events.of("hook.started", hook="beforeStop")) == 2
    assert daemon.status()["workers"]["hooks"]["alive"]


class Webhook(http.server.ThreadingHTTPServer):
    def __init__(self):
        self.posts: list[dict] = []
        super().__init__(("127.0.0.1", 0), WebhookHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/visor"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class WebhookHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.timeout(60)
def test_the_example_hooks_back_up_the_node_state_and_notify_a_webhook(home, daemon, events):
    state = home.root / "vega-state"
    (state / "snapshots").mkdir(parents=True)
    (state / "snapshots" / "120.db").write_bytes(b"block 120")
    (home.root / "hooks").mkdir()
    for name in ("backup", "notify"):
        shutil.copy2(REPO / "etc" / "hooks" / name, home.root / "hooks" / name)     # as an operator would
    webhook = Webhook()
    try:
        set_hooks(home, afterStop={"path": "hooks/backup", "args": ["--source", str(state)]},
                  afterStart={"path": "hooks/notify", "args": [webhook.url, "--timeout", "5"], "required": False})
        start(home, daemon)
        home.announce(TAG, HEIGHT, ready=True)
        events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
        events.wait_for("hook.completed", hook="afterStart", timeout_s=10)
    finally:
        webhook.shutdown()
        webhook.server_close()
    assert events.of("hook.completed", hook="afterStop")
    [backup] = (home.root / "backups").iterdir()                 # the default: VISOR_HOME/backups
    assert backup.name.startswith(f"{TAG}-h{HEIGHT}-")
    assert (backup / "snapshots" / "120.db").read_bytes() == b"block 120"
    root = str(home.root)
    assert webhook.posts == [{"tag": TAG, "height": HEIGHT, "hook": "afterStart", "home": root,
                              "from": f"{root}/genesis", "to": f"{root}/{TAG}"}]
    assert str(backup) in daemon.stderr                          # the hooks' output is Visor's


@pytest.mark.timeout(60)
def test_a_hook_left_running_by_an_abandoned_upgrade_does_not_hold_the_next_one(home, daemon, events):
    # the new node crashes while its afterStart hook still runs: that upgrade is over (a restart follows),
    # and the next upgrade's beforeStop must run, not be refused because the stale hook still runs
    set_hooks(home, beforeStop={"path": write_hook(home, "record")},
              afterStart={"path": write_hook(home, "slow", "sleep 30"), "timeoutSeconds": 50})
    home.stage("v0.74.0", "v0.74.0")
    start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    stale = events.wait_for("hook.started", hook="afterStart", timeout_s=20)
    os.kill(daemon.status()["binaries"]["vega"]["pid"], signal.SIGKILL)
    events.wait_for("binary.restart_scheduled")
    daemon.wait_running()
    home.announce("v0.74.0", 200, ready=True)
    events.wait_for("upgrade.completed", timeout_s=20, tag="v0.74.0")
    assert [c["tag"] for c in calls(home, "beforeStop")] == [TAG, "v0.74.0"]
    failed = events.wait_for("hook.failed", hook="afterStart")            # ended, and said so
    assert (failed["tag"], failed["error"]) == (TAG, "stopped: superseded by beforeStop") and gone(stale["pid"])


@pytest.mark.timeout(60)
def test_a_broker_killed_during_after_stop_runs_it_again_at_the_next_start_with_the_node_still_down(
        home, daemon, events):
    # the first run hangs (and ignores SIGTERM); a run that finds the marker passes
    body = '[ -e "$VISOR_HOME/again" ] && exit 0\ntrap "" TERM\ntouch "$VISOR_HOME/again"\nsleep 1000\n'
    set_hooks(home, afterStop={"path": write_hook(home, "backup", body)})
    old = start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    hung = events.wait_for("hook.started", hook="afterStop")["pid"]
    wait_until(lambda: (home.root / "again").exists(), what="the hook to ignore SIGTERM")
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    wait_until(lambda: gone(hung), what="the orphaned hook to be ended by its worker", timeout_s=10)
    assert home.current == "genesis"
    daemon.start()
    events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    assert [c["hook"] for c in calls(home)] == ["afterStop", "afterStop"] and home.current == TAG
    home.wait_started(2)
    lives = [(e["event"], e["pid"]) for e in home.node_events() if e["event"] in ("started", "stopped")]
    assert lives[:2] == [("started", old), ("stopped", old)] and len(lives) == 3      # never the old node again


@pytest.mark.timeout(60)
def test_visor_stops_cleanly_while_a_hook_runs(home, daemon, events):
    stubborn = 'trap "" TERM\ntouch "$VISOR_HOME/trapped"\nsleep 1000 & wait'
    set_hooks(home, beforeStop={"path": write_hook(home, "stubborn", stubborn)})
    start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    hook = events.wait_for("hook.started", hook="beforeStop")["pid"]
    wait_until(lambda: (home.root / "trapped").exists(), what="the hook to ignore SIGTERM")
    began = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - began >= SHUTDOWN_GRACE_S - 0.1     # SIGTERM ignored: SIGKILL after the grace
    assert gone(hook) and home.current == "genesis"
    assert "stopped" in [e["event"] for e in home.node_events()]


@pytest.mark.timeout(60)
def test_a_broker_killed_during_before_stop_begins_the_upgrade_again_with_the_hook(home, daemon, events):
    body = '[ -e "$VISOR_HOME/again" ] && exit 0\ntouch "$VISOR_HOME/again"\nsleep 1000\n'
    set_hooks(home, beforeStop={"path": write_hook(home, "announce", body)})
    old = start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    hook = events.wait_for("hook.started", hook="beforeStop")["pid"]
    wait_until(lambda: (home.root / "again").exists(), what="the hook to run")
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    wait_until(lambda: gone(hook), what="the orphaned hook to be ended by its worker")
    daemon.start()
    events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    assert [(c["hook"], c["current"]) for c in calls(home)] == [("beforeStop", "genesis")] * 2
    assert home.current == TAG
    # nothing was switched: the next run started the old folder again (runners end their binaries with the
    # broker, workers/runner.py), which the hook ran beside before its stop
    starts = [e["folder"] for e in home.node_events("started")]
    assert starts[:2] == [str(home.root / "genesis")] * 2 and home.node_events("started")[0]["pid"] == old
    second = calls(home)[1]["node_lines"]
    assert [e["event"] for e in home.node_events()[:second] if e["event"] in ("started", "stopped")] == \
        ["started", "stopped", "started"]


@pytest.mark.timeout(60)
def test_after_start_after_a_broker_killed_past_the_switch_still_knows_the_old_folder(home, daemon, events):
    set_hooks(home, afterStart={"path": write_hook(home, "record")})
    home.stage(TAG, TAG, args=home.node_args("--serve-after", "2"))     # the new node: slow to answer
    daemon.start()
    daemon.wait_running()
    home.announce(TAG, HEIGHT, ready=True)
    wait_until(lambda: home.current == TAG and len(home.node_events("started")) == 2, what="the switch")
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    daemon.start()
    events.wait_for("hook.completed", hook="afterStart", timeout_s=20)
    [call] = calls(home)
    assert (call["from"], call["to"]) == (f"{home.root}/genesis", f"{home.root}/{TAG}")
