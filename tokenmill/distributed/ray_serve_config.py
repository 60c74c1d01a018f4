"""``tokenmill serve --ray`` settings: replicas, autoscaling, routing, stragglers, fault injection.

Plain data, validated once (``RayServeSettings.__post_init__``), so a bad autoscaling config fails
before Ray starts. Nothing here imports Ray: ``require_ray`` does, and says what to install when
it is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from tokenmill.config import add_config_arguments, config_from_args, help_field
from tokenmill.errors import ConfigError

ROUTER_POLICIES = ("prefix_affinity", "least_loaded")
RAY_EXTRA = "pip install 'tokenmill[ray]'  (ray[serve]==2.60.0)"


def require_ray() -> Any:
    """The ``ray`` module, or a ConfigError that names the extra to install."""
    try:
        import ray
        from ray import serve  # noqa: F401 - ray without its serve extra is not enough
    except ImportError as exc:
        raise ConfigError(f"--ray needs Ray Serve, which is not installed ({exc}); install it "
                          f"with: {RAY_EXTRA}", param="ray") from exc
    return ray


@dataclass(frozen=True)
class FaultSettings:
    """``--inject-*``: slow down or fail the steps of some replicas (drills, tests)."""

    step_delay_factor: float = 1.0
    failure_rate: float = 0.0
    replica_ranks: tuple[int, ...] | None = None
    """Ray replica ranks the faults apply to (None: every replica)."""

    def applies_to(self, rank: int | None) -> bool:
        return self.replica_ranks is None or rank in self.replica_ranks

    def user_config(self) -> dict[str, Any]:
        """As the deployment's ``user_config`` (JSON: Ray compares it to spot changes)."""
        ranks = None if self.replica_ranks is None else list(self.replica_ranks)
        return {"step_delay_factor": self.step_delay_factor, "failure_rate": self.failure_rate,
                "replica_ranks": ranks}

    @classmethod
    def from_user_config(cls, config: dict[str, Any] | None) -> FaultSettings:
        config = config or {}
        ranks = config.get("replica_ranks")
        return cls(float(config.get("step_delay_factor", 1.0)),
                   float(config.get("failure_rate", 0.0)),
                   None if ranks is None else tuple(int(r) for r in ranks))


@dataclass(frozen=True)
class RayServeSettings:
    """Each field is a ``tokenmill serve`` flag (``add_ray_arguments``), help text included."""

    ray_address: str | None = help_field(
        "Join this Ray cluster (e.g. 10.0.0.5:6379 or ray://host:10001); default: start a local "
        "one on 127.0.0.1.", default=None)
    num_replicas: int = help_field("Replicas (one engine each) when not autoscaling.", default=1)
    min_replicas: int | None = help_field(
        "Autoscale between --min-replicas and --max-replicas (set both) instead of a fixed "
        "--num-replicas.", default=None)
    max_replicas: int | None = help_field("Upper bound of autoscaling.", default=None)
    target_ongoing_requests: float = help_field(
        "Autoscaling target of requests in flight per replica.", default=2.0)
    upscale_delay_s: float = help_field(
        "Seconds the load must stay above target before adding a replica.", default=30.0)
    downscale_delay_s: float = help_field(
        "Seconds the load must stay below target before removing one.", default=600.0)
    autoscaling_interval_s: float = help_field(
        "How often replicas report their load to the autoscaler (Ray's metrics_interval_s).",
        default=1.0, cli=False)
    replica_num_cpus: float = help_field(
        "CPUs Ray reserves per replica (also its torch threads unless --num-threads is given).",
        default=1.0)
    max_ongoing_requests: int = help_field(
        "Requests in flight per replica before the router queues them.", default=32)
    router_policy: str = help_field(
        f"How the deployment's request router picks a replica: {', '.join(ROUTER_POLICIES)}.",
        default="prefix_affinity")
    affinity_max_imbalance: int = help_field(
        "Prefix affinity yields to the least loaded replica once the preferred one has this many "
        "more requests in flight.", default=4)
    straggler_factor: float = help_field(
        "A replica whose step time for comparable batches stays above this many times the "
        "others' median is marked degraded.", default=1.3)
    straggler_persistence: int = help_field(
        "Consecutive evaluations (one per --ray-stats-period-s) before a replica is marked "
        "degraded or cleared.", default=3)
    straggler_handling: bool = help_field(
        "Route around degraded replicas (--no-straggler-handling: still detect and report "
        "stragglers, but route as if there were none).", default=True)
    replica_capacity: int | None = help_field(
        "Requests in flight at which a healthy replica is full: only then does a degraded replica "
        "get requests (overflow). Default: the engine's --max-num-seqs, at most "
        "--max-ongoing-requests: below it a new request joins the running batch at almost no "
        "cost, above it it waits for a slot (resolved_replica_capacity).", default=None)
    straggler_probe_interval_s: float = help_field(
        "Seconds between recovery probes (8 greedy tokens) of each degraded replica "
        "(ray_serve_probes).", default=2.0)
    stats_period_s: float = help_field(
        "How often the router reads each replica's load and step times.", default=1.0,
        flag="--ray-stats-period-s")
    health_check_period_s: float = help_field("Ray's health check period of a replica.",
                                              default=2.0, cli=False)
    local_num_cpus: int | None = help_field("CPUs of a local cluster (None: Ray counts them).",
                                            default=None, cli=False)
    faults: FaultSettings = help_field(  # noqa: RUF009 - help_field is dataclasses.field
        "--inject-* (add_fault_arguments).", default_factory=FaultSettings, cli=False)

    def __post_init__(self) -> None:
        autoscaled = self.min_replicas is not None or self.max_replicas is not None
        if autoscaled and (self.min_replicas is None or self.max_replicas is None):
            raise ConfigError("autoscaling needs both --min-replicas and --max-replicas",
                              param="min_replicas" if self.min_replicas is None
                              else "max_replicas")
        if autoscaled and self.min_replicas < 0:
            raise ConfigError(f"--min-replicas={self.min_replicas} must be >= 0",
                              param="min_replicas")
        if autoscaled and self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(f"--max-replicas={self.max_replicas} must be >= 1 and >= "
                              f"--min-replicas={self.min_replicas}", param="max_replicas")
        if self.num_replicas < 1:
            raise ConfigError(f"--num-replicas={self.num_replicas} must be >= 1",
                              param="num_replicas")
        positive = ("target_ongoing_requests", "autoscaling_interval_s", "replica_num_cpus",
                    "stats_period_s", "health_check_period_s", "straggler_probe_interval_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0",
                                  param=name)
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be "
                                  ">= 0", param=name)
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"--max-ongoing-requests={self.max_ongoing_requests} must be >= 1",
                              param="max_ongoing_requests")
        if self.router_policy not in ROUTER_POLICIES:
            raise ConfigError(f"--router-policy={self.router_policy!r} is not one of "
                              f"{', '.join(ROUTER_POLICIES)}", param="router_policy")
        if self.straggler_factor <= 1.0:
            raise ConfigError(f"--straggler-factor={self.straggler_factor} must be > 1",
                              param="straggler_factor")
        if self.straggler_persistence < 1:
            raise ConfigError(f"--straggler-persistence={self.straggler_persistence} must be "
                              ">= 1", param="straggler_persistence")
        if self.replica_capacity is not None and self.replica_capacity < 1:
            raise ConfigError(f"--replica-capacity={self.replica_capacity} must be >= 1",
                              param="replica_capacity")

    def resolved_replica_capacity(self, max_num_seqs: int) -> int:
        """``replica_capacity``, or the engine's batch size within Ray's per-replica cap."""
        if self.replica_capacity is not None:
            return self.replica_capacity
        return max(1, min(max_num_seqs, self.max_ongoing_requests))

    @property
    def is_autoscaled(self) -> bool:
        return self.min_replicas is not None

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Ray Serve's ``autoscaling_config`` (None: a fixed ``num_replicas``)."""
        if not self.is_autoscaled:
            return None
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "metrics_interval_s": self.autoscaling_interval_s,
                "look_back_period_s": max(2 * self.autoscaling_interval_s, 1.0)}


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Ray Serve (--ray)", "Run replicas of the server on Ray Serve (docs/ray_serve.md).")
    group.add_argument("--ray", action="store_true",
                       help=f"Serve through Ray Serve replicas (needs: {RAY_EXTRA}).")
    add_config_arguments(group, RayServeSettings)
    group.add_argument("--inject-replica-ranks", default=None,
                       help="With --inject-*: the replica ranks (comma-separated, e.g. 0) to "
                            "slow down or fail; default: all.")


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inject-step-delay-factor", type=float, default=1.0,
                        help="Fault injection (drills, tests): make every engine step take this "
                             "many times as long (e.g. 2.0). Default 1 (off).")
    parser.add_argument("--inject-failure-rate", type=float, default=0.0,
                        help="Fault injection: fail each engine step with this probability (the "
                             "engine dies and is restarted or replaced). Default 0 (off).")


def fault_settings_from_args(args: argparse.Namespace) -> FaultSettings:
    ranks = None
    raw = getattr(args, "inject_replica_ranks", None)
    if raw:
        try:
            ranks = tuple(int(part) for part in raw.split(","))
        except ValueError as exc:
            raise ConfigError(f"--inject-replica-ranks={raw!r} must be comma-separated integers",
                              param="inject_replica_ranks") from exc
    return FaultSettings(args.inject_step_delay_factor, args.inject_failure_rate, ranks)


def ray_settings_from_args(args: argparse.Namespace) -> RayServeSettings:
    return dataclasses.replace(config_from_args(RayServeSettings, args),
                               faults=fault_settings_from_args(args))
