"""Writes the Grafana dashboards next to this file from one description of their panels.

    python deploy/grafana/generate.py

Edit the panels here, regenerate, and commit both; tests/server/test_dashboard.py and
tests/gateway/test_fleet_dashboard.py check that every metric the PromQL reads is exported.
"""

import json
from pathlib import Path


def ds():
    return {"type": "prometheus", "uid": "${datasource}"}

class Board:
    def __init__(self, uid, title, description, variables):
        self.uid, self.title, self.description, self.variables = uid, title, description, variables
        self.panels = []
        self.next_id = 1
        self.x = 0
        self.y = 0

    def row(self, title):
        if self.x:
            self.x, self.y = 0, self.y + 8
        self.panels.append({"id": self.next_id, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.next_id += 1
        self.y += 1

    def panel(self, title, description, targets, unit="short", kind="timeseries", w=8, h=8,
              min0=True):
        if self.x + w > 24:
            self.x, self.y = 0, self.y + h
        p = {"id": self.next_id, "type": kind, "title": title, "description": description,
             "datasource": ds(), "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
             "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
             "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                         "tooltip": {"mode": "multi"}},
             "targets": [{"refId": chr(65 + i), "datasource": ds(), "expr": expr,
                          "legendFormat": legend} for i, (expr, legend) in enumerate(targets)]}
        if kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {"lineWidth": 1, "fillOpacity": 10,
                                                      "showPoints": "never"}
            if min0:
                p["fieldConfig"]["defaults"]["min"] = 0
        if kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                              "values": False}, "colorMode": "value",
                            "graphMode": "area", "textMode": "auto"}
        self.panels.append(p)
        self.next_id += 1
        self.x += w

    def json(self):
        templating = [{"name": "datasource", "type": "datasource", "query": "prometheus",
                       "label": "Prometheus", "current": {}, "hide": 0}]
        for name, query, label in self.variables:
            templating.append({"name": name, "label": label, "type": "query", "datasource": ds(),
                               "query": {"query": query, "refId": "A"}, "definition": query,
                               "refresh": 2, "includeAll": True, "multi": True,
                               "allValue": ".*", "current": {}, "sort": 1})
        return {"__inputs": [], "annotations": {"list": []}, "description": self.description,
                "editable": True, "graphTooltip": 1, "id": None, "links": [],
                "panels": self.panels, "refresh": "10s", "schemaVersion": 39,
                "tags": ["tokenmill", "llm"], "templating": {"list": templating},
                "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
                "timezone": "", "title": self.title, "uid": self.uid, "version": 1}


M = '{model_name=~"$model_name"}'
R = "[$__rate_interval]"

def q(metric, quantile, by=""):
    group = f"le{', ' + by if by else ''}"
    return (f"histogram_quantile({quantile}, sum by ({group}) "
            f"(rate(tokenmill:{metric}_bucket{M}{R})))")

def server():
    b = Board("tokenmill-server", "tokenmill server",
              "Prometheus metrics of `tokenmill serve` (/metrics), under vLLM's metric names "
              "with the `tokenmill:` prefix.",
              [("model_name", "label_values(tokenmill:num_requests_running, model_name)",
                "model")])
    b.row("Load")
    b.panel("Token throughput", "Prompt tokens processed and tokens generated per second.",
            [(f"sum(rate(tokenmill:prompt_tokens_total{M}{R}))", "prompt tokens/s"),
             (f"sum(rate(tokenmill:generation_tokens_total{M}{R}))", "generated tokens/s")],
            unit="short")
    b.panel("Requests in the engine", "Running batch and waiting queue.",
            [(f"sum(tokenmill:num_requests_running{M})", "running"),
             (f"sum(tokenmill:num_requests_waiting{M})", "waiting")])
    b.panel("Finished requests", "Per second, by finish reason (stop, length, abort).",
            [(f"sum by (finished_reason) (rate(tokenmill:request_success_total{M}{R}))",
              "{{finished_reason}}")], unit="reqps")
    b.row("Latency")
    for metric, title, desc in [
            ("time_to_first_token_seconds", "Time to first token", "Arrival to first token."),
            ("request_time_per_output_token_seconds", "Time per output token",
             "Mean decode time per output token of each finished request."),
            ("inter_token_latency_seconds", "Inter-token latency",
             "Gap between two outputs of a request."),
            ("e2e_request_latency_seconds", "End-to-end latency", "Arrival to finish."),
            ("request_queue_time_seconds", "Queue time",
             "Time in the waiting queue before first scheduled.")]:
        b.panel(title, desc, [(q(metric, 0.5), "p50"), (q(metric, 0.9), "p90"),
                              (q(metric, 0.99), "p99")], unit="s")
    b.panel("Mean TTFT and E2E", "Mean over the rate interval (sum / count).",
            [((f"sum(rate(tokenmill:time_to_first_token_seconds_sum{M}{R})) / "
              f"sum(rate(tokenmill:time_to_first_token_seconds_count{M}{R}))"), "TTFT"),
             ((f"sum(rate(tokenmill:e2e_request_latency_seconds_sum{M}{R})) / "
              f"sum(rate(tokenmill:e2e_request_latency_seconds_count{M}{R}))"), "E2E")], unit="s")
    b.row("KV cache and scheduler")
    b.panel("KV cache usage", "Fraction of the KV pool's blocks held by requests (1 = full).",
            [(f"max(tokenmill:kv_cache_usage_perc{M})", "used")], unit="percentunit")
    b.panel("Prefix-cache hit rate", "Prompt tokens found in the prefix cache / looked up.",
            [((f"sum(rate(tokenmill:prefix_cache_hits_total{M}{R})) / "
              f"sum(rate(tokenmill:prefix_cache_queries_total{M}{R}))"), "hit rate")],
            unit="percentunit")
    b.panel("Preemptions", "Requests whose KV blocks were taken back (recomputed later), "
            "per second.", [(f"sum(rate(tokenmill:num_preemptions_total{M}{R}))",
                             "preemptions/s")])
    b.panel("Batch size", "Sequences that produced a token in one engine step.",
            [(q("iteration_sequences", 0.5), "p50"), (q("iteration_sequences", 0.99), "p99")])
    b.panel("Engine steps", "Engine steps (schedule + forward pass) per second.",
            [(f"sum(rate(tokenmill:engine_steps_total{M}{R}))", "steps/s")])
    b.panel("KV cache blocks", "Blocks in the KV pool.",
            [(f"sum(tokenmill:num_kv_cache_blocks{M})", "blocks")], kind="stat")
    b.panel("Prompt and output lengths", "Per finished request.",
            [(q("request_prompt_tokens", 0.5), "prompt p50"),
             (q("request_prompt_tokens", 0.99), "prompt p99"),
             (q("request_generation_tokens", 0.5), "generated p50"),
             (q("request_generation_tokens", 0.99), "generated p99")], w=12)
    b.row("Cost (needs --price-per-hour)")
    b.panel("Cost per 1M tokens", "The last window's machine cost divided by the tokens of each "
            "kind served in it (views of one bill, not parts to add up).",
            [(f"tokenmill:cost_per_million_tokens_dollars{M}", "{{token_kind}}")],
            unit="currencyUSD", w=12)
    b.panel("Machine cost", "Configured price per hour, and dollars spent per hour of uptime.",
            [(f"tokenmill:price_per_hour_dollars{M}", "price per hour"),
             (f"rate(tokenmill:cost_dollars_total{M}[5m]) * 3600", "spent per hour")],
            unit="currencyUSD", w=12)
    return b.json()


def gateway():
    b = Board("tokenmill-gateway", "tokenmill gateway",
              "Prometheus metrics of `tokenmill gateway` (/metrics): requests, caches, rate "
              "limits, guardrails and each upstream replica.",
              [("tenant", "label_values(tokenmill_gateway_requests_total, tenant)", "tenant")])
    T = '{tenant=~"$tenant"}'
    b.row("Traffic")
    b.panel("Requests by status", "Answered requests per second, by HTTP status.",
            [(f"sum by (status) (rate(tokenmill_gateway_requests_total{T}{R}))", "{{status}}")],
            unit="reqps")
    b.panel("Requests by tenant", "Per second.",
            [(f"sum by (tenant) (rate(tokenmill_gateway_requests_total{T}{R}))", "{{tenant}}")],
            unit="reqps")
    b.panel("Rate-limit rejections", "429s per second, by tenant and limit.",
            [(f"sum by (tenant, limit) (rate(tokenmill_gateway_ratelimit_rejections_total{T}{R}))",
              "{{tenant}} {{limit}}")], unit="reqps")
    b.row("Caches and guardrails")
    b.panel("Cache hit rate", "Hits / lookups, per cache tier.",
            [((f'sum by (tier) (rate(tokenmill_gateway_cache_lookups_total{{result="hit"}}{R})) / '
              f"sum by (tier) (rate(tokenmill_gateway_cache_lookups_total{R}))"), "{{tier}}")],
            unit="percentunit")
    b.panel("Cache lookups", "Per second, by tier and result.",
            [(f"sum by (tier, result) (rate(tokenmill_gateway_cache_lookups_total{R}))",
              "{{tier}} {{result}}")])
    b.panel("Guardrail actions", "Per second, by rule, direction and action.",
            [((f"sum by (rule, direction, action) "
              f"(rate(tokenmill_gateway_guardrail_blocks_total{R}))"),
              "{{rule}} {{direction}} {{action}}")])
    b.row("Upstream replicas")
    b.panel("Replica routable", "1 when healthy and its circuit is closed.",
            [("tokenmill_gateway_upstream_healthy", "{{replica}}")], kind="stat")
    b.panel("Upstream latency p50 / p99", "Time to the replica's response headers.",
            [(("histogram_quantile(0.5, sum by (le, replica) "
              f"(rate(tokenmill_gateway_upstream_latency_seconds_bucket{R})))"), "{{replica}} p50"),
             (("histogram_quantile(0.99, sum by (le, replica) "
              f"(rate(tokenmill_gateway_upstream_latency_seconds_bucket{R})))"),
              "{{replica}} p99")], unit="s")
    b.panel("In flight per replica", "Requests the gateway has outstanding on each replica.",
            [("tokenmill_gateway_upstream_outstanding", "{{replica}}")])
    b.panel("Upstream errors", "Per second, by replica and kind.",
            [(f"sum by (replica, kind) (rate(tokenmill_gateway_upstream_errors_total{R}))",
              "{{replica}} {{kind}}")])
    b.panel("Time in each stage p99", "Each stage's own time (excluding the stages after it).",
            [(("histogram_quantile(0.99, sum by (le, stage) "
              f"(rate(tokenmill_gateway_stage_seconds_bucket{R})))"), "{{stage}}")], unit="s",
            w=16)
    return b.json()


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, board in [("tokenmill.json", server()), ("tokenmill-gateway.json", gateway())]:
        (here / name).write_text(json.dumps(board, indent=2) + "\n")
        print(f"wrote {here / name}: {len(board['panels'])} panels")


if __name__ == "__main__":
    main()
