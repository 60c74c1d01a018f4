"""Tool calls through the gateway's stages: output guardrails scan the answer's text, never
tool-call arguments, and pass streamed tool-call deltas on unchanged; an answer holding tool
calls is put together from its stream but never cached."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from tokenmill.gateway.config import GuardrailsSection, RuleSection
from tokenmill.gateway.guardrails import GuardrailsStage
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.protocol import CHAT, StreamAssembler
from tokenmill.gateway.response_cache import store_when_done

FORBIDDEN = "secret launch code"
ARGUMENTS = '{"note": "the secret launch code is 0000"}'


def _stage() -> GuardrailsStage:
    rules = [RuleSection("output.forbidden_phrase", r"\bsecret launch code\b")]
    section = GuardrailsSection(output_rules=rules, output_window_chars=256,
                                output_holdback_chars=32)
    return GuardrailsStage(section, GatewayMetrics())


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "save_note", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ARGUMENTS[:20]}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ARGUMENTS[20:]}}]}),
    _chunk({}, "tool_calls"),
]


async def _replay(events: list[dict[str, Any]]):
    for event in copy.deepcopy(events):
        yield event


async def _collect(events) -> list[dict[str, Any]]:
    return [event async for event in events]


def test_streamed_tool_call_deltas_pass_the_output_guardrail_unchanged():
    passed = asyncio.run(_collect(_stage().filter_stream(CHAT, _replay(STREAM))))
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in passed
             if c["choices"][0]["delta"].get("tool_calls")]
    assert calls == [c["choices"][0]["delta"]["tool_calls"][0] for c in STREAM[1:4]]
    assert passed[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_output_guardrail_scans_text_not_arguments():
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "save_note", "arguments": ARGUMENTS}}]}
    body = {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
    assert _stage().filter_body(CHAT, copy.deepcopy(body)) == body
    text = {"choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"the {FORBIDDEN}"}}]}
    assert _stage().filter_body(CHAT, text)["choices"][0]["finish_reason"] == "content_filter"


def test_an_answer_with_tool_calls_is_assembled_but_never_cached():
    assembler = StreamAssembler(CHAT)
    for event in STREAM:
        assembler.add(event)
    (call,) = assembler.body()["choices"][0]["message"]["tool_calls"]
    assert call == {"id": "call_1", "type": "function",
                    "function": {"name": "save_note", "arguments": ARGUMENTS}}

    class Request:
        endpoint, extra_headers, extra_fields = CHAT, {}, {}

    class Response:
        status_code, body, events = 200, None, _replay(STREAM)

    stored: list[Any] = []
    response = store_when_done(Request(), Response(), stored.append)  # type: ignore[arg-type]
    asyncio.run(_collect(response.events))
    assert stored == []
