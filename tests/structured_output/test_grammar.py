"""The grammar machinery without a model: specs, the compiler and its cache, matchers, bitmasks.

Uses the built-in model's tokenizer (the vocabulary the server constrains), nothing else.
"""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
import torch

from tokenmill.errors import InvalidRequestError
from tokenmill.layers.sampler import Sampler, SamplingBatch
from tokenmill.loader.model_source import load_tokenizer
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.bitmask import (
    apply_grammar_bitmask,
    bitmask_words,
    build_grammar_bitmask,
    grammar_bias,
)
from tokenmill.structured_output.compiler import GrammarCompiler
from tokenmill.structured_output.spec import MAX_SPEC_CHARS, GrammarSpec

PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size=49152)


def allowed(matcher, vocab: int = 49152) -> set[int]:
    mask = np.zeros((1, bitmask_words(vocab)), dtype=np.int32)
    matcher.fill_bitmask(mask, 0)
    return set(np.flatnonzero(grammar_bias(mask, vocab)[0].numpy() == 0).tolist())


def feed(matcher, tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    for token in ids:
        assert token in allowed(matcher), (text, token)
        assert matcher.accept(token)
    return ids


# ---------------------------------------------------------------------------- specs
def test_same_schema_is_the_same_spec_and_key_order_is_kept():
    a = GrammarSpec.json_schema(PERSON, "response_format.json_schema.schema")
    b = GrammarSpec.json_schema(json.dumps(PERSON), "guided_json")
    assert a == b and a.key == b.key and hash(a) == hash(b)
    assert list(a.schema()["properties"]) == ["name", "age"]  # the order properties come out in


@pytest.mark.parametrize(("make", "text"), [
    (lambda: GrammarSpec.json_schema("{not json", "guided_json"), "not valid JSON"),
    (lambda: GrammarSpec.json_schema([1, 2], "guided_json"), "JSON Schema object"),
    (lambda: GrammarSpec.regex("", "guided_regex"), "non-empty"),
    (lambda: GrammarSpec.choice([], "guided_choice"), "non-empty list"),
    (lambda: GrammarSpec.choice(["a", 3], "guided_choice"), "non-empty list"),
    (lambda: GrammarSpec.grammar("  ", "guided_grammar"), "non-empty grammar"),
    (lambda: GrammarSpec.regex("a" * (MAX_SPEC_CHARS + 1), "guided_regex"), "limit"),
])
def test_bad_spec_shapes_are_refused_naming_the_field(make, text):
    with pytest.raises(InvalidRequestError, match=text) as caught:
        make()
    assert caught.value.param.startswith("guided_")


def test_sampling_params_round_trip_a_spec():
    params = SamplingParams(structured_output=GrammarSpec.regex("[0-9]+"))
    again = SamplingParams.from_dict(params.to_dict())
    assert again.structured_output == params.structured_output


# ---------------------------------------------------------------------------- compiler
@pytest.mark.parametrize(("spec", "text"), [
    (GrammarSpec.json_schema({"type": "strnig"}, "guided_json"), "Invalid type: strnig"),
    (GrammarSpec.json_schema({"type": "object", "properties": 5}, "guided_json"),
     "properties must be an object"),
    (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}, "guided_json"),
     "unsupported JSON Schema keywords"),
    (GrammarSpec.json_schema({"type": "integer", "minimum": 5, "maximum": 2}, "guided_json"),
     "minimum (5) is greater than maximum (2)"),
    (GrammarSpec.regex("[a-", "guided_regex"), "unclosed character class"),
    (GrammarSpec.grammar("start: foo", "guided_grammar"), "unknown name"),
    (GrammarSpec.grammar("root ::= [", "guided_grammar"), "GBNF"),
    (GrammarSpec.json_schema({"x-guidance": {"whitespace_flexible": "yes"}}, "guided_json"),
     "expected a boolean"),
])
def test_compile_errors_name_the_field_and_the_problem(compiler, spec, text):
    with pytest.raises(InvalidRequestError) as caught:
        compiler.compile(spec)
    assert caught.value.param == spec.param
    assert caught.value.message.startswith(spec.param)
    assert text in caught.value.message
    assert "start: /" not in caught.value.message  # no Lark wrapper the client never wrote
    # failures are cached too: asking again is a lookup, with the same answer
    hits = compiler.num_hits
    with pytest.raises(InvalidRequestError, match=text.replace("(", r"\(").replace(")", r"\)")):
        compiler.compile(spec)
    assert compiler.num_hits == hits + 1


def test_compiled_grammars_are_cached_by_spec_and_evicted_lru(tokenizer):
    compiler = GrammarCompiler(tokenizer, vocab_size=49152, cache_size=2)
    first = compiler.compile(GrammarSpec.regex("[0-9]+"))
    assert compiler.compile(GrammarSpec.regex("[0-9]+", "guided_regex")) is first
    assert (compiler.num_misses, compiler.num_hits) == (1, 1)
    compiler.compile(GrammarSpec.regex("[a-z]+"))
    compiler.compile(GrammarSpec.regex("[0-9]+"))  # used again: the newest
    compiler.compile(GrammarSpec.choice(["yes", "no"]))  # evicts [a-z]+, the least recent
    assert compiler.num_cached == 2
    assert compiler.cached(GrammarSpec.regex("[0-9]+")) is first
    assert compiler.cached(GrammarSpec.regex("[a-z]+")) is None


def test_compile_async_runs_misses_off_the_event_loop(tokenizer):
    compiler = GrammarCompiler(tokenizer, vocab_size=49152)
    threads: list[str] = []
    original = compiler._build

    def spy(spec, started):
        threads.append(threading.current_thread().name)
        return original(spec, started)

    compiler._build = spy  # type: ignore[method-assign]
    spec = GrammarSpec.json_schema(PERSON)

    async def twice():
        first = await compiler.compile_async(spec)
        return first, await compiler.compile_async(spec)

    first, second = asyncio.run(twice())
    compiler.close()
    assert first is second
    assert threads == ["tokenmill-grammar_0"]  # one compile, on the worker thread


# ---------------------------------------------------------------------------- matcher
def test_matcher_follows_a_valid_output_then_finishes(compiler, tokenizer):
    matcher = compiler.compile(GrammarSpec.json_schema(PERSON)).new_matcher()
    eos = tokenizer.eos_token_id
    assert eos not in allowed(matcher)
    ids = feed(matcher, tokenizer, '{"name": "Ada", "age": 36')
    assert not matcher.is_finished and not matcher.is_accepting
    assert eos not in allowed(matcher)  # the object is not closed yet
    feed(matcher, tokenizer, "}")
    assert matcher.is_finished and matcher.num_consumed == len(ids) + 1
    assert eos in allowed(matcher)


def test_eos_is_allowed_whenever_the_output_is_complete(compiler, tokenizer):
    matcher = compiler.compile(GrammarSpec.regex("a+")).new_matcher()
    feed(matcher, tokenizer, "a")
    assert matcher.is_accepting and not matcher.is_finished  # "aa" could still follow
    assert tokenizer.eos_token_id in allowed(matcher)


def test_rollback_gives_back_the_same_masks(compiler, tokenizer):
    matcher = compiler.compile(GrammarSpec.json_schema(PERSON)).new_matcher()
    masks = []
    ids = tokenizer.encode('{"name": "Bo", "age": 7}', add_special_tokens=False)
    for token in ids:
        masks.append(allowed(matcher))
        assert matcher.accept(token)
    assert matcher.is_finished
    matcher.rollback(len(ids) - 2)  # also out of the finished state
    assert matcher.num_consumed == 2 and not matcher.is_finished
    for step, token in enumerate(ids[2:], start=2):
        assert allowed(matcher) == masks[step]
        assert matcher.accept(token)
    assert matcher.is_finished


def test_a_forbidden_token_puts_the_matcher_in_error_and_only_eos_stays(compiler, tokenizer):
    matcher = compiler.compile(GrammarSpec.choice(["yes", "no"])).new_matcher()
    assert not matcher.accept(tokenizer.encode("maybe", add_special_tokens=False)[0])
    assert matcher.is_error and not matcher.is_finished
    assert allowed(matcher) == {tokenizer.eos_token_id}


# ---------------------------------------------------------------------------- bitmask
def test_bitmask_unpacks_like_llguidance(compiler):
    from llguidance.numpy import apply_token_bitmask_inplace

    matcher = compiler.compile(GrammarSpec.json_schema(PERSON)).new_matcher()
    built = build_grammar_bitmask([("r1", matcher)])
    assert built.request_ids == ["r1"] and built.bitmask.shape == (1, 49152 // 32)
    logits = np.random.default_rng(0).standard_normal((1, 49152)).astype(np.float32)
    reference = logits.copy()
    apply_token_bitmask_inplace(reference, built.bitmask)
    ours = apply_grammar_bitmask(torch.from_numpy(logits.copy()), [0], built.bitmask)
    assert torch.equal(ours, torch.from_numpy(reference))
    # a random mask, and a vocabulary wider than the mask (the extra tokens are not allowed)
    words = np.random.default_rng(1).integers(-2**31, 2**31, (3, 4)).astype(np.int32)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").astype(bool)
    bias = grammar_bias(words, 140).numpy()
    assert bias.shape == (3, 140)
    assert np.array_equal(bias[:, :128] == 0, bits) and np.all(bias[:, 128:] == -np.inf)
    assert build_grammar_bitmask([]) is None


def test_sampler_masks_only_the_constrained_rows():
    vocab = 64
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    mask = np.zeros((1, bitmask_words(vocab)), dtype=np.int32)
    mask[0, 1] = 1 << 3  # only token 35 allowed
    params = [SamplingParams(temperature=0)] * 3
    batch = SamplingBatch(params, [[1]] * 3, [[]] * 3, [[]] * 3, grammar_rows=[1],
                          grammar_bitmask=mask)
    tokens, _ = Sampler(torch.device("cpu"))(logits, batch)
    free = logits.argmax(dim=-1).tolist()
    assert tokens == [free[0], 35, free[2]]


def test_grammar_wins_over_a_min_tokens_ban():
    # min_tokens bans end-of-sequence, the grammar allows only end-of-sequence: the grammar wins,
    # so the output stays valid and the request can end
    logits = torch.zeros(1, 64)
    mask = np.zeros((1, 2), dtype=np.int32)
    mask[0, 0] = 1 << 2
    batch = SamplingBatch([SamplingParams(temperature=0.7, seed=1)], [[1]], [[]], [[2]],
                          grammar_rows=[0], grammar_bitmask=mask)
    tokens, _ = Sampler(torch.device("cpu"))(logits, batch)
    assert tokens == [2]
