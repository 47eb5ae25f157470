"""Every command against a home it cannot use (missing, a file, H/.visor a file, no permission): one line
naming the thing and the problem, exit 1, never a traceback; and `visor-init`'s own name in its usage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO, VISOR, end_leftovers, run_cli
from visor.home import init_home

pytestmark = pytest.mark.timeout(120)

COMMANDS = {                     # every command that takes --home, as an operator types it
    "status": ["status"],
    "stop": ["stop"],
    "restart": ["restart"],
    "events": ["events"],        # follows: with a bad home it must not wait for ever
    "events-history": ["events", "--no-follow"],
    "check": ["check"],
    "run": ["run"],
    "fetch": ["fetch", "v1.0.0"],
}
USES_RUNTIME = {"status", "stop", "restart", "events", "events-history", "run"}    # what needs H/.visor


@pytest.fixture
def tmp():
    root = Path(tempfile.mkdtemp(prefix="vb", dir="/tmp"))
    yield root
    end_leftovers(root)                  # a command that should have refused must have started nothing
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            os.chmod(path, 0o700)
    shutil.rmtree(root, ignore_errors=True)


def bad_home(tmp: Path, kind: str) -> tuple[Path, str]:
    """A home of that kind, and the line every command must print about it."""
    if kind == "missing":
        h = tmp / "h"
        return h, f"{h}: home folder not found (create it with `visor-init --home {h}`)"
    if kind == "under-a-file":
        (tmp / "f").write_text("")
        h = tmp / "f" / "h"
        return h, f"{h}: home folder not found (create it with `visor-init --home {h}`)"
    if kind == "file":
        h = tmp / "h"
        h.write_text("not a home\n")
        return h, f"{h}: not a folder; --home names a Visor home folder"
    raise AssertionError(kind)


def one_line(done, expected: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stderr == f"visor: {expected}\n"


@pytest.mark.parametrize("kind", ["missing", "under-a-file", "file"])   # no permission: see the test below
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_on_a_home_it_cannot_use_is_one_line(tmp, command, kind):
    home, expected = bad_home(tmp, kind)
    one_line(run_cli(*COMMANDS[command], "--home", home, timeout_s=30), expected)


@pytest.mark.parametrize("command", sorted(USES_RUNTIME | {"check"}))   # fetch never uses H/.visor
def test_every_command_on_a_home_whose_runtime_folder_is_a_file(tmp, command):
    home = init_home(tmp / "h").root
    (home / ".visor").rmdir()
    (home / ".visor").write_text("")
    done = run_cli(*COMMANDS[command], "--home", home, timeout_s=30)
    line = f"{home}/.visor: not a folder; Visor keeps its sockets, lock and state there (remove or rename it)"
    if command in USES_RUNTIME:
        one_line(done, line)
    else:                                             # check: one problem among the others it lists
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert line in done.stdout.splitlines()


def test_no_permission_on_the_home_is_one_line_also_as_root(tmp, monkeypatch):
    """Root (CI, containers) reads any folder, so no chmod can take the permission away: the check
    itself, with access() saying no."""
    from visor import cli
    home = init_home(tmp / "h").root
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != home)
    with pytest.raises(cli.VisorError, match=f"^{home}: not accessible \\(permission denied\\)$"):
        cli.home_of(home)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != home / ".visor")
    cli.home_of(home, runtime=False)                 # check and fetch do not use H/.visor
    with pytest.raises(cli.VisorError, match=f"^{home}/.visor: not accessible \\(permission denied\\)$"):
        cli.home_of(home)


def test_output_into_a_closed_pipe_is_no_traceback():
    # `visor status | head -3` closed the pipe under visor's feet: BrokenPipeError and a traceback
    proc = subprocess.Popen([*VISOR, "version", "--output", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                               # the reader has gone before visor writes
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()


def test_visor_init_names_itself_in_its_usage(tmp):
    done = run_cli("init", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: visor init ")
    done = visor_init("--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: visor-init "), done.stdout
    done = visor_init()
    assert done.returncode == 2 and done.stderr.startswith("usage: visor-init ")
    assert "visor-init: error: the following arguments are required: --home" in done.stderr
    done = visor_init("--home", tmp / "new")
    assert done.returncode == 0 and (tmp / "new" / "config.toml").is_file()


def visor_init(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bin" / "visor-init"), *map(str, args)], capture_output=True,
                          text=True, timeout=20)


@pytest.mark.parametrize("where", ["under-a-file", "in-proc"])
def test_init_where_no_folder_can_be_made_is_one_line(tmp, where):
    (tmp / "f").write_text("")
    home = tmp / "f" / "h" if where == "under-a-file" else Path("/proc/visor-test-nope")
    for done in (run_cli("init", "--home", home), visor_init("--home", home)):
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"visor: {home}: cannot create the home (") and done.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["status", "stop", "restart", "run"])
def test_a_file_of_the_runtime_folder_that_cannot_be_opened_is_one_line(tmp, command):
    """Whatever else inside H/.visor cannot be used: the file and the system's word for it, no traceback."""
    home = init_home(tmp / "h").root
    (home / ".visor" / "lock").mkdir()
    done = run_cli(*COMMANDS[command], "--home", home, timeout_s=30)
    one_line(done, f"{home}/.visor/lock: Is a directory")
