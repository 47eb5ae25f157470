"""The broker's custody of the node binaries and their runners, mixed into Broker (broker.py).

What it knows runs is written to the state file before it can change (a runner is recorded before it
can start anything); at start it first adopts what a previous run left (adoption.py); when a runner
dies it accounts for that runner's binary (ours now, as its subreaper: reaped, found, or adopted by a
new runner); it sends the stops, and carries out stop signals (a second one kills at once); when the
loop fails it leaves everything running for the next run to adopt. It uses the Broker's pool,
sockets, binary table, feed and emit, and decides nothing: state.step does.
"""

from __future__ import annotations

import logging
import signal
import time

from visor import adoption, protocol as p, state as st
from visor.binaries import find_orphan
from visor.facts import Phase
from visor.home import write_state_file
from visor.hookrun import end_leftovers as end_leftover_hooks

log = logging.getLogger("visor")
SPAWN_WORKERS_AFTER_S = 1.0      # the watchers start with the first binary, or after this at the latest
STOP_GRACE_S = 5.0               # past stopSignalTimeoutSeconds, the broker kills a binary itself
SAME_STOP_S = 1.0                # stop signals this close are one request (sent to us and to our group)


class Custody:
    def _boot(self, record: dict) -> None:
        """Adopts what the previous run left (nothing is started before it is), then one Boot fact."""
        folder = self.home.current_folder().name
        self._pending_upgrade = record.get("pending") or None    # an upgrade in flight goes on (state.Boot)
        expected = {name: (str(b.path), list(b.args)) for name, b in self.run_config.binaries().items()}
        found = adoption.Found()
        if adoption.unclean(record):             # a run that did not stop cleanly: what did it leave?
            end_leftover_hooks(self.home.root)   # never the same hook twice (its old worker may still be ending it)
            found = adoption.adopt(record, self.sockets, self.pool, self.cfg.stop_timeout_s, expected)
        self.binaries.update({**found.binaries, **found.orphans})
        self.record_state(durable=True)         # what runs now, before anything is started
        self._booted = True
        if pending := self._pending_upgrade:
            log.warning("resuming the upgrade to %s at block %s", pending.get("folder"), pending.get("height"))
        if alive := {n: pid for n, pid in found.pids().items() if n not in {e.name for e in found.exits}}:
            log.info("adopted from the previous run: %s", ", ".join(f"{n} pid {pid}" for n, pid in alive.items()))
        self.feed(st.Boot(folder, adopted=found.pids(), expected=frozenset(expected),
                          restarts=int(record.get("restarts") or 0) if found.pids() else 0,
                          upgrade=_on_this_clock(self._pending_upgrade),
                          last_upgrade=record.get("last_upgrade") or None))
        for name in found.orphans:                   # our children: a new runner takes each on
            self._spawn(f"runner:{name}")
        for exit_ in found.exits:
            self._forget_binary(exit_)
        self._account_for_binaries()     # a child that ended during a `visor restart` signalled the old code
        if found.pids():
            self._watch()
            self._spawn_workers()
        else:
            self.timers["spawn-workers"] = time.monotonic() + SPAWN_WORKERS_AFTER_S

    def _crash(self, err: Exception) -> int:
        """The loop failed: leave alone, as a kill -9 would, with one line. The runners keep their
        binaries and the state file says what runs, so the next `visor run` adopts them."""
        reason = f"internal error ({type(err).__name__}: {err})"
        log.debug("the broker's loop failed", exc_info=err)
        if self._booted:                         # before, the previous run's record is still the truth
            self.record_state(durable=True)
        try:
            self.emit("visor.failed", reason=reason)
            self.sockets.close()
            self.notifier.close()
        except Exception:            # already failing: the exit code and the line below are what count
            pass
        log.error("%s; the node binaries keep running, and the next `visor run` for this home adopts them "
                  "(--log-level DEBUG shows the traceback)", reason)
        return 1

    def record_state(self, durable: bool = False) -> None:
        """state.json: the runners and binaries that run (what the next run adopts after a crash), the
        restart count and the upgrade in flight. Durable (fsync) only for the upgrade and at the end: a
        crash of the broker alone keeps the page cache, and a crash of the machine leaves nothing running."""
        self._state_file_dirty = False
        record = {"runners": self.pool.records(), "binaries": self.binaries.records(),
                  "restarts": self.state.restarts, "pending": self._pending_upgrade,
                  "last_upgrade": dict(self.state.last_upgrade) if self.state.last_upgrade else None}
        try:
            write_state_file(self.home, record, durable=durable)
        except OSError as err:       # a full disk must not end Visor: the node matters more than the file
            log.error("cannot write %s: %s; a crash now would lose what it records", self.home.state_file,
                      err.strerror or err)

    def _remember_upgrade(self) -> None:
        """Writes down an upgrade before its first stop is sent, and forgets it once the new node has
        answered: a broker killed in between starts the new folder from the upgrade block again."""
        pending, old = st.in_flight(self.state), self._pending_upgrade or {}
        if pending and "down_at" in pending:     # a monotonic time: written as the wall-clock time, once
            pending["down_at"] = old.get("down_at") or time.time() - (time.monotonic() - pending["down_at"])
        elif pending and "down_at" in old and {**pending, "down_at": old["down_at"]} == old:
            pending = old                        # past its afterStop: what is written is still true
        if pending != self._pending_upgrade:
            self._pending_upgrade = pending
            self.record_state(durable=True)     # before the first stop is sent: it must survive a crash

    def _on_hello(self, name: str, pid: int) -> None:
        binary = self.binaries.get(name.partition(":")[2]) if name.startswith("runner:") else None
        if binary is not None and binary.runner_pid != pid:
            # a new runner takes over a binary whose runner died; the binary was never touched
            binary.runner_pid = pid
            self._send(name, binary.adopt_command(self.cfg.stop_timeout_s))
            if binary.stop_sent:
                self._send(name, p.StopBinary(timeout_s=self.cfg.stop_timeout_s))
        if name in self.assignments and self.assignments[name] is not self.pool.workers[name].born_with:
            self._send(name, self.assignments[name])

    def _forget_binary(self, msg: p.BinaryExited) -> None:
        if msg.exitcode == p.UNKNOWN_EXIT and msg.name in self.binaries:   # unknown to its runner; ours?
            msg = self.binaries.reaped(msg)
        if not self.binaries.forget(msg):
            return                                   # already reported by the other side
        if not self.binaries:
            self.timers.pop("stop-watchdog", None)
        self.feed(msg)
        self._state_file_dirty = True

    def _on_worker_exit(self, worker, now: float) -> None:
        pid = worker.pid
        code = self.pool.reap(worker, now)
        log.log(logging.INFO if worker.retired else logging.WARNING, "%s (pid %s) exited with code %s",
                worker.name, pid, code)
        self.emit("worker.exited", worker=worker.name, pid=pid, exitcode=code)
        if worker.name.startswith("runner:"):
            self._state_file_dirty = True
            self._find_started(worker)       # it may have died between its start and its report
            self._account_for_binaries()     # its binary is now our child, or ended unreported
        elif worker.name == "hooks":
            known = {w.pid for w in self.pool.workers.values()}
            for failed in self.hooks.worker_died(code, known):   # a killed hook is a failed hook, retried as one
                self._on_hook_finished(failed)

    def _find_started(self, worker) -> None:
        """Before its start is sent again to a new runner: a binary the dead runner started is now our
        child (subreaper). Found, it is taken as started, and the new runner adopts it: never two copies."""
        start, name = self.assignments.get(worker.name), worker.name.partition(":")[2]
        if not isinstance(start, p.StartBinary) or name in self.binaries:
            return
        child = find_orphan(start.path, start.args, {w.pid for w in self.pool.workers.values()})
        if child is None:
            return                                   # it died before starting it: the start is sent again
        log.warning("%s died before reporting that it started %s (pid %d): adopting it", worker.name, name, child.pid)
        self.assignments.pop(worker.name)
        created = child.create_time()
        self._on_report(worker.name, worker, p.BinaryStarted(name=name, pid=child.pid, path=start.path,
                                                             args=list(start.args), started_at=created,
                                                             create_time=created))

    def _account_for_binaries(self) -> None:
        """Reports binaries that ended with no runner to report them: reaped by us, or vanished."""
        workers = self.pool.workers.values()
        for exit_ in self.binaries.reap_orphans({w.pid for w in workers}):
            self._forget_binary(exit_)
        for exit_ in self.binaries.vanished({w.pid for w in workers if w.alive}):
            self._forget_binary(exit_)

    def _stop_binaries(self) -> None:
        for b in self.binaries.values():
            if not b.stop_sent:
                b.stop_sent = True
                self._send(f"runner:{b.name}", p.StopBinary(timeout_s=self.cfg.stop_timeout_s))
        self.timers["stop-watchdog"] = time.monotonic() + self.cfg.stop_timeout_s + STOP_GRACE_S

    def _on_signals(self) -> None:
        for signum in self.sockets.signals():
            if signum == signal.SIGCHLD:
                for exit_ in self.binaries.reap_orphans({w.pid for w in self.pool.workers.values()}):
                    self._forget_binary(exit_)
            elif signum in (signal.SIGTERM, signal.SIGINT) and self.state.phase is Phase.STOPPING:
                first, now = self._stop_signalled_at, time.monotonic()
                if first is None or now - first < SAME_STOP_S:   # the same stop, through the process group too
                    self._stop_signalled_at = first or now
                    log.info("received %s: already stopping (SIGKILL after stopSignalTimeoutSeconds)",
                             signal.Signals(signum).name)
                    continue
                # a second Ctrl-C: the operator will not wait for stopSignalTimeoutSeconds
                log.warning("received %s again: killing the binaries now", signal.Signals(signum).name)
                for b in self.binaries.values():
                    b.stop_sent = True
                self.binaries.kill_stopped()
                self._account_for_binaries()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self._stop_signalled_at = self._stop_signalled_at or time.monotonic()
                log.info("received %s: stopping", signal.Signals(signum).name)
                self.feed(st.StopRequested(signal.Signals(signum).name))


def _on_this_clock(pending: dict | None) -> dict | None:
    """The recorded upgrade with its down_at (wall-clock, when the afterStop hook began) as state.step
    counts time: monotonic. Unknown (None) if the wall clock went back."""
    if not pending or not isinstance(pending.get("down_at"), (int, float)):
        return pending
    down_s = time.time() - pending["down_at"]
    return {**pending, "down_at": time.monotonic() - down_s if down_s >= 0 else None}
