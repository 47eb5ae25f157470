"""A stand-in broker for one worker process: a ROUTER socket, the worker started as a real process,
and send / wait_for on the wire's own messages. The worker's stdout and stderr go to files.

By default the worker watches this test process as its broker; `broker_pid` names another process
(a `sleep`, say) whose death the worker must take as the broker's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import zmq

from visor import protocol

REPO = Path(__file__).resolve().parent.parent.parent
RUN_WORKER = """
import importlib, sys
from visor.worker import BrokerGone
try:
    sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))
except BrokerGone:                  # as pool.py's forked workers do: leaving is a clean exit
    sys.exit(0)
"""


class FakeBroker:
    def __init__(self, folder: Path, module: str, name: str, broker_pid: int = 0):
        self.folder, self.name = folder, name
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{folder}/broker.sock"
        self._sock.bind(endpoint)
        self.stdout, self.stderr = folder / "worker.stdout", folder / "worker.stderr"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", RUN_WORKER, module, "--endpoint", endpoint, "--name", name,
                 "--broker-pid", str(broker_pid or os.getpid())],
                cwd=REPO, stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": str(REPO)})
        self.received: list = []
        hello = self.wait_for(protocol.Hello, timeout_s=10)
        assert hello.name == name

    def send(self, msg) -> None:
        self._sock.send_multipart([self.name.encode(), protocol.encode(msg)])

    def wait_for(self, kind: type, timeout_s: float = 5.0):
        """The next message of this kind (earlier ones of other kinds are kept in `received`)."""
        deadline = time.monotonic() + timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            if self._sock.poll(left_s * 1000):
                _identity, frame = self._sock.recv_multipart()
                msg = protocol.decode(frame)
                self.received.append(msg)
                if isinstance(msg, kind):
                    return msg
        raise AssertionError(f"gave up after {timeout_s}s waiting for {kind.__name__}; got {self.received[-5:]}")

    def output(self) -> str:
        return self.stdout.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._sock.close()
        self._ctx.term()
