"""What one server process holds: its settings, the engine once loaded, metrics, and its phase.

The engine loads in the background after the socket is open, so ``/health`` can say 503 while the
model loads; every endpoint that needs the engine goes through ``require_engine``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from tokenmill.config import EngineConfig
from tokenmill.errors import (
    EngineDeadError,
    EngineNotReadyError,
    InvalidRequestError,
    UnknownModelError,
)
from tokenmill.server.openai.tool_parsers import AUTO, PARSERS, check_parser_name
from tokenmill.server.stats_history import StatsHistory

if TYPE_CHECKING:
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.server.embedding_model import SentenceEmbeddingModel
    from tokenmill.server.metrics import ServerMetrics


@dataclass(frozen=True)
class ToolSettings:
    """How tool calls are read from free output (``tool_choice: "auto"``); its fields are
    ``tokenmill serve`` flags."""

    tool_call_parser: str = field(default=AUTO, metadata={"help": (
        "Format the model writes tool calls in: "
        f"{', '.join([AUTO, *PARSERS])}. auto picks by the chat template "
        "(<tool_call>: hermes, [TOOL_CALLS]: mistral, <|python_tag|>: llama3_json) and falls "
        "back to hermes, the format the fallback tool prompt asks for.")})
    """Format the model writes tool calls in (see ``tool_parsers``)."""

    def __post_init__(self) -> None:
        check_parser_name(self.tool_call_parser)


@dataclass(frozen=True)
class ServerSettings:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    shutdown_timeout: float = 30.0
    """Seconds running requests get to finish after SIGTERM before they are aborted."""
    price_per_hour: float | None = None
    """Dollars per hour of the machine; turns on the cost metrics."""
    cost_window_seconds: float = 60.0
    """Window of the live cost-per-million-tokens gauges."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector URL for OpenTelemetry spans; None: no spans."""
    restart_engine_on_failure: bool = False
    """If the engine dies, load a new one in place instead of exiting with status 1."""
    tools: ToolSettings = field(default_factory=ToolSettings)
    """Tool-call reading (``--tool-call-parser``)."""

    @property
    def address(self) -> str:
        if self.port == 0:  # bound after start-up: uvicorn's "Uvicorn running on" line names it
            return f"http://{self.host} on a port the OS picks (logged next)"
        return f"http://{self.host}:{self.port}"


class ServerState:
    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.history = StatsHistory()
        """What the dashboard shows; sampled by a task of the app's lifespan."""
        self.engine: AsyncLLM | None = None
        self.embedder: SentenceEmbeddingModel | None = None
        """Set instead of ``engine`` on ``--task embed``: only /v1/embeddings is served."""
        self.load_error: BaseException | None = None
        self.draining = False
        self.restarting = False
        """The engine died and a new one is loading (``restart_engine_on_failure``)."""
        self.started_at = int(time.time())

    @property
    def phase(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self.embedder is not None:
            return "draining" if self.draining else "ready"
        if self.engine is None:
            return "restarting" if self.restarting else "loading"
        if not self.engine.is_running:
            # an engine that stopped without an error was shut down (a drain's end), not killed
            return "dead" if self.engine.dead_error is not None else "stopped"
        return "draining" if self.draining else "ready"

    def require_engine(self) -> AsyncLLM:
        """The running engine, or the error that says why requests cannot be served now."""
        self.require_ready()
        if self.embedder is not None:
            raise InvalidRequestError(
                f"this server serves the embedding model {self.embedder.name!r} (--task embed): "
                "only /v1/embeddings and /v1/models answer; serve a generative model without "
                "--task embed to generate text", param="model", code="model_not_supported")
        assert self.engine is not None
        return self.engine

    @property
    def model_name(self) -> str:
        """The name clients use in ``model`` (call ``require_ready`` first)."""
        if self.embedder is not None:
            return self.embedder.name
        assert self.engine is not None
        return self.engine.model_name

    def require_ready(self) -> None:
        """Raise the error that says why nothing can be served now, if anything does."""
        phase = self.phase
        if phase == "loading":
            raise EngineNotReadyError("the model is still loading; retry in a few seconds")
        if phase == "restarting":
            raise EngineNotReadyError("the engine is restarting after an internal error; retry "
                                      "in a few seconds")
        if phase == "failed":
            raise EngineNotReadyError(f"the model failed to load: {self.load_error}")
        if phase == "dead":
            assert self.engine is not None
            raise EngineDeadError(f"the engine stopped after an internal error "
                                  f"({self.engine.dead_error!r}); the server is exiting")
        if phase in ("draining", "stopped"):
            raise EngineNotReadyError("the server is shutting down and takes no new requests")

    def check_model(self, name: str | None) -> None:
        self.require_ready()
        if name is not None and name != self.model_name:
            raise UnknownModelError(f"model {name!r} is not served here; this server serves "
                                    f"{self.model_name!r}", param="model",
                                    code="model_not_found")


def server_state(request: Request) -> ServerState:
    return request.app.state.server
