"""The CLI side of `visor status` and `visor events`: asks the broker, follows the event stream, prints
the event history.

It talks to a running daemon only through its sockets in H/.visor and reads the history file there;
it never reads the broker's state and never writes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import msgpack
import zmq

from visor import protocol as p
from visor.config import load_visor_config
from visor.errors import ConfigError, HomeError, VisorError
from visor.history import read_history
from visor.home import Home


RECHECK_AFTER_S = (1.0, 5.0)     # by then a new subscription is in effect: what it missed is in the history


def request(ctx: zmq.Context, endpoint: str, msg: p.Message, timeout_s: float) -> p.Message | None:
    """One request to a daemon's control socket at `endpoint`: its reply, or None if none came within
    timeout_s. Every asker (the CLI, the metrics worker) comes through here. Halfway through, the request
    is sent again: one that reached a daemon just as it re-executed (`visor restart`) is lost with its
    socket. Raises zmq.ZMQError (a terminated context) and ProtocolError (an undecodable reply)."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.REQ_RELAXED, 1)         # a second send without a reply to the first
    sock.setsockopt(zmq.REQ_CORRELATE, 1)       # and a late reply to the first is not taken for the second
    try:
        sock.connect(endpoint)
        for wait_s in (timeout_s / 2, timeout_s / 2):
            sock.send(p.encode(msg))
            if sock.poll(wait_s * 1000):
                return p.decode(sock.recv())
        return None
    finally:
        sock.close()


def ask(home: Home, msg: p.Message, timeout_s: float = 2.0) -> p.Message | None:
    """request() to the daemon of `home`; a refusal (ErrorReply) is a VisorError."""
    reply = request(zmq.Context.instance(), home.endpoint("control"), msg, timeout_s)
    if isinstance(reply, p.ErrorReply):
        raise VisorError(f"visor refused the request: {reply.error}")
    return reply


def ask_status(home: Home, timeout_s: float = 2.0) -> dict:
    """The running daemon's status (SPEC §6); VisorError if none answers within timeout_s."""
    reply = ask(home, p.StatusRequest(), timeout_s)
    if reply is None:
        raise VisorError(f"{home.runtime / 'control.sock'}: no visor answered within {timeout_s:g}s "
                         "(is `visor run` running for this home?)")
    return reply.status


def render_status(s: dict) -> str:
    v, cur, up = s["visor"], s["current"], s["upgrade"]
    lines = [f"visor     pid {v['pid']}  version {v['version']}  state {v['state'].upper()}",
             f"home      {v['home']}",
             f"current   {cur['folder']} ({cur['name']})",
             f"restarts  {s['restarts']['count']} of {s['restarts']['max']}"]
    if s.get("reason") and v["state"] in ("restarting", "stopping"):
        lines.append(f"reason    {s['reason']}")
    if up.get("hook"):
        lines.append(f"hook      {up['hook']['name']} running for {_ago(up['hook']['running_s'])}")
    if up.get("blocked"):
        lines.append(f"blocked   {up['blocked']}")
    if up.get("accepted"):
        lines.append(f"accepted  {up['accepted']['tag']} at height {up['accepted']['height']}")
    if up.get("last"):
        last = up["last"]
        lines.append(f"upgraded  to {last['tag']} at height {last['height']}, downtime {last['downtime_ms']} ms")
    lines += ["", f"{'BINARY':<11}{'PID':>8}  {'UP':>9}  COMMAND"]
    now = time.time()
    for name, b in s["binaries"].items():
        lines.append(f"{name:<11}{b['pid']:>8}  {_ago(now - b['started_at']):>9}  {b['path']} {' '.join(b['args'])}")
    if not s["binaries"]:
        lines.append("(none running)")
    lines += ["", f"{'WORKER':<18}{'PID':>8}  {'RESTARTS':>8}  ALIVE"]
    for name, w in s["workers"].items():
        lines.append(f"{name:<18}{w['pid'] or '-':>8}  {w['restarts']:>8}  {'yes' if w['alive'] else 'no'}")
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def events_endpoint(home: Home) -> str:
    try:
        cfg, _ = load_visor_config(home.config)
    except ConfigError:
        if not home.config.exists():
            raise
        return home.endpoint("events")       # the daemon runs on its last good config; guess the default
    return home.events_endpoint(cfg)


def render_event(body: dict) -> str:
    ts = time.strftime("%H:%M:%S", time.localtime(body.get("ts", 0))) + f".{int(body.get('ts', 0) * 1000) % 1000:03d}"
    rest = " ".join(f"{k}={_plain(v)}" for k, v in body.items() if k not in ("v", "type", "ts", "seq"))
    return f"{ts} #{body.get('seq')} {body.get('type')} {rest}".rstrip()


def _plain(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)


def print_events(home: Home, as_json: bool, since_s: float | None, follow: bool, out=sys.stdout) -> int:
    """`visor events`: the recorded history from `since_s` ago (all of it with --no-follow alone), then,
    when following, the live stream until SIGINT (exit 0).

    The live stream is subscribed to before the history is read. Every event is recorded before it is
    sent, so whatever a subscription that is not yet in effect misses is in the history: when a live
    event does not follow the last one printed (a gap in `seq`, or a new run of Visor), and once the
    subscription has surely taken effect, the history is read again from the last event printed.
    What both carry is printed once, in the order it was published."""
    if not home.root.is_dir():
        raise HomeError(f"{home.root}: home folder not found")
    now = time.time()
    # a plain follow prints nothing from before it began; --no-follow alone prints the whole history
    seen = _Printed(as_json, out, since_ts=now - since_s if since_s is not None else now if follow else 0.0)
    sock = _subscribe(home) if follow else None
    stopped: list[bool] = []
    if follow:                           # SIGINT ends a follow with exit 0, also while the history prints
        signal.signal(signal.SIGINT, lambda *_: stopped.append(True))
        signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    try:
        if since_s is not None or not follow:
            _catch_up(home, seen, stopped=stopped)
        if sock is not None:
            _follow(sock, home, seen, stopped)
    except BrokenPipeError:              # `visor events ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # no second error at exit
    finally:
        if sock is not None:
            sock.close()
    return 0


def _subscribe(home: Home) -> zmq.Socket:
    """The default high-water mark: whatever a slow reader loses past it is filled in from the history."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(events_endpoint(home))
    return sock


def _follow(sock: zmq.Socket, home: Home, seen: _Printed, stopped: list[bool]) -> None:
    began = time.monotonic()
    rechecks = [began + s for s in RECHECK_AFTER_S]
    while not stopped:
        if not sock.poll(200):
            if rechecks and time.monotonic() >= rechecks[0]:
                rechecks.pop(0)
                _fill_in(home, seen)
            continue
        frames = sock.recv_multipart()
        try:
            event = msgpack.unpackb(frames[-1], raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            continue
        if not isinstance(event, dict) or seen.printed(event):
            continue
        if seen.last is None or event.get("seq") != seen.last.get("seq", 0) + 1:
            _fill_in(home, seen, until=event)
        seen.show(event)


def _fill_in(home: Home, seen: _Printed, until: dict | None = None) -> None:
    try:
        _catch_up(home, seen, until)
    except VisorError:
        pass                             # an unreadable history: the live stream alone, as without one


def _catch_up(home: Home, seen: _Printed, until: dict | None = None, stopped: list[bool] = ()) -> None:
    """Prints the recorded events not printed yet, from the last one printed on, up to `until`."""
    since_ts = seen.last.get("ts", 0.0) if seen.last else seen.since_ts
    for event in read_history(home.runtime, since_ts):
        if stopped:
            return
        if until is not None and (_key(event) == _key(until) or event["ts"] > until.get("ts", 0.0)):
            return
        seen.show(event)


def _key(event: dict) -> tuple:
    return event.get("seq"), event.get("ts")     # one run never repeats a seq; runs differ in ts


class _Printed:
    """Prints each event once, remembering the last KEEP it printed."""
    KEEP = 100_000

    def __init__(self, as_json: bool, out, since_ts: float):
        self.as_json, self.out, self.since_ts = as_json, out, since_ts
        self.keys: dict[tuple, None] = {}        # insertion-ordered: the oldest is dropped first
        self.last: dict | None = None

    def printed(self, event: dict) -> bool:
        return _key(event) in self.keys

    def show(self, event: dict) -> None:
        if self.printed(event):
            return
        self.keys[_key(event)] = None
        if len(self.keys) > self.KEEP:
            del self.keys[next(iter(self.keys))]
        self.last = event
        line = json.dumps(event, separators=(",", ":")) if self.as_json else render_event(event)
        print(line, file=self.out, flush=True)
