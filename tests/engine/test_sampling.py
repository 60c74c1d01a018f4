"""Sampling on the real model, asserted on what a user sees: texts, token ids, logprobs, lengths."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.layers.attention import causal_metadata

STORY = "Once upon a time, in a small village by the sea, there lived"
COUNT = "1, 2, 3, 4, 5, 6, 7, 8,"
REPEAT = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The"
SHORT_ANSWER = ("<|im_start|>user\nReply with one word: yes or no?<|im_end|>\n"
                "<|im_start|>assistant\n")


def _ids(llm: Any, prompt: str, **params: Any) -> list[int]:
    params.setdefault("max_tokens", 16)
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def greedy_story(llm: Any) -> Any:
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    return llm.generate([STORY], params, use_tqdm=False)[0].outputs[0]


# ---------------------------------------------------------------- seeds and randomness
def test_seeded_sampling_reproduces_alone_in_batch_and_across_runs(llm: Any) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([STORY], seeded, use_tqdm=False)[0].outputs[0]
    again = llm.generate([STORY], seeded, use_tqdm=False)[0].outputs[0]
    neighbours = [SamplingParams(temperature=0.8, max_tokens=20), seeded,
                  SamplingParams(temperature=0, max_tokens=5),
                  SamplingParams(temperature=1.0, seed=99, max_tokens=16)]
    batch = llm.generate([COUNT, STORY, REPEAT, STORY], neighbours, use_tqdm=False)
    assert again.text == alone.text
    assert batch[1].outputs[0].token_ids == alone.token_ids
    assert batch[1].outputs[0].text == alone.text
    assert batch[3].outputs[0].text != alone.text, "another seed should give another sample"


def test_temperature_without_seed_varies(llm: Any) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    texts = {o.outputs[0].text for o in llm.generate([STORY] * 4, params, use_tqdm=False)}
    assert len(texts) > 1


# ---------------------------------------------------------------- truncation equals greedy
@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}],
                         ids=["top_k=1", "top_p=1e-6", "min_p=1"])
def test_truncation_to_one_token_equals_greedy(llm: Any, greedy_story: Any,
                                               truncation: dict[str, Any]) -> None:
    ids = _ids(llm, STORY, temperature=1.0, ignore_eos=True, **truncation)
    assert ids == greedy_story.token_ids


def test_min_p_drops_unlikely_tokens(llm: Any) -> None:
    # With temperature 1 and no penalties the returned logprobs are the distribution min_p sees.
    threshold = math.log(0.3)

    def below_threshold(min_p: float) -> int:
        params = SamplingParams(temperature=1.0, seed=5, max_tokens=32, ignore_eos=True,
                                logprobs=1, min_p=min_p)
        logprobs = llm.generate([STORY], params, use_tqdm=False)[0].outputs[0].logprobs
        return sum(lp.logprob - lp.top[0][1] < threshold - 1e-4 for lp in logprobs)

    assert below_threshold(0.0) > 0, "this seed should pick some unlikely token without min_p"
    assert below_threshold(0.3) == 0


# ---------------------------------------------------------------- logit bias and penalties
def test_logit_bias_forces_and_bans_tokens(llm: Any, greedy_story: Any) -> None:
    (banana,) = llm.tokenizer.encode(" banana", add_special_tokens=False)
    forced = _ids(llm, STORY, temperature=0, max_tokens=6, logit_bias={banana: 100})
    assert forced == [banana] * 6
    first = greedy_story.token_ids[0]
    banned = _ids(llm, STORY, temperature=0, max_tokens=4, ignore_eos=True,
                  logit_bias={str(first): -100})  # JSON-style string key
    assert banned[0] != first


def _num_repeats(token_ids: list[int]) -> int:
    return len(token_ids) - len(set(token_ids))


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_presence_and_frequency_penalties_steer_repetition(llm: Any, name: str) -> None:
    def repeats(value: float) -> int:
        return _num_repeats(_ids(llm, REPEAT, temperature=0, max_tokens=24, ignore_eos=True,
                                 **{name: value}))

    # A positive penalty discourages tokens already generated, a negative one encourages them.
    assert repeats(2.0) < repeats(0.0) < repeats(-2.0)


def test_repetition_penalty_avoids_prompt_tokens(llm: Any) -> None:
    prompt_ids = set(llm.tokenizer.encode(REPEAT))
    plain = _ids(llm, REPEAT, temperature=0, max_tokens=16, ignore_eos=True)
    penalised = _ids(llm, REPEAT, temperature=0, max_tokens=16, ignore_eos=True,
                     repetition_penalty=2.0)

    def from_prompt(ids: list[int]) -> int:
        return sum(t in prompt_ids for t in ids)

    assert from_prompt(penalised) < from_prompt(plain)


# ---------------------------------------------------------------- ending a completion
def test_min_tokens_suppresses_eos(llm: Any) -> None:
    eos = llm.tokenizer.eos_token_id
    short = llm.generate([SHORT_ANSWER], SamplingParams(temperature=0, max_tokens=64),
                         use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] == eos
    assert len(short.token_ids) < 12
    longer = llm.generate([SHORT_ANSWER], SamplingParams(temperature=0, max_tokens=64,
                                                         min_tokens=12), use_tqdm=False)[0]
    ids = longer.outputs[0].token_ids
    assert len(ids) >= 12
    assert eos not in ids[:12]


def test_stop_token_ids_end_the_completion(llm: Any, greedy_story: Any) -> None:
    reference = greedy_story.token_ids
    stop_token = reference[5]
    end = reference.index(stop_token) + 1
    output = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=16,
                                                  stop_token_ids=[stop_token]),
                          use_tqdm=False)[0].outputs[0]
    assert output.token_ids == reference[:end]
    assert output.finish_reason == "stop"
    assert output.stop_reason == stop_token


def _stop_across_boundary(llm: Any, reference: Any) -> tuple[str, int]:
    """A 4-character stop string straddling a token boundary in the reference text; its index."""
    text = reference.text
    for k in range(3, len(reference.token_ids) - 2):
        boundary = len(llm.tokenizer.decode(reference.token_ids[:k], skip_special_tokens=True))
        stop = text[boundary - 2: boundary + 2]
        if len(stop) == 4 and text.find(stop) == boundary - 2:
            return stop, boundary - 2
    raise AssertionError("no stop string across a token boundary in the reference text")


@pytest.mark.parametrize("include", [False, True], ids=["excluded", "included"])
def test_stop_string_split_across_tokens(llm: Any, driver: Any, greedy_story: Any,
                                         include: bool) -> None:
    stop, index = _stop_across_boundary(llm, greedy_story)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    (request_id,) = driver.add(llm, [STORY], params, prefix=f"stop-{include}")
    run = driver.run(llm)
    completion = run.final[request_id].outputs[0]
    expected = greedy_story.text[: index + (len(stop) if include else 0)]
    assert completion.text == expected
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert "".join(run.deltas[request_id]) == expected, "streamed text must never be taken back"
    assert len(completion.token_ids) < 16, "the engine should stop generating at the stop string"


# ---------------------------------------------------------------- logprobs
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}],
                         ids=["greedy", "sampled"])
def test_logprobs_equal_log_softmax_of_the_model(llm: Any, sampling: dict[str, Any]) -> None:
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=5, **sampling)
    output = llm.generate([STORY], params, use_tqdm=False)[0]
    completion = output.outputs[0]
    ids = output.prompt_token_ids + completion.token_ids[:-1]
    model = llm.engine.runner.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), causal_metadata([len(ids)]))
        reference = torch.log_softmax(model.compute_logits(hidden), dim=-1)
    first_row = len(output.prompt_token_ids) - 1
    for step, (token, lp) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = reference[first_row + step]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(row[token].item(), abs=1e-3)
        assert lp.rank == int((row > row[token] + 1e-4).sum()) + 1
        values = [value for _, value in lp.top]
        assert len(lp.top) == 5 and values == sorted(values, reverse=True)
        assert [t for t, _ in lp.top][:2] == row.topk(2).indices.tolist()
        assert values[0] == pytest.approx(row.max().item(), abs=1e-3)
        if sampling["temperature"] == 0:
            assert lp.rank == 1 and lp.top[0][0] == token


# ---------------------------------------------------------------- parallel samples
def test_n_samples_share_the_prompt_blocks(llm: Any, driver: Any) -> None:
    # ~250 tokens (16 blocks), with an open ending so the samples differ.
    prompt = " ".join(f"item {i}," for i in range(60)) + " Now a story about a dragon:"
    num_prompt_blocks = -(-len(llm.tokenizer.encode(prompt)) // 16)
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    (request_id,) = driver.add(llm, [prompt], params, prefix="n4", cache_salt="n4-test")
    run = driver.run(llm)
    completions = run.final[request_id].outputs
    assert [c.index for c in completions] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in completions)
    assert len({c.text for c in completions}) > 1
    # Each sample holds its own last (partial) block, plus at most one more for its output.
    assert run.peak_used_blocks <= num_prompt_blocks + 4 * 2
    assert run.peak_used_blocks < 4 * num_prompt_blocks
