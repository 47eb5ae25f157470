"""An unexpected error in the broker's loop (here: forking a worker fails with EAGAIN, as under a pids
limit; injected with VISOR_FAULT, see visor/faults.py) never stops or signals a node binary: the broker
leaves alone with one line and a non-zero exit, the state file still says what runs, and the next
`visor run` adopts it."""

from __future__ import annotations

import json

import psutil
import pytest

from tests.faults.conftest import kill9, wait_running, worker_pid

pytestmark = pytest.mark.timeout(60)


def test_an_error_in_the_loop_leaves_the_node_running_and_the_next_run_adopts_it(home, daemon, events, census,
                                                                                 monkeypatch):
    monkeypatch.setenv("VISOR_FAULT", f"respawn-fails:{home.root}/fault-fired")
    daemon.start()
    status = wait_running(home)
    node, runner = status["binaries"]["vega"]["pid"], status["workers"]["runner:vega"]["pid"]
    kill9(worker_pid(home, "upgrade-watcher"))      # its restart fails to fork
    assert daemon.wait_exit(15) == 1
    stderr = daemon.stderr
    assert "Traceback" not in stderr, stderr[stderr.find("Traceback"):][:800]
    last = stderr.strip().splitlines()[-1]
    assert "internal error (BlockingIOError: [Errno 11]" in last and "the next `visor run` for this home adopts" in last
    assert psutil.pid_exists(node) and psutil.Process(runner).status() != psutil.STATUS_ZOMBIE
    assert not home.node_events("stopped") and not events.of("binary.exited")
    record = json.loads((home.root / ".visor" / "state.json").read_text())
    assert record["binaries"]["vega"]["pid"] == node and record["runners"]["runner:vega"]["pid"] == runner
    daemon.start()
    assert wait_running(home)["binaries"]["vega"]["pid"] == node
    assert len(home.node_events("started")) == 1
