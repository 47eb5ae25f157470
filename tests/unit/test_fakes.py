"""Checks that the fakes behave as their docstrings say, so a failing Visor test blames Visor."""
from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import psutil
import pytest

from tests.helpers import wait_until

from tests.fakes import (call_admin, install_fake_vega, read_log, segment_queries, set_segment,
               write_upgrade_state)
from tests.fakes.release_server import ReleaseServer
from tests.fakes.zips import (HUGE_SIZE, corrupt, make_evil_zip, make_tar_gz, make_zip,
                   release_zip_with_fake_vega)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def tmp():
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="vf-"))  # short: Unix socket paths stay < 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn():
    procs: list[subprocess.Popen] = []

    def start(*args) -> subprocess.Popen:
        proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


def events(log: Path) -> list[str]:
    return [e["event"] for e in read_log(log)]


# -- vega: one-shot commands -------------------------------------------------------------------

def test_version_reports_the_version_file_and_can_fail(tmp):
    exe = install_fake_vega(tmp / "v0.73.0", "v0.73.0")
    out = subprocess.run([exe, "version", "--output", "json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"version": "v0.73.0", "hash": "fake"}
    (tmp / "v0.73.0" / "VERSION").unlink()
    out = subprocess.run([exe, "version", "--output", "json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"] == "v0.0.0"
    (tmp / "v0.73.0" / "VERSION_FAIL").touch()
    out = subprocess.run([exe, "version", "--output", "json"], capture_output=True, text=True)
    assert (out.returncode, out.stderr.strip()) == (3, "boom")


def test_latest_segment_answers_like_the_data_node(tmp):
    exe = install_fake_vega(tmp / "dn", "v0.73.0")
    ask = [exe, "datanode", "network-history", "latest-history-segment", "--home", "/d", "--output", "json"]
    set_segment(tmp / "dn", 1200)
    out = subprocess.run(ask, capture_output=True, text=True)
    assert out.returncode == 0
    assert json.loads(out.stdout)["LatestSegment"]["to_height"] == 1200
    out = subprocess.run([exe, "network-history", "latest-history-segment", "--output=json"],
                         capture_output=True, text=True)
    assert json.loads(out.stdout)["LatestSegment"]["from_height"] == 901
    set_segment(tmp / "dn", None)
    out = subprocess.run(ask, capture_output=True, text=True)
    assert out.returncode == 1 and "no history segments found" in out.stderr
    assert json.loads(out.stdout) == {"error": "no history segments found"}
    (tmp / "dn" / "SEGMENT_FAIL").touch()
    out = subprocess.run(ask, capture_output=True, text=True)
    assert (out.returncode, out.stderr.strip()) == (2, "database locked")
    assert [q["argv"] for q in segment_queries(tmp / "dn")][0] == [str(a) for a in ask[1:]]
    assert len(segment_queries(tmp / "dn")) == 4


# -- vega: node mode ---------------------------------------------------------------------------

def test_node_logs_start_and_stop_and_ignores_unknown_flags(tmp, spawn):
    exe, log = install_fake_vega(tmp / "g", "v0.72.0"), tmp / "vega.log"
    proc = spawn(exe, "node", "--home", "/x", "--log", log, "--snapshot.load-from-block-height", "120")
    wait_until(lambda: events(log) == ["started"], what="started")
    started = read_log(log)[0]
    assert started["argv"][-2:] == ["--snapshot.load-from-block-height", "120"]
    assert (started["mode"], started["folder"], started["pid"]) == ("node", str(tmp / "g"), proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert events(log) == ["started", "stopped"] and read_log(log)[1]["signal"] == 15


def test_node_crashes_on_time_and_can_ignore_sigterm(tmp, spawn):
    exe, log = install_fake_vega(tmp / "g", "v0.72.0"), tmp / "vega.log"
    proc = spawn(exe, "datanode", "start", "--log", log, "--crash-after", "0", "--exit-code", "7")
    assert proc.wait(timeout=5) == 7
    assert events(log) == ["started", "crashed"] and read_log(log)[1]["exitcode"] == 7
    log.unlink()
    proc = spawn(exe, "node", "--log", log, "--crash-after", "0.3")
    assert proc.wait(timeout=5) == 1
    crashed = read_log(log)[1]
    assert crashed["t_mono"] - read_log(log)[0]["t_mono"] >= 0.3
    log.unlink()
    proc = spawn(exe, "node", "--log", log, "--ignore-sigterm")
    wait_until(lambda: events(log) == ["started"], what="started")
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "sigterm-ignored" in events(log), what="sigterm-ignored")
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_node_obeys_sigterm_while_its_admin_api_takes_connections(tmp, spawn):
    """A stop signal that lands while the admin server spawns a connection thread is still obeyed at once
    (it once went to that thread, and the main thread slept on for an hour: Visor's SIGKILL came first)."""
    exe, sock = install_fake_vega(tmp / "g", "v0.72.0"), tmp / "a.sock"

    def connect_until(stop: threading.Event) -> None:
        while not stop.is_set():
            with socket.socket(socket.AF_UNIX) as client:
                try:
                    client.connect(str(sock))
                except OSError:
                    pass

    for attempt in range(25):                    # each one lost it ~1 time in 10 on an idle machine
        log = tmp / f"vega{attempt}.log"
        proc = spawn(exe, "node", "--log", log, "--admin-socket", sock)
        wait_until(lambda: "serving" in events(log), what="serving")
        stop = threading.Event()
        clients = [threading.Thread(target=connect_until, args=(stop,)) for _ in range(3)]
        for client in clients:
            client.start()
        try:
            wait_until(lambda: len(psutil.Process(proc.pid).threads()) > 2, what="a connection thread")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=3) == 0, f"attempt {attempt}"
        finally:
            stop.set()
            for client in clients:
                client.join()
        assert events(log)[-1] == "stopped"


def test_admin_api_speaks_like_gorilla_rpc(tmp, spawn):
    exe, log, sock, state = install_fake_vega(tmp / "g", "v0.72.0"), tmp / "l", tmp / "a.sock", tmp / "u"
    sock.touch()  # a stale file must not stop the node from serving
    proc = spawn(exe, "node", "--log", log, "--admin-socket", sock, "--upgrade-file", state)
    wait_until(lambda: "serving" in events(log), what="admin socket")

    status, reply = call_admin(sock)  # nothing written yet: nothing accepted
    assert status == 200
    assert reply == {"result": {"AcceptedReleaseInfo": {"VegaReleaseTag": "", "UpgradeBlockHeight": 0},
                                "ReadyToUpgrade": False}, "error": None, "id": 1}
    write_upgrade_state(state, "v0.73.0", 120, ready=True)
    assert call_admin(sock, body={"method": "protocolupgrade.UpgradeStatus", "params": [None], "id": 9}) == (
        200, {"result": {"AcceptedReleaseInfo": {"VegaReleaseTag": "v0.73.0", "UpgradeBlockHeight": 120},
                         "ReadyToUpgrade": True}, "error": None, "id": 9})
    write_upgrade_state(state, null_info=True)
    assert call_admin(sock)[1]["result"]["AcceptedReleaseInfo"] is None

    assert call_admin(sock, method="GET") == (405, "rpc: POST method required, received GET")
    assert call_admin(sock, headers={"Content-Type": "text/plain"}) == (
        415, "rpc: unrecognized Content-Type: text/plain")
    assert call_admin(sock, headers={"Content-Type": "application/json; charset=UTF-8"})[0] == 200
    assert call_admin(sock, http_path="/other")[0] == 404
    assert call_admin(sock, body={"method": "nope.Status", "params": [], "id": 1}) == (
        400, 'rpc: can\'t find service "nope.Status"')
    assert call_admin(sock, body={"method": "protocolupgrade.UpgradeStatus", "params": {}, "id": 1})[0] == 400

    write_upgrade_state(state, "v0.73.0", 120, reply="garbage")
    assert call_admin(sock) == (200, "not json{")
    write_upgrade_state(state, "v0.73.0", 120, reply="error")
    assert call_admin(sock)[1] == {"result": None, "error": "something broke", "id": 1}
    write_upgrade_state(state, reply="http500")
    assert call_admin(sock)[0] == 500
    write_upgrade_state(state, reply="close")
    with pytest.raises(http.client.RemoteDisconnected):
        call_admin(sock)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert not sock.exists()
    assert events(log).count("rpc") >= 8


def test_admin_socket_can_open_late(tmp, spawn):
    exe, log, sock = install_fake_vega(tmp / "g", "v0.72.0"), tmp / "l", tmp / "a.sock"
    spawn(exe, "node", "--log", log, "--admin-socket", sock, "--serve-after", "0.5", "--admin-path", "/x")
    wait_until(lambda: events(log) == ["started"], what="started")
    assert not sock.exists()
    wait_until(sock.exists, what="the late socket")
    assert call_admin(sock, http_path="/x")[0] == 200


# -- release server ----------------------------------------------------------------------------

def fetch(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_release_by_tag_and_asset_download():
    asset = release_zip_with_fake_vega("v0.73.0")
    with ReleaseServer() as gh:
        gh.add_release("v0.73.0", {"vega-linux-amd64.zip": asset})
        status, _, body = fetch(f"{gh.url}/repos/vegaprotocol/vega/releases/tags/v0.73.0",
                                {"Authorization": "Bearer T0KEN"})
        release = json.loads(body)
        assert status == 200 and release["tag_name"] == "v0.73.0"
        meta = release["assets"][0]
        assert (meta["name"], meta["size"], meta["state"]) == ("vega-linux-amd64.zip", len(asset), "uploaded")
        assert json.loads(fetch(meta["url"])[2])["id"] == meta["id"]  # no Accept: the JSON
        status, headers, data = fetch(meta["url"], {"Accept": "application/octet-stream"})
        assert (status, data, headers["Content-Length"]) == (200, asset, str(len(asset)))
        assert gh.requests[0][2]["authorization"] == "Bearer T0KEN"
        assert gh.requests[-1][1].startswith(f"/download/{meta['id']}/")  # after the 302
        assert fetch(meta["browser_download_url"])[2] == asset
        assert fetch(f"{gh.url}/repos/vegaprotocol/vega/releases/tags/v9.9.9")[0] == 404
        assert fetch(f"{gh.url}/repos/someone/else/releases")[0] == 404
        gh.by_tag_enabled = False
        status, _, body = fetch(f"{gh.url}/repos/vegaprotocol/vega/releases/tags/v0.73.0")
        assert status == 404 and json.loads(body)["message"] == "Not Found"


def test_release_list_paginates_with_github_link_headers():
    with ReleaseServer() as gh:
        for n in range(5):
            gh.add_release(f"v0.7{n}.0", {"a.zip": b"x"})
        status, headers, body = fetch(f"{gh.url}/repos/vegaprotocol/vega/releases?per_page=2")
        assert [r["tag_name"] for r in json.loads(body)] == ["v0.74.0", "v0.73.0"]  # newest first
        base = f"{gh.url}/repositories/{gh.repo_id}/releases?per_page=2"
        assert headers["Link"] == f'<{base}&page=2>; rel="next", <{base}&page=3>; rel="last"'
        status, headers, body = fetch(f"{base}&page=3")
        assert [r["tag_name"] for r in json.loads(body)] == ["v0.70.0"]
        assert headers["Link"] == f'<{base}&page=2>; rel="prev", <{base}&page=1>; rel="first"'
        assert "Link" not in fetch(f"{gh.url}/repos/vegaprotocol/vega/releases")[1]  # one page of 30


def test_release_server_faults():
    with ReleaseServer() as gh:
        gh.add_release("v0.73.0", {"a.zip": b"y" * 1000})
        gh.fail_next = [500, 502]
        tag_url = f"{gh.url}/repos/vegaprotocol/vega/releases/tags/v0.73.0"
        assert [fetch(tag_url)[0] for _ in range(3)] == [500, 502, 200]
        gh.drop_download_after = 100
        with pytest.raises(http.client.IncompleteRead):
            fetch(f"{gh.url}/download/{gh.asset_id('v0.73.0', 'a.zip')}/a.zip")


# -- archives ----------------------------------------------------------------------------------

def test_release_zip_runs_once_unpacked(tmp):
    data = release_zip_with_fake_vega("v0.73.0")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo("vega")
        assert stat.S_IMODE(info.external_attr >> 16) == 0o755
        zf.extractall(tmp)
    os.chmod(tmp / "vega", 0o755)  # zipfile ignores modes; Visor's unzip must not
    out = subprocess.run([tmp / "vega", "version", "--output", "json"], capture_output=True, text=True)
    assert json.loads(out.stdout)["version"] == "v0.73.0"


def test_hostile_and_broken_archives():
    names = lambda data: zipfile.ZipFile(io.BytesIO(data)).namelist()  # noqa: E731
    assert "../evil" in names(make_evil_zip("traversal"))
    assert "/tmp/evil" in names(make_evil_zip("absolute"))
    link = zipfile.ZipFile(io.BytesIO(make_evil_zip("symlink"))).getinfo("link")
    assert stat.S_ISLNK(link.external_attr >> 16)
    huge = make_evil_zip("huge")
    assert len(huge) < 100_000
    assert zipfile.ZipFile(io.BytesIO(huge)).getinfo("vega").file_size == HUGE_SIZE
    good = make_zip({"a": b"a" * 5000, "bin/": b"", "bin/x": (b"#!", 0o700)})
    assert names(good) == ["a", "bin/", "bin/x"]
    assert corrupt(good) != good and len(corrupt(good)) == len(good)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(corrupt(good, "truncate")))
    assert make_tar_gz({"vega": (b"#!", 0o755)}) == make_tar_gz({"vega": (b"#!", 0o755)})
