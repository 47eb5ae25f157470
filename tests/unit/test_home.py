"""The home folder: init, the atomic `current` switch, the runtime folder's mode."""

import os
import stat

import pytest

from visor.config import load_run_config, load_visor_config
from visor.errors import HomeError
from visor.home import Home, init_home, switch_current


def test_init_writes_config_with_defaults_and_example_run_configs(tmp_path):
    home = init_home(tmp_path / "h", with_data_node=True)
    assert load_visor_config(home.config)[1] == []
    for folder in ("genesis", "vX.X.X"):
        rc, _ = load_run_config(home.root / folder / "run-config.toml")
        assert rc.name == folder and rc.data_node is not None


def test_init_refuses_an_existing_home(tmp_path):
    with pytest.raises(HomeError, match="already exists"):
        init_home(tmp_path)


def test_first_start_links_current_to_genesis_and_closes_runtime(tmp_path):
    home = init_home(tmp_path / "h")
    home.runtime.chmod(0o755)
    home.ensure_ready()
    assert os.readlink(home.current) == "genesis"
    assert stat.S_IMODE(home.runtime.stat().st_mode) == 0o700


def test_switch_current_replaces_the_link_and_leaves_no_temp(tmp_path):
    home = init_home(tmp_path / "h")
    home.ensure_ready()
    switch_current(home, "vX.X.X")
    assert os.readlink(home.current) == "vX.X.X"
    assert not [n for n in os.listdir(home.root) if n.startswith(".current")]


def test_an_uninitialised_home_is_one_clear_line(tmp_path):
    with pytest.raises(HomeError, match="home folder not found"):
        Home(tmp_path / "nope").ensure_ready()
    (tmp_path / "empty").mkdir()
    with pytest.raises(HomeError, match="config.toml: not found"):
        Home(tmp_path / "empty").ensure_ready()


def test_init_writes_its_files_atomically_and_durably(tmp_path, monkeypatch):
    import visor.home
    written, synced = [], []
    real_write, real_fsync = visor.home.write_atomic, os.fsync
    monkeypatch.setattr(visor.home, "write_atomic", lambda path, data, **kw: (written.append(path),
                                                                              real_write(path, data, **kw)))
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    home = init_home(tmp_path / "h")
    assert written == [home.config, home.root / "genesis/run-config.toml", home.root / "vX.X.X/run-config.toml"]
    folders = {str(home.root), str(home.root.parent), str(home.root / "genesis"), str(home.root / "vX.X.X")}
    assert folders <= set(synced)            # each new entry is on disk in the folder that holds it
    assert not [n for n in os.listdir(home.root) if n.endswith(".tmp")]
