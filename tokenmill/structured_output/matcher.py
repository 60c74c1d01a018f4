"""``GrammarMatcher``: one request's place in its grammar, on the engine thread.

It lives on the engine ``Request`` (``request.grammar``), so the request stays the single unit of
per-request state: the matcher has consumed exactly the request's output tokens
(``num_consumed == request.num_output_tokens``, checked when a mask is built).

* Each step the core asks it for its row of the token bitmask (``fill_bitmask``); the runner only
  ever sees that row, never the matcher.
* After sampling, the scheduler feeds it the token (``accept``); once the grammar can take nothing
  more (``is_finished``) the request ends with finish_reason ``stop``.
* Preemption needs nothing: a preempted request keeps its output tokens and recomputes only their
  KV, so the matcher is already where the request is. ``rollback`` undoes consumed tokens for
  whoever takes tokens back (speculative decoding, a future feature).

llguidance never raises for grammar or token errors: the matcher enters an error state instead,
which ``accept`` reports as False, so one request's failure can never take the batch down.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class GrammarMatcher:
    def __init__(self, matcher: Any, eos_token_ids: tuple[int, ...], vocab_size: int,
                 describe: str = ""):
        self._matcher = matcher  # llguidance.LLMatcher, a deep copy of the compiled template
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        """Bits in its mask row (``bitmask_words(vocab_size)`` int32 words)."""
        self.describe = describe
        self.num_consumed = 0

    @property
    def is_finished(self) -> bool:
        """The output is complete and nothing but end-of-sequence may follow."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def is_accepting(self) -> bool:
        """The output so far is complete (it may still go on, e.g. a regex ``a+``)."""
        return self._matcher.is_accepting()

    @property
    def is_error(self) -> bool:
        return self._matcher.is_error()

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    def accept(self, token_id: int) -> bool:
        """Consume a sampled token; False if the grammar does not allow it (an error state)."""
        ok = self._matcher.consume_token(token_id)
        if ok:
            self.num_consumed += 1
        return ok

    def rollback(self, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` consumed tokens (also out of a finished state)."""
        assert 0 <= num_tokens <= self.num_consumed, (num_tokens, self.num_consumed)
        if num_tokens and not self._matcher.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback failed: {self._matcher.get_error()}")
        self.num_consumed -= num_tokens

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (bit t set = token t allowed).

        A finished output can always end: end-of-sequence is allowed whenever the grammar
        accepts, whatever llguidance's mask says. A matcher in an error state allows only
        end-of-sequence, so its row is never empty (the scheduler then ends the request).
        """
        from llguidance.numpy import fill_next_token_bitmask

        if self._matcher.is_error():
            bitmask[row] = 0
            self._allow_eos(bitmask, row)
            return
        fill_next_token_bitmask(self._matcher, bitmask, row)
        if self._matcher.is_accepting():
            self._allow_eos(bitmask, row)

    def _allow_eos(self, bitmask: np.ndarray, row: int) -> None:
        words = bitmask[row].view(np.uint32)
        for token_id in self.eos_token_ids:
            words[token_id // 32] |= np.uint32(1 << (token_id % 32))

    def __repr__(self) -> str:
        return (f"GrammarMatcher({self.describe}, consumed={self.num_consumed}, "
                f"finished={self.is_finished}, error={self.is_error})")
