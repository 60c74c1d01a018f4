"""IncrementalDetokenizer with the built-in tokenizer: an incomplete UTF-8 tail is held back, stop
strings are caught across tokens, and streamed text is never taken back."""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill import SamplingParams
from tokenmill.engine.detokenizer import IncrementalDetokenizer

MULTIBYTE = "Party time 🦩🎉 and 你好, café!"


@pytest.fixture(scope="module")
def tokenizer(builtin_source: Any) -> Any:
    return builtin_source.tokenizer


def _stream(tokenizer: Any, token_ids: list[int], params: SamplingParams
            ) -> tuple[IncrementalDetokenizer, list[str]]:
    detokenizer = IncrementalDetokenizer(tokenizer, params)
    deltas = []
    for token_id in token_ids:
        deltas.append(detokenizer.update([token_id], finished=False))
        if detokenizer.stopped_by is not None:
            return detokenizer, deltas
    deltas.append(detokenizer.update([], finished=True))
    return detokenizer, deltas


def test_split_characters_are_held_back_until_complete(tokenizer: Any) -> None:
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    pieces = [tokenizer.decode([token_id]) for token_id in ids]
    assert any("\ufffd" in piece for piece in pieces), (
        "precondition: some character must be split over byte tokens")
    detokenizer, deltas = _stream(tokenizer, ids, SamplingParams())
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == MULTIBYTE
    assert detokenizer.text == MULTIBYTE


def test_stop_string_across_tokens_is_cut_and_never_streamed(tokenizer: Any) -> None:
    text = "The weather is lovely today, isn't it?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stop = "ly tod"  # spans " lovely" and " today"
    assert not any(stop in tokenizer.decode([t]) for t in ids), "precondition: split over tokens"
    detokenizer, deltas = _stream(tokenizer, ids, SamplingParams(stop=[stop, "never seen"]))
    assert detokenizer.stopped_by == stop
    assert detokenizer.text == "The weather is love"
    assert "".join(deltas) == "The weather is love"

    included, deltas = _stream(tokenizer, ids, SamplingParams(
        stop=[stop], include_stop_str_in_output=True))
    assert included.text == "The weather is lovely tod"
    assert "".join(deltas) == included.text


def test_text_that_may_start_a_stop_string_is_withheld(tokenizer: Any) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["END!"]))
    sent = ""
    for token_id in tokenizer.encode("Going on and on END", add_special_tokens=False):
        sent += detokenizer.update([token_id], finished=False)
    # len("END!") - 1 characters stay back: they might be the start of the stop string.
    assert detokenizer.text == "Going on and on END"
    assert sent == "Going on and on "
    # It was not a stop after all: the withheld tail comes out when the request finishes.
    sent += detokenizer.update([], finished=True)
    assert sent == "Going on and on END"
    assert detokenizer.stopped_by is None


def test_special_tokens_are_skipped_by_default(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("Hello there", add_special_tokens=False) + [eos]
    _, deltas = _stream(tokenizer, ids, SamplingParams())
    assert "".join(deltas) == "Hello there"
    _, deltas = _stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(deltas) == "Hello there" + tokenizer.token_text(eos)
