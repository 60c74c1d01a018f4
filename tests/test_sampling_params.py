"""SamplingParams: defaults, normalisation, and a clear error naming the field for each bad value."""

from __future__ import annotations

import dataclasses

import pytest

from tokenmill.errors import InvalidRequestError, InvalidSamplingParamsError
from tokenmill.sampling_params import SamplingParams


def test_defaults_follow_vllm() -> None:
    params = SamplingParams()
    assert params.n == 1 and params.temperature == 1.0 and params.top_p == 1.0
    assert params.top_k == 0 and params.max_tokens == 16 and params.stop == []
    assert not params.is_greedy


@pytest.mark.parametrize("temperature,greedy", [(0, True), (0.0, True), (1e-7, True), (0.7, False)])
def test_is_greedy(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_normalisation() -> None:
    params = SamplingParams(stop="###", top_k=-1, temperature=1, logit_bias={"50256": -100},
                            max_tokens=32.0)
    assert params.stop == ["###"]
    assert params.top_k == 0
    assert isinstance(params.temperature, float)
    assert params.logit_bias == {50256: -100.0}
    assert params.max_tokens == 32 and isinstance(params.max_tokens, int)
    assert SamplingParams(max_tokens=None).max_tokens is None


BAD_VALUES = [
    ("temperature", -0.5, ">= 0"),
    ("temperature", "hot", ">= 0"),
    ("temperature", float("nan"), ">= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_k", -2, ">= 1"),
    ("top_k", 2.5, ">= 1"),
    ("min_p", 1.5, "[0, 1]"),
    ("n", 0, "[1, 128]"),
    ("n", 129, "[1, 128]"),  # OpenAI's limit: a huge n would stall admission
    ("n", True, "[1, 128]"),
    ("max_tokens", 0, "with prompt_logprobs"),
    ("max_tokens", -1, ">= 1"),
    ("max_tokens", "16", ">= 1"),
    ("prompt_logprobs", 21, "[0, 20]"),
    ("min_tokens", -1, ">= 0"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("frequency_penalty", -3, "[-2, 2]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("logit_bias", {5: 101}, "[-100, 100]"),
    ("logit_bias", {"word": 1.0}, "token ids"),
    ("logit_bias", [1, 2], "mapping"),
    ("stop", 5, "string"),
    ("stop", ["ok", ""], "non-empty"),
    ("stop_token_ids", [1, -2], "token ids"),
    ("stop_token_ids", "2", "list"),
    ("logprobs", 21, "[0, 20]"),
    ("logprobs", -1, "[0, 20]"),
    ("seed", "abc", "integer"),
    ("ignore_eos", "yes", "true or false"),
    ("skip_special_tokens", 1, "true or false"),
]


@pytest.mark.parametrize("field,value,allowed", BAD_VALUES,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_each_bad_field_is_named(field: str, value: object, allowed: str) -> None:
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**{field: value})
    error = info.value
    assert error.param == field
    assert field in error.message and allowed in error.message
    # The offending value appears, so the user can find it in their request.
    offending = value
    if isinstance(value, dict):
        offending = next(iter(value.values())) if field == "logit_bias" and 5 in value else "word"
    elif isinstance(value, list):
        offending = value[-1]
    assert (repr(offending) if isinstance(offending, str) else str(offending)) in error.message
    assert isinstance(error, InvalidRequestError) and error.status_code == 400


def test_min_tokens_over_max_tokens() -> None:
    with pytest.raises(InvalidSamplingParamsError, match=r"min_tokens.*max_tokens \(8\).*10") as info:
        SamplingParams(max_tokens=8, min_tokens=10)
    assert info.value.param == "min_tokens"
    assert SamplingParams(max_tokens=None, min_tokens=10).min_tokens == 10


def test_from_dict_accepts_known_keys() -> None:
    params = SamplingParams.from_dict({"temperature": 0, "max_tokens": 5, "stop": ["\n"]})
    assert params.is_greedy and params.max_tokens == 5 and params.stop == ["\n"]


def test_from_dict_rejects_unknown_key_by_name() -> None:
    with pytest.raises(InvalidSamplingParamsError, match="'temprature'.*'temperature'") as info:
        SamplingParams.from_dict({"temprature": 0.5})
    assert info.value.param == "temprature"
    with pytest.raises(InvalidSamplingParamsError, match="'best_of'"):
        SamplingParams.from_dict({"best_of": 2})
    with pytest.raises(InvalidSamplingParamsError, match="mapping"):
        SamplingParams.from_dict(["temperature"])  # type: ignore[arg-type]


def test_frozen_and_replace_revalidates() -> None:
    params = SamplingParams(n=4, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.n = 1  # type: ignore[misc]
    child = dataclasses.replace(params, n=1, seed=2)
    assert child.n == 1 and child.seed == 2
    with pytest.raises(InvalidSamplingParamsError):
        dataclasses.replace(params, top_p=2.0)
    assert SamplingParams.from_dict(params.to_dict()) == params


@pytest.mark.parametrize("key", ["\u00b2", "\u0663", " 5", "5 ", "+5", "-5", "5\n", ""])
def test_logit_bias_keys_are_ascii_digits_only(key: str) -> None:
    # "²".isdigit() is true but int("²") raises (that was a 500); "٣" would read as token 3.
    with pytest.raises(InvalidSamplingParamsError, match="token ids") as info:
        SamplingParams(logit_bias={key: 1.0})
    assert info.value.param == "logit_bias"
    assert SamplingParams(logit_bias={"007": 1.0}).logit_bias == {7: 1.0}
