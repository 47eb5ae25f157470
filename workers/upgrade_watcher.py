"""Asks the core node for its upgrade status and reports what it hears. Decides nothing.

It reports an answer when it differs from the last one reported (or follows a failure or a new Watch),
and every failed call; counting failures and deciding what they mean is the broker's job.
"""

from __future__ import annotations

import math
import time

from visor import protocol
from visor.errors import NodeError
from visor.nodeapi import AdminClient
from visor.worker import BrokerLink, parse_worker_args


def ask(node: AdminClient) -> protocol.UpgradeStatus | protocol.RpcFailed:
    try:
        tag, height, ready = node.upgrade_status()
    except NodeError as err:
        return protocol.RpcFailed(error=str(err))
    return protocol.UpgradeStatus(tag=tag, height=height, ready=ready)


def main(argv: list[str] | None = None) -> int:
    opts = parse_worker_args("upgrade-watcher", argv)
    with BrokerLink(opts.endpoint, opts.name, opts.broker_pid, opts.identity, opts.first) as link:
        node, interval_s, next_ask, last = None, 1.0, math.inf, None   # idle until told what to watch
        while True:
            match link.receive(until=next_ask):
                case protocol.Shutdown():
                    return 0
                case protocol.Watch(socket_path=sock, http_path=path, interval_ms=ms):
                    if node is None or (node.socket_path, node.http_path) != (sock, path):
                        node = AdminClient(sock, path, timeout_s=max(1.0, min(5.0, 3 * ms / 1000)))
                    # sent at every start of the binaries: their first answer is news, even if unchanged
                    interval_s, next_ask, last = ms / 1000, time.monotonic(), None
                case None:
                    started = time.monotonic()
                    heard = ask(node)
                    if heard != last or isinstance(heard, protocol.RpcFailed):
                        link.send(heard)
                        last = heard
                    next_ask = started + interval_s   # a steady rhythm, however long the call took
