"""``GrammarCompiler``: ``GrammarSpec`` -> ``CompiledGrammar``, off the engine thread, cached.

Compiling is the only part of constrained decoding whose cost grows with what the client sends (a
big schema, a long regex), so it never runs on the engine thread or the event loop: ``AsyncLLM``
calls ``compile_async``, which answers cache hits at once and runs misses on one worker thread
(llguidance drops the GIL while it builds). The engine thread only copies a compiled template
into a per-request ``GrammarMatcher`` and fills masks from it.

The cache is a bounded LRU keyed by ``GrammarSpec.key`` (kind + canonical text). It also keeps
failures, so a client that repeats a bad schema costs a dictionary lookup, not a compile.

Built on llguidance (see docs/structured_output.md for why): its ``LLTokenizer`` is made from the
model's ``tokenizers`` JSON once, lazily, on the first constrained request, so servers that never
see one never pay for it (about 0.25 s for a 49k vocabulary).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.structured_output.matcher import GrammarMatcher
from tokenmill.structured_output.spec import GrammarSpec

DEFAULT_CACHE_SIZE = 256

# JSON is generated compactly, with the separators json.dumps uses. llguidance's default allows
# any run of whitespace between tokens, which lets a small model loop on newlines until max_tokens
# instead of closing the object.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                                "key_separator": ": "}


@dataclass
class CompiledGrammar:
    """A compiled grammar (an llguidance matcher that has consumed nothing), shared by every
    request with the same spec; ``new_matcher`` gives each request its own copy."""

    spec: GrammarSpec
    template: Any  # llguidance.LLMatcher
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    compile_seconds: float

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.template.deep_copy(), self.eos_token_ids, self.vocab_size,
                              self.spec.describe())


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int,
                 cache_size: int = DEFAULT_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        """Bits per mask row: the model's logits may be wider than the tokenizer, never narrower."""
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar | str] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self.num_hits = 0
        self.num_misses = 0

    # ------------------------------------------------------------------ public
    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile (or find in the cache); a bad spec raises InvalidRequestError naming its field.

        Blocking: call it from a worker thread (``compile_async``) or an offline caller."""
        found = self.cached(spec)
        if found is not None:
            return found
        started = time.perf_counter()
        self.num_misses += 1
        try:
            result: CompiledGrammar | str = self._build(spec, started)
        except InvalidRequestError as exc:
            result = exc.message
        with self._lock:
            self._cache[spec.key] = result
            self._cache.move_to_end(spec.key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return self._answer(spec, result)

    def cached(self, spec: GrammarSpec) -> CompiledGrammar | None:
        """The compiled grammar if the cache has it (a cached failure raises at once)."""
        with self._lock:
            result = self._cache.get(spec.key)
            if result is None:
                return None
            self._cache.move_to_end(spec.key)
            self.num_hits += 1
        return self._answer(spec, result)

    async def compile_async(self, spec: GrammarSpec) -> CompiledGrammar:
        """``compile`` without blocking the event loop: hits at once, misses on a worker thread."""
        found = self.cached(spec)
        if found is not None:
            return found
        if self._executor is None:
            # One thread: compiles are rare and short, and the engine owns the compute threads.
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="tokenmill-grammar")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.compile, spec)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # ------------------------------------------------------------------ building
    def ll_tokenizer(self) -> Any:
        """llguidance's view of the vocabulary, built once (thread-safe)."""
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                    eos_token=list(self.eos_token_ids) or None)
            return self._ll_tokenizer

    def _build(self, spec: GrammarSpec, started: float) -> CompiledGrammar:
        from llguidance import LLMatcher

        try:
            grammar = llguidance_grammar(spec)
        except (ValueError, TypeError) as exc:  # what llguidance raises for input it cannot read
            raise InvalidRequestError(_explain(spec, str(exc)), param=spec.param) from None
        template = LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
        if template.is_error():
            raise InvalidRequestError(_explain(spec, template.get_error()), param=spec.param)
        return CompiledGrammar(spec, template, self.eos_token_ids, self.vocab_size,
                               time.perf_counter() - started)

    @staticmethod
    def _answer(spec: GrammarSpec, result: CompiledGrammar | str) -> CompiledGrammar:
        if isinstance(result, str):
            raise InvalidRequestError(result, param=spec.param)
        return result


def llguidance_grammar(spec: GrammarSpec) -> str:
    """The spec in llguidance's grammar format (not yet checked: the matcher does that)."""
    import llguidance
    from llguidance import LLMatcher

    if spec.kind == "json":
        return LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        # Each choice as a Lark string literal (JSON string syntax): an alternation of literals.
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in spec.choices()))
    try:
        # "grammar" takes Lark as is and converts llama.cpp's GBNF (what vLLM users often send)
        return llguidance.grammar_from("grammar", spec.value)
    except ValueError as exc:
        raise InvalidRequestError(f"{spec.param}: {exc}", param=spec.param) from None


_WHAT = {"json": "is not a JSON Schema tokenmill can enforce",
         "json_object": "could not be compiled",
         "regex": "is not a valid regular expression",
         "choice": "could not be compiled",
         "grammar": "is not a valid grammar"}


def _explain(spec: GrammarSpec, error: str) -> str:
    """llguidance's message, prefixed with the field; for a regex without the Lark wrapper it was
    compiled into (``start: /.../``), which the client never wrote."""
    detail = error.strip()
    if spec.kind == "regex":
        detail = detail.split("\n   1 |", 1)[0]
        detail = detail.split(" (in regex): ", 1)[-1]
    if detail.startswith("Unimplemented keys"):
        detail = "unsupported JSON Schema keywords: " + detail.split(":", 1)[1].strip()
    return f"{spec.param} {_WHAT[spec.kind]}: {detail}"
