"""The gateway's fleet dashboard: its JSON, the page in a real headless browser, and the gateway's
Grafana dashboard checked against a live /metrics scrape."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.browser_support import browser_page, save_screenshot
from tests.gateway.helpers import base_config, chat
from tests.server.test_dashboard import GRAFANA_DIR, exported_series, promql_metric_names
from tests.server.test_load_and_metrics import wait_for


@pytest.fixture
def fleet(upstreams, start_gateway):
    """A gateway over one working replica and one that is down, after some traffic: a miss, two
    exact-cache hits and a 429 (acme may send 3 requests a minute)."""
    (_, up), (_, down) = upstreams
    down.stop()
    config = base_config([up.url, down.url])
    config["tenants"][0]["requests_per_minute"] = 3
    gw = start_gateway(config)
    client = gw.client()
    for _ in range(3):
        chat(client, "the same question")
    with pytest.raises(openai.RateLimitError):
        chat(client, "one too many")
    return gw


def fleet_data(url: str, since: int = 0) -> dict:
    response = httpx.get(url + "/dashboard/data", params={"since": since}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_fleet_data_shows_each_replica_and_the_gateway_figures(fleet):
    data = wait_for(lambda: (d := fleet_data(fleet.url))["points"] and d, what="a sampled point")
    up, down = data["replicas"]
    assert (up["name"], up["routable"], up["answers_in_window"]) == ("r0", True, 1)
    assert up["mean_latency_s"] > 0
    assert (down["name"], down["routable"], down["healthy"]) == ("r1", False, False)
    assert down["errors_total"] >= 1  # its failed health check
    totals = data["totals"]
    assert totals["requests"] == 4 and totals["by_status_class"] == {"2xx": 3, "4xx": 1}
    assert totals["rate_limited"] == 1
    assert totals["cache_hits"] == 2  # the exact cache answered the repeats
    newer = wait_for(lambda: fleet_data(fleet.url, since=data["latest_seq"])["points"],
                     what="a newer point")
    assert all(p["seq"] > data["latest_seq"] for p in newer)
    assert set(newer[0]["replicas"]) == {"r0", "r1"}


def test_fleet_data_rejects_a_bad_since(fleet):
    response = httpx.get(fleet.url + "/dashboard/data", params={"since": "soon"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "since"


def test_fleet_dashboard_renders_in_a_real_browser(fleet):
    with browser_page() as (page, problems):
        page.goto(fleet.url + "/dashboard")
        page.wait_for_function(
            """() => {
              const points = t => Number(document.querySelector(`[data-chart="${t}"] svg`)
                                         ?.getAttribute('data-points') || 0);
              return document.querySelectorAll('#replicas tr[data-replica]').length === 2
                && points('Requests per second') > 1 && points('In flight per replica') > 1;
            }""", timeout=20_000)
        assert page.locator('tr[data-replica="r0"]').inner_text().split("\t")[1] == "up"
        assert "failing health check" in page.locator('tr[data-replica="r1"]').inner_text()
        assert page.locator('[data-tile="rate-limited (429)"]').inner_text() == "1"
        assert page.locator('[data-tile="routable"]').inner_text() == "1 / 2"
        save_screenshot(page, "gateway-fleet-dashboard")
        assert problems.all() == []


def test_dashboard_follows_expose_metrics(upstreams, start_gateway):
    (_, up), _ = upstreams
    gw = start_gateway(base_config([up.url], server={"expose_metrics": False}))
    assert httpx.get(gw.url + "/dashboard").status_code == 404
    assert httpx.get(gw.url + "/dashboard/data").status_code == 404


def test_grafana_dashboard_reads_only_metrics_the_gateway_exports(fleet):
    exported = exported_series(httpx.get(fleet.url + "/metrics").text)
    dashboard = json.loads((GRAFANA_DIR / "tokenmill-gateway.json").read_text())
    used = promql_metric_names(dashboard)
    assert len(used) >= 8, used
    assert sorted(used - exported) == []
