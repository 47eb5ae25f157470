"""A core node whose admin API answers garbage, errors, HTTP 500, closes the connection or hangs.

With a generous retry budget (an operator's choice for a slow archive node) the node is never
touched, Visor keeps running and answers `status` promptly (a hanging call blocks the upgrade
watcher only), and the watcher picks the real answers up again once the node gives them."""

from __future__ import annotations

import pytest

from tests.faults.conftest import TAG, ask_status, wait_running
from tests.helpers import run_cli, wait_until

pytestmark = pytest.mark.timeout(60)

# reply mode -> what the operator reads in rpc.unreachable
REPLIES = {
    "garbage": "reply is not JSON-RPC",
    "error": "protocolupgrade.UpgradeStatus failed: something broke",
    "http500": "HTTP 500",
    "close": "Remote end closed connection without response",
    "hang": "no answer in time",
}


@pytest.mark.parametrize("reply", list(REPLIES))
def test_bad_replies_never_touch_the_node(home, daemon, events, census, reply):
    home.set_config(maxNumberOfFirstConnectionRetries=100000, maxNumberOfRestartConnectionRetries=100000)
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    wait_until(lambda: home.node_events("rpc"), what="the node to answer once")
    before = len(events.of("rpc.unreachable"))           # the calls before the node had its socket up
    home.announce(reply=reply)
    failures = wait_until(lambda: events.of("rpc.unreachable")[before:], what="a failed call", timeout_s=5)
    assert all(REPLIES[reply] in e["error"] for e in failures), failures[-1]["error"]
    assert failures[-1]["max"] == 100000
    # while the watcher waits on the node (hang: a whole second per call), the broker answers at once
    for _ in range(5):                                   # prompt on two loaded cores; a blocked broker never is
        status, took_s = ask_status(home, timeout_s=5.0)
        assert took_s < 3.0, f"status took {took_s:.2f}s"
    assert status["visor"]["state"] == "running" and status["binaries"]["vega"]["pid"] == node
    assert status["workers"]["upgrade-watcher"]["restarts"] == 0
    assert run_cli("status", "--home", home.root, timeout_s=5).returncode == 0
    # the node comes right: the watcher hears it again
    home.announce(TAG, 120)
    events.wait_for("upgrade.accepted", tag=TAG, timeout_s=5)
    assert not events.of("binary.exited") and not events.of("binary.restart_scheduled")
    assert len(home.node_events("started")) == 1 and not home.node_events("stopped")
    assert daemon.proc.poll() is None
