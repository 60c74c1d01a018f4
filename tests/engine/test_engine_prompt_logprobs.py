"""Prompt log probabilities (``prompt_logprobs``; the server's echo + logprobs) equal the model's
own log-softmax at each prompt position, whole or chunked, on a prefix-cache hit, with preemption
by recompute, and with ``max_tokens=0`` (score only)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenmill.errors import PromptTooLongError
from tokenmill.layers.attention import causal_metadata
from tokenmill.sampling_params import SamplingParams

PROMPT = ("The quick brown fox jumps over the lazy dog. Then it ran into the forest, where "
          "an old owl was telling stories to the young rabbits about the winter of the great "
          "snow, when the river froze and the deer walked across it.")


def reference_logprobs(llm: Any, ids: list[int]) -> torch.Tensor:
    """Row p: the model's log-softmax after ``ids[: p + 1]``, from one direct forward pass."""
    model = llm.engine.runner.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), causal_metadata([len(ids)]))
        return torch.log_softmax(model.compute_logits(hidden), dim=-1)


def check_prompt_logprobs(llm: Any, ids: list[int], entries: list[Any], num_top: int) -> None:
    assert len(entries) == len(ids) and entries[0] is None
    reference = reference_logprobs(llm, ids)
    for position, entry in enumerate(entries[1:], start=1):
        row = reference[position - 1]
        token = ids[position]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token].item(), abs=2e-3)
        # ranks of near-ties may swap within the tolerance
        assert (int((row > row[token] + 1e-3).sum()) + 1 <= entry.rank
                <= int((row > row[token] - 1e-3).sum()) + 1)
        assert len(entry.top) == num_top
        if num_top:
            assert entry.top[0][1] == pytest.approx(row.max().item(), abs=2e-3)


@pytest.mark.parametrize("budget", [512, 16], ids=["whole", "chunked"])
def test_prompt_logprobs_match_a_direct_forward_pass(make_llm: Any, budget: int) -> None:
    llm = make_llm(max_num_batched_tokens=budget)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3)
    [output] = llm.generate([PROMPT], params, use_tqdm=False)
    ids = output.prompt_token_ids
    assert len(ids) > 2 * 16, "the prompt must span several chunks of 16"
    check_prompt_logprobs(llm, ids, output.prompt_logprobs, 3)
    # the completion is what it would be without prompt logprobs
    [plain] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3),
                           use_tqdm=False)
    assert output.outputs[0].token_ids == plain.outputs[0].token_ids


def test_prefix_cache_hit_is_not_used_for_scored_positions(make_llm: Any) -> None:
    llm = make_llm(max_num_batched_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([PROMPT], params, use_tqdm=False)  # fills the prefix cache
    [again] = llm.generate([PROMPT], params, use_tqdm=False)
    assert again.num_cached_tokens > 0, "the prompt must be in the prefix cache"
    [scored] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1,
                                                     prompt_logprobs=0), use_tqdm=False)
    check_prompt_logprobs(llm, scored.prompt_token_ids, scored.prompt_logprobs, 0)


def test_max_tokens_zero_scores_the_prompt_only(make_llm: Any) -> None:
    llm = make_llm(max_num_batched_tokens=16)
    [output] = llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=1),
                            use_tqdm=False)
    completion = output.outputs[0]
    assert completion.token_ids == [] and completion.text == ""
    assert completion.finish_reason == "length"
    check_prompt_logprobs(llm, output.prompt_token_ids, output.prompt_logprobs, 1)


def test_streamed_outputs_carry_the_prompt_scores_once(make_llm: Any, driver: Any) -> None:
    llm = make_llm(max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2, n=2)
    (request_id,) = driver.add(llm, [PROMPT], params, prefix="plp-stream")
    seen = []
    run = driver.SteppedRun()
    while llm.engine.has_unfinished_requests():
        for output in driver.step(llm, run):
            if output.prompt_logprobs is not None and not output.finished:
                seen.append(output.prompt_logprobs)
    final = run.final[request_id]
    assert len(seen) == 1 and seen[0] is final.prompt_logprobs
    check_prompt_logprobs(llm, final.prompt_token_ids, final.prompt_logprobs, 2)


def test_preempted_prompt_is_scored_once(make_llm: Any) -> None:
    # A pool of a few blocks: the two requests cannot both hold their prompts, so the younger
    # one is preempted mid-prompt and recomputes it.
    llm = make_llm(max_num_batched_tokens=16, kv_cache_memory=46 * 2**10 * 16 * 5)
    ids = llm.tokenizer.encode(PROMPT)[:40]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1)
    outputs = llm.generate([ids, ids[::-1]], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the test must preempt"
    for output in outputs:
        check_prompt_logprobs(llm, output.prompt_token_ids, output.prompt_logprobs, 1)


def test_prompt_logprobs_are_bounded(make_llm: Any) -> None:
    llm = make_llm(max_num_batched_tokens=512, max_prompt_logprobs_len=8)
    with pytest.raises(PromptTooLongError, match=r"at most 8 tokens.*max_prompt_logprobs_len") \
            as info:
        llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)
    assert info.value.param == "prompt_logprobs"
