"""Grouped expert compute and routing against a plain per-token reference."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.fused_moe import FusedMoE
from tokenmill.layers.moe_router import route


def _finalize(moe):
    from tokenmill.layers.linear import MergedLinear
    from tokenmill.quant.registry import get_quant_method

    for name, module in moe.named_modules():
        if isinstance(module, MergedLinear):
            module.finalize(name, get_quant_method("auto"))


def _reference(hidden, w13, w2, weights, expert_ids):
    """One token and one chosen expert at a time: what the grouped compute must equal."""
    out = torch.zeros_like(hidden)
    size = w2.shape[2]
    for t in range(hidden.shape[0]):
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            gate_up = w13[e] @ hidden[t]
            act = torch.nn.functional.silu(gate_up[:size]) * gate_up[size:]
            out[t] += weights[t, j] * (w2[e] @ act)
    return out


@pytest.mark.parametrize("num_tokens", [1, 3, 37])
def test_grouped_experts_equal_per_token_reference(num_tokens):
    torch.manual_seed(0)
    num_experts, hidden_size, size, top_k = 6, 16, 24, 2
    moe = FusedMoE(num_experts, hidden_size, size, torch.float32, "cpu")
    w13 = torch.randn(num_experts, 2 * size, hidden_size) * 0.3
    w2 = torch.randn(num_experts, hidden_size, size) * 0.3
    moe.load("gate_up", None, w13)
    moe.load("down", None, w2)
    _finalize(moe)
    counts = torch.zeros(num_experts, dtype=torch.int64)
    moe.routed_tokens = counts
    hidden = torch.randn(num_tokens, hidden_size)
    weights, expert_ids = route(torch.randn(num_tokens, num_experts) * 3, top_k, True)
    out = moe(hidden, weights, expert_ids)
    expected = _reference(hidden, w13, w2, weights, expert_ids)
    assert (out - expected).abs().max().item() < 1e-5
    assert int(counts.sum()) == num_tokens * top_k
    assert counts.tolist() == torch.bincount(expert_ids.flatten(), minlength=num_experts).tolist()


def test_route_renormalizes_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    probs = torch.softmax(logits, dim=-1)
    weights, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(weights, probs[:, :2])
    weights, _ = route(logits, 2, renormalize=True)
    assert torch.allclose(weights, probs[:, :2] / probs[:, :2].sum())


def test_per_expert_loading_checks_shapes_and_indices():
    moe = FusedMoE(2, 8, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"shape \(2, 8, 8\), expected \(2, 8, 4\)"):
        moe.load("down", None, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(4, 7\), expected \(4, 8\)"):
        moe.load("gate", 0, torch.zeros(4, 7))
    with pytest.raises(ValueError, match="expert index 2 is out of range for num_experts=2"):
        moe.load("up", 2, torch.zeros(4, 8))
    moe.load("gate", 0, torch.zeros(4, 8))
    assert "0.up_proj" in moe.missing_load_names()
    assert "0.gate_proj" not in moe.missing_load_names()
