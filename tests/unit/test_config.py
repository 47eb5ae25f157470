"""config.toml and run-config.toml: defaults, one-line errors naming file and key, Go-visor homes."""

from pathlib import Path

import pytest

from visor.config import KEYS, RESTART_ONLY, VisorConfig, load_run_config, load_visor_config
from visor.errors import ConfigError
from visor.home import render_default_config


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_empty_file_gives_every_default(tmp_path):
    cfg, warnings = load_visor_config(write(tmp_path, ""))
    assert cfg == VisorConfig() and warnings == []
    assert (cfg.max_first_retries, cfg.max_restart_retries, cfg.max_restarts) == (175000, 10, 3)
    assert (cfg.restarts_delay_s, cfg.stop_delay_s, cfg.stop_timeout_s, cfg.status_interval_ms) == (5, 0, 15, 1000)
    assert (cfg.auto_install, cfg.repository_owner, cfg.repository) == (True, "vegaprotocol", "vega")
    assert (cfg.asset_name, cfg.asset_binary, cfg.api_url) == ("vega-linux-amd64.zip", "vega", "https://api.github.com")


def test_the_written_defaults_read_back_as_the_defaults(tmp_path):
    text = render_default_config()
    assert all(key.rpartition(".")[2] in text for key in KEYS)
    assert load_visor_config(write(tmp_path, text)) == (VisorConfig(), [])


def test_a_config_written_by_the_go_visor_loads_unchanged(tmp_path):
    go = """maxNumberOfFirstConnectionRetries = 175000
maxNumberOfRestarts = 3
restartsDelaySeconds = 5
stopDelaySeconds = 0
stopSignalTimeoutSeconds = 15

[upgradeFolders]
  "vX.X.X" = "vX.X.X"

[autoInstall]
  enabled = true
  repositoryOwner = "vegaprotocol"
  repository = "vega"
  [autoInstall.asset]
    name = "vega-linux-amd64.zip"
    binaryName = "vega"
"""
    cfg, warnings = load_visor_config(write(tmp_path, go))
    assert warnings == [] and cfg.upgrade_folders == {"vX.X.X": "vX.X.X"} and cfg.asset_binary == "vega"


@pytest.mark.parametrize("text, message", [
    ("maxNumberOfRestarts = 'three'", "maxNumberOfRestarts must be a whole number, got 'three'"),
    ("maxNumberOfRestarts = true", "maxNumberOfRestarts must be a whole number, got True"),
    ("restartsDelaySeconds = -1", "restartsDelaySeconds must not be negative, got -1"),
    ("[autoInstall]\nenabled = 1", "autoInstall.enabled must be true or false, got 1"),
    ("upgradeFolders = 3", "upgradeFolders must be a table, got 3"),
    ("[upgradeFolders]\nv1 = '../etc'", "upgradeFolders.v1 must be a folder name inside the home"),
    ("eventsEndpoint = 'http://x'", "eventsEndpoint must start with ipc:// or tcp://"),
    ("eventsEndpoint = 'tcp://0.0.0.0:5555'", "is not a loopback address; set eventsAllowRemote = true"),
    ("logFormat = 'xml'", 'logFormat must be "text" or "json"'),
    ("metricsListen = '9120'", "metricsListen must be host:port"),
    ("maxNumberOfRestarts = \n", "not valid TOML (Invalid value (at line 1, column 23))"),
    # a table's name given a value: not an unknown key to ignore (auto-install would stay on)
    ("autoInstall = false", "autoInstall must be a table, got False"),
    ("[autoInstall]\nasset = 3", "autoInstall.asset must be a table, got 3"),
    ("stopSignalTimeoutSeconds = 99999999999999999999", "stopSignalTimeoutSeconds must be at most 1000000000000"),
])
def test_a_bad_value_is_one_line_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_visor_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config.toml: file not found"):
        load_visor_config(tmp_path / "config.toml")


def test_a_loopback_or_explicitly_allowed_tcp_endpoint_is_accepted(tmp_path):
    assert load_visor_config(write(tmp_path, "eventsEndpoint = 'tcp://127.0.0.1:5555'"))[0].events_endpoint
    assert load_visor_config(write(tmp_path, "eventsEndpoint = 'tcp://[::1]:5555'"))[0].events_endpoint
    allowed = "eventsEndpoint = 'tcp://10.0.0.5:5555'\neventsAllowRemote = true"
    assert load_visor_config(write(tmp_path, allowed))[0].events_allow_remote


def test_unknown_keys_are_warned_about_not_fatal(tmp_path):
    path = write(tmp_path, "maxNumberOfRestart = 3\n[autoInstall.assets.vega]\nasset_name = 'x'")
    cfg, warnings = load_visor_config(path)
    assert cfg == VisorConfig()
    assert warnings == [f"{path}: unknown key 'maxNumberOfRestart' ignored",
                        f"{path}: unknown key 'autoInstall.assets.vega.asset_name' ignored"]


def test_changed_keys_are_named_as_in_the_file():
    assert VisorConfig().changed_keys(VisorConfig(max_restarts=9, asset_name="x")) == \
        ["maxNumberOfRestarts", "autoInstall.asset.name"]


RUN_CONFIG = """name = "v0.73.0"
[vega.binary]
path = "vega"
args = ["node", "--home", "/data/vega"]
[vega.rpc]
socketPath = "/data/vega/admin.sock"
httpPath = "/rpc"
[data_node.binary]
path = "/opt/vega"
args = ["datanode", "start", "--home", "/data/dn"]
"""


def test_run_config_resolves_relative_paths_against_its_folder(tmp_path):
    rc, warnings = load_run_config(write(tmp_path, RUN_CONFIG, "run-config.toml"))
    assert warnings == []
    assert rc.name == "v0.73.0" and rc.vega.path == tmp_path / "vega"
    assert rc.vega.args == ("node", "--home", "/data/vega")
    assert (rc.socket_path, rc.http_path) == ("/data/vega/admin.sock", "/rpc")
    assert rc.data_node.path == Path("/opt/vega") and list(rc.binaries()) == ["vega", "data_node"]


def test_the_go_visor_example_run_config_loads(tmp_path):
    go = 'name = "genesis"\n\n[vega]\n  [vega.binary]\n    path = "vega"\n    args = ["arg1", "arg2", "..."]\n' \
         '  [vega.rpc]\n    socketPath = ""\n    httpPath = ""\n'
    rc, _ = load_run_config(write(tmp_path, go, "run-config.toml"))
    assert rc.socket_path == "" and rc.http_path == "/rpc" and rc.data_node is None


@pytest.mark.parametrize("text, message", [
    ('name = "x"\n[vega.rpc]\nsocketPath = "/s"', "vega.binary.path is missing"),
    ('name = "x"\n[vega.binary]\npath = "vega"\nargs = "node"', "vega.binary.args must be a list of strings"),
    ('[vega.binary]\npath = "vega"', "name is missing"),
    ('name = "x"\nvega = 3', "vega must be a table"),
])
def test_a_bad_run_config_is_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(write(tmp_path, text, "run-config.toml"))


def test_the_example_config_is_what_visor_init_writes_and_names_every_restart_only_key():
    example = (Path(__file__).resolve().parent.parent.parent / "etc" / "config.toml").read_text()
    assert example == render_default_config()
    header = example.split("\n\n", 1)[0]
    assert all(key in header for key in RESTART_ONLY) and "logLevel" in header and "logFormat" in header
