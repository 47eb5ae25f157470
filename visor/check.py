"""`visor check`: everything wrong with a home, found by reading it. Changes nothing, starts nothing.

It judges files with the loaders that start-up and hot reload use (config.py), so `check` agrees with
`run`. It only reads, so it is safe while the daemon runs. Every finding is one `<file>: <problem>` line.

Problems (exit 1) are what stops `visor run` or an upgrade: a config.toml or run-config that does not
load, a binary that is missing or not a regular file, an empty vega.rpc.socketPath or a socket folder
that does not exist, a `current` link that is dangling or leads to a folder without run-config.toml,
an upgrade hook whose program is missing or not executable (required or not: it would fail every upgrade).
Warnings (printed, exit 0) are what Visor copes with on its own: unknown keys (ignored); a binary
without its execute bits (the runner sets a+x before starting it, as the Go visor does); an
upgradeFolders target that does not exist yet (an operator may drop it in, or auto-install fetch it,
before its upgrade height); anything wrong in `visor init`'s example folder vX.X.X, which nothing
runs until it is renamed after a release tag. Folders whose names start with "." are Visor's own
(runtime, half-done downloads) and are not checked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, NamedTuple

from visor.config import HOOKS, NO_SOCKET, VisorConfig, load_run_config, parse_visor_config, read_toml
from visor.errors import ConfigError, HomeError
from visor.home import Home

RUN_CONFIG = "run-config.toml"
EXAMPLE = "vX.X.X"               # the example release folder `visor init` writes, as the Go visor does


class Findings(NamedTuple):
    problems: list[str]          # make `visor check` exit 1
    warnings: list[str]          # printed; never change the exit code


def check_home(home: Home) -> list[str]:
    """The problems only: what makes `visor check` exit 1. See check_home_findings for the warnings."""
    return check_home_findings(home).problems


def check_home_findings(home: Home) -> Findings:
    """Every problem and warning in the home. Raises HomeError when there is no home to check."""
    if not home.root.is_dir():
        raise HomeError(f"{home.root}: home folder not found (create it with `visor-init --home {home.root}`)")
    found = Findings([], [])
    cfg = check_visor_config(home.config, found)
    for run_config in run_configs(home):
        if run_config.parent.name == EXAMPLE:
            example = Findings([], found.warnings)   # never blocks: nothing runs it until renamed
            check_run_config(run_config, example)
            found.warnings.extend(f"{line} (this is `visor init`'s example folder: rename it after a release "
                                  "tag or remove it)" for line in example.problems)
            continue
        check_run_config(run_config, found)
    check_current(home, found)
    if problem := runtime_problem(home):
        found.problems.append(problem)
    if cfg is not None:
        check_upgrade_folders(home, cfg, found)
        check_hooks(home, cfg, found)
    return found


# --- config.toml ---------------------------------------------------------------------------------

def check_visor_config(path: Path, found: Findings) -> VisorConfig | None:
    """Loads config.toml; reports every bad key, not only the first. Returns the config if it is sound."""
    try:
        raw = read_toml(path)            # missing, unreadable or not TOML (with the line): nothing more to say
    except ConfigError as err:
        found.problems.append(str(err))
        return None
    before = len(found.problems)
    # The loader stops at the first bad key. Drop each one it names and ask again, so the operator
    # sees every mistake in one run; a message that names no key we can drop ends the search.
    while True:
        try:
            cfg, warnings = parse_visor_config(raw, path)
            break
        except ConfigError as err:
            found.problems.append(str(err))
            if not _drop_key(raw, err.problem.split(" ", 1)[0]):
                return None
    found.warnings.extend(warnings)
    return cfg if len(found.problems) == before else None


def _drop_key(table: dict[str, Any], dotted: str) -> bool:
    """Removes a dotted key from nested tables (autoInstall.asset.name; upgradeFolders.v0.73.0, whose
    tag holds dots of its own); False when there is no such key, so every call that succeeds shrinks it."""
    if dotted in table:
        del table[dotted]
        return True
    head, dot, rest = dotted.partition(".")
    sub = table.get(head)
    return bool(dot) and isinstance(sub, dict) and _drop_key(sub, rest)


# --- run-configs and their binaries -------------------------------------------------------------

def run_configs(home: Home) -> list[Path]:
    """run-config.toml of every direct subfolder; `current` is a link to one of them, not another."""
    found = []
    for entry in sorted(home.root.iterdir()):
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        if (entry / RUN_CONFIG).exists() or (entry / RUN_CONFIG).is_symlink():
            found.append(entry / RUN_CONFIG)
    return found


def check_run_config(path: Path, found: Findings) -> None:
    try:
        rc, warnings = load_run_config(path)
    except ConfigError as err:
        found.problems.append(str(err))
        return
    found.warnings.extend(warnings)
    for name, binary in rc.binaries().items():
        check_binary(path, f"{name}.binary.path", binary.path, found)
    if not rc.socket_path:
        found.problems.append(f"{path}: {NO_SOCKET}")
    elif not Path(rc.socket_path).parent.is_dir():
        found.problems.append(f"{path}: vega.rpc.socketPath {rc.socket_path}: "
                              f"its folder {Path(rc.socket_path).parent} does not exist")


def check_binary(run_config: Path, key: str, binary: Path, found: Findings) -> None:
    mode, problem = stat_program(binary)
    if problem:
        found.problems.append(f"{run_config}: {key} {binary}: {problem}")
    elif mode & 0o111 != 0o111:
        # mode bits, not os.access: as root, access() would say yes to a file others cannot run
        found.warnings.append(f"{run_config}: {key} {binary}: not executable "
                              f"(mode {stat.S_IMODE(mode):o}); Visor will set a+x before starting it")


def stat_program(program: Path) -> tuple[int, str]:
    """(its mode, "") for a regular file; else (0, why it cannot be run at all)."""
    try:
        mode = os.stat(program).st_mode      # follows links: what matters is what would be executed
    except FileNotFoundError:
        return 0, "not found"
    except OSError as err:
        return 0, f"cannot be read ({err.strerror})"
    return (mode, "") if stat.S_ISREG(mode) else (0, "not a regular file")


# --- H/.visor, the current link and upgrade folders ----------------------------------------------

def runtime_problem(home: Home) -> str | None:
    """What keeps H/.visor (sockets, lock, state, history) from being used, in one line; None when it is a
    usable folder, or not there yet (`visor run` creates it)."""
    if not os.path.lexists(home.runtime):
        return None
    if not home.runtime.is_dir():
        return f"{home.runtime}: not a folder; Visor keeps its sockets, lock and state there (remove or rename it)"
    if not os.access(home.runtime, os.R_OK | os.W_OK | os.X_OK):
        return f"{home.runtime}: not accessible (permission denied)"
    return None


def check_current(home: Home, found: Findings) -> None:
    link = home.current
    if not os.path.lexists(link):
        if not (home.root / "genesis" / RUN_CONFIG).is_file():
            found.problems.append(f"{link}: missing, and there is no genesis/{RUN_CONFIG} to link it to")
        return                               # `visor run` links it to genesis
    if not link.is_symlink():
        found.problems.append(f"{link}: not a symbolic link; Visor manages it (remove it to start from genesis)")
    elif not link.exists():
        found.problems.append(f"{link}: dangling link to {os.readlink(link)}")
    elif not link.is_dir():
        found.problems.append(f"{link}: links to {os.readlink(link)}, which is not a folder")
    elif not (link / RUN_CONFIG).is_file():
        found.problems.append(f"{link}: links to {os.readlink(link)}, which has no {RUN_CONFIG}")


def check_upgrade_folders(home: Home, cfg: VisorConfig, found: Findings) -> None:
    for tag, folder in sorted(cfg.upgrade_folders.items()):
        target = home.root / folder
        if not target.exists():
            found.warnings.append(f"{home.config}: upgradeFolders.{tag}: folder {target} does not exist yet "
                                  f"(it must be there, or fetched, before the upgrade to {tag})")
        elif not (target / RUN_CONFIG).is_file():
            found.warnings.append(f"{home.config}: upgradeFolders.{tag}: {target} has no {RUN_CONFIG} yet")


def check_hooks(home: Home, cfg: VisorConfig, found: Findings) -> None:
    """A hook that cannot be started fails its upgrade (a required one holds it): a problem now."""
    for name in HOOKS:
        if (hook := cfg.hook(name)) is None:
            continue
        program = hook.program(home.root)
        mode, problem = stat_program(program)
        if not problem and not os.access(program, os.X_OK):
            # unlike a node binary, Visor never sets a+x on a hook: it runs what the operator wrote
            problem = f"not executable (mode {stat.S_IMODE(mode):o})"
        if problem:
            found.problems.append(f"{home.config}: upgradeHooks.{name}: {program}: {problem}")
