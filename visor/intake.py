"""What comes in to the broker, mixed into Broker (broker.py): workers' reports, hook reports, a
reloaded config.toml and the control socket's requests.

A report is dropped unless its kind of worker may send it (REPORTS): a worker cannot speak for
another, nor a runner for a binary not its own. What passes becomes a fact for state.step, an event,
or both. A reloaded config.toml applies at once, except the keys bound at start (RESTART_ONLY),
which wait for the next `visor run`; a rejected one is reported and the running config is kept. It
uses the Broker's pool, sockets, binary table, feed and emit, and decides nothing: state.step does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from visor import protocol as p, state as st
from visor.config import RESTART_ONLY, VisorConfig
from visor.facts import Phase, Step
from visor.logs import setup_logging

log = logging.getLogger("visor")

REPORTS = {          # what each kind of worker may tell the broker, besides Hello and Heartbeat
    "runner": (p.BinaryStarted, p.BinaryExited, p.StartFailed, p.Segment, p.Holding),
    "upgrade-watcher": (p.UpgradeStatus, p.RpcFailed),
    "fetcher": (p.FolderReady, p.FolderBlocked, p.FetchStarted, p.FetchProgress, p.FetchCompleted, p.FetchFailed),
    "config-watcher": (p.ConfigLoaded, p.ConfigRejected),
    "metrics": (),
    "hooks": (p.HookStarted, p.HookFinished),
}


def _may_send(worker: str, msg: p.Message) -> bool:
    kind, _, binary = worker.partition(":")
    if isinstance(msg, (p.Hello, p.Heartbeat)):
        return msg.name == worker if isinstance(msg, p.Hello) else True
    if not isinstance(msg, REPORTS.get(kind, ())):
        return False
    return getattr(msg, "name", binary) == binary     # a runner speaks only of its own binary


# the steps of an upgrade a `visor restart` is refused in: from the first stop until the new node runs
UNINTERRUPTIBLE = (Step.STOPPING, Step.AFTER_STOP, Step.STARTING)

class Intake:
    _warned: frozenset[str] = frozenset()    # the config.toml warnings last logged (the broker's at start)

    def _on_worker_frames(self) -> None:
        for identity, msg in self.sockets.reports():
            worker = self.pool.by_identity(identity)
            if worker is None or not _may_send(worker.name, msg):
                log.warning("dropped %s from %r: not a report that worker sends", msg.kind,
                            identity.partition("#")[0])
                continue
            worker.last_seen = time.monotonic()
            self._on_report(worker.name, worker, msg)

    def _on_report(self, name: str, worker, msg) -> None:
        match msg:
            case p.Hello(pid=pid):
                worker.connected = True
                self._on_hello(name, pid)
            case p.Heartbeat() | p.Holding():
                pass                                 # a Holding here repeats what adoption heard
            case p.BinaryStarted():
                self.assignments.pop(name, None)
                self.binaries.started(msg, runner_pid=worker.pid)
                self.feed(msg)
                self._spawn_workers()
                self._state_file_dirty = True
            case p.BinaryExited():
                self._forget_binary(msg)
            case p.StartFailed() | p.Segment():
                self.assignments.pop(name, None)
                self.feed(msg)
            case p.FolderReady() | p.FolderBlocked():
                if getattr(self.assignments.get(name), "tag", None) == msg.tag:
                    self.assignments.pop(name)
                if isinstance(msg, p.FolderBlocked) and not self.state.upgrade:   # checked early, at acceptance
                    log.warning("release %s is accepted but its folder is not ready yet (retrying): %s",
                                msg.tag, msg.reason)
                self.feed(msg)
            case p.UpgradeStatus() | p.RpcFailed():
                self.feed(msg)
            case p.HookStarted():
                if fields := self.hooks.started(msg):
                    self.emit("hook.started", **fields)
            case p.HookFinished():
                self._on_hook_finished(msg)
            case p.FetchStarted() | p.FetchProgress() | p.FetchCompleted() | p.FetchFailed():
                self.emit(msg.kind.replace("_", "."), **dataclasses.asdict(msg))   # fetch_started -> fetch.started
            case p.ConfigLoaded(values=values, warnings=warnings):
                self._reload(values, warnings)
            case p.ConfigRejected(error=error):
                self._rejected = True
                log.error("config not reloaded: %s", error)
                self.emit("config.rejected", error=error)
            case _:
                log.warning("%s sent %s, which is not a report", name, msg.kind)

    def _on_hook_finished(self, msg: p.HookFinished) -> None:
        if (ended := self.hooks.finished(msg)) is None:
            return                                   # a report about no hook we sent
        type_, fields, awaited = ended
        self.emit(type_, **fields)
        if awaited:                                  # not the end of a hook superseded by a later one
            self.assignments.pop("hooks", None)
            self.feed(msg)

    def _reload(self, values: dict, warnings: list[str]) -> None:
        try:
            new = VisorConfig(**values)
        except TypeError as err:
            self._warn(warnings)
            self.emit("config.rejected", error=f"{self.home.config}: {err}")
            return
        changed = self._file_cfg.changed_keys(new)
        self._warn(warnings)
        if not changed and not self._rejected:
            return                                   # e.g. a restarted config watcher's first report
        self._file_cfg, self._rejected = new, False
        self.cfg = dataclasses.replace(new, events_endpoint=self.cfg.events_endpoint,   # bound at start
                           metrics_listen=self.cfg.metrics_listen)
        if "logLevel" in changed or "logFormat" in changed:
            self.log_level = self._cli_log_level or new.log_level    # the command line still wins
            setup_logging(new.log_format, self.log_level)
            self.pool.log_level = self.log_level     # workers started from now on
        self.sockets.events.history.max_bytes = new.events_history_max_bytes
        pending = [key for key in new.changed_keys(self.cfg) if key in RESTART_ONLY]
        if "upgradeStatusIntervalMilliseconds" in changed:
            self._watch()
        self.emit("config.reloaded", changed=changed, restart_required=pending)
        if pending:
            log.warning("config: %s take effect at the next start of `visor run`", ", ".join(pending))

    def _warn(self, warnings: list[str]) -> None:
        """Logs each warning (an unknown key) once while it lasts: the broker logged those of the file it
        started on, and the config watcher's first report is of that file again."""
        for warning in warnings:
            if warning not in self._warned:
                log.warning("%s", warning)
        self._warned = frozenset(warnings)

    def _answer(self, request: p.Message) -> p.Message:
        match request:
            case p.StatusRequest():
                return p.StatusReply(status=self.status())
            case p.StopRequest():
                log.info("`visor stop` asked: stopping")
                self.feed(st.StopRequested("stop request"))
                return p.Accepted(pid=os.getpid())
            case p.RestartRequest() if self.state.phase is Phase.STOPPING:
                return p.ErrorReply(error="stopping; a restart is not possible now")
            case p.RestartRequest() if (u := self.state.upgrade) and (u.step in UNINTERRUPTIBLE or self.hooks.running):
                # it would end a running hook (a backup started over) or send the old node's stop again
                return p.ErrorReply(error=f"upgrading to {u.tag} ({u.step}); a restart now would interrupt it: "
                                          "ask again once the upgrade has completed")
            case p.RestartRequest():
                self._reexec, self.exit = True, (0, "restart requested")
                return p.Accepted(pid=os.getpid())
        return p.ErrorReply(error=f"unsupported request {request.kind!r}")
