"""``tokenmill serve --ray``: the server as a Ray Serve application (docs/ray_serve.md).

Two deployments:

- ``TokenmillReplica`` (``ray_serve_replica``): one engine each, tokenmill's FastAPI app inside;
  ``num_replicas`` fixed or an ``autoscaling_config``; routed by ``TokenmillRequestRouter``.
- ``TokenmillIngress`` (``ray_serve_ingress``): the HTTP front, 0 CPUs, which reads the prompt so
  the router can use it, and retries a request whose replica died before answering.

``connect`` joins the cluster at ``--ray-address`` or starts a local one bound to 127.0.0.1;
``run`` deploys, serves on ``--host``/``--port`` through Ray's HTTP proxy, and tears the
application down on SIGTERM / Ctrl+C (Ray drains replicas: running requests finish).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from dataclasses import replace
from typing import Any

from fastapi import Request, Response

from tokenmill.distributed.ray_serve_config import RayServeSettings, require_ray
from tokenmill.errors import ConfigError
from tokenmill.server.state import ServerSettings

logger = logging.getLogger("tokenmill.ray_serve")

APP_NAME = "tokenmill"


def connect(settings: RayServeSettings, ray_init_kwargs: dict[str, Any] | None = None) -> Any:
    """Join ``settings.ray_address``, or start a local cluster on 127.0.0.1; returns ``ray``."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs = {"include_dashboard": False, "log_to_driver": False, **(ray_init_kwargs or {})}
    if settings.ray_address is None:
        kwargs.setdefault("_node_ip_address", "127.0.0.1")
        if settings.local_num_cpus is not None:
            kwargs.setdefault("num_cpus", settings.local_num_cpus)
        ray.init(**kwargs)
        return ray
    check_reachable(settings.ray_address)
    try:
        ray.init(address=settings.ray_address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise ConfigError(f"cannot join the Ray cluster at --ray-address={settings.ray_address}: "
                          f"{exc}", param="ray_address") from exc
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an address nobody answers at: ``ray.init`` would retry for minutes."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray-address={address!r} must be host:port (the head's GCS port, "
                          "e.g. 10.0.0.5:6379) or ray://host:port", param="ray_address")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at --ray-address={address}: {exc} (is "
                          "`ray start --head` running there, and the port open?)",
                          param="ray_address") from exc


def build_application(server: ServerSettings, settings: RayServeSettings) -> Any:
    """The bound Serve application (``serve.run`` it)."""
    require_ray()
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from tokenmill.distributed.ray_serve_ingress import TokenmillIngress, build_ingress_app
    from tokenmill.distributed.ray_serve_replica import TokenmillReplica
    from tokenmill.distributed.ray_serve_router import TokenmillRequestRouter

    if server.engine.num_threads is None:  # one torch thread per reserved CPU, not per core
        server = replace(server, engine=replace(
            server.engine, num_threads=max(1, int(settings.replica_num_cpus))))
    router = RequestRouterConfig(
        request_router_class=TokenmillRequestRouter,
        request_router_kwargs={
            "policy": settings.router_policy,
            "affinity_max_imbalance": settings.affinity_max_imbalance,
            "straggler_factor": settings.straggler_factor,
            "straggler_persistence": settings.straggler_persistence,
            "straggler_handling": settings.straggler_handling,
            "stats_period_s": settings.stats_period_s,
            "replica_capacity": settings.resolved_replica_capacity(
                server.engine.scheduler.max_num_seqs)},
        request_routing_stats_period_s=settings.stats_period_s,
        request_routing_stats_timeout_s=max(settings.stats_period_s, 1.0))
    replica_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.replica_num_cpus},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "health_check_period_s": settings.health_check_period_s,
        "health_check_timeout_s": max(10.0, 3 * settings.health_check_period_s),
        "graceful_shutdown_timeout_s": server.shutdown_timeout,
        "request_router_config": router,
        "user_config": settings.faults.user_config(),  # given to each replica's ``reconfigure``
    }
    autoscaling = settings.autoscaling_config()
    if autoscaling is None:
        replica_options["num_replicas"] = settings.num_replicas
    else:
        replica_options["autoscaling_config"] = autoscaling
    replica = serve.deployment(TokenmillReplica, name="TokenmillReplica", **replica_options)

    app = build_ingress_app()

    @serve.deployment(name="TokenmillIngress", num_replicas=1, max_ongoing_requests=10_000,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress(TokenmillIngress):
        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                       include_in_schema=False)
        async def proxy(self, request: Request) -> Response:
            return await self.forward(request)

        # Real classes, not the strings of ``from __future__ import annotations``: Ray's
        # class-based view re-wraps the method, and FastAPI could no longer resolve the names.
        proxy.__annotations__.update({"request": Request, "return": Response})

    return Ingress.bind(replica.bind(server), settings.straggler_probe_interval_s)


def deploy(server: ServerSettings, settings: RayServeSettings, *, host: str, port: int,
           ray_init_kwargs: dict[str, Any] | None = None) -> Any:
    """Connect (or start) Ray, start Serve's HTTP proxy on host:port, deploy; returns ``serve``."""
    connect(settings, ray_init_kwargs)
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(server, settings), name=APP_NAME, route_prefix="/")
    return serve


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM / SIGINT to leave a wait (or a deploy) and tear down."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def run(server: ServerSettings, settings: RayServeSettings, *, host: str, port: int) -> int:
    """``tokenmill serve --ray``: deploy, then wait for SIGTERM / Ctrl+C and tear down.

    Our handlers go in after ``ray.init`` (which installs one that aborts the process on SIGTERM)
    but before the deploy, so a signal while replicas load also ends in a clean teardown, exit 0.
    """
    connect(settings)
    from ray import serve

    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deploy(server, settings, host=host, port=port)
        scale = (f"autoscaling {settings.min_replicas}..{settings.max_replicas} replicas"
                 if settings.is_autoscaled else f"{settings.num_replicas} replica(s)")
        logger.info("serving on http://%s:%d through Ray Serve: %s, router %s", host, port,
                    scale, settings.router_policy)
        threading.Event().wait()  # until a signal raises _Stop
    except _Stop as stop:
        logger.info("%s: deleting the application (running requests finish first)", stop)
    finally:
        # A second signal must not cut the teardown short (it would leave Ray processes behind).
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            serve.delete(APP_NAME)
            serve.shutdown()
        finally:
            import ray

            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0
