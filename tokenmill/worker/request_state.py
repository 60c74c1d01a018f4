"""The model runner's own record of each request it holds, kept up to date from the step diffs.

The scheduler sends a request once in full (``NewRequestData``) and then only what changed
(``CachedRequestData``); ``RequestStates.update`` applies a step's message, so the runner (in this
process or a worker process) never reads the engine's ``Request``. It holds just what building a
batch needs: token ids, block table, progress, sampling params, and which prompt rows are still to
be scored. Dropped when the request finishes or is preempted (a resumed request comes back new).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.scheduler_output import NewRequestData, SchedulerOutput
from tokenmill.engine.token_progress import TokenProgress
from tokenmill.sampling_params import SamplingParams


@dataclass
class CachedRequestState(TokenProgress):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[int]
    num_computed_tokens: int
    is_prompt_only: bool
    pooling: str | None = None
    num_prompt_logprobs: int = 0
    """Prompt positions scored so far (advanced by the runner as it scores them)."""
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_new(cls, new: NewRequestData) -> CachedRequestState:
        return cls(
            request_id=new.request_id, prompt_token_ids=list(new.prompt_token_ids),
            sampling_params=new.sampling_params, eos_token_id=new.eos_token_id,
            block_ids=list(new.block_ids), num_computed_tokens=new.num_computed_tokens,
            is_prompt_only=new.is_prompt_only, pooling=new.pooling,
            num_prompt_logprobs=new.num_prompt_logprobs,
            output_token_ids=list(new.output_token_ids),
            all_token_ids=[*new.prompt_token_ids, *new.output_token_ids])

    def append_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)


class RequestStates(dict[str, CachedRequestState]):
    """request id -> its state, kept in step with the scheduler by ``update``."""

    def update_from(self, output: SchedulerOutput) -> None:
        """Apply one step's message, before its batch is built: forget, add, then advance."""
        for request_id in output.finished_request_ids | output.preempted_request_ids:
            self.pop(request_id, None)  # unknown ids: aborted before they ever ran
        for new in output.scheduled_new_requests:
            self[new.request_id] = CachedRequestState.from_new(new)
        for request_id, new_token_ids, new_block_ids, num_computed in \
                output.scheduled_cached_requests:
            state = self[request_id]
            if new_token_ids:
                state.append_token_ids(new_token_ids)
            state.block_ids.extend(new_block_ids)
            state.num_computed_tokens = num_computed
