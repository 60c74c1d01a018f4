"""What structured output costs: aggregate tokens/s with JSON-schema output against free output on
the same server, and grammar compile time per schema (cold and cached).

    .venv/bin/python benchmarks/structured_output_load.py            # 16 clients, 2 rounds
    .venv/bin/python benchmarks/structured_output_load.py --clients 16 --rounds 3 --max-tokens 64
    .venv/bin/python benchmarks/structured_output_load.py --base-url http://127.0.0.1:8000

Throughput: one `tokenmill serve` (or --base-url), --clients concurrent chat clients, each sending
--requests-per-client requests one after another; a phase's figure is all completion tokens over the
phase's wall time. Free and constrained phases alternate for --rounds rounds (so drift hits both);
the medians are compared. Both phases produce the same number of tokens per request: free requests
use ignore_eos, and the schemas ask for at least 12 array items, more than --max-tokens can hold,
so every constrained request runs to max_tokens too. Greedy, so runs repeat.

Compile: in this process, with the built-in tokenizer, for each schema: ``cold`` is a compile
into an empty cache, ``cached`` the same spec again (a cache hit), ``first mask`` the first
bitmask of a new matcher; the once-per-process tokenizer setup is printed apart.

Figures are wall-clock on whatever else the machine runs: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np
import openai
from serve_load import cpu_name, launched_server

ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                         "qty": {"type": "integer", "minimum": 0}},
        "required": ["name", "qty"], "additionalProperties": False}
LOAD_SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a shopping list", {"type": "object", "properties": {
        "items": {"type": "array", "items": ITEM, "minItems": 12}},
        "required": ["items"], "additionalProperties": False}),
    ("the planets", {"type": "object", "properties": {
        "planets": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12}, "moons": {"type": "integer"},
            "rocky": {"type": "boolean"}}, "required": ["name", "moons", "rocky"],
            "additionalProperties": False}, "minItems": 12}},
        "required": ["planets"], "additionalProperties": False}),
    ("twelve dates", {"type": "object", "properties": {
        "dates": {"type": "array", "items": {"type": "string",
                                             "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                  "minItems": 12}}, "required": ["dates"], "additionalProperties": False}),
    ("a table of scores", {"type": "object", "properties": {
        "rows": {"type": "array", "items": {"type": "object", "properties": {
            "player": {"enum": ["ann", "bob", "cy", "dee"]},
            "score": {"type": "number", "minimum": 0, "maximum": 100}},
            "required": ["player", "score"], "additionalProperties": False},
            "minItems": 12}}, "required": ["rows"], "additionalProperties": False}),
]
# For the compile figures: the load schemas plus a few of other shapes and sizes.
COMPILE_SCHEMAS: list[tuple[str, dict[str, Any]]] = LOAD_SCHEMAS + [
    ("flat", {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}),
    ("nested $ref", {"$defs": {"node": {"type": "object", "properties": {
        "label": {"type": "string"}, "weight": {"type": "number"}},
        "required": ["label"]}}, "type": "object", "properties": {
        "root": {"$ref": "#/$defs/node"},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["root"]}),
    ("30 properties", {"type": "object", "properties": {
        f"field_{i}": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}][i % 3]
        for i in range(30)}, "required": [f"field_{i}" for i in range(30)],
        "additionalProperties": False}),
    ("anyOf union", {"type": "object", "properties": {"value": {"anyOf": [
        {"type": "integer"}, {"type": "string", "format": "date"},
        {"type": "array", "items": {"type": "number"}}]}}, "required": ["value"]}),
]


def request_kwargs(index: int, constrained: bool, model: str, max_tokens: int) -> dict[str, Any]:
    what, schema = LOAD_SCHEMAS[index % len(LOAD_SCHEMAS)]
    kwargs: dict[str, Any] = {
        "model": model, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"Give me {what} as JSON."}]}
    if constrained:
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {
            "name": f"load_{index % len(LOAD_SCHEMAS)}", "schema": schema, "strict": True}}
    else:
        kwargs["extra_body"] = {"ignore_eos": True}
    return kwargs


async def phase(base_url: str, constrained: bool, clients: int, per_client: int,
                max_tokens: int) -> tuple[float, int, int]:
    """(tokens/s, completion tokens, requests that ended by length) of one phase."""
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused",
                                  max_retries=0, timeout=600) as client:
        model = (await client.models.list()).data[0].id

        async def one_client(index: int) -> list[Any]:
            return [await client.chat.completions.create(
                **request_kwargs(index + k, constrained, model, max_tokens))
                for k in range(per_client)]

        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    responses = [r for batch in results for r in batch]
    tokens = sum(r.usage.completion_tokens for r in responses)
    num_length = sum(r.choices[0].finish_reason == "length" for r in responses)
    return tokens / elapsed, tokens, num_length


def throughput(base_url: str, args: argparse.Namespace) -> None:
    # warm-up: every schema compiled, every code path run once
    asyncio.run(phase(base_url, True, len(LOAD_SCHEMAS), 1, 8))
    asyncio.run(phase(base_url, False, 2, 1, 8))
    figures: dict[bool, list[float]] = {False: [], True: []}
    print(f"\n{args.clients} clients x {args.requests_per_client} requests, "
          f"max_tokens {args.max_tokens}, greedy")
    for round_index in range(args.rounds):
        for constrained in (False, True):
            rate, tokens, num_length = asyncio.run(phase(
                base_url, constrained, args.clients, args.requests_per_client, args.max_tokens))
            figures[constrained].append(rate)
            label = "json_schema" if constrained else "free"
            print(f"  round {round_index + 1} {label:<11} {rate:7.1f} tokens/s "
                  f"({tokens} tokens, {num_length} ended by length)")
    free, constrained = (statistics.median(figures[k]) for k in (False, True))
    print(f"\n| output      | tokens/s (median of {args.rounds}) | vs free |")
    print("|-------------|------------------------|---------|")
    print(f"| free        | {free:22.1f} |   1.000 |")
    print(f"| json_schema | {constrained:22.1f} | {constrained / free:7.3f} |")


def compile_times(repeats: int) -> None:
    import torch

    torch.set_num_threads(1)
    from tokenmill.loader.model_source import load_tokenizer
    from tokenmill.structured_output.bitmask import bitmask_words
    from tokenmill.structured_output.compiler import GrammarCompiler
    from tokenmill.structured_output.spec import GrammarSpec

    tokenizer = load_tokenizer(None)
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    started = time.perf_counter()
    compiler.ll_tokenizer()
    print(f"\ngrammar compile, built-in tokenizer (vocab {compiler.vocab_size}); tokenizer setup "
          f"once per process: {(time.perf_counter() - started) * 1e3:.0f} ms; "
          f"median of {repeats}")
    print("| schema            | chars | cold ms | cached us | first mask us |")
    print("|-------------------|-------|---------|-----------|---------------|")
    mask = np.zeros((1, bitmask_words(compiler.vocab_size)), dtype=np.int32)
    for name, schema in COMPILE_SCHEMAS:
        spec = GrammarSpec.json_schema(schema)
        cold, cached, first = [], [], []
        for _ in range(repeats):
            compiler.clear_cache()
            t0 = time.perf_counter()
            compiled = compiler.compile(spec)
            t1 = time.perf_counter()
            compiler.compile(spec)
            t2 = time.perf_counter()
            matcher = compiled.new_matcher()
            t3 = time.perf_counter()
            matcher.fill_bitmask(mask, 0)
            t4 = time.perf_counter()
            cold.append(t1 - t0)
            cached.append(t2 - t1)
            first.append(t4 - t3)
        print(f"| {name:<17} | {len(spec.value):>5} | {statistics.median(cold) * 1e3:7.2f} | "
              f"{statistics.median(cached) * 1e6:9.1f} | {statistics.median(first) * 1e6:13.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", help="measure a running server instead of starting one")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--compile-repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"CPU: {cpu_name()}")
    if args.base_url:
        throughput(args.base_url.rstrip("/"), args)
    else:
        with launched_server(args.threads, 2**28) as url:
            throughput(url, args)
    compile_times(args.compile_repeats)


if __name__ == "__main__":
    main()
