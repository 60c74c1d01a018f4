"""What passes between scheduler, model runner and frontend in one engine step.

``schedule() -> SchedulerOutput -> runner -> RunnerOutput -> update_from_output() ->
list[EngineCoreOutput]``. Plain dataclasses with no torch in them, so each side can be tested with
hand-written values. The core adds the step's grammar bitmask (structured output) to the
``SchedulerOutput`` before the runner sees it: an id list and a numpy array, never a matcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.engine.request import Request
from tokenmill.structured_output.bitmask import GrammarBitmask

if TYPE_CHECKING:
    from tokenmill.layers.sampler import TokenLogprobs


@dataclass
class SchedulerOutput:
    num_scheduled_tokens: dict[str, int]
    """request id -> tokens to compute this step (a prefill chunk, a whole prompt, or 1 decode)."""
    scheduled_requests: list[Request]
    """Batch order: running requests first, then newly admitted ones."""
    num_computed_tokens: dict[str, int]
    """request id -> tokens already computed before this step (position of its first new token)."""
    block_ids: dict[str, list[int]]
    """request id -> its block table for this step: a copy, so an abort while the step runs
    (which empties ``request.block_ids``) cannot pull it from under the runner."""
    total_num_scheduled_tokens: int
    finished_request_ids: set[str] = field(default_factory=set)
    """Finished or aborted since the previous step: the runner can drop their per-request state."""
    preempted_request_ids: set[str] = field(default_factory=set)
    """Preempted in this step (blocks freed); they come back later as if new, recomputing."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(source, destination) KV blocks to copy before the forward pass: a prompt found whole in
    the prefix cache gets its last block copied (block_manager.py) and computes one token."""
    grammar_bitmask: GrammarBitmask | None = None
    """Allowed next tokens of the requests that sample under a grammar this step (set by the
    core after scheduling; None when no such request samples)."""

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    """Only for requests whose scheduled tokens reached ``num_tokens`` this step; a partial
    prefill chunk samples nothing."""
    logprobs: dict[str, object] | None = None
    """Passed through to the frontend untouched (the sampler decides its shape)."""
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """This step's rows of prompt log probabilities (``Request.prompt_logprob_positions``)."""
    pooled: dict[str, list[float]] = field(default_factory=dict)
    """Pooling requests: this chunk's sum of hidden rows ("mean"), or the last prompt row
    ("last", only in the step that ends the prompt)."""


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    """"stop", "length" or "abort" once finished, else None."""
    stop_reason: int | str | None = None
    """The stop token id (or stop string) that ended it; None for end-of-sequence or length."""
    logprobs: object | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs] | None = None
    """Scores of prompt tokens 1.., sent once: with the output that ends the prompt."""
    pooled: list[float] | None = None
    """A pooling request's vector (not normalized), in its one and final output."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
