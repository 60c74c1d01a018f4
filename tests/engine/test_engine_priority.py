"""``LLM.generate(priority=...)`` on the real engine: prompts that do not fit in one step start in
priority order (lower first), and outputs still come back in the order of the prompts."""

from __future__ import annotations

import pytest

from tokenmill.sampling_params import SamplingParams


def test_generate_starts_prompts_in_priority_order(llm) -> None:
    # 512-token prompts fill the default 512-token step budget: one new prompt starts per step.
    prompts = [list(range(1000 + 600 * i, 1512 + 600 * i)) for i in range(3)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False,
                           priority=[1, 0, -1])
    assert [o.prompt_token_ids for o in outputs] == prompts
    started = [o.metrics[0].first_scheduled_time for o in outputs]
    assert started[2] < started[1] < started[0]


def test_one_priority_per_prompt_or_one_for_all(llm) -> None:
    with pytest.raises(ValueError, match="2 priorities for 3 prompts"):
        llm.generate(["a", "b", "c"], use_tqdm=False, priority=[0, 1])
    [output] = llm.generate("a", SamplingParams(max_tokens=1), use_tqdm=False, priority=-3)
    assert output.finished
