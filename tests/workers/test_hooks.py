"""workers/hooks.py as a real process against a fake broker: what a hook is given, how its end is
reported, and that nothing of a hook is left running, whichever way it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.fakes.broker import FakeBroker
from tests.helpers import wait_until
from visor import protocol
from workers.hooks import KILL_AFTER_S

ENV = {"VISOR_HOOK": "afterStop", "VISOR_HOME": "/srv/visor", "VISOR_UPGRADE_TAG": "v0.73.0",
       "VISOR_UPGRADE_HEIGHT": "120", "VISOR_FROM_FOLDER": "/srv/visor/genesis", "VISOR_TO_FOLDER": "/srv/visor/v0.73.0"}


@pytest.fixture
def folder(home) -> Path:
    """Where the hooks live and run: the test's home, so a hook left running fails the test."""
    return home.root


@pytest.fixture
def broker(fake_broker) -> FakeBroker:
    return fake_broker("workers.hooks", "hooks")


def script(folder: Path, name: str, body: str) -> str:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def run(broker: FakeBroker, path: str, *args: str, timeout_s: float = 30, hook: str = "afterStop") -> None:
    broker.send(protocol.RunHook(hook=hook, path=path, args=list(args), timeout_s=timeout_s,
                                 env={**ENV, "VISOR_HOOK": hook}, cwd=str(broker.folder)))


# ignores SIGTERM, and so does the child it leaves in the background; the marker says the trap is set
STUBBORN = "trap '' TERM\ntouch trapped\nsleep 300 &\nsleep 300\n"


def trapped(broker: FakeBroker) -> None:
    """Wait until a STUBBORN hook has set its trap: a SIGTERM before that would end it at once."""
    wait_until(lambda: (Path(broker.folder) / "trapped").exists(), what="the hook to ignore SIGTERM")


def next_of(broker: FakeBroker, kind: type, timeout_s: float = 5.0):
    """The next message of this kind (earlier ones of other kinds are kept in `received`)."""
    return broker.next_report(timeout_s, kinds=(kind,))


def alive_in_group(pgid: int) -> list[int]:
    """Processes of this group still running (zombies waiting for init to reap them do not count)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def assert_group_ends(pgid: int, timeout_s: float = 2.0) -> None:
    try:
        wait_until(lambda: not alive_in_group(pgid), what=f"process group {pgid} to end", timeout_s=timeout_s)
    except AssertionError:
        os.killpg(pgid, signal.SIGKILL)          # leave nothing, even when failing
        raise


def test_a_hook_gets_its_environment_folder_and_args_and_its_output_reaches_stdout(broker, folder):
    hook = script(folder, "ok", 'echo "out: $VISOR_HOOK $VISOR_UPGRADE_TAG $VISOR_UPGRADE_HEIGHT $(pwd) $1 $2"\n'
                                'echo "err: $VISOR_FROM_FOLDER -> $VISOR_TO_FOLDER $VISOR_HOME PATH=${PATH:+set}" >&2\n')
    run(broker, hook, "--flag", "two words", hook="beforeStop")
    started = next_of(broker, protocol.HookStarted)
    finished = next_of(broker, protocol.HookFinished)
    assert started.hook == finished.hook == "beforeStop" and started.pid > 0
    assert (finished.ok, finished.exitcode, finished.error) == (True, 0, "")
    assert 0 < finished.duration_ms < 5000
    assert f"out: beforeStop v0.73.0 120 {folder} --flag two words" in broker.stdout
    assert "err: /srv/visor/genesis -> /srv/visor/v0.73.0 /srv/visor PATH=set" in broker.stderr
    assert_group_ends(started.pid)


def test_a_failing_hook_reports_its_exit_code(broker, folder):
    run(broker, script(folder, "fail", "exit 3\n"))
    started = next_of(broker, protocol.HookStarted)
    finished = next_of(broker, protocol.HookFinished)
    assert (finished.ok, finished.exitcode, finished.error) == (False, 3, "exited with code 3")
    assert_group_ends(started.pid)


def test_a_hook_killed_by_a_signal_reports_it(broker, folder):
    run(broker, script(folder, "killed", "kill -KILL $$\n"))
    finished = next_of(broker, protocol.HookFinished)
    assert (finished.ok, finished.exitcode) == (False, -9)
    assert finished.error == "exited with code -9 (killed by SIGKILL)"


def test_what_a_hook_leaves_in_the_background_is_killed_when_it_exits(broker, folder):
    run(broker, script(folder, "bg", "sleep 300 &\necho $! > bg.pid\nexit 0\n"))
    started = next_of(broker, protocol.HookStarted)
    assert next_of(broker, protocol.HookFinished).ok
    assert_group_ends(started.pid)


@pytest.mark.timeout(30)
def test_a_hung_hook_is_killed_whole_at_its_timeout(broker, folder):
    # only SIGKILL ends it (the timeout leaves a loaded machine time to set the trap first)
    run(broker, script(folder, "hung", STUBBORN), timeout_s=1.5)
    started = next_of(broker, protocol.HookStarted)
    trapped(broker)
    finished = next_of(broker, protocol.HookFinished, timeout_s=1.5 + KILL_AFTER_S + 5)
    assert (finished.ok, finished.exitcode, finished.error) == (False, None, "timed out after 1.5 s")
    assert 1.5 + KILL_AFTER_S <= finished.duration_ms / 1000 < 1.5 + KILL_AFTER_S + 3
    assert_group_ends(started.pid)
    # heartbeats went on while it ran (the link is served between the hook's deadlines)
    assert broker.proc.poll() is None


def test_a_hung_hook_that_obeys_sigterm_ends_at_once(broker, folder):
    run(broker, script(folder, "slow", "sleep 300 &\nsleep 300\n"), timeout_s=0.3)
    started = next_of(broker, protocol.HookStarted)
    finished = next_of(broker, protocol.HookFinished)
    assert finished.error == "timed out after 0.3 s" and finished.duration_ms < 3000
    assert_group_ends(started.pid)


@pytest.mark.parametrize("make, why", [
    (lambda folder: str(folder / "missing"), "No such file or directory"),
    (lambda folder: str((folder / "plain").write_text("#!/bin/sh\n") and folder / "plain"), "Permission denied"),
])
def test_a_hook_that_cannot_start_fails_without_starting(broker, folder, make, why):
    path = make(folder)
    run(broker, path)
    finished = next_of(broker, protocol.HookFinished)
    assert (finished.ok, finished.exitcode) == (False, None)
    assert finished.error == f"cannot start {path}: {why}"
    assert not broker.of(protocol.HookStarted)


def test_a_second_hook_supersedes_the_running_one_which_is_ended_and_reported_first(broker, folder):
    # the broker asks for another hook only when it gave up the upgrade the running one belongs to
    run(broker, script(folder, "stubborn", STUBBORN), hook="afterStart")
    first = next_of(broker, protocol.HookStarted)
    trapped(broker)
    run(broker, script(folder, "never", "exit 0\n"), hook="afterStop")
    run(broker, script(folder, "ok", "exit 0\n"), hook="beforeStop")
    ended = next_of(broker, protocol.HookFinished, timeout_s=KILL_AFTER_S + 5)
    assert (ended.hook, ended.ok, ended.error) == ("afterStart", False, "stopped: superseded by afterStop")
    assert ended.duration_ms >= KILL_AFTER_S * 1000                     # SIGTERM ignored: SIGKILL, later
    assert_group_ends(first.pid)
    skipped = next_of(broker, protocol.HookFinished)
    assert (skipped.hook, skipped.ok, skipped.error) == ("afterStop", False, "superseded by a later hook before it started")
    assert next_of(broker, protocol.HookStarted).hook == "beforeStop"
    last = next_of(broker, protocol.HookFinished)
    assert (last.hook, last.ok) == ("beforeStop", True)


def test_shutdown_mid_hook_ends_the_hook_and_everything_it_started(broker, folder):
    run(broker, script(folder, "stubborn", STUBBORN))
    started = next_of(broker, protocol.HookStarted)
    trapped(broker)
    began = time.monotonic()
    broker.send(protocol.Shutdown())
    finished = next_of(broker, protocol.HookFinished)
    assert (finished.ok, finished.exitcode) == (False, None) and "shutting down" in finished.error
    assert broker.proc.wait(5) == 0 and time.monotonic() - began < 5
    assert_group_ends(started.pid)


def test_when_the_broker_dies_mid_hook_the_worker_ends_the_hook_and_leaves(fake_broker, folder):
    stand_in = subprocess.Popen(["sleep", "300"])       # the worker's "broker": its death is the signal
    try:
        broker = fake_broker("workers.hooks", "hooks", broker_pid=stand_in.pid)
        run(broker, script(folder, "long", "sleep 300 &\nsleep 300\n"))
        started = next_of(broker, protocol.HookStarted)
        stand_in.kill()
        stand_in.wait(5)
        assert broker.proc.wait(5) == 0
        assert_group_ends(started.pid)
    finally:
        stand_in.kill()
        stand_in.wait(5)
