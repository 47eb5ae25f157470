"""The broker's transport: its three ZeroMQ sockets and the pair that carries signals into its loop.

Owns binding (stale ipc files removed, mode 0600, bounded frame size and queues), reading worker
reports and control requests in bounded batches (a flood cannot starve the loop), decoding them
(an undecodable frame is logged and dropped, never fatal) and sending without ever blocking. What a
message means is the broker's business, not this module's.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Callable, Iterator

import zmq

from visor import protocol as p
from visor.events import Publisher
from visor.history import History

log = logging.getLogger("visor")
BATCH = 100                      # frames read from one socket per turn of the loop
HWM = 1000                       # frames queued for one peer before sends to it are dropped


def remove_stale(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        try:
            os.unlink(endpoint[len("ipc://"):])
        except FileNotFoundError:
            pass


class Sockets:
    def __init__(self, worker_endpoint: str, control_endpoint: str, events_endpoint: str,
                 history: History | None = None):
        self.ctx = zmq.Context()
        self.workers = self._bind(zmq.ROUTER, worker_endpoint)
        self.control = self._bind(zmq.ROUTER, control_endpoint)
        remove_stale(events_endpoint)
        self.events = Publisher(self.ctx, events_endpoint, history)
        self.wake, wake_w = socket.socketpair()
        for end in (self.wake, wake_w):
            end.setblocking(False)
        self._wake_w = wake_w
        signal.set_wakeup_fd(wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)     # the wakeup fd carries the signal to the loop

    def _bind(self, kind: int, endpoint: str) -> zmq.Socket:
        remove_stale(endpoint)
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.bind(endpoint)
        os.chmod(endpoint[len("ipc://"):], 0o600)
        return sock

    def signals(self) -> bytes:
        """The signal numbers that arrived since the last call."""
        try:
            return self.wake.recv(64)
        except BlockingIOError:
            return b""

    def reports(self) -> Iterator[tuple[str, p.Message]]:
        """(sender's identity, message) for each decodable frame waiting on the worker socket."""
        for _ in range(BATCH):
            try:
                ident, frame = self.workers.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:                       # not the two frames a DEALER sends
                continue
            name = ident.decode(errors="replace")
            try:
                yield name, p.decode(frame)
            except p.ProtocolError as err:
                log.warning("dropped a frame from %r: %s", name, err)

    def answer_control(self, answer: Callable[[p.Message], p.Message]) -> None:
        """Replies to each waiting request: `answer(request)`, or an ErrorReply for a bad frame."""
        for _ in range(BATCH):
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [identity, b"", request]; a REQ_CORRELATE client puts its request id before the b""
            if len(frames) not in (3, 4) or frames[-2] != b"" or b"" in frames[:-2]:
                continue                             # not a REQ envelope: nobody to answer
            try:
                reply = answer(p.decode(frames[-1]))
            except p.ProtocolError as err:
                reply = p.ErrorReply(error=str(err))
            try:
                self.control.send_multipart([*frames[:-1], p.encode(reply)], zmq.NOBLOCK)
            except zmq.Again:
                pass                                 # a client that does not read gets nothing

    def send(self, worker: str, msg: p.Message) -> None:
        try:
            self.workers.send_multipart([worker.encode(), p.encode(msg)], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("%s is not reading its socket; %s dropped", worker, msg.kind)
        except zmq.ZMQError as err:                  # e.g. the peer vanished mid-send
            log.warning("cannot send %s to %s: %s", msg.kind, worker, err)

    def close(self, linger_s: float = 0) -> None:
        """linger_s: time the last replies on the control socket get to leave (`visor restart`'s)."""
        signal.set_wakeup_fd(-1)
        self.workers.close()
        self.control.close(linger=int(linger_s * 1000))
        self.events.close()
        self.wake.close()
        self._wake_w.close()
