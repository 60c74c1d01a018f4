"""GGUF's Q8_0 / Q4_0 / Q4_1 blocks are kept as they are: repacked bit for bit, never copied to float,
and the built-in model runs on them by default. Q5_0 / Q5_1 and the K-quants Q4_K / Q5_K / Q6_K are
converted into the kernels' groups within stated bounds of what the gguf package dequantizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tests.quant.gguf_block_bytes import random_blocks
from tokenmill.layers.linear import QuantizedOp
from tokenmill.quant.gguf import NATIVE_BLOCK_TYPES, block_weight
from tokenmill.quant.gguf_kquants import CONVERTED_BLOCK_TYPES


def _random_blocks(type_name: str, rows: int, cols: int) -> np.ndarray:
    """Raw rows of ``type_name`` blocks: the gguf package quantizes Q8_0 and Q4_1; Q4_0 (which it
    can only dequantize) is written byte by byte from ggml's layout: float16 d, then 16 bytes."""
    rng = np.random.default_rng(0)
    if type_name != "Q4_0":
        dense = rng.standard_normal((rows, cols)).astype(np.float32)
        return quantize(dense, GGMLQuantizationType[type_name])
    blocks = cols // 32
    scales = (rng.random((rows, blocks, 1)) * 0.1).astype(np.float16).view(np.uint8)
    nibbles = rng.integers(0, 256, (rows, blocks, 16), dtype=np.uint8)
    return np.concatenate((scales, nibbles), axis=-1).reshape(rows, blocks * 18)


@pytest.mark.parametrize("type_name", sorted(NATIVE_BLOCK_TYPES))
def test_blocks_repack_to_exactly_what_the_gguf_package_dequantizes(type_name):
    qtype = GGMLQuantizationType[type_name]
    rows, cols = 37, 160  # odd row count, 5 blocks per row
    raw = _random_blocks(type_name, rows, cols)
    weight = block_weight(type_name, raw, rows, cols)
    expected = torch.from_numpy(np.array(dequantize(raw, qtype), dtype=np.float32))
    assert torch.equal(weight.dequantize(torch.float32), expected)
    # no byte more than the file holds, except Q4_0's implicit "- 8", stored as a float16 min
    # per block so one 4-bit kernel serves Q4_0, Q4_1, int4 and GPTQ/AWQ (18 -> 20 bytes a block)
    extra = raw.nbytes // 9 if type_name == "Q4_0" else 0
    assert weight.nbytes() == raw.nbytes + extra


def _reference(raw: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType[type_name]),
                                     dtype=np.float32))


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1"])
def test_five_bit_blocks_convert_exactly(type_name):
    rows, cols = 37, 160
    raw = random_blocks(type_name, rows, cols)
    weight = block_weight(type_name, raw, rows, cols)
    assert weight.bits == 8 and weight.group_size == 32
    assert torch.equal(weight.dequantize(torch.float32), _reference(raw, type_name))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])
def test_k_quants_convert_within_float16_rounding_of_their_scales(type_name):
    """Each 32-element sub-block's scale ``d * sc`` and offset ``dmin * m`` (read here with the
    gguf package's own unpacking) become float16: each weight within 2^-11 of both, relative."""
    from gguf.quants import Q4_K

    rows, cols = 9, 768  # three super-blocks per row
    raw = random_blocks(type_name, rows, cols)
    weight = block_weight(type_name, raw, rows, cols)
    assert weight.bits == (4 if type_name == "Q4_K" else 8) and weight.group_size == 32
    blocks = raw.reshape(-1, CONVERTED_BLOCK_TYPES[type_name][1])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    top_code = 15 if type_name == "Q4_K" else 31
    bound = 2.0 ** -11 * (d * sc * top_code + dmin * m)  # [super-blocks, 8 sub-blocks]
    bound = torch.from_numpy(np.repeat(bound.reshape(rows, -1), 32, axis=1)) * 1.001 + 1e-9
    error = (weight.dequantize(torch.float32) - _reference(raw, type_name)).abs()
    assert (error <= bound).all(), f"worst {(error / bound).max():.3f} of the bound"
    assert error.max() > 0  # the rounding is real: the bound is not vacuous


def test_q6_k_is_requantized_exactly_as_the_gguf_package_makes_q8_0():
    """Q6_K's 16-element sub-blocks cannot share a 32-element scale exactly; the conversion is
    llama.cpp's Q8_0 rounding of the file's values, which the gguf package reproduces bit for bit."""
    rows, cols = 9, 768
    raw = random_blocks("Q6_K", rows, cols)
    weight = block_weight("Q6_K", raw, rows, cols)
    assert weight.bits == 8 and weight.group_size == 32 and weight.mins is None
    reference = _reference(raw, "Q6_K")
    q8_0 = GGMLQuantizationType.Q8_0
    as_q8_0 = torch.from_numpy(np.array(dequantize(quantize(reference.numpy(), q8_0), q8_0)))
    assert torch.equal(weight.dequantize(torch.float32), as_q8_0)
    # which is within 0.56 of a step (max|w| / 127 per 32 weights) of the file's values
    step = reference.view(rows, -1, 32).abs().amax(-1, keepdim=True) / 127
    bound = (step * (0.5 + 127 * 2.0 ** -11)).expand(-1, -1, 32).reshape(rows, cols)
    assert ((weight.dequantize(torch.float32) - reference).abs() <= bound + 1e-9).all()


def test_converted_types_cost_a_fraction_of_float32():
    rows, cols = 64, 512
    for type_name in CONVERTED_BLOCK_TYPES:
        weight = block_weight(type_name, random_blocks(type_name, rows, cols), rows, cols)
        bytes_per_weight = weight.nbytes() / (rows * cols)
        assert bytes_per_weight <= (0.625 if type_name == "Q4_K" else 1.125), type_name


def test_a_row_that_is_not_whole_super_blocks_is_refused():
    raw = np.zeros((2, 144), dtype=np.uint8)
    with pytest.raises(ValueError, match="576 columns is not a whole number of 256-element Q4_K"):
        block_weight("Q4_K", raw, 1, 576)


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K"])
def test_other_block_types_are_left_to_the_dequantizer(type_name):
    assert block_weight(type_name, random_blocks(type_name, 2, 256), 2, 256) is None


@pytest.fixture(scope="module")
def native_model(builtin_source):
    from tokenmill.models.registry import build_model

    return build_model(builtin_source, torch.float32, "cpu")  # quantization="auto", the default


def test_builtin_model_runs_on_its_gguf_blocks(native_model, builtin_source):
    report = native_model.weight_report()
    assert set(report) == {"gguf:Q4_1", "gguf:Q8_0"}, report
    # the linear layers, embedding and tied head together: no more than the file's weights
    assert sum(report.values()) <= builtin_source.path.stat().st_size
    layer = native_model.layers[0]
    for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                   layer.mlp.down_proj):
        assert isinstance(module.op, QuantizedOp)
    # lookup and the tied LM head read the same Q8_0 codes; no float table exists
    assert native_model.embed_tokens.table is None
    assert isinstance(native_model.embed_tokens.tie_head(), QuantizedOp)


def test_gguf_blocks_hold_the_same_matrices_as_the_dequantized_model(native_model, builtin_model):
    """The rotary un-permutation, done as a row gather on the blocks, and the q/k/v fusion give the
    matrices transformers' loader dequantizes to (builtin_model is that dequantized form)."""
    for index in (0, 29):
        ours, ref = native_model.layers[index], builtin_model.layers[index]
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                     "mlp.down_proj"):
            a = ours.get_submodule(name).weight
            b = ref.get_submodule(name).weight
            assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    ids = torch.tensor([1, 500, 20000, 49151])
    assert torch.equal(native_model.embed_tokens(ids), builtin_model.embed_tokens(ids))
