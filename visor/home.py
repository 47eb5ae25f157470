"""The home folder: its paths, `visor init`, the atomic `current` switch and the state file (state.json).

Everything that writes to the home goes through here, and every write is atomic (temp file or link,
then rename), so a crash at any instant leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from visor.config import KEYS, RESTART_ONLY, VisorConfig
from visor.errors import HomeError


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def runtime(self) -> Path:
        return self.root / ".visor"

    @property
    def state_file(self) -> Path:
        """What runs (runners, binaries), the restart count and the upgrade in flight: see adoption.py."""
        return self.runtime / "state.json"

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.runtime / name}.sock"

    def events_endpoint(self, cfg: VisorConfig) -> str:
        return cfg.events_endpoint or self.endpoint("events")

    def folder_for(self, tag: str, cfg: VisorConfig) -> Path:
        """The release folder of an upgrade tag: upgradeFolders[tag], else the tag itself."""
        return self.root / cfg.folder_for(tag)

    def current_folder(self) -> Path:
        return self.current.resolve()

    def ensure_ready(self) -> None:
        """Checks the home is initialised; links `current` to genesis when missing; makes .visor 0700."""
        if not self.root.is_dir():
            raise HomeError(f"{self.root}: home folder not found (create it with `visor-init --home {self.root}`)")
        if not self.config.is_file():
            raise HomeError(f"{self.config}: not found; is {self.root} a Visor home? (see `visor-init`)")
        self.runtime.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.runtime, 0o700)       # mkdir's mode is masked by the umask, and the folder may be old
        if not os.path.lexists(self.current):
            if not (self.root / "genesis").is_dir():
                raise HomeError(f"{self.root / 'genesis'}: not found; `current` cannot be linked to it")
            switch_current(self, "genesis")
        elif not self.current.exists():
            raise HomeError(f"{self.current}: dangling link to {os.readlink(self.current)}")


def switch_current(home: Home, folder: str) -> None:
    """Points `current` at `folder` atomically: a new link is renamed over the old one."""
    tmp = home.root / f".current.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(folder, tmp)                 # relative, so the home can be moved or mounted elsewhere
    os.replace(tmp, home.current)
    fsync_dir(home.root)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Readers see the old file or the new one, whole. durable: also on disk before returning."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)          # a full disk leaves the old file, and no half of a new one
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Makes a rename or a new entry in `folder` durable: the entry lives in the folder's own data."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state_file(home: Home) -> dict:
    """What a previous broker wrote down (state.json); empty when there is none or it is unreadable."""
    try:
        record = json.loads(home.state_file.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_state_file(home: Home, record: dict, durable: bool = True) -> None:
    """0600: it holds the runners' secret socket identities."""
    write_atomic(home.state_file, json.dumps(record, sort_keys=True).encode(), mode=0o600, durable=durable)


# --- visor init ----------------------------------------------------------------------------------

def render_default_config() -> str:
    """config.toml with every key written out with its default and meaning."""
    tables: dict[str, list[str]] = {"": [], "autoInstall": [], "autoInstall.asset": []}
    for key, (_name, kind, default, meaning) in KEYS.items():
        table, _, leaf = key.rpartition(".")
        if kind is dict:
            continue                        # written as its own table below
        tables[table] += [f"# {meaning}", tomli_w.dumps({leaf: default}).strip()]
    restart_only = ", ".join(key for key in KEYS if key in RESTART_ONLY)
    out = ["# Visor configuration. Edits take effect without a restart of `visor run`, except:",
           f"#   {restart_only}: read at start only; restart Visor to change them.",
           "#   logLevel, logFormat: apply at once to the broker's lines (every event among them), but to a",
           "#   worker's lines only when that worker is next started; restart Visor to apply them everywhere.",
           ""]
    for table, lines in tables.items():
        if table:
            out += ["", f"[{table}]"]
        out += lines
    out += ["", "# release tag -> folder name, when a release's folder is not named after its tag",
            "[upgradeFolders]", '# "v0.73.0" = "v0.73.0-patched"', "", *HOOK_EXAMPLES.splitlines(), ""]
    return "\n".join(out)


# Commented out: a hook runs only when its table is there. Examples of the programs are in Visor's
# etc/hooks/ (copy them into HOME/hooks/); docs/operators.md, "Upgrade hooks", has the whole contract.
HOOK_EXAMPLES = """\
# upgradeHooks: your own programs at three moments of every upgrade, each optional. `path` is
# absolute or relative to this home; `args` default []; `timeoutSeconds` default 300 (then SIGTERM
# to its process group, SIGKILL 5 s later); `required` default true (a failure holds the upgrade).
# [upgradeHooks.beforeStop]    # the new folder is ready and verified; the old binaries still run
# path = "hooks/notify"
# args = ["https://hooks.example.com/visor"]
# timeoutSeconds = 60
# required = false
# [upgradeHooks.afterStop]     # the old binaries are down, `current` not yet switched: backups
# path = "hooks/backup"
# args = ["--source", "/path/to/vega/home/state", "--dest-root", "/path/to/backups"]
# timeoutSeconds = 3600
# [upgradeHooks.afterStart]    # the new binaries run and the core node has answered its first call
# path = "hooks/notify"
# args = ["https://hooks.example.com/visor"]"""


def render_run_config(name: str, with_data_node: bool) -> str:
    text = f"""# What Visor runs from this folder. Relative binary paths resolve against this folder.
name = "{name}"

[vega.binary]
path = "vega"
args = ["node", "--home", "/path/to/vega/home", "--tendermint-home", "/path/to/tendermint/home"]

[vega.rpc]
# the core node's [Admin.Server] SocketPath and HttpPath
socketPath = "/path/to/vega/home/admin.sock"
httpPath = "/rpc"
"""
    if with_data_node:
        text += """
[data_node.binary]
path = "vega"
args = ["datanode", "start", "--home", "/path/to/data-node/home"]
"""
    return text


def init_home(root: Path, with_data_node: bool = False) -> Home:
    """Creates a new home with defaults and example run-configs; refuses an existing one."""
    home = Home(root.absolute())
    if os.path.lexists(home.root):
        raise HomeError(f"{home.root}: already exists; refusing to overwrite it")
    home.root.mkdir(parents=True)
    write_atomic(home.config, render_default_config().encode())
    for folder in ("genesis", "vX.X.X"):
        (home.root / folder).mkdir()
        write_atomic(home.root / folder / "run-config.toml", render_run_config(folder, with_data_node).encode())
    home.runtime.mkdir(mode=0o700)
    fsync_dir(home.root)                     # the folders' own entries, and the home's in its parent
    fsync_dir(home.root.parent)
    return home
