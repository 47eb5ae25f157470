"""Makes release folders ready when the broker asks: verifies an existing folder, or fetches a missing
one (auto-install), and reports what happened. Decides nothing: retries and upgrades are the broker's.

The broker imports this module before forking its workers, so `visor.releases` (and `requests` with
it) is imported only inside the worker process, on its first Prepare.
"""

from __future__ import annotations

import logging
from pathlib import Path

from visor import protocol
from visor.errors import VisorError
from visor.worker import BrokerLink, parse_worker_args

log = logging.getLogger(__name__)


def prepare(cmd: protocol.Prepare, report, verified: dict) -> protocol.FolderReady | protocol.FolderBlocked:
    """One Prepare: exactly one FolderReady or FolderBlocked, after any Fetch* reports.

    `verified` maps (folder, tag) to the fingerprint of the folder when it last passed verification.
    The broker asks once when a release is accepted and again at the upgrade height; if nothing in
    the folder changed in between, the second answer needs no `vega version`, which keeps that
    child process off the upgrade's critical path."""
    from visor import releases
    folder, key = Path(cmd.folder), (cmd.folder, cmd.tag)
    if key in verified and verified[key] == releases.fingerprint(folder):
        return protocol.FolderReady(tag=cmd.tag, folder=cmd.folder)
    source = releases.Source.from_settings(cmd.settings) if cmd.fetch else None
    try:
        releases.ensure_folder(folder, cmd.tag, Path(cmd.current_run_config), source, report)
        verified[key] = releases.fingerprint(folder)
    except VisorError as err:
        return protocol.FolderBlocked(tag=cmd.tag, folder=cmd.folder, reason=str(err))
    except Exception as err:  # noqa: BLE001 - a bug; crashing would loop, as the broker resends the command
        log.exception("preparing %s failed", cmd.folder)
        return protocol.FolderBlocked(tag=cmd.tag, folder=cmd.folder, reason=f"internal error: {err!r}")
    log.info("%s is ready for %s", cmd.folder, cmd.tag)
    return protocol.FolderReady(tag=cmd.tag, folder=cmd.folder)


def main(argv: list[str] | None = None) -> int:
    opts = parse_worker_args("fetcher", argv)
    verified: dict = {}
    with BrokerLink(opts.endpoint, opts.name, opts.broker_pid, opts.identity, opts.first) as link:
        while True:
            match link.receive():
                case protocol.Shutdown():
                    return 0
                case protocol.Prepare() as cmd:
                    link.send(prepare(cmd, link.send, verified))
