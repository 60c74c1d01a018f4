"""Output processing is linear in a request's length: each output carries only what is new, and the
whole completion once, at the end. Counted in elements handed out, not in time."""

from __future__ import annotations

from typing import Any

from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler_output import EngineCoreOutput
from tokenmill.sampling_params import SamplingParams

NUM_TOKENS = 4000


def _elements(output: Any) -> int:
    """Token ids, logprob entries and characters one output holds."""
    total = 0
    for c in output.outputs:
        total += len(c.token_ids) + len(c.delta_token_ids) + len(c.text) + len(c.delta_text)
        total += len(c.logprobs or ()) + len(c.delta_logprobs or ())
    return total


def test_a_4000_token_generation_hands_out_each_token_a_bounded_number_of_times(
        builtin_source: Any) -> None:
    tokenizer = builtin_source.tokenizer
    text_ids = tokenizer.encode(" The quick brown fox jumps over the lazy dog, again and again.")
    params = SamplingParams(max_tokens=NUM_TOKENS, logprobs=1, stop=["never appears here"])
    processor = OutputProcessor(tokenizer)
    child = Request("gen#0", [1, 2, 3], params, eos_token_id=tokenizer.eos_token_id)
    processor.add_request("gen", None, [child])

    handed_out, num_outputs, deltas, delta_ids, final = 0, 0, [], [], None
    for step in range(NUM_TOKENS):
        token_id = text_ids[step % len(text_ids)]
        last = step == NUM_TOKENS - 1
        core = EngineCoreOutput("gen#0", [token_id], finish_reason="length" if last else None,
                                logprobs=("logprob", step))
        (output,) = processor.process([core]).request_outputs
        handed_out += _elements(output)
        num_outputs += 1
        deltas.append(output.outputs[0].delta_text)
        delta_ids.extend(output.outputs[0].delta_token_ids)
        final = output
    assert final is not None and final.finished and num_outputs == NUM_TOKENS
    completion = final.outputs[0]
    assert "".join(deltas) == completion.text and delta_ids == completion.token_ids
    assert len(completion.token_ids) == len(completion.logprobs) == NUM_TOKENS
    # Every token, logprob and character is handed out twice: once as a delta, once in the final
    # output. A snapshot per step (as before) would hand out ~NUM_TOKENS**2 / 2 = 8 million.
    whole = 2 * (NUM_TOKENS + NUM_TOKENS + len(completion.text))
    assert handed_out <= whole, (handed_out, whole)
    assert not processor.states, "a finished request is forgotten"


def test_stop_strings_only_search_the_unsent_tail(builtin_source: Any) -> None:
    """The detokenizer keeps what it already sent aside, so its working text stays short."""
    from tokenmill.engine.detokenizer import IncrementalDetokenizer

    tokenizer = builtin_source.tokenizer
    ids = tokenizer.encode(" one two three four five six seven eight nine ten") * 200
    detokenizer = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["STOP HERE"]))
    longest_unsent = 0
    for token_id in ids:
        detokenizer.update([token_id], finished=False)
        longest_unsent = max(longest_unsent, len(detokenizer._unsent))
    assert longest_unsent < 30  # holdback (8 characters) plus one token's text
    assert detokenizer.text.count("seven") == 200 and detokenizer.stopped_by is None
