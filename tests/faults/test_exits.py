"""Every way `visor run` ends leaves nothing behind: no broker, no worker, no node binary, no `vega
version` child; nothing whose command line mentions the home. Checked at once after the exit, not
by the fixtures' kill-and-wait."""

from __future__ import annotations

import os
import signal

import pytest

from tests.faults.conftest import ASSET, TAG, wait_nothing_left, wait_running
from tests.fakes.zips import release_zip_with_fake_vega
from tests.helpers import processes_of, wait_until

pytestmark = pytest.mark.timeout(60)
GONE_S = 1.0                     # after visor has exited; only the kernel's bookkeeping is left to do


def test_restarts_used_up(home, daemon, events):
    home.stage("genesis", "v0.72.1", args=home.node_args("--crash-after", "0.2", "--exit-code", "3"))
    home.set_config(maxNumberOfRestarts=1)
    daemon.start()
    assert daemon.wait_exit(20) == 1
    assert daemon.stderr.strip().splitlines()[-1].endswith("vega exited with code 3; all 1 restarts used")
    wait_nothing_left(home, GONE_S)
    assert len(home.node_events("crashed")) == 2


def test_node_unreachable_retries_spent(home, daemon, events):
    home.stage("genesis", "v0.72.1", args=["node", "--log", str(home.log)])     # serves no admin socket
    home.set_config(maxNumberOfFirstConnectionRetries=2)
    daemon.start()
    assert daemon.wait_exit(20) == 1
    assert "did not answer upgrade-status calls for 4 s (3 attempts)" in daemon.stderr.strip().splitlines()[-1]
    wait_nothing_left(home, GONE_S)
    assert home.node_events()[-1]["event"] == "stopped"


def everything_of(home) -> list[int]:
    return [p.pid for p in processes_of(home.root)]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "group SIGTERM", "control-group SIGTERM"])
def test_stop_signals(home, daemon, events, census, how):
    """`group`: the daemon's process group, as a terminal's Ctrl-C or `kill -- -PGID`; `control-group`:
    every process at once, node included, as systemd's default KillMode=control-group does."""
    daemon.start()
    wait_running(home)
    wait_until(lambda: home.node_events("serving"), what="the node serving")
    match how:
        case "SIGTERM" | "SIGINT":
            daemon.signal(getattr(signal, how))
        case "group SIGTERM":
            os.killpg(daemon.proc.pid, signal.SIGTERM)
        case "control-group SIGTERM":
            for pid in everything_of(home):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass                         # e.g. a `visor status` of wait_running, just ended
    assert daemon.wait_exit(15) == 0
    wait_nothing_left(home, GONE_S)
    assert home.node_events()[-1]["event"] == "stopped"
    assert events.wait_for("visor.stopped") and not events.of("visor.failed")


def test_stop_during_the_restart_delay(home, daemon, events):
    home.set_config(restartsDelaySeconds=30)
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    os.kill(node, signal.SIGKILL)
    events.wait_for("binary.restart_scheduled")
    daemon.signal(signal.SIGTERM)                    # nothing runs; a restart is 30 s away
    assert daemon.wait_exit(5) == 0
    wait_nothing_left(home, GONE_S)
    assert len(home.node_events("started")) == 1


def test_stop_while_the_fetcher_downloads(home, server, daemon, events):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.throttle_bytes_per_s = len(data) // 20    # 20 s: the stop must not wait for it
    daemon.start()
    wait_running(home)
    home.announce(TAG, 120, ready=True)
    wait_until(lambda: [e for e in events.of("fetch.progress", tag=TAG) if 0 < e["bytes"] < e["total"]],
               what="the download under way")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(10) == 0
    wait_nothing_left(home, GONE_S)
    assert not os.path.lexists(home.root / TAG) and home.current == "genesis"   # nothing that looks ready
