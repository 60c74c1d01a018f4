"""Workloads: prompt lengths the tokenizer agrees with, shared prefixes, JSONL, distributions."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from tokenmill.bench.tokens import load_counting_tokenizer
from tokenmill.bench.workload import LengthDist, WorkloadSpec, build_requests
from tokenmill.errors import BenchError


@pytest.fixture(scope="module")
def builtin_tokenizer():
    return load_counting_tokenizer(None)


@pytest.mark.parametrize("target", [1, 7, 64, 300, 2000])
def test_synthetic_prompts_have_the_target_token_count(builtin_tokenizer, target: int) -> None:
    spec = WorkloadSpec(input_len=LengthDist("fixed", target), output_len=LengthDist("fixed", 5))
    requests = build_requests(spec, builtin_tokenizer, 6)
    for r in requests:
        counted = len(builtin_tokenizer.encode(r.prompt, add_special_tokens=False))
        assert counted == r.prompt_tokens
        assert abs(counted - target) <= max(1, target // 100)
        assert r.max_tokens == 5 and r.endpoint == "completions"
    # Different windows of the soup: no two prompts share their first 8 characters by design.
    assert len({r.prompt[:8] for r in requests}) > 1


def test_shared_prefix_groups_share_exactly_their_prefix(builtin_tokenizer) -> None:
    spec = WorkloadSpec(kind="shared-prefix", num_groups=3, prefix_len=200,
                        input_len=LengthDist("fixed", 20))
    requests = build_requests(spec, builtin_tokenizer, 9)
    assert Counter(r.group for r in requests) == {0: 3, 1: 3, 2: 3}
    prefixes = {r.group: r.prompt.split("\n\n")[0] for r in requests}
    assert len(set(prefixes.values())) == 3
    for r in requests:
        assert r.prompt.startswith(prefixes[r.group] + "\n\n")
        assert 215 <= r.prompt_tokens <= 225


def test_chat_workload_builds_conversations(builtin_tokenizer) -> None:
    spec = WorkloadSpec(kind="chat", chat_turns=3, input_len=LengthDist("fixed", 30))
    (request,) = build_requests(spec, builtin_tokenizer, 1)
    roles = [m["role"] for m in request.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert request.endpoint == "chat" and request.prompt_tokens > 30


def test_jsonl_dataset(tmp_path, builtin_tokenizer) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "The sea is", "max_tokens": 7}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "Hello there"}]}),
    ]))
    spec = WorkloadSpec(kind="jsonl", dataset=str(path), output_len=LengthDist("fixed", 9))
    first, second = build_requests(spec, builtin_tokenizer, 100)
    assert (first.endpoint, first.max_tokens, first.prompt_tokens) == ("completions", 7, 3)
    assert (second.endpoint, second.max_tokens) == ("chat", 9)


@pytest.mark.parametrize("line, message", [
    ("{not json", "prompts.jsonl:1: not JSON"),
    ('{"question": "hi"}', "expected a string 'prompt' or a 'messages' list"),
    ('{"prompt": "hi", "max_tokens": -3}', "max_tokens must be a positive integer"),
])
def test_jsonl_bad_lines_name_the_line(tmp_path, builtin_tokenizer, line, message) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(BenchError, match=message):
        build_requests(WorkloadSpec(kind="jsonl", dataset=str(path)), builtin_tokenizer, 1)


def test_length_distributions() -> None:
    rng = random.Random(0)
    assert LengthDist.parse("128", what="x") == LengthDist("fixed", 128)
    uniform = LengthDist.parse("uniform:10,20", what="x")
    assert {uniform.sample(rng) for _ in range(500)} == set(range(10, 21))
    normal = LengthDist.parse("normal:100,10", what="x")
    samples = [normal.sample(rng) for _ in range(2000)]
    assert 98 < sum(samples) / len(samples) < 102
    assert min(LengthDist.parse("normal:2,50", what="x").sample(rng) for _ in range(200)) >= 1
    for bad in ("0", "uniform:5", "normal:nan,1", "fixed:inf", "poisson:3", "uniform:9,3", ""):
        with pytest.raises(BenchError, match="expected fixed:N"):
            LengthDist.parse(bad, what="--input-len")
