"""Straggler-recovery probes of a Ray Serve deployment, sent by the ingress.

A degraded replica takes only overflow (``routing_policy.straggler_order``), so while the healthy
replicas have room it runs no user request, its step-time window empties, and the router could
never see it recover. Every ``interval_s`` the ingress therefore asks its router which replicas
are degraded (``probe_targets``) and calls each one's ``probe`` method (a few greedy tokens
straight on its engine, ``routing_policy.PROBE_*``) with ``probe_replica`` naming it, which the
router honours by choosing exactly that replica and counting a probe, not a request.

Bounded: one round at a time (a round waits for its probes, each cut at ``timeout_s``), so at
most one probe per degraded replica is in flight and at most one is sent per interval; healthy
replicas are never probed, and with no replica degraded a round costs a set lookup.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tokenmill.distributed.ray_serve_fleet import FleetView

logger = logging.getLogger("tokenmill.ray_serve")


async def probe_once(probe_handle: Any, replica: str, timeout_s: float) -> bool:
    """One probe to ``replica`` (its id); False when it failed or timed out (no verdict: the
    detector simply gets no fresh figures from it)."""
    try:
        await asyncio.wait_for(probe_handle.remote({"probe_replica": replica}), timeout_s)
        return True
    except Exception as exc:  # noqa: BLE001 - a probe is best-effort; the next round retries
        logger.info("recovery probe of replica %s failed: %r", replica, exc)
        return False


async def run_probes(probe_handle: Any, interval_s: float, timeout_s: float) -> None:
    """Probe the degraded replicas every ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        router = FleetView.of_this_process().router
        if router is None:  # no request routed yet: nothing is known about the replicas
            continue
        targets = router.probe_targets()
        if targets:
            await asyncio.gather(*(probe_once(probe_handle, t, timeout_s) for t in targets))
