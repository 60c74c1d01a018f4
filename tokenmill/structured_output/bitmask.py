"""The token bitmask of one engine step: built by the core from the matchers, applied by the
sampler to the logits.

What crosses from the core to the runner is plain data (habit 14): the ids of the requests that
sample under a grammar this step and one int32 row per request, bit ``t`` of a row set when token
``t`` may come next (llguidance's layout: ``ceil(vocab / 32)`` words per row, little-endian bits).
Rows of free requests are simply absent, so a batch mixing constrained and free requests leaves the
free ones' logits untouched.

The mask is applied with plain torch ops (unpack the bits, ``masked_fill``), not llguidance's
torch.compile'd helper: no compile step at start-up, and the same code on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.structured_output.matcher import GrammarMatcher


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


@dataclass
class GrammarBitmask:
    request_ids: list[str]
    """Row i of ``bitmask`` belongs to ``request_ids[i]``."""
    bitmask: np.ndarray
    """int32 [len(request_ids), ceil(vocab / 32)]."""


def build_grammar_bitmask(constrained: list[tuple[str, GrammarMatcher]]
                          ) -> GrammarBitmask | None:
    """One row per (request id, matcher) that samples this step; None when there is none."""
    if not constrained:
        return None
    words = max(bitmask_words(m.vocab_size) for _, m in constrained)
    bitmask = np.zeros((len(constrained), words), dtype=np.int32)
    for row, (_, matcher) in enumerate(constrained):
        matcher.fill_bitmask(bitmask, row)
    return GrammarBitmask([request_id for request_id, _ in constrained], bitmask)


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [rows, words] -> bool [rows, vocab_size]; tokens past the mask are not allowed."""
    rows, words = bitmask.shape
    bits = _BITS.to(bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).view(rows, words * 32).bool()
    if words * 32 >= vocab_size:
        return allowed[:, :vocab_size]
    padding = torch.zeros(rows, vocab_size - words * 32, dtype=torch.bool, device=bitmask.device)
    return torch.cat([allowed, padding], dim=1)


def apply_grammar_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor
                          ) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf in the given rows (in place), and return them.

    A row that the other logit processing already emptied (min_tokens banning end-of-sequence
    when the grammar allows only that) keeps the grammar's choice: the grammar wins, so the
    output stays valid and the request can end."""
    allowed = allowed_tokens(bitmask, logits.shape[1])
    selected = logits.index_select(0, rows)
    masked = selected.masked_fill(~allowed, float("-inf"))
    empty = torch.isinf(masked).all(dim=-1) & allowed.any(dim=-1)
    if bool(empty.any()):
        masked[empty] = torch.where(allowed[empty], 0.0, float("-inf"))
    logits.index_copy_(0, rows, masked)
    return logits
