"""The event history of the real daemon: the same events as the stream from the first on, `--since`
across daemon runs and a rotation, the seam between history and live stream, a history that cannot be
written, and the story of an overnight upgrade told the next morning."""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from tests.helpers import VISOR, run_cli, wait_until
from visor.history import read_history

pytestmark = pytest.mark.timeout(90)


def recorded(home) -> list[dict]:
    return list(read_history(home.root / ".visor"))


def since(home, *args: str) -> list[dict]:
    done = run_cli("events", "--home", home.root, "--json", "--no-follow", *args)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def runs(events: list[dict]) -> list[list[int]]:
    """The seqs of each daemon run, split where seq starts again."""
    found: list[list[int]] = []
    for e in events:
        if not found or e["seq"] <= found[-1][-1]:
            found.append([])
        found[-1].append(e["seq"])
    return found


def test_the_history_is_the_stream_event_for_event_from_the_first(home, daemon, events):
    daemon.start()
    daemon.wait_running()
    assert daemon.stop() == 0
    events.wait_for("visor.stopped")
    history = recorded(home)
    assert history[0]["type"] == "visor.started" and history[0]["seq"] == 1
    assert history[-1]["type"] == "visor.stopped"
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    by_seq = {e["seq"]: e for e in history}
    assert events.received and all(by_seq[e["seq"]] == e for e in events.received)   # ts and all
    assert since(home) == history                          # --no-follow alone: everything recorded


def test_since_spans_daemon_runs_and_a_rotation(home, daemon):
    home.set_config(eventsHistoryMaxBytes=3000)
    for _run in range(3):
        daemon.start()
        daemon.wait_running()
        assert daemon.stop() == 0
    files = [home.root / ".visor" / name for name in ("events.jsonl.1", "events.jsonl")]
    assert all(f.exists() and f.stat().st_size <= 3000 for f in files)
    shown = since(home, "--since", "1h")
    assert shown == recorded(home) and len(shown) > 10
    assert shown[-1]["type"] == "visor.stopped"
    assert sum(e["type"] == "visor.started" for e in shown) >= 2    # at least two runs still recorded
    for seqs in runs(shown)[1:]:                          # each whole run, in order, nothing lost
        assert seqs == list(range(1, len(seqs) + 1))


def test_the_seam_between_history_and_live_stream_has_no_gap_and_no_duplicate(home, daemon):
    daemon.start()
    daemon.wait_running()
    editing = threading.Event()
    editing.set()

    def edit_config():                                    # config.reloaded several times a second, throughout
        delay = 0
        while editing.is_set():
            delay = 1 - delay
            home.set_config(stopDelaySeconds=delay)
            time.sleep(0.15)                              # the pace of an operator's edits, not a wait for a result

    editor = threading.Thread(target=edit_config)
    editor.start()
    wait_until(lambda: len(recorded(home)) > 15, what="events before the follower starts", timeout_s=15)
    follower = subprocess.Popen([*VISOR, "events", "--home", str(home.root), "--json", "--since", "1h"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: list[dict] = []
    reader = threading.Thread(target=lambda: printed.extend(json.loads(line) for line in follower.stdout))
    reader.start()
    try:
        wait_until(lambda: len(recorded(home)) > 40, what="more events while it follows", timeout_s=20)
        editing.clear()
        editor.join(5)
        last = recorded(home)[-1]
        wait_until(lambda: last in printed, what=f"the follower to print seq {last['seq']}", timeout_s=10)
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 0
    finally:
        editing.clear()
        if follower.poll() is None:
            follower.kill()
        reader.join(10)
        err = follower.stderr.read()
        follower.stderr.close()
    assert err == ""
    history = recorded(home)
    assert printed == history[:len(printed)]              # in order from the first, nothing missing, nothing twice


def test_follow_prints_what_comes_after_the_history(home, daemon):
    daemon.start()
    daemon.wait_running()
    follower = subprocess.Popen([*VISOR, "events", "--home", str(home.root), "--since", "1h"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = follower.stdout.readline()
        assert " #1 visor.started " in first
        daemon.stop()
        wait_until(lambda: recorded(home)[-1]["type"] == "visor.stopped", what="visor.stopped recorded")
        for line in follower.stdout:                      # the live stream, up to the last event of the run
            if " visor.stopped " in line:
                break
        else:
            pytest.fail("visor.stopped never printed")
    finally:
        follower.send_signal(signal.SIGINT)
        follower.communicate(timeout=10)
    assert follower.returncode == 0


@pytest.mark.parametrize("how", ["full disk", "read-only file"])
def test_a_history_that_cannot_be_written_costs_only_the_history(home, daemon, events, how):
    path = home.root / ".visor" / "events.jsonl"
    path.parent.mkdir(exist_ok=True)
    if how == "full disk":
        path.symlink_to("/dev/full")                      # every write fails with ENOSPC
    else:
        path.write_text("")
        path.chmod(0o444)
    with read_only_for_root(path):
        home.stage("v0.73.0", "v0.73.0")
        daemon.start()
        daemon.wait_running()
        home.announce("v0.73.0", 120, ready=True)         # the node keeps being carried through upgrades
        events.wait_for("upgrade.completed", tag="v0.73.0", timeout_s=20)
        assert daemon.stop() == 0
    warnings = [line for line in daemon.stderr.splitlines() if "event history" in line]
    assert len(warnings) == 1 and str(path) in warnings[0], daemon.stderr
    assert since(home) == []


@contextlib.contextmanager
def read_only_for_root(path):
    """Root writes to a file whatever its mode: a read-only bind mount of it stops even root."""
    if os.geteuid() != 0 or path.is_symlink():
        yield
        return
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, text=True)
    if done.returncode == 0:
        done = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["umount", str(path)], capture_output=True)
        pytest.skip(f"root writes to a read-only file, and a read-only bind mount failed: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_the_morning_after_an_upgrade_the_whole_story_is_there(home, daemon):
    home.stage("v0.73.0", "v0.73.0")
    daemon.start()
    daemon.wait_running()
    home.announce("v0.73.0", 120)
    wait_until(lambda: any(e["type"] == "upgrade.accepted" for e in recorded(home)), what="upgrade.accepted")
    home.announce("v0.73.0", 120, ready=True)
    wait_until(lambda: any(e["type"] == "upgrade.completed" for e in recorded(home)), what="upgrade.completed",
               timeout_s=20)
    assert daemon.stop() == 0
    done = run_cli("events", "--home", home.root, "--since", "12h", "--no-follow")    # a fresh terminal
    assert done.returncode == 0 and done.stderr == ""
    story = [line for line in done.stdout.splitlines() if " upgrade." in line]
    assert [line.split()[2] for line in story] == ["upgrade.accepted", "upgrade.ready", "upgrade.started",
                                                   "upgrade.completed"]
    assert "tag=v0.73.0 height=120" in story[0] and "downtime_ms=" in story[-1]
    downtime = float(story[-1].rpartition("downtime_ms=")[2].split()[0])
    assert downtime >= 0
    lines = done.stdout.splitlines()
    assert " visor.started " in lines[0] and " visor.stopped " in lines[-1]
    stops = [i for i, line in enumerate(lines) if " binary.exited " in line]
    assert lines.index(story[2]) < stops[0] < lines.index(story[3])    # the old node went down in between


def test_the_history_limit_is_hot_reloaded(home, daemon, events):
    home.set_config(maxNumberOfRestartConnectionRetries=100000)
    daemon.start()
    daemon.wait_running()
    home.set_config(maxNumberOfRestartConnectionRetries=100000, eventsHistoryMaxBytes=2000)
    events.wait_for("config.reloaded")
    home.announce(reply="error")                          # ten events a second
    older = home.root / ".visor" / "events.jsonl.1"
    wait_until(older.exists, what="a rotation at the new limit", timeout_s=20)
    assert older.stat().st_size <= 2000 and (home.root / ".visor" / "events.jsonl").stat().st_size <= 2000
    assert daemon.stop() == 0
