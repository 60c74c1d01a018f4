"""Tool-call parsers, one per model family, picked by name (``--tool-call-parser``).

``auto`` (the default) picks by what the model's chat template writes: ``<tool_call>`` (Hermes,
Qwen), ``[TOOL_CALLS]`` (Mistral), ``<|python_tag|>`` or ``ipython`` (Llama 3.1+); a template
with none of them (the built-in SmolLM2) gets Hermes, the format the fallback prompt asks for.
"""

from __future__ import annotations

from tokenmill.errors import ConfigError
from tokenmill.server.openai.tool_parsers.base import ParsedOutput, ParsedToolCall, ToolParser
from tokenmill.server.openai.tool_parsers.hermes import HermesToolParser
from tokenmill.server.openai.tool_parsers.llama3 import Llama3JsonToolParser
from tokenmill.server.openai.tool_parsers.mistral import MistralToolParser

PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}
AUTO = "auto"

# (text in the chat template, parser): the first found wins.
_TEMPLATE_HINTS = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
                   ("<|python_tag|>", "llama3_json"), ("ipython", "llama3_json"))


def check_parser_name(name: str) -> None:
    if name != AUTO and name not in PARSERS:
        raise ConfigError(f"--tool-call-parser={name!r} is not known; use one of "
                          f"{', '.join([AUTO, *PARSERS])}", param="tool_call_parser")


def make_parser(name: str, chat_template: str | None) -> ToolParser:
    """The parser called ``name``; for ``auto``, the one the chat template's format calls for."""
    check_parser_name(name)
    if name == AUTO:
        name = next((parser for hint, parser in _TEMPLATE_HINTS
                     if chat_template is not None and hint in chat_template), "hermes")
    return PARSERS[name]()


__all__ = ["AUTO", "PARSERS", "ParsedOutput", "ParsedToolCall", "ToolParser",
           "check_parser_name", "make_parser"]
