"""config.toml caught half-written: a tool truncates it, writes the first half, closes it, and writes
the rest a moment later. Visor rejects the half file (config.rejected), keeps the old config in the
meantime, applies the whole file once it is there (config.reloaded), and restarts nothing."""

from __future__ import annotations

import tomllib

import pytest

from tests.faults.conftest import ask_status, wait_running
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


def invalid_cut(text: str) -> int:
    """A cut near the middle that leaves invalid TOML: just after an `=` with its value still to come."""
    cut = text.index("=", len(text) // 2) + 1
    try:
        tomllib.loads(text[:cut])
    except tomllib.TOMLDecodeError:
        return cut
    raise AssertionError(f"{text[:cut]!r} parses")


def test_a_half_written_config_is_rejected_then_the_whole_one_applied(home, daemon, events, census):
    daemon.start()
    before = wait_running(home)
    node = before["binaries"]["vega"]["pid"]
    workers = {name: w["pid"] for name, w in before["workers"].items()}
    path = home.root / "config.toml"
    text = path.read_text().replace("maxNumberOfRestarts = 3", "maxNumberOfRestarts = 6")
    assert "maxNumberOfRestarts = 6" in text
    cut = invalid_cut(text)
    with open(path, "r+") as f:                       # in place, as `cat > config.toml` or a slow copy
        f.truncate(0)
        f.write(text[:cut])
    # (a read between the truncate and the write finds it empty: rejected as half-written too)
    rejected = wait_until(lambda: [e for e in events.of("config.rejected") if "not valid TOML" in e["error"]],
                          what="the half-written file rejected", timeout_s=5)[0]
    assert rejected["error"].startswith(f"{path}: not valid TOML")
    status, _ = ask_status(home)
    assert status["restarts"]["max"] == 3 and status["visor"]["state"] == "running"   # the old config stays
    with open(path, "a") as f:                        # ...and the rest, a moment later
        f.write(text[cut:])
    reloaded = events.wait_for("config.reloaded", timeout_s=5)
    assert "maxNumberOfRestarts" in reloaded["changed"] and reloaded["seq"] > rejected["seq"]
    after = wait_until(lambda: (s := ask_status(home)[0])["restarts"]["max"] == 6 and s, what="the new config")
    assert after["binaries"]["vega"]["pid"] == node
    assert {name: w["pid"] for name, w in after["workers"].items()} == workers      # nothing restarted
    assert not events.of("binary.exited") and not events.of("worker.exited")
    assert len(home.node_events("started")) == 1
    assert [e for e in events.of("config.rejected") if "is empty" not in e["error"]] == [rejected]
    assert len(events.of("config.reloaded")) == 1
