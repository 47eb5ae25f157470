"""etc/prometheus/visor-alerts.yml and etc/grafana/visor.json load as they are and use only what Visor exports.

(tests/process/test_alerts.py checks the same names against a scrape of the running daemon.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent.parent
RULES = REPO / "etc" / "prometheus" / "visor-alerts.yml"
DASHBOARD = REPO / "etc" / "grafana" / "visor.json"
RULE_TESTS = REPO / "etc" / "prometheus" / "visor-alerts.test.yml"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "Prometheus's promtool is not installed (Debian: apt-get install prometheus)"
NEEDED = {   # what the issue asks to be alerted on -> a metric the alert must use
    "upgrade blocked": "visor_upgrade_blocked", "restart budget": "visor_restarts_used",
    "node binary down": "visor_binary_up", "broker not answering": "visor_broker_up",
    "worker restart loop": "visor_worker_restarts_total", "folder not ready": "visor_upgrade_folder_ready",
}


def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in rules()]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"]]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def names_used(exprs: list[str]) -> set[str]:
    return {name for e in exprs for name in re.findall(r"\b(visor_[a-z0-9_]+)\b", e)}


def test_the_rules_file_has_the_shape_prometheus_loads():
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"} and all({"name", "rules"} <= g.keys() for g in doc["groups"])
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert len(rule["annotations"]["summary"]) > 40
        assert rule["expr"].count("(") == rule["expr"].count(")")


def test_every_alert_the_issue_asks_for_is_there():
    used = {name for e in rule_exprs() for name in names_used([e])}
    for what, metric in NEEDED.items():
        assert metric in used, what
    assert any(re.search(r'\bup\{job="visor"\} == 0', e) for e in rule_exprs())    # scrapes fail


def test_the_dashboard_is_a_grafana_dashboard_with_a_datasource_variable():
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] == "Visor" and board["uid"] == "visor"
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "instance"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for target in p.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].count("(") == \
                target["expr"].count(")")
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for what in ("state", "binaries", "restarts", "upgrade", "downtime", "fetch", "worker restarts",
                 "broker cpu", "broker memory"):
        assert what in titles, what
    assert "visor_rpc_failures_total" in names_used(dashboard_exprs())


def test_rules_and_dashboard_use_only_metrics_visor_exports():
    exported = exported_names()
    assert names_used(rule_exprs()) - exported == set()
    assert names_used(dashboard_exprs()) - exported == set()


def exported_names() -> set[str]:
    """Every series name the metrics worker can expose (counters with _total, histograms' parts)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from workers.metrics import EventCounters, status_families
    registry = prometheus_client.CollectorRegistry()
    EventCounters(registry)
    status = {"visor": {"state": "running", "version": "1"}, "current": {"folder": "g", "name": "g"},
              "binaries": {"vega": {"started_at": 1.0}}, "workers": {"runner:vega": {"alive": True, "restarts": 0}},
              "upgrade": {"accepted": {"tag": "v1", "height": 1, "folder_ready": True}, "blocked": "x",
                          "last": {"downtime_ms": 1}},
              "restarts": {"count": 0, "max": 3}}
    registry.register(type("Status", (), {"collect": lambda self: status_families(status)})())
    prometheus_client.ProcessCollector(namespace="visor_broker", registry=registry)
    text = prometheus_client.generate_latest(registry).decode()
    return series_names(text) | {"visor_broker_up"}


def series_names(text: str) -> set[str]:
    """Names a query can use, from an exposition: the samples, and every declared family with its parts."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        names |= {"counter": {family.removesuffix("_total") + "_total"}, "histogram": {family + p for p in ("_bucket", "_count", "_sum")},
                  "info": {family + "_info"}}.get(kind, {family})
    return names


def test_the_folder_ready_gauge_follows_the_prefetch_of_the_accepted_release():
    from visor import protocol as p
    from visor.config import VisorConfig
    from visor.state import Phase, State, step
    s = State(phase=Phase.RUNNING, folder="genesis")

    def feed(*facts):
        nonlocal s
        for fact in facts:
            s, _actions = step(s, fact, VisorConfig(), 0.0)
        return s.accepted_ready
    assert feed(p.UpgradeStatus("v2", 120, False)) is False
    assert feed(p.FolderBlocked("v2", "v2", "not found")) is False
    assert feed(p.FolderReady("v2", "v2")) is True
    assert feed(p.FolderReady("v1", "v1")) is True               # another tag's says nothing of this one
    assert feed(p.FolderBlocked("v2", "v2", "version mismatch")) is False
    assert feed(p.FolderReady("v2", "v2"), p.UpgradeStatus("v3", 200, False)) is False   # a new release


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_accepts_the_rules_and_passes_their_unit_tests():
    # each alert fires on Visor's series only after its `for:`, and its summary renders as written
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        done = subprocess.run([PROMTOOL, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_for_promtool():
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {rule["alert"] for rule in rules()}
