"""The upgrade watcher as its own process, against a stand-in broker and the fake core node on its admin
socket: what it reports (answers when they change, every failure), and that it heartbeats when idle."""

from __future__ import annotations

import subprocess

import pytest

from visor import protocol

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def core_node(home):
    """The fake core node serving its admin API on home.socket, answering from home.upgrade_file."""
    proc = subprocess.Popen([str(home.root / "genesis" / "vega"), *home.node_args()])
    yield proc
    proc.kill()
    proc.wait(5)


def watch(home, interval_ms: int = 50) -> protocol.Watch:
    return protocol.Watch(socket_path=str(home.socket), http_path="/rpc", interval_ms=interval_ms)


def test_it_reports_what_the_node_says_when_it_changes_and_every_failed_call(home, core_node, fake_broker):
    watcher = fake_broker("workers.upgrade_watcher", "upgrade-watcher")
    watcher.send(watch(home))
    first = watcher.next_report(10, (protocol.UpgradeStatus,))    # failures first while the socket comes up
    assert first == protocol.UpgradeStatus(tag="", height=0, ready=False)
    home.announce("v0.73.0", 120)
    assert watcher.next_report() == protocol.UpgradeStatus(tag="v0.73.0", height=120, ready=False)
    home.announce("v0.73.0", 120, ready=True)
    assert watcher.next_report() == protocol.UpgradeStatus(tag="v0.73.0", height=120, ready=True)
    home.announce("v0.73.0", 120, ready=True, reply="garbage")
    failed = [watcher.next_report() for _ in range(3)]            # one report per failed call, not per change
    assert all(isinstance(f, protocol.RpcFailed) and "reply is not JSON-RPC" in f.error for f in failed)
    home.announce("v0.73.0", 120, ready=True)
    assert watcher.next_report(5, (protocol.UpgradeStatus,)).ready  # after a failure the same answer is news
    reports = [m for _, m in watcher.received if isinstance(m, protocol.UpgradeStatus)]
    assert len(reports) == 4                                      # the same answer twice is reported once
    assert watcher.shutdown() == 0


def test_a_node_that_goes_away_is_a_failed_call_naming_the_socket(home, core_node, fake_broker):
    watcher = fake_broker("workers.upgrade_watcher", "upgrade-watcher")
    watcher.send(watch(home))
    watcher.next_report(10, (protocol.UpgradeStatus,))
    core_node.kill()
    core_node.wait(5)
    failed = watcher.next_report(5, (protocol.RpcFailed,))
    assert failed.error.startswith(f"{home.socket}: ")
    assert watcher.shutdown() == 0 and "Traceback" not in watcher.stderr


def test_an_idle_watcher_heartbeats_and_asks_nothing(home, fake_broker):
    watcher = fake_broker("workers.upgrade_watcher", "upgrade-watcher", heartbeat_s=0.1)
    watcher.wait_for(protocol.Heartbeat, count=3, timeout_s=5)
    assert [type(m) for _, m in watcher.received if not isinstance(m, protocol.Heartbeat)] == [protocol.Hello]
    assert watcher.shutdown() == 0
