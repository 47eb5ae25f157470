"""Auto-install against a release server that drops the download mid-way: after the fetcher's own
retries, fetch.failed and upgrade.blocked, nothing stopped, no folder that looks ready, no partial
folder left; once the server serves properly the blocked upgrade completes."""

from __future__ import annotations

import os

import pytest

from tests.faults.conftest import ASSET, TAG, wait_running
from tests.fakes.zips import release_zip_with_fake_vega
from tests.helpers import wait_until
from visor.args import SNAPSHOT_FLAG

pytestmark = pytest.mark.timeout(60)


def partials(home) -> list[str]:
    return [name for name in os.listdir(home.root) if ".partial-" in name]


def downloads(server) -> list[str]:
    return [path for _, path, _ in server.requests if path.startswith("/download/")]


def test_dropped_downloads_fail_the_fetch_then_the_upgrade_completes_once_served(home, server, daemon, events,
                                                                                  census):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.drop_download_after = len(data) // 2          # full Content-Length, then the connection closes
    daemon.start()
    node = wait_running(home)["binaries"]["vega"]["pid"]
    home.announce(TAG, 120, ready=True)
    # four attempts, 0 + 2 + 4 s apart (urllib3's backoff): the inherent length of this test
    failed = events.wait_for("fetch.failed", tag=TAG, asset=ASSET, timeout_s=15)
    assert "connection dropped" in failed["error"] and "gave up after 4 attempts" in failed["error"]
    assert len(downloads(server)) == 4
    blocked = events.wait_for("upgrade.blocked", tag=TAG)
    assert f"fetch of {TAG} failed" in blocked["reason"]
    status = daemon.status()
    assert status["visor"]["state"] == "blocked" and status["binaries"]["vega"]["pid"] == node
    assert not os.path.lexists(home.root / TAG) and not partials(home)
    assert not events.of("binary.exited") and home.current == "genesis"
    server.drop_download_after = None                    # the mirror comes right; the broker retries by itself
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=15)
    assert home.current == TAG and not partials(home)
    assert len(events.of("fetch.completed", tag=TAG)) == 1
    started = wait_until(lambda: [e for e in home.node_events("started") if e["folder"] == str(home.root / TAG)],
                         what="the new node")
    assert len(started) == 1 and started[0]["argv"][-2:] == [SNAPSHOT_FLAG, "120"]
    assert [e["pid"] for e in events.of("binary.exited")] == [node]
