"""ToolPlan without a model: which grammar a tool choice becomes, and that the grammar's schema
accepts exactly the calls the tools allow ($defs of each tool still resolve once nested)."""

from __future__ import annotations

import jsonschema
import pytest
from llguidance import LLMatcher

from tokenmill.server.openai.protocol import ChatCompletionRequest
from tokenmill.server.openai.tool_calls import ToolPlan
from tokenmill.server.openai.tool_parsers import PARSERS
from tokenmill.structured_output.compiler import llguidance_grammar

# What a Pydantic model with a nested model looks like (LangChain and the openai SDK send these).
MEETING = {"type": "object", "$defs": {"Person": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
    "additionalProperties": False}},
    "properties": {"host": {"$ref": "#/$defs/Person"},
                   "guests": {"type": "array", "items": {"$ref": "#/$defs/Person"}}},
    "required": ["host", "guests"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}


def _plan(**fields) -> ToolPlan:
    tools = [{"type": "function", "function": {"name": "book_meeting", "parameters": MEETING}},
             {"type": "function", "function": {"name": "add", "parameters": ADD}}]
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools,
         **fields})
    return ToolPlan.from_request(body, PARSERS["hermes"]())


MEETING_CALL = {"name": "book_meeting",
                "arguments": {"host": {"name": "Ann"}, "guests": [{"name": "Bob"}]}}
ADD_CALL = {"name": "add", "arguments": {"a": 1, "b": 2}}


def _schema(plan: ToolPlan) -> dict:
    spec = plan.grammar_spec()
    assert LLMatcher.validate_grammar(llguidance_grammar(spec)) == ""  # llguidance takes it
    return spec.schema()


def test_required_without_parallel_calls_is_one_call_of_any_tool():
    schema = _schema(_plan(tool_choice="required", parallel_tool_calls=False))
    for call in (MEETING_CALL, ADD_CALL):
        jsonschema.validate(call, schema)
    for bad in ({"name": "add", "arguments": MEETING_CALL["arguments"]},
                {"name": "book_meeting", "arguments": {"host": {"name": 1}, "guests": []}},
                {"name": "other", "arguments": {}}, [ADD_CALL]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_required_with_parallel_calls_is_a_list_of_calls():
    schema = _schema(_plan(tool_choice="required"))
    jsonschema.validate([MEETING_CALL, ADD_CALL, ADD_CALL], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)


def test_named_choice_is_the_tools_own_schema_and_auto_none_have_no_grammar():
    plan = _plan(tool_choice={"type": "function", "function": {"name": "add"}})
    assert plan.grammar_spec().schema() == ADD
    assert _plan().mode == "auto" and _plan().grammar_spec() is None
    assert _plan(tool_choice="none").grammar_spec() is None
    assert _plan(tool_choice="none").parameter_specs() == []
    assert [s.param for s in _plan().parameter_specs()] == [
        "tools[0].function.parameters", "tools[1].function.parameters"]
