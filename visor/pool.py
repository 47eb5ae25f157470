"""Spawns, watches and restarts the worker processes. Owns no node binary and no decision.

Workers are forked from the broker itself: a fork takes about a millisecond, the code the broker
has imported is shared copy-on-write, and every worker is the broker's own child, so its exit code
is exact. (A fork server would put a process between them whose death makes every worker look dead.)
The exception: runners a previous broker left (see adoption.py) are adopted, not forked; they are not
our children, so their exit is seen through the pidfd alone and its code is unknown (None).
The child first closes every inherited fd but stdio: the broker's ZeroMQ sockets and their wake-up
fds must never be touched by another process, or the broker's connections stall. Then it drops the
broker's signal plumbing and builds its own ZeroMQ context. A worker's exit is seen through a pidfd;
one silent past HUNG_AFTER_S is killed and, like any worker that dies, restarted after a backoff.
"""

from __future__ import annotations

import errno
import gc
import importlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from visor import faults, protocol, stopper

log = logging.getLogger(__name__)

MODULES = {"upgrade-watcher": "workers.upgrade_watcher", "config-watcher": "workers.config_watcher",
           "fetcher": "workers.fetcher", "runner": "workers.runner", "metrics": "workers.metrics",
           "hooks": "workers.hooks"}
HUNG_AFTER_S = 60.0              # far above the heartbeat; blocking calls in workers are bounded below it
BACKOFF_S = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
STEADY_AFTER_S = 30.0            # a worker that lived this long starts its backoff afresh


def _run_worker(module: str, argv: list[str]) -> int:
    """Runs a worker's main in the forked child; returns its exit code."""
    from visor.worker import BrokerGone
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the broker's sockets, pidfds, lock, wake-up pair
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        return importlib.import_module(module).main(argv) or 0
    except BrokerGone:
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        log.exception("%s failed", argv[argv.index("--name") + 1])
        return 1


@dataclass
class Worker:
    name: str
    pid: int | None = None
    identity: str = ""           # its socket identity: the name and a secret new at every spawn
    pidfd: int = -1              # readable once the worker has exited
    exitcode: int | None = None
    restarts: int = 0
    failures_in_a_row: int = 0
    connected: bool = False      # said hello since it was last started
    started_at: float = 0.0      # monotonic
    last_seen: float = 0.0       # monotonic; any message counts
    restart_at: float | None = None
    born_with: object = None     # the command it was forked with (it never waits for that one)
    retired: bool = False        # told to leave; not restarted
    create_time: float = 0.0     # with the pid, what names the process in state.json
    adopted: bool = False        # left by a previous broker: not our child (its binary never can be either)

    @property
    def alive(self) -> bool:
        return self.pid is not None and self.exitcode is None


@dataclass
class Pool:
    endpoint: str
    home: str
    log_level: str = "INFO"
    workers: dict[str, Worker] = field(default_factory=dict)

    def spawn(self, name: str, first=None) -> Worker:
        """Forks a worker. `first`: a command it holds from birth, so it can act before its socket is up
        (a runner starts the node at once instead of after a round trip)."""
        w = self.workers.setdefault(name, Worker(name))
        if w.pid is not None and faults.fires("respawn-fails"):
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))      # as os.fork under a pids limit
        if w.pid is not None and not w.retired:
            w.restarts += 1
        module = MODULES[name.partition(":")[0]]
        try:                                     # before the fork, so every later copy shares it; each when
            importlib.import_module(module)      # first needed, so the runner's fork waits for no other's
        except ImportError as err:
            log.error("cannot import %s: %s", module, err)
        w.identity = f"{name}#{os.urandom(8).hex()}"   # lives in the forked child's memory only
        argv = ["--endpoint", self.endpoint, "--name", name, "--home", self.home, "--log-level", self.log_level,
                "--broker-pid", str(os.getpid()), "--identity", w.identity]
        if first is not None:
            argv += ["--first", protocol.encode(first).hex()]
        w.born_with = first
        gc.freeze()              # the child's collector must not touch (copy) the pages it shares with us
        pid = os.fork()
        if pid == 0:                             # the child: never returns into the broker's code
            code = 1
            try:
                code = _run_worker(module, argv)
            finally:
                os._exit(code)
        gc.unfreeze()                            # ours must still collect cyclic garbage
        w.pid, w.exitcode = pid, None
        w.pidfd = os.pidfd_open(pid)             # may raise (EMFILE): the broker's loop decides what that means
        w.create_time = stopper.create_time(pid) or 0.0
        w.connected, w.retired, w.restart_at, w.adopted = False, False, None, False
        w.started_at = w.last_seen = time.monotonic()
        return w

    def adopt(self, name: str, pid: int, identity: str, create_time: float) -> Worker | None:
        """Takes on a runner a previous broker spawned (it said hello with its recorded identity)."""
        proc = stopper.pin(pid, create_time)
        if proc is None:
            return None
        w = self.workers.setdefault(name, Worker(name))
        w.pid, w.pidfd, w.identity, w.create_time, w.exitcode = pid, proc.pidfd, identity, create_time, None
        w.connected, w.retired, w.restart_at, w.adopted = True, False, None, True
        w.started_at = w.last_seen = time.monotonic()
        return w

    def records(self) -> dict[str, dict]:
        """For the state file: every live runner, so the next broker can adopt it or end it."""
        return {w.name: {"pid": w.pid, "identity": w.identity, "create_time": w.create_time}
                for w in self.workers.values() if w.alive and w.name.startswith("runner:")}

    def by_identity(self, identity: str) -> Worker | None:
        w = self.workers.get(identity.partition("#")[0])
        return w if w is not None and w.alive and w.identity == identity else None

    def sentinels(self) -> dict[int, Worker]:
        return {w.pidfd: w for w in self.workers.values() if w.alive}

    def reap(self, w: Worker, now: float) -> int | None:
        """The worker has exited: returns its exit code (None for an adopted runner, not our child)
        and, unless retired, schedules its restart."""
        code = stopper.Proc(w.pid, w.pidfd).reap()   # the pidfd said it has exited: this does not block
        w.exitcode = -1 if code is None else code
        os.close(w.pidfd)
        w.pidfd, w.connected = -1, False
        if not w.retired:
            lived_s = now - w.started_at
            w.failures_in_a_row = 0 if lived_s >= STEADY_AFTER_S else w.failures_in_a_row + 1
            w.restart_at = now + BACKOFF_S[min(w.failures_in_a_row, len(BACKOFF_S) - 1)]
        return code

    def due(self, now: float) -> list[Worker]:
        return [w for w in self.workers.values() if w.restart_at is not None and w.restart_at <= now]

    def next_deadline(self) -> float:
        times = [w.restart_at for w in self.workers.values() if w.restart_at is not None]
        return min(times, default=float("inf"))

    def kill_hung(self, now: float) -> None:
        for w in self.workers.values():
            if w.alive and now - w.last_seen > HUNG_AFTER_S:
                log.warning("%s (pid %s) silent for %.0fs: killing it", w.name, w.pid, now - w.last_seen)
                signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)

    def retire(self, name: str) -> None:
        """The worker will leave (it was sent Shutdown); do not restart it."""
        if (w := self.workers.get(name)) is not None:
            w.retired, w.restart_at = True, None

    def shutdown(self, timeout_s: float = 3.0, keep: frozenset[str] = frozenset()) -> None:
        """Waits for told-to-leave workers, then kills any that remain; `keep`: detached runners, which
        stay for the next broker."""
        for w in self.workers.values():
            w.retired, w.restart_at = True, None
        alive = [w for w in self.workers.values() if w.alive and w.name not in keep]
        codes = stopper.end([stopper.Proc(w.pid, w.pidfd) for w in alive], timeout_s, first=None, what="worker")
        for w in alive:
            w.exitcode, w.pidfd = -1 if codes[w.pid] is None else codes[w.pid], -1
