"""The CLI side of `visor status` and `visor events`: asks the broker, follows the event stream.

It talks to a running daemon only through its sockets in H/.visor; it never reads the broker's state.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import msgpack
import zmq

from visor import protocol as p
from visor.config import load_visor_config
from visor.errors import ConfigError, VisorError
from visor.home import Home


def ask(home: Home, request: p.Message, timeout_s: float = 2.0) -> p.Message | None:
    """One request to the running daemon on its control socket; None if none answers within timeout_s.
    Every CLI command that asks the daemon comes through here. Halfway through, the request is sent
    again: one that reached a daemon just as it re-executed (`visor restart`) is lost with its socket."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.REQ_RELAXED, 1)         # a second send without a reply to the first
    sock.setsockopt(zmq.REQ_CORRELATE, 1)       # and a late reply to the first is not taken for the second
    try:
        sock.connect(home.endpoint("control"))
        for wait_s in (timeout_s / 2, timeout_s / 2):
            sock.send(p.encode(request))
            if sock.poll(wait_s * 1000):
                break
        else:
            return None
        reply = p.decode(sock.recv())
    finally:
        sock.close()
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


def follow_events(home: Home, as_json: bool, out=sys.stdout) -> int:
    """Prints one line per event until SIGINT (exit 0)."""
    endpoint = events_endpoint(home)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    stopped = []
    signal.signal(signal.SIGINT, lambda *_: stopped.append(True))
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    try:
        while not stopped:
            if not sock.poll(200):
                continue
            frames = sock.recv_multipart()
            try:
                body = msgpack.unpackb(frames[-1], raw=False)
            except (ValueError, msgpack.ExtraData, msgpack.FormatError):
                continue
            print(json.dumps(body, separators=(",", ":")) if as_json else render_event(body), file=out, flush=True)
    finally:
        sock.close()
    return 0
