"""The broker: one poll loop over the worker socket, the control socket, worker pidfds and signals.

It owns the sockets, the timers, the worker pool and the table of running binaries, and it carries
out the actions that state.step decides. It never blocks on anything but its poller: every slow
thing is a worker's. It is a child subreaper, so a binary whose runner was killed becomes its
child, and it reaps it. The state file always says what runs (written before a runner can start
anything); at start, what a previous run left is adopted first (adoption.py). An unexpected error
in the loop ends the broker alone: nothing is stopped or signalled, and the next run adopts.

Two roles live in mixins of their own: custody.py (what runs: the state file, adoption at start, a
dead runner's binary, stops and stop signals) and intake.py (what comes in: workers' and hooks'
reports, the config reload, the control socket's answers).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time

import zmq

from visor import protocol as p, reexec, report, state as st
from visor.args import SNAPSHOT_FLAG, segment_query, with_flag
from visor.binaries import Binaries, become_subreaper
from visor.config import RunConfig, load_run_config, load_visor_config, runnable
from visor.custody import STOP_GRACE_S, Custody
from visor.errors import ConfigError, HomeError
from visor.facts import Phase
from visor.history import FILE_NAME as HISTORY_FILE, History
from visor.home import Home, read_state_file, switch_current
from visor.hookrun import Hooks
from visor.intake import Intake
from visor.logs import setup_logging
from visor.notify import Notifier
from visor.pool import Pool
from visor.sockets import Sockets

log = logging.getLogger("visor")          # workers log under their own names


class Broker(Intake, Custody):
    def __init__(self, home: Home, log_level: str | None = None):
        self.home = home
        home.ensure_ready()
        self.cfg, warnings = load_visor_config(home.config)
        self._cli_log_level = log_level
        self.log_level = log_level or self.cfg.log_level       # the command line wins over the file
        setup_logging(self.cfg.log_format, self.log_level)
        self._file_cfg = self.cfg        # config.toml as last loaded; self.cfg keeps keys bound at start
        self._rejected = False           # the file on disk is not the config that runs
        for warning in warnings:
            log.warning("%s", warning)
        self._warned = frozenset(warnings)   # the config watcher's first report repeats them: said once
        self.run_config = self._load_current()
        self.state = st.State()
        self.binaries = Binaries()
        self.assignments: dict[str, object] = {}    # worker -> command it must hold (resent on hello)
        self.timers: dict[str, float] = {}
        self.facts: list = []
        self.exit: tuple[int, str] | None = None
        self._pending_upgrade: dict | None = None
        self._state_file_dirty = False
        self.started_at = time.time()   # with the pid, tells a re-executed daemon from the one before
        self._workers_spawned = False    # the watchers are forked once the node has started
        self._environ = dict(os.environ)  # before Notifier takes systemd's variables: a re-exec needs them
        self._reexec = False
        self._booted = False             # adoption done and recorded: from then on the state file is ours
        self.notifier = Notifier()
        self.hooks = Hooks(home.root)
        self._ready_sent = False
        self._stop_signalled_at: float | None = None   # the first SIGTERM/SIGINT (a later one escalates)

    # --- start and stop -----------------------------------------------------------------------

    def run(self) -> int:
        self._lock()
        become_subreaper()
        record = read_state_file(self.home)
        self.sockets = Sockets(self.home.endpoint("broker"), self.home.endpoint("control"),
                               self.home.events_endpoint(self.cfg),
                               History(self.home.runtime / HISTORY_FILE, self.cfg.events_history_max_bytes))
        reexec.unblock_stop_signals()               # blocked across a `visor restart`'s exec; handled now
        self.pool = Pool(self.home.endpoint("broker"), str(self.home.root), self.log_level)
        self.emit("visor.started")
        try:
            self._boot(record)
            self._loop()
        except Exception as err:     # a bug, or the OS refusing (EMFILE, EAGAIN): never a reason to stop the node
            return self._crash(err)
        if self._reexec:
            reexec.restart_in_place(self, self._environ)
        self._close()
        code, reason = self.exit
        if code == 0:
            self.emit("visor.stopped")
        else:
            self.emit("visor.failed", reason=reason)
            log.error("%s", reason)
        self.sockets.close()
        self.notifier.close()
        return code

    def release_lock(self) -> None:
        self._lock_file.close()

    def _lock(self) -> None:
        self._lock_file = open(self.home.runtime / "lock", "a+")
        try:                                         # a POSIX lock: forked workers do not inherit it
            fcntl.lockf(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HomeError(f"{self.home.root}: another `visor run` is already running for this home") from None

    def _close(self) -> None:
        for name in list(self.pool.workers):
            self._send(name, p.Shutdown())
        self.pool.shutdown()
        self.binaries.clear()                        # every binary is down: Exit comes only then
        self.record_state(durable=True)

    # --- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sockets.workers, zmq.POLLIN)
        poller.register(self.sockets.control, zmq.POLLIN)
        poller.register(self.sockets.wake, zmq.POLLIN)
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
            if self.sockets.wake.fileno() in ready:
                self._on_signals()
            if self.sockets.workers in ready:
                self._on_worker_frames()
            if self.sockets.control in ready:
                self.sockets.answer_control(self._answer)
            for fd in watched & ready.keys():
                self._on_worker_exit(sentinels[fd], now)
            for name, at in list(self.timers.items()):
                if at <= now:
                    del self.timers[name]
                    self._on_timer(name)
            for w in self.pool.due(now):
                self._spawn(w.name)
            if self._state_file_dirty:               # after this turn's restarts, not before them
                self._drain_facts()
                self.record_state()
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
            restarts = self.state.restarts
            self.state, actions = st.step(self.state, fact, self.cfg, time.monotonic())
            self._state_file_dirty |= self.state.restarts != restarts
            self._remember_upgrade()
            self._tell_systemd()
            for action in actions:
                self._execute(action)

    def _tell_systemd(self) -> None:
        text = report.systemd_status(self.state, self.cfg)
        if self.state.phase is Phase.STOPPING:
            self.notifier.stopping(text)
        elif self.state.phase is Phase.RUNNING and not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready(text)
        else:
            self.notifier.status(text)

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
                try:
                    switch_current(self.home, folder)
                    log.info("current -> %s", folder)
                except OSError as err:           # the old node is down already: start the new one anyway
                    log.error("cannot point %s at %s (%s); starting %s regardless", self.home.current, folder,
                              err.strerror or err, folder)
            case st.Prepare(tag=tag, folder=folder, fetch=fetch):
                self._assign("fetcher", p.Prepare(
                    tag=tag, folder=str(self.home.root / folder), fetch=fetch,
                    current_run_config=str(self.run_config.folder / "run-config.toml"), settings=self.cfg.fields()))
            case st.Prefetch(tag=tag, folder=folder) if self.cfg.auto_install or (self.home.root / folder).exists():
                self._execute(st.Prepare(tag, folder, fetch=self.cfg.auto_install))
            case st.Prefetch(tag=tag, folder=folder):    # not there yet: look again later (an operator drops it in)
                self.feed(p.FolderBlocked(tag=tag, folder=folder, reason=f"{self.home.root / folder}: not found"))
            case st.RunHook():
                self._run_hook(action)
            case st.QuerySegment():
                dn = self.run_config.data_node
                if "runner:data_node" not in self.pool.workers:    # its runner died with a previous broker
                    self._spawn("runner:data_node")
                self._assign("runner:data_node", p.QuerySegment(path=str(dn.path), args=segment_query(dn.args)))
            case st.Schedule(name=name, after_s=after_s) if after_s <= 0:
                self.feed(st.Timer(name))        # due now: not after one more turn through the poller
            case st.Schedule(name=name, after_s=after_s):
                self.timers[name] = time.monotonic() + after_s
            case st.Exit(code=code, reason=reason):
                self.exit = (code, reason)

    def _start_binaries(self, folder: str, snapshot_height: int | None) -> None:
        try:
            path = self.home.root / folder / "run-config.toml"
            rc = runnable(load_run_config(path)[0], path)
        except ConfigError as err:
            self.feed(p.StartFailed(name="vega", error=str(err)))
            return
        self.run_config = rc
        for name, binary in rc.binaries().items():
            args = list(binary.args)
            if name == "vega" and snapshot_height is not None:
                args = with_flag(args, SNAPSHOT_FLAG, str(snapshot_height))
            runner = f"runner:{name}"
            start = p.StartBinary(path=str(binary.path), args=args, stop_timeout_s=self.cfg.stop_timeout_s)
            if runner not in self.pool.workers or self.pool.workers[runner].retired:
                self._spawn(runner, first=start)    # it starts the node before its socket is even up
            self._assign(runner, start)
        if rc.data_node is None and "runner:data_node" in self.pool.workers:
            self._send("runner:data_node", p.Shutdown())
            self.pool.retire("runner:data_node")
        self._watch()
        self.feed(st.Launching(frozenset(rc.binaries())))

    def _watch(self) -> None:
        rc = self.run_config
        self._assign("upgrade-watcher", p.Watch(socket_path=rc.socket_path, http_path=rc.http_path,
                                                interval_ms=self.cfg.status_interval_ms))

    # --- workers, timers, hooks --------------------------------------------------------------

    def _spawn_workers(self) -> None:
        """The workers besides the runners. They start once the node has, so that on a small machine
        they do not compete with the runner for the CPU while the node is being started."""
        if self._workers_spawned:
            return
        self._workers_spawned = True
        self.timers.pop("spawn-workers", None)
        for name in ("upgrade-watcher", "config-watcher", "fetcher"):
            self._spawn(name)
        if self.cfg.metrics_listen:
            self._spawn("metrics")
            self._assign("metrics", p.ServeMetrics(listen=self.cfg.metrics_listen,
                                                   events_endpoint=self.home.events_endpoint(self.cfg),
                                                   control_endpoint=self.home.endpoint("control")))

    def _on_timer(self, name: str) -> None:
        if name == "spawn-workers":
            self._spawn_workers()
            return
        if name == "stop-watchdog":
            self.binaries.kill_stopped()
            self._account_for_binaries()
            if self.binaries:
                self.timers["stop-watchdog"] = time.monotonic() + STOP_GRACE_S
            return
        self.feed(st.Timer(name))

    def _run_hook(self, action: st.RunHook) -> None:
        command = self.hooks.command(action, self.cfg)
        if isinstance(command, p.HookFinished):      # unconfigured since the decision: nothing to run
            self.feed(command)
            return
        if "hooks" not in self.pool.workers or self.pool.workers["hooks"].retired:
            self._spawn("hooks", first=command)      # spawned at the first hook, kept afterwards
        self._assign("hooks", command)

    # --- helpers ------------------------------------------------------------------------------

    def _spawn(self, name: str, first=None) -> None:
        w = self.pool.spawn(name, first)
        if name.startswith("runner:"):
            self.record_state()             # recorded before it can report a start: a crash now adopts it
        self.emit("worker.started", worker=name, pid=w.pid)

    def _assign(self, worker: str, msg) -> None:
        self.assignments[worker] = msg
        self._send(worker, msg)

    def _send(self, worker: str, msg) -> None:
        w = self.pool.workers.get(worker)
        if w is None or not w.connected:
            return                                   # it gets its assignment when it says hello
        self.sockets.send(w.identity, msg)

    def emit(self, type_: str, **fields) -> None:
        if type_.startswith("visor."):
            fields = {"pid": os.getpid(), "home": str(self.home.root), **fields}
        self.sockets.events.emit(type_, **fields)

    def _load_current(self) -> RunConfig:
        path = self.home.current / "run-config.toml"
        rc, warnings = load_run_config(path)
        for warning in warnings:
            log.warning("%s", warning)
        return runnable(rc, path)

    def status(self) -> dict:
        status = report.status(self.state, self.cfg, self.run_config, self.binaries, self.pool,
                               str(self.home.root), os.getpid(), self.hooks.status())
        status["visor"]["started_at"] = self.started_at
        return status
