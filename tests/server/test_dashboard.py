"""The live dashboard of the real server: its JSON history, the page in a real headless browser,
and the Grafana dashboard's PromQL checked against a live /metrics scrape."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.browser_support import browser_page, save_screenshot
from tests.server.conftest import MODEL
from tests.server.test_load_and_metrics import wait_for

REPO = Path(__file__).resolve().parents[2]
GRAFANA_DIR = REPO / "deploy" / "grafana"


def dashboard_data(url: str, since: int = 0) -> dict:
    response = httpx.get(url + "/dashboard/data", params={"since": since}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def complete(client, text: str, max_tokens: int = 12):
    return client.completions.create(model=MODEL, prompt=text, max_tokens=max_tokens,
                                     temperature=0, extra_body={"ignore_eos": True})


def test_dashboard_data_is_a_history_with_the_slowest_requests(client, tokenmill_server):
    url = tokenmill_server.url
    first = dashboard_data(url)
    assert first["model"] == MODEL and first["phase"] == "ready"
    complete(client, "The dashboard shows")
    # The engine's listeners saw it finish before its answer came back, so a point after the
    # first read and up to the one after the latest then counts it (on a loaded machine the
    # answer can take more than one sampling interval to arrive).
    seq = dashboard_data(url)["latest_seq"]
    after = first_point_after(url, seq)
    data = dashboard_data(url)
    around = [p for p in data["points"] if first["latest_seq"] < p["seq"] <= seq + 1]
    assert sum(p["requests_finished"] for p in around) >= 1
    assert any(p["output_tokens_per_s"] for p in around)
    assert after["ttft_p50_s"] > 0 and after["tpot_p50_s"] > 0
    assert after["ttft_p99_s"] >= after["ttft_p50_s"]
    assert 0 <= after["kv_cache_usage"] <= 1
    assert after["cost_per_million_tokens"] > 0  # the session server has --price-per-hour
    # The slowest recent requests (earlier tests' requests may be among them, so any order of
    # ids is fine, but each is a real finished request with its trace link).
    slowest = data["slowest_requests"]
    assert 1 <= len(slowest) <= 10
    assert [r["e2e_s"] for r in slowest] == sorted((r["e2e_s"] for r in slowest), reverse=True)
    for r in slowest:
        assert r["trace_url"] == f"/v1/requests/{r['id']}/trace"
        assert r["generated_tokens"] >= 1 and r["prompt_tokens"] >= 1
        assert 0 < r["ttft_s"] <= r["e2e_s"]

    # A poller that holds everything up to latest_seq gets only what came after it.
    newer = wait_for(lambda: dashboard_data(url, since=data["latest_seq"])["points"],
                     what="a new point")
    assert all(p["seq"] > data["latest_seq"] for p in newer)
    assert [p["seq"] for p in newer] == list(range(newer[0]["seq"], newer[-1]["seq"] + 1))


def first_point_after(url: str, seq: int) -> dict:
    return wait_for(lambda: dashboard_data(url, since=seq)["points"], what="a new point")[0]


@pytest.mark.parametrize("since", ["-1", "\u00b2", "\u0663"])  # "²" was a 500 (int() fails)
def test_dashboard_data_rejects_a_bad_since(tokenmill_server, since):
    response = httpx.get(tokenmill_server.url + "/dashboard/data", params={"since": since})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "since"
    assert httpx.get(tokenmill_server.url + "/health").status_code == 200


def test_dashboard_renders_live_charts_in_a_real_browser(client, tokenmill_server):
    url = tokenmill_server.url
    with browser_page() as (page, problems):
        page.goto(url + "/dashboard")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('live')",
                               timeout=15_000)
        for i in range(3):
            complete(client, f"Request {i} for the dashboard:", max_tokens=16)
        # The engine's listeners have seen a request finish by the time its answer arrives, so
        # the next point counts it. The page polls on its own: wait until it has read that point
        # (earlier tests' requests may be slower, so ours need not be among the slowest).
        after_traffic = dashboard_data(url)["latest_seq"] + 1
        page.wait_for_function(
            """seq => {
              const points = t => Number(document.querySelector(`[data-chart="${t}"] svg`)
                                         .getAttribute('data-points'));
              return Number(document.body.dataset.latestSeq || 0) >= seq
                && points('Throughput (tokens/s)') > 1 && points('Time to first token') > 0
                && points('Time per output token') > 0 && points('Cost per 1M tokens') > 0
                && document.querySelectorAll('#slowest tr[data-request]').length > 0;
            }""", arg=after_traffic, timeout=20_000)
        # Something was drawn: a line per series of the throughput chart, a number in its tile.
        throughput = page.locator('[data-chart="Throughput (tokens/s)"] path.line')
        assert throughput.count() == 2
        assert page.locator('[data-tile="output_tokens_per_s"]').inner_text() != "–"
        assert page.locator("#model").inner_text() == MODEL
        rows = page.locator("#slowest tr[data-request]")
        first_id = rows.first.get_attribute("data-request")
        assert rows.first.locator("a").get_attribute("href") == f"v1/requests/{first_id}/trace"
        served = {r["id"] for r in dashboard_data(url)["slowest_requests"]}
        assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.request)")) <= served
        save_screenshot(page, "server-dashboard")
        assert problems.all() == []


# ---------------------------------------------------------------------------- Grafana
def promql_metric_names(dashboard: dict) -> set[str]:
    """Every metric a panel's or variable's PromQL reads (tokenmill's names only)."""
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query or "")
    return {name for q in queries for name in re.findall(r"tokenmill[:_][A-Za-z0-9_:]*", q)}


def exported_series(metrics_text: str) -> set[str]:
    """The series names a Prometheus server would store from this exposition."""
    suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"]}
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
        names.update(s.name for s in family.samples)
    return names


def test_grafana_dashboard_reads_only_metrics_the_server_exports(client, tokenmill_server):
    complete(client, "Populate the histograms")
    exported = exported_series(httpx.get(tokenmill_server.url + "/metrics").text)
    dashboard = json.loads((GRAFANA_DIR / "tokenmill.json").read_text())
    used = promql_metric_names(dashboard)
    assert len(used) >= 10, used
    assert sorted(used - exported) == []
    panel_ids = [p["id"] for p in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
