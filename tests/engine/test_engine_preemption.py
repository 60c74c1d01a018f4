"""Preemption by recompute: a KV pool far too small for the batch still finishes every request, with
the output an unconstrained engine gives."""

from __future__ import annotations

from typing import Any

from tokenmill import SamplingParams

MAX_TOKENS = 24
MIN_MARGIN = 0.1
POOL_BLOCKS = 16  # each request needs 4-6 blocks; all 10 at once would need ~50
PROMPTS = (
    [", ".join(str(i) for i in range(start, start + 12 + 5 * start)) + "," for start in range(4)]
    + [", ".join(str(2 * i) for i in range(1, 10 + 4 * k)) + "," for k in range(3)]
    + [" ".join(f"{i}." for i in range(1, 12 + 6 * k)) for k in range(3)]
)


def test_small_pool_preempts_and_matches_unconstrained_run(make_llm: Any, plain_llm: Any) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    reference = plain_llm.generate(PROMPTS, params, use_tqdm=False)
    clear = [o.prompt for o in reference
             if min(lp.top[0][1] - lp.top[1][1] for lp in o.outputs[0].logprobs) >= MIN_MARGIN]
    assert len(clear) >= 8, "too few clear-margin prompts to compare on"
    expected = {o.prompt: o.outputs[0].token_ids for o in reference}

    bytes_per_block = plain_llm.engine.runner.kv_spec.bytes_per_block
    small = make_llm(kv_cache_memory=POOL_BLOCKS * bytes_per_block)
    assert small.engine.runner.kv_spec.num_blocks == POOL_BLOCKS
    preemptions_before = small.engine.get_stats().num_preemptions
    outputs = small.generate(PROMPTS, params, use_tqdm=False)

    assert small.engine.get_stats().num_preemptions > preemptions_before
    assert sum(o.metrics[0].num_preemptions for o in outputs) > 0, (
        "the per-request statistics should show who was preempted")
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "length"
        assert len(completion.token_ids) == MAX_TOKENS
        if output.prompt in clear:
            assert completion.token_ids == expected[output.prompt], output.prompt
