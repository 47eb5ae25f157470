"""A stand-in for the broker: a ROUTER socket where the broker's would be, and one real worker process.

Owns the worker's process (started with `python -c`, the test process as its broker: the worker leaves
when this process does), its stdout and stderr (files in the folder) and every message it sent, with the
time it arrived. Decides nothing, answers nothing unless the test sends a command. `heartbeat_s` shortens
visor.worker.HEARTBEAT_S in the worker only, so a test sees heartbeats without waiting 5 s for each;
`broker_pid` names another process (a `sleep`, say) whose death the worker must take as the broker's.
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

_RUN = """
import sys
import visor.worker
if sys.argv[2]:
    visor.worker.HEARTBEAT_S = float(sys.argv[2])
{prelude}
from {module} import main
try:
    sys.exit(main(sys.argv[3:]))
except visor.worker.BrokerGone:     # as pool.py's forked workers do: leaving is a clean exit
    sys.exit(0)
"""


class FakeBroker:
    def __init__(self, folder: Path, module: str, name: str, *args: str, heartbeat_s: float | None = None,
                 prelude: str = "", first=None, broker_pid: int = 0):
        self.folder, self.name, self.identity = folder, name, f"{name}#test".encode()
        self.endpoint = f"ipc://{folder}/broker.sock"
        self.received: list[tuple[float, object]] = []      # (monotonic time, message), Hellos included
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        self.stdout_path = folder / f"{name.replace(':', '-')}.stdout"
        self.stderr_path = folder / f"{name.replace(':', '-')}.stderr"
        argv = ["--endpoint", self.endpoint, "--name", name, "--identity", self.identity.decode(),
                "--broker-pid", str(broker_pid or os.getpid()), *args]
        if first is not None:
            argv += ["--first", protocol.encode(first).hex()]
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RUN.format(module=module, prelude=prelude), "worker",
                 "" if heartbeat_s is None else str(heartbeat_s), *argv],
                cwd=REPO, stdout=stdout, stderr=stderr)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, msg) -> None:
        self._sock.send_multipart([self.identity, protocol.encode(msg)])

    def _read(self, timeout_s: float):
        if not self._sock.poll(max(0.0, timeout_s) * 1000):
            return None
        identity, frame = self._sock.recv_multipart()
        assert identity == self.identity, f"a message from {identity!r}"
        msg = protocol.decode(frame)
        self.received.append((time.monotonic(), msg))
        return msg

    def next_report(self, timeout_s: float = 5.0, kinds: tuple[type, ...] = ()):
        """The next message that is not a Hello or Heartbeat (and, given `kinds`, is one of them)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self._read(deadline - time.monotonic())
            if msg is None or isinstance(msg, (protocol.Hello, protocol.Heartbeat)):
                continue
            if not kinds or isinstance(msg, kinds):
                return msg
        raise AssertionError(f"no report from {self.name} within {timeout_s}s; stderr: {self.stderr[-800:]}")

    def wait_for(self, kind: type, count: int = 1, timeout_s: float = 10.0) -> list[tuple[float, object]]:
        """Reads until `count` messages of `kind` (Hello, Heartbeat included) have arrived in all."""
        deadline = time.monotonic() + timeout_s
        while len(found := self.of(kind)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} {kind.__name__} from {self.name} within "
                                     f"{timeout_s}s; stderr: {self.stderr[-800:]}")
            self._read(deadline - time.monotonic())
        return found

    def of(self, kind: type) -> list[tuple[float, object]]:
        return [(t, m) for t, m in self.received if isinstance(m, kind)]

    def shutdown(self, timeout_s: float = 10.0) -> int:
        """Says Shutdown; returns the worker's exit code once it has left."""
        self.send(protocol.Shutdown())
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._sock.close()
        self._ctx.term()
