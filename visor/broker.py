"""The broker: one poll loop over the worker socket, the control socket, worker sentinels and signals.

It owns the sockets, the timers and the table of running binaries, and it carries out the actions
that state.step decides. It never blocks on anything but its poller: every slow thing is a worker's.
It is a child subreaper, so a binary whose runner was killed becomes its child, and it reaps it.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, replace

import psutil
import zmq

from visor import __version__, protocol as p, state as st
from visor.args import SNAPSHOT_FLAG, segment_query, with_flag
from visor.config import RESTART_ONLY, RunConfig, VisorConfig, load_run_config, load_visor_config
from visor.errors import ConfigError, HomeError
from visor.events import Publisher
from visor.home import Home, read_memory, switch_current, write_memory
from visor.logs import setup_logging
from visor.notify import Notifier
from visor.pool import Pool
from visor.state import Phase

log = logging.getLogger("visor")          # workers log under their own names
PR_SET_CHILD_SUBREAPER = 36
STOP_GRACE_S = 5.0               # past stopSignalTimeoutSeconds, the broker kills a binary itself


@dataclass
class Binary:                    # a running node binary, as the broker knows it
    name: str
    pid: int
    path: str
    args: list[str]
    started_at: float
    runner_pid: int              # the runner that started or adopted it
    stop_sent: bool = False

    def row(self) -> dict:
        return {"pid": self.pid, "path": self.path, "args": self.args, "started_at": self.started_at}


class Broker:
    def __init__(self, home: Home, log_level: str | None = None):
        self.home = home
        home.ensure_ready()
        self.cfg, warnings = load_visor_config(home.config)
        self.log_level = log_level or self.cfg.log_level       # the command line wins over the file
        setup_logging(self.cfg.log_format, self.log_level)
        self._file_cfg = self.cfg        # config.toml as last loaded; self.cfg keeps keys bound at start
        self._rejected = False           # the file on disk is not the config that runs
        for warning in warnings:
            log.warning("%s", warning)
        self.run_config = self._load_current()
        self.state = st.State()
        self.binaries: dict[str, Binary] = {}
        self.assignments: dict[str, object] = {}    # worker -> command it must hold (resent on hello)
        self.timers: dict[str, float] = {}
        self.facts: list = []
        self.exit: tuple[int, str] | None = None
        self._pending_upgrade: dict | None = None
        self.notifier = Notifier()
        self._ready_sent = False

    # --- start and stop -----------------------------------------------------------------------

    def run(self) -> int:
        self._lock()
        memory = read_memory(self.home)
        self._end_leftovers(memory)
        _become_subreaper()
        self._open_sockets()
        self.pool = Pool(self.home.endpoint("broker"), str(self.home.root), self.log_level)
        self.emit("visor.started")
        for name in ("upgrade-watcher", "config-watcher", "fetcher"):
            self._spawn(name)
        if self.cfg.metrics_listen:
            self._spawn("metrics")
            self._assign("metrics", p.ServeMetrics(listen=self.cfg.metrics_listen,
                                                   events_endpoint=self.home.events_endpoint(self.cfg),
                                                   control_endpoint=self.home.endpoint("control")))
        folder = self.home.current_folder().name
        pending = memory.get("pending") or {}
        if pending.get("folder") == folder:          # killed after the switch, before the node came up
            self._pending_upgrade = pending
            log.warning("resuming the upgrade to %s: starting from block %s", folder, pending.get("height"))
        self.feed(st.Boot(folder, self._pending_upgrade and self._pending_upgrade.get("height")))
        try:
            self._loop()
        finally:
            self._close()
        code, reason = self.exit
        if code == 0:
            self.emit("visor.stopped")
        else:
            self.emit("visor.failed", reason=reason)
            log.error("%s", reason)
        self.events.close()
        self.notifier.close()
        return code

    def _lock(self) -> None:
        self._lock_file = open(self.home.runtime / "lock", "a+")
        try:                                         # a POSIX lock: forked workers do not inherit it
            fcntl.lockf(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HomeError(f"{self.home.root}: another `visor run` is already running for this home") from None

    def _end_leftovers(self, memory: dict) -> None:
        """Binaries a killed broker left running are stopped before ours start: never two copies."""
        procs = []
        for name, seen in (memory.get("binaries") or {}).items():
            try:
                proc = psutil.Process(seen["pid"])
                if abs(proc.create_time() - seen["create_time"]) < 0.01:
                    log.warning("%s (pid %d) from the previous run is still up: stopping it", name, proc.pid)
                    proc.terminate()
                    procs.append(proc)
            except (psutil.Error, KeyError, TypeError):
                continue
        _gone, alive = psutil.wait_procs(procs, timeout=self.cfg.stop_timeout_s)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=5)

    def _open_sockets(self) -> None:
        self.ctx = zmq.Context()
        self.workers = self._bind(zmq.ROUTER, self.home.endpoint("broker"))
        self.control = self._bind(zmq.ROUTER, self.home.endpoint("control"))
        endpoint = self.home.events_endpoint(self.cfg)
        _remove_stale(endpoint)
        self.events = Publisher(self.ctx, endpoint)
        self._wake_r, wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        self._wake_w = wake_w
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)     # the wakeup fd carries the signal to the loop

    def _bind(self, kind: int, endpoint: str) -> zmq.Socket:
        _remove_stale(endpoint)
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.bind(endpoint)
        os.chmod(endpoint[len("ipc://"):], 0o600)
        return sock

    def _close(self) -> None:
        for name in list(self.pool.workers):
            self._send(name, p.Shutdown())
        self.pool.shutdown()
        signal.set_wakeup_fd(-1)
        write_memory(self.home, {"binaries": {}, "pending": self._pending_upgrade})
        self.workers.close()
        self.control.close()

    # --- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.workers, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        watched: set[int] = set()
        next_hung_check = time.monotonic() + 5
        next_ping = time.monotonic() if self.notifier.watchdog_s else float("inf")
        while self.exit is None:
            self._drain_facts()
            if self.exit is not None:
                break
            sentinels = self.pool.sentinels()
            for fd in sentinels.keys() - watched:
                poller.register(fd, zmq.POLLIN)
            for fd in watched - sentinels.keys():
                poller.unregister(fd)
            watched = set(sentinels)
            now = time.monotonic()
            deadline = min([*self.timers.values(), self.pool.next_deadline(), next_hung_check, next_ping])
            ready = dict(poller.poll(max(0.0, deadline - now) * 1000))
            now = time.monotonic()
            if self._wake_r.fileno() in ready:
                self._on_signals()
            if self.workers in ready:
                self._on_worker_frames()
            if self.control in ready:
                self._on_control()
            for fd in watched & ready.keys():
                self._on_worker_exit(sentinels[fd], now)
            for name, at in list(self.timers.items()):
                if at <= now:
                    del self.timers[name]
                    self._on_timer(name)
            for w in self.pool.due(now):
                self._spawn(w.name)
            if now >= next_hung_check:
                self.pool.kill_hung(now)
                next_hung_check = now + 5
            if now >= next_ping:                     # proves this loop turns, not just that we exist
                self.notifier.ping()
                next_ping = now + self.notifier.watchdog_s

    def feed(self, fact) -> None:
        self.facts.append(fact)

    def _drain_facts(self) -> None:
        while self.facts and self.exit is None:
            fact = self.facts.pop(0)
            self.state, actions = st.step(self.state, fact, self.cfg, time.monotonic())
            self._remember_upgrade()
            self._tell_systemd()
            for action in actions:
                self._execute(action)

    def _remember_upgrade(self) -> None:
        """Writes down an upgrade before its first stop is sent, and forgets it once the new node has
        answered: a broker killed in between starts the new folder from the upgrade block again."""
        u, s = self.state.upgrade, self.state
        pending = self._pending_upgrade
        if u and u.step in (st.Step.STOPPING, st.Step.STARTING):
            pending = {"tag": u.tag, "folder": u.folder, "height": u.height}
        elif s.phase is Phase.RUNNING and not s.first_budget:    # it answered since it started
            pending = None
        if pending != self._pending_upgrade:
            self._pending_upgrade = pending
            self._write_memory()

    def _tell_systemd(self) -> None:
        s, u = self.state, self.state.upgrade
        match s.phase:
            case Phase.RUNNING:
                pids = ", ".join(f"{name} pid {pid}" for name, pid in s.running.items())
                text = f"running {s.folder} ({pids})"
                if not self._ready_sent:
                    self._ready_sent = True
                    self.notifier.ready(text)
                    return
            case Phase.UPGRADING:
                text = f"upgrading to {u.tag} at block {u.height}" if u else "upgrading"
            case Phase.BLOCKED:
                text = f"blocked: {s.blocked_reason}"
            case Phase.RESTARTING:
                text = f"restarting ({s.restarts} of {self.cfg.max_restarts}): {s.reason}"
            case Phase.STOPPING:
                self.notifier.stopping(f"stopping: {s.reason}")
                return
            case _:
                text = f"starting {s.folder}"
        self.notifier.status(text)

    def _write_memory(self) -> None:
        binaries = {}
        for b in self.binaries.values():
            try:
                binaries[b.name] = {"pid": b.pid, "create_time": psutil.Process(b.pid).create_time()}
            except psutil.Error:
                continue
        write_memory(self.home, {"binaries": binaries, "pending": self._pending_upgrade})

    # --- actions ------------------------------------------------------------------------------

    def _execute(self, action) -> None:
        match action:
            case st.Emit(type=type_, fields=fields):
                self.emit(type_, **fields)
            case st.StartBinaries(folder=folder, snapshot_height=height):
                self._start_binaries(folder, height)
            case st.StopBinaries():
                self._stop_binaries()
            case st.SwitchCurrent(folder=folder):
                switch_current(self.home, folder)
                log.info("current -> %s", folder)
            case st.Prepare(tag=tag, folder=folder, fetch=fetch):
                self._assign("fetcher", p.Prepare(
                    tag=tag, folder=str(self.home.root / folder), fetch=fetch,
                    current_run_config=str(self.run_config.folder / "run-config.toml"), settings=self.cfg.fields()))
            case st.Prefetch(tag=tag, folder=folder) if not (self.home.root / folder).exists():
                self._execute(st.Prepare(tag, folder, fetch=True))
            case st.QuerySegment():
                dn = self.run_config.data_node
                self._assign("runner:data_node", p.QuerySegment(path=str(dn.path), args=segment_query(dn.args)))
            case st.Schedule(name=name, after_s=after_s):
                self.timers[name] = time.monotonic() + after_s
            case st.Exit(code=code, reason=reason):
                self.exit = (code, reason)

    def _start_binaries(self, folder: str, snapshot_height: int | None) -> None:
        try:
            rc, _warnings = load_run_config(self.home.root / folder / "run-config.toml")
        except ConfigError as err:
            self.feed(p.StartFailed(name="vega", error=str(err)))
            return
        self.run_config = rc
        for name, binary in rc.binaries().items():
            args = list(binary.args)
            if name == "vega" and snapshot_height is not None:
                args = with_flag(args, SNAPSHOT_FLAG, str(snapshot_height))
            runner = f"runner:{name}"
            if runner not in self.pool.workers or self.pool.workers[runner].retired:
                self._spawn(runner)
            self._assign(runner, p.StartBinary(path=str(binary.path), args=args,
                                               stop_timeout_s=self.cfg.stop_timeout_s))
        if rc.data_node is None and "runner:data_node" in self.pool.workers:
            self._send("runner:data_node", p.Shutdown())
            self.pool.retire("runner:data_node")
        self._watch()
        self.feed(st.Launching(frozenset(rc.binaries())))

    def _watch(self) -> None:
        rc = self.run_config
        self._assign("upgrade-watcher", p.Watch(socket_path=rc.socket_path, http_path=rc.http_path,
                                                interval_ms=self.cfg.status_interval_ms))

    def _stop_binaries(self) -> None:
        for b in self.binaries.values():
            if not b.stop_sent:
                b.stop_sent = True
                self._send(f"runner:{b.name}", p.StopBinary(timeout_s=self.cfg.stop_timeout_s))
        self.timers["stop-watchdog"] = time.monotonic() + self.cfg.stop_timeout_s + STOP_GRACE_S

    # --- what comes in ------------------------------------------------------------------------

    def _on_worker_frames(self) -> None:
        for _ in range(100):                         # bounded, so a flood cannot starve the rest
            try:
                ident, frame = self.workers.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:                       # not the two frames a DEALER sends
                continue
            name = ident.decode(errors="replace")
            worker = self.pool.workers.get(name)
            try:
                msg = p.decode(frame)
            except p.ProtocolError as err:
                log.warning("dropped a frame from %s: %s", name, err)
                continue
            if worker is None:
                log.warning("dropped %s from unknown worker %r", msg.kind, name)
                continue
            worker.last_seen = time.monotonic()
            self._on_report(name, worker, msg)

    def _on_report(self, name: str, worker, msg) -> None:
        match msg:
            case p.Hello(pid=pid):
                worker.connected = True
                self._on_hello(name, pid)
            case p.Heartbeat():
                pass
            case p.BinaryStarted():
                self.assignments.pop(name, None)
                self.binaries[msg.name] = Binary(msg.name, msg.pid, msg.path, list(msg.args), msg.started_at,
                                                 runner_pid=worker.pid)
                self.feed(msg)
                self._write_memory()
            case p.BinaryExited():
                self._forget_binary(msg)
            case p.StartFailed() | p.Segment():
                self.assignments.pop(name, None)
                self.feed(msg)
            case p.FolderReady() | p.FolderBlocked():
                if getattr(self.assignments.get(name), "tag", None) == msg.tag:
                    self.assignments.pop(name)
                self.feed(msg)
            case p.UpgradeStatus() | p.RpcFailed():
                self.feed(msg)
            case p.FetchStarted(tag=tag, asset=asset):
                self.emit("fetch.started", tag=tag, asset=asset)
            case p.FetchProgress(tag=tag, asset=asset, bytes=done, total=total):
                self.emit("fetch.progress", tag=tag, asset=asset, bytes=done, total=total)
            case p.FetchCompleted(tag=tag, asset=asset, sha256=sha):
                self.emit("fetch.completed", tag=tag, asset=asset, sha256=sha)
            case p.FetchFailed(tag=tag, asset=asset, error=error):
                self.emit("fetch.failed", tag=tag, asset=asset, error=error)
            case p.ConfigLoaded(values=values, warnings=warnings):
                self._reload(values, warnings)
            case p.ConfigRejected(error=error):
                self._rejected = True
                log.error("config not reloaded: %s", error)
                self.emit("config.rejected", error=error)
            case _:
                log.warning("%s sent %s, which is not a report", name, msg.kind)

    def _on_hello(self, name: str, pid: int) -> None:
        binary = self.binaries.get(name.partition(":")[2]) if name.startswith("runner:") else None
        if binary is not None and binary.runner_pid != pid:
            # a new runner takes over a binary whose runner died; the binary was never touched
            binary.runner_pid = pid
            self._send(name, p.AdoptBinary(pid=binary.pid, path=binary.path, args=binary.args,
                                           stop_timeout_s=self.cfg.stop_timeout_s))
            if binary.stop_sent:
                self._send(name, p.StopBinary(timeout_s=self.cfg.stop_timeout_s))
        if name in self.assignments:
            self._send(name, self.assignments[name])

    def _forget_binary(self, msg: p.BinaryExited) -> None:
        binary = self.binaries.get(msg.name)
        if binary is None or binary.pid != msg.pid:
            return                                   # already reported by the other side
        del self.binaries[msg.name]
        if not self.binaries:
            self.timers.pop("stop-watchdog", None)
        self.feed(msg)
        self._write_memory()

    def _on_worker_exit(self, worker, now: float) -> None:
        pid = worker.pid
        code = self.pool.reap(worker, now)
        log.log(logging.INFO if worker.retired else logging.WARNING, "%s (pid %s) exited with code %s",
                worker.name, pid, code)
        self.emit("worker.exited", worker=worker.name, pid=pid, exitcode=code)
        if worker.name.startswith("runner:"):
            # its binary is now our child (subreaper), or it had already ended unreported
            self._reap_orphans()
            self._forget_vanished()

    def _forget_vanished(self) -> None:
        """A binary that is gone with nobody left to report it: its exit code is lost."""
        for b in list(self.binaries.values()):
            if self.pool.workers.get(f"runner:{b.name}") and self.pool.workers[f"runner:{b.name}"].alive \
                    and b.runner_pid == self.pool.workers[f"runner:{b.name}"].pid:
                continue                             # its runner is alive and will report it
            if not psutil.pid_exists(b.pid):
                log.warning("%s (pid %d) ended while its runner was down; exit code unknown", b.name, b.pid)
                self._forget_binary(p.BinaryExited(name=b.name, pid=b.pid, exitcode=-1))

    def _on_signals(self) -> None:
        try:
            signums = self._wake_r.recv(64)
        except BlockingIOError:
            return
        for signum in signums:
            if signum == signal.SIGCHLD:
                self._reap_orphans()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: stopping", signal.Signals(signum).name)
                self.feed(st.StopRequested(signal.Signals(signum).name))

    def _reap_orphans(self) -> None:
        """Binaries whose runner died are our children now (subreaper): reap them and report."""
        for binary in list(self.binaries.values()):
            try:
                pid, status = os.waitpid(binary.pid, os.WNOHANG)
            except ChildProcessError:
                continue                             # still its runner's child
            if pid:
                self._forget_binary(p.BinaryExited(name=binary.name, pid=pid,
                                                   exitcode=os.waitstatus_to_exitcode(status)))
        workers = {w.pid for w in self.pool.workers.values()}
        for child in psutil.Process().children():    # other orphans (a dead worker's `vega version`...)
            if child.pid not in workers:
                try:
                    os.waitpid(child.pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def _on_timer(self, name: str) -> None:
        if name == "stop-watchdog":
            for b in list(self.binaries.values()):
                if b.stop_sent and psutil.pid_exists(b.pid):
                    log.warning("%s (pid %d) still up after stop: killing it", b.name, b.pid)
                    _kill_group(b.pid)
            self._reap_orphans()
            self._forget_vanished()
            if self.binaries:
                self.timers["stop-watchdog"] = time.monotonic() + STOP_GRACE_S
            return
        self.feed(st.Timer(name))

    def _reload(self, values: dict, warnings: list[str]) -> None:
        for warning in warnings:
            log.warning("%s", warning)
        try:
            new = VisorConfig(**values)
        except TypeError as err:
            self.emit("config.rejected", error=f"{self.home.config}: {err}")
            return
        changed = self._file_cfg.changed_keys(new)
        if not changed and not self._rejected:
            return                                   # e.g. a restarted config watcher's first report
        self._file_cfg, self._rejected = new, False
        self.cfg = replace(new, events_endpoint=self.cfg.events_endpoint,   # bound at start
                           metrics_listen=self.cfg.metrics_listen)
        if "logLevel" in changed or "logFormat" in changed:
            setup_logging(new.log_format, new.log_level)
        pending = [key for key in new.changed_keys(self.cfg) if key in RESTART_ONLY]
        if "upgradeStatusIntervalMilliseconds" in changed:
            self._watch()
        self.emit("config.reloaded", changed=changed, restart_required=pending)
        if pending:
            log.warning("config: %s take effect at the next start of `visor run`", ", ".join(pending))

    def _on_control(self) -> None:
        for _ in range(100):
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] != b"":
                continue                             # not a REQ envelope: nobody to answer
            try:
                msg = p.decode(frames[2])
                reply = p.StatusReply(status=self.status()) if isinstance(msg, p.StatusRequest) \
                    else p.ErrorReply(error=f"unsupported request {msg.kind!r}")
            except p.ProtocolError as err:
                reply = p.ErrorReply(error=str(err))
            try:
                self.control.send_multipart([frames[0], b"", p.encode(reply)], zmq.NOBLOCK)
            except zmq.Again:
                pass

    # --- helpers ------------------------------------------------------------------------------

    def _spawn(self, name: str) -> None:
        w = self.pool.spawn(name)
        self.emit("worker.started", worker=name, pid=w.pid)

    def _assign(self, worker: str, msg) -> None:
        self.assignments[worker] = msg
        self._send(worker, msg)

    def _send(self, worker: str, msg) -> None:
        w = self.pool.workers.get(worker)
        if w is None or not w.connected:
            return                                   # it gets its assignment when it says hello
        try:
            self.workers.send_multipart([worker.encode(), p.encode(msg)], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("%s is not reading its socket; %s dropped", worker, msg.kind)

    def emit(self, type_: str, **fields) -> None:
        if type_.startswith("visor."):
            fields = {"pid": os.getpid(), "home": str(self.home.root), **fields}
        self.events.emit(type_, **fields)

    def _load_current(self) -> RunConfig:
        rc, warnings = load_run_config(self.home.current / "run-config.toml")
        for warning in warnings:
            log.warning("%s", warning)
        return rc

    def status(self) -> dict:
        s = self.state
        u = s.upgrade
        return {
            "visor": {"pid": os.getpid(), "version": __version__, "home": str(self.home.root),
                      "state": s.phase.value},
            "current": {"folder": s.folder, "name": self.run_config.name},
            "binaries": {name: b.row() for name, b in self.binaries.items()},
            "workers": {w.name: {"pid": w.pid, "restarts": w.restarts, "alive": w.alive}
                        for w in self.pool.workers.values() if not w.retired},
            "upgrade": {
                "accepted": {"tag": s.accepted[0], "height": s.accepted[1]} if s.accepted else None,
                "last": dict(s.last_upgrade) if s.last_upgrade else None,
                "target": {"tag": u.tag, "height": u.height, "folder": u.folder, "step": u.step.value}
                if u else None,
                "blocked": s.blocked_reason or None,
            },
            "restarts": {"count": s.restarts, "max": self.cfg.max_restarts},
            "reason": s.reason or None,
        }


def _remove_stale(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        try:
            os.unlink(endpoint[len("ipc://"):])
        except FileNotFoundError:
            pass


def _become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot become a child subreaper: a binary whose runner dies will not be reaped")


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            continue
