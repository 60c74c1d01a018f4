"""Which grammar engine to build constrained decoding on: llguidance or xgrammar, on this CPU.

    .venv/bin/pip install llguidance==1.9.1 xgrammar==0.2.9   # not in pyproject yet
    TOKENMILL_NUM_THREADS=1 .venv/bin/python benchmarks/grammar_engines.py [--repeats 3] [--batch 16]

Uses the built-in model's tokenizer (the one tokenmill serves with). For each case (JSON schemas of
varied shape, a regex and a choice list) and each engine it measures:

* ``compile``: grammar compile time cold (fresh cache), and ``again``: a second compile of the same
  grammar (xgrammar's ``GrammarCompiler`` cache; llguidance has no grammar cache, so this is simply
  a second ``LLMatcher`` built from the same grammar string),
* ``first``: the first mask of a fresh matcher (llguidance builds its lexer lazily, so some of the
  compile work lands here),
* ``mask``: mean and p99 microseconds per token bitmask while following a fixed valid output token
  by token (the output is tokenized with the same tokenizer and fed through the matcher),
* ``batchN``: per-mask microseconds when N matchers are filled by the engine's batch API,
* ``eos``: whether EOS is allowed once the output is complete, and ``rb``: whether rolling back the
  whole output and re-feeding it gives the same masks (what preemption/speculation needs).

Every engine runs with one thread. Figures are wall-clock on a shared machine: compare engines
against each other, not against other runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "json" (spec is a schema), "regex" or "choice" (spec is a list of strings)
    spec: Any
    output: str  # a valid output, fed token by token


CASES: list[Case] = [
    Case("flat", "json", {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "active": {"type": "boolean"}},
        "required": ["name", "age", "active"], "additionalProperties": False,
    }, '{"name": "Ada Lovelace", "age": 36, "active": true}'),
    Case("nested", "json", {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {
                "id": {"type": "integer"},
                "address": {"type": "object", "properties": {
                    "city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
            }, "required": ["id", "address"], "additionalProperties": False},
            "note": {"type": "string"},
        },
        "required": ["user"], "additionalProperties": False,
    }, '{"user": {"id": 7, "address": {"city": "Paris", "zip": "75001"}}, "note": "hi"}'),
    Case("array", "json", {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                "maxItems": 8},
                       "points": {"type": "array", "items": {
                           "type": "object", "properties": {"x": {"type": "number"},
                                                            "y": {"type": "number"}},
                           "required": ["x", "y"], "additionalProperties": False}}},
        "required": ["tags", "points"], "additionalProperties": False,
    }, '{"tags": ["red", "fast", "cheap"], "points": [{"x": 1.5, "y": -2}, {"x": 0, "y": 3.25}]}'),
    Case("enum", "json", {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}},
        "required": ["color", "size"], "additionalProperties": False,
    }, '{"color": "green", "size": "XL"}'),
    Case("bounded", "json", {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100},
                       "ratio": {"type": "number", "minimum": 0, "maximum": 1},
                       "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                       "title": {"type": "string", "minLength": 3, "maxLength": 20}},
        "required": ["score", "ratio", "code", "title"], "additionalProperties": False,
    }, '{"score": 87, "ratio": 0.25, "code": "ABC-1234", "title": "Quarterly report"}'),
    Case("regex", "regex", r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})",
         "2026-12-02T16:00+01:00"),
    Case("choice", "choice", ["positive", "negative", "neutral", "mixed feelings"],
         "mixed feelings"),
]


_REGEX_META = set("\\.^$|?*+()[]{}")


def choice_regex(choices: list[str]) -> str:
    # vLLM turns guided_choice into an alternation of escaped literals; do the same here, escaping
    # only regex metacharacters (re.escape also escapes spaces, which xgrammar warns about)
    return "(" + "|".join("".join("\\" + ch if ch in _REGEX_META else ch for ch in c)
                          for c in choices) + ")"


def micros(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.fmean(samples) * 1e6, p99 * 1e6


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bit_set(mask_row: np.ndarray, token: int) -> bool:
    return bool((int(mask_row[token // 32]) >> (token % 32)) & 1)


@dataclass
class Row:
    engine: str
    case: str
    compile_ms: float
    again_ms: float
    first_us: float
    mean_us: float
    p99_us: float
    batch_us: float
    eos_ok: bool
    rollback_ok: bool
    error: str = ""


class LLGuidanceEngine:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]) -> None:
        import llguidance

        self.llg = llguidance
        self.setup_s, self.tok = timed(
            lambda: llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_ids))
        self.executor = llguidance.LLExecutor(num_threads=1)
        self.vocab_size = vocab_size

    def grammar(self, case: Case) -> str:
        m = self.llg.LLMatcher
        if case.kind == "json":
            return m.grammar_from_json_schema(case.spec)
        regex = case.spec if case.kind == "regex" else choice_regex(case.spec)
        return m.grammar_from_regex(regex)

    def compile(self, case: Case) -> Any:
        matcher = self.llg.LLMatcher(self.tok, self.grammar(case), log_level=0)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return matcher

    def compile_again(self, case: Case, compiled: Any) -> Any:
        return self.compile(case)

    def new_matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, mask: np.ndarray, row: int) -> None:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(matcher, mask, row)

    def fill_batch(self, matchers: list[Any], mask: np.ndarray) -> None:
        from llguidance.numpy import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], mask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def rollback(self, matcher: Any, n: int) -> None:
        if not matcher.rollback(n):
            raise RuntimeError(matcher.get_error())


class XGrammarEngine:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: list[str], vocab_size: int,
                 eos_ids: list[int]) -> None:
        import xgrammar

        self.xgr = xgrammar

        def build() -> Any:
            # the metadata (byte-level BPE, no prefix space) comes from the same tokenizers JSON
            meta = xgrammar.TokenizerInfo._detect_metadata_from_hf(tokenizer_json)
            return xgrammar.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=vocab_size,
                                          stop_token_ids=eos_ids,
                                          add_prefix_space=meta["add_prefix_space"])

        self.setup_s, self.info = timed(build)
        self.batcher = xgrammar.BatchGrammarMatcher(max_threads=1)
        self.vocab_size = vocab_size

    def compile(self, case: Case) -> Any:
        # a fresh compiler per cold compile, so nothing is cached yet
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=1)
        return self._compile(case)

    def _compile(self, case: Case) -> Any:
        if case.kind == "json":
            return self.compiler.compile_json_schema(json.dumps(case.spec))
        regex = case.spec if case.kind == "regex" else choice_regex(case.spec)
        return self.compiler.compile_regex(regex)

    def compile_again(self, case: Case, compiled: Any) -> Any:
        return self._compile(case)

    def new_matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, mask: np.ndarray, row: int) -> None:
        matcher.fill_next_token_bitmask(mask, row)

    def fill_batch(self, matchers: list[Any], mask: np.ndarray) -> None:
        self.batcher.batch_fill_next_token_bitmask(matchers, mask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def rollback(self, matcher: Any, n: int) -> None:
        matcher.rollback(n)


def run_case(engine: Any, case: Case, tokens: list[int], eos: int, repeats: int,
             batch: int) -> Row:
    words = (engine.vocab_size + 31) // 32
    mask = np.full((batch, words), -1, dtype=np.int32)
    compile_s, compiled = timed(lambda: engine.compile(case))
    again_s, _ = timed(lambda: engine.compile_again(case, compiled))

    first = engine.new_matcher(compiled)
    first_s, _ = timed(lambda: engine.fill(first, mask, 0))

    samples: list[float] = []
    eos_ok = rollback_ok = True
    for _ in range(repeats):
        matcher = engine.new_matcher(compiled)
        reference: list[np.ndarray] = []
        for token in tokens:
            start = time.perf_counter()
            engine.fill(matcher, mask, 0)
            samples.append(time.perf_counter() - start)
            reference.append(mask[0].copy())
            if not bit_set(mask[0], token):
                raise RuntimeError(f"mask forbids token {token} of the valid output")
            if not engine.accept(matcher, token):
                raise RuntimeError(f"matcher rejected token {token} of the valid output")
        engine.fill(matcher, mask, 0)
        eos_ok = eos_ok and bit_set(mask[0], eos)
        # roll the whole output back, re-feed it: masks must be the same as the first time
        engine.rollback(matcher, len(tokens))
        for step, token in enumerate(tokens):
            engine.fill(matcher, mask, 0)
            rollback_ok = rollback_ok and bool(np.array_equal(mask[0], reference[step]))
            engine.accept(matcher, token)

    batch_samples: list[float] = []
    for _ in range(repeats):
        matchers = [engine.new_matcher(compiled) for _ in range(batch)]
        for token in tokens:
            start = time.perf_counter()
            engine.fill_batch(matchers, mask)
            batch_samples.append((time.perf_counter() - start) / batch)
            for m in matchers:
                engine.accept(m, token)
    mean_us, p99_us = micros(samples)
    return Row(engine.name, case.name, compile_s * 1e3, again_s * 1e3, first_s * 1e6, mean_us,
               p99_us, statistics.fmean(batch_samples) * 1e6, eos_ok, rollback_ok)


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                  if ln.startswith("Model name")), "unknown")
    flags = out.split()
    avx512 = sorted({f for f in flags if f.startswith("avx512")})
    amx = sorted({f for f in flags if f.startswith("amx")})
    return (f"CPU: {model}; avx512: {'yes (' + ' '.join(avx512) + ')' if avx512 else 'no'}; "
            f"amx: {'yes' if amx else 'no'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="passes over each valid output")
    parser.add_argument("--batch", type=int, default=16, help="matchers per batch fill")
    parser.add_argument("--engines", default="llguidance,xgrammar")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from tokenmill.loader.model_source import open_model_source

    source = open_model_source(None)
    tok = source.tokenizer
    tokenizer_json = tok.backend.to_str()
    vocab_size = max(source.arch.vocab_size, tok.vocab_size)
    eos_ids = list(tok.eos_token_ids)
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    vocab = [by_id.get(i, "") for i in range(vocab_size)]

    print(cpu_line())
    print(f"tokenizer: {source.name}, vocab {vocab_size}, eos {eos_ids}; "
          f"threads 1; repeats {args.repeats}; batch {args.batch}")
    engines: list[Any] = []
    for name in args.engines.split(","):
        try:
            if name == "llguidance":
                engines.append(LLGuidanceEngine(tokenizer_json, vocab_size, eos_ids))
            elif name == "xgrammar":
                engines.append(XGrammarEngine(tokenizer_json, vocab, vocab_size, eos_ids))
            else:
                raise ValueError(f"unknown engine {name}")
            print(f"{name}: tokenizer setup {engines[-1].setup_s * 1e3:.0f} ms")
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other engine
            print(f"{name}: unavailable: {type(exc).__name__}: {exc}")

    header = (f"| {'engine':<10} | {'case':<8} | toks | compile ms | again ms | first us | "
              f"mask us mean | mask us p99 | batch{args.batch} us/mask | eos | rb |")
    print()
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for case in CASES:
        tokens = tok.encode(case.output, add_special_tokens=False)
        for engine in engines:
            try:
                r = run_case(engine, case, tokens, eos_ids[0], args.repeats, args.batch)
            except Exception as exc:  # noqa: BLE001 - one failed case must not hide the rest
                print(f"| {engine.name:<10} | {case.name:<8} | failed: {type(exc).__name__}: "
                      f"{exc} |")
                continue
            print(f"| {r.engine:<10} | {r.case:<8} | {len(tokens):>4} | {r.compile_ms:>10.2f} | "
                  f"{r.again_ms:>8.3f} | {r.first_us:>8.0f} | {r.mean_us:>12.1f} | "
                  f"{r.p99_us:>11.1f} | {r.batch_us:>{len('batch') + len(str(args.batch)) + 8}.1f}"
                  f" | {'yes' if r.eos_ok else 'NO':<3} | {'ok' if r.rollback_ok else 'NO'} |")


if __name__ == "__main__":
    main()
