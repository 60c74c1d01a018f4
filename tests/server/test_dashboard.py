"""The live dashboard of the real server: its JSON history, the page in a real headless browser,
and the Grafana dashboard's PromQL checked against a live /metrics scrape."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
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
    answer = complete(client, "The dashboard shows")
    # Sampled once a second: wait until a point has seen the request finish.
    data = wait_for(lambda: (d := dashboard_data(url)) and any(
        r["id"] == answer.id for r in d["slowest_requests"]) and d, what="the request listed")
    latest = data["points"][-1]
    assert latest["ttft_p50_s"] > 0 and latest["tpot_p50_s"] > 0
    assert latest["ttft_p99_s"] >= latest["ttft_p50_s"]
    assert 0 <= latest["kv_cache_usage"] <= 1
    assert latest["cost_per_million_tokens"] > 0  # the session server has --price-per-hour
    assert sum(p["requests_finished"] for p in data["points"]) >= 1
    assert any(p["output_tokens_per_s"] for p in data["points"])
    listed = next(r for r in data["slowest_requests"] if r["id"] == answer.id)
    assert listed["generated_tokens"] == answer.usage.completion_tokens == 12
    assert listed["prompt_tokens"] == answer.usage.prompt_tokens
    assert listed["trace_url"] == f"/v1/requests/{answer.id}/trace"
    e2es = [r["e2e_s"] for r in data["slowest_requests"]]
    assert e2es == sorted(e2es, reverse=True)

    # A poller that holds everything up to latest_seq gets only what came after it.
    newer = wait_for(lambda: dashboard_data(url, since=data["latest_seq"])["points"],
                     what="a new point")
    assert all(p["seq"] > data["latest_seq"] for p in newer)
    assert [p["seq"] for p in newer] == list(range(newer[0]["seq"], newer[-1]["seq"] + 1))


def test_dashboard_data_rejects_a_bad_since(tokenmill_server):
    response = httpx.get(tokenmill_server.url + "/dashboard/data", params={"since": "-1"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "since"
    assert httpx.get(tokenmill_server.url + "/health").status_code == 200


def test_dashboard_renders_live_charts_in_a_real_browser(client, tokenmill_server):
    url = tokenmill_server.url
    with browser_page() as (page, problems):
        page.goto(url + "/dashboard")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('live')",
                               timeout=15_000)
        answers = [complete(client, f"Request {i} for the dashboard:", max_tokens=16)
                   for i in range(3)]
        # The page polls on its own; wait until its charts and table show the traffic.
        page.wait_for_function(
            """ids => {
              const points = t => Number(document.querySelector(`[data-chart="${t}"] svg`)
                                         .getAttribute('data-points'));
              const rows = [...document.querySelectorAll('#slowest tr[data-request]')]
                .map(r => r.dataset.request);
              return points('Throughput (tokens/s)') > 1 && points('Time to first token') > 0
                && points('Time per output token') > 0 && points('Cost per 1M tokens') > 0
                && ids.some(id => rows.includes(id));
            }""", arg=[a.id for a in answers], timeout=20_000)
        # Something was drawn: a line per series of the throughput chart, a number in its tile.
        throughput = page.locator('[data-chart="Throughput (tokens/s)"] path.line')
        assert throughput.count() == 2
        assert page.locator('[data-tile="output_tokens_per_s"]').inner_text() != ""
        assert page.locator("#model").inner_text() == MODEL
        trace_links = page.locator("#slowest a").evaluate_all("as => as.map(a => a.href)")
        assert any(f"/v1/requests/{a.id}/trace" in link for a in answers for link in trace_links)
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
