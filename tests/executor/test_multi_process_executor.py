"""The multi-process executor on the built-in model, with real worker processes: the same greedy
tokens and log probabilities as in process (preemption and prefix-cache hits included), and a
worker that is killed, raises, or hangs fails the engine loudly within a bounded time, leaving
no process behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from tokenmill import SamplingParams
from tokenmill.engine.fault_injection import WORKER_FAULT_STEP_ENV
from tokenmill.engine.llm import LLM
from tokenmill.errors import WorkerFailedError

POOL_BLOCKS = 12  # small: the batch below is preempted
SHARED = "Numbers: " + ", ".join(map(str, range(20)))
PROMPTS = [SHARED + " and", SHARED + " or",
           *(", ".join(str(k * i) for i in range(1, 16)) for k in (2, 3, 5))]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
FAILURE_DEADLINE_S = 30.0
"""A failed worker must fail the engine well within this (the step timeout is not involved)."""


def make_llm(**kwargs: Any) -> LLM:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("kv_cache_memory", 2**26)
    return LLM(**kwargs)


def worker_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            and p.name().startswith("tm-worker")]


def assert_gone(pids: list[int], deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    alive = pids
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"worker processes {alive} outlived their engine")


@pytest.fixture(scope="module")
def in_process_llm() -> Iterator[LLM]:
    with make_llm() as llm:
        yield llm


@pytest.fixture(scope="module")
def bytes_per_block(in_process_llm: LLM) -> int:
    return in_process_llm.engine.kv_spec.bytes_per_block


def test_one_rank_in_worker_process_matches_in_process(bytes_per_block: int) -> None:
    pool = POOL_BLOCKS * bytes_per_block
    scored = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    results = {}
    for executor in ("inprocess", "mp"):
        with make_llm(kv_cache_memory=pool, max_num_batched_tokens=64,
                      distributed_executor=executor) as llm:
            outputs = llm.generate(PROMPTS + ["Score this prompt"], [GREEDY] * len(PROMPTS)
                                   + [scored], use_tqdm=False)
            stats = llm.engine.get_stats()
            assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0, stats
            if executor == "mp":
                (pid,) = llm.engine.executor.worker_pids
                assert pid != os.getpid() and [p.pid for p in worker_processes()] == [pid]
            results[executor] = [(o.outputs[0].token_ids, o.outputs[0].logprobs,
                                  o.prompt_logprobs) for o in outputs]
        if executor == "mp":
            assert_gone([pid])
    for ours, theirs in zip(results["mp"], results["inprocess"]):
        assert ours[0] == theirs[0]
        assert _same_logprobs(ours[1], theirs[1])
        assert _same_logprobs(ours[2], theirs[2])


def _same_logprobs(ours: Any, theirs: Any) -> bool:
    if ours is None or theirs is None:
        return ours is theirs
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if a is None or b is None:
            assert a is b
            continue
        assert (a.token_id, a.rank) == (b.token_id, b.rank)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    return True


@pytest.fixture
def mp_llm(request: pytest.FixtureRequest) -> Iterator[LLM]:
    llm = make_llm(distributed_executor="mp", **getattr(request, "param", {}))
    pids = list(llm.engine.executor.worker_pids)
    try:
        yield llm
    finally:
        llm.shutdown()
        assert_gone(pids)
        assert not worker_processes()


def generate_until_failure(llm: LLM) -> tuple[WorkerFailedError, float]:
    started = time.monotonic()
    with pytest.raises(WorkerFailedError) as failure:
        llm.generate(PROMPTS, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
                     use_tqdm=False)
    return failure.value, time.monotonic() - started


def assert_dead_for_good(llm: LLM) -> None:
    """Requests were aborted (no block leaked), and the engine refuses to go on."""
    llm.engine.scheduler.check_no_leaks()
    with pytest.raises(WorkerFailedError):
        llm.engine.check_health()
    started = time.monotonic()
    with pytest.raises(WorkerFailedError):
        llm.generate(["again"], GREEDY, use_tqdm=False)
    assert time.monotonic() - started < 5.0
    llm.engine.scheduler.check_no_leaks()


def test_a_killed_worker_fails_the_engine_at_once(mp_llm: LLM) -> None:
    (pid,) = mp_llm.engine.executor.worker_pids
    execute = mp_llm.engine.executor.execute
    num_steps = 0

    def kill_during_third_step(scheduler_output: Any) -> Any:
        nonlocal num_steps
        num_steps += 1
        if num_steps == 3:  # while the worker computes it (or just after)
            threading.Timer(0.02, os.kill, (pid, signal.SIGKILL)).start()
        return execute(scheduler_output)

    mp_llm.engine.executor.execute = kill_during_third_step
    error, seconds = generate_until_failure(mp_llm)
    assert seconds < FAILURE_DEADLINE_S
    assert f"worker rank 0 (pid {pid}) was killed by SIGKILL" in str(error), error
    assert_gone([pid])
    assert_dead_for_good(mp_llm)


def test_a_worker_killed_while_idle_is_found_by_the_health_check(mp_llm: LLM) -> None:
    (pid,) = mp_llm.engine.executor.worker_pids
    mp_llm.engine.check_health()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + FAILURE_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            mp_llm.engine.check_health()
        except WorkerFailedError as error:
            assert "while the engine was idle" in str(error)
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the health check never noticed the dead worker")
    assert_dead_for_good(mp_llm)


def test_a_worker_ignores_signals_sent_to_the_whole_process_group(mp_llm: LLM) -> None:
    """Ctrl+C in a terminal, or SIGTERM to the process group, reaches the workers too: they must
    outlive it so the server can drain its running requests, then stop them itself."""
    (pid,) = mp_llm.engine.executor.worker_pids
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    outputs = mp_llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids
    mp_llm.engine.check_health()
    assert psutil.Process(pid).is_running()


def test_a_worker_that_raises_fails_the_engine_with_its_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_FAULT_STEP_ENV, "3")  # read by the worker process it spawns
    with make_llm(distributed_executor="mp") as llm:
        (pid,) = llm.engine.executor.worker_pids
        error, seconds = generate_until_failure(llm)
        assert seconds < FAILURE_DEADLINE_S
        message = str(error)
        assert f"worker rank 0 (pid {pid}) failed during a step" in message
        assert "InjectedEngineFault: fault injected in the model worker at step 3" in message
        assert_gone([pid])
        assert_dead_for_good(llm)


def test_a_hung_worker_is_declared_dead_after_the_step_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_FAULT_STEP_ENV, "2:hang")
    with make_llm(distributed_executor="mp", worker_step_timeout=2.0) as llm:
        (pid,) = llm.engine.executor.worker_pids
        error, seconds = generate_until_failure(llm)
        assert 2.0 <= seconds < 2.0 + FAILURE_DEADLINE_S
        assert "did not answer during a step within 2 s (worker_step_timeout)" in str(error)
        assert_gone([pid])  # killed, not left sleeping
        assert_dead_for_good(llm)


def test_bad_parallel_config_is_refused_with_the_value() -> None:
    from tokenmill.config import ParallelConfig
    from tokenmill.errors import ConfigError

    with pytest.raises(ConfigError, match="tensor_parallel_size=0"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="distributed_executor='threads'"):
        ParallelConfig(distributed_executor="threads")
    with pytest.raises(ConfigError, match="tensor_parallel_size=2"):
        ParallelConfig(distributed_executor="inprocess", tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="worker_step_timeout=0"):
        ParallelConfig(worker_step_timeout=0)
    assert ParallelConfig(tensor_parallel_size=2).uses_worker_processes
    assert not ParallelConfig().uses_worker_processes
