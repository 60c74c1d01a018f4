"""Gateway fixtures: the real embedding model (once per session), real upstream servers on
loopback, and a factory that starts a real gateway over HTTP in front of them.

``TOKENMILL_GATEWAY_UPSTREAM_URL`` points the pass-through tests at any OpenAI-compatible server
(e.g. a running ``tokenmill serve``) instead of the fake one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from tests.gateway.helpers import EXAMPLE_CONFIG, RunningGateway
from tests.gateway.upstream_server import FakeUpstream, ServerThread
from tokenmill.gateway.app import create_app
from tokenmill.gateway.config import config_from_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedder():
    from tokenmill.gateway.embeddings import load_embedder

    return load_embedder()


@pytest.fixture(scope="session")
def example_guardrails() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE_CONFIG.read_text())["guardrails"]


@pytest.fixture
def upstreams() -> Iterator[list[tuple[FakeUpstream, ServerThread]]]:
    """Two fake replicas, started; stopped after the test."""
    started = []
    for name in ("a", "b"):
        fake = FakeUpstream(name)
        started.append((fake, ServerThread(fake.app).start()))
    yield started
    for fake, server in started:
        for event in (fake.hold, fake.gate):
            if event is not None:
                event.set()
        server.stop()


@pytest.fixture
def start_gateway(embedder) -> Iterator[Callable[[dict[str, Any]], RunningGateway]]:
    running: list[RunningGateway] = []

    def start(config: dict[str, Any]) -> RunningGateway:
        app = create_app(config_from_dict(config), embedder=embedder)
        gw = RunningGateway(app, ServerThread(app).start())
        running.append(gw)
        return gw

    yield start
    for gw in running:
        gw.server.stop()


@pytest.fixture
def real_upstream_url(request) -> str:
    """TOKENMILL_GATEWAY_UPSTREAM_URL if set, else the session's real `tokenmill serve`."""
    url = os.environ.get("TOKENMILL_GATEWAY_UPSTREAM_URL")
    return url or request.getfixturevalue("tokenmill_server").url
