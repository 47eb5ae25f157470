"""One real runner against the test as its broker: when its broker dies it keeps its binary, says hello
with what it holds, holds the binary's exit with its real code, and reports it to the next broker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import zmq

from tests.fakes import install_fake_vega
from tests.helpers import REPO
from visor import protocol as p

pytestmark = pytest.mark.timeout(30)


def receive(router: zmq.Socket, kind: type, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while (left_s := deadline - time.monotonic()) > 0:
        if router.poll(left_s * 1000):
            identity, frame = router.recv_multipart()
            msg = p.decode(frame)
            if isinstance(msg, kind):
                return identity, msg
    raise AssertionError(f"no {kind.__name__} within {timeout_s}s")


@pytest.fixture
def world():
    """A real runner born with a StartBinary of the fake node, a ROUTER standing for the broker's worker
    socket, and a sleeping process standing for the broker (its death is what the runner watches)."""
    folder = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    vega = install_fake_vega(folder, "v0.72.1")
    endpoint = f"ipc://{folder}/w.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    broker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    first = p.encode(p.StartBinary(path=str(vega), args=["node"], stop_timeout_s=1.0)).hex()
    runner = subprocess.Popen([sys.executable, "-c", "import sys; from workers.runner import main; sys.exit(main())",
                               "--endpoint", endpoint, "--name", "runner:vega", "--broker-pid", str(broker.pid),
                               "--identity", "runner:vega#secret", "--first", first], cwd=REPO)
    nodes: list[int] = []
    try:
        yield router, broker, runner, nodes
    finally:
        for proc in (runner, broker):
            proc.kill()
            proc.wait()
        for node in nodes:
            try:
                os.kill(node, signal.SIGKILL)
            except ProcessLookupError:
                pass
        router.close()
        ctx.term()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_runner_keeps_its_binary_and_its_exit_code_for_the_next_broker(world):
    router, broker, runner, nodes = world
    _, started = receive(router, p.BinaryStarted)
    node = started.pid
    nodes.append(node)
    broker.kill()
    broker.wait()
    identity, holding = receive(router, p.Holding)           # said again and again while no broker is up
    assert identity == b"runner:vega#secret" and (holding.pid, holding.exitcode) == (node, None)
    os.kill(node, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while holding.exitcode is None and time.monotonic() < deadline:
        _, holding = receive(router, p.Holding)
    assert holding.exitcode == -signal.SIGKILL and runner.poll() is None
    router.send_multipart([identity, p.encode(p.Welcome(broker_pid=os.getpid()))])
    _, exited = receive(router, p.BinaryExited)
    assert (exited.pid, exited.exitcode) == (node, -signal.SIGKILL)
    router.send_multipart([identity, p.encode(p.Shutdown())])
    assert runner.wait(5) == 0


def test_a_runner_told_to_detach_loads_the_new_code_in_place_and_keeps_its_binary_and_its_exit_code(world):
    router, _broker, runner, nodes = world
    identity, started = receive(router, p.BinaryStarted)
    nodes.append(started.pid)
    router.send_multipart([identity, p.encode(p.Detach())])
    _, holding = receive(router, p.Holding)                  # from the code it executed, same pid
    assert (holding.pid, holding.exitcode, holding.stopping) == (started.pid, None, False)
    cmdline = Path(f"/proc/{runner.pid}/cmdline").read_bytes().decode()
    assert "workers.runner" in cmdline and "secret" not in cmdline   # its identity: not for every user to read
    assert psutil.Process(started.pid).ppid() == runner.pid  # still the node's parent
    router.send_multipart([identity, p.encode(p.Welcome(broker_pid=os.getpid()))])
    os.kill(started.pid, signal.SIGKILL)
    _, exited = receive(router, p.BinaryExited)
    assert (exited.pid, exited.exitcode) == (started.pid, -signal.SIGKILL)   # reaped, not -1: its child
    router.send_multipart([identity, p.encode(p.Shutdown())])
    assert runner.wait(5) == 0
