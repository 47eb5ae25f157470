"""The alert rules and the dashboard against a scrape of the running daemon: every metric they use is there."""

import http.client
import socket

import pytest

from tests.helpers import wait_until
from tests.unit.test_alerts import dashboard_exprs, names_used, rule_exprs, series_names

pytestmark = pytest.mark.timeout(60)


def scrape_text(port: int) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)   # not urllib: no proxy settings
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    except OSError:
        return None
    finally:
        conn.close()


def test_every_metric_the_rules_and_the_dashboard_use_is_in_a_scrape(home, daemon):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home.set_config(metricsListen=f"127.0.0.1:{port}")
    daemon.start()
    daemon.wait_running()
    text = wait_until(lambda: (t := scrape_text(port)) and 'visor_binary_up{name="vega"} 1.0' in t and t,
                      what="a scrape with vega up", timeout_s=15)
    exported = series_names(text)
    assert names_used(rule_exprs()) - exported == set()
    assert names_used(dashboard_exprs()) - exported == set()
    assert daemon.stop() == 0
