"""How a chat request's tools shape its prompt, its grammar and the reading of its output.

``ToolPlan.from_request`` checks the tool fields against each other and against the conversation
(400s naming the field), then answers three questions for the chat route:

* the prompt: tools go through the chat template when it takes ``tools`` (its source mentions
  them, as transformers' templates for Qwen, Llama 3.1, Mistral, Hermes do); otherwise a fallback
  system prompt lists them as JSON and asks for calls in the parser's format (Hermes'
  ``<tool_call>`` by default). Earlier calls and ``tool`` results in the conversation are passed
  to such a template as they are; for the fallback, earlier calls are written in the parser's
  format and each result as a user turn ``The function NAME returned: RESULT``.
* the grammar: ``tool_choice`` ``required`` or a named function becomes a JSON-schema
  ``GrammarSpec``, so the output is a call whose arguments are valid against the tool's
  ``parameters``; ``auto`` and ``none`` leave the output free.
* the reading: an extractor per choice (``tool_call_stream.py``).

Each tool's ``parameters`` is compiled like a ``json_schema`` response format (cached, off the
event loop) whenever the tools are used, so a schema tokenmill cannot enforce is a 400 naming
``tools[i].function.parameters`` even under ``auto``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tokenmill.errors import InvalidRequestError
from tokenmill.server.openai.tool_call_stream import (
    AutoExtractor,
    Extractor,
    NamedExtractor,
    PlainExtractor,
    RequiredExtractor,
)
from tokenmill.server.openai.tool_parsers import ParsedToolCall, ToolParser
from tokenmill.structured_output.spec import GrammarSpec

if TYPE_CHECKING:
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.server.openai.protocol import ChatCompletionRequest, ChatMessage
    from tokenmill.server.openai.tool_protocol import ChatTool

ToolMode = Literal["none", "auto", "required", "named"]

FALLBACK_PROMPT = """You can call functions to help answer. The functions, as JSON Schema:
<tools>
{tools}
</tools>
{instructions}"""

# Plain words rather than a markup block: a model without tool training (the fallback's audience)
# tends to copy a <tool_response> block back instead of answering from it.
FALLBACK_RESULT = "The function {name} returned: {content}"


def template_takes_tools(chat_template: str | None) -> bool:
    """Whether the template renders a ``tools`` variable (transformers passes it the same way)."""
    return chat_template is not None and "tools" in chat_template


@dataclass
class ToolPlan:
    mode: ToolMode
    tools: list[ChatTool]
    parser: ToolParser
    named: str | None = None
    parallel: bool = True

    @classmethod
    def from_request(cls, body: ChatCompletionRequest, parser: ToolParser) -> ToolPlan:
        tools = body.tools or []
        choice = body.tool_choice
        names = [tool.function.name for tool in tools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidRequestError(f"tools: each function needs its own name; "
                                      f"{duplicates[0]!r} is given more than once", param="tools")
        for index, tool in enumerate(tools):
            kind = tool.function.parameters_schema().get("type", "object")
            if kind != "object":
                param = f"tools[{index}].function.parameters"
                raise InvalidRequestError(f"{param} must be a JSON Schema of type \"object\" "
                                          f"(the arguments are an object), got {kind!r}",
                                          param=param)
        _check_conversation(body.messages)
        parallel = body.parallel_tool_calls is not False
        if choice is None:
            return cls("auto" if tools else "none", tools, parser, parallel=parallel)
        if isinstance(choice, str):
            if choice == "required" and not tools:
                raise InvalidRequestError('tool_choice "required" needs tools; this request '
                                          "has none", param="tool_choice")
            mode: ToolMode = choice if tools else "none"
            return cls._forced(mode, tools, parser, body, parallel=parallel)
        name = choice.function.name
        if not tools:
            raise InvalidRequestError(f"tool_choice names the function {name!r}, but this "
                                      "request has no tools", param="tool_choice")
        if name not in names:
            raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not "
                                      f"in tools ({', '.join(names)})",
                                      param="tool_choice.function.name")
        return cls._forced("named", tools, parser, body, named=name, parallel=parallel)

    @classmethod
    def _forced(cls, mode: ToolMode, tools: list[ChatTool], parser: ToolParser,
                body: ChatCompletionRequest, *, named: str | None = None,
                parallel: bool) -> ToolPlan:
        if mode in ("required", "named") and body.grammar_spec() is not None:
            raise InvalidRequestError("tool_choice required or a named function already "
                                      "decides the output's format; drop the output "
                                      "constraint (response_format, structured_outputs, "
                                      "guided_*)", param="tool_choice")
        return cls(mode, tools, parser, named=named, parallel=parallel)

    # ------------------------------------------------------------------ grammar
    def parameter_specs(self) -> list[GrammarSpec]:
        """Each tool's parameters as a spec, to compile (and so check) before the request runs."""
        if self.mode == "none":
            return []
        return [GrammarSpec.json_schema(tool.function.parameters_schema(),
                                        f"tools[{i}].function.parameters")
                for i, tool in enumerate(self.tools)]

    def grammar_spec(self) -> GrammarSpec | None:
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.named)
            return GrammarSpec.json_schema(tool.function.parameters_schema(), "tool_choice")
        if self.mode != "required":
            return None
        root_defs: dict[str, Any] = {}
        schema = _one_call_schema(self.tools, root_defs)
        if self.parallel:
            schema = {"type": "array", "minItems": 1, "items": schema}
        if root_defs:
            schema["$defs"] = root_defs
        return GrammarSpec.json_schema(schema, "tools")

    def new_extractor(self) -> Extractor:
        if self.mode == "named":
            assert self.named is not None
            return NamedExtractor(self.named)
        if self.mode == "required":
            return RequiredExtractor()
        if self.mode == "auto":
            return AutoExtractor(self.parser)
        return PlainExtractor()

    @property
    def keeps_special_tokens(self) -> bool:
        return self.mode == "auto" and self.parser.keeps_special_tokens

    # ------------------------------------------------------------------ prompt
    def render(self, engine: AsyncLLM, messages: list[ChatMessage],
               add_generation_prompt: bool) -> str:
        chat_template = engine.tokenizer.chat_template
        native = template_takes_tools(chat_template)
        names = {call.id: call.function.name for m in messages for call in m.tool_calls or []}
        conversation = [_for_template(m, names, native, self.parser) for m in messages]
        extra: dict[str, Any] = {}
        if self.mode != "none" and self.tools:
            tools = [tool.model_dump(exclude_none=True) for tool in self.tools]
            if native:
                extra["tools"] = tools
            else:
                conversation = _with_system_prompt(conversation, FALLBACK_PROMPT.format(
                    tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools),
                    instructions=self.parser.instructions()))
        return engine.input_processor.render_chat(conversation, add_generation_prompt, **extra)


def _one_call_schema(tools: list[ChatTool], root_defs: dict[str, Any]) -> dict[str, Any]:
    """One call of any of the tools, name first (the extractor reads the name before the
    arguments). Each tool's ``$defs`` move to ``root_defs`` under the tool's name, so its
    ``#/$defs/...`` references still resolve once nested."""
    options = [{"type": "object", "additionalProperties": False,
                "required": ["name", "arguments"],
                "properties": {"name": {"const": tool.function.name},
                               "arguments": _hoisted(tool.function.parameters_schema(),
                                                     tool.function.name, root_defs)}}
               for tool in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _hoisted(schema: dict[str, Any], name: str, root_defs: dict[str, Any]) -> dict[str, Any]:
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not defs:
        return schema
    prefix = f"{name}__"

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: rewrite(value) for key, value in node.items()
               if key not in ("$defs", "definitions")}
        ref = out.get("$ref")
        if isinstance(ref, str):
            for head in ("#/$defs/", "#/definitions/"):
                if ref.startswith(head):
                    out["$ref"] = "#/$defs/" + prefix + ref[len(head):]
        return out

    for key, value in defs.items():
        root_defs[prefix + key] = rewrite(value)
    return rewrite(schema)


def _check_conversation(messages: list[ChatMessage]) -> None:
    """Tool calls only on assistant turns; each tool turn answers an earlier call."""
    call_ids: set[str] = set()
    for index, message in enumerate(messages):
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequestError(f"messages[{index}].tool_calls is only allowed on "
                                      "assistant messages", param=f"messages[{index}].tool_calls")
        if message.role != "tool" and message.tool_call_id is not None:
            raise InvalidRequestError(f"messages[{index}].tool_call_id is only allowed on tool "
                                      "messages", param=f"messages[{index}].tool_call_id")
        for call in message.tool_calls or []:
            call_ids.add(call.id)
        if message.role == "tool":
            param = f"messages[{index}].tool_call_id"
            if message.tool_call_id is None:
                raise InvalidRequestError(f"{param} is required on tool messages: it names the "
                                          "call this message answers", param=param)
            if message.tool_call_id not in call_ids:
                raise InvalidRequestError(
                    f"{param} is {message.tool_call_id!r}, which no earlier assistant message's "
                    "tool_calls has", param=param)


def _arguments(text: str) -> Any:
    """Templates read arguments as a mapping (``| tojson``, ``.items()``); OpenAI sends text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _for_template(message: ChatMessage, call_names: dict[str, str], native: bool,
                  parser: ToolParser) -> dict[str, Any]:
    entry: dict[str, Any] = dict(message.for_template())
    if message.role == "assistant" and message.tool_calls:
        if native:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": _arguments(c.function.arguments)}}
                for c in message.tool_calls]
        else:
            written = parser.render_calls([ParsedToolCall(c.function.name, c.function.arguments)
                                           for c in message.tool_calls])
            entry["content"] = "\n".join(filter(None, [entry["content"], written]))
    if message.role == "tool":
        assert message.tool_call_id is not None
        name = call_names.get(message.tool_call_id, "")
        if native:
            entry.update(tool_call_id=message.tool_call_id, name=name)
        else:
            entry = {"role": "user", "content": FALLBACK_RESULT.format(
                name=name, content=entry["content"])}
    return entry


def _with_system_prompt(conversation: list[dict[str, Any]], prompt: str
                        ) -> list[dict[str, Any]]:
    if conversation and conversation[0]["role"] == "system":
        first = {**conversation[0], "content": f"{conversation[0]['content']}\n\n{prompt}"}
        return [first, *conversation[1:]]
    return [{"role": "system", "content": prompt}, *conversation]
