"""What passes between scheduler, model runner and frontend in one engine step.

``schedule() -> SchedulerOutput -> executor -> RunnerOutput -> update_from_output() ->
list[EngineCoreOutput]``. Plain data only (ids, ints, lists, ``SamplingParams``, a numpy bitmask):
no ``Request``, no torch tensor, so a step pickles cheaply to a worker process and each side can be
tested with hand-written values (docs/architecture.md, "The step contract"; vLLM v1's
``NewRequestData`` / ``CachedRequestData``):

* a request the runner does not hold yet (first scheduled, or resumed after a preemption) comes
  once, in full, as ``NewRequestData``;
* a request it holds gets only what changed since it was last scheduled (``CachedRequestData``):
  the tokens sampled since, its new KV blocks, and where its computation stands;
* ``finished_request_ids`` and ``preempted_request_ids`` tell the runner what to forget.

The runner keeps its own per-request copy (``tokenmill/worker/request_state.py``). The core adds
the step's grammar bitmask (structured output) before the executor sees it: an id list and a numpy
array, never a matcher.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.bitmask import GrammarBitmask

if TYPE_CHECKING:
    from tokenmill.layers.sampler import TokenLogprobs
    from tokenmill.models.moe_stats import ExpertLoad


@dataclass
class NewRequestData:
    """Everything the runner needs about a request it does not hold yet."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Empty for a first admission; what it had generated when it comes back from preemption
    (it recomputes prompt + output and carries on)."""
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[int]
    """Its whole block table as admitted (prefix-cache hits first)."""
    num_computed_tokens: int
    """Tokens already in its blocks (a prefix-cache hit) before this step."""
    is_prompt_only: bool
    """Nothing is sampled for it (pooling, or max_tokens 0 to score the prompt)."""
    pooling: str | None = None
    num_prompt_logprobs: int = 0
    """Prompt positions already scored (a resumed request does not score them again)."""


@dataclass
class CachedRequestData:
    """Per-step diffs of the requests the runner already holds, as columns (one entry per request,
    in batch order), as vLLM v1 sends them: a few short lists pickle far cheaper than an object
    per request."""

    request_ids: list[str] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)
    """Tokens sampled since it was last scheduled (the runner's own output, accepted by the
    scheduler): at most one per step it was scheduled in."""
    new_block_ids: list[list[int]] = field(default_factory=list)
    """Blocks appended to its table for this step."""
    num_computed_tokens: list[int] = field(default_factory=list)

    def append(self, request_id: str, new_token_ids: list[int], new_block_ids: list[int],
               num_computed_tokens: int) -> None:
        self.request_ids.append(request_id)
        self.new_token_ids.append(new_token_ids)
        self.new_block_ids.append(new_block_ids)
        self.num_computed_tokens.append(num_computed_tokens)

    def __iter__(self) -> Iterator[tuple[str, list[int], list[int], int]]:
        return iter(zip(self.request_ids, self.new_token_ids, self.new_block_ids,
                        self.num_computed_tokens))

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass
class SchedulerOutput:
    num_scheduled_tokens: dict[str, int]
    """request id -> tokens to compute this step (a prefill chunk, a whole prompt, or 1 decode).
    Its order is the batch order: running requests first, then newly admitted ones."""
    total_num_scheduled_tokens: int
    scheduled_new_requests: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_requests: CachedRequestData = field(default_factory=CachedRequestData)
    finished_request_ids: set[str] = field(default_factory=set)
    """Finished or aborted since the previous step: the runner drops their state."""
    preempted_request_ids: set[str] = field(default_factory=set)
    """Preempted (blocks freed): the runner drops their state; they come back as new requests."""
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
    expert_load: ExpertLoad | None = None
    """An MoE model's routing counts after this step, from a worker process (rank 0); the
    in-process executor reads them from the model directly."""


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
