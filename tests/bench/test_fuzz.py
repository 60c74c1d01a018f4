"""bound_generation keeps generated bodies cheap without turning an invalid one valid."""

from __future__ import annotations

from tokenmill.bench.fuzz import bound_generation


def test_caps_whole_numbers_and_fills_null_lengths():
    body = {"n": 100, "best_of": 7.0, "max_tokens": 8192, "min_tokens": 50}
    assert bound_generation("/v1/completions", body) == {"n": 2, "best_of": 2,
                                                         "max_tokens": 4, "min_tokens": 4}
    assert bound_generation("/v1/completions", {"max_tokens": None})["max_tokens"] == 4
    assert bound_generation("/v1/completions", {"prompt": "x"})["max_tokens"] == 4
    chat = bound_generation("/v1/chat/completions", {"messages": []})
    assert chat["max_completion_tokens"] == 4
    assert "max_completion_tokens" not in bound_generation("/v1/chat/completions",
                                                           {"max_tokens": 3})
    assert bound_generation("/v1/responses", {"input": "x"})["max_output_tokens"] == 4
    assert bound_generation("/v1/responses", {"max_output_tokens": 900})["max_output_tokens"] == 4


def test_leaves_invalid_values_invalid():
    body = {"n": 2.5, "max_tokens": True, "min_tokens": "900", "best_of": -3}
    assert bound_generation("/v1/completions", body) == body
    assert bound_generation("/tokenize", ["not", "a", "dict"]) == ["not", "a", "dict"]
