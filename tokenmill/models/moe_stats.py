"""Tokens routed to each expert, and how unevenly: the MoE version of a straggler report.

Each sparse layer adds its per-expert token counts (the ``bincount`` its grouped compute needs
anyway) to one row of a ``[sparse layers, experts]`` counter on the model's device. Once per engine
step the engine takes a plain-data ``ExpertLoad`` snapshot for ``/metrics``:

* ``routed_tokens``: cumulative (token, expert) assignments per layer and expert, so each layer's
  row sums to tokens x top-k;
* ``imbalance``: per layer, max over experts / mean over experts of the assignments in the latest
  complete window of at least ``window_tokens`` tokens (the running window until the first one
  completes; 0 before any token). 1.0 is a perfect spread; ``num_experts / top_k`` is the worst
  (every token on the same k experts). A hot expert bounds a step's time the way a straggler does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_WINDOW_TOKENS = 1024


@dataclass(frozen=True)
class ExpertLoad:
    """A snapshot, plain data (it crosses to the server, later from a worker process)."""

    layer_ids: tuple[int, ...]
    """The decoder layers that are sparse, in the order of the rows below."""
    routed_tokens: tuple[tuple[int, ...], ...]
    """Cumulative: ``[layer row][expert]`` (token, expert) assignments."""
    imbalance: tuple[float, ...]
    """Per layer row: max / mean over experts of the latest window's assignments."""
    window_tokens: int


class ExpertRoutingCounter:
    def __init__(self, layer_ids: list[int], num_experts: int, top_k: int,
                 device: torch.device | str, window_tokens: int = DEFAULT_WINDOW_TOKENS):
        self.layer_ids = tuple(layer_ids)
        self.top_k = top_k
        self.window_tokens = window_tokens
        self.counts = torch.zeros(len(layer_ids), num_experts, dtype=torch.int64, device=device)
        self._window_start = torch.zeros_like(self.counts)
        self._last_window: torch.Tensor | None = None

    def row(self, position: int) -> torch.Tensor:
        """The counter row of the ``position``-th sparse layer (a view: adds land here)."""
        return self.counts[position]

    def snapshot(self) -> ExpertLoad:
        counts = self.counts.clone()
        running = counts - self._window_start
        # every sparse layer sees every token, so the first row tells the window's size
        if len(self.layer_ids) and int(running[0].sum()) >= self.window_tokens * self.top_k:
            self._last_window = running
            self._window_start = counts
        window = (running if self._last_window is None else self._last_window).double()
        mean = window.mean(dim=1)
        peak = window.max(dim=1).values if window.shape[1] else mean
        imbalance = torch.where(mean > 0, peak / mean.clamp(min=1e-30), torch.zeros_like(mean))
        return ExpertLoad(
            layer_ids=self.layer_ids,
            routed_tokens=tuple(tuple(row) for row in counts.tolist()),
            imbalance=tuple(imbalance.tolist()),
            window_tokens=self.window_tokens,
        )
