"""benchmarks/perplexity.py scores every token once, and its shipped text is what its README says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "perplexity.py"


@pytest.fixture(scope="module")
def perplexity():
    spec = importlib.util.spec_from_file_location("benchmarks_perplexity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize(("num_tokens", "window", "stride"),
                         [(6098, 512, 256), (10, 4, 2), (5, 4, 1), (513, 512, 256), (2, 512, 256),
                          (100, 512, 256), (1000, 512, 511)])
def test_windows_score_every_token_but_the_first_once(perplexity, num_tokens, window, stride):
    spans = perplexity.window_spans(num_tokens, window, stride)
    scored = [t for span in spans for t in range(span.first_scored, span.end)]
    assert scored == list(range(1, num_tokens))
    for span in spans:
        assert span.end - span.begin <= window
        if span.begin > 0:  # every later window gives its tokens window - stride tokens of context
            assert span.first_scored - span.begin >= window - stride


def test_fp32_always_runs_first_as_the_reference(perplexity):
    assert perplexity.parse_methods("int4,auto") == ["none", "int4", "auto"]
    assert perplexity.parse_methods("none,int8,none") == ["none", "int8"]


def test_one_window_over_the_whole_text_equals_plain_cross_entropy(perplexity, builtin_model):
    ids = list(range(1000, 1040))
    spans = perplexity.window_spans(len(ids), 64, 32)
    nll_sum, argmax = perplexity.score(builtin_model, ids, spans)
    sliding = perplexity.window_spans(len(ids), 16, 8)
    sliding_nll, sliding_argmax = perplexity.score(builtin_model, ids, sliding)
    from tokenmill.layers.attention import causal_metadata

    with torch.inference_mode():
        hidden = builtin_model(torch.tensor(ids), torch.arange(len(ids)),
                               causal_metadata([len(ids)]))
        logits = builtin_model.compute_logits(hidden)[:-1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
    assert nll_sum == pytest.approx(expected.item(), rel=1e-4)
    assert torch.equal(argmax, logits.argmax(dim=-1))
    assert len(sliding_argmax) == len(ids) - 1  # shorter context: a different, finite sum
    assert 0 < sliding_nll < float("inf")


def test_shipped_text_is_a_few_thousand_tokens(perplexity, builtin_source):
    text = perplexity.DEFAULT_TEXT.read_text(encoding="utf-8")
    assert text.lstrip().startswith("ALICE'S ADVENTURES IN WONDERLAND")
    num_tokens = len(builtin_source.tokenizer.encode(text, add_special_tokens=False))
    assert 4000 <= num_tokens <= 8000
