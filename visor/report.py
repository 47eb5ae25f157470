"""What the broker tells the outside about itself: `visor status` (SPEC §6) and systemd's STATUS line.

Pure functions of the broker's state and tables; no sockets, no clock.
"""

from __future__ import annotations

from visor import __version__
from visor.config import RunConfig, VisorConfig
from visor.facts import Phase, State
from visor.pool import Pool


def status(s: State, cfg: VisorConfig, run_config: RunConfig, binaries: dict, pool: Pool, home: str,
           pid: int, hook: dict | None = None) -> dict:
    u = s.upgrade
    return {
        "visor": {"pid": pid, "version": __version__, "home": home, "state": s.phase.value},
        "current": {"folder": s.folder, "name": run_config.name},
        "binaries": {name: b.row() for name, b in binaries.items()},
        "workers": {w.name: {"pid": w.pid, "restarts": w.restarts, "alive": w.alive}
                    for w in pool.workers.values() if not w.retired},
        "upgrade": {
            "accepted": {"tag": s.accepted[0], "height": s.accepted[1], "folder_ready": s.accepted_ready}
            if s.accepted else None,
            "last": dict(s.last_upgrade) if s.last_upgrade else None,
            "target": {"tag": u.tag, "height": u.height, "folder": u.folder, "step": u.step.value} if u else None,
            "blocked": s.blocked_reason or None,
            "hook": hook,                # the upgrade hook running now: name, pid, running_s
        },
        "restarts": {"count": s.restarts, "max": cfg.max_restarts},
        "reason": s.reason or None,
    }


def systemd_status(s: State, cfg: VisorConfig) -> str:
    """One line for `systemctl status`: what Visor is doing now."""
    u = s.upgrade
    match s.phase:
        case Phase.RUNNING:
            return f"running {s.folder} ({', '.join(f'{name} pid {pid}' for name, pid in s.running.items())})"
        case Phase.UPGRADING:
            return f"upgrading to {u.tag} at block {u.height}" if u else "upgrading"
        case Phase.BLOCKED:
            return f"blocked: {s.blocked_reason}"
        case Phase.RESTARTING:
            return f"restarting ({s.restarts} of {cfg.max_restarts}): {s.reason}"
        case Phase.STOPPING:
            return f"stopping: {s.reason}"
    return f"starting {s.folder}"
