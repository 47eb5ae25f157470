"""Fixtures for the fault-injection suite: the fake release server, a census of the fake node's
processes (never two copies of a binary), and helpers to kill Visor's processes at chosen moments."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import psutil
import pytest
import zmq

from tests.helpers import processes_of, wait_until
from visor import protocol

TAG, ASSET = "v0.73.0", "vega-linux-amd64.zip"


class Census:
    """Counts the fake node processes of one home every few milliseconds, per mode (core node, data
    node), and keeps the most it ever saw at once: a supervisor that runs two copies shows here even
    when the second is SIGKILLed before it logs anything."""

    def __init__(self, root):
        self.root = str(root)
        self.most: collections.Counter = collections.Counter()
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def running(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = collections.defaultdict(list)
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                cmd = proc.info["cmdline"] or []
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            for i, arg in enumerate(cmd[:-1]):
                if arg.startswith(self.root) and arg.endswith("/vega"):
                    if cmd[i + 1] == "node":
                        found["node"].append(proc.pid)
                    elif cmd[i + 1:i + 3] == ["datanode", "start"]:
                        found["datanode"].append(proc.pid)
                    break
        return found

    def _sample(self) -> None:
        while not self._stop.is_set():
            for mode, pids in self.running().items():
                self.most[mode] = max(self.most[mode], len(pids))
                self.pids.update(pids)
            self._stop.wait(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


@pytest.fixture
def census(home):
    c = Census(home.root)
    yield c
    c.close()
    assert c.most["node"] <= 1, f"{c.most['node']} copies of the core node ran at once"


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def worker_pid(home, name: str) -> int:
    w = ask_status(home)[0]["workers"][name]
    assert w["alive"], f"{name} is not alive: {w}"
    return w["pid"]


def wait_nothing_left(home, timeout_s: float, what: str = "every process of the home to end") -> None:
    """No process whose command line mentions the home: no broker, no worker, no node binary."""
    try:
        wait_until(lambda: not processes_of(home.root), what=what, timeout_s=timeout_s)
    except AssertionError as err:
        left = [(p.pid, " ".join(p.info["cmdline"] or [])[:120]) for p in processes_of(home.root)]
        raise AssertionError(f"{err}; still running: {left}") from None


def node_log_says_one_at_a_time(home) -> None:
    """In the fake node's log, every `started` after the first follows the end of the previous pid
    (`stopped` or `crashed`). Only for runs where no node is SIGKILLed: such a node logs nothing, and
    the census covers it."""
    alive: set[int] = set()
    for line in home.node_events():
        if line["event"] == "started":
            assert not alive, f"pid {line['pid']} started while {alive} had not stopped: {home.node_events()}"
            alive.add(line["pid"])
        elif line["event"] in ("stopped", "crashed"):
            alive.discard(line["pid"])


def ask_status(home, timeout_s: float = 2.0) -> tuple[dict, float]:
    """One status request straight to the control socket: (status, seconds it took). Fails if no
    answer comes within timeout_s; this times the broker itself, not the CLI's start-up."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{home.root}/.visor/control.sock")
        began = time.monotonic()
        sock.send(protocol.encode(protocol.StatusRequest()))
        assert sock.poll(timeout_s * 1000), f"the broker did not answer a status request within {timeout_s}s"
        reply = protocol.decode(sock.recv())
        took_s = time.monotonic() - began
    finally:
        sock.close()
    assert isinstance(reply, protocol.StatusReply), reply
    return reply.status, took_s


def wait_running(home, timeout_s: float = 10.0) -> dict:
    """The status once the daemon says `running` and the core node has logged its own start: what
    `visor status --json` prints, asked directly on the control socket (a CLI start per poll costs a
    quarter of a second). Waiting for the node's log line matters: until it is written, the fake node
    has not set up its signal handling, and a signal sent then would end it rather than be handled."""
    def running():
        try:
            status, _ = ask_status(home, timeout_s=1.0)
        except AssertionError:
            return None                               # not bound yet
        if status["visor"]["state"] != "running":
            return None
        pid = status["binaries"]["vega"]["pid"]
        return status if any(e["pid"] == pid for e in home.node_events("started")) else None
    return wait_until(running, what="state running and the node's own `started` line", timeout_s=timeout_s)
