"""LangChain's ``ChatOpenAI`` pointed at a real ``tokenmill serve``: ``bind_tools`` with a forced
choice gives tool calls whose arguments fit the tool, and ``with_structured_output`` returns the
Pydantic object, through tool calling and through a JSON schema alike."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import MODEL

langchain_openai = pytest.importorskip("langchain_openai")


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=24, description="The city, e.g. Paris")
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


class Multiply(BaseModel):
    """Multiply two integers."""

    a: int = Field(ge=-1000, le=1000)
    b: int = Field(ge=-1000, le=1000)


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def chat_model(tokenmill_server):
    return langchain_openai.ChatOpenAI(
        base_url=tokenmill_server.url + "/v1", api_key="unused", model=MODEL, temperature=0,
        max_tokens=100, max_retries=0, timeout=120)


@pytest.mark.parametrize("tool_choice", ["Multiply", "any"])
def test_bind_tools_with_a_forced_choice_gives_valid_calls(chat_model, tool_choice):
    model = chat_model.bind_tools([GetWeather, Multiply], tool_choice=tool_choice,
                                  parallel_tool_calls=False)
    message = model.invoke("What is 6 times 7?")
    (call,) = message.tool_calls
    if tool_choice == "Multiply":
        assert call["name"] == "Multiply"
    schema = {"GetWeather": GetWeather, "Multiply": Multiply}[call["name"]]
    schema.model_validate(call["args"])  # the arguments fit the tool
    assert call["id"].startswith("call_")
    assert message.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_with_structured_output_returns_the_model(chat_model, method):
    structured = chat_model.with_structured_output(Person, method=method)
    person = structured.invoke("Invent a person with a name and an age.")
    assert isinstance(person, Person)


def test_streamed_tool_call_chunks_add_up(chat_model):
    # strict: LangChain sends additionalProperties false, so the grammar allows no extra keys
    model = chat_model.bind_tools([GetWeather], tool_choice="GetWeather", strict=True)
    chunks = list(model.stream("Weather in Rome?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    (call,) = merged.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    assert call == model.invoke("Weather in Rome?").tool_calls[0] | {"id": call["id"]}


def test_chat_model_on_the_responses_api(chat_model):
    model = chat_model.model_copy(update={"use_responses_api": True})
    message = model.bind_tools([Multiply], tool_choice="Multiply", strict=True).invoke(
        "What is 6 times 7?")
    (call,) = message.tool_calls
    Multiply.model_validate(call["args"])
    assert model.invoke("Say hi.").text
