"""Frontend side of a request's arrival: text or token ids in, validated engine ``Request``s out.

A request with structured output gets its grammar compiled here (``compile_grammar``: a cache hit, or
a compile that ``AsyncLLM`` runs off the event loop), and each child request its own matcher.

A request with ``n > 1`` becomes n child requests with the same prompt; they share the prompt's KV
blocks through the prefix cache. A seeded request gives child i the seed ``seed + i`` so the
samples differ from each other yet reproduce run after run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tokenmill.engine.request import Request
from tokenmill.errors import InvalidRequestError
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.compiler import CompiledGrammar, GrammarCompiler


def child_request_id(parent_id: str, index: int) -> str:
    return f"{parent_id}#{index}"


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.grammars = GrammarCompiler(tokenizer, vocab_size)

    def compile_grammar(self, params: SamplingParams) -> CompiledGrammar | None:
        """The request's compiled grammar, None if it has none. Blocks while compiling: the
        server calls ``grammars.compile_async`` instead."""
        spec = params.structured_output
        return None if spec is None else self.grammars.compile(spec)

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            raise InvalidRequestError("the prompt must be a string or a list of token ids",
                                      param="prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt")
        return None, list(prompt)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt,
                                                  **template_kwargs)

    def _check_token_ids(self, params: SamplingParams) -> None:
        """Token ids a request names must exist in this model's vocabulary (as vLLM checks)."""
        for name, ids in (("logit_bias", params.logit_bias or {}),
                          ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{name} names token id {bad[0]}, outside the vocabulary "
                    f"[0, {self.vocab_size})", param=name)

    def make_requests(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams, cache_salt: str | None = None,
                      arrival_time: float | None = None,
                      grammar: CompiledGrammar | None = None,
                      pooling: str | None = None, priority: int = 0) -> list[Request]:
        """The engine requests of one prompt (``n`` of them). ``pooling``: an embedding request
        ("last" or "mean"), which samples nothing. ``priority``: lower is more urgent (vLLM's
        convention, ``request_queue.py``)."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token",
                                      param="prompt")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError(f"priority must be an integer, not {priority!r}",
                                      param="priority")
        self._check_token_ids(params)
        assert (grammar is None) == (params.structured_output is None), \
            "compile the request's structured_output first (compile_grammar)"
        arrival = time.time() if arrival_time is None else arrival_time
        # Models with several end tokens (Llama 3: <|end_of_text|>, <|eot_id|>) stop on any of them.
        stop_ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids += [t for t in self.tokenizer.eos_token_ids[1:] if t not in stop_ids]
        children = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            child_params = dataclasses.replace(params, n=1, seed=seed, stop_token_ids=stop_ids)
            children.append(Request(
                child_request_id(request_id, index), prompt_token_ids, child_params,
                eos_token_id=self.tokenizer.eos_token_id, arrival_time=arrival,
                cache_salt=cache_salt,
                grammar=None if grammar is None else grammar.new_matcher(),
                pooling=pooling, priority=priority,
            ))
        return children
