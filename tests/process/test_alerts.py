"""The alert rules and the dashboard against a scrape of the running daemon: every metric they use is there."""

import http.client
import json
import shutil
import socket
import subprocess

import pytest

from tests.helpers import wait_until
from tests.unit.test_alerts import RULES, dashboard_exprs, names_used, rule_exprs, rules, series_names

pytestmark = pytest.mark.timeout(60)


def get(port: int, path: str) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)   # not urllib: no proxy settings
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    except OSError:
        return None
    finally:
        conn.close()


def scrape_text(port: int) -> str | None:
    return get(port, "/metrics")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_metric_the_rules_and_the_dashboard_use_is_in_a_scrape(home, daemon):
    port = free_port()
    home.set_config(metricsListen=f"127.0.0.1:{port}")
    daemon.start()
    daemon.wait_running()
    text = wait_until(lambda: (t := scrape_text(port)) and 'visor_binary_up{name="vega"} 1.0' in t and t,
                      what="a scrape with vega up", timeout_s=15)
    exported = series_names(text)
    assert names_used(rule_exprs()) - exported == set()
    assert names_used(dashboard_exprs()) - exported == set()
    assert daemon.stop() == 0


def api(port: int, path: str):
    body = get(port, path)
    try:
        return json.loads(body)["data"] if body else None
    except (ValueError, KeyError):
        return None                              # not up yet


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="Prometheus is not installed (Debian: apt-get install prometheus)")
def test_a_real_prometheus_loads_the_rules_scrapes_visor_evaluates_them_and_alerts_when_visor_goes(home, daemon):
    metrics, web = free_port(), free_port()
    home.set_config(metricsListen=f"127.0.0.1:{metrics}")
    daemon.start()
    daemon.wait_running()
    config = home.root / "prometheus.yml"
    config.write_text(json.dumps({        # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "visor", "static_configs": [{"targets": [f"127.0.0.1:{metrics}"]}]}]}))
    prometheus = subprocess.Popen(["prometheus", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{web}",
                                   f"--storage.tsdb.path={home.root / 'tsdb'}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        loaded = wait_until(lambda: (d := api(web, "/api/v1/rules")) and d["groups"] and
                            all(r["health"] == "ok" and r["lastEvaluation"][:4] != "0001"
                                for g in d["groups"] for r in g["rules"]) and d,
                            what="every rule evaluated without error", timeout_s=20)
        assert {r["name"] for g in loaded["groups"] for r in g["rules"]} == {r["alert"] for r in rules()}
        up = wait_until(lambda: (d := api(web, "/api/v1/query?query=visor_binary_up")) and d["result"] and d,
                        what="a scraped series", timeout_s=10)
        assert up["result"][0]["metric"]["job"] == "visor" and up["result"][0]["value"][1] == "1"
        assert not api(web, "/api/v1/alerts")["alerts"]       # a healthy node: nothing fires
        assert daemon.stop() == 0
        pending = wait_until(lambda: [a for a in api(web, "/api/v1/alerts")["alerts"]
                                      if a["labels"]["alertname"] == "VisorScrapeDown"],
                             what="VisorScrapeDown pending once visor is gone", timeout_s=15)
        assert pending[0]["state"] == "pending" and pending[0]["labels"]["severity"] == "critical"
    finally:
        prometheus.terminate()
        prometheus.wait(10)
