"""The event history (SPEC §5): HOME/.visor/events.jsonl, one JSON object per published event, rotated
to events.jsonl.1 at eventsHistoryMaxBytes; and reading it back for `visor events --since`.

Writing is the broker's, inside Publisher.emit: one write(2) of one line per event, never an fsync,
and never an exception: a full disk or a read-only file costs the history (one warning), nothing else.
Reading is the CLI's; it never writes. This module knows files, not sockets.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import Iterator

from visor.errors import VisorError

log = logging.getLogger(__name__)     # not visor.events: that logger has one line per event

FILE_NAME = "events.jsonl"
RETRY_S = 60.0                   # after a failed write, the file is tried again this often (silently)
OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC    # read: the last byte, see _open
UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class History:
    """Appends events to `path`; at `max_bytes` renames it to `path.1` (replacing it) and begins anew.
    A max_bytes of 0 keeps no history. Never raises."""

    def __init__(self, path: Path, max_bytes: int):
        self.path = path
        self.max_bytes = max_bytes           # the broker sets it again on a hot reload
        self._fd: int | None = None
        self._size = 0
        self._failed = False                 # warned once; retried every RETRY_S without a word
        self._retry_at = 0.0

    def append(self, body: dict) -> None:
        if self.max_bytes <= 0:
            return
        line = (json.dumps(body, separators=(",", ":"), default=str) + "\n").encode()
        if self._fd is None and not self._open():
            return
        try:
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            written = os.write(self._fd, line)        # O_APPEND: the line goes after every other
            self._size += written
            if written < len(line):
                raise OSError(errno.ENOSPC, "only part of a line was written")
        except OSError as err:
            self._fail(err)
            return
        if self._failed:
            self._failed = False
            log.info("writing the event history %s again", self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> bool:
        if self._failed and time.monotonic() < self._retry_at:
            return False
        try:
            self._fd = os.open(self.path, OPEN_FLAGS, 0o600)
            self._size = os.fstat(self._fd).st_size
            if self._size and os.pread(self._fd, 1, self._size - 1) != b"\n":
                self._size += os.write(self._fd, b"\n")     # end a line cut short, so the next one reads
        except OSError as err:
            self._fail(err)
            return False
        return True

    def _rotate(self) -> None:
        self.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._fd = os.open(self.path, OPEN_FLAGS, 0o600)
        self._size = 0

    def _fail(self, err: OSError) -> None:
        self.close()
        self._retry_at = time.monotonic() + RETRY_S
        if self._failed:
            log.debug("event history still not writable: %s", err)
            return
        self._failed = True
        log.warning("cannot write the event history %s (%s): events from now on are not recorded; "
                    "trying again every %gs", self.path, err.strerror or err, RETRY_S)


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `2h`, `7d` -> seconds; VisorError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if not match:
        raise VisorError(f"--since {text!r}: not a duration; use a number and a unit: 90s, 15m, 2h or 7d")
    return int(match[1]) * UNITS_S[match[2]]


def read_history(runtime: Path, since_ts: float = 0.0) -> Iterator[dict]:
    """The recorded events with ts >= since_ts, oldest first: events.jsonl.1, then events.jsonl.
    Lines that are not a JSON object (a write cut short by a full disk) are skipped."""
    for fd in _open_both(runtime / FILE_NAME):
        with open(fd, "rb") as f:
            for line in f:
                if _ts_before(line, since_ts):
                    continue                 # most of a long history: not worth decoding
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and isinstance(event.get("ts"), (int, float)) and event["ts"] >= since_ts:
                    yield event


def _ts_before(line: bytes, since_ts: float) -> bool:
    """True when the line's ts, read without decoding the line, is before since_ts."""
    start = line.find(b'"ts":')
    if start < 0:
        return False
    try:
        return float(line[start + 5:line.find(b",", start)]) < since_ts
    except ValueError:
        return False


def _open_both(path: Path) -> list[int]:
    """File descriptors of path.1 and path, opened so that a rotation in between is seen: if path.1
    turns out to be the file just opened as path, both are opened again. Only regular files count."""
    older = path.with_name(path.name + ".1")
    for _attempt in range(5):
        newer_fd = _open_regular(path)
        older_fd = _open_regular(older)
        if newer_fd is None or older_fd is None or os.fstat(newer_fd).st_ino != os.fstat(older_fd).st_ino:
            return [fd for fd in (older_fd, newer_fd) if fd is not None]
        os.close(newer_fd)                   # rotated between the two opens: path is now path.1
        os.close(older_fd)
    newer_fd = _open_regular(path)           # the same file under both names (a hard link): read it once
    return [newer_fd] if newer_fd is not None else []


def _open_regular(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise VisorError(f"{path}: cannot read the event history ({err.strerror or err})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):       # e.g. a link to /dev/full: nothing recorded there
        os.close(fd)
        return None
    return fd
