"""What we ask the node: the admin JSON-RPC upgrade status, `version`, the latest history segment.

Every call here can block, so only workers use this module. Failures raise NodeError with one line.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import subprocess

from visor.errors import NodeError

NO_SEGMENTS = "no history segments found"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout_s: float):
        super().__init__("localhost", timeout=timeout_s)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """The core node's admin API over its Unix socket (gorilla/rpc JSON codec), one keep-alive connection."""

    def __init__(self, socket_path: str, http_path: str, timeout_s: float = 5.0):
        self.socket_path, self.http_path, self.timeout_s = socket_path, http_path, timeout_s
        self._conn: _UnixConnection | None = None
        self._ids = itertools.count(1)

    def upgrade_status(self) -> tuple[str, int, bool]:
        """(accepted tag or "", upgrade height, ready to upgrade)."""
        result = self.call("protocolupgrade.UpgradeStatus")
        try:
            info = result["AcceptedReleaseInfo"] or {}
            tag, height, ready = info.get("VegaReleaseTag") or "", info.get("UpgradeBlockHeight") or 0, \
                result["ReadyToUpgrade"]
            if not isinstance(tag, str) or type(height) is not int or type(ready) is not bool:
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            raise NodeError(f"unexpected UpgradeStatus result: {json.dumps(result)[:200]}") from None
        return tag, height, ready

    def call(self, method: str):
        call_id = next(self._ids)
        body = json.dumps({"method": method, "params": [None], "id": call_id})
        try:
            status, raw = self._post_once_more_if_stale(body)
        except (OSError, http.client.HTTPException) as err:
            self.close()
            raise NodeError(f"{self.socket_path}: {_describe(err)}") from None
        if status != 200:
            raise NodeError(f"{self.socket_path}: HTTP {status} from {self.http_path}: {raw[:120]!r}")
        try:
            reply = json.loads(raw)
            error, result = reply["error"], reply["result"]
        except (ValueError, KeyError, TypeError):
            raise NodeError(f"{self.socket_path}: reply is not JSON-RPC: {raw[:120]!r}") from None
        if error is not None:
            raise NodeError(f"{self.socket_path}: {method} failed: {error}")
        if not isinstance(result, dict):
            raise NodeError(f"{self.socket_path}: {method} returned {result!r}")
        return result

    def _post_once_more_if_stale(self, body: str) -> tuple[int, bytes]:
        """A kept-alive connection may belong to a node that has since restarted: retry once, fresh."""
        reused = self._conn is not None
        try:
            return self._post(body)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            if not reused:
                raise
            self.close()
            return self._post(body)

    def _post(self, body: str) -> tuple[int, bytes]:
        if self._conn is None:
            self._conn = _UnixConnection(self.socket_path, self.timeout_s)
        self._conn.request("POST", self.http_path, body, {"Content-Type": "application/json"})
        response = self._conn.getresponse()
        raw = response.read(1 << 20)
        if response.will_close:
            self.close()
        return response.status, raw

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _describe(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "admin socket not found (is the node up?)"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the node up?)"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "no answer in time"
    return str(err) or type(err).__name__


def _run(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise NodeError(f"{argv[0]}: binary not found") from None
    except PermissionError:
        raise NodeError(f"{argv[0]}: not executable (permission denied)") from None
    except OSError as err:
        raise NodeError(f"{argv[0]}: cannot run it ({err.strerror or err})") from None
    except subprocess.TimeoutExpired:
        raise NodeError(f"{argv[0]} {' '.join(argv[1:3])}: no answer within {timeout_s:g}s") from None


def binary_version(path: str, timeout_s: float = 20.0) -> str:
    """What `<binary> version --output json` reports as its version."""
    done = _run([path, "version", "--output", "json"], timeout_s)
    if done.returncode != 0:
        raise NodeError(f"{path} version: exit code {done.returncode}: {_last_line(done)}")
    try:
        version = json.loads(done.stdout)["version"]
    except (ValueError, KeyError, TypeError):
        raise NodeError(f"{path} version: not the JSON we expect: {done.stdout.strip()[:120]!r}") from None
    if not isinstance(version, str):
        raise NodeError(f"{path} version: version is not a string: {version!r}")
    return version


def latest_segment(path: str, argv: list[str], timeout_s: float = 30.0) -> int | None:
    """to_height of the data node's latest history segment; None when it has none yet."""
    done = _run([path, *argv], timeout_s)
    if NO_SEGMENTS in done.stdout or NO_SEGMENTS in done.stderr:
        return None
    if done.returncode != 0:
        raise NodeError(f"{path} {' '.join(argv[:3])}: exit code {done.returncode}: {_last_line(done)}")
    try:
        height = json.loads(done.stdout)["LatestSegment"]["to_height"]
    except (ValueError, KeyError, TypeError):
        raise NodeError(f"{path} latest-history-segment: unexpected output {done.stdout.strip()[:120]!r}") \
            from None
    if type(height) is not int:
        raise NodeError(f"{path} latest-history-segment: to_height is not a whole number: {height!r}")
    return height


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
    return lines[-1][:200]
