"""Auto-install with the real daemon: prefetch at acceptance, and a fetch that fails at upgrade time."""

from __future__ import annotations

import pytest

from tests.fakes.release_server import ReleaseServer
from tests.fakes.zips import release_zip_with_fake_vega
from tests.helpers import wait_until

TAG, ASSET = "v0.73.0", "vega-linux-amd64.zip"


def started_in(home, folder: str) -> dict:
    """The fake node's `started` line from its run out of HOME/folder (it logs its folder and argv)."""
    want = str(home.root / folder)
    return wait_until(lambda: [e for e in home.node_events("started") if e["folder"] == want],
                      what=f"the fake node to start from {want}")[-1]


def downloads(server: ReleaseServer) -> list:
    return [path for _, path, _ in server.requests if path.startswith("/download/")]


@pytest.mark.timeout(60)
def test_accepted_release_is_fetched_before_ready_and_then_upgraded_to(home, server, daemon, events):
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    daemon.start()
    events.wait_for("binary.started", name="vega")
    home.announce(TAG, height=120, ready=False)
    completed = events.wait_for("fetch.completed", tag=TAG, asset=ASSET)
    assert (home.root / TAG / "vega").is_file() and not events.of("upgrade.ready")
    home.announce(TAG, height=120, ready=True)
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)
    assert completed["seq"] < events.wait_for("upgrade.ready", tag=TAG)["seq"]
    assert home.current == TAG
    new = started_in(home, TAG)
    assert new["argv"][-2:] == ["--snapshot.load-from-block-height", "120"]
    assert len(downloads(server)) == 1                    # at ReadyToUpgrade the folder was only verified


@pytest.mark.timeout(60)
def test_fetch_failure_blocks_the_upgrade_without_stopping_anything(home, server, daemon, events):
    daemon.start()
    old = events.wait_for("binary.started", name="vega")
    home.announce(TAG, height=120, ready=True)            # no release on the server yet
    failed = events.wait_for("fetch.failed", tag=TAG, asset=ASSET)
    assert f"no release tagged {TAG}" in failed["error"]
    blocked = events.wait_for("upgrade.blocked", tag=TAG)
    assert "fetch of v0.73.0 failed" in blocked["reason"]
    status = daemon.status()
    assert status["visor"]["state"] == "blocked" and status["binaries"]["vega"]["pid"] == old["pid"]
    assert not events.of("binary.exited") and not (home.root / TAG).exists()
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    events.wait_for("upgrade.completed", tag=TAG, timeout_s=20)   # the broker retries every few seconds
    assert home.current == TAG
    started_in(home, TAG)
