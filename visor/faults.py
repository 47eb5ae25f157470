"""Test-only fault injection, for the fault suite (tests/faults): inert unless VISOR_FAULT is set.

VISOR_FAULT=<point>:<marker file> makes `fires(point)` true once: only while the marker file does not
exist, and it creates it, so a restarted process does not fail again. Points: `runner-exit-after-start`
(workers/runner.py: the runner dies between starting its binary and reporting it),
`runner-ignores-handover` (workers/runner.py: a runner of older code that does not know HandOver),
`restart-dies-before-exec` (visor/reexec.py: `visor restart` killed after the hand-over, before its exec) and
`respawn-fails` (visor/pool.py: forking a restarted worker fails with EAGAIN, as under a pids limit). Some faults can be
caused from outside (kill -9, a full disk, a stalled peer); these two cannot be timed from outside.
"""

from __future__ import annotations

import os


def fires(point: str) -> bool:
    want, _, marker = os.environ.get("VISOR_FAULT", "").partition(":")
    if want != point or not marker or os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True
