"""Prompt log probabilities: score the prompt's own next tokens from a prefill chunk's rows.

Row ``p`` of a prefill holds the model's prediction for position ``p + 1``; its log-softmax at
the actual prompt token is that token's log probability. A chunk's rows go through the LM head a
few at a time (``ROWS_PER_PASS``), and only what is returned (the token's log probability, its
rank, the top-k) is kept: a 512-row chunk of a 49k-token vocabulary would otherwise hold ~100 MB
of float32 logits at once.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.layers.sampler import TokenLogprobs

ROWS_PER_PASS = 32
"""Logit rows alive at once while scoring: 32 x vocab x 4 bytes (6 MB for a 49k vocabulary)."""


def score_prompt_rows(model: Any, hidden: torch.Tensor, rows: range, next_token_ids: list[int],
                      num_top: int) -> list[TokenLogprobs]:
    """One ``TokenLogprobs`` per row in ``rows``: the log probability of ``next_token_ids[i]``
    under row ``rows[i]``'s logits, its rank (1 = most likely) and the ``num_top`` likeliest."""
    assert len(rows) == len(next_token_ids), (rows, len(next_token_ids))
    scored: list[TokenLogprobs] = []
    for offset in range(0, len(rows), ROWS_PER_PASS):
        start = rows.start + offset
        stop = min(start + ROWS_PER_PASS, rows.stop)
        logprobs = torch.log_softmax(model.compute_logits(hidden[start:stop]), dim=-1)
        targets = torch.tensor(next_token_ids[offset: offset + stop - start],
                               device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])
        ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
        if num_top:
            top_values, top_ids = logprobs.topk(num_top, dim=1)
            tops = [list(zip(ids, values)) for ids, values in
                    zip(top_ids.tolist(), top_values.tolist())]
        else:
            tops = [[] for _ in range(stop - start)]
        for token_id, value, rank, top in zip(targets.tolist(), chosen[:, 0].tolist(), ranks,
                                              tops):
            scored.append(TokenLogprobs(token_id, value, rank, top))
    return scored
