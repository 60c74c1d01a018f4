"""Prometheus metrics under vLLM's names with the prefix ``tokenmill:``, so dashboards and
autoscalers built for vLLM read them unchanged.

* gauges (running / waiting requests, KV usage) and the engine's cumulative counters (preemptions,
  prefix-cache queries and hits, steps) are read from ``engine.get_stats()`` when scraped, by a
  custom collector: they are never stale and cost nothing between scrapes;
* token counters and latency histograms are fed by an engine output listener, once per engine step
  on the event loop;
* everything lives in the server's own ``CollectorRegistry`` (no process-global state).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.outputs import RequestOutput
from tokenmill.models.moe_stats import ExpertLoad
from tokenmill.server.cost_metrics import CostTracker

logger = logging.getLogger(__name__)

P = "tokenmill:"
LABELS = ["model_name"]

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def one_two_five_buckets(upper: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to ``upper`` (as vLLM builds its token-count buckets)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > upper:
                return buckets
            buckets.append(float(value))
        exponent += 1


class EngineStatsCollector(Collector):
    """Gauges and cumulative counters taken from the engine's latest stats at scrape time."""

    def __init__(self, engine: AsyncLLM, cost: CostTracker | None):
        self.engine = engine
        self.cost = cost
        self.label = [engine.model_name]

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.get_stats()
        gauges = [
            ("num_requests_running", "Requests in the engine's running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
             stats.kv_cache_usage),
            ("num_kv_cache_blocks", "KV cache blocks in the pool.", stats.num_total_blocks),
        ]
        use = self.engine.step_meter.snapshot()
        window = f" over the last {use.window_s:.0f} s"
        gauges += [  # utilization (docs/ray_serve.md: stragglers)
            ("engine_step_seconds", "Mean engine step time (schedule + forward pass)" + window,
             use.mean_step_seconds),
            ("engine_tokens_per_second", "Tokens computed (prompt + generated) per second"
             + window, use.tokens_per_s),
            ("engine_batch_size", "Mean requests per engine step" + window, use.mean_batch_size),
            ("engine_utilization_perc", "Share of wall time spent in engine steps" + window
             + " (1 = always busy).", use.busy_fraction),
        ]
        counters = [
            ("num_preemptions", "Requests preempted (KV taken back, recomputed later).",
             stats.num_preemptions),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             stats.prefix_cache_hits),
            ("engine_steps", "Engine steps (schedule + forward pass).", stats.num_steps),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(P + name, doc, labels=LABELS)
            family.add_metric(self.label, value)
            yield family
        for name, doc, value in counters:
            family = CounterMetricFamily(P + name, doc, labels=LABELS)
            family.add_metric(self.label, value)
            yield family
        # Per batch bucket, so a remote router (the gateway) compares replicas on comparable
        # batches: a replica busy with long prefills is not a straggler (docs/gateway.md).
        seconds = GaugeMetricFamily(P + "engine_bucket_step_seconds", "Median engine step time "
                                    "per batch bucket (tokens in the step, rounded up to a power "
                                    "of two)" + window, labels=LABELS + ["batch_tokens"])
        steps = GaugeMetricFamily(P + "engine_bucket_steps", "Engine steps per batch bucket"
                                  + window, labels=LABELS + ["batch_tokens"])
        for bucket, (median, num_steps) in sorted(use.step_seconds_by_bucket.items()):
            seconds.add_metric(self.label + [str(bucket)], median)
            steps.add_metric(self.label + [str(bucket)], num_steps)
        yield seconds
        yield steps
        if stats.expert_load is not None:
            yield from self._expert_metrics(stats.expert_load)
        if self.cost is not None:
            yield from self._cost_metrics(self.cost)

    def _expert_metrics(self, load: ExpertLoad) -> Iterator[Metric]:
        """MoE models: a hot expert is the MoE version of a straggler (docs/moe.md)."""
        routed = CounterMetricFamily(
            P + "moe_routed_tokens", "Tokens routed to each expert of each MoE layer (token x "
            "expert assignments: a layer's experts sum to tokens x top-k).",
            labels=[*LABELS, "layer", "expert"])
        imbalance = GaugeMetricFamily(
            P + "moe_expert_load_imbalance", "Per MoE layer, max over experts / mean over "
            f"experts of the tokens routed in the latest window of >= {load.window_tokens} "
            "tokens (1 = even spread).", labels=[*LABELS, "layer"])
        for layer, row, ratio in zip(load.layer_ids, load.routed_tokens, load.imbalance,
                                     strict=True):
            for expert, count in enumerate(row):
                routed.add_metric([*self.label, str(layer), str(expert)], count)
            imbalance.add_metric([*self.label, str(layer)], ratio)
        yield routed
        yield imbalance

    def _cost_metrics(self, cost: CostTracker) -> Iterator[Metric]:
        total = CounterMetricFamily(P + "cost_dollars", "Machine cost since start-up, in dollars "
                                    "(price per hour x uptime).", labels=LABELS)
        total.add_metric(self.label, cost.dollars_total())
        yield total
        price = GaugeMetricFamily(P + "price_per_hour_dollars", "Configured machine price.",
                                  labels=LABELS)
        price.add_metric(self.label, cost.price.per_hour)
        yield price
        per_million = GaugeMetricFamily(
            P + "cost_per_million_tokens_dollars",
            f"Dollars per 1M tokens of each kind over the last {cost.window_seconds:g} s (the "
            "window's whole cost charged to that kind).", labels=[*LABELS, "token_kind"])
        for kind, value in cost.per_million().items():
            if value is not None:
                per_million.add_metric([*self.label, kind], value)
        yield per_million


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.cost: CostTracker | None = None
        self._last_output_time: dict[str, float] = {}
        self._label: list[str] | None = None

    def bind(self, engine: AsyncLLM, cost: CostTracker | None) -> None:
        """Create the metrics once the engine (and so the model name, context length) exists.

        A restarted engine (same config) is bound again: counters carry on, the gauges read it."""
        self.cost = cost
        if self._label is not None:
            self._engine_stats.engine = engine
            return
        self._label = [engine.model_name]
        r = self.registry
        tokens = one_two_five_buckets(engine.max_model_len)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed.", LABELS,
                                     registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", LABELS,
                                         registry=r)
        self.request_success = Counter(P + "request_success", "Finished requests (per choice).",
                                       [*LABELS, "finished_reason"], registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Arrival to first token.",
                              LABELS, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Gap between two outputs of a "
                             "request.", LABELS, buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram(P + "request_time_per_output_token_seconds", "Mean decode time "
                              "per output token of a finished request.", LABELS,
                              buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to finish.", LABELS,
                             buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(P + "request_queue_time_seconds", "Time in the waiting "
                                    "queue before first scheduled.", LABELS,
                                    buckets=TTFT_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram(P + "request_prompt_tokens", "Prompt length.",
                                               LABELS, buckets=tokens, registry=r)
        self.request_generation_tokens = Histogram(P + "request_generation_tokens", "Tokens "
                                                   "generated per choice.", LABELS,
                                                   buckets=tokens, registry=r)
        self.step_sequences = Histogram(P + "iteration_sequences", "Sequences that produced a "
                                        "token in one engine step (the decode batch size).",
                                        LABELS, buckets=one_two_five_buckets(1024), registry=r)
        self._engine_stats = EngineStatsCollector(engine, cost)
        r.register(self._engine_stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ engine listener
    def on_step(self, outputs: list[RequestOutput], now: float) -> None:
        if self._label is None:
            return
        label = self._label
        num_sequences = 0
        num_generated = 0
        for output in outputs:
            new_tokens = sum(len(c.delta_token_ids) for c in output.outputs)
            num_sequences += sum(1 for c in output.outputs if c.delta_token_ids)
            num_generated += new_tokens
            last = self._last_output_time.get(output.request_id)
            if last is None:
                num_prompt = len(output.prompt_token_ids)
                self.prompt_tokens.labels(*label).inc(num_prompt)
                if self.cost is not None:
                    self.cost.record(prefill=num_prompt - output.num_cached_tokens,
                                     cached=output.num_cached_tokens)
            elif new_tokens:
                self.itl.labels(*label).observe(now - last)
            self._last_output_time[output.request_id] = now
            if output.finished:
                self._last_output_time.pop(output.request_id, None)
                self._on_finished(output)
        if num_generated:
            self.generation_tokens.labels(*label).inc(num_generated)
            if self.cost is not None:
                self.cost.record(decode=num_generated)
        if num_sequences:
            self.step_sequences.labels(*label).observe(num_sequences)

    def _on_finished(self, output: RequestOutput) -> None:
        label = self._label
        assert label is not None
        self.request_prompt_tokens.labels(*label).observe(len(output.prompt_token_ids))
        for completion, stats in zip(output.outputs, output.metrics, strict=False):
            self.request_success.labels(*label, completion.finish_reason or "unknown").inc()
            num_tokens = len(completion.token_ids)
            self.request_generation_tokens.labels(*label).observe(num_tokens)
            if stats.time_to_first_token is not None:
                self.ttft.labels(*label).observe(stats.time_to_first_token)
            if stats.e2e_seconds is not None:
                self.e2e.labels(*label).observe(stats.e2e_seconds)
            if stats.queue_seconds is not None:
                self.queue_time.labels(*label).observe(stats.queue_seconds)
            if (num_tokens > 1 and stats.last_token_time is not None
                    and stats.first_token_time is not None):
                self.tpot.labels(*label).observe(
                    (stats.last_token_time - stats.first_token_time) / (num_tokens - 1))

    def record_abort(self, request_id: str) -> None:
        """A request the server aborted (client gone, shutdown) before it finished."""
        self._last_output_time.pop(request_id, None)
        if self._label is not None:
            self.request_success.labels(*self._label, "abort").inc()
