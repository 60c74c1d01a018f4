"""Prometheus metrics of one gateway app, in its own registry (several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                    10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tokenmill_gateway_requests", "Requests answered, by tenant and "
                                "HTTP status.", ["tenant", "endpoint", "status"], registry=r)
        self.cache_lookups = Counter("tokenmill_gateway_cache_lookups", "Cache lookups by tier "
                                     "and result (hit/miss).", ["tier", "result"], registry=r)
        self.guardrail_blocks = Counter("tokenmill_gateway_guardrail_blocks", "Guardrail actions "
                                        "by rule, direction and action.",
                                        ["rule", "direction", "action"], registry=r)
        self.injection_scores = Histogram("tokenmill_gateway_injection_score", "Highest "
                                          "injection-detector score per scanned request or RAG "
                                          "chunk, by source (input, rag).", ["source"],
                                          buckets=(0.1, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85,
                                                   0.9, 0.95, 0.99), registry=r)
        self.ratelimit_rejections = Counter("tokenmill_gateway_ratelimit_rejections", "429s by "
                                            "tenant and limit.", ["tenant", "limit"], registry=r)
        self.upstream_latency = Histogram("tokenmill_gateway_upstream_latency_seconds", "Time to "
                                          "the upstream's response headers, by replica.",
                                          ["replica"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("tokenmill_gateway_upstream_errors", "Upstream failures by "
                                       "replica and kind.", ["replica", "kind"], registry=r)
        self.upstream_outstanding = Gauge("tokenmill_gateway_upstream_outstanding", "Requests in "
                                          "flight per replica.", ["replica"], registry=r)
        self.upstream_healthy = Gauge("tokenmill_gateway_upstream_healthy", "1 when the replica "
                                      "is routable (healthy, circuit closed).", ["replica"],
                                      registry=r)
        self.upstream_degraded = Gauge("tokenmill_gateway_upstream_degraded", "1 while the "
                                       "replica is marked a straggler (overflow only).",
                                       ["replica"], registry=r)
        self.upstream_degraded_requests = Counter(
            "tokenmill_gateway_upstream_degraded_requests", "Requests sent to a replica while it "
            "was marked degraded: overflow (every healthy replica full) or failover.",
            ["replica"], registry=r)
        self.upstream_probes = Counter("tokenmill_gateway_upstream_probes", "Straggler-recovery "
                                       "probes sent to a degraded replica, by outcome (ok, "
                                       "error).", ["replica", "outcome"], registry=r)
        self.upstream_slowdown = Gauge("tokenmill_gateway_upstream_slowdown", "Replica's step "
                                       "time / the other replicas' median, comparable batches.",
                                       ["replica"], registry=r)
        self.stage_seconds = Histogram("tokenmill_gateway_stage_seconds", "Time spent in each "
                                       "stage itself (excluding the stages after it).", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=r)

        self.shared_state_up = Gauge("tokenmill_gateway_shared_state_up", "1 while the Redis of "
                                     "shared_state answers, 0 while it is marked down (absent "
                                     "without Redis).", registry=r)
        self.shared_state_errors = Counter("tokenmill_gateway_shared_state_errors", "Redis "
                                           "calls that failed or timed out, by component.",
                                           ["component"], registry=r)
        self.shared_state_fallbacks = Counter("tokenmill_gateway_shared_state_fallbacks",
                                              "Requests that took shared_state.on_failure's path "
                                              "while Redis was down, by component and action "
                                              "(allowed, refused, skipped).",
                                              ["component", "action"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
