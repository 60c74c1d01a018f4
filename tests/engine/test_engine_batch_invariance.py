"""Batch invariance: 32 mixed-length prompts generated together give, token for token, what each
gives alone, whether prefix caching is on or off and when every prompt is prefilled in chunks.

Only prompts with a clear margin are compared: batched and single matmuls differ in the last bits,
which can flip a near-tie. The margin (top-1 minus top-2 logprob, i.e. logit) comes from the
engine's own logprobs in the alone run; >= 0.1 is about a thousand times that noise.
"""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill import SamplingParams

MAX_TOKENS = 12
MIN_MARGIN = 0.1
CHUNK = 16  # shorter than the shortest prompt, so every prompt is prefilled in several chunks
SYSTEM = ("<|im_start|>system\nYou are a careful assistant. Answer briefly and precisely, "
          "and never make anything up.<|im_end|>\n")
QUESTIONS = ["List the planets of the solar system.", "Name three primary colours.",
             "What is the capital of Italy?", "Write a Python function that adds two numbers."]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _prompts() -> list[str]:
    """32 prompts of 24 to 250 tokens; four chat prompts share a 2-block system prefix."""
    prompts = []
    for start in range(6):
        prompts.append(", ".join(str(i) for i in range(start, start + 10 + 9 * start)) + ",")
    for k in range(1, 5):
        prompts.append(", ".join((MONTHS * k)[: 5 + 7 * k]) + ",")
    for k in range(2, 5):
        prompts.append(", ".join((DAYS * k)[: 4 + 6 * k]) + ",")
    for k in range(1, 5):
        prompts.append(", ".join(str(2 * i) for i in range(1, 8 + 10 * k)) + ",")
    for k in range(1, 4):
        prompts.append(", ".join(str(i) for i in range(100, 90 - 12 * k, -1)) + ",")
    for k in range(3, 5):
        prompts.append("The cat sat on the mat. " * (2 * k) + "The cat")
    for k in range(1, 4):
        prompts.append(" ".join(f"{i}." for i in range(1, 6 + 8 * k)))
    for question in QUESTIONS:
        prompts.append(f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    for count in range(5, 8):
        lines = [f"def f{i}(x):\n    return x + {i}\n" for i in range(1 + count)]
        prompts.append("import math\n\n" + "\n".join(lines) + f"\ndef f{count + 1}(x):\n")
    return prompts


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def alone(plain_llm: Any) -> dict[str, tuple[list[int], float]]:
    """Each prompt alone on the reference engine: greedy tokens and the smallest top-2 margin."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=2)
    results = {}
    for prompt in PROMPTS:
        completion = plain_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        margin = min(lp.top[0][1] - lp.top[1][1] for lp in completion.logprobs)
        results[prompt] = (completion.token_ids, margin)
    return results


@pytest.fixture(scope="module")
def clear_prompts(alone: dict[str, tuple[list[int], float]]) -> list[str]:
    clear = [p for p, (_, margin) in alone.items() if margin >= MIN_MARGIN]
    assert len(clear) >= 24, f"only {len(clear)} of {len(PROMPTS)} prompts have a clear margin"
    return clear


def test_prompts_are_mixed_length_and_chunked(plain_llm: Any) -> None:
    lengths = [len(plain_llm.tokenizer.encode(p)) for p in PROMPTS]
    assert len(PROMPTS) == 32
    assert min(lengths) > CHUNK, "every prompt must need more than one chunk"
    assert max(lengths) >= 4 * min(lengths)


@pytest.mark.parametrize("engine_kwargs", [
    {"enable_prefix_caching": True},
    {"enable_prefix_caching": False},
    {"enable_prefix_caching": True, "max_num_batched_tokens": CHUNK},
], ids=["prefix-cache-on", "prefix-cache-off", f"chunked-{CHUNK}"])
def test_batch_equals_alone(make_llm: Any, alone: dict[str, tuple[list[int], float]],
                            clear_prompts: list[str], engine_kwargs: dict[str, Any]) -> None:
    llm = make_llm(**engine_kwargs)
    stats_before = llm.engine.get_stats()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)  # all 32 share the batch
    by_prompt = {o.prompt: o.outputs[0].token_ids for o in outputs}
    mismatched = [p for p in clear_prompts if by_prompt[p] != alone[p][0]]
    assert not mismatched, f"batched output differs from alone for {mismatched}"

    stats = llm.engine.get_stats()
    hits = stats.prefix_cache_hits - stats_before.prefix_cache_hits
    if engine_kwargs["enable_prefix_caching"]:
        assert hits > 0, "the shared system prompt should have been served from the cache"
    else:
        assert hits == 0
