"""Sampler edge cases that once reached the engine thread and killed it."""

from __future__ import annotations

import torch

from tokenmill.layers.sampler import Sampler, SamplingBatch
from tokenmill.sampling_params import SamplingParams


def _sample(params: SamplingParams, vocab: int = 32) -> int:
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    batch = SamplingBatch([params], [[1, 2]], [[]], [[]])
    tokens, _ = Sampler(torch.device("cpu"))(logits, batch)
    return tokens[0]


def test_top_k_beyond_int64_means_every_token():
    # Found by fuzzing the server: top_k=2e28 passes validation (any integer >= 1) and made
    # torch.tensor overflow ("Overflow when unpacking long long") inside the engine.
    huge = SamplingParams(temperature=1.0, top_k=20835500868236092150510518272, seed=3)
    off = SamplingParams(temperature=1.0, top_k=0, seed=3)
    assert _sample(huge) == _sample(off)
