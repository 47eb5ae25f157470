"""visor.notify: the datagrams systemd would read, on a socket of our own; silence without systemd."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from visor.notify import Notifier


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2)
    return False


def test_ready_status_stopping_and_ping_reach_the_socket(listener):
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("running genesis (vega pid 7)")
    assert received(sock) == ["READY=1", "STATUS=running genesis (vega pid 7)", f"MAINPID={os.getpid()}"]
    n.status("upgrading to v0.73.0 at block 120")
    assert received(sock) == ["STATUS=upgrading to v0.73.0 at block 120"]
    n.ping()
    assert received(sock) == ["WATCHDOG=1"]
    n.stopping("stopping: received SIGTERM")
    assert received(sock) == ["STOPPING=1", "STATUS=stopping: received SIGTERM"]
    n.close()


def test_an_unchanged_status_is_not_sent_again(listener):
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.status("blocked: folder missing")
    n.status("blocked: folder missing")
    assert received(sock) == ["STATUS=blocked: folder missing"]
    assert nothing_waiting(sock)
    n.close()


def test_an_at_sign_names_an_abstract_socket():
    name = f"visor-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)                   # abstract: no file anywhere; systemd uses these too
    sock.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.ping()
        assert received(sock) == ["WATCHDOG=1"]
        n.close()
    finally:
        sock.close()


def test_without_notify_socket_it_is_silent():
    n = Notifier({})
    assert n.watchdog_s is None
    n.ready("running")                       # nothing to send to, and nothing raised
    n.status("x")
    n.ping()
    n.stopping("stopping")
    n.close()


def test_a_socket_nobody_listens_on_is_not_an_error(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    n.ready("running")                       # systemd went away: the node must keep running
    n.close()


@pytest.mark.parametrize("env, interval_s", [
    ({"WATCHDOG_USEC": "200000"}, 0.1),                              # half of what systemd allows
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),          # another process is watched
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_the_watchdog_interval_comes_from_the_environment(env, interval_s):
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock", **env})
    assert n.watchdog_s == interval_s
    n.close()
