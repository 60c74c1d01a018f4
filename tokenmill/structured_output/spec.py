"""``GrammarSpec``: what a request asks its output to match, as plain, hashable data.

One spec per request, whichever API field it came from (OpenAI's ``response_format``, vLLM's
``structured_outputs`` or ``guided_*``, later a tool call's ``parameters``): the server turns each of
them into one of five kinds, and everything below the server sees only this.

* ``json``: output is one JSON value valid against a JSON Schema (``value`` is the schema),
* ``json_object``: output is any JSON object,
* ``regex``: output matches a regular expression (Rust ``regex`` syntax, anchored at both ends),
* ``choice``: output is exactly one of a list of strings,
* ``grammar``: output matches a context-free grammar (Lark, or llama.cpp's GBNF).

``value`` is canonical text (a schema is re-dumped compactly, keeping its key order, which decides
the order of the generated properties), so two requests asking the same thing share one compiled
grammar in the compiler's cache. ``param`` names the request field the
spec came from, so a compile error can name it; it is not part of the cache key.

Shapes and sizes are checked here, cheaply, before anything is compiled (habit 16: work that grows
with the request is bounded before it starts); whether a schema or regex *means* something is the
compiler's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenmill.errors import InvalidRequestError

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")

MAX_SPEC_CHARS = 100_000
"""Largest schema / regex / grammar / choice list (as text) a request may send."""
MAX_CHOICES = 1_000


@dataclass(frozen=True)
class GrammarSpec:
    kind: GrammarKind
    value: str = ""
    """The schema as canonical JSON, the regex, the grammar, or the choices as a JSON list."""
    param: str = field(default="structured_output", compare=False)
    """The request field it came from (``response_format.json_schema.schema``...), for errors."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(
                f"{self.param}: unknown structured output kind {self.kind!r}; use one of "
                f"{', '.join(KINDS)}", param=self.param)
        if not isinstance(self.value, str):
            raise InvalidRequestError(f"{self.param} must be text", param=self.param)
        if len(self.value) > MAX_SPEC_CHARS:
            raise InvalidRequestError(
                f"{self.param} is {len(self.value)} characters long; the limit is "
                f"{MAX_SPEC_CHARS}", param=self.param)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def json_schema(cls, schema: Any, param: str = "json") -> GrammarSpec:
        """A JSON Schema given as a mapping or as JSON text (vLLM accepts both)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequestError(f"{param} is not valid JSON: {exc}",
                                          param=param) from None
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                f"{param} must be a JSON Schema object, got {type(schema).__name__}", param=param)
        # Keys keep their order: properties are generated in the order the schema lists them.
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        return cls("json", text, param)

    @classmethod
    def json_object(cls, param: str = "json_object") -> GrammarSpec:
        return cls("json_object", "", param)

    @classmethod
    def regex(cls, pattern: Any, param: str = "regex") -> GrammarSpec:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequestError(f"{param} must be a non-empty regular expression",
                                      param=param)
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, choices: Any, param: str = "choice") -> GrammarSpec:
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise InvalidRequestError(f"{param} must be a non-empty list of non-empty strings",
                                      param=param)
        if len(choices) > MAX_CHOICES:
            raise InvalidRequestError(f"{param} has {len(choices)} entries; the limit is "
                                      f"{MAX_CHOICES}", param=param)
        return cls("choice", json.dumps(choices, ensure_ascii=False), param)

    @classmethod
    def grammar(cls, text: Any, param: str = "grammar") -> GrammarSpec:
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(f"{param} must be a non-empty grammar (Lark or GBNF)",
                                      param=param)
        return cls("grammar", text, param)

    @classmethod
    def from_dict(cls, values: Any, param: str = "structured_output") -> GrammarSpec:
        """From ``{"kind": ..., "value": ...}`` (what ``SamplingParams.to_dict`` writes)."""
        if isinstance(values, GrammarSpec):
            return values
        if not isinstance(values, dict) or set(values) - {"kind", "value", "param"}:
            raise InvalidRequestError(
                f"{param} must be a mapping with 'kind' and 'value'", param=param)
        return cls(values.get("kind"), values.get("value", ""),  # type: ignore[arg-type]
                   values.get("param", param))

    # ------------------------------------------------------------------ reading
    @property
    def key(self) -> tuple[str, str]:
        """What the compile cache is keyed by."""
        return (self.kind, self.value)

    def schema(self) -> dict[str, Any]:
        assert self.kind == "json", self.kind
        return json.loads(self.value)

    def choices(self) -> list[str]:
        assert self.kind == "choice", self.kind
        return json.loads(self.value)

    def describe(self) -> str:
        """Short text for logs and traces: the kind and the size, never the content."""
        return f"{self.kind} ({len(self.value)} chars)" if self.value else self.kind
