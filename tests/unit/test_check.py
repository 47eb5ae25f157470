"""`visor check`: a sound home has no findings; each kind of mistake gives one `<file>: <problem>` line."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers import run_cli
from visor.check import check_home, check_home_findings
from visor.errors import HomeError
from visor.home import Home

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def good(home):
    """The test home without init's example folder vX.X.X (its binary and socket folder are placeholders)."""
    shutil.rmtree(home.root / "vX.X.X")
    return home


def findings(home):
    return check_home_findings(Home(home.root))


def only(lines: list[str]) -> str:
    assert len(lines) == 1, lines
    return lines[0]


def test_a_good_home_has_no_problems_and_no_warnings(good):
    assert findings(good) == ([], [])
    done = run_cli("check", "--home", good.root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no problems found" in done.stdout


def test_the_example_folder_of_init_is_reported_but_never_fails_the_check(home):
    found = findings(home)
    assert not [p for p in found.problems if "vX.X.X" in p]
    missing = f"{home.root}/vX.X.X/run-config.toml: vega.binary.path {home.root}/vX.X.X/vega: not found"
    assert any(w.startswith(missing) and "example folder" in w for w in found.warnings)
    assert any("socketPath /path/to/vega/home/admin.sock" in w and "does not exist" in w for w in found.warnings)


def test_bad_toml_names_the_file_and_the_line(good):
    (good.root / "config.toml").write_text("maxNumberOfRestarts = 3\nrestartsDelaySeconds = = 5\n")
    line = only(findings(good).problems)
    assert line.startswith(f"{good.root}/config.toml: not valid TOML")
    assert "line 2" in line


def test_every_bad_key_is_reported_not_only_the_first(good):
    good.set_config(maxNumberOfRestarts="three", stopDelaySeconds=-1, **{"autoInstall.enabled": 1})
    problems = findings(good).problems
    config = f"{good.root}/config.toml"
    assert f"{config}: maxNumberOfRestarts must be a whole number, got 'three'" in problems
    assert f"{config}: stopDelaySeconds must not be negative, got -1" in problems
    assert f"{config}: autoInstall.enabled must be true or false, got 1" in problems
    assert len(problems) == 3


def test_a_bad_upgrade_folder_whose_tag_has_dots_is_reported(good):
    good.set_config(maxNumberOfRestarts=True, upgradeFolders={"v0.73.0": "../elsewhere"})
    problems = findings(good).problems
    assert any("upgradeFolders.v0.73.0 must be a folder name inside the home" in p for p in problems)
    assert any("maxNumberOfRestarts must be a whole number, got True" in p for p in problems)


def test_an_unknown_key_is_a_warning_only(good):
    good.set_config(maxNumberOfRestartz=3)
    found = findings(good)
    assert found.problems == []
    assert found.warnings == [f"{good.root}/config.toml: unknown key 'maxNumberOfRestartz' ignored"]
    assert check_home(Home(good.root)) == []          # what cli.py's exit code is decided from
    assert run_cli("check", "--home", good.root).returncode == 0


def test_a_missing_binary_is_a_problem(good):
    os.unlink(good.root / "genesis" / "vega")
    assert only(findings(good).problems) == \
        f"{good.root}/genesis/run-config.toml: vega.binary.path {good.root}/genesis/vega: not found"
    done = run_cli("check", "--home", good.root)
    assert done.returncode == 1
    assert f"{good.root}/genesis/vega: not found" in done.stdout


def test_a_binary_that_is_a_folder_is_a_problem(good):
    os.unlink(good.root / "genesis" / "vega")
    (good.root / "genesis" / "vega").mkdir()
    assert only(findings(good).problems).endswith("vega: not a regular file")


def test_a_binary_without_execute_bits_is_a_warning(good):
    os.chmod(good.root / "genesis" / "vega", 0o644)
    found = findings(good)
    assert found.problems == []
    assert "genesis/vega: not executable (mode 644); Visor will set a+x" in only(found.warnings)


def test_a_missing_socket_folder_and_an_empty_socket_path_are_problems(good):
    good.stage("genesis", "v0.72.1")
    text = (good.root / "genesis" / "run-config.toml").read_text()
    (good.root / "genesis" / "run-config.toml").write_text(text.replace(str(good.socket), "/nowhere/admin.sock"))
    assert "its folder /nowhere does not exist" in only(findings(good).problems)
    (good.root / "genesis" / "run-config.toml").write_text(text.replace(str(good.socket), ""))
    assert only(findings(good).problems).endswith("vega.rpc.socketPath is empty; set it to the core node's "
                                                  "admin socket")


def test_a_run_config_with_a_wrong_type_is_a_problem(good):
    good.stage("v0.73.0", "v0.73.0")
    path = good.root / "v0.73.0" / "run-config.toml"
    path.write_text(path.read_text().replace('name = "v0.73.0"', "name = 73"))
    assert only(findings(good).problems) == f"{path}: name must be a non-empty string, got 73"


def test_a_dangling_current_is_a_problem(good):
    os.symlink("v9.9.9", good.root / "current")
    assert only(findings(good).problems) == f"{good.root}/current: dangling link to v9.9.9"


def test_current_leading_to_a_folder_without_run_config_is_a_problem(good):
    (good.root / "empty").mkdir()
    os.symlink("empty", good.root / "current")
    assert only(findings(good).problems).endswith("current: links to empty, which has no run-config.toml")


def test_a_missing_upgrade_folder_is_a_warning(good):
    good.set_config(upgradeFolders={"v0.73.0": "v0.73.0-patched"})
    found = findings(good)
    assert found.problems == []
    assert "upgradeFolders.v0.73.0: folder" in only(found.warnings)


def test_a_missing_config_is_a_problem_and_the_run_configs_are_still_checked(good):
    os.unlink(good.root / "config.toml")
    os.unlink(good.root / "genesis" / "vega")
    problems = findings(good).problems
    assert problems[0] == f"{good.root}/config.toml: file not found"
    assert len(problems) == 2


def test_a_missing_home_is_one_clear_line(good, tmp_path):
    with pytest.raises(HomeError, match="home folder not found"):
        check_home(Home(tmp_path / "nowhere"))
    done = run_cli("check", "--home", tmp_path / "nowhere")
    assert done.returncode == 1
    assert done.stderr.strip() == f"visor: {tmp_path}/nowhere: home folder not found " \
                                  f"(create it with `visor-init --home {tmp_path}/nowhere`)"
    assert "Traceback" not in done.stderr

