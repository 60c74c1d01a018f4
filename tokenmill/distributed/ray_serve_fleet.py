"""What the Ray Serve request routers of one process know about the engine replicas, for the
ingress's ``/ray/fleet`` (JSON) and ``/ray/metrics`` (Prometheus): each replica's utilization
(step time, tokens/s, batch size, share of time in steps, KV usage), requests in flight, slowdown
against the others and degraded mark, plus routing counters (requests routed, of them sent to a
degraded replica as overflow, recovery probes) and the degraded/recovered events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class Evaluator(Protocol):
    """What the view needs of a router (a Protocol, so this module need not import the router,
    which imports it)."""

    def evaluate(self) -> None: ...

    def probe_targets(self) -> list[str]: ...


@dataclass
class FleetView:
    """What the routers of this process know about the engine replicas."""

    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Replica id -> its latest routing stats, plus ``outstanding`` and ``degraded``."""
    routed: dict[str, int] = field(default_factory=dict)
    """Replica id -> requests routed to it (cumulative; probes not included)."""
    routed_while_degraded: dict[str, int] = field(default_factory=dict)
    """Replica id -> of those, requests sent while it was marked degraded (overflow: every
    healthy replica was full, or refused the request)."""
    probes: dict[str, int] = field(default_factory=dict)
    """Replica id -> recovery probes sent to it (``ray_serve_probes``)."""
    in_flight: dict[str, int] = field(default_factory=dict)
    """Replica id -> requests sent to it whose answer has not ended (the routers' load)."""
    num_affinity_hits: int = 0
    num_affinity_fallbacks: int = 0
    degraded_events: list[tuple[float, str, bool, float]] = field(default_factory=list)
    """(time, replica, degraded, slowdown) for each mark or clear."""
    router: Evaluator | None = None
    """The router of this process (the ingress asks it for a fresh evaluation when read)."""

    def on_sent(self, replica: str, degraded: bool = False) -> None:
        self.routed[replica] = self.routed.get(replica, 0) + 1
        self.in_flight[replica] = self.in_flight.get(replica, 0) + 1
        if degraded:
            self.routed_while_degraded[replica] = self.routed_while_degraded.get(replica, 0) + 1

    def on_probe(self, replica: str) -> None:
        self.probes[replica] = self.probes.get(replica, 0) + 1

    def on_finished(self, replica: str) -> None:
        if self.in_flight.get(replica, 0) > 0:
            self.in_flight[replica] -= 1

    def on_change(self, replica: str, degraded: bool, slowdown: float) -> None:
        self.degraded_events.append((time.time(), replica, degraded, slowdown))

    @classmethod
    def of_this_process(cls) -> FleetView:
        """The process's view, kept on this class: Ray pickles the router's module by value
        (``RequestRouterConfig``), so a global there would be a copy per unpickling; this module
        and its class are pickled by reference, so every user gets the same object."""
        view = cls.__dict__.get("_view")
        if view is None:
            view = cls()
            cls._view = view
        return view


def fleet_snapshot(view: FleetView) -> dict[str, Any]:
    if view.router is not None:
        view.router.evaluate()
    return {"replicas": view.replicas, "routed": view.routed,
            "routed_while_degraded": view.routed_while_degraded, "probes": view.probes,
            "affinity_hits": view.num_affinity_hits,
            "affinity_fallbacks": view.num_affinity_fallbacks,
            "degraded_events": view.degraded_events}


def render_fleet_metrics(view: FleetView) -> bytes:
    snapshot = fleet_snapshot(view)
    gauges = {
        "replica_step_seconds": ("mean_step_seconds", "Mean engine step time of the replica."),
        "replica_tokens_per_second": ("tokens_per_s", "Tokens computed per second."),
        "replica_batch_size": ("mean_batch_size", "Mean requests per engine step."),
        "replica_utilization_perc": ("busy_fraction", "Share of wall time in engine steps."),
        "replica_kv_cache_usage_perc": ("kv_cache_usage", "Fraction of KV blocks in use."),
        "replica_requests_in_flight": ("outstanding", "Requests routed and not completed."),
        "replica_slowdown": ("slowdown", "Step time / the others' median, comparable batches."),
        "replica_degraded": ("degraded", "1 while the replica is marked a straggler."),
    }
    lines = []
    for metric, (stat, doc) in gauges.items():
        name = f"tokenmill:{metric}"
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} gauge"]
        for replica, stats in sorted(snapshot["replicas"].items()):
            value = stats.get(stat)
            if value is not None:
                lines.append(f'{name}{{replica="{replica}"}} {float(value)}')
    name = "tokenmill:replica_routed_requests_total"
    lines += [f"# HELP {name} Requests the router sent to each replica.",
              f"# TYPE {name} counter"]
    lines += [f'{name}{{replica="{r}"}} {n}' for r, n in sorted(snapshot["routed"].items())]
    counters = {
        "replica_overflow_requests_total": (
            "routed_while_degraded", "Of those, requests sent while it was degraded (overflow)."),
        "replica_probes_total": ("probes", "Straggler-recovery probes sent to the replica."),
    }
    for metric, (key, doc) in counters.items():
        name = f"tokenmill:{metric}"
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
        lines += [f'{name}{{replica="{r}"}} {n}' for r, n in sorted(snapshot[key].items())]
    return ("\n".join(lines) + "\n").encode()
