"""The tool-call fields of ``/v1/chat/completions``, as pydantic models (OpenAI's shapes).

* ``tools``: ``[{"type": "function", "function": {"name", "description", "parameters",
  "strict"}}]``; ``parameters`` is a JSON Schema object,
* ``tool_choice``: ``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function", "function":
  {"name": ...}}``,
* ``parallel_tool_calls``: whether one answer may hold more than one call,
* and, in the conversation, an assistant message's ``tool_calls`` and ``tool`` messages
  (``tool_call_id``) carrying the results back.

Checks that span fields (a named choice that is in ``tools``, a tool message answering an earlier
call) are made in ``tool_calls.py`` where the messages name the field at fault.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The name rule OpenAI documents: it keeps names safe to put in prompts and grammars.
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FunctionDefinition(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description=(
        "A JSON Schema object for the arguments; absent means no arguments."))
    strict: bool | None = Field(default=None, description=(
        "Accepted for compatibility: with tool_choice required or a named function the "
        "arguments always follow the schema."))

    def parameters_schema(self) -> dict[str, Any]:
        if self.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return self.parameters


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: FunctionName
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class ToolCall(_Strict):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolFields(_Strict):
    """Mixed into the chat request body."""

    tools: list[ChatTool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = Field(default=None, description=(
        'Default: "auto" when tools are given, "none" otherwise.'))
    parallel_tool_calls: bool | None = Field(default=None, description=(
        "Whether one answer may hold several calls (default true)."))
