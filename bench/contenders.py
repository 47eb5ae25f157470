"""The four contenders: how each is configured, launched, looked into and stopped.

Each gets a fresh folder per measurement, writes the config an operator would write (tuned for
speed where the program allows it), and runs one child command line. stdout_to names the file the
child's stdout must reach: direct and Visor pass their own stdout on (the bench redirects it to that
file); supervisord and circus are told the file in their config and relay the output into it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import tomli_w

from tests.helpers import TestHome, processes_of

BENCH = Path(__file__).resolve().parent

# Every daemon runs with bytecode caching on, as an installed program has it (pip compiles on install);
# this sandbox sets PYTHONDONTWRITEBYTECODE, and the bench writes no file outside bench/.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPYCACHEPREFIX"] = str(BENCH / ".venv" / "pycache")

# Visor's config.toml: visor-init's defaults with these keys changed (TestHome.set_config)
VISOR_KEYS = {"restartsDelaySeconds": 0, "maxNumberOfRestarts": 1_000_000,
              "maxNumberOfFirstConnectionRetries": 1_000_000, "maxNumberOfRestartConnectionRetries": 1_000_000,
              "autoInstall.enabled": False}


class Contender:
    name = ""
    # In the restart test the child lives a random 0..crash_life_ms before it crashes, so a crash falls
    # at any phase of a polling supervisor's cycle (circus: check_delay 0.1 s; supervisord: its 1 s
    # select timeout). An event-driven parent is not affected by it.
    crash_life_ms = 100

    def __init__(self, py: str, visor_root: Path):
        self.py, self.visor_root = py, visor_root
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.stdout_to: Path | None = None
        self.config = ""                    # the config written for the last setup, for the printout

    def setup(self, folder: Path, argv: list[str], stdout_to: Path | None = None) -> None:
        self.dir, self.stdout_to, self.proc = folder, stdout_to, None
        folder.mkdir(parents=True)
        self.config = self._configure([str(a) for a in argv])

    def _configure(self, argv: list[str]) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def passes_stdout(self) -> bool:        # does the child inherit the daemon's own stdout?
        return False

    def launch(self) -> float:
        """Starts the daemon in its own session; returns time.monotonic() just before the Popen."""
        out_path = self.stdout_to if self.passes_stdout() and self.stdout_to else self.dir / "daemon.out"
        with open(out_path, "wb") as out, open(self.dir / "daemon.err", "wb") as err:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         cwd=self.dir, start_new_session=True, env=ENV)
        return t0

    def own_pids(self) -> dict[str, int]:
        """The daemon's own processes (never the supervised child): label -> pid."""
        return {self.name: self.proc.pid}

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM and wait; SIGKILL to the session after timeout_s; then nothing under its folder lives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                print(f"    {self.name}: did not stop within {timeout_s:g}s; killing it", flush=True)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.dir is not None:
            kill_leftovers(self.dir)


def kill_leftovers(folder: Path) -> list[psutil.Process]:
    """Kills every process whose command line names a path in folder; returns those it found."""
    left = processes_of(folder)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return left


class Direct(Contender):
    name = "direct"

    def _configure(self, argv):
        self.argv = argv
        return "(no config) " + " ".join(self.command())

    def command(self):
        return [self.py, "-S", str(BENCH / "direct.py"), *self.argv]

    def passes_stdout(self):
        return True


class Visor(Contender):
    name = "visor"

    def _configure(self, argv):
        from visor.home import init_home
        self.home = self.dir / "h"
        init_home(self.home)
        run_config = {"name": "genesis", "vega": {"binary": {"path": argv[0], "args": argv[1:]},
                                                  "rpc": {"socketPath": str(self.dir / "admin.sock"),
                                                          "httpPath": "/rpc"}}}
        text = tomli_w.dumps(run_config)
        (self.home / "genesis" / "run-config.toml").write_text(text)
        TestHome(self.home).set_config(**VISOR_KEYS)
        keys = "\n".join(f"  {k} = {json.dumps(v)}" for k, v in VISOR_KEYS.items())
        return (f"config.toml: visor-init defaults, with\n{keys}\n  (upgradeStatusIntervalMilliseconds: default 1000)\n"
                f"genesis/run-config.toml:\n{text}")

    def command(self):
        return [self.py, str(self.visor_root / "bin" / "visor"), "run", "--home", str(self.home)]

    def passes_stdout(self):
        return True

    def status(self, timeout_s: float = 10.0) -> dict | None:
        done = subprocess.run([self.py, str(self.visor_root / "bin" / "visor"), "status", "--home", str(self.home),
                               "--json"], capture_output=True, text=True, timeout=timeout_s, env=ENV)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def own_pids(self):
        status = self.status()
        pids = {"broker": status["visor"]["pid"]}
        pids.update({name: w["pid"] for name, w in status["workers"].items() if w.get("alive")})
        return pids


class Supervisord(Contender):
    name = "supervisord"
    crash_life_ms = 1000

    def _configure(self, argv):
        d = self.dir
        out = self.stdout_to or d / "vega.out"
        text = f"""[unix_http_server]
file={d}/supervisor.sock
chmod=0700

[supervisord]
nodaemon=true
logfile={d}/supervisord.log
pidfile={d}/supervisord.pid
childlogdir={d}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{d}/supervisor.sock

[program:vega]
command={" ".join(argv)}
autostart=true
autorestart=true
startsecs=0
startretries=1000000
stopsignal=TERM
stopwaitsecs=5
stdout_logfile={out}
stdout_logfile_maxbytes=0
stdout_logfile_backups=0
stderr_logfile={d}/vega.err
stderr_logfile_maxbytes=0
"""
        (d / "supervisord.conf").write_text(text)
        return text

    def command(self):
        return [str(Path(self.py).parent / "supervisord"), "-n", "-c", str(self.dir / "supervisord.conf")]


class Circus(Contender):
    name = "circus"

    def _configure(self, argv):
        d = self.dir
        out = self.stdout_to or d / "vega.out"
        text = f"""[circus]
check_delay = 0.1
endpoint = ipc://{d}/circus.sock
pubsub_endpoint = ipc://{d}/circus-pub.sock
statsd = false
loglevel = info
logoutput = {d}/circus.log

[watcher:vega]
cmd = {argv[0]}
args = {" ".join(argv[1:])}
numprocesses = 1
respawn = true
max_retry = -1
warmup_delay = 0
graceful_timeout = 5
stdout_stream.class = FileStream
stdout_stream.filename = {out}
stderr_stream.class = FileStream
stderr_stream.filename = {d}/vega.err
"""
        (d / "circus.ini").write_text(text)
        return text

    def command(self):
        return [str(Path(self.py).parent / "circusd"), str(self.dir / "circus.ini")]


ALL = {c.name: c for c in (Direct, Visor, Supervisord, Circus)}
