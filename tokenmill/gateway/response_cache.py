"""What both cache tiers share: which requests may be cached, replaying a hit, storing a miss.

A hit is replayed in the shape the caller asked for: a JSON body, or stream chunks when the
request said ``stream: true``. A miss is stored only once its answer finished normally (``stop``
or ``length``), so a filtered, failed or abandoned answer is never served again. Answers holding
tool calls are not stored: a call is an action the client takes, and a replay would repeat its id.
Keys cover the whole request (``tools``, ``tool_choice``, ``response_format`` included), so a
text answer is only reused for the same tools.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.gateway.config import CacheSection
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse
from tokenmill.gateway.protocol import (
    CHAT,
    COMPLETIONS,
    StreamAssembler,
    events_from_body,
    fresh_identity,
)

CACHE_HEADER = "x-tokenmill-cache"
_STORABLE_FINISH = ("stop", "length")


@dataclass
class CachedAnswer:
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


def can_cache(request: GatewayRequest, section: CacheSection) -> bool:
    if request.endpoint not in (CHAT, COMPLETIONS) or not (request.tenant and request.tenant.cache):
        return False
    if request.body.get("n", 1) != 1:
        return False
    if section.only_deterministic:
        # OpenAI's default temperature is 1, so a request without one is not deterministic.
        return request.body.get("temperature", 1) == 0
    return True


def replay(request: GatewayRequest, answer: CachedAnswer, tier: str) -> GatewayResponse:
    body = fresh_identity(copy.deepcopy(answer.body))
    request.extra_headers.update(answer.headers)
    request.extra_fields.update(copy.deepcopy(answer.fields))
    request.extra_headers[CACHE_HEADER] = tier
    if request.stream:
        return GatewayResponse(events=events_from_body(request.endpoint, body, True))
    return GatewayResponse(body=body)


def store_when_done(request: GatewayRequest, response: GatewayResponse,
                    store: Callable[[CachedAnswer], None]) -> GatewayResponse:
    """Arrange for ``store`` to get the answer once it is complete; returns the response to pass."""
    if response.status_code != 200:
        return response

    def save(body: dict[str, Any]) -> None:
        if any((c.get("message") or {}).get("tool_calls") for c in body.get("choices", [])):
            return
        finish = [c.get("finish_reason") for c in body.get("choices", [])]
        if finish and all(f in _STORABLE_FINISH for f in finish):
            store(CachedAnswer(copy.deepcopy(body), dict(request.extra_headers),
                               copy.deepcopy(request.extra_fields)))

    if response.events is None:
        if response.body is not None:
            save(response.body)
        return response
    response.events = _assemble_then(request.endpoint, response.events, save)
    return response


async def _assemble_then(endpoint: str, events: AsyncIterator[dict[str, Any]],
                         save: Callable[[dict[str, Any]], None]) -> AsyncIterator[dict[str, Any]]:
    assembler = StreamAssembler(endpoint)
    failed = False
    async for event in events:
        if "error" in event:
            failed = True
        else:
            assembler.add(event)
        yield event
    if not failed:  # only reached when the stream ran to its end
        save(assembler.body())
