"""The routed-token counters and the windowed expert-load imbalance, without a model."""

from __future__ import annotations

import torch

from tokenmill.models.moe_stats import ExpertRoutingCounter


def test_counts_accumulate_and_imbalance_uses_the_latest_complete_window():
    counter = ExpertRoutingCounter([1, 3], num_experts=4, top_k=2, device="cpu", window_tokens=4)
    empty = counter.snapshot()
    assert empty.imbalance == (0.0, 0.0) and empty.layer_ids == (1, 3)
    # 2 tokens x top-2: the running window (not yet complete) is reported
    counter.row(0).add_(torch.tensor([2, 2, 0, 0]))
    counter.row(1).add_(torch.tensor([1, 1, 1, 1]))
    running = counter.snapshot()
    assert running.imbalance == (2.0, 1.0)
    # 2 more tokens: 4 tokens x 2 = 8 assignments close the first window
    counter.row(0).add_(torch.tensor([4, 0, 0, 0]))
    counter.row(1).add_(torch.tensor([1, 1, 1, 1]))
    closed = counter.snapshot()
    assert closed.routed_tokens == ((6, 2, 0, 0), (2, 2, 2, 2))
    assert closed.imbalance == (3.0, 1.0)  # max 6 / mean 2
    # a new, still running window does not replace the complete one
    counter.row(0).add_(torch.tensor([1, 1, 1, 1]))
    counter.row(1).add_(torch.tensor([4, 0, 0, 0]))
    later = counter.snapshot()
    assert later.imbalance == (3.0, 1.0)
    assert [sum(row) for row in later.routed_tokens] == [12, 12]
