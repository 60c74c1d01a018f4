"""What tool calls cost besides decoding: compiling their grammars (cold and cached) and reading
the output on the event loop (extractor time per piece of streamed text).

    .venv/bin/python benchmarks/tool_call_overhead.py
    .venv/bin/python benchmarks/tool_call_overhead.py --repeats 9

Compile: in this process, with the built-in tokenizer; the five tools of
tests/server/test_tool_calls.py: each tool's ``parameters`` alone (what any request with tools
compiles, to check the schemas), the ``required`` grammar over all five (one call, and a list of
calls), and a named choice. ``cold`` is a compile into an empty cache, ``cached`` a hit.

Extractors: a ~2,000-character output fed in 4-character pieces (about one token each), the
median time per piece: ``required`` (the JSON scanner), ``auto`` with Hermes on prose (scanning
for a marker) and on a held call (no scanning after the marker).

Figures are wall-clock on whatever else the machine runs: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_load import cpu_name

from tests.server.test_tool_calls import TOOLS


def _plan(**fields):
    from tokenmill.server.openai.protocol import ChatCompletionRequest
    from tokenmill.server.openai.tool_calls import ToolPlan
    from tokenmill.server.openai.tool_parsers import PARSERS

    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
         **fields})
    return ToolPlan.from_request(body, PARSERS["hermes"]())


def compile_times(repeats: int) -> None:
    import torch

    torch.set_num_threads(1)
    from tokenmill.loader.model_source import load_tokenizer
    from tokenmill.structured_output.compiler import GrammarCompiler

    tokenizer = load_tokenizer(None)
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    compiler.ll_tokenizer()
    specs = [(f"parameters of {t['function']['name']}", spec)
             for t, spec in zip(TOOLS, _plan().parameter_specs(), strict=True)]
    specs += [("required, one call", _plan(tool_choice="required",
                                           parallel_tool_calls=False).grammar_spec()),
              ("required, parallel", _plan(tool_choice="required").grammar_spec()),
              ("named set_thermostat", _plan(tool_choice={
                  "type": "function", "function": {"name": "set_thermostat"}}).grammar_spec())]
    print(f"\ngrammar compile, built-in tokenizer; median of {repeats}")
    print("| grammar                       | chars | cold ms | cached us |")
    print("|-------------------------------|-------|---------|-----------|")
    for name, spec in specs:
        cold, cached = [], []
        for _ in range(repeats):
            compiler.clear_cache()
            t0 = time.perf_counter()
            compiler.compile(spec)
            t1 = time.perf_counter()
            compiler.compile(spec)
            cold.append(t1 - t0)
            cached.append(time.perf_counter() - t1)
        print(f"| {name:<29} | {len(spec.value):>5} | {statistics.median(cold) * 1e3:7.2f} | "
              f"{statistics.median(cached) * 1e6:9.1f} |")


def extractor_times(repeats: int) -> None:
    from tokenmill.server.openai.tool_call_stream import AutoExtractor, RequiredExtractor
    from tokenmill.server.openai.tool_parsers import PARSERS

    arguments = json.dumps({"notes": ["x" * 30] * 55})
    call = f'{{"name": "save", "arguments": {arguments}}}'
    outputs = [
        ("required (JSON scanner)", RequiredExtractor, call),
        ("auto, hermes, prose", lambda: AutoExtractor(PARSERS["hermes"]()),
         "The weather is fine today, " * 75),
        ("auto, hermes, held call", lambda: AutoExtractor(PARSERS["hermes"]()),
         f"<tool_call>{call}</tool_call>"),
    ]
    print(f"\nextractor time per 4-character piece; median of {repeats}")
    print("| output                    | chars | us per piece |")
    print("|---------------------------|-------|--------------|")
    for name, make, text in outputs:
        pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
        runs = []
        for _ in range(repeats):
            extractor = make()
            t0 = time.perf_counter()
            for piece in pieces:
                extractor.feed(piece)
            extractor.finish()
            runs.append((time.perf_counter() - t0) / len(pieces))
        print(f"| {name:<25} | {len(text):>5} | {statistics.median(runs) * 1e6:12.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}")
    compile_times(args.repeats)
    extractor_times(args.repeats)


if __name__ == "__main__":
    main()
