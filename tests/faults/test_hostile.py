"""Hostile input on every socket in H/.visor: garbage frames, truncated msgpack, wrong kinds and
versions, frames over the 1 MiB limit, raw bytes that are not ZeroMQ at all, idle connections, a
flood of 10,000 frames, and forged reports from a fake identity. The broker never crashes or stalls:
`status` answers promptly afterwards, the node and the workers are the same processes, nothing was
acted on. A well-formed request of a kind the control socket does not serve gets an error reply."""

from __future__ import annotations

import os
import socket
import stat
import time

import msgpack
import pytest
import zmq

from tests.faults.conftest import TAG, ask_status, wait_running
from tests.helpers import processes_of, run_cli
from visor import protocol

pytestmark = pytest.mark.timeout(60)
OVERSIZED = b"\x00" * ((1 << 20) + 1024)
FLOOD = 10_000


V = protocol.VERSION


def garbage_frames(node_pid: int) -> list[bytes]:
    """Frames a broker must refuse one by one without harm."""
    ok = protocol.encode(protocol.StatusRequest())
    return [
        b"", b"\xff", b"garbage" * 10, os.urandom(300),
        ok[: len(ok) // 2],                                          # truncated msgpack
        msgpack.packb([1, 2, 3]), msgpack.packb(7), msgpack.packb(None),
        msgpack.packb({"v": V + 1, "kind": "status_request"}),      # a version we do not speak
        msgpack.packb({"v": V}), msgpack.packb({"kind": "status_request"}),
        msgpack.packb({"v": V, "kind": ["status_request"]}),         # unhashable kind
        msgpack.packb({"v": V, "kind": {"a": 1}}),
        msgpack.packb({"v": V, "kind": "status_request", "extra": 1}),
        msgpack.packb({1: 2, "v": V, "kind": "hello"}),               # a key that is not a string
        msgpack.packb({"v": V, "kind": "hello", "name": 5, "pid": "x"}),
        b"\x91" * 5000,                                               # arrays nested 5000 deep
        b"\xdb\xff\xff\xff\xff",                                      # a string claiming 4 GiB
        protocol.encode(protocol.BinaryExited(name="vega", pid=node_pid, exitcode=1)),
        protocol.encode(protocol.UpgradeStatus(tag=TAG, height=120, ready=True)),
        protocol.encode(protocol.Shutdown()),
    ]


def raw_garbage(path, payloads: list[bytes]) -> None:
    """Plain Unix-socket clients that do not speak ZeroMQ at all."""
    for payload in payloads:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(path))
            try:
                s.sendall(payload)
                s.recv(4096)                                         # the greeting, or the close
            except OSError:
                pass


RAW = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(70_000),
       b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\x00" * 16 + b"\x00" * 31 + os.urandom(500)]


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def steady(daemon, home, before: dict, events) -> None:
    """What an operator checks afterwards: prompt answers, the same processes, nothing acted on."""
    for _ in range(3):                                # prompt on two loaded cores; a stalled broker never is
        status, took_s = ask_status(home, timeout_s=5.0)
        assert took_s < 3.0, f"status took {took_s:.2f}s"
    assert run_cli("status", "--home", home.root, timeout_s=5).returncode == 0
    assert status["visor"]["state"] == "running"
    assert status["binaries"]["vega"]["pid"] == before["binaries"]["vega"]["pid"]
    assert {n: (w["pid"], w["restarts"], w["alive"]) for n, w in status["workers"].items()} == \
        {n: (w["pid"], w["restarts"], w["alive"]) for n, w in before["workers"].items()}
    assert not events.of("binary.exited") and not events.of("upgrade.ready") and not events.of("worker.exited")
    assert home.current == "genesis" and len(home.node_events("started")) == 1
    assert daemon.proc.poll() is None


def test_the_runtime_folder_is_0700_and_its_sockets_0600(home, daemon):
    daemon.start()
    wait_running(home)
    runtime = home.root / ".visor"
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    sockets = {p.name: stat.S_IMODE(p.stat().st_mode) for p in runtime.iterdir() if stat.S_ISSOCK(p.stat().st_mode)}
    assert sockets == {"control.sock": 0o600, "broker.sock": 0o600, "events.sock": 0o600}
    assert stat.S_IMODE((runtime / "state.json").stat().st_mode) == 0o600


def test_garbage_on_the_control_socket(home, daemon, events, ctx, census):
    home.stage(TAG, TAG)
    daemon.start()
    before = wait_running(home)
    endpoint = f"ipc://{home.root}/.visor/control.sock"
    # a REQ client: every frame it sends is a request, and each gets an error reply
    for frame in garbage_frames(before["binaries"]["vega"]["pid"]):
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(endpoint)
        req.send(frame)
        assert req.poll(2000), f"no reply to {frame[:40]!r}"
        reply = protocol.decode(req.recv())
        assert isinstance(reply, protocol.ErrorReply) and reply.error, (frame[:40], reply)
        req.close()
    # a well-formed request of a kind the control socket does not serve: a clear error, not silence
    req = ctx.socket(zmq.REQ)
    req.connect(endpoint)
    req.send(msgpack.packb({"v": V, "kind": "reboot_node"}))
    assert req.poll(2000) and "reboot_node" in protocol.decode(req.recv()).error
    req.send(protocol.encode(protocol.Heartbeat()))
    assert req.poll(2000) and "unsupported request 'heartbeat'" in protocol.decode(req.recv()).error
    req.close(linger=0)
    # a DEALER: envelopes that are not a REQ's, then an oversized frame, then a flood it never reads
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.connect(endpoint)
    for frames in ([b"x"], [b"", b"x", b"y"], [b"a", b"", b"b"], [b""] * 10):
        dealer.send_multipart(frames)
    dealer.send_multipart([b"", OVERSIZED])          # over ZMQ_MAXMSGSIZE: the broker drops the connection
    big = ctx.socket(zmq.REQ)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(endpoint)
    big.send(OVERSIZED)
    assert not big.poll(300)                          # no answer to that, and no harm
    big.close()
    flood = ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.setsockopt(zmq.SNDHWM, 0)
    flood.connect(endpoint)
    for n in range(FLOOD):
        flood.send_multipart([b"", b"flood %d" % n] if n % 2 else [b"", protocol.encode(protocol.StatusRequest())])
    raw_garbage(home.root / ".visor" / "control.sock", RAW)
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(100)]   # connect and say nothing
    try:
        for s in idle:
            s.connect(str(home.root / ".visor" / "control.sock"))
        ask_status(home, timeout_s=10.0)              # queued behind the flood: still answered
        steady(daemon, home, before, events)
    finally:
        for s in idle:
            s.close()
    dealer.close()
    flood.close()


def spray(endpoint: str, identity: bytes | None, frames: list[bytes]) -> None:
    """One DEALER, with this identity (None: ZeroMQ makes one up), sends every frame, a few envelopes
    that are not a DEALER's one-frame message, and a frame over the size limit."""
    own = zmq.Context()                               # its own, so term() can wait for exactly these frames
    sock = own.socket(zmq.DEALER)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    for frame in frames:
        sock.send(frame)
    sock.send_multipart([b"two", b"frames"])
    sock.send_multipart([b"a", b"b", b"c"])
    sock.send(OVERSIZED)
    sock.close(linger=5000)
    own.term()                                        # returns once every frame is handed over (or 5 s passed)


def test_garbage_on_the_worker_socket_from_strangers(home, daemon, events, ctx, census):
    home.stage(TAG, TAG)                              # a forged ready status would have somewhere to go
    daemon.start()
    before = wait_running(home)
    endpoint = f"ipc://{home.root}/.visor/broker.sock"
    frames = garbage_frames(before["binaries"]["vega"]["pid"])
    # names no worker of this daemon has (no data node, no metrics configured), and none at all
    for identity in (b"intruder", b"runner:data_node", b"metrics", b"fetcher2", None):
        spray(endpoint, identity, frames)
    flood = ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.setsockopt(zmq.SNDHWM, 0)
    flood.setsockopt(zmq.IDENTITY, b"flood")
    flood.connect(endpoint)
    for n in range(FLOOD):
        flood.send(b"flood %d" % n if n % 2 else protocol.encode(protocol.Heartbeat()))
    raw_garbage(home.root / ".visor" / "broker.sock", RAW)
    raw_garbage(home.root / ".visor" / "events.sock", RAW)
    ask_status(home, timeout_s=5.0)                   # the flood is digested
    steady(daemon, home, before, events)
    home.announce(TAG, 120)                           # the real watcher is still heard
    events.wait_for("upgrade.accepted", tag=TAG, timeout_s=5)
    assert daemon.status()["binaries"]["vega"]["pid"] == before["binaries"]["vega"]["pid"]
    flood.close()


def test_a_connection_claiming_a_workers_name_cannot_act_for_it(home, daemon, events, ctx, census):
    home.stage(TAG, TAG)
    daemon.start()
    before = wait_running(home)
    endpoint = f"ipc://{home.root}/.visor/broker.sock"
    node = before["binaries"]["vega"]["pid"]
    forged = garbage_frames(node) + [protocol.encode(protocol.Hello(name="runner:vega", pid=os.getpid()))]
    try:
        for identity in (b"upgrade-watcher", b"runner:vega"):
            spray(endpoint, identity, forged)
        ask_status(home)
        steady(daemon, home, before, events)
        home.announce(TAG, 120)                       # the real workers are still heard
        events.wait_for("upgrade.accepted", tag=TAG, timeout_s=5)
    except BaseException:
        daemon.kill()                                 # it may hang in a restart that never comes
        for proc in processes_of(home.root):
            proc.kill()
        raise
