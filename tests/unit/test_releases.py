"""visor.releases against the fake release server: finding, downloading, verifying, installing a release."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import threading
import time
import tomllib
import zipfile

import pytest

from tests.fakes import install_fake_vega
from tests.fakes.release_server import ReleaseServer
from tests.fakes.zips import corrupt, make_evil_zip, make_tar_gz, release_zip_with_fake_vega
from tests.helpers import run_cli
from visor import protocol
from visor.config import VisorConfig, load_run_config
from visor.errors import FetchError
from visor.releases import Source, derive_run_config, ensure_folder
from workers.fetcher import prepare

TAG, ASSET = "v0.73.0", "vega-linux-amd64.zip"


@pytest.fixture(scope="module")
def stopping():
    """Servers stop in the background (shutdown waits out serve_forever's 0.5 s poll); all by the end."""
    threads = []
    yield threads
    for thread in threads:
        thread.join(5)


@pytest.fixture
def server(stopping):
    s = ReleaseServer().start()
    yield s
    stopping.append(threading.Thread(target=s.stop))
    stopping[-1].start()


def source(server: ReleaseServer, read_timeout_s: float = 1.0, **settings) -> Source:
    """The default autoInstall settings pointed at the fake; impatient, so failures are quick."""
    fields = {**VisorConfig().fields(), "api_url": server.url, **settings}
    return Source.from_settings(fields, timeout_s=(2.0, read_timeout_s), attempts=3, backoff_s=0.01)


def fetch(home, src: Source, tag: str = TAG) -> list:
    """ensure_folder as the fetcher calls it; returns the reports."""
    reports = []
    ensure_folder(home.root / tag, tag, home.root / "genesis" / "run-config.toml", src, reports.append)
    return reports


def assert_nothing_left(home, tag: str = TAG) -> None:
    assert not (home.root / tag).exists(), "a failed fetch left a folder that looks ready"
    assert not list(home.root.glob(f".{tag}.partial-*")), "a failed fetch left its partial folder"


def downloads(server: ReleaseServer) -> list:
    return [r for r in server.requests if r[1].startswith("/download/")]


def test_fetch_by_tag_installs_a_verified_folder(home, server):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    reports = fetch(home, source(server))
    folder = home.root / TAG
    rc, _ = load_run_config(folder / "run-config.toml")
    assert rc.name == TAG and rc.vega.path == folder / "vega"
    assert os.stat(rc.vega.path).st_mode & 0o111 == 0o111
    assert [type(r) for r in (reports[0], reports[-1])] == [protocol.FetchStarted, protocol.FetchCompleted]
    assert reports[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert reports[-2] == protocol.FetchProgress(tag=TAG, asset=ASSET, bytes=len(data), total=len(data))
    assert not any("/releases?" in path for _, path, _ in server.requests)   # no list needed
    assert not list(home.root.glob(".*.partial-*"))


def test_run_config_is_the_current_one_with_name_binary_and_datanode_args(tmp_path):
    current = tmp_path / "run-config.toml"
    current.write_text('name = "genesis"\n[vega.binary]\npath = "/opt/vega"\nargs = ["node", "--home", "/v"]\n'
                       '[vega.rpc]\nsocketPath = "/v/admin.sock"\nhttpPath = "/rpc"\n'
                       '[data_node.binary]\npath = "/opt/dn"\nargs = ["node", "--home", "/dn"]\n')
    raw = tomllib.loads(derive_run_config(current, TAG, "vega").decode())
    assert raw == {"name": TAG,
                   "vega": {"binary": {"path": "vega", "args": ["node", "--home", "/v"]},
                            "rpc": {"socketPath": "/v/admin.sock", "httpPath": "/rpc"}},
                   "data_node": {"binary": {"path": "vega", "args": ["datanode", "start", "--home", "/dn"]}}}


def test_list_fallback_follows_pagination(home, server):
    server.by_tag_enabled = False
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    for n in range(120):                                  # newer releases push ours onto page 2
        server.add_release(f"v0.80.{n}", {ASSET: b"not this one"})
    fetch(home, source(server))
    assert (home.root / TAG / "vega").is_file()
    assert any(path.startswith("/repositories/4242/releases?per_page=100&page=2") for _, path, _ in server.requests)


def test_token_goes_to_the_api_only_and_is_never_shown(home, server, monkeypatch, caplog):
    secret = "ghp_s3cret-t0ken"
    monkeypatch.setenv("GITHUB_TOKEN", secret)
    server.download_host = "localhost"                    # the 302 to the bytes leaves the API's host ...
    server.reject_auth_on_download = True                 # ... and object storage refuses a forwarded token
    server.fail_next = [503]                              # a retry is logged: it must not show the token
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    with caplog.at_level(logging.DEBUG):
        reports = fetch(home, source(server))
    api = [h for _, path, h in server.requests if path.startswith("/repos/")]
    assert api and all(h.get("Authorization") == f"Bearer {secret}" for h in api)
    assert downloads(server) and all("Authorization" not in h for _, _, h in downloads(server))
    assert secret not in caplog.text and secret not in repr(reports)


def test_checksum_match_is_accepted(home, server):
    data = release_zip_with_fake_vega(TAG)
    sums = f"{'0' * 64}  other.zip\n{hashlib.sha256(data).hexdigest()}  {ASSET}\n".encode()
    server.add_release(TAG, {ASSET: data, "SHA256SUMS": sums})
    fetch(home, source(server, checksums_name="SHA256SUMS"))
    assert (home.root / TAG / "vega").is_file()


def test_checksum_mismatch_is_refused(home, server):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data, "SHA256SUMS": f"{'ab' * 32}  {ASSET}\n".encode()})
    reports = []
    with pytest.raises(FetchError, match=f"{ASSET}: sha256 .* does not match"):
        ensure_folder(home.root / TAG, TAG, home.root / "genesis/run-config.toml",
                      source(server, checksums_name="SHA256SUMS"), reports.append)
    assert isinstance(reports[-1], protocol.FetchFailed) and "does not match" in reports[-1].error
    assert_nothing_left(home)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_zip_is_refused(home, server, how):
    server.add_release(TAG, {ASSET: corrupt(release_zip_with_fake_vega(TAG), how)})
    with pytest.raises(FetchError, match="not a valid zip"):
        fetch(home, source(server))
    assert_nothing_left(home)


@pytest.mark.parametrize("kind, match", [("traversal", "outside its folder"), ("absolute", "outside its folder"),
                                         ("symlink", "link or special file"), ("huge", "over the")])
def test_hostile_zip_is_refused_before_anything_is_written(home, server, kind, match):
    target = {"traversal": "../../escaped", "absolute": f"{home.root}/escaped", "symlink": str(home.root)}
    server.add_release(TAG, {ASSET: make_evil_zip(kind, target=target.get(kind))})
    with pytest.raises(FetchError, match=match):
        fetch(home, source(server))
    assert not (home.root / "escaped").exists() and not (home.root / "evil").exists()
    assert_nothing_left(home)


def test_tar_gz_works_and_its_links_are_refused(home, server):
    vega = release_zip_with_fake_vega(TAG)                # reuse its two files for the tarball
    files = {n: (zipfile.ZipFile(io.BytesIO(vega)).read(n), 0o755) for n in ("vega", "VERSION")}
    server.add_release(TAG, {"vega.tar.gz": make_tar_gz(files)})
    fetch(home, source(server, asset_name="vega.tar.gz"))
    assert (home.root / TAG / "vega").is_file()
    server.add_release("v0.74.0", {"vega.tar.gz": make_tar_gz({**files, "link": (b"/etc", stat.S_IFLNK | 0o777)})})
    with pytest.raises(FetchError, match="link or special file"):
        fetch(home, source(server, asset_name="vega.tar.gz"), "v0.74.0")
    assert_nothing_left(home, "v0.74.0")


def test_server_errors_are_retried(home, server):
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    server.fail_next = [503, 502]
    fetch(home, source(server))
    assert (home.root / TAG / "vega").is_file()


def test_server_errors_exhausted_fail_with_one_line(home, server):
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    server.fail_next = [500] * 3
    with pytest.raises(FetchError, match=r"HTTP 500 \(gave up after 3 attempts\)") as err:
        fetch(home, source(server))
    assert "\n" not in str(err.value) and len(server.requests) == 3
    assert_nothing_left(home)


def test_not_found_is_not_retried(home, server):
    with pytest.raises(FetchError, match=f"no release tagged {TAG}"):
        fetch(home, source(server))
    assert len(server.requests) == 2                      # by tag, then the list: once each


def test_a_silent_server_times_out(home, server):
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    server.delay_s = 1.0
    with pytest.raises(FetchError, match=r"no answer within 0.2s \(gave up after 3 attempts\)"):
        fetch(home, source(server, read_timeout_s=0.2))
    assert_nothing_left(home)


def test_a_token_goes_only_to_the_api_origin_even_when_the_api_points_elsewhere(home, server, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_s3cret-t0ken")
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    # the API is at "localhost"; the asset URLs it hands out name 127.0.0.1, another origin
    fetch(home, source(server, api_url=server.url.replace("127.0.0.1", "localhost")))
    with_token = {h["host"].partition(":")[0] for _, _, h in server.requests if "Authorization" in h}
    assert with_token == {"localhost"} and len(server.requests) == 3   # release; asset, its bytes: no token


def test_retry_after_is_waited_out(home, server):
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    server.fail_next, server.retry_after = [429], "1"
    started = time.monotonic()
    fetch(home, source(server))
    assert time.monotonic() - started >= 0.9 and (home.root / TAG / "vega").is_file()


def test_a_download_stalled_past_the_read_timeout_fails_in_bounded_time(home, server):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.stall_after, server.stall_s = len(data) // 2, 3.0
    started, reports = time.monotonic(), []
    with pytest.raises(FetchError, match=r"no answer within 0.3s \(gave up after 3 attempts\)"):
        ensure_folder(home.root / TAG, TAG, home.root / "genesis/run-config.toml",
                      source(server, read_timeout_s=0.3), reports.append)
    assert time.monotonic() - started < 8                 # 3 × 0.3 s and backoff; not the 3 × 3 s of stalls
    assert reports[-1] == protocol.FetchFailed(tag=TAG, asset=ASSET, error=f"{server.url}/repos/vegaprotocol/vega/"
                                               f"releases/assets/{server.asset_id(TAG, ASSET)}: no answer within "
                                               f"0.3s (gave up after 3 attempts)")
    assert len(downloads(server)) == 3
    assert_nothing_left(home)


def test_a_download_that_pauses_within_the_read_timeout_completes(home, server):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.stall_after, server.stall_s = len(data) // 2, 0.3
    fetch(home, source(server, read_timeout_s=2.0))
    assert len(downloads(server)) == 1 and (home.root / TAG / "vega").is_file()


def test_a_dropped_download_is_retried(home, server):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.drop_download_after = len(data) // 2
    reports = []

    def report(msg):                                      # once a download is under way, heal the server
        reports.append(msg)                               # (for the next request: this one is cut short)
        if isinstance(msg, protocol.FetchProgress):
            server.drop_download_after = None
    ensure_folder(home.root / TAG, TAG, home.root / "genesis/run-config.toml", source(server), report)
    assert len(downloads(server)) == 2 and (home.root / TAG / "vega").is_file()


def test_progress_is_reported_a_few_times_a_second(home, server):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.throttle_bytes_per_s = len(data) * 2          # about half a second
    started = time.monotonic()
    progress = [r for r in fetch(home, source(server)) if isinstance(r, protocol.FetchProgress)]
    elapsed_s = time.monotonic() - started
    assert 2 <= len(progress) <= 4 * elapsed_s + 2
    assert [p.bytes for p in progress] == sorted(p.bytes for p in progress) and progress[-1].bytes == len(data)


def test_a_download_that_keeps_dropping_fails(home, server):
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {ASSET: data})
    server.drop_download_after = 100
    with pytest.raises(FetchError, match="dropped"):
        fetch(home, source(server))
    assert len(downloads(server)) == 3
    assert_nothing_left(home)


def test_version_mismatch_is_refused(home, server):
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega("v0.72.9")})
    with pytest.raises(FetchError, match=f"version mismatch: {ASSET}/vega reports v0.72.9, want {TAG}"):
        fetch(home, source(server))
    assert_nothing_left(home)


def test_missing_asset_names_what_the_release_has(home, server):
    server.add_release(TAG, {"vega-darwin-arm64.zip": b"x"})
    with pytest.raises(FetchError, match=f"no asset named {ASSET} .*vega-darwin-arm64.zip"):
        fetch(home, source(server))
    assert_nothing_left(home)


@pytest.mark.parametrize("asset", [ASSET, "vega"])          # a zip, and a raw binary (renamed, not unpacked)
def test_every_file_and_folder_is_on_disk_before_the_folder_is_renamed_into_place(home, server, monkeypatch, asset):
    import visor.releases
    data = release_zip_with_fake_vega(TAG)
    server.add_release(TAG, {asset: data if asset == ASSET else zipfile.ZipFile(io.BytesIO(data)).read("vega")})
    if asset == "vega":                   # alone, the fake vega has no VERSION file to report: durability only
        monkeypatch.setattr(visor.releases, "check_folder", lambda folder, tag: "")
    log, real_fsync, real_rename = [], os.fsync, visor.releases.rename_noreplace
    monkeypatch.setattr(os, "fsync", lambda fd: (log.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(visor.releases, "rename_noreplace", lambda src, dst: (log.append(("rename", str(src))),
                                                                             real_rename(src, dst)))
    fetch(home, source(server, asset_name=asset))
    renamed_at = next(i for i, entry in enumerate(log) if entry[0] == "rename")
    partial = log[renamed_at][1]
    synced = {os.path.relpath(p, partial) for p in log[:renamed_at] if p.startswith(partial)}
    folder = home.root / TAG
    assert synced == {".", *(str(p.relative_to(folder)) for p in folder.rglob("*"))}
    assert str(home.root) in log[renamed_at:]                # and the rename itself, in the home


def test_a_folder_that_appears_just_before_the_rename_is_never_replaced_even_empty(home, server, monkeypatch):
    import visor.releases
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    target, real_sync = home.root / TAG, visor.releases._fsync_tree
    # an operator's mkdir at the last instant: os.rename would silently replace an empty folder
    monkeypatch.setattr(visor.releases, "_fsync_tree", lambda folder: (real_sync(folder), target.mkdir()))
    with pytest.raises(FetchError, match=f"{target} appeared meanwhile: {target}/run-config.toml"):
        fetch(home, source(server))
    assert target.is_dir() and not list(target.iterdir())
    assert not list(home.root.glob(f".{TAG}.partial-*"))


def test_stale_partial_folders_are_removed_on_the_next_attempt(home, server):
    stale = home.root / f".{TAG}.partial-dead1234"
    (stale / "folder").mkdir(parents=True)
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    fetch(home, source(server))
    assert not stale.exists() and (home.root / TAG / "vega").is_file()


def test_prepare_verifies_an_existing_folder_without_the_network(home):
    home.stage(TAG, TAG)
    cmd = protocol.Prepare(tag=TAG, folder=str(home.root / TAG), fetch=True, settings=VisorConfig(
        api_url="http://127.0.0.1:9").fields(), current_run_config=str(home.root / "genesis/run-config.toml"))
    assert prepare(cmd, lambda _m: None, {}) == protocol.FolderReady(tag=TAG, folder=cmd.folder)
    install_fake_vega(home.root / TAG, "v0.72.9")
    blocked = prepare(cmd, lambda _m: None, {})
    assert blocked.reason == f"version mismatch: {home.root / TAG / 'vega'} reports v0.72.9, want {TAG}"


def test_a_folder_whose_run_config_names_no_admin_socket_is_not_ready(home):
    # after the upgrade Visor could never ask the new node for the next one: held before anything stops
    home.stage(TAG, TAG)
    path = home.root / TAG / "run-config.toml"
    path.write_text(path.read_text().replace(f'socketPath = "{home.socket}"', 'socketPath = ""'))
    cmd = protocol.Prepare(tag=TAG, folder=str(home.root / TAG), fetch=False,
                           current_run_config=str(home.root / "genesis/run-config.toml"))
    assert prepare(cmd, lambda _m: None, {}).reason == \
        f"{path}: vega.rpc.socketPath is empty; set it to the core node's admin socket"


def test_a_folder_verified_at_acceptance_is_not_run_again_at_the_upgrade_unless_it_changed(home):
    home.stage(TAG, TAG)
    cmd = protocol.Prepare(tag=TAG, folder=str(home.root / TAG), fetch=False,
                           current_run_config=str(home.root / "genesis/run-config.toml"))
    verified: dict = {}
    assert isinstance(prepare(cmd, lambda _m: None, verified), protocol.FolderReady)
    (home.root / TAG / "VERSION_FAIL").write_text("")          # `vega version` would now fail...
    assert isinstance(prepare(cmd, lambda _m: None, verified), protocol.FolderReady)   # ...but is not run
    install_fake_vega(home.root / TAG, TAG)                       # the binary is replaced: run it again
    assert "exit code 3" in prepare(cmd, lambda _m: None, verified).reason


def test_prepare_without_fetch_blocks_on_a_missing_folder(home):
    folder = str(home.root / TAG)
    cmd = protocol.Prepare(tag=TAG, folder=folder, fetch=False, current_run_config=str(home.root / "genesis"))
    assert prepare(cmd, lambda _m: None, {}).reason == f"folder {folder} is missing and auto-install is off"


def test_visor_fetch_twice_second_is_a_no_op(home, server):
    server.add_release(TAG, {ASSET: release_zip_with_fake_vega(TAG)})
    home.set_config(**{"autoInstall.apiUrl": server.url})   # auto-install stays off: the operator asked
    first = run_cli("fetch", "--home", home.root, TAG)
    assert first.returncode == 0, first.stderr
    assert "ready and verified" in first.stdout and (home.root / TAG / "vega").is_file()
    asked = len(server.requests)
    second = run_cli("fetch", "--home", home.root, TAG)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert len(server.requests) == asked


def test_visor_fetch_failure_is_one_line_and_leaves_nothing(home, server):
    home.set_config(**{"autoInstall.apiUrl": server.url})
    done = run_cli("fetch", "--home", home.root, TAG)
    assert done.returncode == 1
    assert done.stderr.startswith("visor: fetch of v0.73.0 failed:") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    assert_nothing_left(home)


def test_a_tag_that_would_leave_the_home_is_refused(home, server):
    with pytest.raises(FetchError, match="cannot name a folder"):
        fetch(home, source(server), "../outside")
    assert not server.requests


def test_visor_fetch_does_not_touch_an_existing_broken_folder(home, server):
    home.stage(TAG, "v0.72.9")
    home.set_config(**{"autoInstall.apiUrl": server.url})
    done = run_cli("fetch", "--home", home.root, TAG)
    assert done.returncode == 1 and not server.requests
    assert done.stderr == f"visor: version mismatch: {home.root / TAG / 'vega'} reports v0.72.9, want {TAG}\n"
