"""What a request's token ids say about its progress, shared by the scheduler's ``Request`` and
the runner's ``CachedRequestState`` (worker/request_state.py), so both sides of the step contract
decide "does this step sample?" and "which prompt rows still need scores?" by one rule.

A class using it has ``prompt_token_ids``, ``output_token_ids``, ``all_token_ids``,
``sampling_params``, ``num_prompt_logprobs`` and ``is_prompt_only``.
"""

from __future__ import annotations


class TokenProgress:
    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def samples_at(self, end: int) -> bool:
        """Whether a step computing its tokens up to ``end`` samples a token for it."""
        return end == self.num_tokens and not self.is_prompt_only

    def prompt_logprob_positions(self, start: int, end: int) -> range:
        """Positions in ``[start, end)`` whose output scores the next prompt token and is still
        missing (row ``p`` holds the log probability of prompt token ``p + 1``)."""
        if self.sampling_params.prompt_logprobs is None:
            return range(0)
        first = max(start, self.num_prompt_logprobs)
        return range(first, max(first, min(end, self.num_prompt_tokens - 1)))
