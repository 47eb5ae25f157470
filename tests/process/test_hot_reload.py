"""Hot reload: edits of config.toml reach the running daemon, bad ones are rejected and change nothing.

Each test drives the real daemon through the CLI and reads what an operator sees: config.* events and
`visor status --json` (and `visor check`, which reads the same files while the daemon runs). The last
test runs the config watcher alone against a stand-in broker socket, once with inotify and once with
inotify unavailable (the polling fallback), to see what it sends and what it leaves unsent.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import zmq

from tests.helpers import REPO, run_cli, wait_until
from visor import protocol


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
    error = events.wait_for("config.rejected", timeout_s=5)["error"]
    assert error.startswith(f"{home.root}/config.toml: not valid TOML")
    assert "line 2" in error
    assert max_restarts(daemon) == 5
    assert len(events.of("config.reloaded")) == 1


@pytest.mark.timeout(60)
def test_a_wrong_type_is_rejected_and_changes_nothing(home, daemon, events):
    start(daemon)
    home.set_config(maxNumberOfRestarts="three")
    error = events.wait_for("config.rejected", timeout_s=5)["error"]
    assert error == f"{home.root}/config.toml: maxNumberOfRestarts must be a whole number, got 'three'"
    assert max_restarts(daemon) == 3
    assert events.of("config.reloaded") == []


@pytest.mark.timeout(60)
def test_a_deleted_config_is_rejected_and_restoring_it_is_applied(home, daemon, events):
    start(daemon)
    text = (home.root / "config.toml").read_text()
    os.unlink(home.root / "config.toml")
    error = events.wait_for("config.rejected", timeout_s=5)["error"]
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
    # settled: at most a couple of reloads for the whole burst, and the last one says 20
    assert 1 <= len(events.of("config.reloaded")) <= 3
    assert events.of("config.rejected") == []


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


# --- the config watcher alone, against a stand-in broker ---------------------------------------

class StandInBroker:
    """A ROUTER socket where the broker's would be; runs workers/config_watcher.py as its own process."""

    def __init__(self, home, inotify: bool):
        self.endpoint, self.inotify = f"ipc://{home.root}/.visor/t.sock", inotify
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        # inotify_simple = None in sys.modules makes its import fail, as on a system without it
        block = "" if inotify else "sys.modules['inotify_simple'] = None; "
        code = f"import sys; {block}from workers.config_watcher import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "--endpoint", self.endpoint, "--home", str(home.root),
             "--broker-pid", str(os.getpid())], cwd=REPO, stderr=subprocess.PIPE, text=True)

    def next_report(self, timeout_s: float = 5.0):
        """The next message that is not a Hello or Heartbeat."""
        deadline = time.monotonic() + timeout_s
        while (left_ms := (deadline - time.monotonic()) * 1000) > 0:
            if self._sock.poll(left_ms):
                msg = protocol.decode(self._sock.recv_multipart()[1])
                if not isinstance(msg, (protocol.Hello, protocol.Heartbeat)):
                    return msg
        raise AssertionError(f"no report from the config watcher within {timeout_s}s")

    def shutdown(self) -> tuple[int, str]:
        self._sock.send_multipart([b"config-watcher", protocol.encode(protocol.Shutdown())])
        try:
            _out, err = self.proc.communicate(timeout=5)
        finally:
            self.proc.kill()
            self._sock.close()
            self._ctx.term()
        return self.proc.returncode, err


@pytest.fixture(params=["inotify", "polling"])
def stand_in(request, home):
    broker = StandInBroker(home, inotify=request.param == "inotify")
    yield broker
    if broker.proc.poll() is None:
        broker.proc.kill()
        broker.proc.wait(5)


def restarts_in(msg) -> int:
    assert isinstance(msg, protocol.ConfigLoaded), msg
    return msg.values["max_restarts"]


@pytest.mark.timeout(30)
def test_the_watcher_alone_reports_changes_of_content_only(home, stand_in):
    config = home.root / "config.toml"
    assert restarts_in(stand_in.next_report()) == 3                 # the report every start owes
    os.utime(config)                                                 # touched: same bytes
    config.write_bytes(config.read_bytes())                          # rewritten: same bytes
    home.set_config(maxNumberOfRestarts=4)
    assert restarts_in(stand_in.next_report()) == 4                  # nothing came for the two above
    # vi's way: the old file renamed away, a new one written under the name
    text = config.read_text()
    os.replace(config, home.root / "config.toml~")
    config.write_text(text.replace("maxNumberOfRestarts = 4", "maxNumberOfRestarts = 5"))
    assert restarts_in(stand_in.next_report()) == 5
    os.unlink(config)
    assert stand_in.next_report() == protocol.ConfigRejected(error=f"{config}: file not found")
    config.write_text(text)
    assert restarts_in(stand_in.next_report()) == 4
    code, stderr = stand_in.shutdown()
    assert code == 0, stderr
    assert ("inotify unavailable" in stderr) == (not stand_in.inotify)    # the path we meant to test
