"""What every test shares: waiting on conditions, a home with the fake node, the daemon, the event stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import psutil
import tomli_w
import zmq

from tests.fakes import install_fake_vega, read_log, write_upgrade_state
from visor.config import read_toml

REPO = Path(__file__).resolve().parent.parent
VISOR = [sys.executable, str(REPO / "bin" / "visor")]


def wait_until(check, *, what: str, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s}s waiting for {what}")
        time.sleep(0.02)
    return result


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within timeout_s (a daemon at the end of a run)."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run_cli(*args: str, timeout_s: float = 20.0, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*VISOR, *map(str, args)], capture_output=True, text=True, timeout=timeout_s, **kwargs)


class TestHome:
    """A Visor home with the fake node in genesis, its admin socket, upgrade file and log inside it."""

    def __init__(self, root: Path):
        self.root = root
        self.socket = root / "admin.sock"
        self.upgrade_file = root / "upgrade.json"
        self.log = root / "node.log"

    def node_args(self, *extra: str) -> list[str]:
        return ["node", "--admin-socket", str(self.socket), "--upgrade-file", str(self.upgrade_file),
                "--log", str(self.log), *extra]

    def stage(self, folder: str, version: str, *, args: list[str] | None = None, data_node: list[str] | None = None,
              name: str | None = None) -> Path:
        """A release folder with the fake vega reporting `version` and a run-config that runs it."""
        install_fake_vega(self.root / folder, version)
        run_config = {"name": name or folder,
                      "vega": {"binary": {"path": "vega", "args": args if args is not None else self.node_args()},
                               "rpc": {"socketPath": str(self.socket), "httpPath": "/rpc"}}}
        if data_node is not None:
            run_config["data_node"] = {"binary": {"path": "vega", "args": data_node}}
        (self.root / folder / "run-config.toml").write_text(tomli_w.dumps(run_config))
        return self.root / folder

    def set_config(self, **keys) -> None:
        """Rewrites config.toml with these top-level keys changed (dotted names for tables: 'autoInstall.enabled')."""
        raw = read_toml(self.root / "config.toml")
        for key, value in keys.items():
            table = raw
            *parents, leaf = key.split(".")
            for parent in parents:
                table = table.setdefault(parent, {})
            table[leaf] = value
        (self.root / "config.toml").write_text(tomli_w.dumps(raw))

    def announce(self, tag: str = "", height: int = 0, ready: bool = False, reply: str = "ok") -> None:
        write_upgrade_state(self.upgrade_file, tag, height, ready, reply)

    def node_events(self, event: str | None = None) -> list[dict]:
        return [e for e in read_log(self.log) if event is None or e["event"] == event]

    def started_argv(self) -> list[list[str]]:
        return [e["argv"] for e in self.node_events("started")]

    def wait_started(self, n: int, timeout_s: float = 10.0) -> list[str]:
        """The argv of the n-th start of the fake node, once its log has it (it logs ~20 ms after exec)."""
        wait_until(lambda: len(self.node_events("started")) >= n, what=f"node start #{n}", timeout_s=timeout_s)
        return self.started_argv()[n - 1]

    @property
    def current(self) -> str:
        return os.readlink(self.root / "current")


class Events:
    """Follows the daemon's event stream from before it starts (ZMQ connects before the bind)."""

    def __init__(self, endpoint: str):
        self.received: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RECONNECT_IVL, 10)   # join soon after the daemon binds
        self._sub.connect(endpoint)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            if self._sub.poll(50):
                topic, body = self._sub.recv_multipart()
                event = msgpack.unpackb(body, raw=False)
                assert event["type"] == topic.decode()
                with self._lock:
                    self.received.append(event)

    def of(self, type_: str, **fields) -> list[dict]:
        with self._lock:
            return [e for e in self.received if e["type"] == type_ and all(e.get(k) == v for k, v in fields.items())]

    def types(self) -> list[str]:
        with self._lock:
            return [e["type"] for e in self.received]

    def wait_for(self, type_: str, timeout_s: float = 10.0, **fields) -> dict:
        try:
            return wait_until(lambda: (self.of(type_, **fields) or [None])[0], what=f"event {type_} {fields or ''}",
                              timeout_s=timeout_s)
        except AssertionError as err:
            raise AssertionError(f"{err}; seen: {self.types()[-15:]}") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self._sub.close()
        self._ctx.term()


STALLED = """
import sys, time, zmq
ctx = zmq.Context()
for hwm in map(int, sys.argv[2:]):
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVBUF, 4096)         # a small kernel buffer: the pressure reaches the publisher
    if hwm:
        sub.setsockopt(zmq.RCVHWM, hwm)
    sub.connect(sys.argv[1])
print("connected", flush=True)
time.sleep(3600)                             # never reads; killed by the test
"""


def stalled_subscribers(endpoint: str, *hwms: int) -> subprocess.Popen:
    """Subscribers that never read (hwm 0: the default high-water mark), in a process of their own:
    libzmq can abort a subscriber whose publisher leaves in the middle of a two-frame message
    (zeromq/libzmq#3442), and that must not take the test runner with it."""
    proc = subprocess.Popen([sys.executable, "-c", STALLED, endpoint, *map(str, hwms)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "connected"
    return proc


class Daemon:
    """`visor run` as an operator starts it, in its own session so teardown can end all of it."""

    def __init__(self, home: TestHome):
        self.home = home
        self.proc: subprocess.Popen | None = None
        self.stderr_path = home.root / "visor.stderr"

    def start(self, *extra: str) -> Daemon:
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen([*VISOR, "run", "--home", str(self.home.root), *extra],
                                     stdout=self._stderr, stderr=self._stderr, start_new_session=True)
        return self

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def status(self) -> dict:
        done = run_cli("status", "--home", self.home.root, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def wait_running(self, timeout_s: float = 10.0) -> dict:
        """Status once Visor says running and the fake node has logged its own start (it logs ~20 ms
        after exec, and only then has its signal handlers): a test may signal or kill it right away."""
        def running():
            done = run_cli("status", "--home", self.home.root, "--json")
            if done.returncode == 0 and json.loads(done.stdout)["visor"]["state"] == "running":
                return json.loads(done.stdout)
            return None
        status = wait_until(running, what="state running", timeout_s=timeout_s)
        if str(self.home.log) in status["binaries"]["vega"]["args"]:
            pid = status["binaries"]["vega"]["pid"]
            wait_until(lambda: pid in [e["pid"] for e in self.home.node_events("started")],
                       what=f"the node (pid {pid}) to log its start", timeout_s=timeout_s)
        return status

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout_s)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def end_leftovers(root: Path) -> None:
    """Kills whatever of this home is still running, then fails the test if there was anything."""
    leftovers = processes_of(root)
    for proc in leftovers:
        proc.kill()
    psutil.wait_procs(leftovers, timeout=5)
    assert not leftovers, f"processes left behind: {[p.info['cmdline'] for p in leftovers]}"


def processes_of(root: Path) -> list[psutil.Process]:
    """Every process still alive whose command line mentions this home (daemon, workers, fake node)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(str(root) in a for a in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found
