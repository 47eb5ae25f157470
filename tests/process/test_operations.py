"""What operations tooling sees of the real daemon: systemd's notify socket, Prometheus metrics, JSON logs."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import time

import psutil
import pytest

from tests.fakes.release_server import ReleaseServer
from tests.fakes.zips import release_zip_with_fake_vega
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


# --- systemd ----------------------------------------------------------------------------------

class NotifySocket:
    """What systemd would read: the datagrams sent to $NOTIFY_SOCKET, in order."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.received: list[tuple[float, dict[str, str]]] = []    # (monotonic when read, fields)

    def read(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return [fields for _at, fields in self.received]
            self.received.append((time.monotonic(), dict(line.split("=", 1) for line in data.decode().split("\n"))))

    def wait_for(self, key: str, value: str | None = None, *, after: int = 0, timeout_s: float = 10.0) -> dict:
        """The first message from index `after` on that holds key (with that value, if given)."""
        def found():
            return next((m for m in self.read()[after:] if key in m and value in (None, m[key])), None)
        return wait_until(found, what=f"{key}={value or '…'} on the notify socket (got {self.read()[-5:]})",
                          timeout_s=timeout_s)

    def pings_since(self, since: float) -> int:
        self.read()
        return sum(1 for at, m in self.received if at >= since and m.get("WATCHDOG") == "1")

    def close(self) -> None:
        self.sock.close()


def test_systemd_hears_ready_status_watchdog_and_stopping(home, daemon, events, monkeypatch):
    home.stage("v0.73.0", "v0.73.0")
    notify = NotifySocket(home.root.parent / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)     # the daemon inherits the test's environment
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        daemon.start()
        ready = notify.wait_for("READY", "1")
        assert ready["MAINPID"] == str(daemon.proc.pid)
        # READY names the node's pid: the broker can only know it once the binary has been started
        node_pid = int(re.fullmatch(r"running genesis \(vega pid (\d+)\)", ready["STATUS"]).group(1))
        home.wait_started(1)
        assert _pid(home, 1) == node_pid
        assert sum(1 for m in notify.read() if "READY" in m) == 1

        # watchdog: WATCHDOG_USEC=200000 means a ping every 0.1 s from the broker's loop
        since = time.monotonic()
        wait_until(lambda: notify.pings_since(since) >= 5, what="five watchdog pings", timeout_s=5)
        assert time.monotonic() - since >= 0.3            # five pings take four intervals, not a burst
        assert notify.pings_since(since) <= (time.monotonic() - since) / 0.1 * 1.5 + 2

        n = len(notify.read())
        home.announce("v0.73.0", 120, ready=True)
        notify.wait_for("STATUS", "upgrading to v0.73.0 at block 120", after=n)
        home.wait_started(2, timeout_s=20)
        after_upgrade = notify.wait_for("STATUS", f"running v0.73.0 (vega pid {_pid(home, 2)})", after=n)
        assert "READY" not in after_upgrade                  # READY=1 is said once, at the first start

        n = len(notify.read())
        daemon.signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", "1", after=n)
        assert stopping["STATUS"] == "stopping: received SIGTERM"
        assert daemon.wait_exit(20) == 0
    finally:
        notify.close()


def _pid(home, n: int) -> int:
    return home.node_events("started")[n - 1]["pid"]


# --- Prometheus metrics -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float] | None:
    """The samples at /metrics, as {'name{labels}': value}; None while nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)   # not urllib: no proxy settings
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
    except OSError:
        return None
    finally:
        conn.close()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_follow_the_node_its_restarts_a_fetch_and_an_upgrade(home, daemon, events):
    port = free_port()
    server = ReleaseServer().start()
    archive = release_zip_with_fake_vega("v0.73.0")
    server.add_release("v0.73.0", {"vega-linux-amd64.zip": archive})
    home.set_config(metricsListen=f"127.0.0.1:{port}",
                    **{"autoInstall.enabled": True, "autoInstall.apiUrl": server.url})
    try:
        _metrics_through_a_restart_and_an_upgrade(home, daemon, events, port, len(archive))
    finally:
        server.stop()


def _metrics_through_a_restart_and_an_upgrade(home, daemon, events, port: int, archive_bytes: int) -> None:
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    m = wait_until(lambda: (s := scrape(port)) and s.get('visor_binary_up{name="vega"}') == 1 and s,
                   what="visor_binary_up 1 for vega")
    assert m["visor_broker_up"] == 1 and m['visor_state{state="running"}'] == 1
    assert m['visor_release_info{folder="genesis",name="genesis"}'] == 1
    assert m['visor_worker_alive{worker="runner:vega"}'] == 1 and m['visor_worker_alive{worker="metrics"}'] == 1
    assert m["visor_restarts_used"] == 0 and m["visor_restarts_max"] == 3
    assert abs(m['visor_binary_start_time_seconds{name="vega"}'] - psutil.Process(node).create_time()) < 2
    assert m["visor_upgrades_total"] == 0 and m["visor_broker_process_resident_memory_bytes"] > 0

    os.kill(node, signal.SIGKILL)
    m = wait_until(lambda: (s := scrape(port)) and s.get('visor_binary_exits_total{name="vega"}', 0) >= 1
                   and s["visor_restarts_used"] == 1 and s.get('visor_binary_up{name="vega"}') == 1 and s,
                   what="an exit, a restart, and vega up again")
    assert m["visor_binary_restarts_total"] == 1
    assert m['visor_events_total{type="binary.exited"}'] >= 1

    home.announce("v0.73.0", 120)                          # accepted: auto-install fetches it now
    m = wait_until(lambda: (s := scrape(port)) and s['visor_fetch_duration_seconds_count{outcome="completed"}'] == 1
                   and s, what="one completed fetch")
    assert m["visor_fetch_bytes_total"] == archive_bytes and m['visor_upgrade_accepted_height{tag="v0.73.0"}'] == 120

    home.announce("v0.73.0", 120, ready=True)
    done = events.wait_for("upgrade.completed", tag="v0.73.0", timeout_s=20)
    m = wait_until(lambda: (s := scrape(port)) and s["visor_upgrades_total"] == 1 and s, what="one upgrade")
    assert m["visor_upgrade_last_downtime_seconds"] == pytest.approx(done["downtime_ms"] / 1000)
    assert m['visor_release_info{folder="v0.73.0",name="v0.73.0"}'] == 1
    assert m["visor_restarts_used"] == 0                   # a successful upgrade resets the count
    assert daemon.stop() == 0


# --- JSON logs --------------------------------------------------------------------------------

def test_json_logs_are_one_object_per_line_and_log_every_event_once(home, daemon, events):
    home.set_config(logFormat="json")
    daemon.start()
    node = daemon.wait_running()["binaries"]["vega"]["pid"]
    os.kill(node, signal.SIGKILL)                          # a failure and a restart, for more kinds of line
    events.wait_for("binary.restart_scheduled")
    wait_until(lambda: daemon.status()["restarts"]["count"] == 1 and daemon.wait_running(), what="restarted")
    assert daemon.stop() == 0
    events.wait_for("visor.stopped")

    lines = [json.loads(line) for line in daemon.stderr.splitlines()]    # the fake node writes nothing
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    assert len({line["pid"] for line in lines}) > 1       # the forked workers write JSON too
    assert any(line["logger"] == "visor" and line["level"] == "info" for line in lines)

    logged = [line["msg"] for line in lines if line["logger"] == "visor.events"]
    seen = events.received                                # from its first event on, with nothing missed
    first = seen[0]["seq"]
    assert [e["seq"] for e in seen] == list(range(first, first + len(seen)))
    assert len(logged) == seen[-1]["seq"]                 # one line per event published, no more
    for msg, event in zip(logged[first - 1:], seen, strict=True):
        assert msg.split(" ", 1)[0] == event["type"]
        for key, value in event.items():
            if key not in ("v", "type", "ts", "seq") and isinstance(value, (int, str)):
                assert f"{key}={value}" in msg, (msg, event)
