"""`tokenmill serve`: the OpenAI-compatible server (FastAPI + uvicorn) on the engine; with
``--ray``, replicas of it on Ray Serve (``tokenmill/distributed/ray_serve.py``).

SIGTERM (or Ctrl+C) drains: new requests get 503 and the listening socket closes, running requests
get ``--shutdown-timeout`` seconds to finish, the rest are aborted, then the process exits with 0.
A second Ctrl+C forces the exit. If the engine dies, the process exits with status 1 (after failing
every request it held) unless ``--restart-engine-on-failure`` asks for a new engine in place.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.config import add_config_arguments, add_engine_arguments
    from tokenmill.distributed.ray_serve_config import add_fault_arguments, add_ray_arguments
    from tokenmill.server.state import ToolSettings

    parser = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (completions, chat, metrics).",
        description="Serve a model over the OpenAI API: /v1/completions, /v1/chat/completions, "
                    "/v1/embeddings, /v1/responses, "
                    "/v1/models, /tokenize, /detokenize, /health, /metrics.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="Seconds running requests get to finish after SIGTERM.")
    parser.add_argument("--price-per-hour", type=float, default=None,
                        help="Dollars per hour this machine costs; adds the live cost metrics "
                             "(tokenmill:cost_dollars_total, cost per 1M tokens).")
    parser.add_argument("--cost-window-seconds", type=float, default=60.0,
                        help="Window of the cost-per-million-tokens gauges.")
    parser.add_argument("--otlp-endpoint", default=None,
                        help="Send OpenTelemetry spans (request, queue, prefill, decode) to this "
                             "OTLP/HTTP collector, e.g. http://127.0.0.1:4318/v1/traces; needs "
                             "the otlp extra. Off by default.")
    parser.add_argument("--restart-engine-on-failure", action="store_true",
                        help="If the engine dies (an internal error), fail the requests it held "
                             "and load a new engine in place. Default: exit with status 1 so a "
                             "supervisor (systemd, Kubernetes) restarts the server.")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true",
                        help="Also log every HTTP request (uvicorn's access log).")
    add_config_arguments(parser, ToolSettings)
    add_engine_arguments(parser)
    add_fault_arguments(parser)
    add_ray_arguments(parser)
    parser.set_defaults(func=run)


def _make_server(config: Any, app: Any) -> Any:
    import asyncio
    import contextlib
    import signal
    import threading

    import uvicorn

    from tokenmill.server.app import begin_drain

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, but a signal first drains the engine, and is not re-raised after
        the graceful exit (uvicorn re-raises it, which would end the process with 143)."""

        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
                return
            if self.loop is not None:
                self.loop.call_soon_threadsafe(begin_drain, app)
            self.should_exit = True

    return DrainingServer(config)


def run(args: argparse.Namespace) -> int:
    import functools
    import logging
    import os

    import uvicorn

    from tokenmill.config import config_from_args, engine_config_from_args
    from tokenmill.cost import hourly_price
    from tokenmill.distributed.ray_serve_config import fault_settings_from_args
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.engine.fault_injection import StepFaultInjector
    from tokenmill.errors import ConfigError, TokenmillError
    from tokenmill.server.app import create_app
    from tokenmill.server.state import ServerSettings, ToolSettings

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout={args.shutdown_timeout} must be >= 0",
                          param="shutdown_timeout")
    if args.cost_window_seconds <= 0:
        raise ConfigError(f"--cost-window-seconds={args.cost_window_seconds} must be > 0",
                          param="cost_window_seconds")
    if args.price_per_hour is not None:
        hourly_price(args.price_per_hour)  # a bad price fails before the model loads
    settings = ServerSettings(engine=engine_config_from_args(args), host=args.host,
                              port=args.port, shutdown_timeout=args.shutdown_timeout,
                              price_per_hour=args.price_per_hour,
                              cost_window_seconds=args.cost_window_seconds,
                              otlp_endpoint=args.otlp_endpoint,
                              restart_engine_on_failure=args.restart_engine_on_failure,
                              tools=config_from_args(ToolSettings, args))
    faults = fault_settings_from_args(args)
    if args.ray:  # replicas on Ray Serve (docs/ray_serve.md)
        from tokenmill.distributed import ray_serve
        from tokenmill.distributed.ray_serve_config import ray_settings_from_args

        ray_settings = ray_settings_from_args(args)  # a bad config fails before Ray starts
        return ray_serve.run(settings, ray_settings, host=args.host, port=args.port)
    step_faults = StepFaultInjector(faults.step_delay_factor, faults.failure_rate)
    app = create_app(settings, engine_factory=functools.partial(AsyncLLM,
                                                                step_faults=step_faults))
    # The drain itself enforces --shutdown-timeout; uvicorn's own limit is only a backstop.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                            access_log=args.access_log,
                            timeout_graceful_shutdown=args.shutdown_timeout + 10)
    server = _make_server(config, app)

    def stop_after_load_failure(exc: BaseException) -> None:
        server.should_exit = True

    app.state.on_load_failure = stop_after_load_failure
    engine_deaths: list[BaseException] = []

    def exit_after_engine_death(exc: BaseException) -> None:
        engine_deaths.append(exc)
        server.should_exit = True

    app.state.on_engine_dead = exit_after_engine_death
    server.run()
    if engine_deaths:
        raise SystemExit(f"tokenmill: error: the engine died: {engine_deaths[0]!r} (see the log "
                         "above); exiting with status 1")
    error = app.state.server.load_error
    if error is None and not server.started:
        raise ConfigError(f"could not listen on {args.host}:{args.port} (see the log above)",
                          param="port")
    if isinstance(error, TokenmillError):
        raise error
    if error is not None:
        raise SystemExit(f"tokenmill: error: the model failed to load: {error!r}")
    return 0
