"""`tokenmill gateway --config FILE` runs the gateway; `... gateway keys create` makes a key."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="OpenAI-compatible gateway: keys, quotas, guardrails, caches, RAG, routing.",
        description="Run the gateway in front of one or more OpenAI-compatible servers.")
    parser.add_argument("--config", help="Gateway config file (.yaml or .toml).")
    parser.add_argument("--host", default=None, help="Override server.host of the config.")
    parser.add_argument("--port", type=int, default=None, help="Override server.port.")
    parser.add_argument("--otlp-endpoint", default=None,
                        help="Override server.otlp_endpoint: send OpenTelemetry spans to this "
                             "OTLP/HTTP collector (off by default).")
    parser.add_argument("--redis-url", default=None,
                        help="Override shared_state.redis_url: keep rate limits, quotas and the "
                             "exact cache in this Redis, shared by every gateway process using "
                             "it (redis://host:port/db or unix:///path.sock).")
    parser.set_defaults(func=run_gateway)
    sub = parser.add_subparsers(dest="gateway_command", metavar="SUBCOMMAND")
    keys = sub.add_parser("keys", help="Manage API keys.")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = keys_sub.add_parser("create", help="Make a new API key; prints it once with the hash "
                                 "line to put in the tenant's api_key_hashes.")
    create.add_argument("--tenant", required=True, help="Tenant the key is for.")
    create.set_defaults(func=create_key)


def create_key(args: argparse.Namespace) -> int:
    from tokenmill.gateway.auth import hash_api_key, new_api_key

    key = new_api_key()
    print(f"API key for tenant {args.tenant!r} (shown only now; store it safely):")
    print(f"  {key}")
    print("Add this line under the tenant's api_key_hashes in the gateway config:")
    print(f'  - "{hash_api_key(key)}"')
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    from tokenmill.errors import ConfigError

    if not args.config:
        raise ConfigError("tokenmill gateway needs --config FILE (see examples/gateway.yaml)",
                          param="config")
    import dataclasses
    import os

    import uvicorn

    from tokenmill.gateway.app import create_app
    from tokenmill.gateway.config import load_config
    from tokenmill.gc_policy import freeze_long_lived_objects

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_config(args.config)
    server = dataclasses.replace(config.server, host=args.host or config.server.host,
                                 port=config.server.port if args.port is None else args.port,
                                 otlp_endpoint=args.otlp_endpoint or config.server.otlp_endpoint)
    shared_state = dataclasses.replace(
        config.shared_state, redis_url=args.redis_url or config.shared_state.redis_url)
    config = dataclasses.replace(config, server=server, shared_state=shared_state)
    app = create_app(config)
    freeze_long_lived_objects()  # the embedding model, detector, caches: skipped by full GCs
    uvicorn.run(app, host=server.host, port=server.port, log_level="info")
    return 0
