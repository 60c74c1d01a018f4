"""Engine fixtures: engines on the built-in model (one per configuration, shared by the session),
a manual stepping driver, and the leak check that runs after every test here.

The leak check looks only at engines that already exist (those made by ``make_llm`` and the suite's
``llm`` when the test asked for it), so the model-free scheduler and block manager tests never load
a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tokenmill.sampling_params import SamplingParams

# Small pools keep page-touching cheap; the built-in model's KV costs 45 KiB per token.
DEFAULT_KV_BYTES = 2**27

_engines: dict[tuple[tuple[str, Any], ...], Any] = {}


def _check_engine_is_idle(llm: Any) -> None:
    """No request left in the core or the frontend, every block free, every ref count zero.

    On a leak the engine is cleaned up before the error is raised, so only the guilty test fails.
    """
    scheduler = llm.engine.scheduler
    leftover = list(llm.output_processor.states)
    try:
        scheduler.check_no_leaks()
        assert not leftover, f"the frontend still tracks requests: {leftover[:10]}"
    except AssertionError:
        scheduler.finish_requests(list(scheduler.requests))
        for request_id in leftover:
            llm.output_processor.abort(request_id)
        raise


@pytest.fixture(autouse=True)
def assert_engines_do_not_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    engines = list(_engines.values())
    if "llm" in request.fixturenames:
        engines.append(request.getfixturevalue("llm"))
    for llm in engines:
        _check_engine_is_idle(llm)


@pytest.fixture(scope="session")
def make_llm() -> Callable[..., Any]:
    """``make_llm(**LLM keywords)``: one engine per distinct configuration, kept for the session.

    Every engine made here is checked for leaks after every test in tests/engine.
    """
    from tokenmill.engine.llm import LLM

    def make(**kwargs: Any) -> LLM:
        kwargs.setdefault("kv_cache_memory", DEFAULT_KV_BYTES)
        # float32 activations on the GGUF blocks unless a test asks otherwise: the same numbers
        # on every machine, whatever dtype="auto" would pick there
        kwargs.setdefault("dtype", "float32")
        key = tuple(sorted(kwargs.items()))
        if key not in _engines:
            _engines[key] = LLM(**kwargs)
        return _engines[key]

    return make


@pytest.fixture(scope="session")
def plain_llm(make_llm: Callable[..., Any]) -> Any:
    """No prefix caching, default chunking: the reference every optimisation must agree with."""
    return make_llm(enable_prefix_caching=False)


@dataclass
class SteppedRun:
    """What ``step_requests`` saw: outputs per step and the pool at its fullest."""

    final: dict[str, Any] = field(default_factory=dict)  # request id -> last RequestOutput
    deltas: dict[str, list[str]] = field(default_factory=dict)  # request id -> delta texts
    peak_used_blocks: int = 0
    num_steps: int = 0
    num_batched_tokens: list[int] = field(default_factory=list)


def add_requests(llm: Any, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams], *, prefix: str,
                 cache_salt: str | None = None) -> list[str]:
    """Admit prompts into the engine as ``LLM.generate`` does, without running it."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    request_ids = []
    for index, (prompt, p) in enumerate(zip(prompts, params_list)):
        request_id = f"{prefix}-{index}"
        text, ids = llm.input_processor.tokenize_prompt(prompt)
        children = llm.input_processor.make_requests(
            request_id, ids, p, cache_salt, grammar=llm.input_processor.compile_grammar(p))
        for child in children:
            llm.engine.add_request(child)
        llm.output_processor.add_request(request_id, text, children)
        request_ids.append(request_id)
    return request_ids


def step_once(llm: Any, run: SteppedRun) -> list[Any]:
    """One engine step through the frontend; records deltas, finals and pool usage."""
    processed = llm.output_processor.process(llm.engine.step())
    if processed.stopped_request_ids:
        llm.engine.stop_requests(processed.stopped_request_ids)
    run.num_steps += 1
    run.num_batched_tokens.append(llm.engine.get_stats().num_batched_tokens)
    run.peak_used_blocks = max(run.peak_used_blocks,
                               llm.engine.scheduler.block_manager.num_used_blocks)
    for output in processed.request_outputs:
        run.final[output.request_id] = output
        run.deltas.setdefault(output.request_id, []).append(
            "".join(c.delta_text for c in output.outputs))
    return processed.request_outputs


def step_to_completion(llm: Any, run: SteppedRun | None = None, max_steps: int = 10_000
                       ) -> SteppedRun:
    run = run or SteppedRun()
    for _ in range(max_steps):
        if not llm.engine.has_unfinished_requests():
            return run
        step_once(llm, run)
    raise AssertionError(f"the engine did not finish within {max_steps} steps")


class EngineDriver:
    """Test modules reach the stepping helpers through the ``driver`` fixture (conftest modules
    are not importable as ordinary modules)."""

    SteppedRun = SteppedRun
    add = staticmethod(add_requests)
    step = staticmethod(step_once)
    run = staticmethod(step_to_completion)


@pytest.fixture(scope="session")
def driver() -> type[EngineDriver]:
    return EngineDriver
