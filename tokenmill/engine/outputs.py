"""What the engine hands back to its callers: one ``RequestOutput`` per request per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.stats import RequestStats
from tokenmill.layers.sampler import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str = ""  # everything generated so far
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""  # what this step added (for streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    delta_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: list[RequestStats] = field(default_factory=list)  # one per sample, when finished

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
