"""Fakes for Visor's tests: an executable fake `vega`, a fake GitHub release server, archive builders.

This module installs the fake vega, steers it (upgrade state, history segment) and reads what it
recorded. It builds fixtures only: it never imports Visor and never starts a process.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

VEGA_SOURCE = Path(__file__).with_name("vega.py")
UPGRADE_STATUS_CALL = {"method": "protocolupgrade.UpgradeStatus", "params": [None], "id": 1}


def fake_vega_script() -> bytes:
    """vega.py with a shebang naming this interpreter; -S skips site-packages so it starts fast."""
    _shebang, rest = VEGA_SOURCE.read_bytes().split(b"\n", 1)
    return f"#!{sys.executable} -S\n".encode() + rest


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    # The fakes re-read these files at any moment: they must see the old file or the new one, whole.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def install_fake_vega(folder: Path, version: str, *, name: str = "vega") -> Path:
    """Puts an executable fake vega named `name` in `folder`, reporting `version`. Returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / name
    _atomic_write(exe, fake_vega_script(), 0o755)
    (folder / "VERSION").write_text(version + "\n")
    return exe


def write_upgrade_state(path: Path, tag: str = "", height: int = 0, ready: bool = False,
                        reply: str = "ok", *, null_info: bool = False) -> None:
    """What the fake node's admin API answers from its next call on (see vega.py --upgrade-file).

    reply: "ok", "garbage", "error", "hang", "http500" or "close". null_info: AcceptedReleaseInfo is
    null, as a real node answers before it has begun its first block.
    """
    state = {"tag": tag, "height": height, "ready": ready, "reply": reply}
    if null_info:
        state["null_info"] = True
    _atomic_write(Path(path), json.dumps(state).encode())


def set_segment(folder: Path, height: int | str | None) -> None:
    """The data node's latest history segment ends at `height`; None: there is no segment; a string
    is printed as it is (malformed output)."""
    path = Path(folder) / "SEGMENT"
    if height is None:
        path.unlink(missing_ok=True)
    else:
        _atomic_write(path, f"{height}\n".encode())


def read_log(path: Path) -> list[dict]:
    """The JSON lines a fake wrote (its --log file, or segment-queries.log); [] when there is none."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # still being written
    return [json.loads(line) for line in lines]


def segment_queries(folder: Path) -> list[dict]:
    """Each `latest-history-segment` call the fake in `folder` answered, oldest first."""
    return read_log(Path(folder) / "segment-queries.log")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout_s: float):
        super().__init__("localhost", timeout=timeout_s)  # Host: localhost, as Go's client sends for unix
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock


def call_admin(socket_path, http_path: str = "/rpc", body=None, headers=None, *,
               method: str = "POST", timeout_s: float = 5.0) -> tuple[int, dict | str]:
    """One HTTP request to an admin socket. body: a dict (sent as JSON), bytes or str; by default an
    UpgradeStatus call. headers: by default Content-Type: application/json. Returns (status, the
    decoded JSON, or the text when it is not JSON). Connection errors propagate."""
    if body is None:
        body = UPGRADE_STATUS_CALL
    payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
    payload = payload.encode() if isinstance(payload, str) else payload
    conn = _UnixHTTPConnection(str(socket_path), timeout_s)
    try:
        conn.request(method, http_path, body=payload,
                     headers={"Content-Type": "application/json"} if headers is None else dict(headers))
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text
