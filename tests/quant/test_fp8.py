"""FP8 weights: the tiled CPU matmul and the ``_scaled_mm`` path agree with the dequantized matrix,
shards concatenate, the ``fp8`` method quantizes float weights, and FP8 checkpoints
(compressed-tensors per tensor / per channel, DeepSeek-style 128x128 blocks) read exactly."""

from __future__ import annotations

import json

import pytest
import torch

from tests.quant.quant_checkpoints import copy_folder, linear_prefixes, relative_error, save_fp8
from tokenmill.errors import CorruptModelFileError, UnsupportedModelError
from tokenmill.loader.model_source import open_model_source
from tokenmill.quant.fp8 import (
    FP8_DTYPE,
    TILE_ROWS,
    Fp8Weight,
    concat_fp8,
    quantize_fp8,
    scaled_mm_linear,
)
from tokenmill.quant.registry import get_quant_method
from tokenmill.quant.weight import QuantizedWeight

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _block_weight(rows: int, cols: int, block: tuple[int, int] = (128, 128)) -> Fp8Weight:
    codes = torch.randn(rows, cols).to(FP8_DTYPE)
    scale = torch.rand(-(-rows // block[0]), -(-cols // block[1])) + 0.5
    return Fp8Weight(codes, scale, block)


def _weights() -> dict[str, Fp8Weight]:
    torch.manual_seed(0)
    # more rows than one tile, and a last tile that is not full
    rows = 2 * TILE_ROWS + 96  # divisible by 16, as _scaled_mm wants
    dense = torch.randn(rows, 96) * torch.linspace(0.1, 3, rows)[:, None]
    return {"tensor": quantize_fp8(dense, per_channel=False),
            "channel": quantize_fp8(dense, per_channel=True),
            "block": _block_weight(rows - 8, 200)}


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_linear_matches_the_dequantized_matrix(kind, dtype):
    weight = _weights()[kind]
    x = torch.randn(2, 5, weight.in_features)  # leading dimensions are kept
    bias = torch.randn(weight.out_features)
    out = weight.linear(x.to(dtype), bias.to(dtype))
    assert out.dtype == dtype and out.shape == (2, 5, weight.out_features)
    expected = x @ weight.dequantize().T + bias
    # float32: only summation order differs; bfloat16: activations and output rounded to 8 bits
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(out.float(), expected) < tolerance


@pytest.mark.parametrize("kind", ["tensor", "channel"])
def test_scaled_mm_path_matches_within_activation_rounding(kind):
    """The GPU path, run through torch's CPU ``_scaled_mm``: the only extra error is rounding the
    activations to e4m3 (3 mantissa bits, relative rounding error up to 1/16 per element)."""
    weight = _weights()[kind]
    assert weight.can_scaled_mm()
    x = torch.randn(3, weight.in_features)  # 3 rows: padded to 16 inside
    bias = torch.randn(weight.out_features)
    out = scaled_mm_linear(weight, x, bias)
    assert out.shape == (3, weight.out_features)
    assert relative_error(out, x @ weight.dequantize().T + bias) < 0.05


def test_quantize_fp8_error_and_scales():
    torch.manual_seed(0)
    dense = torch.randn(64, 128) * torch.logspace(-4, 1, 64)[:, None]  # rows 10**5 apart in size
    per_channel = quantize_fp8(dense, per_channel=True)
    per_tensor = quantize_fp8(dense, per_channel=False)
    assert per_channel.codes.dtype == FP8_DTYPE and per_channel.scale.shape == (64,)
    assert per_tensor.scale.shape == ()
    assert per_channel.nbytes() == 64 * 128 + 64 * 4
    # e4m3 keeps 3 mantissa bits: ~2-3% relative error per weight, in every row when each row has
    # its own scale; with one scale the smallest rows fall below e4m3's range (2**-9) and vanish
    row_errors = ((per_channel.dequantize() - dense).norm(dim=1) / dense.norm(dim=1))
    assert row_errors.max() < 0.04
    small_row = (per_tensor.dequantize()[0] - dense[0]).norm() / dense[0].norm()
    assert small_row > 0.2


def test_concat_mixes_scales_losslessly():
    weights = _weights()
    parts = [weights["tensor"], weights["channel"], quantize_fp8(torch.randn(16, 96), False)]
    assert all(parts[0].can_concat(p) for p in parts[1:])
    fused = concat_fp8(parts)
    assert fused.scale.shape == (fused.out_features,)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    # block scales stack only when no block straddles two shards
    aligned, short = _block_weight(256, 200), _block_weight(64, 200)
    assert aligned.can_concat(_block_weight(128, 200)) and not aligned.can_concat(short)
    assert not aligned.can_concat(weights["channel"])
    stacked = concat_fp8([aligned, _block_weight(128, 200)])
    assert stacked.scale.shape == (3, 2)
    assert not weights["tensor"].can_concat(quantize_fp8(torch.randn(8, 32)))  # other K


def test_fp8_method_prepares_any_weight():
    method = get_quant_method("fp8")
    dense = torch.randn(64, 96)
    prepared = method.prepare("layer", dense, torch.bfloat16)
    assert isinstance(prepared, Fp8Weight) and prepared.scale.shape == (64,)
    assert relative_error(prepared.dequantize(), dense) < 0.04
    assert method.prepare("layer", prepared, torch.float32) is prepared  # FP8 stays as it is
    from tokenmill.quant.int4 import quantize_int4

    int4 = quantize_int4(dense, 32)
    assert isinstance(int4, QuantizedWeight)
    requantized = method.prepare("layer", int4, torch.float32)
    assert relative_error(requantized.dequantize(), int4.dequantize()) < 0.04
    # dequantize_rows serves a tied embedding's lookups
    rows = torch.tensor([3, 0, 63])
    assert torch.equal(prepared.dequantize_rows(rows), prepared.dequantize()[rows])
    assert prepared.to("cpu").codes.device.type == "cpu"


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_fp8_checkpoint_reads_exactly(tiny_llama, tmp_path, strategy):
    folder, state = tiny_llama
    fp8, dense = save_fp8(folder, tmp_path / "fp8", state, strategy)
    weights = dict(open_model_source(fp8).iter_tensors())
    for prefix, _ in linear_prefixes():
        weight = weights[f"{prefix}.weight"]
        assert isinstance(weight, Fp8Weight)
        assert (weight.block_size is not None) == (strategy == "block")
        assert weight.scale.shape == {"tensor": (), "channel": (weight.out_features,),
                                      "block": (-(-weight.out_features // 128), 1 + (
                                          weight.in_features > 128))}[strategy]
        assert torch.equal(weight.dequantize(), dense[prefix])
    # input_scale is dropped; unquantized tensors (the ignored lm_head, norms) pass through
    assert not [n for n in weights if "scale" in n.rpartition(".")[2]]
    assert torch.equal(weights["lm_head.weight"], state["lm_head.weight"])
    assert len(weights) == len(state)


@pytest.fixture(scope="module")
def fp8_parts(tiny_llama, tmp_path_factory):
    from safetensors.torch import load_file

    folder, state = tiny_llama
    fp8, _ = save_fp8(folder, tmp_path_factory.mktemp("fp8"), state, "channel")
    config = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    return folder, load_file(str(fp8 / "model.safetensors")), config


def test_malformed_fp8_is_refused_naming_the_tensor(fp8_parts, tmp_path):
    folder, tensors, config = fp8_parts
    wrong = dict(tensors, **{f"{Q_PROJ}.weight_scale": torch.ones(3)})
    with pytest.raises(CorruptModelFileError, match=rf"{Q_PROJ}\.weight_scale has shape \(3,\), "
                                                    r"expected \(\) or \(128,\) or \(128, 1\)"):
        dict(open_model_source(copy_folder(folder, tmp_path / "a", wrong, config)).iter_tensors())
    missing = {n: t for n, t in tensors.items() if n != f"{Q_PROJ}.weight_scale"}
    with pytest.raises(CorruptModelFileError, match=rf"{Q_PROJ}\.weight_scale is missing"):
        dict(open_model_source(copy_folder(folder, tmp_path / "b", missing, config)).iter_tensors())
    e5m2 = dict(tensors, **{f"{Q_PROJ}.weight": tensors[f"{Q_PROJ}.weight"].to(torch.float8_e5m2)})
    with pytest.raises(UnsupportedModelError, match=rf"{Q_PROJ}\.weight: .*float8_e5m2"):
        dict(open_model_source(copy_folder(folder, tmp_path / "c", e5m2, config)).iter_tensors())


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": "pack-quantized"}, "format 'pack-quantized'"),
    ({"config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}, "4-bit 'int'"),
    ({"config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
                                          "strategy": "group"}}}}, "strategy 'group'"),
])
def test_unsupported_fp8_configs_are_refused_at_open(fp8_parts, tmp_path, changes, message):
    folder, tensors, config = fp8_parts
    broken = copy_folder(folder, tmp_path / "broken", tensors, {**config, **changes})
    with pytest.raises(UnsupportedModelError, match=message):
        open_model_source(broken)
