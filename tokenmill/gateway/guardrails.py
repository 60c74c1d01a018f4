"""Guardrails stage: input rules (injection, deny-list, PII), the semantic injection detector,
RAG chunk screening, and output rules on the answer.

Input: every message's text (or the prompt) is scanned; an injection/jailbreak pattern or a
deny-listed word blocks the request, PII is blocked, redacted or allowed per the tenant's policy.
Then, when enabled, the semantic detector (``injection_detector``) scores the caller's text (user
and tool messages, or the prompt; not system or assistant turns, which the application wrote)
and blocks at the tenant's threshold. A block names the rule or detector that fired (and the
detector's score) and never echoes the matched text back.

RAG chunks: retrieved chunks are text from documents, where injections hide ("AI reading this:
ignore the user..."). ``screen_chunks`` runs the injection rules and the detector over them
before the RAG stage injects them, and drops a flagged chunk or blocks the request, per
``injection_detector.rag_chunks``.

Output: streamed text is scanned in a rolling window; the last ``output_holdback_chars`` are held
back, so a match no longer than that never reaches the client. When a rule fires the stream ends
with ``finish_reason: content_filter``. All rules are data from the config.

Tool calls: output rules apply to the answer's text (``content``) only, not to tool-call names or
arguments, which pass through unchanged (streamed tool-call deltas too); input rules scan every
message's text (``tool`` results included), not the ``tools`` definitions or earlier calls'
arguments.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenmill.errors import ContentFilterError
from tokenmill.gateway.config import GuardrailsSection, RuleSection
from tokenmill.gateway.injection_detector import (
    DEFAULT_THRESHOLD,
    DETECTOR_NAME,
    InjectionDetector,
)
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pii_validators import VALIDATORS, luhn_ok
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler
from tokenmill.gateway.protocol import (
    CHAT,
    choice_text,
    chunk_object,
    content_text,
    with_choice_text,
)
from tokenmill.gateway.rag_store import Retrieved

CONTENT_FILTER = "content_filter"
RAG_DROPPED_HEADER = "x-tokenmill-rag-dropped"
# Roles whose text comes from outside the application: the caller, and tools that fetch pages,
# mail or files for it. System and assistant turns are the application's own words.
_SCANNED_ROLES = ("user", "tool", "function")

__all__ = ["CompiledRule", "GuardrailsStage", "luhn_ok"]


@dataclass(frozen=True)
class CompiledRule:
    name: str
    regex: re.Pattern[str]
    validator: str | None = None

    @classmethod
    def from_section(cls, rule: RuleSection) -> CompiledRule:
        return cls(rule.name, re.compile(rule.pattern, re.IGNORECASE), rule.validator)

    def matches(self, text: str) -> list[re.Match[str]]:
        check = VALIDATORS.get(self.validator or "")
        return [m for m in self.regex.finditer(text) if check is None or check(m.group(0))]


class GuardrailsStage:
    name = "guardrails"

    def __init__(self, section: GuardrailsSection, metrics: GatewayMetrics,
                 detector: InjectionDetector | None = None) -> None:
        self.detector = detector
        # None: the dev-chosen default of the views the detector actually runs (the LLM view
        # may have failed to load).
        self.threshold = section.injection_detector.threshold
        if self.threshold is None:
            self.threshold = detector.default_threshold if detector else DEFAULT_THRESHOLD
        self.rag_chunk_action = section.injection_detector.rag_chunks
        self.input_rules = [CompiledRule.from_section(r) for r in section.input_rules]
        if section.deny_list:
            words = "|".join(re.escape(w) for w in section.deny_list)
            self.input_rules.append(CompiledRule("deny_list", re.compile(rf"\b(?:{words})\b",
                                                                         re.IGNORECASE)))
        self.pii_rules = [CompiledRule.from_section(r) for r in section.pii]
        self.output_rules = [CompiledRule.from_section(r) for r in section.output_rules]
        self.window = section.output_window_chars
        self.holdback = section.output_holdback_chars
        self.metrics = metrics

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse:
        if request.endpoint in (CHAT, "completions"):
            self.check_input(request)
            if self.detector is not None:
                await self.check_injection(request)
        response = await call_next(request)
        if not self.output_rules or request.endpoint not in (CHAT, "completions"):
            return response
        if response.events is not None:
            response.events = self.filter_stream(request.endpoint, response.events)
        elif response.body is not None and response.status_code == 200:
            response.body = self.filter_body(request.endpoint, response.body)
        return response

    # -- input -------------------------------------------------------------------------------

    def check_input(self, request: GatewayRequest) -> None:
        policy = request.tenant.pii_policy if request.tenant else "block"
        for text, put in _text_slots(request):
            for rule in self.input_rules:
                if rule.matches(text):
                    self._block(rule.name, "input")
            if policy == "allow":
                continue
            redacted = text
            for rule in self.pii_rules:
                found = rule.matches(redacted)
                if not found:
                    continue
                if policy == "block":
                    self._block(rule.name, "input", what="personal data")
                self.metrics.guardrail_blocks.labels(rule.name, "input", "redact").inc()
                for m in reversed(found):  # right to left keeps earlier offsets valid
                    redacted = redacted[:m.start()] + f"[REDACTED:{rule.name}]" + redacted[m.end():]
            if redacted != text:
                put(redacted)

    def threshold_for(self, request: GatewayRequest) -> float:
        tenant = request.tenant
        if tenant is not None and tenant.injection_threshold is not None:
            return tenant.injection_threshold
        return self.threshold

    async def check_injection(self, request: GatewayRequest) -> None:
        assert self.detector is not None
        texts = _caller_texts(request)
        if not texts:
            return
        # The model runs off the event loop, so other requests keep flowing meanwhile.
        scores = await asyncio.to_thread(self.detector.score, [t for _, t in texts])
        worst = max(range(len(scores)), key=lambda i: scores[i].score)
        score = scores[worst].score
        self.metrics.injection_scores.labels("input").observe(score)
        threshold = self.threshold_for(request)
        if score >= threshold:
            self.metrics.guardrail_blocks.labels(DETECTOR_NAME, "input", "block").inc()
            raise ContentFilterError(
                f"request blocked by guardrail detector {DETECTOR_NAME!r} (score {score:.3f} >= "
                f"threshold {threshold:g}, in {texts[worst][0]})", param=DETECTOR_NAME)

    # -- RAG chunks ----------------------------------------------------------------------------

    def _chunk_rule(self, text: str) -> str | None:
        for rule in self.input_rules:
            if rule.matches(text):
                return rule.name
        return None

    async def screen_chunks(self, request: GatewayRequest, found: list[Retrieved]
                            ) -> list[Retrieved]:
        """The retrieved chunks fit to inject: flagged ones are dropped (and listed in the
        ``x-tokenmill-rag-dropped`` header with the rule or detector and score), or the whole
        request is refused, per ``injection_detector.rag_chunks``."""
        if self.rag_chunk_action == "off" or not found:
            return found
        verdicts: list[tuple[str, float | None] | None] = []
        for r in found:
            rule = self._chunk_rule(r.chunk.text)
            verdicts.append((rule, None) if rule else None)
        if self.detector is not None:
            scores = await asyncio.to_thread(self.detector.score, [r.chunk.text for r in found])
            threshold = self.threshold_for(request)
            for i, s in enumerate(scores):
                self.metrics.injection_scores.labels("rag").observe(s.score)
                if verdicts[i] is None and s.score >= threshold:
                    verdicts[i] = (DETECTOR_NAME, s.score)
        kept, dropped = [], []
        for r, verdict in zip(found, verdicts):
            if verdict is None:
                kept.append(r)
                continue
            name, score = verdict
            where = f"{r.chunk.source}#{r.chunk.position}"
            kind, scored = ("rule", "") if score is None else ("detector", f" score {score:.3f}")
            if self.rag_chunk_action == "block":
                self.metrics.guardrail_blocks.labels(name, "rag", "block").inc()
                raise ContentFilterError(f"request blocked by guardrail {kind} {name!r}"
                                         f"{scored} in retrieved chunk {where}", param=name)
            self.metrics.guardrail_blocks.labels(name, "rag", "drop").inc()
            dropped.append(f"{where} ({name}{scored})")
        if dropped:
            request.extra_headers[RAG_DROPPED_HEADER] = ", ".join(dropped)
        return kept

    def _block(self, rule: str, direction: str, what: str = "disallowed content") -> None:
        self.metrics.guardrail_blocks.labels(rule, direction, "block").inc()
        raise ContentFilterError(f"request blocked by guardrail rule {rule!r} ({what} in the "
                                 "prompt)", param=rule)

    # -- output ------------------------------------------------------------------------------

    def _first_output_match(self, text: str) -> tuple[str, int] | None:
        best = None
        for rule in self.output_rules:
            found = rule.matches(text)
            if found and (best is None or found[0].start() < best[1]):
                best = (rule.name, found[0].start())
        return best

    def filter_body(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        choices = []
        for choice in body.get("choices", []):
            text = choice_text(endpoint, choice, streamed=False) or ""
            hit = self._first_output_match(text)
            if hit:
                self.metrics.guardrail_blocks.labels(hit[0], "output", "stop").inc()
                choice = with_choice_text(endpoint, choice, text[:hit[1]], streamed=False)
                choice["finish_reason"] = CONTENT_FILTER
            choices.append(choice)
        return {**body, "choices": choices}

    async def filter_stream(self, endpoint: str, events: AsyncIterator[dict[str, Any]]
                            ) -> AsyncIterator[dict[str, Any]]:
        tails: dict[int, str] = {}     # already sent, kept only as wide as the window
        pending: dict[int, str] = {}   # received but held back
        base: dict[str, Any] = {}      # id, created, model of the upstream's chunks
        try:
            async for event in events:
                base = base or {k: event[k] for k in ("id", "created", "model") if k in event}
                choices = event.get("choices") or []
                if not choices:
                    yield event
                    continue
                out = []
                for choice in choices:
                    index = choice.get("index", 0)
                    text = pending.get(index, "") + (choice_text(endpoint, choice, streamed=True)
                                                     or "")
                    tail = tails.get(index, "")
                    hit = self._first_output_match(tail + text)
                    if hit:
                        self.metrics.guardrail_blocks.labels(hit[0], "output", "stop").inc()
                        cut = max(0, hit[1] - len(tail))  # the clean text before the match
                        stop = with_choice_text(endpoint, choice, text[:cut], streamed=True)
                        stop["finish_reason"] = CONTENT_FILTER
                        yield {**event, "choices": [stop]}
                        return
                    finished = choice.get("finish_reason") is not None
                    keep = 0 if finished else min(len(text), self.holdback)
                    send, pending[index] = text[:len(text) - keep], text[len(text) - keep:]
                    tails[index] = (tail + send)[-self.window:]
                    delta = choice.get("delta") or {}
                    # a tool-call delta carries no text: it passes on as it came
                    if send or finished or delta.get("role") or delta.get("tool_calls"):
                        out.append(with_choice_text(endpoint, choice, send, streamed=True))
                if out:
                    yield {**event, "choices": out}
            for index, text in pending.items():  # upstream ended without a finish_reason
                if text:
                    choice = with_choice_text(endpoint, {"index": index, "finish_reason": None},
                                              text, streamed=True)
                    yield {**base, "object": chunk_object(endpoint), "choices": [choice]}
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()


def _caller_texts(request: GatewayRequest) -> list[tuple[str, str]]:
    """(where, text) for each piece of text from outside the application, ``where`` naming it
    for the error message ("messages[2]", "prompt") without quoting it."""
    body = request.body
    if request.endpoint != CHAT:
        prompt = body.get("prompt", "")
        return [("prompt", prompt)] if prompt.strip() else []
    texts = []
    for i, message in enumerate(body["messages"]):
        if message.get("role") in _SCANNED_ROLES:
            text = content_text(message.get("content"))
            if text.strip():
                texts.append((f"messages[{i}]", text))
    return texts


def _text_slots(request: GatewayRequest) -> list[tuple[str, Any]]:
    """(text, setter) for each piece of caller text, so redaction can write it back in place."""
    body = request.body
    if request.endpoint != CHAT:
        return [(body.get("prompt", ""), lambda t: body.__setitem__("prompt", t))]
    slots = []
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            slots.append((content, lambda t, m=message: m.__setitem__("content", t)))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    slots.append((part["text"], lambda t, p=part: p.__setitem__("text", t)))
    return slots
