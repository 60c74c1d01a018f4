"""OpenAI request/response shapes the stages share: the text of a request, and stream ↔ body.

Chat completions carry text in ``choices[i].message.content`` (``delta.content`` when streamed);
legacy completions in ``choices[i].text``. Keeping these few accessors in one place lets every stage
work on both endpoints without knowing which one it is looking at.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tokenmill.errors import InvalidRequestError

CHAT = "chat.completions"
COMPLETIONS = "completions"

# Body fields that change the answer; anything else (stream, user, ...) does not.
NON_SAMPLING_FIELDS = ("messages", "prompt", "stream", "stream_options", "user", "rag")


def validate_body(endpoint: str, body: Any) -> dict[str, Any]:
    """Check the little the gateway relies on; the upstream validates the rest."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' must be a non-empty string", param="model")
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("'messages' must be a non-empty list", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequestError(f"messages[{i}] must be an object with a 'role'",
                                          param=f"messages[{i}]")
            if not isinstance(m.get("content"), (str, list, type(None))):
                raise InvalidRequestError(f"messages[{i}].content must be a string or a list",
                                          param=f"messages[{i}].content")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequestError("'prompt' must be a string (token-id and batched prompts "
                                      "are not supported by the gateway)", param="prompt")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequestError("'stream' must be true or false", param="stream")
    return body


def content_text(content: Any) -> str:
    """A message's content as text (list content: the text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
    return ""


def query_text(endpoint: str, body: dict[str, Any]) -> str:
    """The text a cache or retriever matches on: the last user message, or the prompt."""
    if endpoint == CHAT:
        for message in reversed(body["messages"]):
            if message.get("role") == "user":
                return content_text(message.get("content"))
        return ""
    return body.get("prompt", "")


def context_key(endpoint: str, body: dict[str, Any]) -> str:
    """Everything of the prompt except the query text: it must match exactly for a semantic hit."""
    if endpoint != CHAT:
        return ""
    messages = list(body["messages"])
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            messages[i] = {"role": "user", "content": "<query>"}
            break
    return json.dumps(messages, sort_keys=True)


def sampling_key(body: dict[str, Any]) -> str:
    params = {k: v for k, v in body.items() if k not in NON_SAMPLING_FIELDS}
    return json.dumps(params, sort_keys=True, default=str)


def prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    """All prompt text, for token estimates and prefix affinity."""
    if endpoint == CHAT:
        return "\n".join(f"{m.get('role')}: {content_text(m.get('content'))}"
                         for m in body["messages"])
    return body.get("prompt", "")


CHARS_PER_TOKEN = 4
"""About 4 characters per token for English BPE vocabularies: the gateway's estimate before a
replica's ``usage`` gives the true count (and the correction after, when a stream has none)."""


def estimate_tokens(text: str) -> int:
    return estimate_tokens_from_chars(len(text))


def estimate_tokens_from_chars(num_chars: int) -> int:
    return max(1, num_chars // CHARS_PER_TOKEN)


def choice_text(endpoint: str, choice: dict[str, Any], *, streamed: bool) -> str | None:
    if endpoint == CHAT:
        part = choice.get("delta" if streamed else "message") or {}
        return part.get("content")
    return choice.get("text")


def with_choice_text(endpoint: str, choice: dict[str, Any], text: str, *,
                     streamed: bool) -> dict[str, Any]:
    choice = copy.deepcopy(choice)
    if endpoint == CHAT:
        choice.setdefault("delta" if streamed else "message", {})["content"] = text
    else:
        choice["text"] = text
    return choice


def chunk_object(endpoint: str) -> str:
    """The ``object`` of a streamed chunk: chat and legacy completions differ."""
    return "chat.completion.chunk" if endpoint == CHAT else "text_completion"


def is_usage_chunk(event: dict[str, Any]) -> bool:
    return not event.get("choices") and event.get("usage") is not None


async def events_from_body(endpoint: str, body: dict[str, Any],
                           include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """Replay a whole response as stream chunks (for cached answers asked with stream=true)."""
    base = {"id": body.get("id"), "object": chunk_object(endpoint), "created": body.get("created"),
            "model": body.get("model")}
    for choice in body.get("choices", []):
        text = choice_text(endpoint, choice, streamed=False) or ""
        index = choice.get("index", 0)
        if endpoint == CHAT:
            first = {"index": index, "delta": {"role": "assistant", "content": text},
                     "finish_reason": None}
        else:
            first = {"index": index, "text": text, "finish_reason": None}
        yield {**base, "choices": [first]}
        last = with_choice_text(endpoint, {"index": index, "finish_reason":
                                           choice.get("finish_reason")}, "", streamed=True)
        yield {**base, "choices": [last]}
    if include_usage and body.get("usage"):
        yield {**base, "choices": [], "usage": body["usage"]}


class StreamAssembler:
    """Builds the whole-response body from stream chunks as they pass (for caching and limits)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.texts: dict[int, list[str]] = {}
        self.tool_calls: dict[int, dict[int, dict[str, Any]]] = {}
        """Per choice, its tool calls by index, put together from their deltas."""
        self.finish_reasons: dict[int, str | None] = {}
        self.usage: dict[str, Any] | None = None
        self.meta: dict[str, Any] = {}

    def add(self, event: dict[str, Any]) -> None:
        if not self.meta:
            self.meta = {k: event.get(k) for k in ("id", "created", "model")}
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            index = choice.get("index", 0)
            text = choice_text(self.endpoint, choice, streamed=True)
            self.texts.setdefault(index, [])
            if text:
                self.texts[index].append(text)
            for delta in (choice.get("delta") or {}).get("tool_calls") or []:
                self._add_tool_call(self.tool_calls.setdefault(index, {}), delta)
            if choice.get("finish_reason"):
                self.finish_reasons[index] = choice["finish_reason"]

    @staticmethod
    def _add_tool_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
        call = calls.setdefault(delta.get("index", 0), {
            "id": delta.get("id"), "type": "function", "function": {"name": None,
                                                                    "arguments": ""}})
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""

    @property
    def text_chars(self) -> int:
        return sum(len(t) for parts in self.texts.values() for t in parts)

    def body(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.texts):
            text = "".join(self.texts[index])
            if self.endpoint == CHAT:
                choice = {"index": index, "message": {"role": "assistant", "content": text}}
                calls = self.tool_calls.get(index)
                if calls:
                    choice["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
            else:
                choice = {"index": index, "text": text}
            choice["finish_reason"] = self.finish_reasons.get(index)
            choices.append(choice)
        obj = "chat.completion" if self.endpoint == CHAT else "text_completion"
        return {**self.meta, "object": obj, "choices": choices, "usage": self.usage}


def fresh_identity(body: dict[str, Any]) -> dict[str, Any]:
    """A replayed answer gets a new id and timestamp, like any new completion."""
    return {**body, "id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time())}
