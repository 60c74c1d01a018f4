"""The soak: many mixed requests at a concurrency above the server's capacity, each outcome counted.

The mix (``plan_requests``) is seeded and covers what a busy server meets: /v1/completions and
/v1/chat/completions, streaming or not, random prompt lengths, ``max_tokens`` and ``n`` (1..4),
a few long system prompts shared by most requests (so the prefix cache is hit), an occasional stop
string, and about a fifth of the clients going away at a random point: after a random delay
(often before the answer, sometimes while the request is still being admitted) or, for streams,
after a random number of events.

``run_soak`` keeps ``concurrency`` clients busy until every planned request is sent. A client
whose request is refused with 429 waits until some other request finishes (or Retry-After seconds,
whichever comes first, capped at ``max_backoff_s``) before it sends its next one, as a polite
client would; it never retries the same request, so every planned request ends in exactly one
outcome. The server's own end
state (idle, no KV block held, memory back down) is checked by ``tokenmill.bench.soak_checks``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenmill.bench.workload import _WORDS
from tokenmill.errors import BenchError
from tokenmill.sse_parser import aiter_sse

# Every planned request ends in exactly one of these.
DONE = "done"  # a complete, well-formed answer
REJECTED = "rejected_429"  # refused with 429 (overload); must carry Retry-After
ABORTED = "aborted_by_client"  # the client closed the connection before the answer was complete
SERVER_ERROR = "server_error_5xx"
CLIENT_ERROR = "other_4xx"
TRANSPORT_ERROR = "transport_error"  # connect failure, reset, timeout
BAD_ANSWER = "bad_answer"  # 200 but malformed, missing choices, or an error event mid-stream
OUTCOMES = (DONE, REJECTED, ABORTED, SERVER_ERROR, CLIENT_ERROR, TRANSPORT_ERROR, BAD_ANSWER)
ACCEPTABLE = frozenset({DONE, REJECTED, ABORTED})

AFTER_DELAY = "after_delay"  # close the connection after a random delay (any request)
AFTER_EVENTS = "after_events"  # close a stream after a random number of SSE events


@dataclass(frozen=True)
class SoakMix:
    """What the planned requests look like (all ranges inclusive)."""

    seed: int = 0
    max_n: int = 4
    prompt_words: tuple[int, int] = (1, 120)
    """Words of each request's own text (after its shared system prompt, if any)."""
    max_tokens: tuple[int, int] = (1, 48)
    system_prompt_words: tuple[int, ...] = (120, 240, 360)
    """One shared system prompt per entry, of that many words."""
    shared_prefix_fraction: float = 0.8
    chat_fraction: float = 0.5
    stream_fraction: float = 0.5
    abort_fraction: float = 0.2
    abort_within_s: float = 2.0
    """A delayed disconnect happens uniformly within this many seconds of sending."""
    stop_fraction: float = 0.1

    def __post_init__(self) -> None:
        fractions = ("shared_prefix_fraction", "chat_fraction", "stream_fraction",
                     "abort_fraction", "stop_fraction")
        for name in fractions:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise BenchError(f"{name}={getattr(self, name)} must be between 0 and 1")
        for name in ("prompt_words", "max_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise BenchError(f"{name}={low},{high}: need 1 <= low <= high")
        if self.max_n < 1:
            raise BenchError(f"max_n={self.max_n} must be at least 1")


@dataclass(frozen=True)
class ClientAbort:
    kind: str  # AFTER_DELAY or AFTER_EVENTS
    delay_s: float = 0.0
    num_events: int = 0


@dataclass(frozen=True)
class SoakRequest:
    index: int
    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict[str, Any]
    abort: ClientAbort | None

    @property
    def n(self) -> int:
        return int(self.body.get("n", 1))

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def plan_requests(mix: SoakMix, num_requests: int, model: str) -> list[SoakRequest]:
    """The same list for the same mix and count (seeded)."""
    rng = random.Random(mix.seed)
    system_prompts = [f"You are assistant number {i}. Background: {_words(rng, words)}."
                      for i, words in enumerate(mix.system_prompt_words)]
    planned: list[SoakRequest] = []
    for index in range(num_requests):
        text = _words(rng, rng.randint(*mix.prompt_words))
        system = (rng.choice(system_prompts)
                  if system_prompts and rng.random() < mix.shared_prefix_fraction else None)
        chat = rng.random() < mix.chat_fraction
        stream = rng.random() < mix.stream_fraction
        max_tokens = rng.randint(*mix.max_tokens)
        body: dict[str, Any] = {"model": model, "n": rng.randint(1, mix.max_n),
                                "max_tokens": max_tokens, "stream": stream,
                                "temperature": rng.choice((0.0, 0.7, 1.0)),
                                "ignore_eos": rng.random() < 0.5}
        if chat:
            path = "/v1/chat/completions"
            messages = [{"role": "system", "content": system}] if system else []
            body["messages"] = [*messages, {"role": "user", "content": text}]
        else:
            path = "/v1/completions"
            body["prompt"] = f"{system}\n\n{text}" if system else text
        if rng.random() < mix.stop_fraction:
            body["stop"] = [rng.choice(("\n", ".", " the"))]
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        abort = None
        if rng.random() < mix.abort_fraction:
            if stream and rng.random() < 0.5:
                abort = ClientAbort(AFTER_EVENTS, num_events=rng.randint(0, max_tokens))
            else:
                abort = ClientAbort(AFTER_DELAY, delay_s=rng.uniform(0.0, mix.abort_within_s))
        planned.append(SoakRequest(index, path, body, abort))
    return planned


@dataclass
class SoakTally:
    """Outcome counts, plus a few examples of each failure (enough to debug, bounded)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    num_sent: int = 0
    num_429_without_retry_after: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def record(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if outcome not in ACCEPTABLE and detail:
            kept = self.examples.setdefault(outcome, [])
            if len(kept) < 5:
                kept.append(detail)

    @property
    def num_accounted(self) -> int:
        return sum(self.outcomes.values())

    @property
    def num_unacceptable(self) -> int:
        return sum(v for k, v in self.outcomes.items() if k not in ACCEPTABLE)

    @property
    def duration_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def summary(self) -> dict[str, Any]:
        return {"sent": self.num_sent, **{k: self.outcomes[k] for k in OUTCOMES},
                "429_without_retry_after": self.num_429_without_retry_after,
                "duration_s": round(self.duration_s, 1)}


class _Aborted(Exception):
    """Raised inside a request when its client decides to go away."""


def _check_json_answer(request: SoakRequest, data: Any) -> str | None:
    """What is wrong with a non-streamed 200 answer (None: nothing)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or len(choices) != request.n:
        return f"expected {request.n} choices, got {data!r:.300}"
    if any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return f"a choice has no finish_reason: {choices!r:.300}"
    if not isinstance(data.get("usage"), dict):
        return "no usage in the answer"
    return None


async def _read_stream(response: httpx.Response, request: SoakRequest) -> str | None:
    """Read a stream to its end (or to the planned disconnect); what is wrong with it, if any."""
    finished: set[int] = set()
    num_events = 0
    saw_done = False
    abort = request.abort
    async for sse in aiter_sse(response):  # the shared parser (tokenmill/sse_parser.py)
        if abort is not None and abort.kind == AFTER_EVENTS and num_events >= abort.num_events:
            raise _Aborted()
        num_events += 1
        payload = sse.data
        if payload.strip() == "[DONE]":
            saw_done = True
            continue
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            return f"malformed event {payload!r:.200}"
        if "error" in chunk:
            return f"error event: {chunk['error']!r:.300}"
        for choice in chunk.get("choices", []):
            if choice.get("finish_reason") is not None:
                finished.add(choice.get("index", 0))
    if not saw_done:
        return "the stream ended without data: [DONE]"
    if finished != set(range(request.n)):
        return f"finish_reason seen for choices {sorted(finished)} of {request.n}"
    return None


async def _exchange(client: httpx.AsyncClient, request: SoakRequest) -> tuple[str, str, float]:
    """Send one request; (outcome, detail, Retry-After seconds or 0)."""
    async with client.stream("POST", request.path, json=request.body) as response:
        status = response.status_code
        if status == 429:
            await response.aread()
            header = response.headers.get("retry-after")
            try:
                retry_after = float(header) if header is not None else -1.0
            except ValueError:
                retry_after = -1.0
            return REJECTED, "", retry_after
        if status >= 500:
            body = (await response.aread()).decode(errors="replace")
            return SERVER_ERROR, f"{status} on {request.path}: {body:.300}", 0.0
        if status != 200:
            body = (await response.aread()).decode(errors="replace")
            return CLIENT_ERROR, f"{status} on {request.path}: {body:.300}", 0.0
        if request.stream:
            problem = await _read_stream(response, request)
        else:
            raw = await response.aread()
            try:
                problem = _check_json_answer(request, json.loads(raw))
            except json.JSONDecodeError:
                problem = f"malformed JSON {raw[:200]!r}"
        if problem is not None:
            return BAD_ANSWER, f"{request.path} stream={request.stream}: {problem}", 0.0
        return DONE, "", 0.0


async def send_one(client: httpx.AsyncClient, request: SoakRequest) -> tuple[str, str, float]:
    """One request with its planned disconnect, if any; (outcome, detail, Retry-After)."""
    try:
        if request.abort is not None and request.abort.kind == AFTER_DELAY:
            try:
                # Cancelling the exchange closes its connection: the server sees a disconnect.
                return await asyncio.wait_for(_exchange(client, request), request.abort.delay_s)
            except TimeoutError:
                return ABORTED, "", 0.0
        return await _exchange(client, request)
    except _Aborted:
        return ABORTED, "", 0.0
    except httpx.TransportError as exc:
        return TRANSPORT_ERROR, f"{type(exc).__name__} on {request.path}: {exc}", 0.0


async def run_soak(base_url: str, requests: list[SoakRequest], concurrency: int, *,
                   request_timeout_s: float = 300.0, max_backoff_s: float = 10.0,
                   on_progress: Callable[[SoakTally], None] | None = None,
                   progress_every_s: float = 10.0) -> SoakTally:
    """Send every request with ``concurrency`` clients; returns the tally when all have ended."""
    if concurrency < 1:
        raise BenchError(f"concurrency={concurrency} must be at least 1")
    tally = SoakTally()
    pending = iter(requests)
    # Clients backing off after a 429, oldest first; each request that leaves the server wakes
    # one of them (waking all would turn every freed slot into a burst of fresh 429s).
    backing_off: deque[asyncio.Future[None]] = deque()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(request_timeout_s, connect=30.0)

    async def back_off(retry_after_s: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        backing_off.append(woken)
        try:
            await asyncio.wait_for(woken, min(retry_after_s, max_backoff_s)
                                   if retry_after_s > 0 else 1.0)
        except TimeoutError:
            if woken in backing_off:
                backing_off.remove(woken)

    def wake_one() -> None:
        while backing_off:
            woken = backing_off.popleft()
            if not woken.done():  # a timed-out wait is cancelled before it leaves the queue
                woken.set_result(None)
                return

    async def client_loop(client: httpx.AsyncClient) -> None:
        for request in pending:
            tally.num_sent += 1
            outcome, detail, retry_after = await send_one(client, request)
            tally.record(outcome, detail)
            if outcome == REJECTED:
                if retry_after <= 0:
                    tally.num_429_without_retry_after += 1
                # Wait for capacity to free up somewhere, at most Retry-After seconds.
                await back_off(retry_after)
            else:
                wake_one()

    async def report() -> None:
        assert on_progress is not None
        while True:
            await asyncio.sleep(progress_every_s)
            on_progress(tally)

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        reporter = asyncio.create_task(report()) if on_progress is not None else None
        try:
            await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        finally:
            if reporter is not None:
                reporter.cancel()
    tally.finished = time.monotonic()
    return tally
