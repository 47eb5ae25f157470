"""[upgradeHooks] in config.toml: defaults, one-line errors, warnings, the trip over the wire, and
`visor check` naming a hook whose program cannot run."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from visor import protocol
from visor.check import check_home_findings
from visor.config import HOOKS, Hook, VisorConfig, load_visor_config, parse_visor_config
from visor.errors import ConfigError
from visor.home import Home, render_default_config

pytestmark = pytest.mark.timeout(30)

ALL_THREE = """
[upgradeHooks.beforeStop]
path = "/srv/visor/hooks/announce"
args = ["--channel", "ops"]
timeoutSeconds = 60
[upgradeHooks.afterStop]
path = "/srv/visor/hooks/backup"
required = true
[upgradeHooks.afterStart]
path = "hooks/notify"
required = false
"""


def load(tmp_path: Path, text: str) -> tuple[VisorConfig, list[str]]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_visor_config(path)


def test_the_spec_example_loads_with_its_defaults(tmp_path):
    cfg, warnings = load(tmp_path, ALL_THREE)
    assert warnings == []
    assert cfg.hook("beforeStop") == Hook("beforeStop", "/srv/visor/hooks/announce", ("--channel", "ops"), 60, True)
    assert cfg.hook("afterStop") == Hook("afterStop", "/srv/visor/hooks/backup", (), 300, True)
    assert cfg.hook("afterStart") == Hook("afterStart", "hooks/notify", (), 300, False)
    assert cfg.upgrade_hooks["beforeStop"] == {"path": "/srv/visor/hooks/announce", "args": ["--channel", "ops"],
                                               "timeout_s": 60, "required": True}


def test_no_hooks_by_default():
    assert VisorConfig().upgrade_hooks == {} and [VisorConfig().hook(name) for name in HOOKS] == [None] * 3


def test_a_relative_path_resolves_against_the_home_an_absolute_one_stays():
    assert Hook("afterStart", "hooks/notify").program(Path("/srv/visor")) == Path("/srv/visor/hooks/notify")
    assert Hook("afterStop", "/opt/backup").program(Path("/srv/visor")) == Path("/opt/backup")


def test_hooks_survive_the_trip_over_the_wire_and_changes_are_named(tmp_path):
    cfg, _ = load(tmp_path, ALL_THREE)
    msg = protocol.decode(protocol.encode(protocol.ConfigLoaded(values=cfg.fields())))
    again = VisorConfig(**msg.values)
    assert again == cfg and again.hook("beforeStop") == cfg.hook("beforeStop")
    assert again.changed_keys(cfg) == []
    edited, _ = load(tmp_path, ALL_THREE.replace("timeoutSeconds = 60", "timeoutSeconds = 61"))
    assert cfg.changed_keys(edited) == ["upgradeHooks"]
    assert VisorConfig().changed_keys(cfg) == ["upgradeHooks"]


@pytest.mark.parametrize("text, message", [
    ("upgradeHooks = 3", "upgradeHooks must be a table, got 3"),
    ("[upgradeHooks]\nbeforeStop = 'x'", "upgradeHooks.beforeStop must be a table, got 'x'"),
    ("[upgradeHooks.beforeStop]\ntimeoutSeconds = 'x'\npath = 'p'",
     "upgradeHooks.beforeStop.timeoutSeconds must be a whole number, got 'x'"),
    ("[upgradeHooks.afterStop]\npath = 'p'\ntimeoutSeconds = 0", "upgradeHooks.afterStop.timeoutSeconds must be at least 1"),
    ("[upgradeHooks.afterStop]\npath = 'p'\ntimeoutSeconds = -5", "upgradeHooks.afterStop.timeoutSeconds must be at least 1"),
    ("[upgradeHooks.afterStop]\npath = 'p'\ntimeoutSeconds = true", "timeoutSeconds must be a whole number, got True"),
    ("[upgradeHooks.afterStop]\npath = 'p'\nrequired = 'yes'", "upgradeHooks.afterStop.required must be true or false"),
    ("[upgradeHooks.afterStop]\npath = 'p'\nargs = 'x'", "upgradeHooks.afterStop.args must be a list of strings"),
    ("[upgradeHooks.afterStop]\npath = 'p'\nargs = ['a', 1]", "upgradeHooks.afterStop.args must be a list of strings"),
    ("[upgradeHooks.afterStart]\npath = 3", "upgradeHooks.afterStart.path must be a non-empty string, got 3"),
    ("[upgradeHooks.afterStart]\npath = ''", "upgradeHooks.afterStart.path is missing or empty"),
    ("[upgradeHooks.afterStart]\nargs = []", "upgradeHooks.afterStart.path is missing or empty"),
])
def test_a_bad_hook_is_one_line_naming_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    line = str(err.value)
    assert line.startswith(f"{tmp_path}/config.toml: ") and message in line and "\n" not in line


def test_unknown_hooks_and_unknown_keys_in_a_hook_are_warnings(tmp_path):
    cfg, warnings = load(tmp_path, "[upgradeHooks.beforeStart]\npath = 'x'\n"
                                   "[upgradeHooks.afterStop]\npath = 'b'\ntimeout = 5\n")
    path = tmp_path / "config.toml"
    assert warnings == [f"{path}: unknown key 'upgradeHooks.beforeStart' ignored (hooks are beforeStop, afterStop, "
                        "afterStart)", f"{path}: unknown key 'upgradeHooks.afterStop.timeout' ignored"]
    assert list(cfg.upgrade_hooks) == ["afterStop"] and cfg.hook("afterStop").timeout_s == 300


def test_init_shows_the_hooks_commented_out_and_they_load_when_uncommented(tmp_path):
    text = render_default_config()
    assert "# [upgradeHooks.beforeStop]" in text and "[upgradeHooks" not in text.replace("# [upgradeHooks", "")
    on = "\n".join(line[2:] if line.startswith(("# [upgradeHooks", "# path", "# args", "# timeoutSeconds",
                                                "# required")) else line for line in text.splitlines())
    cfg, warnings = parse_visor_config(tomllib.loads(on), tmp_path / "config.toml")
    assert warnings == [] and [cfg.hook(name).path for name in HOOKS] == ["hooks/notify", "hooks/backup",
                                                                          "hooks/notify"]


def test_the_example_config_file_is_what_init_writes():
    assert (Path(__file__).resolve().parents[2] / "etc" / "config.toml").read_text() == render_default_config()


# --- visor check ---------------------------------------------------------------------------------

def hook_problems(home) -> list[str]:
    return [p for p in check_home_findings(Home(home.root)).problems if "upgradeHooks" in p]


def test_check_names_a_hook_whose_program_is_missing_or_not_executable(home):
    shutil.rmtree(home.root / "vX.X.X")
    (home.root / "hooks").mkdir()
    (home.root / "hooks" / "backup").write_text("#!/bin/sh\n")          # mode 644: cannot run
    (home.root / "hooks" / "notify").write_text("#!/bin/sh\n")
    (home.root / "hooks" / "notify").chmod(0o755)
    home.set_config(**{"upgradeHooks.beforeStop.path": "/nonexistent/announce",
                       "upgradeHooks.afterStop.path": "hooks/backup",
                       "upgradeHooks.afterStart.path": "hooks/notify", "upgradeHooks.afterStart.required": False})
    config = home.root / "config.toml"
    assert hook_problems(home) == [f"{config}: upgradeHooks.beforeStop: /nonexistent/announce: not found",
                                   f"{config}: upgradeHooks.afterStop: {home.root}/hooks/backup: not executable "
                                   "(mode 644)"]
    home.set_config(**{"upgradeHooks.afterStop.path": "hooks"})
    assert f"{config}: upgradeHooks.afterStop: {home.root}/hooks: not a regular file" in hook_problems(home)


def test_check_has_nothing_to_say_about_hooks_that_can_run(home):
    shutil.rmtree(home.root / "vX.X.X")
    home.set_config(**{"upgradeHooks.afterStop.path": "/bin/true"})
    assert check_home_findings(Home(home.root)) == ([], [])


def test_check_reports_a_bad_hook_key_and_the_next_mistake_too(home):
    home.set_config(maxNumberOfRestarts="x", **{"upgradeHooks.afterStop.path": "/bin/true",
                                                "upgradeHooks.afterStop.timeoutSeconds": "x"})
    problems = check_home_findings(Home(home.root)).problems
    config = home.root / "config.toml"
    assert f"{config}: upgradeHooks.afterStop.timeoutSeconds must be a whole number, got 'x'" in problems
    assert f"{config}: maxNumberOfRestarts must be a whole number, got 'x'" in problems
