"""The step contract between the engine core and the model runner is plain data: no ``Request``, no
tensor, no grammar matcher reaches the runner or comes back from it, a request's prompt crosses
once, and a decode step costs the same to send however long the outputs have grown.

Every step of real runs (prefix-cache hits, prompt logprobs, a grammar, pooling, preemption) is
captured between the core and its executor and pickled as the multi-process executor does."""

from __future__ import annotations

import io
import pickle
from typing import Any

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler_output import RunnerOutput, SchedulerOutput
from tokenmill.structured_output.matcher import GrammarMatcher
from tokenmill.structured_output.spec import GrammarSpec

FORBIDDEN = (Request, torch.Tensor, GrammarMatcher)


class _Finder(pickle.Pickler):
    """Pickles, and notes every object of a forbidden type it meets on the way."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.found: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, FORBIDDEN):
            self.found.append(type(obj).__name__)
        return NotImplemented


def pickled(message: object) -> tuple[bytes, list[str]]:
    buffer = io.BytesIO()
    finder = _Finder(buffer)
    finder.dump(message)
    return buffer.getvalue(), finder.found


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``recorded(llm)``: a list that fills with (SchedulerOutput, RunnerOutput) of each step."""

    def record(llm: Any) -> list[tuple[SchedulerOutput, RunnerOutput]]:
        steps: list[tuple[SchedulerOutput, RunnerOutput]] = []
        executor = llm.engine.executor
        execute = executor.execute

        def recording(scheduler_output: SchedulerOutput) -> RunnerOutput:
            runner_output = execute(scheduler_output)
            steps.append((scheduler_output, runner_output))
            return runner_output

        monkeypatch.setattr(executor, "execute", recording)
        return steps

    return record


def test_no_request_tensor_or_matcher_crosses_and_prompts_cross_once(
        make_llm: Any, driver: Any, recorded: Any) -> None:
    llm = make_llm(kv_cache_memory=12 * make_llm().engine.kv_spec.bytes_per_block,
                   max_num_batched_tokens=64)
    steps = recorded(llm)
    shared = "Numbers: " + ", ".join(map(str, range(20)))  # ~60 tokens, 3 full blocks shared
    distinct = [", ".join(str(k * i) for i in range(1, 16)) for k in (2, 3, 5)]
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2)
    driver.add(llm, [shared + " and", shared + " or", *distinct], greedy, prefix="plain")
    driver.add(llm, ["Score this prompt please"],
               SamplingParams(max_tokens=2, prompt_logprobs=1), prefix="scored")
    driver.add(llm, ["Answer yes or no:"], SamplingParams(
        max_tokens=5, structured_output=GrammarSpec.choice(["yes", "no"])), prefix="grammar")
    _, prompt = llm.input_processor.tokenize_prompt("Pool this sentence.")
    children = llm.input_processor.make_requests("pooled", prompt, SamplingParams(),
                                                 pooling="mean")
    llm.engine.add_request(children[0])
    llm.output_processor.add_request("pooled", "Pool this sentence.", children)
    run = driver.run(llm)
    assert run.final["pooled"].embedding is not None
    assert llm.engine.get_stats().num_preemptions > 0, "the small pool should preempt"
    assert llm.engine.get_stats().prefix_cache_hits > 0

    sent_as_new: dict[str, int] = {}
    for scheduler_output, runner_output in steps:
        for message in (scheduler_output, runner_output):
            _, found = pickled(message)
            assert not found, f"{type(message).__name__} carries {found}"
        for new in scheduler_output.scheduled_new_requests:
            sent_as_new[new.request_id] = sent_as_new.get(new.request_id, 0) + 1
        for request_id, new_token_ids, _, _ in scheduler_output.scheduled_cached_requests:
            assert len(new_token_ids) <= 1, (request_id, new_token_ids)
    assert any(s.grammar_bitmask is not None for s, _ in steps)
    assert any(r.prompt_logprobs for _, r in steps) and any(r.pooled for _, r in steps)
    preempted = {rid for s, _ in steps for rid in s.preempted_request_ids}
    # a prompt crosses once, and once more after each preemption (it comes back as new)
    for request_id, count in sent_as_new.items():
        assert count == 1 or request_id in preempted, (request_id, count)
    assert any(count > 1 for count in sent_as_new.values())
    assert not llm.engine.runner.requests or set(llm.engine.runner.requests) <= (
        llm.engine.scheduler._finished_since_last_step), "the runner keeps finished requests"


def test_a_decode_step_costs_the_same_to_send_as_outputs_grow(make_llm: Any, driver: Any,
                                                              recorded: Any) -> None:
    llm = make_llm()
    steps = recorded(llm)
    prompt = "A long prompt, so that resending it would show: " + " ".join(["word"] * 200)
    driver.add(llm, [prompt, prompt + " again"],
               SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), prefix="grow")
    driver.run(llm)
    decode_sizes = [len(pickled(s)[0]) for s, _ in steps
                    if not s.scheduled_new_requests and len(s.num_scheduled_tokens) == 2]
    assert len(decode_sizes) > 40
    assert max(decode_sizes) - min(decode_sizes) <= 16, decode_sizes
    assert max(decode_sizes) < 1024
    first_size = len(pickled(steps[0][0])[0])
    assert first_size > 4 * max(decode_sizes)  # the prompts went once, in the first step
