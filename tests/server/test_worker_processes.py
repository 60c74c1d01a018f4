"""`tokenmill serve` with its model in worker processes (``--tensor-parallel-size 3``, or one rank
with ``--distributed-executor mp``): it answers what the in-process engine answers, and a worker
killed mid-generation fails every open request at once with a clear error, turns /health 503 and
ends the server with status 1 (or, with ``--restart-engine-on-failure``, a new engine and worker
take over); no worker process ever outlives the server, even one killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.server.conftest import MODEL
from tests.server_fixture import KV_CACHE_BYTES, ServerProcess
from tokenmill import SamplingParams
from tokenmill.sse_parser import iter_sse

MP = ("--distributed-executor", "mp")
DEADLINE_S = 60.0
PROMPTS = ["1, 2, 3, 4, 5,", "import numpy as np\nimport", "A, B, C, D,"]


def workers_of(server: ServerProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.process.pid).children(recursive=True)
            if p.name().startswith("tm-worker")]


def descendants(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children(recursive=True)


def assert_all_gone(processes: list[psutil.Process], deadline_s: float = 15.0) -> None:
    deadline = time.monotonic() + deadline_s
    alive = processes
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"left behind: {[(p.pid, p.name()) for p in alive]}")


def test_served_with_tensor_parallelism_over_three_workers_as_in_process(llm) -> None:
    """The built-in model cut over 3 ranks (3 of its 9 heads and 1 of its 3 KV heads each)
    answers what the in-process engine answers; the banner gives each rank's memory."""
    server = ServerProcess("--tensor-parallel-size", "3", "--allow-more-ranks-than-cores",
                           "--dtype", "float32").wait_ready()
    try:
        workers = workers_of(server)
        assert len(workers) == 3
        log = server.log()
        assert "3 worker process(es) ready" in log
        assert "tensor parallel over 3 ranks (all-reduce shm): each rank holds" in log
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
        expected = llm.generate(PROMPTS, params, use_tqdm=False)
        for _ in range(2):  # the second time every prompt is a prefix-cache hit
            for prompt, reference in zip(PROMPTS, expected):
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                        "ignore_eos": True, "logprobs": 1}
                answer = httpx.post(server.url + "/v1/completions", json=body, timeout=DEADLINE_S)
                assert answer.status_code == 200, answer.text
                choice = answer.json()["choices"][0]
                assert choice["text"] == reference.outputs[0].text
                ours = choice["logprobs"]["token_logprobs"]
                theirs = [lp.logprob for lp in reference.outputs[0].logprobs]
                assert ours == pytest.approx(theirs, abs=1e-4)
        embedded = httpx.post(server.url + "/v1/embeddings",
                              json={"model": MODEL, "input": ["pooled in the worker"]},
                              timeout=DEADLINE_S)
        assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) > 0
        everything = descendants(server)
    finally:
        code = server.stop()
    assert code == 0
    assert_all_gone(everything)


def _stream_until_error(server: ServerProcess, on_first_chunk=None) -> tuple[dict, float]:
    """Stream a long completion; the engine dies on its way: the error event it ends with, and
    the seconds from the first chunk (or from the start, if none came) to that error."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    started = time.monotonic()
    first_chunk_at = None
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      timeout=DEADLINE_S) as response:
        assert response.status_code == 200
        for sse in iter_sse(response):
            events.append(sse.data)
            if first_chunk_at is None:
                first_chunk_at = time.monotonic()
                if on_first_chunk is not None:
                    on_first_chunk()
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert errors, f"the stream ended without an error: {events[-3:]}"
    return errors[-1], time.monotonic() - (first_chunk_at or started)


def test_a_killed_worker_fails_open_requests_and_the_server_exits_1() -> None:
    """A worker that raises instead takes the same path (its traceback is the message):
    tests/executor/test_multi_process_executor.py checks that message."""
    server = ServerProcess(*MP, kv_cache_bytes=KV_CACHE_BYTES).wait_ready()
    try:
        (worker,) = workers_of(server)
        everything = descendants(server)

        def kill() -> None:
            os.kill(worker.pid, signal.SIGKILL)

        errors: list[tuple[dict, float]] = []
        streams = [threading.Thread(target=lambda: errors.append(_stream_until_error(server)))]
        for stream in streams:
            stream.start()
        errors.append(_stream_until_error(server, on_first_chunk=kill))
        for stream in streams:
            stream.join(DEADLINE_S)
        assert len(errors) == 2  # the other open request failed too
        for error, seconds in errors:
            assert error["type"] == "service_unavailable"
            assert f"worker rank 0 (pid {worker.pid})" in error["message"]
            assert "was killed by SIGKILL" in error["message"], error
            assert seconds < DEADLINE_S
        server.process.wait(DEADLINE_S)  # raises (and the test fails) if it hangs instead
    finally:
        code = server.stop()
    assert code == 1
    assert "exiting with status 1" in server.log()
    assert_all_gone(everything)


def test_with_restart_a_dead_worker_turns_health_503_then_a_new_one_serves() -> None:
    server = ServerProcess(*MP, "--restart-engine-on-failure").wait_ready()
    try:
        (worker,) = workers_of(server)
        os.kill(worker.pid, signal.SIGKILL)  # while idle: the health check finds it
        statuses = []
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            status = httpx.get(server.url + "/health", timeout=10).status_code
            statuses.append(status)
            if status == 503:
                break
            time.sleep(0.05)
        assert statuses[-1] == 503, statuses
        server.wait_ready(DEADLINE_S * 2)
        (new_worker,) = workers_of(server)
        assert new_worker.pid != worker.pid
        answer = httpx.post(server.url + "/v1/completions", timeout=DEADLINE_S, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 4})
        assert answer.status_code == 200
        everything = descendants(server)
        server.process.kill()  # no chance to clean up: the worker must still go with it
        server.process.wait(DEADLINE_S)
    finally:
        server.stop()
    assert_all_gone(everything)
