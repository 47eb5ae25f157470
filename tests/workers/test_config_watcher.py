"""The config watcher as its own process against a stand-in broker, once with inotify and once with
inotify unavailable (the polling fallback): what it sends for each kind of edit, and what it leaves
unsent (a touch, a rewrite with the same bytes)."""

from __future__ import annotations

import os

import pytest

from visor import protocol

pytestmark = pytest.mark.timeout(30)
NO_INOTIFY = "sys.modules['inotify_simple'] = None   # its import fails, as on a system without it"


@pytest.fixture(params=["inotify", "polling"])
def watcher(request, home, fake_broker):
    broker = fake_broker("workers.config_watcher", "config-watcher", "--home", str(home.root),
                         prelude="" if request.param == "inotify" else NO_INOTIFY)
    broker.inotify = request.param == "inotify"
    return broker


def restarts_in(msg) -> int:
    assert isinstance(msg, protocol.ConfigLoaded), msg
    return msg.values["max_restarts"]


def test_the_watcher_reports_changes_of_content_only(home, watcher):
    config = home.root / "config.toml"
    assert restarts_in(watcher.next_report()) == 3                  # the report every start owes
    os.utime(config)                                                 # touched: same bytes
    config.write_bytes(config.read_bytes())                          # rewritten: same bytes
    home.set_config(maxNumberOfRestarts=4)
    assert restarts_in(watcher.next_report()) == 4                   # nothing came for the two above
    # vi's way: the old file renamed away, a new one written under the name
    text = config.read_text()
    os.replace(config, home.root / "config.toml~")
    config.write_text(text.replace("maxNumberOfRestarts = 4", "maxNumberOfRestarts = 5"))
    assert restarts_in(watcher.next_report()) == 5
    os.unlink(config)
    assert watcher.next_report() == protocol.ConfigRejected(error=f"{config}: file not found")
    config.write_text(text)
    assert restarts_in(watcher.next_report()) == 4
    assert watcher.shutdown() == 0
    assert ("inotify unavailable" in watcher.stderr) == (not watcher.inotify)    # the path we meant to test


def test_an_invalid_edit_is_rejected_naming_file_and_key_and_a_fix_is_loaded(home, watcher):
    config = home.root / "config.toml"
    assert restarts_in(watcher.next_report()) == 3
    home.set_config(maxNumberOfRestarts="three")
    assert watcher.next_report() == protocol.ConfigRejected(
        error=f"{config}: maxNumberOfRestarts must be a whole number, got 'three'")
    home.set_config(maxNumberOfRestarts=6)
    assert restarts_in(watcher.next_report()) == 6
    assert watcher.shutdown() == 0 and "Traceback" not in watcher.stderr


def test_an_emptied_config_is_rejected_not_applied_as_all_defaults(home, watcher):
    # regression: `cat > config.toml` (or a truncate, then a slow write) leaves an empty file for a moment;
    # read then, it was valid TOML and reloaded every key at its default
    config = home.root / "config.toml"
    text = config.read_text()
    assert restarts_in(watcher.next_report()) == 3
    config.write_text("\n  \n")
    assert watcher.next_report() == protocol.ConfigRejected(
        error=f"{config}: is empty (half-written?); the running config stays")
    config.write_text(text.replace("maxNumberOfRestarts = 3", "maxNumberOfRestarts = 7"))
    assert restarts_in(watcher.next_report()) == 7
    assert watcher.shutdown() == 0
