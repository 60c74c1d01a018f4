"""Prompt log probabilities through a real `tokenmill serve` and the official `openai` client:
``echo`` + ``logprobs`` (with ``max_tokens: 0``, as lm-evaluation-harness scores a prompt) and
vLLM's ``prompt_logprobs``; the numbers are the model's own log-softmax from a direct forward
pass, a repeated prompt (prefix-cache hit) gives the same, and nothing stays in the engine."""

from __future__ import annotations

import math
import time

import httpx
import pytest
import torch

from tests.server.conftest import MODEL, metric, scrape
from tokenmill.layers.attention import causal_metadata

PROMPT = "Question: What is the capital of France?\nAnswer: The capital of France is Paris."


def reference(llm, ids: list[int]) -> torch.Tensor:
    model = llm.engine.runner.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), causal_metadata([len(ids)]))
        return torch.log_softmax(model.compute_logits(hidden), dim=-1)


def wait_idle(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(url)
        if (metric(samples, "tokenmill:kv_cache_usage_perc") == 0.0
                and metric(samples, "tokenmill:num_requests_running") == 0.0):
            return
        assert time.monotonic() < deadline, "the engine kept KV blocks or requests"
        time.sleep(0.05)


def test_echo_with_max_tokens_zero_scores_the_prompt(client, tokenmill_server, llm):
    ids = llm.tokenizer.encode(PROMPT)
    expected = reference(llm, ids)
    for _ in range(2):  # the second time the prompt is in the prefix cache
        scored = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1,
                                           max_tokens=0)
        [choice] = scored.choices
        assert choice.text == PROMPT and choice.finish_reason == "length"
        assert scored.usage.prompt_tokens == len(ids) and scored.usage.completion_tokens == 0
        logprobs = choice.logprobs
        assert logprobs.tokens == [llm.tokenizer.decode([t]) for t in ids]
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.text_offset[0] == 0
        assert "".join(logprobs.tokens) == PROMPT
        for position in range(1, len(ids)):
            row = expected[position - 1]
            assert logprobs.token_logprobs[position] == pytest.approx(
                row[ids[position]].item(), abs=2e-3)
            top = logprobs.top_logprobs[position]
            assert max(top.values()) == pytest.approx(row.max().item(), abs=2e-3)
    wait_idle(tokenmill_server.url)


def test_echo_logprobs_cover_prompt_and_completion(client, llm):
    ids = llm.tokenizer.encode(PROMPT)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2,
                                      max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    [choice] = whole.choices
    assert choice.text.startswith(PROMPT)
    assert len(choice.logprobs.tokens) == len(ids) + whole.usage.completion_tokens == len(ids) + 4
    assert "".join(choice.logprobs.tokens) == choice.text
    offsets = choice.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[len(ids)] == len(PROMPT)
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs[1:])

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2,
                                            max_tokens=4, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    streamed_tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens
                                                   if c.choices[0].logprobs else [])]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert streamed_tokens == choice.logprobs.tokens


def test_vllm_prompt_logprobs_field(client, llm):
    ids = llm.tokenizer.encode(PROMPT)
    expected = reference(llm, ids)
    result = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                       extra_body={"prompt_logprobs": 3})
    scores = result.choices[0].model_extra["prompt_logprobs"]
    assert len(scores) == len(ids) and scores[0] is None
    for position in range(1, len(ids)):
        entry = scores[position][str(ids[position])]
        assert entry["logprob"] == pytest.approx(expected[position - 1][ids[position]].item(),
                                                 abs=2e-3)
        assert entry["rank"] >= 1
        assert len(scores[position]) in (3, 4)  # the top 3, plus the actual token if not in it
    assert result.choices[0].logprobs is None, "echo was not asked for"


def test_several_prompts_keep_their_own_scores(tokenmill_server, llm):
    prompts = ["The sky is blue.", "Two plus two is four.", "The sky is green."]
    body = {"model": MODEL, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0}
    response = httpx.post(tokenmill_server.url + "/v1/completions", json=body, timeout=60).json()
    totals = []
    for prompt, choice in zip(prompts, sorted(response["choices"], key=lambda c: c["index"])):
        assert choice["text"] == prompt
        ids = llm.tokenizer.encode(prompt)
        expected = reference(llm, ids)
        want = sum(expected[p - 1][ids[p]].item() for p in range(1, len(ids)))
        total = sum(choice["logprobs"]["token_logprobs"][1:])
        assert total == pytest.approx(want, abs=1e-2)
        totals.append(total)
    assert math.isfinite(totals[0]) and totals[0] > totals[2], "blue sky is the likelier one"
    wait_idle(tokenmill_server.url)
