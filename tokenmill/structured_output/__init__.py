"""Constrained decoding: outputs that match a JSON Schema, a regex, a choice list or a grammar.

    spec.py      GrammarSpec: what a request asks for (plain, hashable data)
    compiler.py  GrammarCompiler: spec -> CompiledGrammar, off the engine thread, LRU-cached
    matcher.py   GrammarMatcher: one request's place in its grammar (lives on the Request)
    bitmask.py   the step's token bitmask: built by the core, applied to logits by the sampler

Tool calls with ``tool_choice`` ``required`` or a named function are the same machinery: the
server turns the tool's ``parameters`` into a ``GrammarSpec.json_schema`` and nothing below it
changes.
"""

from __future__ import annotations

from tokenmill.structured_output.spec import GrammarSpec

__all__ = ["GrammarSpec"]
