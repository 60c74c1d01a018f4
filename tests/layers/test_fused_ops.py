"""The native fused ops (RMSNorm, add+RMSNorm, rotary, SiLU-and-mul) equal their PyTorch reference
paths, and the whole model gives the same logits with them on and off."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.attention import causal_metadata
from tokenmill.layers.kernels import fused_ops
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RopeScaling, RotaryEmbedding

ROWS = [1, 3, 97]  # one decode token, a few, a prefill large enough to run in parallel
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def native():
    if fused_ops.fused_ops_module() is None:
        pytest.skip("the fused ops extension could not be built here")
    fused_ops.set_enabled(True)
    yield
    fused_ops.set_enabled(True)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    else:  # one bf16 rounding step apart at most (summation order, exp's last bit)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=1e-3)


def _norm(hidden: int, dtype: torch.dtype, weight_dtype: torch.dtype) -> RMSNorm:
    torch.manual_seed(1)
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden)).to(weight_dtype)
    return norm


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", [576, 37])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_in_float32", [False, True])
def test_rms_norm_matches_reference(rows, hidden, dtype, weight_in_float32):
    norm = _norm(hidden, dtype, torch.float32 if weight_in_float32 else dtype)
    x = (3 * torch.randn(rows, hidden)).to(dtype)
    with torch.inference_mode():
        _close(norm(x), norm.forward_reference(x))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", [576, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference_and_updates_residual(rows, hidden, dtype):
    norm = _norm(hidden, dtype, dtype)
    x = torch.randn(rows, hidden).to(dtype)
    residual = (2 * torch.randn(rows, hidden)).to(dtype)
    with torch.inference_mode():
        expected, expected_residual = norm.forward_reference(x, residual.clone())
        stream = residual.clone()
        out, new_residual = norm(x, stream)
    assert new_residual.data_ptr() == stream.data_ptr()  # updated in place
    assert torch.equal(new_residual, expected_residual)  # one add, rounded once in both paths
    _close(out, expected)


def test_rms_norm_accepts_a_strided_input():
    norm = _norm(64, torch.float32, torch.float32)
    x = torch.randn(64, 5).T  # last dimension not contiguous
    with torch.inference_mode():
        _close(norm(x), norm.forward_reference(x))


def _rotary(head_dim: int, dtype: torch.dtype, scaling: RopeScaling | None = None
            ) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, 4096, 10000.0, scaling or RopeScaling(), dtype, "cpu")


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (5, 1, 18)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference_in_place_on_fused_qkv_views(rows, heads, kv_heads, head_dim,
                                                               dtype):
    rotary = _rotary(head_dim, dtype)
    torch.manual_seed(2)
    # as the model holds them: views into one fused qkv row per token (strided over tokens)
    qkv = torch.randn(rows, heads + 2 * kv_heads, head_dim).to(dtype)
    positions = torch.randint(0, 4096, (rows,))
    query, key, value = qkv.split([heads, kv_heads, kv_heads], dim=1)
    expected_q, expected_k = rotary.forward_reference(positions, query, key)
    value_before = value.clone()
    with torch.inference_mode():
        q, k = rotary(positions, query, key)
    assert q.data_ptr() == query.data_ptr() and k.data_ptr() == key.data_ptr()
    assert torch.equal(value, value_before)  # the neighbouring heads are untouched
    _close(q, expected_q)
    _close(k, expected_k)


def test_rotary_with_llama3_scaling_matches_reference():
    scaling = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)
    rotary = _rotary(64, torch.float32, scaling)
    query, key = torch.randn(7, 4, 64), torch.randn(7, 2, 64)
    positions = torch.tensor([0, 1, 2, 100, 2000, 4000, 4095])
    expected = rotary.forward_reference(positions, query, key)
    with torch.inference_mode():
        actual = rotary(positions, query.clone(), key.clone())
    _close(actual[0], expected[0])
    _close(actual[1], expected[1])


def test_rotary_rejects_a_position_outside_the_table():
    rotary = _rotary(64, torch.float32)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        rotary(torch.tensor([4096]), torch.randn(1, 2, 64), torch.randn(1, 1, 64))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", [1536, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(rows, width, dtype):
    torch.manual_seed(3)
    gate_up = (4 * torch.randn(rows, 2 * width)).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamped range and zero
    act = SiluAndMul()
    with torch.inference_mode():
        _close(act(gate_up), act.forward_reference(gate_up))


def test_switched_off_the_modules_take_the_reference_path():
    norm = _norm(576, torch.float32, torch.float32)
    x = torch.randn(2, 576)
    fused_ops.set_enabled(False)
    assert fused_ops.usable(x) is None and fused_ops.describe() == "off"
    with torch.inference_mode():
        assert torch.equal(norm(x), norm.forward_reference(x))


def test_model_logits_with_fused_ops_on_and_off_agree(builtin_source, builtin_model):
    """fp32, dequantized weights: the fused ops change only rounding order."""
    ids = builtin_source.tokenizer.encode("The capital of France is Paris. The capital of Italy")
    batch = [ids, ids[:5]]  # two sequences flattened: several rows per op
    flat = torch.tensor([t for seq in batch for t in seq])
    positions = torch.cat([torch.arange(len(seq)) for seq in batch])
    meta = causal_metadata([len(seq) for seq in batch])
    with torch.inference_mode():
        fused_ops.set_enabled(True)
        fused = builtin_model.compute_logits(builtin_model(flat, positions, meta))
        fused_ops.set_enabled(False)
        reference = builtin_model.compute_logits(builtin_model(flat, positions, meta))
    diff = (fused - reference).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff:.2e}"
    assert torch.equal(fused.argmax(-1), reference.argmax(-1))
