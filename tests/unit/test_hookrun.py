"""visor/hookrun.py, the broker's side of hooks: the command it sends, the order it reads reports in,
and what it ends when the hooks worker dies."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.helpers import wait_until
from visor import protocol as p
from visor.config import VisorConfig
from visor.facts import RunHook
from visor.hookrun import Hooks, end_leftovers

CFG = VisorConfig(upgrade_hooks={name: {"path": "hooks/h", "args": ["-v"], "timeout_s": 9, "required": True}
                                 for name in ("beforeStop", "afterStop", "afterStart")})


def action(hook="beforeStop", tag="v0.73.0"):
    return RunHook(hook, tag, 120, "genesis", tag)


def test_the_command_carries_the_program_args_timeout_folder_and_environment():
    cmd = Hooks(Path("/srv/visor")).command(action(), CFG)
    assert (cmd.path, cmd.args, cmd.timeout_s, cmd.cwd) == ("/srv/visor/hooks/h", ["-v"], 9.0, "/srv/visor")
    assert cmd.env == {"VISOR_HOOK": "beforeStop", "VISOR_HOME": "/srv/visor", "VISOR_UPGRADE_TAG": "v0.73.0",
                       "VISOR_UPGRADE_HEIGHT": "120", "VISOR_FROM_FOLDER": "/srv/visor/genesis",
                       "VISOR_TO_FOLDER": "/srv/visor/v0.73.0"}


def test_a_hook_no_longer_configured_passes_without_running():
    hooks = Hooks(Path("/srv/visor"))
    assert hooks.command(action(), VisorConfig()) == p.HookFinished(hook="beforeStop", ok=True, duration_ms=0.0)
    assert hooks.status() is None


def test_reports_are_read_in_the_order_hooks_were_sent_and_only_the_last_end_is_awaited():
    hooks = Hooks(Path("/srv/visor"))
    hooks.command(action("afterStart", "v0.73.0"), CFG)
    assert hooks.started(p.HookStarted(hook="afterStart", pid=41)) == {"hook": "afterStart", "tag": "v0.73.0",
                                                                       "pid": 41}
    hooks.command(action("beforeStop", "v0.74.0"), CFG)            # the first one's upgrade was given up
    assert hooks.status()["name"] == "afterStart" and hooks.status()["pid"] == 41     # what runs now
    stale = hooks.finished(p.HookFinished(hook="afterStart", ok=False, duration_ms=5.0, exitcode=-15,
                                          error="stopped: superseded by beforeStop"))
    assert stale[0] == "hook.failed" and stale[1]["tag"] == "v0.73.0" and stale[2] is False
    assert hooks.started(p.HookStarted(hook="beforeStop", pid=42))["tag"] == "v0.74.0"
    assert hooks.finished(p.HookFinished(hook="beforeStop", ok=True, duration_ms=1.0)) == \
        ("hook.completed", {"hook": "beforeStop", "tag": "v0.74.0", "duration_ms": 1.0}, True)
    assert hooks.status() is None
    assert hooks.finished(p.HookFinished(hook="beforeStop", ok=True, duration_ms=1.0)) is None   # stray


def test_a_dead_worker_fails_every_hook_sent_and_kills_one_it_never_reported_started():
    hooks = Hooks(Path("/srv/visor"))
    hooks.command(action("afterStop"), CFG)
    # the worker started the hook and died before its HookStarted left: the hook is our child now
    env = {**os.environ, "VISOR_HOOK": "afterStop", "VISOR_UPGRADE_TAG": "v0.73.0"}
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    try:
        wait_until(lambda: psutil.Process(orphan.pid).environ().get("VISOR_HOOK"), what="the hook's exec")
        ends = hooks.worker_died(-9, known_pids=set())
        assert orphan.wait(5) == -9
    finally:
        orphan.kill()
        orphan.wait()
    assert [(e.hook, e.ok, e.error) for e in ends] == [("afterStop", False, "the hooks worker died (exit code -9)")]


def test_a_hook_caught_between_its_fork_and_its_exec_is_waited_for_and_killed():
    # the worker died right after forking the hook: the child still runs our code, without the
    # hook's environment or group; it is given a moment to exec, then found and killed all the same
    hooks = Hooks(Path("/srv/visor"))
    hooks.command(action("afterStop"), CFG)
    env = {**os.environ, "VISOR_HOOK": "afterStop", "VISOR_UPGRADE_TAG": "v0.73.0"}
    pid = os.fork()
    if pid == 0:                                     # the hook, slow to exec
        try:
            time.sleep(0.1)
            os.setsid()
            os.execve(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)"], env)
        finally:
            os._exit(1)
    try:
        hooks.worker_died(-9, known_pids=set())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -9
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_hooks_a_previous_run_left_are_ended_at_start_and_only_this_homes(tmp_path):
    mine = {**os.environ, "VISOR_HOOK": "beforeStop", "VISOR_HOME": str(tmp_path)}
    other = {**mine, "VISOR_HOME": "/srv/another"}
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
             for env in (mine, other)]
    try:
        for proc in procs:
            wait_until(lambda: psutil.Process(proc.pid).environ().get("VISOR_HOOK"), what="the hook's exec")
        assert end_leftovers(tmp_path) == [procs[0].pid]
        assert procs[0].wait(5) == -9 and procs[1].poll() is None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
