"""The request body of ``POST /v1/responses`` (OpenAI's Responses API) and its translation into a
chat request.

tokenmill is stateless: nothing is stored, so the features that read stored responses
(``previous_response_id``, ``conversation``, ``background``, ``prompt`` templates) are 400s naming
the field; ``store`` is accepted (true or false) and changes nothing. Items of ``input``:

* messages: ``{"role": "user" | "system" | "developer" | "assistant", "content": text or parts}``
  (``"type": "message"`` optional; parts ``input_text`` or ``output_text``),
* ``{"type": "function_call", "call_id", "name", "arguments"}``: a call the model made earlier
  (what a previous response's output holds),
* ``{"type": "function_call_output", "call_id", "output"}``: its result.

Input items are validated by hand (like chat's ``content``): one sentence naming ``input[i]`` and
what is allowed reads better than pydantic's union errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from tokenmill.errors import InvalidRequestError
from tokenmill.server.openai.protocol import ChatCompletionRequest
from tokenmill.server.openai.schema_types import ModelName, OutputLength, Temperature, TopP
from tokenmill.server.openai.tool_protocol import FunctionName


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FunctionTool(_Strict):
    """A function tool in the Responses API's flat shape."""

    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: FunctionName


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


InputItems = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "object"}}]})]

_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
_ITEM_KEYS = {
    "message": {"type", "role", "content", "id", "status"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
}
_PART_TYPES = ("input_text", "output_text")


class ResponsesRequest(_Strict):
    model: ModelName
    input: InputItems
    instructions: str | None = None
    max_output_tokens: OutputLength | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = Field(default=None, description=(
        "Accepted; nothing is stored (tokenmill's Responses API is stateless)."))
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None
    # Stored-response features: declared so the 400 can say why, not just "unknown".
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise ValueError("must be a non-empty string or a list of input items")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty string or a list of input items")
        for index, item in enumerate(value):
            _check_item(index, item)
        return value

    def refuse_stored_features(self) -> None:
        for name in ("previous_response_id", "conversation", "prompt"):
            if getattr(self, name) is not None:
                raise InvalidRequestError(
                    f"{name} is not supported: tokenmill's Responses API is stateless and "
                    "stores no responses; send the whole conversation in input instead",
                    param=name)
        if self.background:
            raise InvalidRequestError("background is not supported: responses are not stored, "
                                      "so there is nothing to poll", param="background")

    def to_chat_request(self) -> ChatCompletionRequest:
        """The same request for ``/v1/chat/completions`` (already checked item by item)."""
        self.refuse_stored_features()
        messages = self._messages()
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "stream": self.stream}
        for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.tools:
            body["tools"] = [{"type": "function", "function": tool.model_dump(
                exclude={"type"}, exclude_none=True)} for tool in self.tools]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        response_format = self._response_format()
        if response_format is not None:
            body["response_format"] = response_format
        return ChatCompletionRequest.model_validate(body)

    def _response_format(self) -> dict[str, Any] | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "json_object"}
        if fmt.schema_ is None or fmt.name is None:
            raise InvalidRequestError('text.format of type "json_schema" needs a name and a '
                                      "schema", param="text.format")
        definition = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.strict is not None:
            definition["strict"] = fmt.strict
        return {"type": "json_schema", "json_schema": definition}

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) \
            else self.input
        call_ids: set[str] = set()
        for index, item in enumerate(items):
            kind = item.get("type", "message")
            if kind == "message":
                messages.append({"role": item["role"], "content": _text(item["content"])})
            elif kind == "function_call":
                call = {"id": item["call_id"], "type": "function",
                        "function": {"name": item["name"], "arguments": item["arguments"]}}
                call_ids.add(item["call_id"])
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                if item["call_id"] not in call_ids:
                    raise InvalidRequestError(
                        f"input[{index}].call_id is {item['call_id']!r}, which no earlier "
                        "function_call item has", param=f"input[{index}].call_id")
                messages.append({"role": "tool", "tool_call_id": item["call_id"],
                                 "content": item["output"]})
        if not any(m["role"] != "system" for m in messages):
            raise InvalidRequestError("input holds no message to answer", param="input")
        return messages


def _check_item(index: int, item: Any) -> None:
    where = f"input[{index}]"
    if not isinstance(item, dict):
        raise InvalidRequestError(f"{where} must be an object (a message or a function_call / "
                                  "function_call_output item)", param=where)
    kind = item.get("type", "message")
    if not isinstance(kind, str) or kind not in _ITEM_KEYS:  # a fuzzer sent {"type": {}}
        raise InvalidRequestError(
            f"{where}.type {kind!r} is not supported; use message, function_call or "
            "function_call_output (tokenmill has no built-in tools, reasoning items or "
            "stored items)", param=f"{where}.type")
    unknown = sorted(set(item) - _ITEM_KEYS[kind])
    if unknown:
        raise InvalidRequestError(f"{where}: unknown field {unknown[0]!r} in a {kind} item",
                                  param=f"{where}.{unknown[0]}")
    if kind == "message":
        if item.get("role") not in _MESSAGE_ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {', '.join(_MESSAGE_ROLES)}",
                                      param=f"{where}.role")
        _check_content(where, item.get("content"))
        return
    needed = ("call_id", "name", "arguments") if kind == "function_call" else ("call_id", "output")
    for name in needed:
        if not isinstance(item.get(name), str) or (name != "output" and not item[name]):
            raise InvalidRequestError(f"{where}.{name} must be a non-empty string",
                                      param=f"{where}.{name}")


def _check_content(where: str, content: Any) -> None:
    if isinstance(content, str):
        return
    allowed = (f"{where}.content must be a string or a list of input_text parts "
               '({"type": "input_text", "text": ...}); image, audio and file parts are not '
               "supported")
    if not isinstance(content, list):
        raise InvalidRequestError(allowed, param=f"{where}.content")
    for part in content:
        if not (isinstance(part, dict) and part.get("type") in _PART_TYPES
                and isinstance(part.get("text"), str)):
            raise InvalidRequestError(allowed, param=f"{where}.content")


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)
