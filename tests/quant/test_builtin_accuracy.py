"""Quantization costs the built-in model almost nothing a user would notice: perplexity on prose the
code was never tuned on (benchmarks/data, Alice ch. I) stays within 2% of the dequantized float32
model, and the top-1 next-token choice agrees at >= 95% of positions.

benchmarks/perplexity.py prints the same figures over the whole text (6,098 tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import causal_metadata
from tokenmill.models.registry import build_model

TEXT = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "alice_ch1-2.txt"
WINDOW = 512


@pytest.fixture(scope="module")
def window_ids(builtin_source):
    return torch.tensor(builtin_source.tokenizer.encode(TEXT.read_text())[:WINDOW])


def _nll_and_argmax(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        hidden = model(ids, torch.arange(len(ids)), causal_metadata([len(ids)]))
        logits = model.compute_logits(hidden[:-1]).float()
    nll = torch.nn.functional.cross_entropy(logits, ids[1:]).item()
    return nll, logits.argmax(-1)


@pytest.fixture(scope="module")
def reference(builtin_model, window_ids):
    return _nll_and_argmax(builtin_model, window_ids)


@pytest.mark.parametrize("quantization,dtype", [
    ("auto", "auto"),  # the default: GGUF blocks, bf16 activations where the CPU has bf16
    ("auto", "float32"),
    ("int8", "float32"),
    ("int4", "float32"),
])
def test_quantized_model_keeps_perplexity_and_top1(builtin_source, window_ids, reference,
                                                   quantization, dtype):
    resolved = ModelConfig(dtype=dtype).resolved_dtype()
    model = build_model(builtin_source, getattr(torch, resolved), "cpu",
                        quantization=quantization)
    nll, argmax = _nll_and_argmax(model, window_ids)
    ref_nll, ref_argmax = reference
    ppl, ref_ppl = torch.tensor(nll).exp().item(), torch.tensor(ref_nll).exp().item()
    agreement = (argmax == ref_argmax).float().mean().item()
    assert abs(ppl / ref_ppl - 1) < 0.02, f"perplexity {ppl:.3f} vs {ref_ppl:.3f} ({resolved})"
    assert agreement >= 0.95, f"top-1 agreement {agreement:.3f} ({resolved})"
