"""What the hook process tests share (tests/process/test_hooks*.py): hook scripts written into the home
that record how they were called, and the check that nothing a hook started is left running."""

from __future__ import annotations

import json

import psutil
import pytest

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
