"""BrokerLink: the part every worker shares. It says hello, sends heartbeats, and waits for commands.

A watcher must not outlive the broker: it holds a pidfd of the broker and raises BrokerGone as soon
as the broker has exited, whatever killed it. A runner's link outlives it instead (outlive=True):
receive() returns BrokerLost once, then the link says hello again every HELLO_EVERY_S (with what the
runner holds, from `greeting`) on the same socket and identity, which ZeroMQ reconnects when the next
broker binds the endpoint; a Welcome from that broker names its pid, and the link watches it instead. Signals sent to the whole process group (a terminal's
Ctrl-C, `kill -- -PGID`, systemd's control-group stop) are the broker's to act on, so workers catch
SIGINT and SIGTERM and do nothing: the broker stops them in order. (A no-op handler rather than
SIG_IGN, because an ignored signal would stay ignored in the node binaries a runner executes.)
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import time

import zmq

from visor import protocol
from visor.config import LOG_LEVELS

HEARTBEAT_S = 5.0                # a worker silent this long says it is alive (hung: 60 s, see pool.py)
HELLO_EVERY_S = 0.5              # a runner without a broker says hello this often, for the next one
OUTLIVING_HWM = 16               # frames queued while no broker reads: a few stale hellos, never a block
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
IDENTITY_ENV = "VISOR_WORKER_IDENTITY"  # the identity of a runner executed in place (taken out at once)


class BrokerGone(BaseException):
    """The broker process has exited: the worker must finish up and leave. A BaseException, like
    SystemExit: an order to leave, not an error, so a worker's `except Exception` never swallows it."""


def parse_worker_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"visor-{name}")
    parser.add_argument("--endpoint", required=True, help="the broker's worker socket")
    parser.add_argument("--name", default=name)
    parser.add_argument("--home", default="")
    parser.add_argument("--broker-pid", type=int, default=0, help="leave when this process exits")
    parser.add_argument("--identity", default="", help="socket identity (the name and a per-spawn secret)")
    parser.add_argument("--first", default="", help="a command held from birth (hex of its frame)")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    parser.add_argument("--detached", action="store_true",
                        help="start with no broker: say hello until one welcomes us (a runner's exec in place)")
    opts = parser.parse_args(argv)
    opts.identity = opts.identity or os.environ.pop(IDENTITY_ENV, "")   # never passed on to a node binary
    # a forked worker keeps the broker's handler (text or JSON); run alone, it gets a plain one
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(opts.log_level)
    return opts


class Readable:
    """receive() found one of the watched file descriptors readable."""

    def __init__(self, fd: int):
        self.fd = fd


class BrokerLost:
    """receive() (outlive=True only): the broker has exited; the link now waits for the next one."""


class BrokerLink:
    def __init__(self, endpoint: str, name: str, broker_pid: int = 0, identity: str = "", first: str = "",
                 outlive: bool = False, greeting=lambda: [], detached: bool = False):
        self.name = name
        self.outlive = outlive
        self._detached = detached                # born with no broker to watch (implies outlive)
        self._greeting = greeting                # reports that follow every Hello (a runner's Holding)
        self._next_hello = float("inf")          # while no broker is up
        self._lost_unsaid = False                # lost in send(): receive() still owes BrokerLost
        self._first = protocol.decode(bytes.fromhex(first)) if first else None
        self._broker_pid = broker_pid or os.getppid()
        self._broker_fd = -1
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        # the broker knows a worker by this identity, given at fork and never reused: a process that
        # merely claims a worker's name is not heard
        self._sock.setsockopt(zmq.IDENTITY, (identity or name).encode())
        self._sock.setsockopt(zmq.LINGER, 1000)     # let a last report leave before exit
        self._sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES)
        if outlive:
            self._sock.setsockopt(zmq.SNDHWM, OUTLIVING_HWM)
        self._endpoint = endpoint
        self._last_sent = 0.0
        self._log = logging.getLogger(name)

    def __enter__(self) -> BrokerLink:
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda *_: None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)   # blocked across a runner's exec in place
        self._sock.connect(self._endpoint)
        if self._detached:
            self._next_hello = time.monotonic()
            self._lost_unsaid = True             # as after a broker's death: a runner holding nothing leaves
            return self
        try:
            self._broker_fd = os.pidfd_open(self._broker_pid)
        except ProcessLookupError:
            raise BrokerGone from None
        self._hello()
        return self

    def __exit__(self, *exc) -> None:
        if self._broker_fd >= 0:
            os.close(self._broker_fd)
        self._sock.close(linger=0 if exc[0] is BrokerGone or not self.broker_up else None)
        self._ctx.term()

    @property
    def broker_up(self) -> bool:
        return self._broker_fd >= 0

    def _hello(self) -> None:
        for msg in (protocol.Hello(name=self.name, pid=os.getpid()), *self._greeting()):
            self.send(msg)

    def detach(self) -> None:
        """The broker is going away and coming back (`visor restart` of a runner it cannot inherit from):
        from now on, as after its death, hello again until the next broker welcomes us."""
        if self.broker_up:
            self._lose_broker()

    def _lose_broker(self) -> None:
        os.close(self._broker_fd)
        self._broker_fd = -1
        self._next_hello = time.monotonic()
        self._lost_unsaid = True

    def send(self, msg) -> bool:
        """Sends a report; raises BrokerGone if the broker has exited (a worker busy with a long job,
        a download say, reports as it goes and so learns it must leave). An outliving link returns
        False instead, and the report is dropped: what matters is resent with the next hello."""
        if self.broker_up and select.select([self._broker_fd], [], [], 0)[0]:
            if not self.outlive:
                raise BrokerGone
            self._lose_broker()
        if not self.broker_up:
            try:
                self._sock.send(protocol.encode(msg), zmq.NOBLOCK)
            except zmq.Again:
                pass                             # queue full of earlier hellos; the next broker gets those
            return False
        self._sock.send(protocol.encode(msg))
        self._last_sent = time.monotonic()
        return True

    def _welcome(self, msg: protocol.Welcome) -> bool:
        """A broker that adopts this runner; False (ignored) if it is gone already or known already."""
        if self.broker_up:
            return False                         # an answer to an earlier hello
        try:
            self._broker_fd = os.pidfd_open(msg.broker_pid)
        except ProcessLookupError:
            return False
        self._next_hello = float("inf")
        self._last_sent = time.monotonic()
        return True

    def receive(self, until: float = float("inf"), watch: tuple[int, ...] = ()):
        """The next command; Readable(fd) when a watched fd is readable; None once `until` passes."""
        if self._first is not None:              # the command this worker was born with comes first
            first, self._first = self._first, None
            return first
        while True:
            if self._lost_unsaid:                # here, or noticed by a send()
                self._lost_unsaid = False
                return BrokerLost()
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            if self.broker_up:
                poller.register(self._broker_fd, zmq.POLLIN)
            for fd in watch:
                poller.register(fd, zmq.POLLIN)
            now = time.monotonic()
            beat_at = self._last_sent + HEARTBEAT_S if self.broker_up else self._next_hello
            if now >= beat_at:
                if self.broker_up:
                    self.send(protocol.Heartbeat())
                else:
                    self._hello()
                    self._next_hello = now + HELLO_EVERY_S
                continue
            if now >= until:
                return None
            ready = dict(poller.poll(max(0, (min(until, beat_at) - now) * 1000)))
            if self.broker_up and self._broker_fd in ready:
                if not self.outlive:
                    raise BrokerGone
                self._lose_broker()
                continue
            if self._sock in ready:
                try:
                    msg = protocol.decode(self._sock.recv())
                except protocol.ProtocolError as err:
                    self._log.warning("dropped a frame from the broker: %s", err)
                    continue
                if isinstance(msg, protocol.Welcome) and not self._welcome(msg):
                    continue
                return msg
            for fd in watch:
                if fd in ready:
                    return Readable(fd)
