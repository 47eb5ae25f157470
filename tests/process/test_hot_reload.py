"""Hot reload: edits of config.toml reach the running daemon, bad ones are rejected and change nothing.

Each test drives the real daemon through the CLI and reads what an operator sees: config.* events and
`visor status --json` (and `visor check`, which reads the same files while the daemon runs). The
config watcher alone, against a stand-in broker, is tested in tests/workers/test_config_watcher.py.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests.helpers import run_cli, wait_until


def start(daemon) -> int:
    """Starts the daemon; returns the vega pid once it is running."""
    daemon.start()
    status = daemon.wait_running()
    return status["binaries"]["vega"]["pid"]


def max_restarts(daemon) -> int:
    return daemon.status()["restarts"]["max"]


def replace_config(home, text: str) -> None:
    """As editors and templating tools do: a temp file in the same folder, renamed over the old one."""
    tmp = home.root / ".config.toml.tmp"
    tmp.write_text(text)
    os.replace(tmp, home.root / "config.toml")


def first_rejection(events) -> str:
    """The first config.rejected error that is not the file caught empty between the truncate and the
    write of an in-place edit (on a loaded machine a read can fall there; rejecting it is right)."""
    return wait_until(lambda: [e["error"] for e in events.of("config.rejected") if "is empty" not in e["error"]],
                      what="a config.rejected", timeout_s=5)[0]


@pytest.mark.timeout(60)
def test_an_edit_in_place_is_applied_and_shows_in_status(home, daemon, events):
    start(daemon)
    assert max_restarts(daemon) == 3
    home.set_config(maxNumberOfRestarts=7)               # write_text: truncate and write the same inode
    reloaded = events.wait_for("config.reloaded", timeout_s=5)
    assert reloaded["changed"] == ["maxNumberOfRestarts"]
    assert reloaded["restart_required"] == []
    assert max_restarts(daemon) == 7


@pytest.mark.timeout(60)
def test_an_edit_by_rename_is_applied(home, daemon, events):
    start(daemon)
    text = (home.root / "config.toml").read_text().replace("maxNumberOfRestarts = 3", "maxNumberOfRestarts = 9")
    replace_config(home, text)
    events.wait_for("config.reloaded", timeout_s=5)
    assert max_restarts(daemon) == 9
    replace_config(home, text.replace("maxNumberOfRestarts = 9", "maxNumberOfRestarts = 4"))   # and again
    wait_until(lambda: len(events.of("config.reloaded")) == 2, what="a second config.reloaded", timeout_s=5)
    assert max_restarts(daemon) == 4


@pytest.mark.timeout(60)
def test_invalid_toml_is_rejected_naming_file_and_line_and_the_old_config_stays(home, daemon, events):
    start(daemon)
    home.set_config(maxNumberOfRestarts=5)
    events.wait_for("config.reloaded", timeout_s=5)
    (home.root / "config.toml").write_text("maxNumberOfRestarts = 6\nrestartsDelaySeconds = = 1\n")
    error = first_rejection(events)
    assert error.startswith(f"{home.root}/config.toml: not valid TOML")
    assert "line 2" in error
    assert max_restarts(daemon) == 5
    assert len(events.of("config.reloaded")) == 1


@pytest.mark.timeout(60)
def test_a_wrong_type_is_rejected_and_changes_nothing(home, daemon, events):
    start(daemon)
    home.set_config(maxNumberOfRestarts="three")
    error = first_rejection(events)
    assert error == f"{home.root}/config.toml: maxNumberOfRestarts must be a whole number, got 'three'"
    assert max_restarts(daemon) == 3
    assert events.of("config.reloaded") == []


@pytest.mark.timeout(60)
def test_a_deleted_config_is_rejected_and_restoring_it_is_applied(home, daemon, events):
    start(daemon)
    text = (home.root / "config.toml").read_text()
    os.unlink(home.root / "config.toml")
    error = first_rejection(events)
    assert error == f"{home.root}/config.toml: file not found"
    assert max_restarts(daemon) == 3
    (home.root / "config.toml").write_text(text.replace("maxNumberOfRestarts = 3", "maxNumberOfRestarts = 8"))
    events.wait_for("config.reloaded", timeout_s=5)
    assert max_restarts(daemon) == 8


@pytest.mark.timeout(60)
def test_rapid_successive_edits_end_with_the_last(home, daemon, events):
    start(daemon)
    for n in range(10, 21):                          # eleven writes within a few milliseconds
        home.set_config(maxNumberOfRestarts=n)
    wait_until(lambda: max_restarts(daemon) == 20, what="restarts.max 20", timeout_s=5)
    # settled: at most a couple of reloads for the whole burst, and the last one says 20. Each write
    # truncates then writes (as `cat >` does): a read in between finds the file empty, which is rejected
    # as half-written (the running config stays), never applied; nothing else is rejected
    assert 1 <= len(events.of("config.reloaded")) <= 3
    assert all("is empty (half-written?)" in e["error"] for e in events.of("config.rejected"))


@pytest.mark.timeout(60)
def test_an_edit_after_a_kill_9_of_the_config_watcher_is_applied_and_the_node_is_untouched(home, daemon, events):
    vega_pid = start(daemon)
    watcher = daemon.status()["workers"]["config-watcher"]["pid"]
    os.kill(watcher, signal.SIGKILL)
    home.set_config(maxNumberOfRestarts=6)           # maybe while it is down: its first report covers it
    events.wait_for("worker.exited", worker="config-watcher", pid=watcher, timeout_s=5)
    wait_until(lambda: max_restarts(daemon) == 6, what="restarts.max 6", timeout_s=5)
    status = daemon.status()
    assert status["workers"]["config-watcher"]["pid"] != watcher
    assert status["workers"]["config-watcher"]["restarts"] == 1
    assert status["binaries"]["vega"]["pid"] == vega_pid
    assert events.of("binary.exited") == []
    home.set_config(maxNumberOfRestarts=2)           # and the new watcher watches
    wait_until(lambda: max_restarts(daemon) == 2, what="restarts.max 2", timeout_s=5)


@pytest.mark.timeout(60)
def test_check_works_while_the_daemon_runs(home, daemon):
    shutil.rmtree(home.root / "vX.X.X")                    # init's example folder: placeholders only
    daemon.start()
    daemon.wait_running()
    done = run_cli("check", "--home", home.root)           # reads only: no lock, no socket
    assert done.returncode == 0, done.stdout + done.stderr
    assert daemon.status()["visor"]["state"] == "running"


def test_a_log_level_given_on_the_command_line_wins_over_an_edit_of_log_level(home, daemon, events):
    # regression: a reload of logLevel replaced `visor run --log-level`, which the docs say wins
    daemon.start("--log-level", "WARNING")
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    home.set_config(logLevel="DEBUG", stopDelaySeconds=1)
    events.wait_for("config.reloaded")
    os.kill(node, signal.SIGKILL)                       # logged at INFO and DEBUG by a DEBUG broker
    events.wait_for("binary.started", timeout_s=10)
    assert daemon.stop() == 0
    assert " DEBUG " not in daemon.stderr and " INFO " not in daemon.stderr


@pytest.mark.timeout(60)
def test_an_unknown_key_is_warned_about_once_and_a_new_one_when_it_comes(home, daemon, events):
    """At start the broker warns; the config watcher's first report, of the same file, must not warn again."""
    config = home.root / "config.toml"
    config.write_text("fooBar = 1\n" + config.read_text())
    start(daemon)
    wait_until(lambda: f"{config}: loaded" in daemon.stderr, what="the config watcher's first report")
    replace_config(home, "barBaz = 2\n" + config.read_text())       # reported after the first report
    wait_until(lambda: "unknown key 'barBaz' ignored" in daemon.stderr, what="the warning about barBaz")
    home.set_config(maxNumberOfRestarts=7)                           # an edit of a known key: no new warning
    events.wait_for("config.reloaded", timeout_s=5)
    assert daemon.stop() == 0
    assert daemon.stderr.count("unknown key 'fooBar' ignored") == 1, daemon.stderr
    assert daemon.stderr.count("unknown key 'barBaz' ignored") == 1, daemon.stderr
