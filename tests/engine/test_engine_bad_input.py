"""Bad input is refused with a clear tokenmill error before anything runs, and leaves nothing behind."""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill import SamplingParams
from tokenmill.errors import (
    InvalidRequestError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    TokenmillError,
)


@pytest.mark.parametrize(("values", "field", "shown"), [
    ({"temperature": -0.5}, "temperature", "-0.5"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "1.5"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"temprature": 0.5}, "temprature", "did you mean 'temperature'"),
], ids=["negative-temperature", "top_p-zero", "top_p-above-one", "max_tokens-zero",
        "unknown-field"])
def test_invalid_sampling_params_raise_before_scheduling(llm: Any, values: dict[str, Any],
                                                         field: str, shown: str) -> None:
    steps_before = llm.engine.get_stats().num_steps
    with pytest.raises(InvalidSamplingParamsError) as caught:
        llm.generate(["Hello"], SamplingParams.from_dict(values), use_tqdm=False)
    error = caught.value
    assert isinstance(error, TokenmillError) and error.status_code == 400
    assert error.param == field
    assert field in str(error) and shown in str(error)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.get_stats().num_steps == steps_before


def _numbers_in(message: str, *numbers: int) -> bool:
    return all(str(n) in message for n in numbers)


def test_prompt_plus_max_tokens_over_the_context_is_rejected(llm: Any) -> None:
    context = llm.engine.max_model_len
    prompt = [1000 + i for i in range(100)]
    steps_before = llm.engine.get_stats().num_steps
    with pytest.raises(PromptTooLongError) as caught:
        # The first prompt is fine: it must not be left running when the second is refused.
        llm.generate([[1000, 1001, 1002], prompt],
                     [SamplingParams(max_tokens=4), SamplingParams(max_tokens=context)],
                     use_tqdm=False)
    assert _numbers_in(str(caught.value), 100, context, 100 + context)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.get_stats().num_steps == steps_before


def test_request_larger_than_the_whole_pool_is_rejected(make_llm: Any) -> None:
    llm = make_llm()  # 128 MiB: fewer tokens than the model's context
    spec = llm.engine.runner.kv_spec
    max_tokens = spec.num_tokens  # fits the context, not the pool
    assert 100 + max_tokens <= llm.engine.max_model_len
    with pytest.raises(PromptTooLongError) as caught:
        llm.generate([[1000 + i for i in range(100)]], SamplingParams(max_tokens=max_tokens),
                     use_tqdm=False)
    message = str(caught.value)
    assert _numbers_in(message, 100, max_tokens, spec.num_blocks, spec.num_tokens)
    assert "kv_cache_memory" in message
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(("prompt", "shown"), [
    ([], "empty"),
    ([5, 10**9], "outside the vocabulary"),
], ids=["empty", "token-out-of-vocabulary"])
def test_bad_prompts_are_rejected(llm: Any, prompt: list[int], shown: str) -> None:
    with pytest.raises(InvalidRequestError, match=shown):
        llm.generate([prompt], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
