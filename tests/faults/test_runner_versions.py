"""A runner that outlived its broker but speaks another protocol version (Visor was upgraded while no
broker ran) cannot be commanded: the next run stops its binary cleanly and starts it again, with a
warning that says why. Never two copies."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from tests.faults.conftest import node_log_says_one_at_a_time, wait_running
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

OLD_RUNNER = """
import json, os, subprocess, sys, time, msgpack, zmq
endpoint, identity, version = sys.argv[1], sys.argv[2], int(sys.argv[3])
node = subprocess.Popen(json.loads(sys.argv[4]), start_new_session=True, stdin=subprocess.DEVNULL)
print(node.pid, flush=True)
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.IDENTITY, identity.encode())
sock.setsockopt(zmq.SNDHWM, 4)
sock.connect(endpoint)
while True:             # as an outliving runner of that version would: hello, until a broker answers
    try:
        sock.send(msgpack.packb({"v": version, "kind": "hello", "name": "runner:vega", "pid": os.getpid()}),
                  zmq.NOBLOCK)
        sock.send(msgpack.packb({"v": version, "kind": "holding", "name": "vega", "pid": node.pid}), zmq.NOBLOCK)
    except zmq.Again:
        pass
    time.sleep(0.2)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.parametrize("version", [1, 3])
def test_a_runner_of_another_protocol_version_has_its_node_stopped_and_started_again(home, daemon, census, version):
    identity = "runner:vega#0123456789abcdef"
    path = str(home.root / "genesis" / "vega")
    old = subprocess.Popen([sys.executable, "-c", OLD_RUNNER, f"ipc://{home.root}/.visor/broker.sock", identity,
                            str(version), json.dumps([path, *home.node_args()])],   # one arg: not a node to the census
                           stdout=subprocess.PIPE, text=True)
    try:
        node = int(old.stdout.readline())
        wait_until(lambda: home.node_events("started"), what="the old runner's node to start")
        created = {pid: psutil.Process(pid).create_time() for pid in (old.pid, node)}
        record = {"runners": {"runner:vega": {"pid": old.pid, "identity": identity, "create_time": created[old.pid]}},
                  "binaries": {"vega": {"pid": node, "create_time": created[node], "path": path,
                                        "args": home.node_args(), "started_at": time.time()}},
                  "restarts": 0, "pending": None}
        (home.root / ".visor" / "state.json").write_text(json.dumps(record))
        daemon.start()
        status = wait_running(home)
        assert old.wait(5) == -9
    finally:
        old.kill()
        old.wait()
    assert status["binaries"]["vega"]["pid"] != node and not alive(node)
    assert f"speaks protocol version {version}" in daemon.stderr
    events = [e["event"] for e in home.node_events() if e["event"] in ("started", "stopped")]
    assert events == ["started", "stopped", "started"]
    node_log_says_one_at_a_time(home)
