"""Upgrade hooks end to end (issue 13, SPEC §4 [upgradeHooks], §5 hook.*, §7): the real daemon, the
hooks worker and the fake node. Each hook is a small bash script written into the home (hookkit.py); it
records how it was called (its environment, folder, args, how many lines the fake node's log had, where
`current` pointed) as one JSON line in HOME/hooks.jsonl, then does what the test says."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import threading

import pytest

from tests.helpers import REPO, run_cli, wait_until
from tests.process.hookkit import (HEIGHT, TAG, calls, gone, no_hook_left, set_hooks, start,  # noqa: F401
                                   untouched, write_hook)

# SIGTERM is noted and ignored (give it the time to set its trap, on a loaded machine too); a background sleep is left in the group; the hook never ends by itself
HUNG = """trap 'echo term >> "$VISOR_HOME/hung.log"' TERM
sleep 1000 &
echo $! >> "$VISOR_HOME/hung.log"
while true; do sleep 0.1; done
"""


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
    set_hooks(home, beforeStop={"path": write_hook(home, "hung", HUNG), "timeoutSeconds": 2})
    old = start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    started = events.wait_for("hook.started", hook="beforeStop")
    failed = events.wait_for("hook.failed", hook="beforeStop", timeout_s=15)
    assert failed["error"] == "timed out after 2 s" and failed["duration_ms"] >= 6500   # SIGTERM ignored: SIGKILL
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
def test_visor_restart_is_refused_while_an_upgrade_is_in_flight_and_the_hook_runs_once(home, daemon, events):
    # a restart would end the hook (a long backup started over) and send the stop again: not now
    set_hooks(home, afterStop={"path": write_hook(home, "slow", "sleep 2")})
    start(home, daemon)
    home.announce(TAG, HEIGHT, ready=True)
    events.wait_for("hook.started", hook="afterStop")
    done = run_cli("restart", "--home", home.root)
    assert done.returncode == 1 and done.stderr.strip() == \
        "visor: visor refused the request: upgrading to v0.73.0 (afterStop); a restart now would " \
        "interrupt it: ask again once the upgrade has completed"
    events.wait_for("upgrade.completed", timeout_s=20, tag=TAG)
    assert len(events.of("hook.started", hook="afterStop")) == 1 and len(calls(home, "afterStop")) == 1
