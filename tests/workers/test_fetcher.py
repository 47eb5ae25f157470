"""The fetcher as its own process against a stand-in broker and the fake release server: it keeps the
broker hearing from it while a download stalls, and a Shutdown in the middle of a fetch is obeyed."""

from __future__ import annotations

import pytest

from tests.fakes.zips import release_zip_with_fake_vega
from visor import protocol
from visor.config import VisorConfig

pytestmark = pytest.mark.timeout(60)
TAG, ASSET = "v0.73.0", "vega-linux-amd64.zip"


def prepare(home, server) -> protocol.Prepare:
    return protocol.Prepare(tag=TAG, folder=str(home.root / TAG), fetch=True,
                            current_run_config=str(home.root / "genesis" / "run-config.toml"),
                            settings=VisorConfig(api_url=server.url).fields())


def test_heartbeats_go_on_while_a_download_stalls_and_the_fetch_completes(home, server, fake_broker):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.stall_after, server.stall_s = len(data) // 2, 2.0     # silent for 2 s: under the 20 s read timeout
    fetcher = fake_broker("workers.fetcher", "fetcher", heartbeat_s=0.2)
    fetcher.send(prepare(home, server))
    assert fetcher.next_report(30, (protocol.FolderReady, protocol.FolderBlocked)) == \
        protocol.FolderReady(tag=TAG, folder=str(home.root / TAG))
    reports = [type(m) for _, m in fetcher.received if not isinstance(m, (protocol.Hello, protocol.Heartbeat))]
    assert reports[0] is protocol.FetchStarted and reports[-2:] == [protocol.FetchCompleted, protocol.FolderReady]
    progress = fetcher.of(protocol.FetchProgress)
    stall_began = max(t for t, p in progress if p.bytes <= server.stall_after)
    stall_ended = min(t for t, p in progress if p.bytes > server.stall_after)
    during = [t for t, _ in fetcher.of(protocol.Heartbeat) if stall_began < t < stall_ended]
    assert len(during) >= 2, f"{len(during)} heartbeats in a {stall_ended - stall_began:.1f}s stall"
    assert fetcher.shutdown() == 0


def test_a_shutdown_in_the_middle_of_a_fetch_is_obeyed_at_once(home, server, fake_broker):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.stall_after, server.stall_s = len(data) // 2, 15.0
    fetcher = fake_broker("workers.fetcher", "fetcher")
    fetcher.send(prepare(home, server))
    fetcher.next_report(10, (protocol.FetchProgress,))             # the download is under way, then stalls
    assert fetcher.shutdown(timeout_s=5) == 0                      # not after the stall
    assert "Traceback" not in fetcher.stderr and not (home.root / TAG).exists()
