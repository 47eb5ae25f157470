"""Visor's config.toml and the run-config.toml of each release folder, parsed into frozen objects.

Start-up, hot reload and `visor check` all come through load_visor_config / load_run_config, so a
file is judged the same way everywhere. This module reads files; it never writes them (home.py does).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from visor.errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")    # logLevel and `visor run --log-level`: the one table

# TOML key -> (field, type, default, meaning). `visor init` writes its defaults from this table, and
# this is the only place camelCase appears. Dotted keys live in tables ([autoInstall], [autoInstall.asset]).
KEYS: dict[str, tuple[str, type, Any, str]] = {
    "maxNumberOfFirstConnectionRetries": ("max_first_retries", int, 175000,
        "failed upgrade-status attempts (2 s apart) allowed until a crash-restart (slow archive nodes)"),
    "maxNumberOfRestartConnectionRetries": ("max_restart_retries", int, 10,
        "failed upgrade-status attempts (2 s apart) allowed after a crash-restart"),
    "maxNumberOfRestarts": ("max_restarts", int, 3,
        "restarts allowed after binary failures; the failure after the last one stops Visor"),
    "restartsDelaySeconds": ("restarts_delay_s", int, 5, "wait before restarting failed binaries"),
    "stopDelaySeconds": ("stop_delay_s", int, 0, "wait before stopping the binaries at an upgrade"),
    "stopSignalTimeoutSeconds": ("stop_timeout_s", int, 15, "wait after SIGTERM before SIGKILL"),
    "upgradeStatusIntervalMilliseconds": ("status_interval_ms", int, 1000,
        "how often the core node is asked for its upgrade status"),
    "eventsEndpoint": ("events_endpoint", str, "",
        "ZeroMQ endpoint of the event stream; empty means ipc://HOME/.visor/events.sock"),
    "eventsHistoryMaxBytes": ("events_history_max_bytes", int, 10485760,
        "size at which .visor/events.jsonl is renamed to events.jsonl.1 and begun anew; 0 keeps no history"),
    "eventsAllowRemote": ("events_allow_remote", bool, False,
        "allow a tcp:// eventsEndpoint on an address other than loopback (anyone who reaches it can listen)"),
    "metricsListen": ("metrics_listen", str, "",
        "host:port to serve Prometheus metrics on, e.g. 127.0.0.1:9120; empty means no metrics"),
    "logFormat": ("log_format", str, "text", "Visor's own log lines: text, or json (one object per line)"),
    "logLevel": ("log_level", str, "INFO", f"{', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}"),
    "upgradeFolders": ("upgrade_folders", dict, {}, "release tag -> folder name, overriding the tag"),
    "upgradeHooks": ("upgrade_hooks", dict, {},
        "programs run at three moments of every upgrade: beforeStop, afterStop, afterStart"),
    "autoInstall.enabled": ("auto_install", bool, True, "fetch releases automatically"),
    "autoInstall.repositoryOwner": ("repository_owner", str, "vegaprotocol", "GitHub owner of the releases"),
    "autoInstall.repository": ("repository", str, "vega", "GitHub repository of the releases"),
    "autoInstall.apiUrl": ("api_url", str, "https://api.github.com", "release API base URL"),
    "autoInstall.asset.name": ("asset_name", str, "vega-linux-amd64.zip", "release asset to fetch"),
    "autoInstall.asset.binaryName": ("asset_binary", str, "vega", "the binary inside a zipped asset"),
    "autoInstall.asset.checksumsName": ("checksums_name", str, "",
        "release asset listing `sha256  filename` lines; empty means no checksum check"),
}
WORDS = {int: "a whole number", bool: "true or false", str: "a string", dict: "a table"}
# Keys whose change needs a restart of `visor run` to take effect.
RESTART_ONLY = frozenset({"eventsEndpoint", "eventsAllowRemote", "metricsListen"})


@dataclass(frozen=True)
class VisorConfig:
    max_first_retries: int = 175000
    max_restart_retries: int = 10
    max_restarts: int = 3
    restarts_delay_s: int = 5
    stop_delay_s: int = 0
    stop_timeout_s: int = 15
    status_interval_ms: int = 1000
    events_endpoint: str = ""
    events_allow_remote: bool = False
    events_history_max_bytes: int = 10485760
    metrics_listen: str = ""
    log_format: str = "text"
    log_level: str = "INFO"
    upgrade_folders: dict[str, str] = field(default_factory=dict)
    auto_install: bool = True
    repository_owner: str = "vegaprotocol"
    repository: str = "vega"
    api_url: str = "https://api.github.com"
    asset_name: str = "vega-linux-amd64.zip"
    asset_binary: str = "vega"
    checksums_name: str = ""
    # hook name -> {"path", "args", "timeout_s", "required"}: plain data, so fields() crosses the wire
    upgrade_hooks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def hook(self, name: str) -> Hook | None:
        """The hook configured for this moment (one of HOOKS), or None."""
        if (h := self.upgrade_hooks.get(name)) is None:
            return None
        return Hook(name=name, path=h["path"], args=tuple(h["args"]), timeout_s=h["timeout_s"],
                    required=h["required"])

    def fields(self) -> dict[str, Any]:
        """Plain data, for the wire (the config watcher sends it to the broker)."""
        return dataclasses.asdict(self)

    def folder_for(self, tag: str) -> str:
        """The folder (name inside the home) of release `tag`: upgradeFolders[tag], else the tag itself."""
        return self.upgrade_folders.get(tag, tag)

    def changed_keys(self, other: VisorConfig) -> list[str]:
        """The TOML keys whose values differ between two configs."""
        return [key for key, (name, *_rest) in KEYS.items() if getattr(self, name) != getattr(other, name)]


assert {f.name for f in dataclasses.fields(VisorConfig)} == {v[0] for v in KEYS.values()}
assert all(getattr(VisorConfig(), v[0]) == v[2] for v in KEYS.values())


# --- upgrade hooks ([upgradeHooks.<name>] tables) ------------------------------------------------

HOOKS = ("beforeStop", "afterStop", "afterStart")   # in the order an upgrade reaches them
HOOK_KEYS = {"path": (str, "a non-empty string"), "args": (list, "a list of strings"),   # key -> (type, words)
             "timeoutSeconds": (int, "a whole number"), "required": (bool, "true or false")}


@dataclass(frozen=True)
class Hook:
    name: str                           # one of HOOKS
    path: str                           # as written; relative means relative to HOME (see program())
    args: tuple[str, ...] = ()
    timeout_s: int = 300
    required: bool = True               # a failure holds the upgrade (beforeStop, afterStop only)

    def program(self, home: Path) -> Path:
        """The absolute path to run: this module does not know HOME, its callers do."""
        return Path(home, self.path).absolute()     # an absolute self.path stays as it is


def _parse_hooks(raw: dict[str, Any], path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """[upgradeHooks.*] tables -> {name: {"path", "args", "timeout_s", "required"}}, and warnings."""
    hooks, warnings = {}, []
    for name, table in raw.items():
        where = f"upgradeHooks.{name}"
        if name not in HOOKS:
            warnings.append(f"{path}: unknown key {where!r} ignored (hooks are {', '.join(HOOKS)})")
            continue
        if type(table) is not dict:
            raise ConfigError(path, f"{where} must be a table, got {table!r}")
        for key, value in table.items():
            if key not in HOOK_KEYS:
                warnings.append(f"{path}: unknown key '{where}.{key}' ignored")
            elif type(value) is not HOOK_KEYS[key][0] or (key == "args" and not all(type(a) is str for a in value)):
                raise ConfigError(path, f"{where}.{key} must be {HOOK_KEYS[key][1]}, got {value!r}")
        if not table.get("path"):
            raise ConfigError(path, f"{where}.path is missing or empty: it names the program to run")
        if (timeout_s := table.get("timeoutSeconds", 300)) <= 0:
            raise ConfigError(path, f"{where}.timeoutSeconds must be at least 1, got {timeout_s}")
        hooks[name] = {"path": table["path"], "args": table.get("args", []), "timeout_s": timeout_s,
                       "required": table.get("required", True)}
    return hooks, warnings


@dataclass(frozen=True)
class BinaryConfig:
    """What a run-config says about one binary (not a running one: see visor.binaries)."""
    path: Path                          # absolute: relative paths are resolved against the run-config's folder
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    name: str
    folder: Path                        # the folder that holds this run-config
    vega: BinaryConfig
    socket_path: str
    http_path: str = "/rpc"
    data_node: BinaryConfig | None = None

    def binaries(self) -> dict[str, BinaryConfig]:
        """Binaries in start order: the core node first."""
        found = {"vega": self.vega}
        if self.data_node is not None:
            found["data_node"] = self.data_node
        return found


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a folder, not a file") from None
    except PermissionError:
        raise ConfigError(path, "not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "not valid TOML (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, f"not valid TOML ({err})") from None
    except OSError as err:                   # a folder in its path is a file, a link loop, an I/O error
        raise ConfigError(path, f"not readable ({err.strerror or err})") from None


MAX_INT = 10**12


def _flatten(raw: dict[str, Any], prefix: str = ""):
    """Nested tables become dotted keys; tables that are values of their own (upgradeFolders) stay whole."""
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not (dotted in KEYS and KEYS[dotted][1] is dict):
            yield from _flatten(value, f"{dotted}.")
        else:
            yield dotted, value


def load_visor_config(path: Path) -> tuple[VisorConfig, list[str]]:
    """Reads and checks config.toml. Returns (config, warnings about unknown keys)."""
    return parse_visor_config(read_toml(path), path)


def parse_visor_config(raw: dict[str, Any], path: Path) -> tuple[VisorConfig, list[str]]:
    values, warnings = {}, []
    for key, value in _flatten(raw):
        if key not in KEYS:
            if any(known.startswith(f"{key}.") for known in KEYS):   # `autoInstall = false`: not ignorable
                raise ConfigError(path, f"{key} must be a table, got {value!r}")
            warnings.append(f"{path}: unknown key {key!r} ignored")
            continue
        name, kind, _default, _meaning = KEYS[key]
        if type(value) is not kind:          # `type is`, because True is an int to Python
            raise ConfigError(path, f"{key} must be {WORDS[kind]}, got {value!r}")
        if kind is int and value < 0:
            raise ConfigError(path, f"{key} must not be negative, got {value}")
        if kind is int and value > MAX_INT:  # far past any use; beyond it, timers and messages overflow
            raise ConfigError(path, f"{key} must be at most {MAX_INT}, got {value}")
        values[name] = value
    for tag, folder in values.get("upgrade_folders", {}).items():
        if not isinstance(folder, str) or not folder or "/" in folder or folder in (".", ".."):
            raise ConfigError(path, f"upgradeFolders.{tag} must be a folder name inside the home, got {folder!r}")
    if values.get("status_interval_ms", 1000) == 0:
        raise ConfigError(path, "upgradeStatusIntervalMilliseconds must be at least 1")
    endpoint = values.get("events_endpoint", "")
    if endpoint and not endpoint.startswith(("ipc://", "tcp://")):
        raise ConfigError(path, f"eventsEndpoint must start with ipc:// or tcp://, got {endpoint!r}")
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]") if endpoint.startswith("tcp://") else ""
    if host and not _loopback(host) and not values.get("events_allow_remote"):
        raise ConfigError(path, f"eventsEndpoint {endpoint!r} is not a loopback address; "
                                "set eventsAllowRemote = true to publish events to the network")
    _check_choices(values, path)
    if "upgrade_hooks" in values:
        values["upgrade_hooks"], hook_warnings = _parse_hooks(values["upgrade_hooks"], path)
        warnings += hook_warnings
    return VisorConfig(**values), warnings


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_choices(values: dict[str, Any], path: Path) -> None:
    if values.get("log_format", "text") not in ("text", "json"):
        raise ConfigError(path, f"logFormat must be \"text\" or \"json\", got {values['log_format']!r}")
    if values.get("log_level", "INFO") not in LOG_LEVELS:
        raise ConfigError(path, f"logLevel must be one of {', '.join(LOG_LEVELS)}, got {values['log_level']!r}")
    listen = values.get("metrics_listen", "")
    host, _, port = listen.rpartition(":")
    if listen and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(path, f"metricsListen must be host:port, e.g. 127.0.0.1:9120, got {listen!r}")


def _table(raw: dict, key: str, path: Path) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(path, f"{key} must be a table, got {value!r}")
    return value


def _string(table: dict, key: str, where: str, path: Path, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(path, f"{where}{key} is missing")
    if not isinstance(value, str) or (default is None and not value):
        raise ConfigError(path, f"{where}{key} must be a non-empty string, got {value!r}")
    return value


def _binary(table: dict, where: str, path: Path) -> BinaryConfig:
    binary = _table(table, "binary", path)
    exe = _string(binary, "path", f"{where}.binary.", path)
    args = binary.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConfigError(path, f"{where}.binary.args must be a list of strings, got {args!r}")
    return BinaryConfig(path=(path.parent / exe).absolute() if not Path(exe).is_absolute() else Path(exe),
                  args=tuple(args))


RUN_KEYS = {"name", "vega.binary.path", "vega.binary.args", "vega.rpc.socketPath", "vega.rpc.httpPath",
            "data_node.binary.path", "data_node.binary.args"}


NO_SOCKET = "vega.rpc.socketPath is empty; set it to the core node's admin socket"


def runnable(rc: RunConfig, path: Path) -> RunConfig:
    """A run-config Visor can run: it names the core node's admin socket (without it Visor could never
    ask for an upgrade; Go's `init` leaves it empty, so load_run_config alone accepts that)."""
    if not rc.socket_path:
        raise ConfigError(path, NO_SOCKET)
    return rc


def load_run_config(path: Path) -> tuple[RunConfig, list[str]]:
    """Reads and checks a folder's run-config.toml. Returns (run-config, warnings about unknown keys)."""
    raw = read_toml(path)
    warnings = [f"{path}: unknown key {key!r} ignored" for key, _ in _flatten(raw) if key not in RUN_KEYS]
    vega = _table(raw, "vega", path)
    rpc = _table(vega, "rpc", path)
    data_node = _table(raw, "data_node", path) if "data_node" in raw else None
    return RunConfig(
        name=_string(raw, "name", "", path),
        folder=path.parent.absolute(),
        vega=_binary(vega, "vega", path),
        # Go's `init` writes both empty; such a file must still load (`visor check` reports it)
        socket_path=_string(rpc, "socketPath", "vega.rpc.", path, default=""),
        http_path=_string(rpc, "httpPath", "vega.rpc.", path, default="/rpc") or "/rpc",
        data_node=_binary(data_node, "data_node", path) if data_node is not None else None,
    ), warnings
