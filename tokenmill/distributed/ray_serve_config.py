"""``tokenmill serve --ray`` settings: replicas, autoscaling, routing, stragglers, fault injection.

Plain data, validated once (``RayServeSettings.__post_init__``), so a bad autoscaling config fails
before Ray starts. Nothing here imports Ray: ``require_ray`` does, and says what to install when
it is missing.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

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
    ray_address: str | None = None
    """An existing cluster (``ray://host:10001`` or ``host:6379``); None: start a local one."""
    num_replicas: int = 1
    min_replicas: int | None = None
    """Set (with ``max_replicas``) to autoscale instead of a fixed ``num_replicas``."""
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    autoscaling_interval_s: float = 1.0
    """How often replicas report their load to the autoscaler (Ray: metrics_interval_s)."""
    replica_num_cpus: float = 1.0
    max_ongoing_requests: int = 32
    router_policy: str = "prefix_affinity"
    affinity_max_imbalance: int = 4
    straggler_factor: float = 1.3
    straggler_persistence: int = 3
    straggler_handling: bool = True
    replica_capacity: int | None = None
    """Requests in flight at which a healthy replica counts as full, so a degraded replica gets
    the overflow; None: the engine's ``max_num_seqs`` (capped by ``max_ongoing_requests``), the
    batch a replica runs at once: below it a new request joins the running batch at almost no
    cost, above it it waits for a slot (``resolved_replica_capacity``)."""
    straggler_probe_interval_s: float = 2.0
    """Seconds between recovery probes of each degraded replica (``ray_serve_probes``)."""
    stats_period_s: float = 1.0
    """How often the router reads each replica's step times and load."""
    health_check_period_s: float = 2.0
    local_num_cpus: int | None = None
    """CPUs of a local cluster (None: Ray counts them)."""
    faults: FaultSettings = field(default_factory=FaultSettings)

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
    group.add_argument("--ray-address", default=None,
                       help="Join this Ray cluster (e.g. 10.0.0.5:6379); default: start a local "
                            "one on 127.0.0.1.")
    group.add_argument("--num-replicas", type=int, default=1,
                       help="Replicas (one engine each) when not autoscaling.")
    group.add_argument("--min-replicas", type=int, default=None,
                       help="Autoscale between --min-replicas and --max-replicas.")
    group.add_argument("--max-replicas", type=int, default=None)
    group.add_argument("--target-ongoing-requests", type=float, default=2.0,
                       help="Autoscaling target of requests in flight per replica.")
    group.add_argument("--upscale-delay-s", type=float, default=30.0,
                       help="Seconds the load must stay above target before adding a replica.")
    group.add_argument("--downscale-delay-s", type=float, default=600.0,
                       help="Seconds the load must stay below target before removing one.")
    group.add_argument("--replica-num-cpus", type=float, default=1.0,
                       help="CPUs Ray reserves per replica (also its torch threads unless "
                            "--num-threads is given).")
    group.add_argument("--max-ongoing-requests", type=int, default=32,
                       help="Requests in flight per replica before the router queues them.")
    group.add_argument("--router-policy", choices=ROUTER_POLICIES, default="prefix_affinity",
                       help="How the deployment's request router picks a replica.")
    group.add_argument("--affinity-max-imbalance", type=int, default=4,
                       help="Prefix affinity yields to the least loaded replica once the "
                            "preferred one has this many more requests in flight.")
    group.add_argument("--straggler-factor", type=float, default=1.3,
                       help="A replica whose step time for comparable batches stays above this "
                            "many times the others' median is marked degraded.")
    group.add_argument("--straggler-persistence", type=int, default=3,
                       help="Consecutive evaluations (one per --ray-stats-period-s) before a "
                            "replica is marked degraded or cleared.")
    group.add_argument("--no-straggler-handling", dest="straggler_handling",
                       action="store_false",
                       help="Still detect and report stragglers, but route as if none were.")
    group.add_argument("--replica-capacity", type=int, default=None,
                       help="Requests in flight at which a healthy replica is full: only then "
                            "does a degraded replica get requests (overflow). Default: the "
                            "engine's --max-num-seqs, at most --max-ongoing-requests.")
    group.add_argument("--straggler-probe-interval-s", type=float, default=2.0,
                       help="Seconds between recovery probes (8 greedy tokens) of each "
                            "degraded replica.")
    group.add_argument("--ray-stats-period-s", type=float, default=1.0,
                       help="How often the router reads each replica's load and step times.")
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
    return RayServeSettings(
        ray_address=args.ray_address, num_replicas=args.num_replicas,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s,
        replica_num_cpus=args.replica_num_cpus, max_ongoing_requests=args.max_ongoing_requests,
        router_policy=args.router_policy, affinity_max_imbalance=args.affinity_max_imbalance,
        straggler_factor=args.straggler_factor, straggler_persistence=args.straggler_persistence,
        straggler_handling=args.straggler_handling, stats_period_s=args.ray_stats_period_s,
        replica_capacity=args.replica_capacity,
        straggler_probe_interval_s=args.straggler_probe_interval_s,
        faults=fault_settings_from_args(args))
