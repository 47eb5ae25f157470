"""Serves Prometheus metrics about Visor, its binaries and its upgrades on metricsListen. Decides nothing.

Gauges come from the broker's own `status`, asked over the control socket at each scrape, so they
are never stale and never disagree with `visor status`. Counters come from the event stream, counted
from the moment this worker subscribed: a restarted metrics worker starts them at zero again, which
Prometheus reads as an ordinary counter reset. The HTTP server is prometheus_client's, in its own
threads; this process's main loop only reads commands and events, so a slow scrape never delays it.

prometheus_client is imported inside the worker only: the broker imports this module before it
forks its workers, and must stay light. Everything is registered in a CollectorRegistry of our own,
never the library's global one, and every name starts with visor_.
"""

from __future__ import annotations

import logging
import math
import os
import time

import msgpack
import zmq

from visor import protocol
from visor.control import request
from visor.worker import BrokerLink, Readable, parse_worker_args

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 1.0           # a scrape waits this long for the broker, then reports visor_broker_up 0
BIND_RETRY_S = 5.0               # the port is taken: try again, rather than exit and be restarted in a loop
STATES = ("starting", "running", "upgrading", "restarting", "blocked", "stopping")
FETCH_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, math.inf)


def ask_status(ctx: zmq.Context, endpoint: str, timeout_s: float = STATUS_TIMEOUT_S) -> dict | None:
    """The broker's status (SPEC §6), or None when it does not answer in time: a scrape then reports
    visor_broker_up 0 rather than fail. The request is control's; the context is this worker's own."""
    try:
        reply = request(ctx, endpoint, protocol.StatusRequest(), timeout_s)   # ZMQError: the worker is leaving (context terminated)
    except (zmq.ZMQError, protocol.ProtocolError) as err:
        log.debug("no status from the broker: %s", err)
        return None
    return reply.status if isinstance(reply, protocol.StatusReply) else None


class StatusCollector:
    """Gauges from the broker's status, asked at each scrape (prometheus_client calls collect())."""

    def __init__(self, ask):
        self._ask = ask

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        status = self._ask()
        families = []
        if status is not None:
            try:
                families = list(status_families(status))
            except (KeyError, TypeError, ValueError, AttributeError):
                # a raised error would print a traceback on stderr (wsgiref) and fail the whole scrape
                log.exception("cannot read the broker's status")
                status = None
        yield GaugeMetricFamily("visor_broker_up", "1 when the broker answered this scrape's status request "
                                f"within {STATUS_TIMEOUT_S:g} s, else 0", value=0 if status is None else 1)
        yield from families


def status_families(s: dict):
    """Metric families from one status (SPEC §6 plus upgrade.target, upgrade.blocked and reason)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
    state = GaugeMetricFamily("visor_state", "1 for the state Visor is in (as `visor status` shows it)",
                              labels=["state"])
    for name in STATES:
        state.add_metric([name], 1 if s["visor"]["state"] == name else 0)
    yield state
    yield InfoMetricFamily("visor_build", "The running Visor's version", value={"version": str(s["visor"]["version"])})
    yield InfoMetricFamily("visor_release", "The release folder `current` points at, and its run-config name",
                           value={"folder": str(s["current"]["folder"]), "name": str(s["current"]["name"])})
    yield from _binary_families(s)
    yield GaugeMetricFamily("visor_restarts_used", "Restarts after binary failures since the start or the "
                            "last successful upgrade", value=s["restarts"]["count"])
    yield GaugeMetricFamily("visor_restarts_max", "maxNumberOfRestarts: the failure after this many restarts "
                            "stops Visor", value=s["restarts"]["max"])
    alive = GaugeMetricFamily("visor_worker_alive", "1 when the worker process is running", labels=["worker"])
    restarts = CounterMetricFamily("visor_worker_restarts", "Times the broker restarted the worker process",
                                   labels=["worker"])
    for name, w in s["workers"].items():
        alive.add_metric([name], 1 if w["alive"] else 0)
        restarts.add_metric([name], w["restarts"])
    yield alive
    yield restarts
    yield from _upgrade_families(s["upgrade"])


def _binary_families(s: dict):
    from prometheus_client.core import GaugeMetricFamily
    # a configured binary that is down is in `workers` (its runner), not in `binaries`: report it as 0
    names = sorted({w.partition(":")[2] for w in s["workers"] if w.startswith("runner:")} | s["binaries"].keys())
    up = GaugeMetricFamily("visor_binary_up", "1 when the node binary is running", labels=["name"])
    started = GaugeMetricFamily("visor_binary_start_time_seconds", "When the running binary started, "
                                "Unix time", labels=["name"])
    for name in names:
        b = s["binaries"].get(name)
        up.add_metric([name], 1 if b else 0)
        if b:
            started.add_metric([name], b["started_at"])
    yield up
    yield started


def _upgrade_families(u: dict):
    from prometheus_client.core import GaugeMetricFamily
    accepted = GaugeMetricFamily("visor_upgrade_accepted_height", "Block height of the release the network "
                                 "accepted and the node has not upgraded to yet", labels=["tag"])
    ready = GaugeMetricFamily("visor_upgrade_folder_ready", "1 when the folder of the accepted release is ready "
                              "and verified, 0 while it is not (yet)", labels=["tag"])
    if u.get("accepted"):
        tag = str(u["accepted"]["tag"])
        accepted.add_metric([tag], u["accepted"]["height"])
        ready.add_metric([tag], 1 if u["accepted"].get("folder_ready") else 0)
    yield accepted
    yield ready
    yield GaugeMetricFamily("visor_upgrade_blocked", "1 while an upgrade waits for its folder to be usable "
                            "(see `visor status` for why)", value=1 if u.get("blocked") else 0)
    # declared before the first upgrade too (with no sample), so that dashboards and rules find the name
    downtime = GaugeMetricFamily("visor_upgrade_last_downtime_seconds", "Last upgrade: from the last old binary "
                                 "gone to the first new one started")
    if u.get("last") and u["last"].get("downtime_ms") is not None:
        downtime.add_metric([], u["last"]["downtime_ms"] / 1000)
    yield downtime


class EventCounters:
    """Counters fed by the event stream (SPEC §5)."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name, text, labels=()):
            return Counter(name, text, labels, registry=registry)
        self.events = counter("visor_events", "Events seen on the event stream, by type", ["type"])
        self.upgrades = counter("visor_upgrades", "Upgrades completed (upgrade.completed)")
        self.blocked = counter("visor_upgrades_blocked", "Upgrades found blocked, once per new reason "
                               "(upgrade.blocked)")
        self.rpc_failures = counter("visor_rpc_failures", "Failed upgrade-status calls to the core node "
                                    "(rpc.unreachable)")
        self.exits = counter("visor_binary_exits", "Node binary exits, asked for or not (binary.exited)", ["name"])
        self.restarts = counter("visor_binary_restarts", "Restarts scheduled after a binary failure "
                                "(binary.restart_scheduled)")
        self.fetch_bytes = counter("visor_fetch_bytes", "Release bytes downloaded by auto-install, retries included")
        self.fetch_ratio = Gauge("visor_fetch_progress_ratio", "Part of the release asset downloaded so far, "
                                 "0 to 1 (1 once fetch.completed)", ["tag"], registry=registry)
        self.fetch_s = Histogram("visor_fetch_duration_seconds", "From fetch.started to fetch.completed or "
                                 "fetch.failed", ["outcome"], buckets=FETCH_BUCKETS_S, registry=registry)
        self.reloads = counter("visor_config_reloads", "config.toml edits applied (config.reloaded)")
        self.rejections = counter("visor_config_rejections", "config.toml edits rejected (config.rejected)")
        for outcome in ("completed", "failed"):
            self.fetch_s.labels(outcome)         # both series exist from the start, at zero
        self._fetches: dict[tuple, list[float]] = {}    # (tag, asset) -> [started ts, bytes so far]

    def count(self, e: dict) -> None:
        type_ = str(e.get("type", ""))
        self.events.labels(type_).inc()
        simple = {"upgrade.completed": self.upgrades, "upgrade.blocked": self.blocked,
                  "rpc.unreachable": self.rpc_failures, "binary.restart_scheduled": self.restarts,
                  "config.reloaded": self.reloads, "config.rejected": self.rejections}
        if type_ in simple:
            simple[type_].inc()
        elif type_ == "binary.exited":
            self.exits.labels(str(e.get("name"))).inc()
        elif type_.startswith("fetch."):
            self._fetch(type_, (e.get("tag"), e.get("asset")), e)

    def _fetch(self, type_: str, key: tuple, e: dict) -> None:
        ts = float(e.get("ts") or time.time())
        ratio = self.fetch_ratio.labels(str(key[0]))
        if type_ == "fetch.started":
            self._fetches[key] = [ts, 0]
            ratio.set(0)
        elif type_ == "fetch.progress":
            seen = self._fetches.setdefault(key, [ts, 0])
            done = int(e.get("bytes") or 0)
            # a retried download starts again from 0: its bytes are new bytes on the wire
            self.fetch_bytes.inc(done - seen[1] if done >= seen[1] else done)
            seen[1] = done
            if int(e.get("total") or 0) > 0:
                ratio.set(min(1.0, done / int(e["total"])))
        else:                                      # completed or failed
            if type_ == "fetch.completed":
                ratio.set(1)
            if key in self._fetches:               # a start we missed is not timed
                started, _bytes = self._fetches.pop(key)
                self.fetch_s.labels(type_.partition(".")[2]).observe(max(0.0, ts - started))


class Exporter:
    """The registry, the HTTP server and the event subscription of one ServeMetrics."""

    def __init__(self, cmd: protocol.ServeMetrics, ctx: zmq.Context, broker_pid: int):
        import prometheus_client as pc
        pc.disable_created_metrics()             # no *_created series: they double every counter for nothing
        self.cmd = cmd
        self.registry = pc.CollectorRegistry()
        self.counters = EventCounters(self.registry)
        self.registry.register(StatusCollector(lambda: ask_status(ctx, cmd.control_endpoint)))
        # the broker's CPU, memory and fds, named as Visor's (visor_broker_process_*), not this worker's
        pc.ProcessCollector(namespace="visor_broker", pid=lambda: broker_pid, registry=self.registry)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(cmd.events_endpoint)
        self.events_fd = self.sub.getsockopt(zmq.FD)
        self.server, self.listen_at, self._last_error = None, time.monotonic(), ""

    def listen(self) -> None:
        from prometheus_client import start_http_server
        host, _, port = self.cmd.listen.rpartition(":")
        try:
            self.server, _thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)
        except OSError as err:
            text = f"cannot serve metrics on {self.cmd.listen}: {err.strerror or err}; retrying every {BIND_RETRY_S:g}s"
            log.log(logging.DEBUG if text == self._last_error else logging.ERROR, "%s", text)
            self._last_error, self.listen_at = text, time.monotonic() + BIND_RETRY_S
            return
        # socketserver prints a traceback on stderr for a client that hangs up mid-reply; a log line will do
        self.server.handle_error = lambda _request, address: log.debug("metrics request from %s failed", address)
        self.listen_at = math.inf
        log.info("serving metrics on http://%s/metrics", self.cmd.listen)

    def drain(self) -> None:
        """Counts every queued event. The ZMQ fd only says something changed: read until none is left."""
        while True:
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                body = msgpack.unpackb(frames[-1], raw=False)
            except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                continue
            if isinstance(body, dict):
                self.counters.count(body)

    def close(self) -> None:
        # The server's thread is a daemon thread, and this process ends as soon as main returns; the
        # kernel closes the listening socket. (shutdown() would wait up to half a second for nothing.)
        self.sub.close()


def main(argv: list[str] | None = None) -> int:
    opts = parse_worker_args("metrics", argv)
    broker_pid = opts.broker_pid or os.getppid()
    ctx = zmq.Context()
    exporter: Exporter | None = None
    try:
        with BrokerLink(opts.endpoint, opts.name, opts.broker_pid, opts.identity, opts.first) as link:
            while True:
                watch = (exporter.events_fd,) if exporter else ()
                match link.receive(until=exporter.listen_at if exporter else math.inf, watch=watch):
                    case protocol.Shutdown():
                        return 0
                    case protocol.ServeMetrics() as cmd if exporter is None:
                        exporter = Exporter(cmd, ctx, broker_pid)
                        exporter.listen()
                    case protocol.ServeMetrics():
                        pass                     # a repeat: metricsListen is bound at start
                    case Readable():
                        exporter.drain()
                    case None:
                        exporter.listen()        # the port was taken; try again
    finally:
        if exporter is not None:
            exporter.close()
        ctx.term()                               # a scrape still asking the broker sees ETERM and ends
