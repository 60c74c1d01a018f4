"""The request fields that constrain the output, and how they become one ``GrammarSpec``.

Three spellings are accepted, on /v1/chat/completions and /v1/completions alike:

* OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``
  (any JSON object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}`` (what ``client.chat.completions.parse(response_format=Model)`` sends);
* vLLM's ``structured_outputs``: ``{"json" | "regex" | "choice" | "grammar" | "json_object"}``;
* vLLM's older top-level ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.

A request may carry at most one constraint; two are a 400 naming both fields. Every spec keeps the
name of the field it came from, so a schema the compiler refuses is a 400 naming that field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill.errors import InvalidRequestError
from tokenmill.structured_output.spec import GrammarSpec


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


_SCHEMA_DOC = "A JSON Schema (an object); the output is JSON valid against it."
JsonSchemaObject = Annotated[dict[str, Any], Field(description=_SCHEMA_DOC)]


class JsonSchemaDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # "schema" would shadow a BaseModel attribute; the wire name stays "schema"
    schema_: JsonSchemaObject = Field(alias="schema")
    strict: bool | None = Field(default=None, description=(
        "Accepted for compatibility: tokenmill always enforces the schema."))


# One model rather than a union discriminated by "type": pydantic puts the tag into error
# locations ("response_format.json_schema.json_schema.name"), and errors name fields as sent.
class ResponseFormat(_Strict):
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"type": {"enum": ["text", "json_object"]},
                        "json_schema": {"type": "null"}}},
        {"properties": {"type": {"const": "json_schema"}}, "required": ["json_schema"]}]})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaDefinition | None = Field(default=None, description=(
        'Required with type "json_schema", refused with the others.'))

    @model_validator(mode="after")
    def _json_schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise InvalidRequestError(
                'response_format.json_schema is required with type "json_schema" and only '
                "allowed with it", param="response_format.json_schema")
        return self


Choices = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
NonEmptyText = Annotated[str, Field(min_length=1)]
JsonSchemaOrText = Annotated[dict[str, Any] | str, Field(description=(
    "A JSON Schema, as an object or as JSON text."))]


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: give one of its fields."""

    json_: JsonSchemaOrText | None = Field(default=None, alias="json")
    regex: NonEmptyText | None = Field(default=None, description=(
        "A regular expression (Rust regex syntax) the whole output must match."))
    choice: Choices | None = Field(default=None, description="The output is one of these.")
    grammar: NonEmptyText | None = Field(default=None, description=(
        "A context-free grammar (Lark syntax as llguidance takes it, or llama.cpp GBNF)."))
    json_object: bool | None = Field(default=None, description="true: any JSON object.")


class StructuredOutputFields(_Strict):
    """Mixed into the chat and completion request bodies."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchemaOrText | None = None
    guided_regex: NonEmptyText | None = None
    guided_choice: Choices | None = None
    guided_grammar: NonEmptyText | None = None

    def grammar_spec(self) -> GrammarSpec | None:
        """The one output constraint this request carries, None if it has none."""
        found = _constraints(self)
        if len(found) > 1:
            names = [param for param, _ in found]
            raise InvalidRequestError(
                f"give at most one output constraint; this request has {len(names)}: "
                f"{', '.join(names)}", param=names[0])
        return found[0][1] if found else None


def _constraints(body: StructuredOutputFields) -> list[tuple[str, GrammarSpec]]:
    found: list[tuple[str, GrammarSpec]] = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", GrammarSpec.json_object("response_format")))
    elif response_format is not None and response_format.json_schema is not None:
        param = "response_format.json_schema.schema"
        found.append((param, GrammarSpec.json_schema(response_format.json_schema.schema_,
                                                     param)))
    outputs = body.structured_outputs
    if outputs is not None:
        given = [(name, value) for name, value in (
            ("json", outputs.json_), ("regex", outputs.regex), ("choice", outputs.choice),
            ("grammar", outputs.grammar), ("json_object", outputs.json_object or None))
            if value is not None]
        for name, value in given:
            param = f"structured_outputs.{name}"
            found.append((param, _spec(name, value, param)))
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{name}")
        if value is not None:
            found.append((f"guided_{name}", _spec(name, value, f"guided_{name}")))
    return found


def _spec(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json":
        return GrammarSpec.json_schema(value, param)
    if kind == "regex":
        return GrammarSpec.regex(value, param)
    if kind == "choice":
        return GrammarSpec.choice(value, param)
    if kind == "grammar":
        return GrammarSpec.grammar(value, param)
    assert kind == "json_object", kind
    return GrammarSpec.json_object(param)
