"""Every event Visor publishes (SPEC §5), in one table, and the Publisher that sends them.

Events are facts for operators and tools; nothing inside Visor reacts to them. Each is also recorded
in the event history (visor/history.py) before it is sent. A subscriber that
stalls only misses events: sends never block, and the high-water mark bounds what is queued for it.
"""

from __future__ import annotations

import logging
import os
import time

import msgpack
import zmq

from visor.history import History

log = logging.getLogger("visor.events")

EVENTS: dict[str, frozenset[str]] = {                      # type -> fields beyond v, type, ts, seq
    "visor.started": frozenset({"pid", "home"}),
    "visor.stopping": frozenset({"pid", "home"}),
    "visor.stopped": frozenset({"pid", "home"}),
    "visor.failed": frozenset({"pid", "home", "reason"}),
    "worker.started": frozenset({"worker", "pid"}),
    "worker.exited": frozenset({"worker", "pid", "exitcode"}),
    "binary.started": frozenset({"name", "pid", "path", "args"}),
    "binary.exited": frozenset({"name", "pid", "exitcode"}),
    "binary.restart_scheduled": frozenset({"delay_s", "restarts", "max_restarts"}),
    "upgrade.accepted": frozenset({"tag", "height"}),
    "upgrade.ready": frozenset({"tag", "height"}),
    "upgrade.started": frozenset({"tag", "height", "folder"}),
    "upgrade.completed": frozenset({"tag", "height", "downtime_ms"}),
    "upgrade.blocked": frozenset({"tag", "reason"}),
    "fetch.started": frozenset({"tag", "asset"}),
    "fetch.progress": frozenset({"tag", "asset", "bytes", "total"}),
    "fetch.completed": frozenset({"tag", "asset", "sha256"}),
    "fetch.failed": frozenset({"tag", "asset", "error"}),
    "config.reloaded": frozenset({"changed"}),
    "config.rejected": frozenset({"error"}),
    "rpc.unreachable": frozenset({"attempt", "max", "error"}),
    "hook.started": frozenset({"hook", "tag", "pid"}),
    "hook.completed": frozenset({"hook", "tag", "duration_ms"}),
    "hook.failed": frozenset({"hook", "tag", "duration_ms"}),            # and exitcode or error
}
QUIET = frozenset({"fetch.progress"})           # published, but logged only at debug level
SNDHWM = 1000                                   # events queued per subscriber before it misses some
CLOSE_LINGER_MS = 300


class Publisher:
    def __init__(self, ctx: zmq.Context, endpoint: str, history: History | None = None):
        self.history = history           # every event is appended to it before it is sent
        self._pub = ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, SNDHWM)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint)
        if endpoint.startswith("ipc://"):
            os.chmod(endpoint[len("ipc://"):], 0o600)
        self._seq = 0

    def emit(self, type_: str, **fields) -> None:
        if missing := EVENTS[type_] - fields.keys():
            raise ValueError(f"{type_} is missing {sorted(missing)}")    # our bug; tests catch it
        self._seq += 1
        body = {"v": 1, "type": type_, "ts": time.time(), "seq": self._seq, **fields}
        # JSON log lines (logFormat = "json") carry the event as data too, seq included
        log.log(logging.DEBUG if type_ in QUIET else logging.INFO, "%s %s", type_,
                " ".join(f"{k}={v}" for k, v in fields.items()),
                extra={"event": type_, "seq": self._seq, "fields": fields})
        if self.history is not None:
            self.history.append(body)   # first: a subscriber that hears of it finds it recorded
        try:
            self._pub.send_multipart([type_.encode("ascii"), msgpack.packb(body)], zmq.NOBLOCK)
        except zmq.Again:
            pass                                # a stalled subscriber misses events; we never wait

    def close(self) -> None:
        # Not linger 0: a subscriber whose publisher vanishes halfway through a two-frame message can
        # abort inside libzmq (zeromq/libzmq#3442). Let what is in flight finish; a stalled one is cut.
        self._pub.close(linger=CLOSE_LINGER_MS)
        if self.history is not None:
            self.history.close()
