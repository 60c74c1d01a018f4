"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

TTFT runs from just before the request is sent to the first chunk that carries non-empty text;
each later non-empty chunk adds one inter-token latency (ITL). Token counts come from the server's
``usage`` when it sends one (we ask with ``stream_options.include_usage``), else we count content
chunks, which is exact for servers that send one token per chunk (vLLM, llama.cpp, tokenmill).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from tokenmill.bench.workload import BenchRequest
from tokenmill.errors import BenchError
from tokenmill.sse_parser import SSEParser, aiter_sse


@dataclass
class RequestResult:
    index: int
    start_s: float  # send time relative to the start of its level
    ok: bool = False
    error_kind: str | None = None  # connect, timeout, http_500, malformed_sse, stream_error, ...
    error_message: str | None = None
    ttft_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int = 0
    prompt_tokens_source: str = "tokenizer"  # or "usage"
    output_tokens: int = 0
    output_tokens_source: str = "chunks"  # or "usage"

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for one-token outputs)."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tpot_s"] = self.tpot_s
        return data


@dataclass(frozen=True)
class Target:
    base_url: str  # without the trailing /v1
    model: str | None
    send_usage_request: bool = True
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def normalize_base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BenchError(f"--base-url {url!r} must start with http:// or https://")
    return url.removesuffix("/v1")


def request_body(target: Target, request: BenchRequest) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"max_tokens": request.max_tokens, "stream": True,
                            "temperature": target.temperature}
    if target.model:
        body["model"] = target.model
    if target.send_usage_request:
        body["stream_options"] = {"include_usage": True}
    if target.ignore_eos:
        body["ignore_eos"] = True  # vLLM / llama.cpp extension: always produce max_tokens
    if request.endpoint == "chat":
        body["messages"] = request.messages
        return "/v1/chat/completions", body
    body["prompt"] = request.prompt
    return "/v1/completions", body


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        error = data.get("error", data)
        message = error.get("message") if isinstance(error, dict) else error
        return str(message or data)[:300]
    except (ValueError, AttributeError):
        return raw.decode(errors="replace").strip()[:300] or "(empty body)"


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(client: httpx.AsyncClient, target: Target, request: BenchRequest,
                       level_start: float) -> RequestResult:
    path, body = request_body(target, request)
    sent = time.perf_counter()
    result = RequestResult(index=request.index, start_s=sent - level_start,
                           prompt_tokens=request.prompt_tokens)
    last_token_at: float | None = None
    num_chunks = 0
    finished = False
    try:
        async with client.stream("POST", target.base_url + path, json=body,
                                 headers=target.headers()) as response:
            if response.status_code != 200:
                raw = await response.aread()
                result.error_kind = f"http_{response.status_code}"
                result.error_message = _error_message(raw)
                return result
            parser = SSEParser()
            async for sse in aiter_sse(response, parser, keep_unterminated=True):
                if parser.unknown_lines:
                    line = parser.unknown_lines[0]
                    result.error_kind = "malformed_sse"
                    result.error_message = f"not an SSE line: {line[:120]!r}"
                    return result
                payload = sse.data
                if payload.strip() == "[DONE]":
                    finished = True  # (also when the last event lacked its closing blank line)
                    break
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    result.error_kind = "malformed_sse"
                    result.error_message = f"event data is not JSON: {payload[:120]!r}"
                    return result
                if not isinstance(chunk, dict):
                    result.error_kind = "malformed_sse"
                    result.error_message = f"event data is not a JSON object: {payload[:120]!r}"
                    return result
                if "error" in chunk:
                    result.error_kind = "stream_error"
                    result.error_message = _error_message(payload.encode())
                    return result
                now = time.perf_counter()
                if _chunk_text(chunk):
                    num_chunks += 1
                    if last_token_at is None:
                        result.ttft_s = now - sent
                    else:
                        result.itls_s.append(now - last_token_at)
                    last_token_at = now
                for choice in chunk.get("choices") or []:
                    finished = finished or bool(choice.get("finish_reason"))
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    if usage.get("completion_tokens") is not None:
                        result.output_tokens = int(usage["completion_tokens"])
                        result.output_tokens_source = "usage"
                    if usage.get("prompt_tokens") is not None:
                        result.prompt_tokens = int(usage["prompt_tokens"])
                        result.prompt_tokens_source = "usage"
            if parser.unknown_lines and not finished:
                result.error_kind = "malformed_sse"
                result.error_message = f"not an SSE line: {parser.unknown_lines[0][:120]!r}"
                return result
    except httpx.ConnectError as exc:
        result.error_kind, result.error_message = "connect", str(exc) or "connection refused"
        return result
    except httpx.TimeoutException as exc:
        result.error_kind, result.error_message = "timeout", type(exc).__name__
        return result
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        result.error_kind, result.error_message = "disconnected", str(exc) or type(exc).__name__
        return result
    except httpx.HTTPError as exc:
        result.error_kind, result.error_message = "http_error", str(exc) or type(exc).__name__
        return result
    result.e2e_s = time.perf_counter() - sent
    if result.output_tokens_source == "chunks":
        result.output_tokens = num_chunks
    if not finished:
        result.error_kind = "incomplete_stream"
        result.error_message = "the stream ended without [DONE] or a finish_reason"
    elif result.ttft_s is None:
        result.error_kind = "no_output"
        result.error_message = "the server finished without sending any text"
    else:
        result.ok = True
    return result


async def discover_model(client: httpx.AsyncClient, target: Target) -> str | None:
    """Check the server answers and, if no model was named, take the first one it serves."""
    try:
        response = await client.get(target.base_url + "/v1/models", headers=target.headers(),
                                    timeout=10.0)
    except httpx.ConnectError as exc:
        raise BenchError(f"cannot reach {target.base_url}: {exc or 'connection refused'}") from exc
    except httpx.TimeoutException as exc:
        raise BenchError(f"{target.base_url} did not answer GET /v1/models within 10 s") from exc
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot talk to {target.base_url}: {exc}") from exc
    if target.model:
        return target.model
    if response.status_code != 200:
        raise BenchError(f"GET {target.base_url}/v1/models answered {response.status_code}; "
                         "pass --model NAME")
    try:
        models = response.json()["data"]
        return str(models[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BenchError(f"{target.base_url}/v1/models lists no model; pass --model NAME") from exc
