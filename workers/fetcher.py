"""Makes release folders ready when the broker asks: verifies an existing folder, or fetches a missing
one (auto-install), and reports what happened. Decides nothing: retries and upgrades are the broker's.

A Prepare runs in a thread of its own while the main thread, the only one that touches the broker's
socket, forwards its reports and sends a heartbeat whenever it has been quiet for HEARTBEAT_S. A
connect, a redirect, a stalled read or a long unpack therefore never makes a healthy fetcher look hung
(the broker kills a worker silent for 60 s); instead each network step is bounded by its own timeout
(visor.github.Source), so a dead connection ends in fetch.failed.

The broker imports this module before forking its workers, so `visor.releases` (and `requests` with
it) is imported only inside the worker process, on its first Prepare.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
from pathlib import Path

from visor import protocol
from visor.errors import VisorError
from visor.worker import BrokerLink, Readable, parse_worker_args

log = logging.getLogger(__name__)


def prepare(cmd: protocol.Prepare, report, verified: dict) -> protocol.FolderReady | protocol.FolderBlocked:
    """One Prepare: exactly one FolderReady or FolderBlocked, after any Fetch* reports.

    `verified` maps (folder, tag) to the folder's releases.verification_inputs when it last passed
    verification. The broker asks once when a release is accepted and again at the upgrade height; if nothing in
    the folder changed in between, the second answer needs no `vega version`, which keeps that
    child process off the upgrade's critical path."""
    from visor import releases
    folder, key = Path(cmd.folder), (cmd.folder, cmd.tag)
    if key in verified and verified[key] == releases.verification_inputs(folder):
        return protocol.FolderReady(tag=cmd.tag, folder=cmd.folder)
    source = releases.Source.from_settings(cmd.settings) if cmd.fetch else None
    try:
        releases.ensure_folder(folder, cmd.tag, Path(cmd.current_run_config), source, report)
        verified[key] = releases.verification_inputs(folder)
    except VisorError as err:
        return protocol.FolderBlocked(tag=cmd.tag, folder=cmd.folder, reason=str(err))
    except Exception as err:  # noqa: BLE001 - a bug; crashing would loop, as the broker resends the command
        log.exception("preparing %s failed", cmd.folder)
        return protocol.FolderBlocked(tag=cmd.tag, folder=cmd.folder, reason=f"internal error: {err!r}")
    log.info("%s is ready for %s", cmd.folder, cmd.tag)
    return protocol.FolderReady(tag=cmd.tag, folder=cmd.folder)


def run_beside(link: BrokerLink, job, held: collections.deque):
    """Runs job(report) in a thread; this thread forwards its reports to the broker and heartbeats while
    it waits. Commands that arrive meanwhile are kept in `held`. Returns the job's result, or None when
    the broker said Shutdown meanwhile (the job is abandoned: its partial folder is cleaned up next time)."""
    reports: queue.SimpleQueue = queue.SimpleQueue()
    wake_r, wake_w = os.pipe()
    outcome: list = []

    def report(msg) -> None:
        reports.put(msg)
        os.write(wake_w, b".")

    def run() -> None:
        try:
            outcome.append(job(report))      # prepare() turns every Exception into FolderBlocked
        finally:
            report(None)

    threading.Thread(target=run, name="fetch", daemon=True).start()
    while True:
        match link.receive(watch=(wake_r,)):
            case protocol.Shutdown():
                return None                  # the pipe stays open: the job may still write to it
            case Readable():
                os.read(wake_r, 4096)
                while not reports.empty():
                    if (msg := reports.get()) is not None:
                        link.send(msg)
                        continue
                    os.close(wake_r)
                    os.close(wake_w)
                    if not outcome:
                        raise RuntimeError("the fetch thread died (its traceback is above)")
                    return outcome[0]
            case other:
                held.append(other)


def main(argv: list[str] | None = None) -> int:
    opts = parse_worker_args("fetcher", argv)
    verified: dict = {}
    held: collections.deque = collections.deque()
    with BrokerLink(opts.endpoint, opts.name, opts.broker_pid, opts.identity, opts.first) as link:
        while True:
            match held.popleft() if held else link.receive():
                case protocol.Shutdown():
                    return 0
                case protocol.Prepare() as cmd:
                    answer = run_beside(link, lambda report, cmd=cmd: prepare(cmd, report, verified), held)
                    if answer is None:
                        return 0
                    link.send(answer)
