"""A served engine that dies: the requests it held fail at once with a clear 503-type error, the
process logs the cause and exits with status 1 (so a supervisor restarts it); with
``--restart-engine-on-failure`` it answers 503 while a new engine loads, then serves again.

The fault is injected by the engine's test hook (``TOKENMILL_INJECT_ENGINE_FAULT_AT_STEP``), a plain
``RuntimeError`` in the engine thread, not one of tokenmill's own errors."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import httpx
import pytest

from tests.server.conftest import MODEL
from tests.server_fixture import ServerProcess
from tokenmill.config import EngineConfig
from tokenmill.engine.fault_injection import FAULT_STEP_ENV
from tokenmill.errors import EngineDeadError, EngineNotReadyError
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.state import ServerSettings, ServerState
from tokenmill.sse_parser import iter_sse

BODY = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
        "ignore_eos": True}
DEADLINE_S = 120


def _stream_until_error(url: str) -> dict:
    """Stream one completion; the engine dies on its way: return the error event it ends with."""
    with httpx.stream("POST", url + "/v1/completions", json={**BODY, "stream": True},
                      timeout=DEADLINE_S) as response:
        assert response.status_code == 200
        events = [sse.data for sse in iter_sse(response)]
    errors = [json.loads(e) for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert errors, f"the stream ended without an error: {events[-3:]}"
    return errors[-1]["error"]


def test_the_process_exits_with_status_1_after_failing_what_it_held() -> None:
    server = ServerProcess(env={FAULT_STEP_ENV: "5"}).wait_ready()
    try:
        error = _stream_until_error(server.url)
        assert error["type"] == "service_unavailable"
        assert "engine stopped after an internal error" in error["message"]
        assert "fault injected" in error["message"]
        server.process.wait(DEADLINE_S)  # raises (and the test fails) if it hangs instead
    finally:
        code = server.stop()
    assert code == 1
    log = server.log()
    assert "the engine died" in log and "InjectedEngineFault" in log
    assert "exiting with status 1" in log


def test_with_restart_it_answers_503_then_serves_again() -> None:
    server = ServerProcess("--restart-engine-on-failure",
                           env={FAULT_STEP_ENV: "5"}).wait_ready()
    try:
        error = _stream_until_error(server.url)
        assert "fault injected" in error["message"]
        statuses = []
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:  # polled: the new engine takes a while to load
            health = httpx.get(server.url + "/health", timeout=10)
            statuses.append(health.status_code)
            if health.status_code == 200:
                break
            assert health.status_code == 503
            assert "restarting" in health.json()["error"]["message"]
        assert statuses[-1] == 200, statuses
        answer = httpx.post(server.url + "/v1/completions", json=BODY, timeout=DEADLINE_S)
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] == 40
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0
    assert "loading a new engine" in server.log()


def test_an_engine_stopped_by_a_clean_drain_is_not_called_dead() -> None:
    state = ServerState(ServerSettings(engine=EngineConfig()), ServerMetrics())
    state.draining = True
    state.engine = SimpleNamespace(is_running=False, dead_error=None)  # shut down, no fault
    assert state.phase == "stopped"
    with pytest.raises(EngineNotReadyError, match="shutting down") as refused:
        state.require_engine()
    assert refused.value.status_code == 503 and "internal error" not in refused.value.message


def test_a_dead_engine_turns_every_route_503_until_the_process_exits() -> None:
    """Between the death and the exit (too short to catch over HTTP above): the phase is "dead",
    and /health and every route that needs the engine answer 503 naming the cause."""
    state = ServerState(ServerSettings(engine=EngineConfig()), ServerMetrics())
    state.engine = SimpleNamespace(is_running=False,  # a fault: the engine thread has died
                                   dead_error=RuntimeError("boom in the engine thread"))
    assert state.phase == "dead"
    with pytest.raises(EngineDeadError, match="boom in the engine thread") as dead:
        state.require_engine()
    assert dead.value.status_code == 503
