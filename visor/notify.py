"""systemd's notify protocol: READY=1, STATUS=..., WATCHDOG=1 and STOPPING=1 datagrams to $NOTIFY_SOCKET.

Silent when Visor does not run under systemd (no NOTIFY_SOCKET). Sending never blocks and never fails
loudly: a supervisor that cannot reach systemd must still run the node.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: dict[str, str] | None = None):
        if env is None:          # systemd hears from the broker only, never from a node binary
            env = {key: os.environ.pop(key) for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
                   if key in os.environ}
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address   # abstract namespace
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        if self._sock:
            self._sock.setblocking(False)
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # ping at half the interval systemd allows, as sd_watchdog_enabled(3) advises
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._status = ""

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as err:
            log.debug("cannot notify systemd: %s", err)

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def ping(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock:
            self._sock.close()
