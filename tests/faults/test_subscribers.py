"""Subscribers to the event stream that never read: a ZMQ SUB with the default high-water mark, one
with RCVHWM = 1, and `visor events` piped into a reader that never reads (an operator's stuck
`visor events | less`). Events flood in; the daemon keeps running, `status` answers at once, a
subscriber that does read keeps up, and an upgrade completes at normal speed."""

from __future__ import annotations

import subprocess

import pytest

from tests.faults.conftest import TAG, ask_status, wait_running
from tests.helpers import VISOR, stalled_subscribers, wait_until

pytestmark = pytest.mark.timeout(60)
FLOOD = 1500                     # rpc.unreachable events, about 200 KB: past a stalled peer's buffers


@pytest.fixture
def stalled(home):
    """Three subscribers that never read, connected before the daemon binds (in a process of their own,
    see helpers.stalled_subscribers)."""
    stalled_subs = stalled_subscribers(f"ipc://{home.root}/.visor/events.sock", 0, 1)
    follower = subprocess.Popen([*VISOR, "events", "--home", str(home.root), "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    yield follower
    for proc in (follower, stalled_subs):
        proc.kill()
        proc.wait(5)
        proc.stdout.close()


def test_subscribers_that_never_read_do_not_slow_the_daemon(home, daemon, events, census, stalled):
    home.stage(TAG, TAG)
    home.set_config(upgradeStatusIntervalMilliseconds=1, maxNumberOfFirstConnectionRetries=1000000,
                    maxNumberOfRestartConnectionRetries=1000000)
    home.announce(reply="garbage")                     # every call fails: one event per millisecond or so
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    wait_until(lambda: len(events.of("rpc.unreachable")) >= FLOOD, what=f"{FLOOD} events", timeout_s=20)
    assert stalled.poll() is None                      # `visor events` is stuck writing, not dead
    seqs = [e["seq"] for e in events.received]         # it may join a few events late (ZMQ's slow joiner)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))   # ...but the one that reads misses nothing
    for _ in range(5):                                 # prompt on two loaded cores; a blocked broker never is
        status, took_s = ask_status(home, timeout_s=5.0)
        assert took_s < 3.0, f"status took {took_s:.2f}s"
    assert status["binaries"]["vega"]["pid"] == node and status["visor"]["state"] == "running"
    home.set_config(upgradeStatusIntervalMilliseconds=100)
    events.wait_for("config.reloaded")
    home.announce(TAG, 120, ready=True)
    ready = events.wait_for("upgrade.ready", tag=TAG, timeout_s=5)
    done = events.wait_for("upgrade.completed", tag=TAG, timeout_s=5)
    assert done["ts"] - ready["ts"] < 10.0 and done["downtime_ms"] < 5000   # a blocked publisher: never
    assert home.current == TAG and daemon.proc.poll() is None
    assert daemon.stop(timeout_s=5) == 0               # nor its stop: the stalled ones are still connected
