"""Stragglers among the gateway's upstreams: found from their /metrics, given only overflow, and
probed until they recover.

The gateway has no view into its upstreams' engines, so a background task (``run``, every
``routing.straggler_poll_interval_s``) scrapes each replica's ``/metrics`` with a short timeout, off
the request path, and reads tokenmill's per-batch-bucket step times
(``tokenmill:engine_bucket_step_seconds`` / ``engine_bucket_steps``). The shared
``routing_policy.StragglerDetector`` (the one the Ray Serve router uses) compares each replica,
bucket by bucket, with the others' median and marks it degraded after ``straggler_persistence``
slow polls (and clears it after as many polls back in line). An upstream that is not tokenmill (no
such lines, a 404, a timeout) simply reports no buckets and is never marked.

A degraded replica takes only overflow (``Router.plan``, ``routing_policy.straggler_order``): no
user request while a healthy replica holds fewer than ``routing.replica_capacity``. Its step
times would then stop moving, so each poll first sends every degraded replica one recovery probe
(``routing_policy.probe_body``: 8 greedy tokens, header ``x-tokenmill-probe``; not routed, so no
user-traffic metric counts it) and waits for it (at most ``straggler_probe_timeout_s``) before
scraping: a probe per degraded replica per poll, never more, and none to healthy replicas. The
mark is exported as ``tokenmill_gateway_upstream_degraded{replica=...}`` (plus
``..._upstream_slowdown``, ``..._upstream_degraded_requests_total`` and
``..._upstream_probes_total``), and the detector logs one line naming the replica when it is
marked and when it recovers.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.gateway.config import RoutingSection
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.router import Replica, Router
from tokenmill.routing_policy import (
    PROBE_HEADER,
    StragglerDetector,
    StragglerPolicy,
    probe_body,
)

logger = logging.getLogger(__name__)

STEP_SECONDS = "tokenmill:engine_bucket_step_seconds"
STEPS = "tokenmill:engine_bucket_steps"
ENGINE_STEPS = "tokenmill:engine_steps_total"

Buckets = dict[int, tuple[float, int]]
"""Batch bucket -> (median step seconds, number of steps), as ``StragglerDetector.update`` takes."""


def parse_step_buckets(text: str) -> Buckets:
    """A tokenmill server's per-bucket step times from its /metrics text ({} when absent).

    A server normally runs one engine (one model label); if several label sets report the same
    bucket, the slowest is kept, so folding them never makes a replica look faster than it is."""
    seconds: dict[int, float] = {}
    counts: dict[int, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in (STEP_SECONDS, STEPS) or "batch_tokens" not in sample.labels:
                continue
            bucket = int(sample.labels["batch_tokens"])
            if sample.name == STEP_SECONDS:
                seconds[bucket] = max(seconds.get(bucket, 0.0), float(sample.value))
            else:
                counts[bucket] = max(counts.get(bucket, 0), int(sample.value))
    return {b: (s, counts.get(b, 0)) for b, s in seconds.items()}


def parse_num_steps(text: str) -> int | None:
    """A tokenmill server's cumulative engine step count (None when absent), so the detector
    judges a replica only on polls after which it ran new steps."""
    total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == ENGINE_STEPS:
                total = (total or 0) + int(sample.value)
    return total


def _parse(text: str) -> tuple[Buckets, int | None]:
    return parse_step_buckets(text), parse_num_steps(text)


class StragglerWatch:
    """Polls the router's replicas and keeps ``router.degraded`` in step with the detector."""

    def __init__(self, router: Router, section: RoutingSection, metrics: GatewayMetrics) -> None:
        self.router = router
        self.section = section
        self.metrics = metrics
        self.detector = StragglerDetector(
            StragglerPolicy(section.straggler_factor, section.straggler_persistence),
            on_change=self._on_change)
        self.num_polls = 0
        for replica in router.replicas:
            metrics.upstream_degraded.labels(replica.name).set(0)

    def _on_change(self, replica: str, degraded: bool, slowdown: float) -> None:
        # The detector has already logged the line naming the replica.
        self.metrics.upstream_degraded.labels(replica).set(1 if degraded else 0)

    async def _scrape(self, client: httpx.AsyncClient, url: str) -> tuple[Buckets, int | None]:
        try:
            resp = await client.get(url + "/metrics",
                                    timeout=self.section.straggler_poll_timeout_s)
            if resp.status_code != 200:
                return {}, None
            # Parsing a few hundred lines is cheap but not free; keep it off the event loop.
            return await asyncio.to_thread(_parse, resp.text)
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("straggler poll of %s failed: %s", url, exc)
            return {}, None

    async def _probe(self, client: httpx.AsyncClient, replica: Replica) -> None:
        models = [m for m in replica.models if "*" not in m]
        if not models:  # nothing to name in the request (its models are not known yet)
            return
        try:
            resp = await client.post(replica.url + "/v1/completions", json=probe_body(models[0]),
                                     headers={PROBE_HEADER: "straggler-recovery"},
                                     timeout=self.section.straggler_probe_timeout_s)
            outcome = "ok" if resp.status_code == 200 else "error"
        except httpx.HTTPError as exc:
            logger.info("recovery probe of %s failed: %r", replica.name, exc)
            outcome = "error"
        self.metrics.upstream_probes.labels(replica.name, outcome).inc()

    async def poll(self, client: httpx.AsyncClient) -> None:
        """One evaluation: probe the degraded replicas, scrape every replica at once, feed the
        detector, publish."""
        replicas = self.router.replicas
        if self.section.straggler_probes:
            await asyncio.gather(*(self._probe(client, r) for r in replicas
                                   if r.name in self.router.degraded))
        scraped = await asyncio.gather(*(self._scrape(client, r.url) for r in replicas))
        self.detector.update({r.name: buckets for r, (buckets, _) in zip(replicas, scraped)},
                             {r.name: steps for r, (_, steps) in zip(replicas, scraped)})
        self.num_polls += 1
        self.router.degraded = set(self.detector.degraded)
        for r in replicas:
            slowdown = self.detector.slowdown.get(r.name)
            if slowdown is not None:
                self.metrics.upstream_slowdown.labels(r.name).set(slowdown)

    async def run(self, client: httpx.AsyncClient) -> None:
        """Poll every ``straggler_poll_interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.section.straggler_poll_interval_s)
            try:
                await self.poll(client)
            except Exception:  # a poll must never end the loop (it is best-effort)
                logger.exception("straggler poll failed")
