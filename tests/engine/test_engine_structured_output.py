"""Constrained decoding through the whole engine on the built-in model: outputs match their
grammar, end with "stop" as soon as they are complete (or "length" first), mix with free requests
in one batch without changing either, and survive preemption by recompute."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from tokenmill import SamplingParams
from tokenmill.errors import InvalidRequestError
from tokenmill.structured_output import GrammarSpec

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
    "required": ["name", "age", "city"], "additionalProperties": False}
CHAT = ("<|im_start|>user\nDescribe a person as JSON with a name, an age and a city."
        "<|im_end|>\n<|im_start|>assistant\n")
FREE = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"


def constrained(spec: GrammarSpec, **kwargs: Any) -> SamplingParams:
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 48)
    return SamplingParams(structured_output=spec, **kwargs)


def test_json_schema_output_is_valid_and_ends_with_stop(plain_llm: Any) -> None:
    [output] = plain_llm.generate(CHAT, constrained(GrammarSpec.json_schema(PERSON)),
                                  use_tqdm=False)
    completion = output.outputs[0]
    assert completion.finish_reason == "stop", completion
    jsonschema.validate(json.loads(completion.text), PERSON)
    # ended by the grammar, not by sampling end-of-sequence: no extra step, no EOS token
    assert plain_llm.tokenizer.eos_token_id not in completion.token_ids


def test_regex_and_choice_outputs_match(plain_llm: Any) -> None:
    date = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    outputs = plain_llm.generate(
        ["The first moon landing happened on", "Is the sky blue? Answer:"],
        [constrained(GrammarSpec.regex(date)),
         constrained(GrammarSpec.choice(["yes", "no", "it depends"]))], use_tqdm=False)
    assert re.fullmatch(date, outputs[0].outputs[0].text), outputs[0].outputs[0].text
    assert outputs[1].outputs[0].text in ("yes", "no", "it depends")
    assert all(o.outputs[0].finish_reason == "stop" for o in outputs)


def test_max_tokens_before_the_grammar_completes_is_length(plain_llm: Any) -> None:
    [output] = plain_llm.generate(CHAT, constrained(GrammarSpec.json_schema(PERSON),
                                                    max_tokens=4), use_tqdm=False)
    completion = output.outputs[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 4
    assert completion.text.startswith('{"name": ')


def test_bad_grammar_is_refused_before_anything_runs(plain_llm: Any) -> None:
    with pytest.raises(InvalidRequestError, match="unclosed group") as caught:
        plain_llm.generate("Hi", constrained(GrammarSpec.regex("(ab", "guided_regex")),
                           use_tqdm=False)
    assert caught.value.param == "guided_regex"
    assert not plain_llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 11}],
                         ids=["greedy", "seeded"])
def test_constrained_and_free_requests_in_one_batch_give_what_they_give_alone(
        plain_llm: Any, driver: Any, sampling: dict[str, Any]) -> None:
    spec = GrammarSpec.json_schema(PERSON)
    with_grammar = SamplingParams(structured_output=spec, max_tokens=40, **sampling)
    free = SamplingParams(max_tokens=40, **sampling)
    alone = [plain_llm.generate(CHAT, with_grammar, use_tqdm=False)[0].outputs[0],
             plain_llm.generate(FREE, free, use_tqdm=False)[0].outputs[0]]

    ids = driver.add(plain_llm, [CHAT, FREE], [with_grammar, free], prefix=f"mix-{len(sampling)}")
    first_step = driver.step(plain_llm, driver.SteppedRun())
    assert {o.request_id for o in first_step} == set(ids)  # both sampled in the same step
    run = driver.run(plain_llm)
    together = [run.final[request_id].outputs[0] for request_id in ids]

    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    jsonschema.validate(json.loads(alone[0].text), PERSON)
    assert not alone[1].text.startswith("{")  # the free one really was free


def test_n_samples_each_follow_the_grammar(plain_llm: Any) -> None:
    [output] = plain_llm.generate(CHAT, constrained(GrammarSpec.json_schema(PERSON), n=3,
                                                    temperature=1.0, seed=5, max_tokens=60),
                                  use_tqdm=False)
    finished = [c for c in output.outputs if c.finish_reason == "stop"]
    assert len(finished) >= 2
    for completion in finished:
        jsonschema.validate(json.loads(completion.text), PERSON)
    assert len({c.text for c in output.outputs}) > 1  # really three samples


def test_preempted_constrained_requests_resume_in_step_with_their_grammar(
        make_llm: Any, plain_llm: Any) -> None:
    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string", "maxLength": 12},
                  "minItems": 3, "maxItems": 6}}, "required": ["items"],
        "additionalProperties": False}
    prompts = [f"<|im_start|>user\nList {k} things found in a {place} as JSON.<|im_end|>\n"
               "<|im_start|>assistant\n"
               for k, place in zip(range(3, 9), ["kitchen", "garden", "school", "office",
                                                 "garage", "library"])]
    params = constrained(GrammarSpec.json_schema(schema), max_tokens=40)
    reference = plain_llm.generate(prompts, params, use_tqdm=False)

    bytes_per_block = plain_llm.engine.runner.kv_spec.bytes_per_block
    small = make_llm(kv_cache_memory=12 * bytes_per_block)  # far too few blocks for six at once
    before = small.engine.get_stats().num_preemptions
    outputs = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.get_stats().num_preemptions > before

    for got, expected in zip(outputs, reference):
        completion = got.outputs[0]
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), schema)
        # same tokens as without preemption (the output is the same, only its KV was recomputed)
        assert completion.token_ids == expected.outputs[0].token_ids
