"""docs/operators.md and etc/k8s: the examples an operator copies must work as written."""

from __future__ import annotations

import re
import select
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import zmq

from tests.helpers import wait_until
from visor.config import KEYS, load_run_config, parse_visor_config
from visor.events import EVENTS, Publisher

REPO = Path(__file__).resolve().parent.parent.parent
DOC = (REPO / "docs" / "operators.md").read_text()
K8S = REPO / "etc" / "k8s" / "visor-statefulset.yaml"


def doc_blocks(lang: str) -> list[str]:
    """The fenced blocks of this language that follow a `<!-- tested: ... -->` comment, in order."""
    return re.findall(rf"<!-- tested:[^>]*-->\n```{lang}\n(.*?)```", DOC, re.S)


def test_a_go_visor_config_loads_unchanged_without_warnings(tmp_path):
    go_config = doc_blocks("toml")[0]
    cfg, warnings = parse_visor_config(tomllib.loads(go_config), tmp_path / "config.toml")
    assert warnings == []
    assert cfg.max_first_retries == 43200 and cfg.stop_delay_s == 3
    assert cfg.upgrade_folders == {"vX.X.X": "vX.X.X"}
    assert (cfg.auto_install, cfg.asset_name, cfg.asset_binary) == (True, "vega-linux-amd64.zip", "vega")


def test_a_go_visor_run_config_loads_unchanged(tmp_path):
    (tmp_path / "run-config.toml").write_text(doc_blocks("toml")[1])
    rc, warnings = load_run_config(tmp_path / "run-config.toml")
    assert warnings == [] and rc.name == "v0.73.0" and rc.http_path == "/rpc"
    assert rc.vega.path == tmp_path / "vega" and rc.data_node.args[:2] == ("datanode", "start")


def test_every_config_key_event_type_and_metric_is_documented():
    for key in KEYS:
        assert f"`{key.rpartition('.')[2]}`" in DOC or f"`{key}`" in DOC, key
    for type_ in EVENTS:
        assert f"`{type_}`" in DOC, type_
    for name in metric_names():
        assert f"`{name}`" in DOC, name


def metric_names() -> set[str]:
    """Every name the metrics worker exposes, as Prometheus shows it (counters with _total)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from workers.metrics import EventCounters, status_families
    registry = prometheus_client.CollectorRegistry()
    EventCounters(registry)
    status = {"visor": {"state": "running", "version": "1"}, "current": {"folder": "g", "name": "g"},
              "binaries": {"vega": {"started_at": 1.0}}, "workers": {"runner:vega": {"alive": True, "restarts": 0}},
              "upgrade": {"accepted": {"tag": "v1", "height": 1}, "blocked": "x", "last": {"downtime_ms": 1}},
              "restarts": {"count": 0, "max": 3}}
    registry.register(type("Status", (), {"collect": lambda self: status_families(status)})())
    prometheus_client.disable_created_metrics()          # as the worker does
    try:
        text = prometheus_client.generate_latest(registry).decode()
    finally:
        prometheus_client.enable_created_metrics()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M)) | {"visor_broker_up"}


def test_the_subscriber_snippet_prints_the_events_it_subscribed_to(tmp_path):
    snippet = doc_blocks("python")[0]
    endpoint = f"ipc://{tmp_path}/events.sock"
    ctx = zmq.Context()
    pub = Publisher(ctx, endpoint)
    proc = subprocess.Popen([sys.executable, "-c", snippet, endpoint], stdout=subprocess.PIPE, text=True)
    try:
        def printed():           # a SUB joins a little after it connects: publish until it hears
            pub.emit("worker.started", worker="fetcher", pid=1)          # not subscribed to: never printed
            pub.emit("upgrade.accepted", tag="v0.73.0", height=120)
            if select.select([proc.stdout], [], [], 0.05)[0]:
                return proc.stdout.readline()
            return None
        line = wait_until(printed, what="the snippet to print an event", timeout_s=10)
        seq, type_, rest = line.split(" ", 2)
        assert int(seq) % 2 == 0 and type_ == "upgrade.accepted"
        assert rest.strip() == "{'tag': 'v0.73.0', 'height': 120}"
    finally:
        proc.kill()
        proc.wait(5)
        proc.stdout.close()
        pub.close()
        ctx.term()


def test_the_kubernetes_example_is_valid_and_consistent():
    import yaml                              # a test dependency only (setup.cfg's test extra)
    config_map, service, stateful_set = yaml.safe_load_all(K8S.read_text())
    assert [d["kind"] for d in (config_map, service, stateful_set)] == ["ConfigMap", "Service", "StatefulSet"]
    cfg, warnings = parse_visor_config(tomllib.loads(config_map["data"]["config.toml"]), Path("config.toml"))
    assert warnings == [] and cfg.metrics_listen.endswith(":9120")
    tomllib.loads(config_map["data"]["genesis-run-config.toml"])
    pod = stateful_set["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > cfg.stop_timeout_s + 5
    visor = pod["containers"][0]
    assert visor["args"] == ["visor", "run", "--home", "/srv/visor"]
    assert visor["readinessProbe"]["exec"]["command"] == ["visor", "status", "--home", "/srv/visor", "--json"]
    assert {"name": "metrics", "containerPort": 9120} in visor["ports"]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9120"
    assert stateful_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_docs_name_only_files_that_exist():
    for link in re.findall(r"\]\((\.\./[^)#]+)\)", DOC):
        assert (REPO / "docs" / link).resolve().exists(), link
