"""`visor restart`, the daemon's side: re-execute `visor run` in place, keeping the pid and the binaries.

Each runner is told to hand its binary over (HandOver: it leaves without a signal to it), so every
binary becomes the broker's own child (it is their child subreaper, and PR_SET_CHILD_SUBREAPER
survives execve); the other workers are told to leave. A runner that a previous broker left (adopted
after a crash) is not our child, so neither would its binary be: it is told to Detach instead, keeps
its binary, executes the code now installed in place (workers/runner.py, exec_in_place) and waits
for the new process, which adopts it as after a crash. A worker that does not leave in time (a runner
of older code that does not know HandOver) is killed: its binary is ours then too. The state file then
records the binaries and the runners that stay, and the process executes the same command line on the
code now installed. The new process adopts its own children with new runners (adoption.py, Found.orphans).

Stop signals are blocked from the start of the hand-over to the exec (a blocked signal stays pending
through execve) and unblocked once the new process has its handlers (unblock_stop_signals): a SIGTERM
in between is not lost (the new process stops, in order), and one the old process had already taken
but not acted on is raised again, pending too.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from visor import faults, protocol as p, stopper

log = logging.getLogger("visor")
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
LEAVE_TIMEOUT_S = 3.0            # workers leave in milliseconds; past this they are killed


def unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def restart_in_place(broker, environ: dict[str, str]) -> None:
    """Never returns: hands the binaries over to this process, then execs `visor run` again."""
    pool = broker.pool
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)    # from now to the new code's handlers: pending
    for signum in broker.sockets.signals():     # one handled already but not yet acted on: pending too
        if signum in STOP_SIGNALS:
            os.kill(os.getpid(), signum)
    log.info("restarting in place (pid %d): the node binaries keep running", os.getpid())
    staying = frozenset(name for name, w in pool.workers.items() if w.alive and w.adopted)
    for name, w in pool.workers.items():
        if w.alive:
            broker.sockets.send(w.identity, p.Detach() if name in staying else
                                p.HandOver() if name.startswith("runner:") else p.Shutdown())
    leaving = [stopper.Proc(w.pid, w.pidfd) for w in pool.workers.values() if w.alive and w.name not in staying]
    deadline = time.monotonic() + LEAVE_TIMEOUT_S
    while stopper.wait_ended(leaving, 0.02) and time.monotonic() < deadline:
        broker.sockets.answer_control(lambda request: _answer(broker, request))
    pool.shutdown(0, keep=staying)              # reaps them; a runner killed here leaves its binary to us
    for b in broker.binaries.values():
        if f"runner:{b.name}" not in staying:
            b.runner_pid = 0
    broker.record_state(durable=True)           # binaries, no runners: what the new process adopts
    if faults.fires("restart-dies-before-exec"):
        os._exit(9)                              # as a kill -9 here: the binaries go to init, runnerless
    broker.sockets.answer_control(lambda request: _answer(broker, request))   # as late as can be
    broker.sockets.close(linger_s=0.5)         # the replies leave first
    broker.notifier.close()
    broker.release_lock()
    argv = [sys.executable, *sys.orig_argv[1:]]
    os.execve(argv[0], argv, environ)


def _answer(broker, request: p.Message) -> p.Message:
    """The control socket while the workers leave: a status call is answered (a request still queued at
    the exec would go unanswered), anything else is refused for the moment."""
    if isinstance(request, p.StatusRequest):
        return p.StatusReply(status=broker.status())
    return p.ErrorReply(error="restarting in place; ask again in a moment")
