"""Automatic prefix caching on the real model: a shared 512-token prefix is computed once, the reuse
gives the same output as a cold run, and a different ``cache_salt`` never reuses another tenant's KV.
"""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill import SamplingParams

PREFIX_TOKENS = 512  # 32 full blocks of 16
MAX_TOKENS = 8
MIN_MARGIN = 0.1
STORY = ("The lighthouse keeper climbed the stairs every evening, counted the steps, trimmed the "
         "wick and wrote the weather in a small book. Ships passed far out at sea. ")


@pytest.fixture(scope="module")
def prefix_ids(plain_llm: Any) -> list[int]:
    ids = plain_llm.tokenizer.encode(STORY * 20, add_special_tokens=False)
    assert len(ids) >= PREFIX_TOKENS
    return ids[:PREFIX_TOKENS]


def _suffix(llm: Any, first: int) -> list[int]:
    # Counting continues predictably, so the greedy output has a clear margin.
    return llm.tokenizer.encode("\n" + ", ".join(str(i) for i in range(first, first + 8)) + ",",
                                add_special_tokens=False)


def _run_alone(llm: Any, driver: Any, prompt: list[int], name: str,
               cache_salt: str | None = None) -> tuple[Any, int]:
    """Greedy run of one prompt; returns its output and the tokens the engine computed for it."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    (request_id,) = driver.add(llm, [prompt], params, prefix=name, cache_salt=cache_salt)
    run = driver.run(llm)
    return run.final[request_id], sum(run.num_batched_tokens)


def test_shared_prefix_computes_only_the_suffix(make_llm: Any, plain_llm: Any, driver: Any,
                                                prefix_ids: list[int]) -> None:
    llm = make_llm(enable_prefix_caching=True)
    first = prefix_ids + _suffix(llm, 1)
    second = prefix_ids + _suffix(llm, 30)
    _, computed_first = _run_alone(llm, driver, first, "warm")
    assert computed_first == len(first) + MAX_TOKENS - 1, "the first request starts cold"

    hits_before = llm.engine.get_stats().prefix_cache_hits
    output, computed = _run_alone(llm, driver, second, "shared")
    assert output.num_cached_tokens == PREFIX_TOKENS
    assert llm.engine.get_stats().prefix_cache_hits - hits_before == PREFIX_TOKENS
    # Only the suffix is prefilled, then one token per decode step.
    assert computed == len(second) - PREFIX_TOKENS + MAX_TOKENS - 1

    cold, _ = _run_alone(plain_llm, driver, second, "cold")
    margins = [lp.top[0][1] - lp.top[1][1] for lp in cold.outputs[0].logprobs]
    assert min(margins) >= MIN_MARGIN, "pick a suffix whose continuation has a clear margin"
    assert output.outputs[0].token_ids == cold.outputs[0].token_ids
    assert output.outputs[0].text == cold.outputs[0].text


def test_cache_salt_isolates_tenants(make_llm: Any, driver: Any, prefix_ids: list[int]) -> None:
    llm = make_llm(enable_prefix_caching=True)
    prompt = prefix_ids + _suffix(llm, 50)
    unsalted, _ = _run_alone(llm, driver, prompt, "tenant-a")
    hits_before = llm.engine.get_stats().prefix_cache_hits
    salted, computed = _run_alone(llm, driver, prompt, "tenant-b", cache_salt="tenant-b")
    assert salted.num_cached_tokens == 0
    assert llm.engine.get_stats().prefix_cache_hits == hits_before
    assert computed == len(prompt) + MAX_TOKENS - 1, "a salted request recomputes everything"
    assert salted.outputs[0].token_ids == unsalted.outputs[0].token_ids

    # The same tenant does reuse its own KV: every full block of the prompt (and when the prompt
    # ends on a block boundary, its last block is copied so only the last token is computed).
    again, computed = _run_alone(llm, driver, prompt, "tenant-b-again", cache_salt="tenant-b")
    block_size = llm.engine.scheduler.block_manager.block_size
    whole = len(prompt) % block_size == 0
    expected = len(prompt) - 1 if whole else (len(prompt) - 1) // block_size * block_size
    assert again.num_cached_tokens == expected
    assert computed == len(prompt) - expected + MAX_TOKENS - 1
    assert again.outputs[0].token_ids == unsalted.outputs[0].token_ids


@pytest.mark.parametrize("extra_tokens", [0, 5])
def test_a_repeated_prompt_computes_only_its_last_token(make_llm: Any, plain_llm: Any,
                                                        driver: Any, prefix_ids: list[int],
                                                        extra_tokens: int) -> None:
    """A prompt found whole in the cache (block-aligned: its last block is copied) computes one
    token and continues exactly like a cold run; an unaligned one recomputes its partial block."""
    llm = make_llm(enable_prefix_caching=True)
    prompt = prefix_ids + _suffix(llm, 70)
    block_size = llm.engine.scheduler.block_manager.block_size
    prompt = prompt[: (len(prompt) - extra_tokens) // block_size * block_size + extra_tokens]
    first, _ = _run_alone(llm, driver, prompt, "first")
    again, computed = _run_alone(llm, driver, prompt, "again")
    cold, _ = _run_alone(plain_llm, driver, prompt, "cold")
    if extra_tokens == 0:
        assert again.num_cached_tokens == len(prompt) - 1
        assert computed == 1 + MAX_TOKENS - 1
    else:
        assert again.num_cached_tokens == len(prompt) // block_size * block_size
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == cold.outputs[0].token_ids
    llm.engine.scheduler.check_no_leaks()


def test_siblings_admitted_together_do_not_copy_an_unwritten_block(make_llm: Any,
                                                                   prefix_ids: list[int]) -> None:
    """n=3 of a block-aligned prompt: the siblings share the first sibling's blocks within the
    step, but its last block is not written yet, so none of them copies it; all three agree."""
    llm = make_llm(enable_prefix_caching=True)
    prompt = prefix_ids + _suffix(llm, 90)
    prompt = prompt[: len(prompt) // 16 * 16]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, n=3)
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    texts = {tuple(c.token_ids) for c in output.outputs}
    assert len(texts) == 1
    llm.engine.scheduler.check_no_leaks()
