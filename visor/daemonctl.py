"""The CLI side of `visor stop`, `visor restart`, and `visor status` when no daemon answers.

It asks the daemon over the control socket. With no daemon (none holds the home's lock), `stop` ends
what a dead daemon left running, per the state file, holding the lock meanwhile so no `visor run`
starts in between; `status` says what still runs unsupervised. It never reads a live broker's state.
"""

from __future__ import annotations

import fcntl
import os
import select
import time
from contextlib import contextmanager

from visor import adoption, protocol as p, stopper
from visor.config import load_visor_config
from visor.control import ask
from visor.errors import ConfigError, VisorError
from visor.home import Home, read_state_file, write_state_file

RESTART_TIMEOUT_S = 60.0         # adoption waits 3 s at most; the rest is a slow machine's start-up
BUSY_DAEMON_S = 10.0             # a daemon ending a previous run's leftovers answers after stopSignalTimeout


@contextmanager
def no_daemon(home: Home):
    """Yields True while holding the home's lock (no `visor run` is up, none can start); False if a
    daemon holds it."""
    if not home.runtime.is_dir():
        yield True
        return
    with open(home.runtime / "lock", "a+") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True


def ask_daemon(home: Home, msg: p.Message, if_none, hung_hint: str, stop_timeout_s: float) -> p.Message | None:
    """The daemon's reply to msg. With no daemon up, calls if_none() while holding the home's lock (it may
    raise) and returns None. A daemon that holds the lock but answers nothing for as long as a busy one
    may take is hung: VisorError, hung_hint saying what to do."""
    deadline = time.monotonic() + stop_timeout_s + BUSY_DAEMON_S
    while (reply := ask(home, msg)) is None:
        with no_daemon(home) as none:
            if none:
                if_none()
                return None
        if time.monotonic() > deadline:         # it holds the lock but never answers: hung
            raise VisorError(f"{home.runtime / 'control.sock'}: the daemon of {home.root} runs but does not "
                             f"answer; {hung_hint}")
    return reply


def stop(home: Home) -> int:
    stop_timeout_s, ended = _stop_timeout_s(home), []
    reply = ask_daemon(home, p.StopRequest(), lambda: ended.append(_end_leftovers(home, stop_timeout_s)),
                       "SIGTERM it (or SIGKILL, then `visor stop` again)", stop_timeout_s)
    return ended[0] if reply is None else _wait_gone(home, reply.pid)


def _end_leftovers(home: Home, stop_timeout_s: float) -> int:
    """With the home's lock held: ends what the state file records, and records that nothing runs."""
    record = read_state_file(home)
    ended = adoption.end_all(record, stop_timeout_s)
    if adoption.unclean(record):
        write_state_file(home, {**record, "runners": {}, "binaries": {}})
    print(f"{home.root}: stopped {ended} processes a previous `visor run` left" if ended
          else f"{home.root}: nothing runs")
    return 0


def _wait_gone(home: Home, pid: int) -> int:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0
    try:
        select.select([fd], [], [])             # the daemon stops every binary first: as long as it takes
    finally:
        os.close(fd)
    print(f"{home.root}: stopped")
    return 0


def restart(home: Home) -> int:
    before = ask_daemon(home, p.StatusRequest(), lambda: _nothing_to_restart(home),
                        "SIGKILL it, then `visor run` again: the new run adopts its binaries", _stop_timeout_s(home))
    pid, started = before.status["visor"]["pid"], before.status["visor"].get("started_at")
    ask(home, p.RestartRequest())
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        reply = ask(home, p.StatusRequest(), timeout_s=0.5)
        if reply is not None and reply.status["visor"].get("started_at") != started:
            print(f"{home.root}: restarted in place (pid {reply.status['visor']['pid']}); the binaries kept running")
            return 0
        if reply is None and _ended(pid):
            raise VisorError(f"the daemon of {home.root} (pid {pid}) exited during the restart; see its log")
        time.sleep(0.05)
    raise VisorError(f"the daemon of {home.root} did not answer within {RESTART_TIMEOUT_S:g}s of the restart")


def _ended(pid: int) -> bool:
    """The process has exited (a zombie whose parent has not reaped it yet has too)."""
    fields = stopper.stat_fields(pid)
    return fields is None or fields[0] == b"Z"


def _nothing_to_restart(home: Home) -> None:
    raise VisorError(f"no visor runs for {home.root} (nothing to restart; start it with `visor run`)")


def unsupervised(home: Home) -> str | None:
    """With no daemon up: one line naming the binaries of `home` still running, or None."""
    with no_daemon(home) as none:
        if not none:
            return None
        running = adoption.still_running(read_state_file(home))["binaries"]
    if not running:
        return None
    what = ", ".join(f"{name} (pid {pid}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))})"
                     for name, pid, since in running)
    return (f"no visor runs for {home.root}, but its binaries do, unsupervised: {what}; "
            f"`visor run --home {home.root}` adopts them, `visor stop --home {home.root}` ends them")


def _stop_timeout_s(home: Home) -> float:
    try:
        return float(load_visor_config(home.config)[0].stop_timeout_s)
    except (ConfigError, OSError):               # OSError: one read_toml does not name (a link loop, EIO)
        return 15.0                              # a broken config must not keep `visor stop` from stopping
