"""GGUF's Q8_0 / Q4_0 / Q4_1 blocks are kept as they are: repacked bit for bit, never copied to float,
and the built-in model runs on them by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tokenmill.layers.linear import QuantizedOp
from tokenmill.quant.gguf import NATIVE_BLOCK_TYPES, block_weight


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


def test_other_block_types_are_left_to_the_dequantizer():
    raw = np.zeros((2, 144), dtype=np.uint8)  # two rows of one 256-element Q4_K super-block
    assert block_weight("Q4_K", raw, 2, 256) is None


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
