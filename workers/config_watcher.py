"""Watches HOME/config.toml and reports each new version of it to the broker, loaded or rejected.

It owns noticing edits (inotify on the home FOLDER, because editors and templating tools replace the
file by a rename, which gives it a new inode; stat polling when inotify is unavailable), waiting for
the writes to settle, and judging the file with the same loader as start-up. It decides nothing and
applies nothing: what a new config means, and whether it changed anything, is the broker's to say.
It never writes a file. Top-level imports stay light: the broker imports this module before forking.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from visor import protocol
from visor.config import load_visor_config
from visor.errors import ConfigError
from visor.worker import BrokerLink, Readable, parse_worker_args

log = logging.getLogger(__name__)

CONFIG_NAME = "config.toml"
QUIET_S = 0.1                    # read once the file has been quiet this long: a burst of edits ends with the last
MAX_SETTLE_S = 1.0               # ...but never wait longer than this after the first edit of a burst
POLL_S = 0.5                     # stat interval when inotify is unavailable


class InotifyWatch:
    """Events on the home folder that name config.toml: written in place, renamed over, created, removed.

    The folder, not the file: a watch on the file would follow the old inode away after a rename. If
    config.toml is itself a symlink, edits of its target elsewhere are not seen (polling would see them).
    """

    def __init__(self, folder: Path):
        import inotify_simple            # here, not at the top: a missing module means polling, not a crash
        f = inotify_simple.flags
        self._flags = f
        self._inotify = inotify_simple.INotify()
        try:
            mask = f.CLOSE_WRITE | f.MOVED_TO | f.CREATE | f.DELETE | f.MOVED_FROM
            self._inotify.add_watch(str(folder), mask)
        except OSError:
            self._inotify.close()
            raise
        self.fds = (self._inotify.fileno(),)
        self.next_check = float("inf")   # nothing to do until the fd is readable

    def changed(self) -> bool:
        """Drains the queued events; True if any may concern config.toml."""
        events = self._inotify.read(timeout=0)
        # an overflowed queue (Q_OVERFLOW) may have dropped ours: read the file to be sure
        return any(e.name == CONFIG_NAME or e.mask & self._flags.Q_OVERFLOW for e in events)

    def close(self) -> None:
        self._inotify.close()


class PollWatch:
    """The fallback: stat the file every POLL_S and compare (mtime_ns, size, inode).

    Two same-size writes within one kernel clock tick between two polls look like one; the content
    check in report() cannot help there. Rare enough for a fallback; inotify has no such gap.
    """

    def __init__(self, folder: Path):
        self._path = folder / CONFIG_NAME
        self._seen = self._signature()
        self.fds: tuple[int, ...] = ()
        self.next_check = time.monotonic() + POLL_S

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None                  # missing or unreadable: a change when it comes back
        return st.st_mtime_ns, st.st_size, st.st_ino

    def changed(self) -> bool:
        self.next_check = time.monotonic() + POLL_S
        seen, self._seen = self._seen, self._signature()
        return seen != self._seen

    def close(self) -> None:
        pass


def open_watch(folder: Path) -> InotifyWatch | PollWatch:
    try:
        return InotifyWatch(folder)
    except (ImportError, OSError) as err:    # no module, no inotify, or out of watches (ENOSPC)
        log.warning("inotify unavailable (%s): polling %s every %.1fs", err, folder / CONFIG_NAME, POLL_S)
        return PollWatch(folder)


def content_digest(path: Path) -> str:
    """What the file holds now, to tell a real change from a touch or a rewrite of the same bytes."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        return f"unreadable: {type(err).__name__}"


def judge(path: Path) -> protocol.ConfigLoaded | protocol.ConfigRejected:
    """The start-up loader's verdict on the file as it is now. An empty file is valid TOML, but at a
    reload it is a file caught between its truncation and its new content (`cat > config.toml`, a slow
    copy), never an operator's wish to put every key back to its default: it is rejected."""
    try:
        if not path.read_bytes().strip():
            return protocol.ConfigRejected(error=f"{path}: is empty (half-written?); the running config stays")
    except OSError:
        pass                                     # the loader says what is wrong with it, in its words
    try:
        cfg, warnings = load_visor_config(path)
    except ConfigError as err:
        return protocol.ConfigRejected(error=str(err))
    return protocol.ConfigLoaded(values=cfg.fields(), warnings=list(warnings))


def report(link: BrokerLink, path: Path, last: str | None) -> str:
    """Sends the verdict if the content differs from the last one sent (None: always). Returns the new mark."""
    # Digest BEFORE parsing: if an edit lands in between, we parse the newer file and its event
    # makes us look again, so the worst case is one duplicate report, never a missed one.
    mark = content_digest(path)
    if mark == last:
        return last
    verdict = judge(path)
    log.info("%s: %s", path, "loaded" if isinstance(verdict, protocol.ConfigLoaded) else verdict.error)
    link.send(verdict)
    return mark


class Settle:
    """When to read: QUIET_S after the last event of a burst, and at most MAX_SETTLE_S after its first."""

    def __init__(self):
        self.at = self._first = time.monotonic()     # due at once: the report every start owes

    def poke(self, now: float) -> None:
        if self.at == float("inf"):
            self._first = now                         # a new burst begins
        self.at = min(now + QUIET_S, self._first + MAX_SETTLE_S)


def main(argv: list[str] | None = None) -> int:
    opts = parse_worker_args("config-watcher", argv)
    folder = Path(opts.home).absolute()
    path = folder / CONFIG_NAME
    with BrokerLink(opts.endpoint, opts.name, opts.broker_pid, opts.identity, opts.first) as link:
        watch = open_watch(folder)       # watching before the first read: no edit can fall in between
        settle, last = Settle(), None
        try:
            while True:
                match link.receive(until=min(settle.at, watch.next_check), watch=watch.fds):
                    case protocol.Shutdown():
                        return 0
                    case Readable():
                        if watch.changed():
                            settle.poke(time.monotonic())
                    case None:
                        now = time.monotonic()
                        if now >= watch.next_check and watch.changed():
                            settle.poke(now)
                        if now >= settle.at:
                            settle.at, last = float("inf"), report(link, path, last)
        finally:
            watch.close()
